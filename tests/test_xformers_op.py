"""SparseKOp through xFormers' public entry points (memory_efficient_attention & co)."""

import pytest
import torch
import xformers.ops as xops
from conftest import (
    BIAS_TYPES,
    DEVICES,
    cuda_kernels,
    dense_exact,
    kind_id,
    leaves,
    make_bias,
    max_abs,
    rand_inputs,
    rel_err,
)
from xformers.ops import fmha
from xformers.ops.fmha import attn_bias as xab
from xformers.ops.fmha.common import Inputs

import xformers_sparsek
from xformers_sparsek import (
    BwOp,
    FwOp,
    SparseKMask,
    SparseKOp,
    _attention,
    reference,
    sparsek_attention,
)

F32, F64 = torch.float32, torch.float64
CPU = torch.device("cpu")  # biases default to CUDA where a GPU is present
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
SPARSE_BIASES = {  # name: () -> (bias, B, Mq, Mk, window)
    "none": lambda: (None, 1, 21, 27, 0),
    "causal": lambda: (xab.LowerTriangularMask(), 2, 19, 19, 5),
    "bottom_right": lambda: (xab.LowerTriangularFromBottomRightMask(), 1, 9, 24, 3),
    "varlen": lambda: (xab.BlockDiagonalCausalMask.from_seqlens(
        [7, 1, 11], [7, 5, 13], device=CPU), 1, 19, 25, 4),
    "padded": lambda: (xab.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        [3, 1, 7], 16, [13, 9, 16], device=CPU), 1, 11, 48, 2),
}


def reference_cpu(q, k, v, s, topk, window, bias, scale=None):
    args = [x.detach().cpu() if x is not None else None for x in (q, k, v, s)]
    return reference.sparsek_reference(*args, topk, window, bias, scale)


def on(bias, device):
    return bias.to(device) if bias is not None and hasattr(bias, "to") else bias


# ------------------------------------------------------------------------------------------
# sparse mode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("G", [None, 2], ids=["bmhk", "bmghk"])
@pytest.mark.parametrize("case", list(SPARSE_BIASES))
def test_sparse_forward_matches_reference(case, G, dtype, device):
    bias, B, Mq, Mk, window = SPARSE_BIASES[case]()
    q, k, v, s = rand_inputs(B, Mq, Mk, G, 2, 64, 64, dtype, device)  # a CUDA-kernel head dim
    topk = 6
    mask = SparseKMask(s, topk, window, on(bias, device))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=mask, op=SparseKOp)
    ref, _ = reference_cpu(q, k, v, s, topk, window, bias)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    assert rel_err(out, ref) <= REL_TOL[dtype]
    # automatic dispatch gives the same answer
    auto = xops.memory_efficient_attention(q, k, v, attn_bias=mask)
    assert torch.equal(auto, out)


def test_custom_scale_and_kv_dim():
    q, k, v, s = rand_inputs(1, 21, 29, None, 3, 16, 24, F32)
    mask = SparseKMask(s, 5, 2, xab.LowerTriangularFromBottomRightMask())
    out = xops.memory_efficient_attention(q, k, v, attn_bias=mask, scale=0.37, op=SparseKOp)
    ref, _ = reference_cpu(q, k, v, s, 5, 2, mask.base, scale=0.37)
    assert out.shape == (1, 21, 3, 24) and rel_err(out, ref) <= 1e-5


def test_exact_mode_kv_dim_differs():
    """Exact mode with Kv != K (the CPU path's fused kernel needs K == Kv; it must not be used)."""
    q, k, v, _ = rand_inputs(2, 21, 29, None, 3, 16, 24, F32)
    bias = xab.LowerTriangularFromBottomRightMask()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=0.37, op=SparseKOp)
    ref, _ = reference_cpu(q, k, v, None, None, 0, bias, scale=0.37)
    assert out.shape == (2, 21, 3, 24) and rel_err(out, ref) <= 1e-5


