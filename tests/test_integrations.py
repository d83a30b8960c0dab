"""Integrations: ``sparsify`` on unchanged xFormers models (mistral-inference / DINOv2 style)
and diffusers' xFormers attention processor with ``attention_op=SparseKOp``.

The tiny models below call ``xformers.ops.memory_efficient_attention`` the way those
projects do; their dense reference swaps in a plain PyTorch attention (bias.materialize).
"""

import threading

import pytest
import torch
import xformers.ops as xops
from torch import nn
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from xformers_sparsek import SparseKMask, SparseKOp

CPU = torch.device("cpu")
TOL = 1e-5


@pytest.fixture(autouse=True)
def _clean_state():
    was = xs.is_enabled()
    yield
    xs.disable_sparsify()
    if not was:
        xs.disable()
    assert xs.active_sparsify() is None


def torch_attention(q, k, v, attn_bias=None, scale=None):
    """Dense float32 attention for BMHK / BMGHK inputs and a standard xFormers bias."""
    heads = q.shape[2:-1]
    B, Mq, Mk, D = q.shape[0], q.shape[1], k.shape[1], q.shape[-1]
    q, k, v = (x.reshape(B, x.shape[1], -1, x.shape[-1]) for x in (q, k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * (D**-0.5 if scale is None else scale)
    if attn_bias is not None:
        logits = logits + attn_bias.materialize((Mq, Mk), dtype=q.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), v)
    return out.reshape(B, Mq, *heads, v.shape[-1])


# ------------------------------------------------------------------------------------------
# a mistral-inference style decoder (packed sequences, GQA, RoPE)


def rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * freqs[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class MistralLikeAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, bmghk):
        super().__init__()
        self.h, self.hkv, self.d = n_heads, n_kv_heads, dim // n_heads
        self.bmghk = bmghk
        self.wq = nn.Linear(dim, n_heads * self.d, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.d, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.d, bias=False)
        self.wo = nn.Linear(n_heads * self.d, dim, bias=False)

    def forward(self, x, pos, mask, attention):
        T, rep = x.shape[0], self.h // self.hkv
        xq = rope(self.wq(x).view(T, self.h, self.d), pos)
        xk = rope(self.wk(x).view(T, self.hkv, self.d), pos)
        xv = self.wv(x).view(T, self.hkv, self.d)
        if self.bmghk:  # GQA without copies: [1, T, G, H, D], K/V expanded over H
            q = xq.view(1, T, self.hkv, rep, self.d)
            k = xk[None, :, :, None].expand(1, T, self.hkv, rep, self.d)
            v = xv[None, :, :, None].expand(1, T, self.hkv, rep, self.d)
        else:  # mistral-inference: repeat_kv then BMHK
            q = xq[None]
            k = torch.repeat_interleave(xk, rep, dim=1)[None]
            v = torch.repeat_interleave(xv, rep, dim=1)[None]
        out = attention(q, k, v, mask)
        return self.wo(out.reshape(T, -1))


class MistralLike(nn.Module):
    def __init__(self, vocab=61, dim=64, n_heads=4, n_kv_heads=2, layers=2, bmghk=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = nn.ModuleList(
            MistralLikeAttention(dim, n_heads, n_kv_heads, bmghk) for _ in range(layers)
        )
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, seqlens, local_window=None, attention=None):
        attention = attention or (lambda q, k, v, m: xops.memory_efficient_attention(
            q, k, v, attn_bias=m))
        mask = xab.BlockDiagonalCausalMask.from_seqlens(seqlens, device=CPU)
        if local_window is not None:
            mask = mask.make_local_attention(local_window)
        pos = torch.cat([torch.arange(s) for s in seqlens])
        h = self.emb(tokens)
        for attn, ffn in zip(self.attn, self.ffn):
            h = h + attn(self.norm(h), pos, mask, attention)
            h = h + ffn(self.norm(h))
        return self.out(self.norm(h))


# ------------------------------------------------------------------------------------------
# a DINOv2 style ViT block (BlockDiagonalMask over a list of images, non-causal)


class DinoLikeBlock(nn.Module):
    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.h = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_list, attention=None):
        attention = attention or (lambda q, k, v, m: xops.memory_efficient_attention(
            q, k, v, attn_bias=m))
        seqlens = [x.shape[1] for x in x_list]
        mask = xab.BlockDiagonalMask.from_seqlens(seqlens, device=CPU)
        x = torch.cat(x_list, 1)  # [1, sum N, C]
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.h, C // self.h)
        q, k, v = torch.unbind(qkv, 2)
        x = x + self.proj(attention(q, k, v, mask).reshape(B, N, C))
        return x


