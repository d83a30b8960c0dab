"""SparseKCache (constant-memory generation cache) against the full-sequence SparseK result.

The reference for step t is row t of ``sparsek_attention`` over the whole sequence with a
causal ``LowerTriangularMask`` (prefill mode), in float64 on the CPU, and for a short case the
independent numpy brute force of conftest.  The core tests also run on CUDA (DEVICES): fp16 /
bf16 with D = 64 there use the CUDA kernels for the multi-token steps and the half-precision
decode matmuls; float32 / float64 run the PyTorch path on the GPU.
"""

import pytest
import torch
from conftest import brute_sparsek, cuda_kernels, max_abs, rel_err, requires_cuda
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from xformers_sparsek import SparseKCache
from xformers_sparsek.cache import _capped_simplex_tau
from xformers_sparsek.reference import capped_simplex_tau


pytestmark = pytest.mark.usefixtures("one_intraop_thread")


F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
REL_TOL = {F16: 3e-3, BF16: 1e-2}  # per step, against the float64 CPU reference


def cuda(*values):
    return pytest.param(*values, marks=requires_cuda, id="-".join(
        ["cuda"] + [{F64: "f64", F32: "f32", BF16: "bf16", F16: "f16"}.get(x, str(x)) for x in values[1:]]))


def to(device, *ts):
    return [t.to(device) for t in ts]


def _inputs(B, N, G, R, D, Dv, dtype, scores="normal"):
    """On the CPU (the reference runs there); half dtypes: values rounded to the dtype,
    scores float32."""
    q = torch.randn(B, N, G, R, D, dtype=dtype)
    k = torch.randn(B, N, G, D, dtype=dtype)
    v = torch.randn(B, N, G, Dv, dtype=dtype)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    if scores == "normal":
        u = torch.randn(B, N, G, dtype=sdt)
    elif scores == "ties":  # few distinct values: top-k ties everywhere, gates 0/1/fractional
        u = torch.randint(0, 4, (B, N, G)).to(sdt) * 0.5
    elif scores == "near_equal":  # every pool key fractional: tau depends on all of them
        u = 0.5 + 1e-3 * torch.randn(B, N, G, dtype=sdt)
    else:
        raise AssertionError(scores)
    return q, k, v, u


def _full(q, k, v, u, topk, window):
    """Full-sequence reference in float64 on the CPU."""
    if q.dtype != F64 or q.device.type != "cpu":
        q, k, v, u = (t.cpu().double() for t in (q, k, v, u))
    B, N, G, R, D = q.shape
    kk = k.unsqueeze(3).expand(B, N, G, R, D)
    vv = v.unsqueeze(3).expand(B, N, G, R, v.shape[-1])
    uu = u.unsqueeze(3).expand(B, N, G, R)
    return xs.sparsek_attention(q, kk, vv, uu, topk, window, attn_bias=xab.LowerTriangularMask())


def _run(cache, q, k, v, u, prompt, multi=()):
    """Prompt prefill, then single-token steps; steps starting at a position in `multi`
    (a dict pos -> M) append M tokens at once.  Returns the concatenated outputs."""
    N = q.shape[1]
    outs, t = [], 0
    if prompt:
        outs.append(cache.update_and_attend(q[:, :prompt], k[:, :prompt], v[:, :prompt], u[:, :prompt]))
        t = prompt
    while t < N:
        m = min(dict(multi).get(t, 1), N - t)
        outs.append(cache.update_and_attend(q[:, t:t + m], k[:, t:t + m], v[:, t:t + m], u[:, t:t + m]))
        t += m
        assert cache.seq_len == t
    return torch.cat(outs, dim=1)


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def _check_steps(out, ref, dtype):
    """Every step (row t of the outputs) against the reference: max abs error for float32 /
    float64, relative error (norm over everything, and per step over batch and heads) for
    half precision."""
    out, ref = out.cpu().double(), ref.cpu().double()
    assert torch.isfinite(out).all()
    if dtype in REL_TOL:  # over all steps, and per step (3x: fewer elements) to find a bad one
        assert rel_err(out, ref) <= REL_TOL[dtype]
        norm = lambda t: torch.linalg.vector_norm(t, dim=(0, 2, 3, 4))  # noqa: E731
        err = norm(out - ref) / norm(ref).clamp(min=1e-30)
        tol = 3 * REL_TOL[dtype]
    else:
        err = (out - ref).abs().amax(dim=(0, 2, 3, 4))
        tol = _tol(dtype)
    assert float(err.max()) < tol, f"first bad step {int((err >= tol).nonzero()[0])}: {float(err.max())}"


