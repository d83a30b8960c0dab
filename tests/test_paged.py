"""Paged K/V (xFormers' Paged*PaddedKeysMask) as the base of SparseKMask and in exact mode.

Each case builds a padded-keys problem, scatters its pages into a shuffled physical pool
(with unused garbage pages), and checks the paged call against the non-paged one and the
float64 brute force of conftest.  The core test also runs on CUDA (DEVICES): float64 there is
the PyTorch path on the GPU, fp16 / bf16 with D = 64 the CUDA kernels on the gathered layout
(relative error against the CPU float64 reference: 1e-2 bf16, 3e-3 fp16).
"""

import math
import random

import pytest
import torch
import xformers.ops as xops
from conftest import brute_sparsek, dense_exact, max_abs, rel_err, requires_cuda
from xformers.ops.fmha import attn_bias as xab

from xformers_sparsek import SparseKMask, SparseKOp, sparsek_attention

F64, BF16, F16 = torch.float64, torch.bfloat16, torch.float16
REL_TOL = {BF16: 1e-2, F16: 3e-3}

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


PAGED = {
    "causal": (xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
               xab.BlockDiagonalCausalWithOffsetPaddedKeysMask),
    "noncausal": (xab.PagedBlockDiagonalPaddedKeysMask, xab.BlockDiagonalPaddedKeysMask),
}


def _case(kind, gqa, dtype=torch.float64, page_size=4, decode=False, D=8):
    """-> q, (k, v, s, bias) paged, (k, v, s, bias) non-paged (on the CPU; half dtypes:
    float32 scores)."""
    paged_t, plain_t = PAGED[kind]
    kl = [random.randint(1, 14) for _ in range(3)]
    ql = [1 if decode else random.randint(1, k) for k in kl]
    max_pages = math.ceil(max(kl) / page_size) + 1
    pad = max_pages * page_size
    nseq = len(kl)
    G, H = (2, 3) if gqa else (None, 2)
    sdt = torch.float32 if dtype in (BF16, F16) else dtype
    heads = (G, 1) if gqa else (H,)
    k = torch.randn(1, nseq * pad, *heads, D, dtype=dtype)
    v = torch.randn(1, nseq * pad, *heads, D, dtype=dtype)
    s = torch.randn(1, nseq * pad, *heads, dtype=sdt)
    q = torch.randn(1, sum(ql), *((G, H) if gqa else (H,)), D, dtype=dtype)
    # physical pool: every logical page at a random physical page, plus 2 garbage pages
    n_phys = nseq * max_pages + 2
    perm = torch.randperm(n_phys)
    bt = perm[: nseq * max_pages].view(nseq, max_pages).to(torch.int32)
    kp = torch.randn(1, n_phys * page_size, *heads, D, dtype=dtype)
    vp = torch.randn(1, n_phys * page_size, *heads, D, dtype=dtype)
    sp = torch.randn(1, n_phys * page_size, *heads, dtype=sdt)
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


def _on(device, q, paged_args):
    kp, vp, sp, paged = paged_args
    return q.to(device), kp.to(device), vp.to(device), sp.to(device), paged.to(device)


@pytest.mark.parametrize("device,dtype", [
    ("cpu", F64),
    pytest.param("cuda", F64, marks=requires_cuda, id="cuda-f64"),
    pytest.param("cuda", BF16, marks=requires_cuda, id="cuda-bf16"),
    pytest.param("cuda", F16, marks=requires_cuda, id="cuda-f16"),
], ids=["f64", "cuda-f64", "cuda-bf16", "cuda-f16"])
@pytest.mark.parametrize("kind", ["causal", "noncausal"])
@pytest.mark.parametrize("gqa", [False, True], ids=["bmhk", "bmghk"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_paged_sparse_matches_unpaged_and_reference(kind, gqa, decode, device, dtype):
    half = dtype in REL_TOL
    D = 64 if half else 8  # a CUDA-kernel head dim for the half dtypes

    def close(out, ref, tol64):
        assert out.device.type == device and out.dtype == dtype
        if half:
            assert rel_err(out, ref) <= REL_TOL[dtype]
        else:
            assert max_abs(out, ref) < tol64

    for _ in range(3):
        q, paged_args, (k, v, s, plain) = _case(kind, gqa, dtype=dtype, decode=decode, D=D)
        q, kp, vp, sp, paged = _on(device, q, paged_args)
        window = random.randint(0, 3) if kind == "causal" else 0
        topk = random.randint(1, 5)
        out_p = sparsek_attention(q, kp, vp, sp, topk, window, attn_bias=paged)
        ref, _ = brute_sparsek(q, k, v, s, topk, window, plain)
        ref = torch.from_numpy(ref)
        close(out_p, ref, 1e-10)
        out = out_p
        if kind == "causal":  # (BlockDiagonalPaddedKeysMask is not a public base)
            k, v, s = (t.to(device) for t in (k, v, s))
            out = sparsek_attention(q, k, v, s, topk, window, attn_bias=plain.to(device))
            if half:
                close(out, ref, None)
            else:
                assert max_abs(out_p, out) < 1e-12  # padding keys differ: rounding only
        # through xFormers (float32, or the half dtype: the kernels), explicit op and
        # automatic dispatch
        bias = SparseKMask(sp.float(), topk, window, base=paged)
        xin = [t if half else t.float() for t in (q, kp, vp)]
        for op in (SparseKOp, None):
            o = xops.memory_efficient_attention(*xin, attn_bias=bias, op=op)
            if half:
                assert o.dtype == dtype and rel_err(o, ref) <= REL_TOL[dtype]
            else:
                assert max_abs(o, out) < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("kind", ["causal", "noncausal"])
def test_paged_exact_mode(kind, device):
    q, (kp, vp, _, paged), (k, v, _, plain) = _case(kind, False, dtype=torch.float32)
    q, kp, vp, paged = q.to(device), kp.to(device), vp.to(device), paged.to(device)
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