# ------------------------------------------------------------------------------------------
# the default scorer


def _gqa_qk(T, G, H, D):
    q = torch.randn(1, T, G, H, D)
    k = torch.randn(1, T, G, 1, D).expand(1, T, G, H, D)
    return q, k


@pytest.mark.parametrize("layout", ["bmhk", "bmghk"])
def test_scorer_is_causal_safe_and_resets_per_sequence(layout):
    seqlens = [9, 14, 6]
    T = sum(seqlens)
    bias = xab.BlockDiagonalCausalMask.from_seqlens(seqlens, device=CPU)
    if layout == "bmhk":
        q, k = torch.randn(1, T, 3, 16), torch.randn(1, T, 3, 16)
    else:
        q, k = _gqa_qk(T, 2, 3, 16)
    v = torch.randn_like(k)
    s = xs.mean_query_scorer(q, k, v, bias)
    assert s.shape == k.shape[:-1] and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    if layout == "bmghk":
        assert s.stride(3) == 0  # one selection per GQA group
    # Changing tokens after position j (here: from the middle of sequence 2 on) leaves the
    # scores of every key <= j unchanged -- bitwise.
    cut = seqlens[0] + 5
    q2 = torch.cat([q[:, :cut], torch.randn_like(q[:, cut:]) * 3], 1)
    k2 = torch.cat([k[:, :cut], torch.randn_like(k[:, cut:]) * 3], 1)
    if layout == "bmghk":  # keep K expanded over the group (stride 0)
        k2 = k2[:, :, :, :1].expand(k.shape)
    s2 = xs.mean_query_scorer(q2, k2, v, bias)
    assert torch.equal(s[:, :cut], s2[:, :cut])
    assert not torch.equal(s[:, cut:], s2[:, cut:])
    # Statistics restart at sequence boundaries: sequence 2 scores as if it were alone.
    a, b = seqlens[0], seqlens[0] + seqlens[1]
    alone = xab.BlockDiagonalCausalMask.from_seqlens([seqlens[1]], device=CPU)
    s_alone = xs.mean_query_scorer(q[:, a:b], k[:, a:b], v[:, a:b], alone)
    assert torch.allclose(s[:, a:b], s_alone, rtol=1e-6, atol=1e-3)
    # the chunked prefix sums give the same scores for any chunk size
    small = xs.MeanQueryScorer()
    small.CHUNK = 4
    assert torch.allclose(small(q, k, v, bias), s, rtol=1e-6, atol=1e-3)
    nc = xab.BlockDiagonalMask.from_seqlens(seqlens, device=CPU)
    assert torch.allclose(small(q, k, v, nc), xs.mean_query_scorer(q, k, v, nc), atol=1e-3)
    # attention sinks: the first `sinks` keys of each sequence carry the bonus
    sinks = xs.mean_query_scorer.sinks
    for start in (0, a, b):
        assert (s[:, start:start + sinks] > 5000).all()
    assert (s[:, a + sinks:b].abs() < 5000).all()