def test_dispatch_picks_sparsek_for_sparsek_mask():
    q, k, v, s = rand_inputs(1, 16, 16, None, 2, 16, 16, F32)
    inp = Inputs(q, k, v, attn_bias=SparseKMask(s, 4, 1, xab.LowerTriangularMask()))
    assert fmha._dispatch_fw(inp, False) is FwOp
    assert fmha._dispatch_fw(inp, True) is FwOp
    assert fmha._dispatch_bw(inp, varlen_lse_packed=None) is BwOp


def test_bias_factory_covers_every_supported_base():
    """make_bias (conftest) must know every base bias the library lists, and only those."""
    paged = set(xformers_sparsek._paged.PAGED_BIASES)  # tests/test_paged.py covers these
    assert set(BIAS_TYPES) | paged == set(xformers_sparsek.SUPPORTED_BASE_BIASES)
    assert set(FwOp.SUPPORTED_ATTN_BIAS_TYPES) == set(BIAS_TYPES) | paged | {SparseKMask}


def test_sparse_mask_basics():
    s = torch.randn(1, 8, 2)
    m = SparseKMask(s, 3, 2, xab.LowerTriangularMask())
    assert (m.topk, m.window, type(m.base)) == (3, 2, xab.LowerTriangularMask)
    assert "SparseKMask" in repr(m)
    with pytest.raises(NotImplementedError, match="sparsek_reference"):
        m.materialize((8, 8))


# ------------------------------------------------------------------------------------------
# exact mode (standard biases, no SparseKMask)


@pytest.mark.parametrize("kind", BIAS_TYPES, ids=kind_id)
def test_exact_mode_matches_dense(kind):
    bias, B, Mq, Mk, _ = make_bias(kind, max_len=15)
    q, k, v, _ = rand_inputs(B, Mq, Mk, None, 2, 8, 8, F32)
    out, lse = xops.fmha.memory_efficient_attention_forward_requires_grad(
        q, k, v, attn_bias=bias, op=FwOp)
    assert rel_err(out, dense_exact(q, k, v, bias)) <= 1e-5
    # lse: [B, H, Mq] (packed [1, H, total] for block-diagonal biases)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 8 ** -0.5
    if bias is not None:
        logits = logits + bias.materialize((Mq, Mk), dtype=F64)
    assert max_abs(lse, torch.logsumexp(logits, -1)) <= 1e-5
    # the functional API in exact mode agrees
    assert torch.equal(sparsek_attention(q, k, v, None, None, attn_bias=bias), out)


def test_exact_mode_bmghk_and_topk_covering_every_pool():
    """topk >= every pool: SparseK is plain attention under the mask (DESIGN.md 1.7)."""
    q, k, v, s = rand_inputs(2, 19, 19, 2, 3, 8, 8, F32)
    bias = xab.LowerTriangularMask()
    exact = xops.memory_efficient_attention(q, k, v, attn_bias=bias, op=SparseKOp)
    assert rel_err(exact, dense_exact(q, k, v, bias)) <= 1e-5
    sparse = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 19, 0, bias),
                                             op=SparseKOp)
    assert rel_err(sparse, exact) <= 1e-6


@pytest.mark.parametrize("bias", [None, xab.LowerTriangularMask()], ids=["none", "causal"])
def test_bmk_inputs_with_custom_scale(bias):
    """diffusers style: [B*H, M, K] tensors and an explicit scale."""
    q, k, v = (torch.randn(6, 17, 8) for _ in range(3))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=0.21, op=SparseKOp)
    ref = dense_exact(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), bias, scale=0.21)
    assert out.shape == (6, 17, 8) and rel_err(out, ref.squeeze(2)) <= 1e-5


def test_enable_disable_automatic_dispatch():
    q, k, v, _ = rand_inputs(1, 12, 12, None, 2, 8, 8, F32)
    bias = xab.LowerTriangularMask()
    was = xformers_sparsek.is_enabled()
    try:
        xformers_sparsek.disable()
        assert not xformers_sparsek.is_enabled()
        with pytest.raises(NotImplementedError):  # no xFormers op runs CPU tensors
            xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        xformers_sparsek.enable()
        assert xformers_sparsek.is_enabled()
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
        assert rel_err(out, dense_exact(q, k, v, bias)) <= 1e-5
        assert fmha._dispatch_fw(Inputs(q, k, v, attn_bias=bias), False) is FwOp
        xformers_sparsek.disable()
        with pytest.raises(NotImplementedError):
            xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    finally:
        (xformers_sparsek.enable if was else xformers_sparsek.disable)()


