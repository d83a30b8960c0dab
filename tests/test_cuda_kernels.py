"""GPU tests of the CUDA kernels against the float64 reference and the PyTorch path.

They run on the device machine (scripts/gpu_check.sh); elsewhere they skip.
"""


import pytest
import torch
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from xformers_sparsek import _attention, _cuda, _ext, _selection
from xformers_sparsek._layout import build_layout
from xformers_sparsek._problem import make_problem
from xformers_sparsek.reference import sparsek_reference

pytestmark = pytest.mark.skipif(
    not _ext.cuda_kernels_available(),
    reason="CUDA kernels not available here (" + str(_ext.cuda_unavailable_reason()) + ")",
)
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def is_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(params=["default", "sm80"])
def fwd_kernel(request, monkeypatch):
    """The forward kernel the launcher picks (the wgmma kernel on Hopper) and the mma.sync
    kernel, forced with XFORMERS_SPARSEK_FWD=sm80 (read by csrc/sparsek/fwd_bf16.cu)."""
    if request.param == "sm80":
        monkeypatch.setenv("XFORMERS_SPARSEK_FWD", "sm80")
    return request.param


@pytest.fixture(params=["default", "sm80"])
def bwd_kernel(request, monkeypatch):
    """The backward kernels the launcher picks (the wgmma kernels on Hopper) and the mma.sync
    kernels, forced with XFORMERS_SPARSEK_BWD=sm80 (read by csrc/sparsek/fwd_bf16.cu's
    use_sm90, through _cuda.backward)."""
    if request.param == "sm80":
        monkeypatch.setenv("XFORMERS_SPARSEK_BWD", "sm80")
    return request.param


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make(B, Mq, Mk, G, H, D, dtype, gqa=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=g)
    q = torch.randn(B, Mq, G, H, D, **kw).to(dtype)
    if gqa:
        k = torch.randn(B, Mk, G, 1, D, **kw).to(dtype).expand(B, Mk, G, H, D)
        v = torch.randn(B, Mk, G, 1, D, **kw).to(dtype).expand(B, Mk, G, H, D)
        s = torch.randn(B, Mk, G, 1, **kw).expand(B, Mk, G, H)
    else:
        k = torch.randn(B, Mk, G, H, D, **kw).to(dtype)
        v = torch.randn(B, Mk, G, H, D, **kw).to(dtype)
        s = torch.randn(B, Mk, G, H, **kw)
    return q, k, v, s


CASES = [
    # (bias factory, B, Mq, Mk, window, topk)
    (lambda: None, 2, 77, 77, 0, 9),
    (lambda: xab.LowerTriangularMask(), 2, 131, 131, 0, 17),
    (lambda: xab.LowerTriangularMask(), 1, 200, 200, 16, 32),
    (lambda: xab.LowerTriangularFromBottomRightMask(), 2, 37, 150, 8, 20),
    (lambda: xab.BlockDiagonalCausalMask.from_seqlens([33, 70, 5]), 1, 108, 108, 4, 10),
    (lambda: xab.LowerTriangularMask(), 1, 90, 90, 0, 1000),  # topk above every pool
]


def float64_torch_path(q, k, v, s, topk, window, bias):
    """The PyTorch path in float64 on the CPU (itself checked against the brute-force
    reference in tests/test_reference_and_grads.py)."""
    return xs.sparsek_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                                None if s is None else s.cpu().double(),
                                topk, window, bias)


def cpu_bias(bias):
    return bias.to("cpu") if bias is not None and hasattr(bias, "to") else bias


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gqa", [True, False])
def test_cuda_forward_small(case, dtype, D, gqa, fwd_kernel):
    make_bias, B, Mq, Mk, window, topk = CASES[case]
    bias = make_bias()
    q, k, v, s = make(B, Mq, Mk, 2, 4 if gqa else 2, D, dtype, gqa, seed=case)
    out = xs.sparsek_attention(q, k, v, s, topk, window, bias)
    ref = float64_torch_path(q, k, v, s, topk, window, cpu_bias(bias))
    assert rel_err(out.cpu(), ref) <= TOL[dtype]


def test_cuda_forward_tiny_vs_bruteforce_reference():
    bias = xab.LowerTriangularMask()
    q, k, v, s = make(1, 70, 70, 2, 4, 64, torch.bfloat16, seed=11)
    out = xs.sparsek_attention(q, k, v, s, 9, 5, bias)
    ref, _ = sparsek_reference(q.cpu(), k.cpu(), v.cpu(), s.cpu(), 9, 5, bias)
    assert rel_err(out.cpu(), ref) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.41])
