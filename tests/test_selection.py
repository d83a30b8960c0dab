"""The SparseK selection stage (DESIGN.md section 1) against hand-worked and brute-force answers.

* the worked example of DESIGN.md through the reference, the fast selection and the public API;
* ``_layout.build_layout`` (pool / window intervals) against xFormers' ``materialize``;
* ``_selection.select`` (tau, top-k boundary, nF) against the numpy brute force of conftest
  on many score distributions and every base bias;
* ``_wavelet.WaveletMatrix`` against brute force.
"""

import math
import random

import numpy as np
import pytest
import torch
from conftest import (
    BIAS_TYPES,
    allowed_matrix,
    brute_row,
    brute_tau,
    kind_id,
    make_bias,
    query_positions,
)
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek
from xformers_sparsek import _layout, _selection, _wavelet, reference

CPU = torch.device("cpu")
EX_U = [0.9, 0.1, 0.5, 1.4, 0.15]  # DESIGN.md worked example, topk = 2
EX_P = [0.7, 0.0, 0.3, 1.0, 0.0]


def select_rows(u, base, B, Mq, Mk, window, topk):
    """Run the fast selection; u: float64 [S, B*Mk] -> (layout, Selection)."""
    lay = _layout.build_layout(base, B, Mq, Mk, window, CPU)
    return lay, _selection.select(u, lay, topk)


def selected_set(u_row, lay, sel, s, i):
    """Pool keys of query i that the Selection marks as selected (by the (ub, jb) rule)."""
    lo, wlo = int(lay.pool_lo[i]), int(lay.win_lo[i])
    ub, jb = float(sel.ub[s, i]), int(sel.jb[s, i])
    return [j for j in range(lo, wlo) if (u_row[j], j) >= (ub, jb)]


# ------------------------------------------------------------------------------------------
# worked example


def test_worked_example_reference_tau():
    u = torch.tensor(EX_U, dtype=torch.float64)
    tau, frac = reference.capped_simplex_tau(u, 2)
    assert abs(float(tau) - 0.2) < 1e-12
    p = (u - tau).clamp(0, 1)
    torch.testing.assert_close(p, torch.tensor(EX_P, dtype=torch.float64), rtol=0, atol=1e-12)
    assert frac.tolist() == [True, False, True, False, False]
    lo, hi = brute_tau(np.array(EX_U), 2)  # the test's own brute force agrees
    assert abs(lo - 0.2) < 1e-12 and abs(hi - 0.2) < 1e-12