# ------------------------------------------------------------------------------------------
# gradients through xFormers


def reference_grads(q, k, v, s, topk, window, bias, dout, wrt_scores=True):
    (qv, kv, vv, sv), inputs = leaves(q, k, v, s, dtype=F64, device="cpu")
    out, _ = reference.sparsek_reference(qv, kv, vv, sv, topk, window, bias)
    return torch.autograd.grad(out, inputs if wrt_scores else inputs[:3],
                               dout.to("cpu", F64))


GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def check_grads(got, ref, tol=1e-5, names="qkvs"):
    for name, g, r in zip(names, got, ref):
        assert g is not None, name
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))




@pytest.mark.parametrize("G", [None, 2], ids=["bmhk", "bmghk"])
@pytest.mark.parametrize("case", ["causal", "varlen", "padded"])
def test_backward_qkv_through_mea(case, G):
    """dq/dk/dv through memory_efficient_attention (regression: BMGHK once crashed in
    xFormers' backward, which reshapes the gradient as BMK/BMHK only)."""
    bias, B, Mq, Mk, window = SPARSE_BIASES[case]()
    (q, k, v, s), (ql, kl, vl, _) = leaves(*rand_inputs(B, Mq, Mk, G, 2, 16, 16, F32))
    s = s.detach()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 5, window, bias),
                                          op=SparseKOp)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (ql, kl, vl), dout)
    check_grads(got, reference_grads(q, k, v, s, 5, window, bias, dout, wrt_scores=False))


def test_backward_bmghk_exact_mode_through_mea():
    bias = xab.LowerTriangularMask()
    (q, k, v), (ql, kl, vl) = leaves(*rand_inputs(2, 13, 13, 2, 3, 8, 8, F32)[:3])
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, op=SparseKOp)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (ql, kl, vl), dout)
    (qd, kd, vd), leaves64 = leaves(q, k, v, dtype=F64)
    ref = dense_exact(qd, kd, vd, bias, keep_graph=True)
    check_grads(got, torch.autograd.grad(ref, leaves64, dout.double()))


@pytest.mark.parametrize("qkv_grad", [True, False], ids=["qkv_grad", "scores_only"])
@pytest.mark.parametrize("op", [SparseKOp, None], ids=["op", "auto"])
def test_score_gradients_through_mea(op, qkv_grad):
    bias, B, Mq, Mk, window = SPARSE_BIASES["causal"]()
    (q, k, v, s), (ql, kl, vl, sl) = leaves(*rand_inputs(B, Mq, Mk, 2, 2, 16, 16, F32))
    if not qkv_grad:
        q, k, v = q.detach(), k.detach(), v.detach()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 5, window, bias),
                                          op=op)
    dout = torch.randn_like(out)
    wrt = (ql, kl, vl, sl) if qkv_grad else (sl,)
    got = torch.autograd.grad(out, wrt, dout)
    ref = reference_grads(q, k, v, s, 5, window, bias, dout)
    check_grads(got, ref if qkv_grad else ref[3:], names="qkvs" if qkv_grad else "s")
    assert float(got[-1].abs().max()) > 0


def test_score_gradients_through_forward_only_entry_point():
    """memory_efficient_attention_forward with grad enabled still delivers score grads."""
    bias, B, Mq, Mk, window = SPARSE_BIASES["varlen"]()
    (q, k, v, s), (_, _, _, sl) = leaves(*rand_inputs(B, Mq, Mk, None, 2, 16, 16, F32))
    q, k, v = q.detach(), k.detach(), v.detach()
    out = xops.fmha.memory_efficient_attention_forward(
        q, k, v, attn_bias=SparseKMask(s, 5, window, bias), op=FwOp)
    dout = torch.randn_like(out)
    (ds,) = torch.autograd.grad(out, (sl,), dout)
    check_grads((ds,), reference_grads(q, k, v, s, 5, window, bias, dout)[3:], names="s")


