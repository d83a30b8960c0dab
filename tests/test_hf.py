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
    m = _model("llama")
    sk_hf.add_scorers(m, topk=3, window=4)
    with torch.no_grad():
        for p in sk_hf.scorer_parameters(m):
            p.add_(torch.randn_like(p) * 0.3)
    ids = _ids(1, 6)
    with torch.no_grad():
        m.generation_config.eos_token_id = None
        cached = m.generate(ids, max_new_tokens=50, do_sample=False)
        seq = ids
        for _ in range(50):
            nxt = m(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)
