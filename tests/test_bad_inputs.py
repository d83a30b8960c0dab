"""Bad input raises ValueError / NotImplementedError naming the argument (DESIGN.md section 2).

Every case runs through the functional API, through memory_efficient_attention with
op=SparseKOp and through automatic dispatch (op=None).  A watchdog turns a hang into a failure.
"""

import signal

import pytest
import torch
import xformers.ops as xops
from conftest import rand_inputs, requires_cuda
from xformers.ops.fmha import attn_bias as xab

from xformers_sparsek import SparseKMask, SparseKOp, sparsek_attention

APIS = ["functional", "mea_op", "mea_auto"]
ERRORS = (ValueError, NotImplementedError)
CPU = torch.device("cpu")  # biases default to CUDA where a GPU is present


@pytest.fixture(autouse=True)
def watchdog():
    def hang(*_):
        raise TimeoutError("no answer within 60 s: hang on bad input")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def call(api, q, k, v, s, topk=3, window=0, base=None):
    if api == "functional":
        return sparsek_attention(q, k, v, s, topk, window, base)
    mask = SparseKMask(s, topk, window, base)
    op = SparseKOp if api == "mea_op" else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=mask, op=op)


def inputs(B=1, Mq=12, Mk=12, H=2, D=8, **kw):
    return rand_inputs(B, Mq, Mk, None, H, D, D, torch.float32, **kw)


def expect_error(match, api, *args, **kw):
    with pytest.raises(ERRORS, match=match):
        call(api, *args, **kw)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("topk", [0, -1, 2.5, True, "4", None])
def test_bad_topk(api, topk):
    if api == "functional" and topk is None:
        pytest.skip("topk=None is exact mode in the functional API (scores must be None)")
    q, k, v, s = inputs()
    expect_error("topk", api, q, k, v, s, topk=topk)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("window,base", [
    (-1, xab.LowerTriangularMask()),
    (1.5, xab.LowerTriangularMask()),
    (2, None),
    (1, xab.BlockDiagonalMask.from_seqlens([5, 7], device=CPU)),
], ids=["negative", "float", "no_mask", "blockdiag_noncausal"])
def test_bad_window(api, window, base):
    q, k, v, s = inputs()
    expect_error("window", api, q, k, v, s, window=window, base=base)


class MyCausal(xab.LowerTriangularMask):
    pass


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("make_base", [
    lambda: xab.LowerTriangularMaskWithTensorBias(torch.zeros(1, 2, 12, 12)),
    lambda: torch.zeros(1, 2, 12, 12),
    lambda: MyCausal(),
    lambda: xab.BlockDiagonalPaddedKeysMask.from_seqlens([6, 6], 6, [4, 5], device=CPU),
], ids=["tensor_bias_mask", "tensor", "subclass", "noncausal_padded"])
def test_unsupported_base(api, make_base):
    q, k, v, s = inputs()
    expect_error("base|attn_bias", api, q, k, v, s, base=make_base())


@pytest.mark.parametrize("api", APIS)
def test_unsupported_base_exact_mode(api):
    """Without a SparseKMask: a tensor bias is rejected by the op / functional API."""
    q, k, v, _ = inputs()
    bias = torch.randn(1, 2, 12, 12)
    if api == "functional":
        with pytest.raises(NotImplementedError, match="attn_bias"):
            sparsek_attention(q, k, v, None, None, attn_bias=bias)
    elif api == "mea_op":
        with pytest.raises(ERRORS, match="attn_bias"):
            xops.memory_efficient_attention(q, k, v, attn_bias=bias, op=SparseKOp)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("bad", ["shape", "int", "nan", "inf", "neg_inf"])