def test_scorer_formula_and_kv_cache_decode():
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)
    sc = xs.MeanQueryScorer(sharpness=1.0, sinks=0)
    s = sc(q, k, k, xab.LowerTriangularMask())
    qbar = q.cumsum(1) / torch.arange(1, 7).view(1, 6, 1, 1)
    want = (qbar * k).sum(-1) * 8**-0.5
    assert torch.allclose(s, want, atol=1e-5)
    # non-causal: the mean of all the sequence's queries
    s_nc = sc(q, k, k, None)
    assert torch.allclose(s_nc, (q.mean(1, keepdim=True) * k).sum(-1) * 8**-0.5, atol=1e-5)
    # decoding against a KV cache: queries don't cover the keys -> no opinion (exact)
    dec = xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [1, 1], 8, [5, 7], device=CPU)
    assert sc(torch.randn(1, 2, 2, 8), torch.randn(1, 16, 2, 8), None, dec) is None


# ------------------------------------------------------------------------------------------
# sparsify on the mistral-style model


@pytest.mark.parametrize("bmghk", [False, True], ids=["bmhk", "bmghk"])
@pytest.mark.parametrize("local", [None, 9], ids=["causal", "local9"])
def test_sparsify_mistral_like(bmghk, local):
    seqlens = [13, 21, 7]
    model = MistralLike(bmghk=bmghk)
    tokens = torch.randint(0, 61, (sum(seqlens),))
    ref = model(tokens, seqlens, local, attention=torch_attention)

    # topk >= context: exact attention, whatever the scores
    with xs.sparsify(topk=64, window=4):
        exact = model(tokens, seqlens, local)
    assert (exact - ref).abs().max() < TOL

    # small topk: runs and differs; gradients reach every parameter
    with xs.sparsify(topk=3, window=2) as cfg:
        assert cfg.topk == 3
        sparse = model(tokens, seqlens, local)
        sparse.logsumexp(-1).mean().backward()
    assert (sparse - ref).abs().max() > 1e-3
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_sparsify_exact_mode_gradients_match_dense():
    seqlens = [11, 6]
    model = MistralLike(bmghk=True, layers=1)
    tokens = torch.randint(0, 61, (sum(seqlens),))
    model(tokens, seqlens, attention=torch_attention).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with xs.sparsify(topk=32, window=3):
        model(tokens, seqlens).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize("bmghk", [False, True], ids=["bmhk", "bmghk"])
def test_sparsify_backward_after_the_block(bmghk):
    """The graph built inside the block keeps its SparseK backward after the block ends."""
    seqlens = [10, 7]
    model = MistralLike(bmghk=bmghk, layers=1)
    tokens = torch.randint(0, 61, (sum(seqlens),))
    with xs.sparsify(topk=3, window=2):
        model(tokens, seqlens).square().mean().backward()
    inside = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with xs.sparsify(topk=3, window=2):
        loss = model(tokens, seqlens).square().mean()
    loss.backward()
    for p, g in zip(model.parameters(), inside):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-5)


def test_sparsify_learned_scorer_gets_gradients():
    seqlens = [16, 12]
    model = MistralLike(layers=1)
    lin = nn.Linear(16, 1)

    def scorer(q, k, v, bias):  # one score per key and head, from the key only
        return 0.3 * lin(k).squeeze(-1)

    tokens = torch.randint(0, 61, (sum(seqlens),))
    with xs.sparsify(topk=4, scorer=scorer):
        model(tokens, seqlens).logsumexp(-1).mean().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert model.attn[0].wq.weight.grad.abs().sum() > 0


def test_sparsify_bad_scorer_output_is_a_clear_error():
    q = k = v = torch.randn(1, 8, 2, 16)
    with xs.sparsify(topk=2, scorer=lambda q, k, v, b: torch.zeros(1, 8)):
        with pytest.raises(ValueError, match=r"scorer .* key.shape\[:-1\] = \(1, 8, 2\)"):
            xops.memory_efficient_attention(q, k, v, attn_bias=xab.LowerTriangularMask())
    with pytest.raises(ValueError, match="topk"):
        xs.sparsify(topk=0)
    with pytest.raises(ValueError, match="scorer"):
        xs.sparsify(topk=2, scorer="mean")


# ------------------------------------------------------------------------------------------
# non-causal: DINOv2 style