@pytest.mark.parametrize("sparse", [False, True])
def test_cuda_forward_any_scale(scale, sparse, fwd_kernel):
    """The Hopper forward scales ungated logits inside exp2 (raw-score maxima need a positive
    scale); the launcher maps a negative scale to -q and a zero one to q = 0."""
    bias = xab.LowerTriangularMask()
    q, k, v, s = make(1, 200, 200, 2, 4, 64, torch.float16, seed=5)
    s, topk, window = (s, 24, 16) if sparse else (None, None, 0)
    out = xs.sparsek_attention(q, k, v, s, topk, window, bias, scale)
    ref = xs.sparsek_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                               None if s is None else s.cpu().double(), topk, window,
                               cpu_bias(bias), scale)
    assert rel_err(out.cpu(), ref) <= TOL[torch.float16]


def test_cuda_wavelet_build_equals_torch():
    from xformers_sparsek._wavelet import WaveletMatrix

    for n in (1, 2, 2047, 2048, 2049, 5000):
        ranks = torch.stack([torch.randperm(n) for _ in range(3)]).cuda()
        w = torch.randn(3, n, dtype=torch.float64, device="cuda")
        ref = WaveletMatrix(ranks, w)
        got = _cuda._KernelWavelet(ranks, w)
        assert torch.equal(got.zeros.long(), ref.zeros), n
        assert torch.equal(got.nzeros.long(), ref.nzeros), n
        assert torch.allclose(got.wsum, ref.wsum, rtol=1e-12, atol=1e-9), n