def test_forward_requires_grad_with_score_grad_raises():
    bias, B, Mq, Mk, window = SPARSE_BIASES["causal"]()
    q, k, v, s = rand_inputs(B, Mq, Mk, None, 2, 16, 16, F32)
    mask = SparseKMask(s.requires_grad_(), 5, window, bias)
    for op in (FwOp, None):
        with pytest.raises(ValueError, match="sparsek_attention"):
            xops.fmha.memory_efficient_attention_forward_requires_grad(
                q, k, v, attn_bias=mask, op=op)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "exact"])
@pytest.mark.parametrize("case", ["causal", "varlen"])
def test_mea_backward_with_our_lse(case, sparse):
    bias, B, Mq, Mk, window = SPARSE_BIASES[case]()
    q, k, v, s = rand_inputs(B, Mq, Mk, None, 2, 16, 16, F32)
    topk = 5 if sparse else Mk  # topk >= every pool: exact attention
    attn_bias = SparseKMask(s, topk, window, bias) if sparse else bias
    out, lse = xops.fmha.memory_efficient_attention_forward_requires_grad(
        q, k, v, attn_bias=attn_bias, op=FwOp)
    if case == "varlen":
        assert lse.shape == (1, 2, Mq)  # packed varlen lse
    dout = torch.randn_like(out)
    ref = reference_grads(q, k, v, s, topk, window if sparse else 0, bias, dout,
                          wrt_scores=False)
    was = xformers_sparsek.is_enabled()
    xformers_sparsek.enable()  # automatic dispatch of the backward for standard biases
    try:
        for op in (BwOp, None):
            got = xops.fmha.memory_efficient_attention_backward(
                dout, out, lse, q, k, v, attn_bias=attn_bias, op=op)
            check_grads(got, ref)
    finally:
        (xformers_sparsek.enable if was else xformers_sparsek.disable)()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("G", [None, 2], ids=["bmhk", "bmghk"])
@pytest.mark.parametrize("case", ["causal", "varlen"])
def test_gradients_match_reference(case, G, dtype, device):
    """dq, dk, dv and dscores of sparsek_attention vs the float64 reference, per dtype."""
    bias, B, Mq, Mk, window = SPARSE_BIASES[case]()
    (q, k, v, s), inputs = leaves(*rand_inputs(B, Mq, Mk, G, 2, 64, 64, dtype, device))
    out = sparsek_attention(q, k, v, s, 5, window, on(bias, device))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    assert all(g.device == q.device and g.dtype == x.dtype for g, x in zip(got, inputs))
    check_grads(got, reference_grads(q, k, v, s, 5, window, bias, dout), tol=GRAD_TOL[dtype])


@cuda_kernels
def test_cuda_kernels_used(monkeypatch):
    """bf16, head dim 64, GQA on CUDA: forward and backward run the CUDA kernels, not the
    PyTorch path."""
    def no_fallback(fn):
        def wrapped(*args, **kw):
            raise AssertionError(f"fell back to the PyTorch path ({fn.__name__})")
        return wrapped

    monkeypatch.setattr(_attention, "forward", no_fallback(_attention.forward))
    monkeypatch.setattr(_attention, "backward", no_fallback(_attention.backward))
    bias, B, Mq, Mk, window = SPARSE_BIASES["causal"]()
    (q, k, v, s), inputs = leaves(*rand_inputs(B, Mq, Mk, 2, 2, 64, 64, torch.bfloat16,
                                               "cuda"))
    out = sparsek_attention(q, k, v, s, 5, window, bias)
    torch.autograd.grad(out, inputs, torch.randn_like(out))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_forward_backward(device):
    bias, B, Mq, Mk, window = SPARSE_BIASES["varlen"]()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, s = rand_inputs(B, Mq, Mk, 2, 3, 64, 64, dtype, device)
    dout = torch.randn(*q.shape, dtype=dtype, device=device)
    bias = on(bias, device)

    def run(api):
        (qv, kv, vv, sv), inputs = leaves(q, k, v, s)
        if api == "mea":
            out = xops.memory_efficient_attention(
                qv, kv, vv, attn_bias=SparseKMask(sv, 7, window, bias), op=SparseKOp)
        else:
            out = sparsek_attention(qv, kv, vv, sv, 7, window, bias)
        return (out,) + torch.autograd.grad(out, inputs, dout)

    for api in ("mea", "functional"):
        a, b = run(api), run(api)
        for x, y in zip(a, b):
            assert torch.equal(x, y), api