def test_sparsify_dino_like_noncausal():
    block = DinoLikeBlock()
    imgs = [torch.randn(1, n, 64) for n in (17, 10, 5)]
    ref = block(imgs, attention=torch_attention)
    xs.enable()  # CPU: no built-in xFormers op, SparseKOp runs the dense fallback
    with xs.sparsify(topk=2, window=4):  # causal-only by default: left alone
        out = block(imgs)
    assert (out - ref).abs().max() < TOL
    with xs.sparsify(topk=32, window=4, noncausal=True):  # window ignored, topk >= N
        out = block(imgs)
    assert (out - ref).abs().max() < TOL
    with xs.sparsify(topk=3, noncausal=True):
        out = block(imgs)
        out.square().mean().backward()
    assert (out - ref).abs().max() > 1e-3
    assert block.qkv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# state handling: nesting, off-switch, exceptions, threads, process-wide default


def test_sparsify_state_nesting_threads_and_global():
    a, b = xs.sparsify(topk=5), xs.sparsify(topk=7, window=2)
    assert xs.active_sparsify() is None
    with a as ca:
        assert xs.active_sparsify() is ca
        with b:
            assert xs.active_sparsify().topk == 7
            with xs.sparsify(None):
                assert xs.active_sparsify() is None
            with a:  # the same object re-entered
                assert xs.active_sparsify().topk == 5
            assert xs.active_sparsify().topk == 7
        seen = []
        t = threading.Thread(target=lambda: seen.append(xs.active_sparsify()))
        t.start()
        t.join()
        assert seen == [None]  # other threads don't see this block
        with pytest.raises(RuntimeError):
            with b:
                raise RuntimeError("boom")
        assert xs.active_sparsify() is ca
    assert xs.active_sparsify() is None

    g = xs.sparsify(topk=9).enable()
    seen = []
    t = threading.Thread(target=lambda: seen.append(xs.active_sparsify()))
    t.start()
    t.join()
    assert seen == [g.config] and xs.active_sparsify() is g.config
    with xs.sparsify(None):
        assert xs.active_sparsify() is None
    xs.disable_sparsify()
    assert xs.active_sparsify() is None


def test_sparsify_leaves_other_calls_alone():
    q, k, v = (torch.randn(1, 10, 2, 16) for _ in range(3))
    causal = xab.LowerTriangularMask()
    ref = torch_attention(q, k, v, causal)
    # an explicit SparseKMask is the caller's: not re-wrapped
    s = torch.randn(1, 10, 2)
    mine = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 2, 1, causal))
    with xs.sparsify(topk=6, window=3):
        again = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 2, 1, causal))
        # a scorer that abstains leaves the call exact (needs a dense op: enable())
    assert torch.equal(mine, again)
    xs.enable()
    with xs.sparsify(topk=1, scorer=lambda *a: None):
        out = xops.memory_efficient_attention(q, k, v, attn_bias=causal)
    assert (out - ref).abs().max() < TOL


# ------------------------------------------------------------------------------------------
# diffusers: XFormersAttnProcessor(attention_op=SparseKOp), BMK inputs, custom scale


def _diffusers_attention(cross):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=64, cross_attention_dim=48 if cross else None, heads=4,
                     dim_head=16)
    attn.scale = 0.37  # a custom scale (diffusers always passes one)
    return attn


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_diffusers_xformers_processor_exact(cross):
    attn = _diffusers_attention(cross)  # (skips without diffusers: import it first)
    from diffusers.models.attention_processor import AttnProcessor, XFormersAttnProcessor

    x = torch.randn(2, 24, 64, requires_grad=True)
    enc = torch.randn(2, 9, 48) if cross else None
    attn.set_processor(AttnProcessor())
    ref = attn(x, encoder_hidden_states=enc)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    attn.set_processor(XFormersAttnProcessor(attention_op=SparseKOp))
    out = attn(x, encoder_hidden_states=enc)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert (out - ref).abs().max() < TOL
    assert torch.allclose(g, gref, atol=1e-4, rtol=1e-4)