@pytest.mark.parametrize("device,dtype", [("cpu", F64), ("cpu", F32), ("cpu-sync-free", F64),
                                          cuda("cuda", F32), cuda("cuda", BF16),
                                          cuda("cuda", F16)],
                         ids=["f64", "f32", "sync-free-f64", "cuda-f32", "cuda-bf16", "cuda-f16"])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("topk", [5, 400], ids=["topk5", "topk_gt_pool"])
def test_every_step_matches_full_sequence(device, dtype, window, topk):
    """("cpu-sync-free": the CPU running the static single-token step that CUDA runs.)"""
    B, N, G, R = 2, 300, 2, 4
    sync_free = device == "cpu-sync-free"
    device = "cpu" if sync_free else device
    D = 8 if device == "cpu" else 64  # a CUDA-kernel head dim on the GPU
    q, k, v, u = _inputs(B, N, G, R, D, D, dtype)
    cache = SparseKCache(B, G, D, topk, window, dtype=dtype, capacity=N, device=device)
    cache._sync_free = cache._sync_free or sync_free
    out = _run(cache, *to(device, q, k, v, u), prompt=40, multi={100: 3, 150: 17, 151: 2, 260: 2})
    assert out.device.type == device and out.dtype == dtype
    _check_steps(out, _full(q, k, v, u, topk, window), dtype)
    assert cache.overflow_count == 0


@pytest.mark.parametrize("device", ["cpu", cuda("cuda")])
@pytest.mark.parametrize("scores", ["ties", "near_equal"])
@pytest.mark.parametrize("window", [0, 3])
def test_ties_and_fractional_gates(scores, window, device):
    """float64 (on CUDA: the sort-free threshold solve and the static decode step on the GPU,
    to 1e-10)."""
    B, N, G, R, D, topk = 1, 300, 2, 4, 8, 6
    q, k, v, u = _inputs(B, N, G, R, D, 5, torch.float64, scores)
    cache = SparseKCache(B, G, D, topk, window, value_dim=5, dtype=torch.float64, capacity=N,
                         device=device)
    out = _run(cache, *to(device, q, k, v, u), prompt=1, multi={50: 4, 200: 9})
    ref = _full(q, k, v, u, topk, window)
    assert max_abs(out, ref) < 1e-10
    assert cache.overflow_count == 0


def test_against_numpy_brute_force():
    B, N, G, R, D, topk, window = 1, 48, 2, 2, 4, 3, 2
    q, k, v, u = _inputs(B, N, G, R, D, D, torch.float64, "ties")
    cache = SparseKCache(B, G, D, topk, window, dtype=torch.float64, capacity=N)
    out = _run(cache, q, k, v, u, prompt=5, multi={20: 3})
    kk, vv = k.unsqueeze(3).expand(B, N, G, R, D), v.unsqueeze(3).expand(B, N, G, R, D)
    ref, _ = brute_sparsek(q, kk, vv, u.unsqueeze(3).expand(B, N, G, R), topk, window,
                           xab.LowerTriangularMask())
    assert max_abs(out, torch.from_numpy(ref)) < 1e-10


