"""Paged K/V (xFormers' Paged*PaddedKeysMask) as the base of SparseKMask and in exact mode.

Each case builds a padded-keys problem, scatters its pages into a shuffled physical pool
(with unused garbage pages), and checks the paged call against the non-paged one and the
float64 brute force of conftest.
"""

import math
import random

import pytest
import torch
import xformers.ops as xops
from conftest import brute_sparsek, dense_exact, max_abs
from xformers.ops.fmha import attn_bias as xab

from xformers_sparsek import SparseKMask, SparseKOp, sparsek_attention

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: on a shared 2-core machine intra-op threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PAGED = {
    "causal": (xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
               xab.BlockDiagonalCausalWithOffsetPaddedKeysMask),
    "noncausal": (xab.PagedBlockDiagonalPaddedKeysMask, xab.BlockDiagonalPaddedKeysMask),
}


def _case(kind, gqa, dtype=torch.float64, page_size=4, decode=False):
    """-> q, (k, v, s, bias) paged, (k, v, s, bias) non-paged."""
    paged_t, plain_t = PAGED[kind]
    kl = [random.randint(1, 14) for _ in range(3)]
    ql = [1 if decode else random.randint(1, k) for k in kl]
    max_pages = math.ceil(max(kl) / page_size) + 1
    pad = max_pages * page_size
    nseq = len(kl)
    G, H, D = (2, 3, 8) if gqa else (None, 2, 8)
    heads = (G, 1) if gqa else (H,)
    k = torch.randn(1, nseq * pad, *heads, D, dtype=dtype)
    v = torch.randn(1, nseq * pad, *heads, D, dtype=dtype)
    s = torch.randn(1, nseq * pad, *heads, dtype=dtype)
    q = torch.randn(1, sum(ql), *((G, H) if gqa else (H,)), D, dtype=dtype)
    # physical pool: every logical page at a random physical page, plus 2 garbage pages
    n_phys = nseq * max_pages + 2
    perm = torch.randperm(n_phys)
    bt = perm[: nseq * max_pages].view(nseq, max_pages).to(torch.int32)
    kp = torch.randn(1, n_phys * page_size, *heads, D, dtype=dtype)
    vp = torch.randn(1, n_phys * page_size, *heads, D, dtype=dtype)
    sp = torch.randn(1, n_phys * page_size, *heads, dtype=dtype)
    for sq in range(nseq):
        for p in range(max_pages):
            lo, ph = sq * pad + p * page_size, int(bt[sq, p]) * page_size
            kp[:, ph:ph + page_size] = k[:, lo:lo + page_size]
            vp[:, ph:ph + page_size] = v[:, lo:lo + page_size]
            sp[:, ph:ph + page_size] = s[:, lo:lo + page_size]

    def ex(t):  # GQA: K/V/scores shared (stride 0) over the H query heads of a group
        return t.expand(*t.shape[:3], H, *t.shape[4:]) if gqa else t

    paged = paged_t.from_seqlens(q_seqlen=ql, kv_seqlen=kl, block_tables=bt, page_size=page_size)
    plain = plain_t.from_seqlens(q_seqlen=ql, kv_padding=pad, kv_seqlen=kl)
    return q, (ex(kp), ex(vp), ex(sp), paged), (ex(k), ex(v), ex(s), plain)


@pytest.mark.parametrize("kind", ["causal", "noncausal"])
@pytest.mark.parametrize("gqa", [False, True], ids=["bmhk", "bmghk"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_paged_sparse_matches_unpaged_and_reference(kind, gqa, decode):
    for _ in range(3):
        q, (kp, vp, sp, paged), (k, v, s, plain) = _case(kind, gqa, decode=decode)
        window = random.randint(0, 3) if kind == "causal" else 0
        topk = random.randint(1, 5)
        out_p = sparsek_attention(q, kp, vp, sp, topk, window, attn_bias=paged)
        ref, _ = brute_sparsek(q, k, v, s, topk, window, plain)
        assert max_abs(out_p, torch.from_numpy(ref)) < 1e-10
        out = out_p
        if kind == "causal":  # (BlockDiagonalPaddedKeysMask is not a public base)
            out = sparsek_attention(q, k, v, s, topk, window, attn_bias=plain)
            assert max_abs(out_p, out) < 1e-12  # padding keys differ: rounding only
        # through xFormers (float32), explicit op and automatic dispatch
        bias = SparseKMask(sp.float(), topk, window, base=paged)
        f32 = [t.float() for t in (q, kp, vp)]
        for op in (SparseKOp, None):
            o = xops.memory_efficient_attention(*f32, attn_bias=bias, op=op)
            assert max_abs(o, out) < 1e-5


@pytest.mark.parametrize("kind", ["causal", "noncausal"])
def test_paged_exact_mode(kind):
    q, (kp, vp, _, paged), (k, v, _, plain) = _case(kind, False, dtype=torch.float32)
    out = xops.memory_efficient_attention(q, kp, vp, attn_bias=paged, op=SparseKOp)
    assert max_abs(out, dense_exact(q, k, v, plain)) < 1e-5
    out_f = sparsek_attention(q, kp, vp, None, None, attn_bias=paged)
    assert max_abs(out_f, out) < 1e-6


def test_paged_is_forward_only():
    q, (kp, vp, sp, paged), _ = _case("causal", False, dtype=torch.float32)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        sparsek_attention(q, kp, vp, sp, 2, 1, attn_bias=paged)
    for op in (SparseKOp, None):
        with pytest.raises((ValueError, NotImplementedError), match="forward-only"):
            xops.memory_efficient_attention(q, kp, vp, attn_bias=SparseKMask(sp, 2, 1, paged),
                                            op=op)
    with pytest.raises((ValueError, NotImplementedError), match="forward-only"):
        xops.memory_efficient_attention(q, kp, vp, attn_bias=paged, op=SparseKOp)
    with torch.no_grad():  # fine without gradients
        sparsek_attention(q, kp, vp, sp, 2, 1, attn_bias=paged)


def test_paged_bad_inputs():
    q, (kp, vp, sp, paged), _ = _case("causal", False)
    bad = xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask(
        q_seqinfo=paged.q_seqinfo, k_seqinfo=paged.k_seqinfo,
        block_tables=paged.block_tables + 1000, page_size=paged.page_size)
    with pytest.raises(ValueError, match="block_tables"):
        sparsek_attention(q, kp, vp, sp, 2, 1, attn_bias=bad)
    with pytest.raises(ValueError, match="page"):
        sparsek_attention(q, kp[:, :-1], vp[:, :-1], sp[:, :-1], 2, 1, attn_bias=paged)
    with pytest.raises(ValueError, match="scores"):
        sparsek_attention(q, kp, vp, sp[:, :-4], 2, 1, attn_bias=paged)
