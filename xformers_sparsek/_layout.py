"""Base attention biases -> per-query key intervals.

Every base mask we support gives each query a *contiguous* range of allowed keys.  We
flatten the batch (and the blocks of block-diagonal masks) into one query axis of length
``NQ`` and one key axis of length ``NK``, and describe query ``i`` by three absolute key
indices::

    pool_lo[i] <= win_lo[i] <= win_hi[i]
    pool  P_i = [pool_lo, win_lo)      (SparseK chooses among these)
    window W_i = [win_lo, win_hi)      (always attended, gate 1)

Everything downstream (selection, attention, CUDA kernels) only sees these intervals, so a
new mask type only needs a new entry here.  Within one sequence both ends of both intervals
are non-decreasing in the query index; the backward pass relies on that.
"""

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from xformers.ops.fmha import attn_bias as xab

# bias type -> (causal, from_bottom_right, has_local_window)
_BIAS_KINDS = {
    type(None): (False, False, False),
    xab.LowerTriangularMask: (True, False, False),
    xab.LowerTriangularFromBottomRightMask: (True, True, False),
    xab.LowerTriangularFromBottomRightLocalAttentionMask: (True, True, True),
    xab.BlockDiagonalMask: (False, False, False),
    xab.BlockDiagonalCausalMask: (True, False, False),
    xab.BlockDiagonalCausalFromBottomRightMask: (True, True, False),
    xab.BlockDiagonalCausalLocalAttentionMask: (True, False, True),
    xab.BlockDiagonalCausalLocalAttentionFromBottomRightMask: (True, True, True),
    xab.BlockDiagonalCausalWithOffsetPaddedKeysMask: (True, True, False),
    xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask: (True, True, True),
    # internal only (not in SUPPORTED_BASE_BIASES): the non-paged form of the paged mask below
    xab.BlockDiagonalPaddedKeysMask: (False, False, False),
    # paged K/V: gathered into their non-paged counterpart by _paged.unpage (make_problem)
    xab.PagedBlockDiagonalPaddedKeysMask: (False, False, False),
    xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask: (True, True, False),
}

SUPPORTED_BASE_BIASES: Tuple[type, ...] = tuple(
    t for t in _BIAS_KINDS if t is not xab.BlockDiagonalPaddedKeysMask
)
_VARLEN = (xab.BlockDiagonalMask, xab.BlockDiagonalPaddedKeysMask)


def is_causal(base) -> bool:
    return _BIAS_KINDS[type(base)][0]


def is_varlen(base) -> bool:
    return isinstance(base, _VARLEN)


@dataclass
class Segment:
    """One sequence: queries [q_start, q_start+q_len), keys [k_start, k_start+k_len)."""

    q_start: int
    q_len: int
    k_start: int
    k_len: int


