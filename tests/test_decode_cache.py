"""SparseKCache (constant-memory generation cache) against the full-sequence SparseK result.

The reference for step t is row t of ``sparsek_attention`` over the whole sequence with a
causal ``LowerTriangularMask`` (prefill mode), and for a short case the independent numpy
brute force of conftest.
"""

import pytest
import torch
from conftest import brute_sparsek, max_abs
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from xformers_sparsek import SparseKCache
from xformers_sparsek.cache import _capped_simplex_tau
from xformers_sparsek.reference import capped_simplex_tau


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of tiny steps: on a shared 2-core machine intra-op threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(B, N, G, R, D, Dv, dtype, scores="normal"):
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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("topk", [5, 400], ids=["topk5", "topk_gt_pool"])
def test_every_step_matches_full_sequence(dtype, window, topk):
    B, N, G, R, D = 2, 300, 2, 4, 8
    q, k, v, u = _inputs(B, N, G, R, D, D, dtype)
    cache = SparseKCache(B, G, D, topk, window, dtype=dtype, capacity=N)
    out = _run(cache, q, k, v, u, prompt=40, multi={100: 3, 150: 17, 151: 2, 260: 2})
    ref = _full(q, k, v, u, topk, window)
    err = (out - ref).abs().amax(dim=(0, 2, 3, 4))
    assert float(err.max()) < _tol(dtype), f"first bad step {int((err >= _tol(dtype)).nonzero()[0])}"
    assert cache.overflow_count == 0


@pytest.mark.parametrize("scores", ["ties", "near_equal"])
@pytest.mark.parametrize("window", [0, 3])
def test_ties_and_fractional_gates(scores, window):
    B, N, G, R, D, topk = 1, 300, 2, 4, 8, 6
    q, k, v, u = _inputs(B, N, G, R, D, 5, torch.float64, scores)
    cache = SparseKCache(B, G, D, topk, window, value_dim=5, dtype=torch.float64, capacity=N)
    out = _run(cache, q, k, v, u, prompt=1, multi={50: 4, 200: 9})
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
    expect = B * G * ((window + topk) * (2 * D * 4 + 8) + 8 * topk + 8 * 4 * topk)
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


def test_tau_solver_matches_reference():
    torch.manual_seed(1)
    for n, topk in [(7, 3), (50, 5), (50, 49), (30, 10)]:
        u = torch.randn(4, n, dtype=torch.float64)
        u[1] = torch.round(u[1])  # ties
        u[2] = u[2] * 5  # saturated / flat
        u[3] = 0.5 + 1e-4 * u[3]  # all fractional
        pad = torch.full((4, 3), float("-inf"), dtype=torch.float64)
        tau, tau_min = _capped_simplex_tau(torch.cat([u, pad], 1), topk)
        for r in range(4):
            want, _ = capped_simplex_tau(u[r], topk)
            gates = (u[r] - tau[r]).clamp(0, 1)
            assert abs(float(gates.sum()) - topk) < 1e-9
            assert max_abs(gates, (u[r] - want).clamp(0, 1)) < 1e-9
            assert float(tau_min[r]) <= float(tau[r])


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
    assert c.seq_len == 0  # nothing was appended