# ------------------------------------------------------------------------------------------
# tensor layouts and edge shapes


def test_noncontiguous_packed_qkv_and_transposed_scores():
    """q/k/v as views of one packed [B, M, 3, H, K] tensor, scores transposed from [B, H, M]."""
    qkv = torch.randn(2, 20, 3, 3, 16)
    q, k, v = qkv.unbind(2)
    s = torch.randn(2, 3, 20).transpose(1, 2)
    bias = xab.LowerTriangularMask()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 4, 2, bias),
                                          op=SparseKOp)
    dense = xops.memory_efficient_attention(
        q.contiguous(), k.contiguous(), v.contiguous(),
        attn_bias=SparseKMask(s.contiguous(), 4, 2, bias), op=SparseKOp)
    assert torch.equal(out, dense)
    assert rel_err(out, reference_cpu(q, k, v, s, 4, 2, bias)[0]) <= 1e-5


@pytest.mark.parametrize("layout", ["per_head_scores", "shared_scores_per_head_kv"])
def test_bmghk_selection_sharing(layout):
    """BMGHK: per-head scores give one selection per head; scores expanded over H with
    distinct per-head K/V share one selection per group."""
    B, M, G, H, D = 1, 17, 2, 3, 16
    q = torch.randn(B, M, G, H, D)
    if layout == "per_head_scores":
        k = torch.randn(B, M, G, 1, D).expand(B, M, G, H, D)
        v = torch.randn(B, M, G, 1, D).expand(B, M, G, H, D)
        s = torch.randn(B, M, G, H)
    else:
        k, v = torch.randn(B, M, G, H, D), torch.randn(B, M, G, H, D)
        s = torch.randn(B, M, G, 1).expand(B, M, G, H)
    bias = xab.LowerTriangularMask()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 3, 1, bias),
                                          op=SparseKOp)
    assert rel_err(out, reference_cpu(q, k, v, s, 3, 1, bias)[0]) <= 1e-5


@pytest.mark.parametrize("Mq,Mk", [(0, 5), (5, 0)])
def test_empty_sequences(Mq, Mk):
    q, k, v, s = rand_inputs(1, Mq, Mk, None, 2, 8, 8, F32)
    out = xops.memory_efficient_attention(
        q, k, v, attn_bias=SparseKMask(s, 2, 1, xab.LowerTriangularMask()), op=SparseKOp)
    assert out.shape == (1, Mq, 2, 8) and (out == 0).all()


def test_backward_accepts_padded_varlen_lse():
    """BwOp recomputes its statistics: a padded [num_seqs, H, max_len] lse (the format of
    other forward ops) works through automatic dispatch."""
    bias = xab.BlockDiagonalCausalMask.from_seqlens([5, 9, 3], device=CPU)
    q, k, v, _ = rand_inputs(1, 17, 17, None, 2, 8, 8, F32)
    out = xops.fmha.memory_efficient_attention_forward(q, k, v, attn_bias=bias, op=FwOp)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8 ** -0.5 + bias.materialize((17, 17))
    packed = torch.logsumexp(logits, -1)  # [1, H, 17]
    padded = torch.full((3, 2, 9), float("inf"))
    for i, (a, b) in enumerate(bias.q_seqinfo.intervals()):
        padded[i, :, : b - a] = packed[0, :, a:b]
    dout = torch.randn_like(out)
    was = xformers_sparsek.is_enabled()
    xformers_sparsek.enable()
    try:
        got = xops.fmha.memory_efficient_attention_backward(dout, out, padded, q, k, v,
                                                            attn_bias=bias)
    finally:
        (xformers_sparsek.enable if was else xformers_sparsek.disable)()
    ref = reference_grads(q, k, v, torch.randn(1, 17, 2), 17, 0, bias, dout, wrt_scores=False)
    check_grads(got, ref)