def test_flat_query_head_layout_and_reset():
    """q as [B, M, Hkv*R, D] (head h uses KV head h // R) gives the same result; reset()
    starts over."""
    B, N, G, R, D, topk = 2, 40, 3, 2, 8, 4
    q, k, v, u = _inputs(B, N, G, R, D, D, torch.float64)
    c1 = SparseKCache(B, G, D, topk, 2, dtype=torch.float64)
    o1 = _run(c1, q, k, v, u, prompt=10)
    c1.reset()
    assert c1.seq_len == 0
    q4 = q.reshape(B, N, G * R, D)
    o2 = _run(c1, q4, k, v, u, prompt=10)
    assert o2.shape == (B, N, G * R, D)
    assert max_abs(o1.reshape(B, N, G * R, D), o2) == 0.0


@pytest.mark.parametrize("device", ["cpu", "cpu-sync-free", cuda("cuda")])
@pytest.mark.parametrize("window", [0, 3])
def test_per_sequence_lengths_and_padding(window, device):
    """Left-padded prompts of different lengths (valid mask), then single-token steps,
    a multi-token step and a step where one sequence appends nothing; every sequence must
    match its own full-sequence result."""
    B, G, R, D, topk, steps = 3, 2, 2, 8, 5, 90
    lens = [7, 20, 1]
    P = max(lens)
    seqs = [_inputs(1, n + steps, G, R, D, D, torch.float64) for n in lens]
    refs = [_full(*x, topk, window)[0] for x in seqs]
    sync_free = device == "cpu-sync-free"
    device = "cpu" if sync_free else device
    cache = SparseKCache(B, G, D, topk, window, dtype=torch.float64, capacity=200, device=device)
    cache._sync_free = cache._sync_free or sync_free
    pos = [0] * B  # next token of each sequence

    def step(m, valid_rows):
        """m tokens for every sequence in valid_rows (others padded) -> check outputs."""
        take = [m if b in valid_rows else 0 for b in range(B)]
        M = max(take)
        batch = []
        for i in range(4):  # q, k, v, u: left-pad with garbage
            rows = []
            for b in range(B):
                t = seqs[b][i][0, pos[b]:pos[b] + take[b]]
                pad = torch.randn((M - take[b],) + t.shape[1:], dtype=t.dtype)
                rows.append(torch.cat([pad, t]))
            batch.append(torch.stack(rows))
        valid = torch.tensor([[j >= M - take[b] for j in range(M)] for b in range(B)])
        out = cache.update_and_attend(*to(device, *batch), valid=valid.to(device)).cpu()
        for b in range(B):
            assert bool((out[b, :M - take[b]] == 0).all())
            got = out[b, M - take[b]:]
            assert max_abs(got, refs[b][pos[b]:pos[b] + take[b]]) < 1e-10, (b, pos[b])
            pos[b] += take[b]
        assert cache.seq_lens == pos

    # prompt: each sequence its own length
    take = lens
    M = P
    batch = []
    for i in range(4):
        rows = []
        for b in range(B):
            t = seqs[b][i][0, :take[b]]
            rows.append(torch.cat([torch.randn((M - take[b],) + t.shape[1:], dtype=t.dtype), t]))
        batch.append(torch.stack(rows))
    valid = torch.tensor([[j >= M - take[b] for j in range(M)] for b in range(B)])
    out = cache.update_and_attend(*to(device, *batch), valid=valid.to(device)).cpu()
    for b in range(B):
        assert max_abs(out[b, M - take[b]:], refs[b][:take[b]]) < 1e-10
        assert bool((out[b, :M - take[b]] == 0).all())
    pos[:] = lens
    for t in range(steps - 10):
        if t == 30:
            step(3, {0, 1, 2})
        elif t == 50:
            step(1, {0, 2})
        elif t == 60:
            step(4, {1})
        else:
            step(1, {0, 1, 2})
    assert cache.overflow_count == 0