@dataclass
class QueryLayout:
    pool_lo: torch.Tensor  # int64 [NQ], absolute key index
    win_lo: torch.Tensor  # int64 [NQ]
    win_hi: torch.Tensor  # int64 [NQ]
    num_queries: int
    num_keys: int
    segments: List[Segment]
    causal: bool
    window: int
    # first query of each sequence (CPU int64, ascending): the kernels' query tiles never
    # span two sequences (a tile's key list holds up to topk + rows keys only on nested pools
    # of one sequence).  None: unknown, uniform tiles.
    seq_starts: Optional[torch.Tensor] = None
    # True when every query of a sequence has the same pool start (no local-attention
    # window) and seq_starts is known: a query tile then lists at most topk + rows keys
    # (lists.cu), so the CUDA forward skips its overflow check, a host sync.
    nested: bool = False

    @functools.cached_property
    def seq_key(self) -> Tuple[int, ...]:
        """seq_starts as a tuple (the kernels' tile cache key; () when unknown), computed once
        per layout: build_layout's layouts are cached, so a call pays nothing for it."""
        return () if self.seq_starts is None else tuple(self.seq_starts.tolist())

    @property
    def pool_size(self) -> torch.Tensor:
        return self.win_lo - self.pool_lo

    def key_query_ranges(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """For every key j, the query range [first, last) whose *pool* contains j.

        Valid because pool_lo and win_lo are non-decreasing within a segment and segments
        are laid out in increasing key order (so they are non-decreasing globally too).
        """
        keys = torch.arange(self.num_keys, device=self.pool_lo.device)
        first = torch.searchsorted(self.win_lo, keys, right=True)
        last = torch.searchsorted(self.pool_lo, keys, right=True)
        return first, torch.maximum(first, last)


def segments_of(base, batch: int, mq: int, mk: int) -> List[Segment]:
    """The sequences of a (possibly block-diagonal) bias on flattened [B*M] axes."""
    if isinstance(base, xab.BlockDiagonalPaddedKeysMask):
        qs = base.q_seqinfo.seqstart_py
        ks = base.k_seqinfo.seqstart_py
        kl = base.k_seqinfo.seqlen_py
        return [
            Segment(qs[s], qs[s + 1] - qs[s], ks[s], int(kl[s])) for s in range(len(kl))
        ]
    if isinstance(base, xab.BlockDiagonalMask):
        qs = base.q_seqinfo.seqstart_py
        ks = base.k_seqinfo.seqstart_py
        return [
            Segment(qs[s], qs[s + 1] - qs[s], ks[s], ks[s + 1] - ks[s])
            for s in range(len(qs) - 1)
        ]
    return [Segment(b * mq, mq, b * mk, mk) for b in range(batch)]


# Layouts of recent calls, keyed by what determines them.  A layout is built on the CPU
# and copied to the device, and a pageable host-to-device copy waits for the stream: a miss
# per call would stall the GPU once per call.  Layouts are never modified after creation,
# so calls share them.  They are built outside inference mode: a layout first built under
# torch.inference_mode() must still serve a later call that autograd records.
_LAYOUT_CACHE: "OrderedDict[tuple, QueryLayout]" = OrderedDict()
_LAYOUT_CACHE_SIZE = 64


def build_layout(
    base, batch: int, mq: int, mk: int, window: int, device: torch.device
) -> QueryLayout:
    """Per-query pool/window intervals for `base` (a supported xFormers bias or None).

    `window` is the SparseK sliding window (0 = none); it is only meaningful on causal bases
    (the caller validates that).  Results are cached (see _LAYOUT_CACHE).
    """
    causal, bottom_right, local = _BIAS_KINDS[type(base)]
    local_window: Optional[int] = base._window_size if local else None
    varlen = isinstance(base, _VARLEN)
    # Without a block-diagonal bias the sequences follow from (batch, mq, mk): the segment
    # list is only built on a miss (its B objects are most of a hit's host time otherwise).
    segments = segments_of(base, batch, mq, mk) if varlen else None
    shape = (tuple((g.q_start, g.q_len, g.k_start, g.k_len) for g in segments) if varlen
             else (batch, mq, mk))
    key = (causal, bottom_right, local_window, window, varlen, batch * mq, batch * mk,
           torch.device(device), shape)
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        if segments is None:
            segments = segments_of(base, batch, mq, mk)
        with torch.inference_mode(False):
            layout = _build_layout(causal, bottom_right, local_window, segments, batch * mq,
                                   batch * mk, window, device)
        _LAYOUT_CACHE[key] = layout
        if len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
            _LAYOUT_CACHE.popitem(last=False)
    else:
        _LAYOUT_CACHE.move_to_end(key)
    return layout


def _build_layout(causal, bottom_right, local_window, segments, nq, nk, window,
                  device) -> QueryLayout:
    # Vectorised over all queries: each query's segment, position in it, and key extent.
    seg = torch.tensor(
        [[g.q_start, g.q_len, g.k_start, g.k_len] for g in segments], dtype=torch.int64
    ).reshape(-1, 4)
    q_start, q_len, k_start, k_len = seg.unbind(1)
    which = torch.repeat_interleave(torch.arange(len(segments)), q_len)
    r = torch.arange(which.numel()) - q_start[which]
    ks, kl = k_start[which], k_len[which]
    if not causal:
        lo = torch.zeros_like(r)
        hi = kl
        wlo = hi
    else:
        pos = r + (kl - q_len[which] if bottom_right else 0)
        hi = torch.minimum((pos + 1).clamp(min=0), kl)
        lo = torch.zeros_like(r)
        if local_window is not None:
            lo = torch.minimum((pos - local_window + 1).clamp(min=0), kl)
        lo = torch.minimum(lo, hi)
        # window = keys with pos - j < window, i.e. j >= pos - window + 1
        wlo = torch.maximum(torch.minimum(pos - window + 1, hi), lo)
    pool_lo = torch.zeros(nq, dtype=torch.int64)
    win_lo = torch.zeros(nq, dtype=torch.int64)
    win_hi = torch.zeros(nq, dtype=torch.int64)
    qi = q_start[which] + r
    pool_lo[qi] = ks + lo
    win_lo[qi] = ks + wlo
    win_hi[qi] = ks + hi
    starts = torch.unique(torch.cat([torch.zeros(1, dtype=torch.int64), q_start[q_len > 0]]))
    return QueryLayout(
        pool_lo.to(device),
        win_lo.to(device),
        win_hi.to(device),
        nq,
        nk,
        segments,
        causal,
        window,
        starts[starts < max(nq, 1)],
        local_window is None,
    )