@pytest.mark.parametrize("window", [0, 1])
def test_worked_example_fast_selection(window):
    # keys 0..4 carry the example scores; with window=1 a sixth key (position 5) is the
    # window of the query at position 5, whatever its score.
    u = torch.tensor([EX_U + [7.0] * window], dtype=torch.float64)
    base = xab.LowerTriangularMask() if window else None
    Mq = 6 if window else 1
    lay, sel = select_rows(u, base, 1, Mq, u.shape[1], window, 2)
    i = Mq - 1
    assert (int(lay.pool_lo[i]), int(lay.win_lo[i])) == (0, 5)
    assert int(lay.win_hi[i]) == (6 if window else 5)
    assert abs(float(sel.tau[0, i]) - 0.2) < 1e-12
    assert (float(sel.ub[0, i]), int(sel.jb[0, i])) == (0.9, 0)
    assert int(sel.nF[0, i]) == 2  # keys 0 and 2 are fractional
    assert selected_set(u[0].tolist(), lay, sel, 0, i) == [0, 3]
    gates = (u[0, [3, 0]] - sel.tau[0, i]).clamp(0, 1)
    torch.testing.assert_close(gates, torch.tensor([1.0, 0.7], dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", [0, 1])
def test_worked_example_end_to_end(window):
    """Value vectors are one-hot, so the output row is a_ij * m_ij: the gates can be read."""
    Mk = 6 if window else 5
    D = 8
    q = torch.randn(1, Mk, 1, D, dtype=torch.float64)
    k = torch.randn(1, Mk, 1, D, dtype=torch.float64)
    v = torch.eye(Mk, dtype=torch.float64).reshape(1, Mk, 1, Mk)
    scores = torch.tensor(EX_U + [7.0][: Mk - 5], dtype=torch.float64).reshape(1, Mk, 1)
    base = xab.LowerTriangularMask() if window else None
    out, lse = xformers_sparsek.sparsek_attention(q, k, v, scores, 2, window, base,
                                                  return_lse=True)
    i = Mk - 1 if window else 0  # the query at position 5 (window) / any query (no mask)
    gate = {3: 1.0, 0: 0.7}
    if window:
        gate[5] = 1.0
    keys = sorted(gate)
    m = torch.tensor([gate[j] for j in keys], dtype=torch.float64)
    logits = D ** -0.5 * m * (k[0, keys, 0] @ q[0, i, 0])
    a = torch.softmax(logits, 0)
    expect = torch.zeros(Mk, dtype=torch.float64)
    expect[keys] = a * m
    torch.testing.assert_close(out[0, i, 0], expect, rtol=0, atol=1e-12)
    assert out[0, i, 0, 2] == 0  # p_2 = 0.3 > 0, but key 2 is outside the top-2
    assert abs(float(lse[0, 0, i]) - float(torch.logsumexp(logits, 0))) < 1e-12


# ------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("kind", BIAS_TYPES, ids=kind_id)
def test_layout_intervals_match_materialize(kind):
    for _ in range(4):
        base, B, Mq, Mk, causal = make_bias(kind, max_len=13, allow_empty=True)
        allowed = allowed_matrix(base, B, Mq, Mk)
        pos = query_positions(base, Mq, Mk)
        for window in ([0, 1, 3] if causal else [0]):
            lay = _layout.build_layout(base, B, Mq, Mk, window, CPU)
            for b in range(B):
                for i in range(Mq):
                    r = brute_row(np.zeros(Mk), allowed[b, i], int(pos[i]), window, 10**9)
                    n = b * Mq + i
                    lo, wlo, whi = (int(t[n]) - b * Mk for t in (lay.pool_lo, lay.win_lo,
                                                                  lay.win_hi))
                    assert list(range(lo, wlo)) == r.pool, (base, window, b, i)
                    assert list(range(wlo, whi)) == r.window, (base, window, b, i)


def test_layout_cache_keys_on_everything_that_shapes_the_layout():
    """build_layout caches (a miss copies to the device, which syncs): equal arguments share
    one layout; a different window, bias, length, batch or block structure gets its own,
    and the cached intervals are the freshly computed ones (the test above checks those)."""
    causal = xab.LowerTriangularMask()
    a = _layout.build_layout(causal, 2, 9, 9, 3, CPU)
    assert _layout.build_layout(xab.LowerTriangularMask(), 2, 9, 9, 3, CPU) is a
    others = [
        _layout.build_layout(causal, 2, 9, 9, 2, CPU),
        _layout.build_layout(None, 2, 9, 9, 0, CPU),
        _layout.build_layout(xab.LowerTriangularFromBottomRightMask(), 2, 9, 9, 3, CPU),
        _layout.build_layout(causal, 2, 8, 9, 3, CPU),
        _layout.build_layout(causal, 1, 9, 9, 3, CPU),
        _layout.build_layout(xab.BlockDiagonalCausalMask.from_seqlens([4, 14]), 1, 18, 18, 3,
                             CPU),
        _layout.build_layout(xab.BlockDiagonalCausalMask.from_seqlens([5, 13]), 1, 18, 18, 3,
                             CPU),
    ]
    assert len({id(x) for x in [a] + others}) == len(others) + 1
    fresh = _layout._build_layout(True, False, None, _layout.segments_of(causal, 2, 9, 9),
                                  18, 18, 3, CPU)
    for name in ("pool_lo", "win_lo", "win_hi"):
        assert torch.equal(getattr(a, name), getattr(fresh, name)), name
    # sparse attention through the cached layout leaves it untouched
    q = torch.randn(2, 9, 1, 4, dtype=torch.float64)
    xformers_sparsek.sparsek_attention(q, q, q, torch.randn(2, 9, 1, dtype=torch.float64), 2, 3,
                                       causal)
    for name in ("pool_lo", "win_lo", "win_hi"):
        assert torch.equal(getattr(a, name), getattr(fresh, name)), name


def test_layout_cached_under_inference_mode_serves_autograd():
    """A layout first built under torch.inference_mode() (evaluation) is reused by a later
    call that autograd records (training): it must not be an inference tensor."""
    q = torch.randn(1, 37, 2, 8, dtype=torch.float64)
    s = torch.randn(1, 37, 2, dtype=torch.float64)
    base = xab.LowerTriangularMask()
    _layout._LAYOUT_CACHE.clear()
    with torch.inference_mode():
        xformers_sparsek.sparsek_attention(q, q, q, s, 5, 3, base)
    qg, sg = q.clone().requires_grad_(True), s.clone().requires_grad_(True)
    xformers_sparsek.sparsek_attention(qg, qg, qg, sg, 5, 3, base).sum().backward()
    assert torch.isfinite(sg.grad).all() and sg.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------
# fast selection vs brute force


def draw_scores(dist, shape):
    if dist == "random":
        return torch.randn(shape, dtype=torch.float64)
    if dist == "ties":
        return torch.randint(0, 5, shape).to(torch.float64) * 0.5
    if dist == "quantized":  # bf16-rounded scores: ties and dyadic gaps
        return torch.randn(shape).to(torch.bfloat16).to(torch.float64)
    if dist == "near_equal":
        return 1.0 + 1e-7 * torch.randn(shape, dtype=torch.float64)
    if dist == "spread":
        return 100.0 * torch.randn(shape, dtype=torch.float64)
    if dist == "all_equal":
        return torch.full(shape, float(torch.randn(())), dtype=torch.float64)
    raise AssertionError(dist)


def check_selection(u, base, B, Mq, Mk, window, topk):
    """Compare _selection.select on u [S, B*Mk] with the brute force, row by row."""
    lay, sel = select_rows(u, base, B, Mq, Mk, window, topk)
    allowed = allowed_matrix(base, B, Mq, Mk)
    pos = query_positions(base, Mq, Mk)
    S = u.shape[0]
    scale = max(1.0, float(u.abs().max()))
    tol = 1e-12 * scale
    for s in range(S):
        for b in range(B):
            ub = u[s, b * Mk:(b + 1) * Mk].numpy()
            for i in range(Mq):
                n = b * Mq + i
                ctx = dict(s=s, b=b, i=i, window=window, topk=topk, base=base)
                r = brute_row(ub, allowed[b, i], int(pos[i]), window, topk)
                tau = float(sel.tau[s, n])
                if r.tau is None:  # the whole pool is selected with gate 1
                    assert tau == -math.inf and float(sel.ub[s, n]) == -math.inf, ctx
                    assert int(sel.nF[s, n]) == 0, ctx
                    continue
                got = [j - b * Mk for j in selected_set(u[s].tolist(), lay, sel, s, n)]
                assert sorted(got) == sorted(r.selected), ctx
                # unique tau: equal; flat (non-unique) tau: anywhere in the interval (its
                # midpoint is checked in test_select_flat_threshold_convention)
                assert r.tau[0] - tol <= tau <= r.tau[1] + tol, (ctx, tau, r.tau)
                gates = np.clip(ub[r.selected] - tau, 0.0, 1.0)
                np.testing.assert_allclose(gates, r.gates, rtol=0, atol=tol, err_msg=str(ctx))
                # nF: the pool keys strictly between tau and tau + 1 (also at kinks)
                pool_u = ub[r.pool]
                n_frac = int(((pool_u > tau) & (pool_u < tau + 1.0)).sum())
                assert int(sel.nF[s, n]) == n_frac, (ctx, int(sel.nF[s, n]), n_frac)
                if r.nF is not None and r.margin > 1e-9 * scale:
                    assert n_frac == r.nF, ctx


DISTS = ["random", "ties", "quantized", "near_equal", "spread", "all_equal"]


@pytest.mark.parametrize("kind", BIAS_TYPES, ids=kind_id)
@pytest.mark.parametrize("dist", DISTS)
def test_select_matches_brute_force(dist, kind):
    base, B, Mq, Mk, causal = make_bias(kind, max_len=15, allow_empty=True)
    S = 2
    u = draw_scores(dist, (S, B * Mk))
    for window in ([0, 1, 5] if causal else [0]):
        for topk in (1, int(torch.randint(2, 6, ())), Mk + 1):
            check_selection(u, base, B, Mq, Mk, window, topk)


@pytest.mark.parametrize("dist", DISTS)
def test_select_long_pools(dist):
    """One longer causal sequence: pools up to 300 keys, many fractional keys."""
    M = 300
    u = draw_scores(dist, (1, M))
    for window, topk in ((0, 1), (5, 17), (1, 64)):
        check_selection(u, xab.LowerTriangularMask(), 1, M, M, window, topk)


def test_select_flat_threshold_gates():
    """Scores far apart (gap > 1 at the top-k boundary): tau is not unique, gates are 0/1."""
    u = torch.tensor([[5.0, 5.0, 0.0, -3.0]], dtype=torch.float64)
    lay, sel = select_rows(u, None, 1, 1, 4, 0, 2)
    tau = float(sel.tau[0, 0])
    assert 0.0 <= tau <= 4.0
    assert selected_set(u[0].tolist(), lay, sel, 0, 0) == [0, 1]
    assert (u[0, :2] - tau).clamp(0, 1).tolist() == [1.0, 1.0]


FLAT_CASES = [
    pytest.param([5.0, 5.0, 0.0], 2, id="gap5"),
    # f at the flat interval's ends is rounded; these once sent the search past it
    pytest.param([-8.82, -8.97, -6.52], 1, id="rounding_left"),
    pytest.param([8.28, 19.65, 7.68, 19.9, 7.18], 2, id="rounding_right"),
]


@pytest.mark.parametrize("u,topk", FLAT_CASES)
def test_select_flat_threshold_convention(u, topk):
    """Non-unique tau (f == topk on a whole interval [u_(k+1), u_(k) - 1]): its midpoint,
    nF = 0, in the fast selection and in the reference."""
    lo, hi = brute_tau(np.array(u), topk)
    assert lo < hi
    ut = torch.tensor([u], dtype=torch.float64)
    ref_tau, ref_frac = reference.capped_simplex_tau(ut[0], topk)
    assert abs(float(ref_tau) - 0.5 * (lo + hi)) < 1e-12 and not ref_frac.any()
    _, sel = select_rows(ut, None, 1, 1, len(u), 0, topk)
    assert abs(float(sel.tau[0, 0]) - 0.5 * (lo + hi)) < 1e-12
    assert int(sel.nF[0, 0]) == 0


# ------------------------------------------------------------------------------------------
# wavelet matrix


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 16, 17, 31, 33, 64, 65])
def test_wavelet_matrix_brute_force(n):
    """Two rows (independent permutations) per matrix, queried together."""
    ranks = torch.stack([torch.randperm(n) for _ in range(2)])
    w = torch.randn(2, n, dtype=torch.float64)
    wm = _wavelet.WaveletMatrix(ranks, w)
    lo, hi = torch.triu_indices(n + 1, n + 1, offset=1)  # every range lo < hi
    if lo.numel() > 300:
        pick = torch.randperm(lo.numel())[:300]
        lo, hi = lo[pick], hi[pick]
    row = torch.randint(0, 2, lo.shape)
    for theta in sorted({0, 1, n // 2, n - 1, n, int(torch.randint(0, n + 1, ()))}):
        cnt, acc = wm.count_sum_below(row, lo, hi, torch.full_like(lo, theta))
        below = ranks < theta
        for t in range(lo.numel()):
            b, seg = int(row[t]), slice(int(lo[t]), int(hi[t]))
            assert int(cnt[t]) == int(below[b, seg].sum())
            assert abs(float(acc[t]) - float(w[b, seg][below[b, seg]].sum())) < 1e-12
    kk = ((hi - lo).to(torch.float64) * torch.rand(lo.shape)).long()  # 0 <= k < hi - lo
    got = wm.kth_smallest(row, lo, hi, kk)
    for t in range(lo.numel()):
        expect = ranks[int(row[t]), int(lo[t]):int(hi[t])].sort().values[int(kk[t])]
        assert int(got[t]) == int(expect)


@pytest.mark.parametrize("kind", BIAS_TYPES, ids=kind_id)
@pytest.mark.parametrize("dist", DISTS)
def test_backward_rank_tables_from_forward_outputs(dist, kind):
    """The CUDA backward rebuilds the boundary ranks from the forward's (ub, jb) and one
    sort of the scores (_cuda._with_ranks) instead of a second selection: the same rb."""
    from xformers_sparsek import _cuda

    base, B, Mq, Mk, causal = make_bias(kind, max_len=15, allow_empty=True)
    u = draw_scores(dist, (2, B * Mk)).float()  # the CUDA path selects on float32 scores
    for window in ([0, 3] if causal else [0]):
        for topk in (1, 3, Mk + 1):
            lay, sel = select_rows(u.double(), base, B, Mq, Mk, window, topk)
            got = _cuda._with_ranks(u, _selection.Selection(sel.tau, sel.ub, sel.jb, sel.nF))
            assert torch.equal(got.rb, sel.rb), (window, topk)
            _, perm, ranks = _selection._row_ranks(u.double())
            assert torch.equal(got.key_of_rank.long(), perm)
            assert torch.equal(got.rank_of_key.long(), ranks)


def test_cuda_driver_tiles_are_built_once_and_right():
    """_cuda._tiles (the kernels' query tiles) is cached per (queries, tile size, device):
    the same tensors on a second call, and the right bounds, last tile short."""
    from xformers_sparsek import _cuda

    q0, q1 = _cuda._tiles(1000, 128, torch.device("cpu"))
    again = _cuda._tiles(1000, 128, "cpu")
    assert again[0] is q0 and again[1] is q1
    assert q0.dtype == torch.int32 and q0.tolist() == list(range(0, 1000, 128))
    assert q1.tolist() == [min(a + 128, 1000) for a in range(0, 1000, 128)]
    assert _cuda._tiles(1000, 64, "cpu")[0].numel() == 16  # another size: its own tiles


@pytest.mark.parametrize("bias_kind", BIAS_TYPES, ids=kind_id)
def test_cuda_driver_tiles_start_at_every_sequence(bias_kind):
    """The kernels' tiles (_cuda._tiles with the layout's sequence starts) cover the queries
    in order, never span two sequences, and split each sequence into full tiles from its
    start; _tile_extents gives each tile's min win_lo / max win_hi."""
    from xformers_sparsek import _cuda

    bias, B, Mq, Mk, causal = make_bias(bias_kind, max_len=70)
    lay = _layout.build_layout(bias, B, Mq, Mk, 4 if causal else 0, CPU)
    starts = list(lay.seq_key)
    assert starts[0] == 0 and starts == sorted(set(starts))
    for qpt in (16, 32, 128):
        q0, q1 = _cuda._tiles(lay.num_queries, qpt, "cpu", lay.seq_key)
        q0, q1 = q0.tolist(), q1.tolist()
        assert q0[0] == 0 and q1[-1] == lay.num_queries and q0[1:] == q1[:-1]
        seq_of = torch.searchsorted(torch.tensor(starts), torch.arange(lay.num_queries),
                                    right=True)
        for a, b in zip(q0, q1):
            assert 0 < b - a <= qpt and seq_of[a] == seq_of[b - 1]
            assert a in starts or (a - max(x for x in starts if x <= a)) % qpt == 0
        lo, hi = _cuda._tile_extents(lay, torch.tensor(q0), torch.tensor(q1))
        assert lo.tolist() == [int(lay.win_lo[a:b].min()) for a, b in zip(q0, q1)]
        assert hi.tolist() == [int(lay.win_hi[a:b].max()) for a, b in zip(q0, q1)]


@pytest.mark.parametrize("bias_kind", BIAS_TYPES, ids=kind_id)
def test_tile_key_lists_fit_their_capacity(bias_kind):
    """The kernels' per-tile key lists (a model of lists.cu: the keys of [min pool_lo,
    max win_lo) at or above the tile's lowest boundary rank, or all of them when a query
    selects its whole pool) on _cuda._tiles' tiles: at most topk + rows keys wherever the
    pools are nested (every bias without a local window), so the forward and backward never
    fall back to the PyTorch path there; and each tile's window span (max win_hi - min
    win_lo, the backward's window tiles) within _cuda._window_span_bound, which nested
    layouts use instead of reading the spans back (a host sync)."""
    from xformers_sparsek import _cuda
    from xformers_sparsek._selection import _row_ranks

    if "LocalAttention" in kind_id(bias_kind):
        pytest.skip("sliding pools: lists may overflow (the PyTorch path then runs)")
    for trial in range(3):
        bias, B, Mq, Mk, causal = make_bias(bias_kind, max_len=90, allow_empty=True)
        window = random.choice([0, 5]) if causal else 0
        lay = _layout.build_layout(bias, B, Mq, Mk, window, CPU)
        assert lay.nested
        topk = random.choice([1, 7, 20])
        u = torch.randn(2, lay.num_keys, dtype=torch.float64)
        sel = _selection.select(u, lay, topk)
        _, _, ranks = _row_ranks(u)
        rb = torch.where(torch.isneginf(sel.ub), -1, ranks.gather(1, sel.jb.clamp(min=0)))
        for rows in (16, 32, 64, 128):
            q0, q1 = _cuda._tiles(lay.num_queries, rows, "cpu", lay.seq_key)
            wlo, whi = _cuda._tile_extents(lay, q0, q1)
            spans = (whi - wlo).clamp(min=0).tolist()
            assert max(spans, default=0) <= _cuda._window_span_bound(lay, rows), (trial, rows)
            for a, b in zip(q0.tolist(), q1.tolist()):
                lo, hi = int(lay.pool_lo[a:b].min()), int(lay.win_lo[a:b].max())
                for h in range(2):
                    r = rb[h, a:b]
                    if hi <= lo:
                        n = 0
                    elif (r < 0).any():
                        n = hi - lo
                    else:
                        n = int((ranks[h, lo:hi] >= r.min()).sum())
                    assert n <= topk + rows, (trial, rows, a, b, n)


def test_cuda_driver_partial_slots_index():
    """_cuda._partial_slots (bwd_reduce's index, int32 keys) against a direct construction:
    per (head, key), the flat slots of its list partials, then of its window partials, each
    in super-tile order (the order bwd_reduce sums them in)."""
    from xformers_sparsek import _cuda

    g = torch.Generator().manual_seed(0)
    S, NK, nsup, cap, list_slots, slots = 3, 50, 4, 7, 8, 20
    scounts = torch.randint(0, cap + 1, (S, nsup), generator=g, dtype=torch.int32)
    slists = torch.stack([torch.stack([torch.randperm(NK, generator=g)[:cap].sort().values
                                       for _ in range(nsup)]) for _ in range(S)]).int()
    wlo = torch.randint(0, NK - 12, (nsup,), generator=g)
    n_win = torch.randint(0, 12, (nsup,), generator=g)
    off, order = _cuda._partial_slots(slists, scounts, wlo, n_win, 13, S, NK, cap, slots,
                                      list_slots)
    for h in range(S):
        for j in range(NK):
            want = []
            for t in range(nsup):
                want += [t * slots + e for e in range(int(scounts[h, t]))
                         if int(slists[h, t, e]) == j]
            for t in range(nsup):
                if wlo[t] <= j < wlo[t] + n_win[t]:
                    want.append(t * slots + list_slots + j - int(wlo[t]))
            a, b = int(off[h * NK + j]), int(off[h * NK + j + 1])
            assert order[a:b].tolist() == want, (h, j)


def test_layout_nested_flag():
    """Local-attention masks slide the pool start: not nested, so the forward checks."""
    for bias in (xab.LowerTriangularFromBottomRightLocalAttentionMask(16),
                 xab.BlockDiagonalMask.from_seqlens([40, 60]).make_local_attention(8)):
        lay = _layout.build_layout(bias, 1, 100, 100, 0, CPU)
        assert not lay.nested
    assert _layout.build_layout(xab.LowerTriangularMask(), 2, 50, 50, 4, CPU).nested