def test_capacity_overflow_is_reported_and_large_capacity_is_exact():
    """Near-equal scores keep every pool key fractional: a small scores-only list overflows
    (reported, small error), a list as long as the pool is exact."""
    B, N, G, R, D, topk, window = 1, 300, 2, 2, 8, 4, 0
    q, k, v, u = _inputs(B, N, G, R, D, D, torch.float64, "near_equal")
    ref = _full(q, k, v, u, topk, window)
    small = SparseKCache(B, G, D, topk, window, dtype=torch.float64)  # capacity 4 * topk
    out = _run(small, q, k, v, u, prompt=20)
    assert small.overflow_count > 0
    err = max_abs(out, ref)
    assert 0 < err < 0.5  # approximate, bounded (measured in docs/decoding.md)
    big = SparseKCache(B, G, D, topk, window, dtype=torch.float64, capacity=N)
    out = _run(big, q, k, v, u, prompt=20)
    assert big.overflow_count == 0 and max_abs(out, ref) < 1e-10


def test_memory_is_flat():
    B, G, R, D, topk, window = 1, 2, 2, 8, 16, 8
    cache = SparseKCache(B, G, D, topk, window)
    nbytes0 = cache.kv_bytes()
    expect = B * G * ((window + topk) * (2 * D * 4 + 8) + 16 * topk + 8 * 4 * topk)
    assert nbytes0 == expect

    def extend(n):
        q, k, v, u = _inputs(B, n, G, R, D, D, torch.float32)
        cache.update_and_attend(q, k, v, u)

    extend(490)
    for _ in range(10):
        extend(1)
    assert cache.seq_len == 500 and cache.kv_entries == window + topk
    assert cache.kv_bytes() == nbytes0
    extend(490)
    for _ in range(10):
        extend(1)
    assert cache.seq_len == 1000 and cache.kv_entries == window + topk
    assert cache.kv_bytes() == nbytes0


@pytest.mark.parametrize("device", ["cpu", cuda("cuda")])
def test_tau_solver_matches_reference(device):
    torch.manual_seed(1)
    for n, topk in [(7, 3), (50, 5), (50, 49), (30, 10)]:
        u = torch.randn(4, n, dtype=torch.float64)
        u[1] = torch.round(u[1])  # ties
        u[2] = u[2] * 5  # saturated / flat
        u[3] = 0.5 + 1e-4 * u[3]  # all fractional
        pad = torch.full((4, 3), float("-inf"), dtype=torch.float64)
        tau, tau_min = _capped_simplex_tau(torch.cat([u, pad], 1).to(device), topk)
        tau, tau_min = tau.cpu(), tau_min.cpu()
        for r in range(4):
            want, _ = capped_simplex_tau(u[r], topk)
            gates = (u[r] - tau[r]).clamp(0, 1)
            assert abs(float(gates.sum()) - topk) < 1e-9
            assert max_abs(gates, (u[r] - want).clamp(0, 1)) < 1e-9
            assert float(tau_min[r]) <= float(tau[r])


@pytest.mark.parametrize("device,dtype", [("cpu", F32), cuda("cuda", F32), cuda("cuda", BF16)],
                         ids=["f32", "cuda-f32", "cuda-bf16"])
