"""Driver of the CUDA kernels (csrc/): prepares their inputs and says when they apply.

Forward pipeline on the GPU:
  0. ``scores_f32``: the scores as float32 [S, NK], non-finite ones zeroed and flagged,
  1. selection tables (one float32 sort of the scores, ``sort_rows``; ``select_tables``: the
     breakpoints and their rank thresholds; ``wavelet_build``: a wavelet matrix over the ranks),
  2. ``select_queries``: per-query tau / top-k boundary / |F| (csrc/sparsek/select_kernels.cuh),
  3. ``build_lists``: per query tile, the pool keys any of its queries may select,
  4. ``fwd``: gathered-tile attention with gates (wgmma on sm_90a, mma.sync elsewhere).
Backward: the rank tables from the forward's selection outputs (``_with_ranks``), the key
lists of the dq tiles and dk/dv super-tiles, ``bwd`` (pass 1 dq, pass 2 per-super-tile
dk/dv partials), the ordered reduction ``bwd_reduce``, and the score gradient's
fractional-mean term on ``wavelet_range_sum``.  Host syncs: the forward waits for its
scores' finiteness flag only after its launches, and then only for the flag's copy (an event
behind ``scores_f32``); on layouts without nested pools (``QueryLayout.nested``) the forward
reads its lists' overflow flag after its launch, the backward its lists' overflow flags and
the window spans' max before its kernels.
The selection is computed on float32 scores (what the kernels compare against); its tables
(one float32 sort + ``select_tables``) are bitwise those of ``_selection.build_tables``.
"""

import functools
from typing import Optional, Tuple

import torch

from . import _ext
from ._layout import QueryLayout
from ._selection import Selection, _row_ranks, build_tables, score_gradient

SCORES_NOT_FINITE = "scores must be finite (found NaN or inf)"  # (the ValueError of both paths)
_TILE_ROWS = 128  # rows (query x packed head) of one forward CTA (FwdTraits::kBM)


def unsupported_reason(q, k, v, scores, layout: QueryLayout) -> Optional[str]:
    """Why the CUDA kernels can't run these inputs (None if they can)."""
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    why = _ext.cuda_unavailable_reason(q.device)
    if why is not None:
        return "CUDA kernels unavailable: " + why
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (kernels: float16, bfloat16)"
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv or D not in (64, 128):
        return f"head dims {D}/{Dv} (kernels: 64, 128 with K == Kv)"
    if max(layout.num_queries, layout.num_keys) * q.shape[1] >= 2**31 // 4:
        return "too many tokens for int32 indexing"
    return None


def _rows_per_kv(k, v, R: int) -> int:
    """How many query heads share one K/V load (packed into the CTA's rows)."""
    shared = R > 1 and k.stride(2) == 0 and v.stride(2) == 0
    if not shared:
        return 1
    rp = R
    while rp > 1 and (_TILE_ROWS % rp or R % rp):
        rp //= 2
    return rp


