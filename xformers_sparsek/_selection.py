"""The SparseK selection stage: exact threshold and top-k boundary for every query.

For query i with pool P_i (a key interval, see ``_layout``) and scores u, SparseK needs

  * tau_i: the solution of  sum_{j in P_i} clip(u_j - tau, 0, 1) = topk   (capped simplex),
  * the top-k boundary (ub_i, jb_i): the topk-th largest pool key by (score, index);
    key j is selected iff (u_j, j) >= (ub_i, jb_i),
  * nF_i = |{j in P_i : 0 < u_j - tau_i < 1}| (the keys whose gate moves with the scores).

Queries whose pool has at most topk keys select all of it with gate 1; they get
tau = ub = -inf, nF = 0, so one formula serves everyone downstream:
``selected = (u > ub) | (u == ub & j >= jb)``, ``gate = clip(u - tau, 0, 1)``.

Algorithm (exact, sub-quadratic, no queries x keys matrix): f_i(t) = sum clip(u - t, 0, 1)
is continuous, non-increasing and linear between the breakpoints {u_j} U {u_j - 1}.  With a
wavelet matrix over the score ranks, f_i at any breakpoint costs O(log N) (counts and sums
of pool scores below a rank threshold), so a binary search over the sorted breakpoints finds
the linear piece holding tau_i, and tau_i follows in closed form from that piece's counts.
The top-k boundary is a range k-th-smallest query on the same structure.
Cost: O((N + Q) log^2 N) time, O(N log N) memory.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ._layout import QueryLayout
from ._wavelet import WaveletMatrix

NEG_INF = float("-inf")


@dataclass
class Selection:
    tau: torch.Tensor  # float64 [S, NQ]; -inf where the whole pool is selected
    ub: torch.Tensor  # float64 [S, NQ]; boundary score (-inf: all pool keys selected)
    jb: torch.Tensor  # int64 [S, NQ]; boundary key index (absolute key index)
    nF: torch.Tensor  # int64 [S, NQ]; number of fractional pool keys
    rb: Optional[torch.Tensor] = None  # int64 [S, NQ]; rank of the boundary in its head (-1: all)
    # CUDA path only (int32, for the kernels): rank -> key and key -> rank, per head [S, NK]
    key_of_rank: Optional[torch.Tensor] = None
    rank_of_key: Optional[torch.Tensor] = None


@dataclass
class Tables:
    """What the per-query search needs; built once per call (O(N log N))."""

    sv: torch.Tensor  # float64 [S, NK] sorted scores per head
    perm: torch.Tensor  # int64 [S, NK] key index of each sorted position (rank -> key)
    ranks: torch.Tensor  # int64 [S, NK] rank of each key (key -> rank)
    wm: WaveletMatrix  # one per head over the key ranks, weights = scores
    cb: torch.Tensor  # float64 [S, 2NK] sorted breakpoints {u} U {u - 1}
    th_mid: torch.Tensor  # int64 [S, 2NK - 1] rank threshold of "u <= piece midpoint"
    th_mid1: torch.Tensor  # int64 [S, 2NK - 1] ... of "u <= midpoint + 1"


def _row_ranks(values: torch.Tensor, sort=None):
    """Sort each row; return (sorted values, perm, ranks), all [S, N].

    Ranks order a row's elements by (value, index): ties in value go to the larger index,
    which is what makes 'k-th largest by (u, j)' a rank query.  ``sort(values)`` replaces
    ``torch.sort(values, dim=1, stable=True)`` (the CUDA path passes its radix sort).
    """
    sv, perm = sort(values) if sort is not None else torch.sort(values, dim=1, stable=True)
    ranks = torch.empty_like(perm).scatter_(
        1, perm, torch.arange(values.shape[1], device=values.device).expand_as(perm)
    )
    return sv, perm, ranks


def build_tables(u: torch.Tensor, make_wavelet=WaveletMatrix) -> Tables:
    """u: float64 [S, NK] (contiguous).  make_wavelet(ranks, weights) builds the per-head
    wavelet matrices (the CUDA path passes its kernel-built version)."""
    sv, perm, ranks = _row_ranks(u)
    wm = make_wavelet(ranks, u)
    # Piece m is [cb[m], cb[m+1]].  Inside a piece the saturated set (u >= t + 1) and the
    # fractional set F (t < u < t + 1) are constant, so we read them at its midpoint.
    cb = torch.sort(torch.cat([sv, sv - 1.0], dim=1), dim=1).values
    mid = 0.5 * (cb[:, :-1] + cb[:, 1:])
    th_mid = torch.searchsorted(sv, mid, right=True)
    th_mid1 = torch.searchsorted(sv, mid + 1.0, right=True)
    return Tables(sv, perm, ranks, wm, cb, th_mid, th_mid1)


def select(scores: torch.Tensor, layout: QueryLayout, topk: int) -> Selection:
    """scores: [S, NK] (any float dtype, finite). Returns the Selection for all S x NQ."""
    S, NK = scores.shape
    NQ = layout.num_queries
    dev = scores.device
    u = scores.to(torch.float64).contiguous()
    n_pool = layout.pool_size  # [NQ]

    tau = torch.full((S, NQ), NEG_INF, dtype=torch.float64, device=dev)
    ub = torch.full((S, NQ), NEG_INF, dtype=torch.float64, device=dev)
    jb = torch.zeros((S, NQ), dtype=torch.int64, device=dev)
    nF = torch.zeros((S, NQ), dtype=torch.int64, device=dev)
    rb = torch.full((S, NQ), -1, dtype=torch.int64, device=dev)
    sparse_q = torch.nonzero(n_pool > topk).squeeze(1)
    if sparse_q.numel() == 0 or NK == 0:
        return Selection(tau, ub, jb, nF, rb)

    tb = build_tables(u)
    sv, perm, wm, cb = tb.sv, tb.perm, tb.wm, tb.cb
    th_mid, th_mid1 = tb.th_mid.reshape(-1), tb.th_mid1.reshape(-1)
    flat_cb = cb.reshape(-1)
    npieces = cb.shape[1] - 1

    # Work on the flattened (head, query) pairs that need a projection.
    nq_sel = sparse_q.numel()
    head = torch.arange(S, device=dev).repeat_interleave(nq_sel)
    qidx = sparse_q.repeat(S)
    lo = layout.pool_lo[qidx]
    hi = layout.win_lo[qidx]
    n = (hi - lo).to(torch.float64)
    k = float(topk)

    def piece(m):
        """Saturated count a, |F|, sum_F u and f at the piece's right end."""
        g = head * npieces + m
        c0, s0 = wm.count_sum_below(head, lo, hi, th_mid[g])
        c1, s1 = wm.count_sum_below(head, lo, hi, th_mid1[g])
        a, nf = n - c1, c1 - c0
        # sum_F u as a difference of two traversals; exactly 0 when F is empty, so that a
        # flat piece reads f == k exactly (rounding would otherwise skip it)
        sf = torch.where(nf == 0, 0.0, s1 - s0)
        right = flat_cb[head * (npieces + 1) + m + 1]
        return a, nf, sf, a + sf - nf.to(torch.float64) * right

    # f is non-increasing: find the first piece whose right end has f <= k (the last piece
    # ends at max(u), where f = 0).  Its left end has f >= k, so tau lies in it.
    p_lo = torch.full_like(lo, -1)  # f(right end) > k  (virtual piece -1)
    p_hi = torch.full_like(lo, npieces - 1)  # f(right end) <= k
    for _ in range((npieces + 1).bit_length()):
        active = (p_hi - p_lo) > 1
        m = torch.where(active, (p_lo + p_hi) // 2, p_hi)
        ok = piece(m)[3] <= k
        p_hi = torch.where(active & ok, m, p_hi)
        p_lo = torch.where(active & ~ok, m, p_lo)
    a, nf, sf, _ = piece(p_hi)
    left = flat_cb[head * (npieces + 1) + p_hi]
    right = flat_cb[head * (npieces + 1) + p_hi + 1]
    # tau lies in (left, right]: a + sum_F u - |F| tau = k there.
    tau_sel = torch.minimum(torch.maximum((a + sf - k) / nf.clamp(min=1).double(), left), right)
    # f == k on a whole interval iff the k-th largest pool score is at least 1 above the
    # (k+1)-th: then the top k are saturated and the rest zero for every t in
    # [u_(k+1), u_(k) - 1].  tau is not unique there (the gates are the same for any
    # choice); we take the interval's midpoint, which keeps every key off the gate's kinks.
    kk = (hi - lo) - topk
    rb_sel = wm.kth_smallest(head, lo, hi, kk)  # the top-k boundary: (n-k)-th smallest
    u_k = sv[head, rb_sel]
    u_k1 = sv[head, wm.kth_smallest(head, lo, hi, kk - 1)]
    flat = u_k - 1.0 >= u_k1
    tau_sel = torch.where(flat, 0.5 * (u_k1 + u_k - 1.0), tau_sel)
    # |F|: pool keys with tau < u < tau + 1, counted at tau itself so that the backward's
    # sums over F (which test 0 < gate < 1) use the same set even at a kink.
    r_le = torch.searchsorted(sv, tau_sel.view(S, nq_sel), right=True).reshape(-1)
    r_lt1 = torch.searchsorted(sv, (tau_sel + 1.0).view(S, nq_sel), right=False).reshape(-1)
    nF_sel = (
        wm.count_sum_below(head, lo, hi, r_lt1)[0] - wm.count_sum_below(head, lo, hi, r_le)[0]
    )

    ub_sel = u_k
    jb_sel = perm[head, rb_sel]

    tau[head, qidx] = tau_sel
    ub[head, qidx] = ub_sel
    jb[head, qidx] = jb_sel
    nF[head, qidx] = nF_sel
    rb[head, qidx] = rb_sel
    return Selection(tau, ub, jb, nF, rb)


def fractional_mean_sum(
    scores: torch.Tensor, layout: QueryLayout, sel: Selection, mean: torch.Tensor,
    range_sum=None,
) -> torch.Tensor:
    """For every key j: sum of mean[i] over the queries i with j in F_i.

    F_i = {j in P_i : tau_i < u_j < tau_i + 1}.  The queries whose pool holds j are a
    contiguous range (``layout.key_query_ranges``); within it we need the mean-weighted
    count of thresholds in (u_j - 1, u_j): a wavelet matrix over the thresholds answers
    that for all keys at once.  scores: [S, NK]; mean: float64 [S, NQ] -> float64 [S, NK].
    ``range_sum(ranks, weights, lo, hi, th_lo, th_hi)`` (the CUDA path's kernels) builds
    and queries the matrix in place of the PyTorch ``WaveletMatrix``.
    """
    S, NK = scores.shape
    NQ = layout.num_queries
    dev = scores.device
    if NQ == 0 or NK == 0:
        return torch.zeros((S, NK), dtype=torch.float64, device=dev)
    st, _, ranks = _row_ranks(sel.tau.contiguous())
    first, last = layout.key_query_ranges()
    u = scores.to(torch.float64).contiguous()
    th_lt_u = torch.searchsorted(st, u, right=False)      # ranks of thresholds < u_j
    th_le_u1 = torch.searchsorted(st, u - 1.0, right=True)  # ... <= u_j - 1
    if range_sum is not None:
        return range_sum(ranks, mean.to(torch.float64), first, last, th_le_u1, th_lt_u)
    wm = WaveletMatrix(ranks, mean.to(torch.float64))
    row = torch.arange(S, device=dev).repeat_interleave(NK)
    lo, hi = first.repeat(S), last.repeat(S)
    w_hi = wm.count_sum_below(row, lo, hi, th_lt_u.reshape(-1))[1]
    w_lo = wm.count_sum_below(row, lo, hi, th_le_u1.reshape(-1))[1]
    return (w_hi - w_lo).reshape(S, NK)


def score_gradient(scores, layout: QueryLayout, sel: Selection, du_direct, g_row,
                   range_sum=None):
    """d(scores) [S, NK] float64 from the attention backward's two sums.

    du_direct[s, j] = sum_i [j in F_i] g_ij and g_row[s, i] = sum_{l in F_i} g_il, where
    g_ij = dL/dm_ij (DESIGN.md section 1): du_j = du_direct_j - sum_{i: j in F_i} g_row_i / |F_i|.
    range_sum: see ``fractional_mean_sum``.
    """
    nF = sel.nF.to(torch.float64)
    mean = torch.where(sel.nF > 0, g_row.to(torch.float64) / nF.clamp(min=1.0), 0.0)
    return du_direct.to(torch.float64) - fractional_mean_sum(scores, layout, sel, mean,
                                                             range_sum)