@pytest.mark.parametrize("flat", [False, True], ids=["bmghk", "flat"])
def test_capture_matches_eager(device, dtype, flat):
    """cache.capture(): on CUDA a CUDA graph replayed per step, on the CPU the same static
    step run eagerly; it matches update_and_attend step for step, capturing leaves the cache
    unchanged, and seq_len advances per call."""
    B, N, G, R, topk, window, prompt = 2, 120, 2, 2, 6, 5, 30
    D = 8 if device == "cpu" else 64
    q, k, v, u = to(device, *_inputs(B, N, G, R, D, D, dtype))
    if flat:
        q = q.reshape(B, N, G * R, D)
    eager = SparseKCache(B, G, D, topk, window, dtype=dtype, capacity=64, device=device)
    graph = SparseKCache(B, G, D, topk, window, dtype=dtype, capacity=64, device=device)
    for c in (eager, graph):
        c.update_and_attend(q[:, :prompt], k[:, :prompt], v[:, :prompt], u[:, :prompt])
    before = {n: getattr(graph, n).clone() for n in ("kv_k", "pool_u", "tau", "lens")}
    step = graph.capture(q[:, :1], k[:, :1], v[:, :1], u[:, :1])
    assert (step.graph is not None) == (device == "cuda")
    for n, t in before.items():
        assert torch.equal(getattr(graph, n), t), n
    assert graph.seq_len == prompt
    for t in range(prompt, N):
        sl = slice(t, t + 1)
        want = eager.update_and_attend(q[:, sl], k[:, sl], v[:, sl], u[:, sl])
        got = step(q[:, sl], k[:, sl], v[:, sl], u[:, sl])
        assert got.shape == want.shape and got.dtype == want.dtype
        # (cuBLAS may pick another algorithm under capture: rounding-level differences)
        tol = 2e-2 if dtype == BF16 else 1e-5
        assert max_abs(got, want) <= tol * max(1.0, float(want.abs().max())), t
        assert graph.seq_len == t + 1
    assert graph.seq_lens == eager.seq_lens and max_abs(graph.tau, eager.tau) == 0
    with pytest.raises(ValueError, match="k"):
        step(q[:, :1], k[:, :2], v[:, :1], u[:, :1])
    with pytest.raises(ValueError, match="M must be 1"):
        graph.capture(q[:, :2], k[:, :2], v[:, :2], u[:, :2])


@cuda_kernels
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("D,R", [(64, 4), (128, 8), (128, 1)], ids=["d64r4", "d128r8", "d128r1"])
@pytest.mark.parametrize("window", [0, 9])
@pytest.mark.parametrize("scores", ["normal", "ties", "near_equal"])
def test_fused_decode_step_matches_pytorch_step(dtype, D, R, window, scores):
    """The fused CUDA step (csrc/sparsek/decode.cu) against the PyTorch tensor step, fed the
    same tokens one at a time: after every step the same lengths, top set (slot for slot),
    K/V buffers, overflow counts and pool scores (exactly), tau to float64 rounding, and
    outputs within half-precision tolerance.  The capacity is small so that it overflows,
    and one sequence has padding rows (valid = False)."""
    B, N, G, topk, cap = 3, 400, 2, 24, 16
    q, k, v, u = _inputs(B, N, G, R, D, D, dtype, scores)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, ::7] = False
    q, k, v, u, valid = to("cuda", q, k, v, u, valid)
    fused, ref = (SparseKCache(B, G, D, topk, window, dtype=dtype, capacity=cap, device="cuda")
                  for _ in range(2))
    assert fused.fused_decode_reason is None
    ref.fused_decode_reason = "test: the PyTorch step"
    for t in range(N):
        sl = slice(t, t + 1)
        got, want = (c.update_and_attend(q[:, sl], k[:, sl], v[:, sl], u[:, sl], valid=valid[:, sl])
                     for c in (fused, ref))
        for name in ("lens", "top_pos", "overflow", "pool_u", "kv_k", "kv_v", "win_u", "top_u"):
            assert torch.equal(getattr(fused, name), getattr(ref, name)), (name, t)
        torch.testing.assert_close(fused.tau, ref.tau, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused.tau_min, ref.tau_min, rtol=1e-12, atol=1e-12)
        assert rel_err(got, want) <= REL_TOL[dtype], t
    if scores != "normal":  # (these fill the fractional list: the capacity overflows)
        assert fused.overflow_count > 0