def _aligned(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1 or any(st % 8 for st in x.stride()[:-1]) or x.data_ptr() % 16:
        return x.contiguous()
    return x


def _reused(make, device, *args):
    """make(*args, str(device)) through its lru_cache: made once, then shared by every call
    (the kernels only read these tensors), saving launches and host time.  Not while a CUDA
    graph is being captured: tensors made then are only filled when the graph replays."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return make.__wrapped__(*args, str(device))
    return make(*args, str(device))


def _tiles(nq: int, queries_per_tile: int, device, seq_starts: Tuple[int, ...] = ()
           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last query of each tile (int32): runs of queries_per_tile from the
    start of each sequence (seq_starts: ascending first queries, QueryLayout.seq_key; () for
    one run over all nq), so no tile spans two sequences; once per (nq, tile size, sequence
    starts, device)."""
    return _reused(_tiles_made, device, nq, queries_per_tile, tuple(seq_starts))


@functools.lru_cache(maxsize=64)
def _tiles_made(nq: int, queries_per_tile: int, starts: Tuple[int, ...], device: str):
    edges = torch.tensor(sorted({0, nq} | {s for s in starts if 0 < s < nq}), dtype=torch.int64)
    lo, hi = edges[:-1], edges[1:]
    n = (hi - lo + queries_per_tile - 1) // queries_per_tile  # tiles per sequence
    seq = torch.repeat_interleave(torch.arange(lo.numel()), n)
    first = torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    q0 = lo[seq] + (torch.arange(seq.numel()) - first) * queries_per_tile
    q1 = torch.minimum(q0 + queries_per_tile, hi[seq])
    with torch.inference_mode(False):  # (usable outside inference mode later)
        return (q0.to(device=device, dtype=torch.int32).contiguous(),
                q1.to(device=device, dtype=torch.int32).contiguous())


def _empty(device) -> torch.Tensor:
    """A 0-element float32 tensor on `device` (the kernels' 'no such input'), once per device."""
    return _reused(_empty_made, device)


@functools.lru_cache(maxsize=16)
def _empty_made(device: str) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.empty(0, device=device)


class _KernelWavelet:
    """The wavelet tables of _wavelet.WaveletMatrix, built by the CUDA kernel (int32)."""

    def __init__(self, ranks, weights):
        C = _ext.load_extension()
        self.zeros, self.wsum, self.nzeros = C.wavelet_build(
            ranks.int().contiguous(), weights.contiguous()
        )


def _range_sum(ranks, weights, lo, hi, th_lo, th_hi) -> torch.Tensor:
    """_selection.fractional_mean_sum's wavelet matrix over the thresholds, built and
    queried by the CUDA kernels (a few launches instead of ~700 small PyTorch ops)."""
    C = _ext.load_extension()
    zeros, wsum, nzeros = C.wavelet_build(ranks.int().contiguous(), weights.contiguous())
    i32 = lambda t: t.int().contiguous()  # noqa: E731
    return C.wavelet_range_sum(zeros, wsum, nzeros, i32(lo), i32(hi), i32(th_lo), i32(th_hi))


# Below this many keys per head, select() builds its tables with _selection.build_tables
# (the sort of the 2 NK breakpoints is then PyTorch's in-register sort, whose order of equal
# values -0.0 / +0.0 the merge of select_tables need not reproduce; small anyway).
_TABLES_MIN_KEYS = 2049


def _sort_rows(u: torch.Tensor):
    """torch.sort(u, dim=1, stable=True) for float32 u [rows, n] (contiguous); on the GPU the
    extension's radix sort (csrc/sparsek/row_sort.cu: two launches, where torch's segmented
    sort takes ~13 and ~100 us of host time at 8 x 64K)."""
    if u.is_cuda:
        return _ext.load_extension().sort_rows(u)
    return torch.sort(u, dim=1, stable=True)


def _tables(u: torch.Tensor):
    """_selection.build_tables(u.double()) for float32 scores u [S, NK] (contiguous), as the
    kernels read them: (u64, sv, perm int32, ranks int32, cb, th_mid int32, th_mid1 int32).

    One stable sort of the float32 scores and one kernel (csrc/sparsek/select_tables.cu)
    instead of two float64 sorts and ~15 small launches, with the same bits: float -> double
    is exact and order-preserving, so the stable (score, index) sort of u gives the same
    permutation and (converted) values as the one of u.double(); the kernel merges the two
    sorted rows sv and sv - 1.0 in the order of the stable sort of their concatenation (what
    torch.sort does for 2 NK > 4096: cub's stable radix sort) and counts th_mid / th_mid1 as
    torch.searchsorted(right=True) does.
    """
    C = _ext.load_extension()
    sv32, perm = _sort_rows(u)
    return C.select_tables(u, sv32, perm)


def select(scores: torch.Tensor, layout: QueryLayout, topk: int) -> Selection:
    C = _ext.load_extension()
    u = scores.float().contiguous()
    S, NK = u.shape
    if NK < _TABLES_MIN_KEYS or S == 0:
        u64 = u.to(torch.float64)
        tb = build_tables(u64, make_wavelet=_KernelWavelet)
        zeros, wsum, nzeros = tb.wm.zeros, tb.wm.wsum, tb.wm.nzeros
        sv, cb, th_mid, th_mid1 = tb.sv, tb.cb, tb.th_mid.int(), tb.th_mid1.int()
        perm, ranks = tb.perm.int(), tb.ranks.int()
    else:
        u64, sv, perm, ranks, cb, th_mid, th_mid1 = _tables(u)
        zeros, wsum, nzeros = C.wavelet_build(ranks, u64)
    tau, ub, jb, nF, rb = C.select_queries(
        zeros, wsum, nzeros, cb, th_mid, th_mid1, sv, perm,
        layout.pool_lo.contiguous(), layout.win_lo.contiguous(), int(topk),
    )
    return Selection(tau, ub, jb, nF, rb, key_of_rank=perm, rank_of_key=ranks)


def _with_ranks(scores: torch.Tensor, sel: Selection) -> Selection:
    """The forward's selection (tau, ub, jb, nF) plus the rank tables the backward kernels
    read, from one sort of the scores (the same (score, index) order select() uses) instead
    of a second selection: the boundary's rank is the rank of its key jb, -1 where the whole
    pool is selected (ub = -inf there, a finite score otherwise)."""
    # (float32 keys: the same (score, index) order as their exact float64 values)
    _, perm, ranks = _row_ranks(scores.float().contiguous(), sort=_sort_rows)
    rb = torch.where(torch.isneginf(sel.ub), -1, ranks.gather(1, sel.jb.clamp(min=0)))
    return Selection(sel.tau, sel.ub, sel.jb, sel.nF, rb, key_of_rank=perm.int().contiguous(),
                     rank_of_key=ranks.int().contiguous())


def forward(q, k, v, scores, layout: QueryLayout, topk: Optional[int], scale: float):
    """CUDA forward; returns (out [NQ,S,R,D], lse [S,R,NQ] float32, selection or None).

    Returns None if a tile's key list would overflow its topk + tile capacity (nested pools
    never do; sliding local-attention pools, and tiles whose queries span several sequences,
    can: a tile lists the keys of [min pool_lo, max win_lo) at or above its lowest boundary
    rank, lists.cu); the caller then uses the PyTorch path.  Only layouts without nested
    pools read the overflow flag (a host sync, after the launch).
    """
    C = _ext.load_extension()
    NQ, S, R, D = q.shape
    rp = _rows_per_kv(k, v, R)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    if rp > 1 and (k.stride(2) != 0 or v.stride(2) != 0):
        rp = 1  # _aligned materialised the expansion
    tile_q0, tile_q1 = _tiles(NQ, _TILE_ROWS // rp, q.device, layout.seq_key)
    sel = None
    if scores is not None:
        # what the selection and the kernels compare: float32, non-finite scores zeroed and
        # flagged; the flag is copied to pinned host memory right behind that kernel and read
        # after the launches below, by then long copied: the host neither waits for the GPU
        # nor leaves it idle (a sync before the launches idled it through this function; one
        # after them would idle it through the backward's host work)
        u, bad = C.scores_f32(scores)
        bad_host = bad.to("cpu", non_blocking=True)
        bad_copied = torch.cuda.Event()
        bad_copied.record(torch.cuda.current_stream(u.device))
        sel = select(u, layout, topk)
        cap = int(topk) + _TILE_ROWS // rp
        lists, counts, overflow = C.build_lists(
            sel.key_of_rank, sel.rank_of_key, sel.rb, layout.pool_lo, layout.win_lo, tile_q0,
            tile_q1, layout.num_keys, cap,
        )
        # (counts are capped at cap, so an overflowing tile's truncated list is safe to run)
        out, lse = C.fwd(
            q, k, v, u, sel.tau, sel.rb, sel.rank_of_key, layout.pool_lo, layout.win_lo,
            layout.win_hi, tile_q0, tile_q1, lists, counts, rp, scale,
        )
        bad_copied.synchronize()
        if int(bad_host):
            raise ValueError(SCORES_NOT_FINITE)
        # (read after the launch: the GPU does not idle through the host's round trip)
        if not layout.nested and int(overflow.item()):
            return None
    else:
        empty = _empty(q.device)
        out, lse = C.fwd(
            q, k, v, None, empty, empty, empty, layout.pool_lo, layout.win_lo, layout.win_hi,
            tile_q0, tile_q1, empty, empty, rp, scale,
        )
    return out, lse, sel


# rows per dq tile: BwdDqTraits::kBM (mma.sync), BwdDqSm90Traits::kBM (Hopper: the forward's tiles)
_BWD_DQ_ROWS = 64
_BWD_DQ_ROWS_HOPPER = 128
# rows per dk/dv super-tile: (2048 / RP) queries x RP heads (BwdDkvSm90Traits::kMaxChunks
# x 64 at most).  2048 against 1024: half the partial dk/dv slots to write and reduce (64K
# forward + backward 54.3 -> 53.0 ms on the H200, session 10).
_BWD_SUPER_ROWS = 2048


def _pad64(n: int) -> int:
    return (n + 63) // 64 * 64


def _tile_extents(layout: QueryLayout, q0: torch.Tensor, q1: torch.Tensor):
    """min win_lo and max win_hi over each tile's queries (as the kernels compute them); the
    tiles cover the queries in order (_tiles), so a query's tile is a repeat_interleave."""
    nq = layout.num_queries
    dev = layout.win_lo.device
    tile = torch.repeat_interleave(torch.arange(q0.numel(), device=dev), (q1 - q0).long(),
                                   output_size=nq)  # (output_size: no host sync)
    wlo = torch.full((q0.numel(),), 2**62, dtype=torch.int64, device=dev)
    whi = torch.full((q0.numel(),), -1, dtype=torch.int64, device=dev)
    return (wlo.scatter_reduce_(0, tile, layout.win_lo, "amin"),
            whi.scatter_reduce_(0, tile, layout.win_hi, "amax"))


def _partial_slots(slists, scounts, wlo_min, n_win, win_max: int, S: int, NK: int,
                   cap_s: int, slots: int, list_slots: int):
    """Where each key's dk/dv partials are (bwd_reduce's input): for key j of head h, the flat
    slots (super-tile t * slots + position) slot_order[off[h * NK + j] : off[h * NK + j + 1]]:
    its list slots, then its window slots, each in super-tile order (the order bwd_reduce
    sums them in: fixed, so the sums are deterministic).  Every list slot and every one of a
    super-tile's win_max (>= n_win) window slots takes part (unused ones under the key
    S * NK, sorted past the real keys), so no nonzero() and no bincount() (each a host
    sync).  Keys are int32 (unsupported_reason keeps S * NK under 2^29): half the radix
    passes of int64 in the sort."""
    dev = slists.device
    nsup = scounts.shape[1]
    valid = torch.arange(cap_s, device=dev) < scounts.unsqueeze(-1)  # [S, nsup, cap]
    head = torch.arange(S, device=dev, dtype=torch.int32).view(S, 1, 1)
    keys = [torch.where(valid, slists + head * NK, S * NK).view(-1)]
    flats = [(torch.arange(nsup, device=dev).view(1, nsup, 1) * slots
              + torch.arange(cap_s, device=dev)).expand(S, nsup, cap_s).reshape(-1)]
    i_win = torch.arange(win_max, device=dev)
    in_win = i_win < n_win.view(nsup, 1)  # [nsup, win_max]
    key_win = wlo_min.view(nsup, 1) + i_win
    flat_win = (torch.arange(nsup, device=dev).view(nsup, 1) * slots + list_slots + i_win)
    for h in range(S):
        keys.append(torch.where(in_win, key_win + h * NK, S * NK).int().view(-1))
        flats.append(flat_win.view(-1))
    keys, flats = torch.cat(keys), torch.cat(flats)
    keys_sorted, order = torch.sort(keys, stable=True)
    off = torch.searchsorted(keys_sorted, torch.arange(S * NK + 1, device=dev, dtype=torch.int32))
    return off, flats[order].contiguous()


def _window_span_bound(layout: QueryLayout, queries: int) -> int:
    """An upper bound of max win_hi - min win_lo over a tile of `queries` consecutive queries
    of one sequence on a nested layout: without a causal mask every window is the same
    empty interval; with one a query's window has at most `window` keys and both its ends
    advance by at most one key per query (the tile's span covers its diagonal even when
    window = 0)."""
    if not layout.causal or queries <= 0:
        return 0
    return min(layout.window + queries - 1, layout.num_keys)


def backward(dout, q, k, v, scores, out, lse, layout: QueryLayout, topk, scale, sel):
    """CUDA backward (sparse mode): (dq, dk, dv, dscores float64) or None when the inputs
    need the PyTorch path (exact mode, or no forward statistics to reuse)."""
    if scores is None or lse is None or out is None or lse.dtype != torch.float32:
        return None
    C = _ext.load_extension()
    NQ, S, R, D = q.shape
    NK = k.shape[0]
    rp = _rows_per_kv(k, v, R)
    q, k, v, dout = _aligned(q), _aligned(k), _aligned(v), _aligned(dout.to(q.dtype))
    if rp > 1 and (k.stride(2) != 0 or v.stride(2) != 0):
        rp = 1
    u = scores.float().contiguous()  # (converted once: select / _with_ranks take it as is)
    if sel is None:
        sel = select(u, layout, topk)
    elif sel.rank_of_key is None:
        sel = _with_ranks(u, sel)
    delta = C.bwd_delta(dout, _aligned(out))  # [S, R, NQ] fp32 rowsum(dout * out)
    lse = lse.contiguous()
    # pass 1 tiling and pass 2 super-tiles, each with its key lists
    hopper = bool(C.hopper_backward())
    dq_rows = _BWD_DQ_ROWS_HOPPER if hopper else _BWD_DQ_ROWS
    t0, t1 = _tiles(NQ, dq_rows // rp, q.device, layout.seq_key)
    lists, counts, ovf1 = C.build_lists(sel.key_of_rank, sel.rank_of_key, sel.rb,
                                        layout.pool_lo, layout.win_lo, t0, t1, NK,
                                        int(topk) + dq_rows // rp)
    rp_kv = rp  # heads packed per dk/dv group (they share K/V, so their sums combine)
    qs = _BWD_SUPER_ROWS // rp_kv
    s0, s1 = _tiles(NQ, qs, q.device, layout.seq_key)
    cap_s = int(topk) + qs
    slists, scounts, ovf2 = C.build_lists(sel.key_of_rank, sel.rank_of_key, sel.rb,
                                          layout.pool_lo, layout.win_lo, s0, s1, NK, cap_s)
    wlo_min, whi_max = _tile_extents(layout, s0, s1)
    n_win = torch.clamp(whi_max - wlo_min, min=0)
    if layout.nested:  # no list overflows (as in forward) and a bound of the window spans
        win_max = _window_span_bound(layout, qs)
    else:  # the one host sync of the backward: overflow flags and the window spans' max
        zero = torch.zeros(1, dtype=torch.int64, device=q.device)
        ovf, win_max = torch.cat([
            (ovf1.sum() + ovf2.sum()).view(1).long(),
            n_win.max().view(1) if n_win.numel() else zero]).tolist()
        if ovf:
            return None
    list_slots = _pad64(cap_s)
    slots = list_slots + _pad64(win_max)
    dq, grow, part_kv, part_u = C.bwd(
        dout, q, k, v, u, sel.tau, sel.rb, sel.rank_of_key, layout.pool_lo, layout.win_lo,
        layout.win_hi, lse, delta, t0, t1, lists, counts, s0, s1, slists, scounts, rp, rp_kv,
        scale, slots, list_slots, hopper,
    )
    off, slot_order = _partial_slots(slists, scounts, wlo_min, n_win, int(win_max), S, NK,
                                     cap_s, slots, list_slots)
    rg = R // rp_kv
    # Group (s, rgroup) holds the gradient of the K/V its rp heads share: bwd_reduce puts it
    # on the group's first head and zeros on the others (autograd of the stride-0 expansion
    # sums over the heads).
    dk = torch.empty(NK, S, R, D, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    du_g = C.bwd_reduce(part_kv, part_u, off, slot_order, rg, rp_kv, dk, dv)
    du_direct = du_g.view(S, rg, NK).sum(1)
    g_row = grow.view(S, R, NQ).sum(1)
    dscores = score_gradient(scores, layout, sel, du_direct, g_row, range_sum=_range_sum)
    return dq, dk, dv, dscores