def test_bad_scores(api, bad):
    q, k, v, s = inputs()
    if bad == "shape":
        s = s[:, :-1]
    elif bad == "int":
        s = (s * 10).to(torch.int32)
    else:
        s = s.clone()
        s[0, 5, 1] = {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")}[bad]
    expect_error("scores", api, q, k, v, s)


@requires_cuda
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("bad", ["nan", "inf", "neg_inf"])
@pytest.mark.parametrize("base", ["causal", "local"])
@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_scores_on_cuda_kernels(api, bad, base, sdtype):
    """The CUDA path zeroes non-finite scores on the GPU and reads the flag after its launches
    (no host sync before them): still a ValueError naming the scores, for nested pools
    (causal) and sliding ones (local: the overflow flag is read too); the next call runs."""
    dev = torch.device("cuda")
    q, k, v, s = rand_inputs(1, 300, 300, None, 2, 64, 64, torch.float16, device=dev)
    bias = (xab.LowerTriangularMask() if base == "causal"
            else xab.LowerTriangularFromBottomRightLocalAttentionMask(100))
    s = s.to(sdtype)
    good = call(api, q, k, v, s, topk=16, window=4, base=bias)
    s_bad = s.clone()
    s_bad[0, 123, 1] = {"nan": float("nan"), "inf": float("inf"), "neg_inf": float("-inf")}[bad]
    expect_error("scores", api, q, k, v, s_bad, topk=16, window=4, base=bias)
    again = call(api, q, k, v, s, topk=16, window=4, base=bias)
    torch.cuda.synchronize()
    assert torch.equal(good, again)


@requires_cuda
@pytest.mark.parametrize("api", APIS)
def test_scores_on_other_device(api):
    q, k, v, s = inputs()
    expect_error("scores", api, q, k, v, s.cuda())


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("bad", ["dtype", "ndim", "heads", "batch", "head_dim"])
def test_bad_qkv(api, bad):
    q, k, v, s = inputs(B=2)
    match = "key"  # key is the offending argument in every case but dtype
    if bad == "dtype":
        k, match = k.double(), "dtype"
    elif bad == "ndim":
        k, v, s = k[0], v[0], s[0]
    elif bad == "heads":
        k, v, s = k[:, :, :1], v[:, :, :1], s[:, :, :1]
    elif bad == "batch":
        k, v, s = k[:1], v[:1], s[:1]
    else:
        k = k[..., :4]
    expect_error(match, api, q, k, v, s)


@pytest.mark.parametrize("api", APIS)
def test_blockdiag_needs_batch_one(api):
    q, k, v, s = inputs(B=2, Mq=12, Mk=12)
    bias = xab.BlockDiagonalCausalMask.from_seqlens([5, 7], device=CPU)
    expect_error("batch", api, q, k, v, s, base=bias)


@pytest.mark.parametrize("api", APIS)
def test_blockdiag_seqlens_must_cover_tensors(api):
    q, k, v, s = inputs(Mq=12, Mk=12)
    expect_error("attn_bias|block-diagonal", api, q, k, v, s,
                 base=xab.BlockDiagonalCausalMask.from_seqlens([5, 5], device=CPU))


def test_scores_without_topk_and_topk_without_scores():
    q, k, v, s = inputs()
    with pytest.raises(ValueError, match="scores"):
        sparsek_attention(q, k, v, None, 4)
    with pytest.raises(ValueError, match="topk"):
        sparsek_attention(q, k, v, s, None)


def test_sparsek_mask_rejects_non_tensor_scores():
    with pytest.raises(ValueError, match="scores"):
        SparseKMask([0.1, 0.2], 1)


def test_unsupported_dtype_via_op():
    q, k, v, s = rand_inputs(1, 12, 12, None, 2, 8, 8, torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(s, 3), op=SparseKOp)


def test_bad_input_with_grad_required():
    """The error also comes (not a crash) when q/k/v/scores require grad."""
    q, k, v, s = (t.requires_grad_() for t in inputs())
    s2 = s.detach().clone()
    s2[0, 0, 0] = float("nan")
    for api in APIS:
        expect_error("scores", api, q, k, v, s2.requires_grad_())
        expect_error("scores", api, q, k, v, s[:, :-1])