def test_cuda_sort_rows_equals_torch_sort():
    """csrc/sparsek/row_sort.cu against torch.sort(stable=True): values bit for bit (-0.0
    keeps its sign), indices equal, on ties, signed zeros, subnormals, infinities."""
    C = _ext.load_extension()
    g = torch.Generator().manual_seed(0)
    for rows, n in ((1, 1), (2, 3), (3, 2047), (3, 2048), (3, 2049), (2, 5000), (8, 65536),
                    (3, 70001)):
        cases = [
            torch.randn(rows, n, generator=g),
            torch.randint(0, 4, (rows, n), generator=g).float() * 0.5,  # heavy ties
            torch.randn(rows, n, generator=g).bfloat16().float(),  # low 16 bits zero
            torch.where(torch.rand(rows, n, generator=g) < 0.5, -0.0, 0.0),  # signed zeros
        ]
        mix = torch.randn(rows, n, generator=g) * 1e-40  # subnormals
        mix[:, ::7] = float("inf")
        mix[:, 3::11] = float("-inf")
        mix[:, 5::13] = -0.0
        cases.append(mix)
        for x in cases:
            x = x.cuda().contiguous()
            want_v, want_i = torch.sort(x, dim=1, stable=True)
            got_v, got_i = C.sort_rows(x)
            assert torch.equal(got_i, want_i), (rows, n)
            assert torch.equal(got_v.view(torch.int32), want_v.view(torch.int32)), (rows, n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_exact_mode_matches_sdpa(dtype, fwd_kernel):
    q, k, v, _ = make(2, 333, 333, 2, 4, 128, dtype, gqa=True)
    out = xs.sparsek_attention(q, k, v, None, None, 0, xab.LowerTriangularMask())
    qt = q.flatten(2, 3).transpose(1, 2).float()
    kt = k.flatten(2, 3).transpose(1, 2).float()
    vt = v.flatten(2, 3).transpose(1, 2).float()
    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    assert rel_err(out.flatten(2, 3).transpose(1, 2), ref) <= TOL[dtype]


def test_cuda_selection_equals_torch_selection():
    torch.manual_seed(0)
    for scores in [torch.randn(3, 5000), torch.randint(0, 4, (3, 5000)).float() * 0.5,
                   1 + 1e-6 * torch.randn(3, 5000)]:
        lay = build_layout(xab.LowerTriangularMask(), 2, 2500, 2500, 7, torch.device("cuda"))
        sc = scores.cuda()
        a = _cuda.select(sc, lay, 100)
        b = _selection.select(sc.float(), lay, 100)
        for name in ("tau", "ub", "jb", "nF", "rb"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x, y) or torch.allclose(x, y, rtol=1e-12, atol=1e-12), name


@pytest.mark.parametrize("rise", [5.0, 40.0])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_forward_rising_logits(rise, sparse, dtype, fwd_kernel):
    """Logits that climb along the keys by `rise` (base 2) per 128-key tile: the Hopper
    forward's lazy running maximum moves only past max + 8, so with rise 5 some tiles run
    with P up to 2^8 and the next ones must rescale; with rise 40 every tile must (a kernel
    that never rescaled would overflow).  Against the float64 PyTorch path."""
    B, M, G, H, D = 1, 700, 2, 4, 64
    q, k, v, s = make(B, M, M, G, H, D, dtype, gqa=True, seed=8)
    direction = torch.ones(D, device="cuda") / D ** 0.5
    # q . k_j ~ c j, with c chosen so that a tile's logits (scale 1/sqrt(D)) climb by `rise`
    c = rise / (128 * D ** -0.5 * 1.4426950408889634)
    ramp = torch.arange(M, device="cuda", dtype=torch.float32) * (c / 2)
    q = (0.2 * q.float() + 2.0 * direction).to(dtype)
    k = (0.2 * k.float() + ramp[None, :, None, None, None] * direction).to(dtype)
    bias = xab.LowerTriangularMask()
    s, topk, window = (s, 200, 40) if sparse else (None, None, 0)
    out = xs.sparsek_attention(q, k, v, s, topk, window, bias)
    ref = float64_torch_path(q, k, v, s, topk, window, cpu_bias(bias))
    assert rel_err(out.cpu(), ref) <= TOL[dtype]


@pytest.mark.parametrize("window", [0, 64])
def test_cuda_forward_medium_vs_torch_path(window, fwd_kernel):
    """4K tokens: CUDA kernels vs the PyTorch path (float32 math) on the same selection."""
    q, k, v, s = make(1, 4096, 4096, 2, 4, 128, torch.bfloat16, gqa=True, seed=3)
    bias = xab.LowerTriangularMask()
    out = xs.sparsek_attention(q, k, v, s, 256, window, bias)
    prob = make_problem(q.float(), k.float(), v.float(), s, bias, 256, window, None)
    ref, _, _ = _attention.forward(prob.q, prob.k, prob.v, prob.scores.float(), prob.layout,
                                   256, prob.scale)
    assert rel_err(out, prob.out_to_input(ref)) <= 1e-2


def test_cuda_forward_deterministic(fwd_kernel):
    q, k, v, s = make(1, 1000, 1000, 2, 4, 64, torch.float16, seed=5)
    bias = xab.LowerTriangularMask()
    a = xs.sparsek_attention(q, k, v, s, 64, 32, bias)
    b = xs.sparsek_attention(q, k, v, s, 64, 32, bias)
    assert torch.equal(a, b)


@pytest.mark.skipif(not is_hopper(), reason="the wgmma forward kernel needs an sm_90 GPU")
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("D,dtype,H", [(128, torch.bfloat16, 4), (64, torch.float16, 1),
                                       (128, torch.float16, 8)])
def test_cuda_forward_kernels_agree(sparse, D, dtype, H, monkeypatch):
    """The Hopper (wgmma) and mma.sync forward kernels on the same inputs: outputs and lse
    agree to accumulation-order rounding, over many key tiles (ring stages wrap) with GQA
    packing, a window and ragged list lengths."""
    from xformers.ops import fmha

    q, k, v, s = make(2, 3001, 3001, 2, H, D, dtype, gqa=True, seed=21)
    base = xab.LowerTriangularMask()
    bias = xs.SparseKMask(s, topk=300, window=70, base=base) if sparse else base

    def run():
        out, lse = fmha.memory_efficient_attention_forward_requires_grad(
            q, k, v, attn_bias=bias, op=xs.SparseKOp[0])
        return out.float(), lse.float()

    o90, l90 = run()
    monkeypatch.setenv("XFORMERS_SPARSEK_FWD", "sm80")
    o80, l80 = run()
    assert rel_err(o90, o80) <= TOL[dtype] / 4
    assert (l90 - l80).abs().max().item() <= 1e-3


@pytest.mark.parametrize("kv", ["expanded", "per_head", "padded_rows"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("D,dtype", [(128, torch.bfloat16), (64, torch.float16)])
def test_cuda_contiguous_key_runs(kv, sparse, D, dtype):
    """On Hopper, contiguous runs of keys (exact mode, window tiles) and full chunks of the
    dk/dv pass's Q / dO rows are loaded as TMA boxes through tensor maps (sm90/key_tma.h);
    listed keys and partial chunks with cp.async.  Output and dq, dk, dv against the float64
    PyTorch path for K / V shared by the heads (stride 0), one per head, and rows padded
    inside wider tensors (larger row strides, a base 128 bytes in); 700 causal keys, so full
    runs, partial runs and both paths within one tile."""
    B, M, G, H = 1, 700, 2, 4
    q, k, v, s = make(B, M, M, G, H, D, dtype, gqa=kv == "expanded", seed=17)
    view_k = view_v = lambda x: x  # noqa: E731
    if kv == "expanded":  # leaves [B, M, G, 1, D], viewed expanded over the heads
        k, v = k[:, :, :, :1], v[:, :, :, :1]
        view_k = view_v = lambda x: x.expand(B, M, G, H, D)  # noqa: E731
    elif kv == "padded_rows":  # leaves [B, M, G, H, D + 64]: K their first D columns, V last
        k = torch.cat([k, torch.randn_like(k[..., :64])], -1)
        v = torch.cat([torch.randn_like(v[..., :64]), v], -1)
        view_k, view_v = (lambda x: x[..., :D]), (lambda x: x[..., 64:])
    s, topk, window = (s, 96, 100) if sparse else (None, None, 0)
    bias = xab.LowerTriangularMask()
    dout = torch.randn(q.shape, device="cuda").to(dtype)

    def out_and_grads(to, bias):
        leaves = [to(x).clone().requires_grad_() for x in (q, k, v)]
        out = xs.sparsek_attention(leaves[0], view_k(leaves[1]), view_v(leaves[2]),
                                   None if s is None else to(s), topk, window, bias)
        return [out] + list(torch.autograd.grad(out, leaves, to(dout)))

    got = out_and_grads(lambda x: x.detach(), bias)
    ref = out_and_grads(lambda x: x.detach().cpu().double(), cpu_bias(bias))
    for name, a, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert rel_err(a.cpu(), r) <= TOL[dtype], name


BWD_CASES = [
    # (bias factory, B, Mq, Mk, window, topk)
    (lambda: xab.LowerTriangularMask(), 1, 300, 300, 16, 24),
    (lambda: None, 2, 77, 90, 0, 9),
    (lambda: xab.LowerTriangularFromBottomRightMask(), 2, 60, 150, 8, 20),
    (lambda: xab.BlockDiagonalCausalMask.from_seqlens([33, 170, 5]), 1, 208, 208, 4, 10),
]


def to_cpu64(x):
    """x on the CPU in float64, keeping a stride-0 (GQA) expansion over dim 3 (a plain
    .cpu() would materialise it, and the gradient would then be per head)."""
    if x.ndim >= 4 and x.stride(3) == 0:
        return x[:, :, :, :1].cpu().double().expand(x.shape)
    return x.cpu().double()


def grads(q, k, v, s, topk, window, bias, dout):
    """Output and the gradients w.r.t. q, k, v, scores.  Expanded (stride-0, GQA) inputs
    stay expanded: their leaves are the unexpanded tensors, so the packed path runs."""
    leaves, views = [], []
    for x in (q, k, v, s):
        expanded = x.ndim >= 4 and x.stride(3) == 0
        base = x[:, :, :, :1] if expanded else x
        leaf = base.detach().clone().requires_grad_()
        leaves.append(leaf)
        views.append(leaf.expand(x.shape) if expanded else leaf)
    out = xs.sparsek_attention(*views, topk, window, bias)
    return [out] + list(torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("case", range(len(BWD_CASES)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("gqa", [True, False])
def test_cuda_backward_small(case, dtype, D, gqa, bwd_kernel):
    """All four gradients of the CUDA path vs the float64 PyTorch path."""
    make_bias, B, Mq, Mk, window, topk = BWD_CASES[case]
    bias = make_bias()
    q, k, v, s = make(B, Mq, Mk, 2, 4 if gqa else 2, D, dtype, gqa, seed=case)
    dout = torch.randn(q.shape, device="cuda").to(dtype)
    got = grads(q, k, v, s, topk, window, bias, dout)
    ref = grads(*(to_cpu64(x) for x in (q, k, v, s)), topk, window, cpu_bias(bias),
                dout.cpu().double())
    for name, a, r in zip(["out", "dq", "dk", "dv", "dscores"], got, ref):
        assert rel_err(a.cpu(), r) <= TOL[dtype], name


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("case", ["batch", "varlen"])
def test_cuda_tiles_never_span_sequences(case, gqa, bwd_kernel, monkeypatch):
    """A query tile over two sequences can list more than topk + rows keys (lists.cu), and
    the call then fell back to the PyTorch path: batches whose length is not a multiple of
    the tile, and every varlen bias.  Tiles start at each sequence (_cuda._tiles), so the
    kernels run here, forward and backward, and match the float64 path."""
    bias, B, M, window, topk = {
        "batch": (xab.LowerTriangularMask(), 2, 131, 0, 17),
        "varlen": (xab.BlockDiagonalCausalMask.from_seqlens([33, 70, 5]), 1, 108, 4, 10),
    }[case]
    dtype = torch.bfloat16
    q, k, v, s = make(B, M, M, 2, 4 if gqa else 2, 64, dtype, gqa, seed=3)
    dout = torch.randn(q.shape, device="cuda").to(dtype)
    ref = grads(*(to_cpu64(x) for x in (q, k, v, s)), topk, window, cpu_bias(bias),
                dout.cpu().double())

    def pytorch_path(*args, **kwargs):
        raise AssertionError("the CUDA path fell back to the PyTorch path")

    with monkeypatch.context() as m:
        m.setattr(_attention, "forward", pytorch_path)
        m.setattr(_attention, "backward", pytorch_path)
        got = grads(q, k, v, s, topk, window, bias, dout)
    for name, a, r in zip(["out", "dq", "dk", "dv", "dscores"], got, ref):
        assert rel_err(a.cpu(), r) <= TOL[dtype], name


NESTED_CASES = [
    # (bias, B, Mq, Mk, window): every query of a sequence has the same pool start
    (None, 2, 300, 300, 0),
    (xab.LowerTriangularMask(), 2, 301, 301, 0),
    (xab.LowerTriangularMask(), 1, 700, 700, 40),
    (xab.LowerTriangularFromBottomRightMask(), 2, 150, 400, 9),
    (xab.LowerTriangularFromBottomRightMask(), 1, 400, 150, 3),
    (xab.BlockDiagonalCausalMask.from_seqlens([33, 270, 5, 130]), 1, 438, 438, 6),
    (xab.BlockDiagonalMask.from_seqlens([100, 29], [64, 300]), 1, 129, 364, 0),
]


@pytest.mark.parametrize("case", range(len(NESTED_CASES)))
def test_cuda_nested_pools_never_overflow(case):
    """Layouts with nested pools (layout.nested) skip the overflow checks and the backward's
    window-span max, host syncs (_cuda.forward, _cuda.backward): their tiles' key lists must
    fit topk + the tile's queries, at every tile size the kernels use (forward / dq tiles of
    128 or 64 rows, dk/dv super-tiles of 2048 rows, over 1 to 8 packed heads), for any
    scores, ties included, and the super-tiles' window spans must fit _window_span_bound."""
    bias, B, Mq, Mk, window = NESTED_CASES[case]
    C = _ext.load_extension()
    for seed, (topk, ties) in enumerate([(1, False), (7, True), (50, False), (50, True),
                                         (1000, False)]):
        q, k, v, s = make(B, Mq, Mk, 2, 1, 64, torch.bfloat16, gqa=False, seed=seed)
        if ties:
            s = s.round()  # a few distinct scores, many ties
        prob = make_problem(q, k, v, s, bias, topk, window, None)
        lay = prob.layout
        assert lay.nested
        sel = _cuda.select(prob.scores.float().contiguous(), lay, topk)
        for rp in (1, 2, 4, 8):
            for rows in {_cuda._TILE_ROWS, _cuda._BWD_DQ_ROWS, _cuda._BWD_SUPER_ROWS}:
                nq = rows // rp
                q0, q1 = _cuda._tiles(lay.num_queries, nq, q.device, lay.seq_key)
                _, counts, overflow = C.build_lists(sel.key_of_rank, sel.rank_of_key, sel.rb,
                                                    lay.pool_lo, lay.win_lo, q0, q1,
                                                    lay.num_keys, topk + nq)
                assert int(overflow.item()) == 0, (topk, ties, rp, rows)
                assert int(counts.max()) <= topk + nq
                wlo, whi = _cuda._tile_extents(lay, q0, q1)
                span = int(torch.clamp(whi - wlo, min=0).max())
                assert span <= _cuda._window_span_bound(lay, nq), (rp, rows)


def _expected_key_list(perm, rb, pool_lo, win_lo, a, b, tail_max=2048):
    """lists.cu's list of queries [a, b) of one head, in its order: the keys every query's
    pool range holds ([max pool_lo, min win_lo)) first, in descending rank, then the others
    in ascending index; the interval itself when some query selects its whole pool."""
    lo, hi = int(pool_lo[a:b].min()), int(win_lo[a:b].max())
    if hi <= lo:
        return []
    if int(rb[a:b].min()) < 0:
        return list(range(lo, hi))
    keys = [int(j) for j in perm.flip(0)[:perm.numel() - int(rb[a:b].min())]
            if lo <= int(j) < hi]
    f_lo, f_hi = max(lo, int(pool_lo[a:b].max())), min(hi, int(win_lo[a:b].min()))
    if not (f_lo < f_hi and (f_lo - lo) + (hi - f_hi) <= tail_max):
        return keys
    inside = [j for j in keys if f_lo <= j < f_hi]
    return inside + sorted(j for j in keys if not f_lo <= j < f_hi)


@pytest.mark.parametrize("case", [1, 2, 3, 5])
def test_cuda_key_list_order(case):
    """lists.cu's order (not just its key set): the kernels run one cheap rule over a key
    tile (forward, dq) or 16 keys (dk/dv) only when every pair of it is attended, so the
    keys some query sees in its window instead must come after the others."""
    bias, B, Mq, Mk, window = NESTED_CASES[case]
    C = _ext.load_extension()
    for seed, topk in enumerate([7, 50]):
        q, k, v, s = make(B, Mq, Mk, 2, 1, 64, torch.bfloat16, gqa=False, seed=seed)
        prob = make_problem(q, k, v, s, bias, topk, window, None)
        lay = prob.layout
        sel = _cuda.select(prob.scores.float().contiguous(), lay, topk)
        for nq in (32, 128):
            q0, q1 = _cuda._tiles(lay.num_queries, nq, q.device, lay.seq_key)
            lists, counts, overflow = C.build_lists(sel.key_of_rank, sel.rank_of_key, sel.rb,
                                                    lay.pool_lo, lay.win_lo, q0, q1,
                                                    lay.num_keys, topk + nq)
            assert int(overflow.item()) == 0
            perm, rb = sel.key_of_rank.cpu(), sel.rb.cpu()
            plo, wlo = lay.pool_lo.cpu(), lay.win_lo.cpu()
            lists, counts = lists.cpu(), counts.cpu()
            split_somewhere = False  # (some list has keys after the split: the test can fail)
            for h in range(perm.shape[0]):
                for t, (a, b) in enumerate(zip(q0.tolist(), q1.tolist())):
                    want = _expected_key_list(perm[h], rb[h], plo, wlo, a, b)
                    n = int(counts[h, t])
                    assert lists[h, t, :n].tolist() == want, (h, t, nq, topk)
                    f_lo, f_hi = int(plo[a:b].max()), int(wlo[a:b].min())
                    split_somewhere |= int(rb[h, a:b].min()) >= 0 and any(
                        not f_lo <= j < f_hi for j in want)
            assert split_somewhere, (nq, topk)


def test_cuda_backward_deterministic(bwd_kernel):
    q, k, v, s = make(1, 700, 700, 2, 4, 64, torch.bfloat16, seed=9)
    dout = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    bias = xab.LowerTriangularMask()
    a = grads(q, k, v, s, 48, 32, bias, dout)
    b = grads(q, k, v, s, 48, 32, bias, dout)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("D", [64, 128])
def test_cuda_backward_kernels_agree(D, monkeypatch):
    """The Hopper and mma.sync backward kernels on a longer causal GQA problem (several
    super-tiles, key tiles and window tiles): the same math, summed in another order."""
    if not is_hopper():
        pytest.skip("the wgmma kernels need an sm_90 GPU")
    q, k, v, s = make(1, 2500, 2500, 2, 4, D, torch.bfloat16, gqa=True, seed=3)
    dout = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    bias = xab.LowerTriangularMask()
    new = grads(q, k, v, s, 300, 100, bias, dout)
    monkeypatch.setenv("XFORMERS_SPARSEK_BWD", "sm80")
    old = grads(q, k, v, s, 300, 100, bias, dout)
    assert torch.equal(new[0], old[0])  # the same forward
    for name, a, b in zip(["dq", "dk", "dv", "dscores"], new[1:], old[1:]):
        assert rel_err(a, b) <= 2e-3, name