def test_diffusers_enable_xformers_on_tiny_unet(monkeypatch):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, XFormersAttnProcessor

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=16,  # 2 heads: head dims 16 and 32
    ).eval()
    sample, enc = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    unet.set_attn_processor(AttnProcessor())
    with torch.no_grad():
        ref = unet(sample, 3, enc).sample
    # The path diffusers takes on a GPU: it checks torch.cuda.is_available(), runs a smoke
    # test through automatic dispatch (CPU: SparseKOp is the fallback after enable()), then
    # installs XFormersAttnProcessor(attention_op=SparseKOp) everywhere.
    xs.enable()
    real_randn = torch.randn
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch, "randn", lambda *a, device=None, **kw: real_randn(*a, **kw))
        unet.enable_xformers_memory_efficient_attention(attention_op=SparseKOp)
    procs = unet.attn_processors.values()
    assert procs and all(isinstance(p, XFormersAttnProcessor) for p in procs)
    assert all(p.attention_op is SparseKOp for p in procs)
    with torch.no_grad():
        out = unet(sample, 3, enc).sample
        with xs.sparsify(topk=4, noncausal=True):  # self-attention over 16 latents: sparse
            sparse = unet(sample, 3, enc).sample
    assert (out - ref).abs().max() < 1e-4
    assert (sparse - ref).abs().max() > 1e-4


def test_bmk_inputs_with_a_sparsek_mask():
    B_H, M, K = 6, 12, 16
    q, k, v = (torch.randn(B_H, M, K) for _ in range(3))
    scores = torch.randn(B_H, M)  # key.shape[:-1] of the BMK key
    out = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(scores, topk=M),
                                          op=SparseKOp, scale=0.3)
    ref = torch_attention(q[:, :, None], k[:, :, None], v[:, :, None], scale=0.3)[:, :, 0]
    assert out.shape == (B_H, M, K) and (out - ref).abs().max() < TOL
    # sparse, with gradients to q, k, v and the scores (functional path, BMK -> BMHK)
    qq, kk, vv, ss = (t.clone().requires_grad_() for t in (q, k, v, scores))
    out = xops.memory_efficient_attention(qq, kk, vv, attn_bias=SparseKMask(ss, topk=3),
                                          scale=0.3)
    assert out.shape == (B_H, M, K) and (out - ref).abs().max() > 1e-3
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (qq, kk, vv, ss))
    # the same through the BMHK API, for comparison
    out4 = xs.sparsek_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                scores[:, :, None], 3, scale=0.3)
    assert torch.allclose(out, out4[:, :, 0], atol=1e-6)
    # xFormers' forward-only entry points refuse BMK with any AttentionBias, with a message
    with pytest.raises(ValueError, match="BMHK"):
        xops.memory_efficient_attention_forward(q, k, v, attn_bias=SparseKMask(scores, 3),
                                                op=SparseKOp[0])


def test_sparsify_kv_cache_prefill_and_decode():
    """mistral-inference with a cache: prefill (q_len == k_len in padded key slots) is
    sparsified; decoding (q_len < k_len) has no causal running mean: left exact."""
    q, k, v = torch.randn(1, 12, 2, 16), torch.randn(1, 16, 2, 16), torch.randn(1, 16, 2, 16)
    pre = xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([5, 7], 8, [5, 7],
                                                                       device=CPU)
    ref = torch_attention(q, k, v, pre)
    with xs.sparsify(topk=16, window=2):
        assert (xops.memory_efficient_attention(q, k, v, attn_bias=pre) - ref).abs().max() < TOL
    with xs.sparsify(topk=2, window=1):
        assert (xops.memory_efficient_attention(q, k, v, attn_bias=pre) - ref).abs().max() > 1e-3
    dec = xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 1], 8, [6, 8],
                                                                       device=CPU)
    xs.enable()  # dense fallback on the CPU
    with xs.sparsify(topk=1):
        out = xops.memory_efficient_attention(q[:, :2], k, v, attn_bias=dec)
    assert (out - torch_attention(q[:, :2], k, v, dec)).abs().max() < TOL