def test_capture_compiles_fullgraph():
    """capture(compile=True): the static step traces as one graph (fullgraph=True: no graph
    breaks, i.e. no host syncs or Python branches on tensor values); the "eager" backend keeps
    this cheap on the CPU (the decode bench uses inductor on CUDA)."""
    B, N, G, R, D, topk, window, prompt = 2, 50, 2, 2, 8, 6, 5, 20
    q, k, v, u = _inputs(B, N, G, R, D, D, F32)
    eager = SparseKCache(B, G, D, topk, window, capacity=32)
    comp = SparseKCache(B, G, D, topk, window, capacity=32)
    comp._sync_free = True  # (what CUDA runs)
    for c in (eager, comp):
        c.update_and_attend(q[:, :prompt], k[:, :prompt], v[:, :prompt], u[:, :prompt])
    step = comp.capture(q[:, :1], k[:, :1], v[:, :1], u[:, :1], compile=True,
                        compile_backend="eager")
    assert comp.seq_len == prompt
    for t in range(prompt, N):
        sl = slice(t, t + 1)
        want = eager.update_and_attend(q[:, sl], k[:, sl], v[:, sl], u[:, sl])
        assert max_abs(step(q[:, sl], k[:, sl], v[:, sl], u[:, sl]), want) <= 1e-6
    assert comp.seq_lens == eager.seq_lens


@requires_cuda
def test_decode_step_has_no_host_sync():
    """The eager single-token step on CUDA (past the input check) never syncs with the host."""
    B, N, G, R, D, topk, window = 2, 64, 2, 2, 64, 8, 4
    q, k, v, u = to("cuda", *_inputs(B, N, G, R, D, D, BF16))
    cache = SparseKCache(B, G, D, topk, window, dtype=BF16, capacity=32, device="cuda")
    cache.update_and_attend(q[:, :40], k[:, :40], v[:, :40], u[:, :40])
    valid = torch.ones(B, 1, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(40, N):
            sl = slice(t, t + 1)
            cache._decode(q[:, sl], k[:, sl], v[:, sl], u[:, sl], 0.125, valid if t % 2 else None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cache.seq_len == N


def _bad(cache, **over):
    B, M, G, D = cache.batch, 2, cache.kv_heads, cache.head_dim
    args = dict(q=torch.randn(B, M, G, 2, D), k=torch.randn(B, M, G, D),
                v=torch.randn(B, M, G, cache.value_dim), scores=torch.randn(B, M, G))
    args.update(over)
    return cache.update_and_attend(**args)


def test_bad_inputs():
    for kw, name in [(dict(topk=0), "topk"), (dict(window=-1), "window"),
                     (dict(capacity=0), "capacity"), (dict(batch=0), "batch")]:
        args = dict(batch=2, kv_heads=2, head_dim=4, topk=3, window=1)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            SparseKCache(**args)
    c = SparseKCache(2, 2, 4, 3, 1)
    cases = [
        (dict(q=torch.randn(2, 2, 2, 2, 5)), "q"),
        (dict(q=torch.randn(2, 2, 3, 4)), "q"),
        (dict(k=torch.randn(2, 2, 3, 4)), "k"),
        (dict(k=torch.randn(1, 2, 2, 4)), "k"),
        (dict(v=torch.randn(2, 3, 2, 4)), "v"),
        (dict(scores=torch.randn(2, 2, 1)), "scores"),
        (dict(scores=torch.tensor([[[0.0, float("nan")]] * 2] * 2)), "scores"),
        (dict(scores=torch.tensor([[[0.0, float("inf")]] * 2] * 2)), "scores"),
        (dict(scores=torch.zeros(2, 2, 2, dtype=torch.int64)), "scores"),
        (dict(k=torch.randn(2, 0, 2, 4)), "k"),
    ]
    for over, name in cases:
        with pytest.raises(ValueError, match=name):
            _bad(c, **over)
    for valid in (torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2), [[True] * 2] * 2):
        with pytest.raises(ValueError, match="valid"):
            _bad(c, valid=valid)
    assert c.seq_len == 0  # nothing was appended
