"""Driver of the CUDA kernels (csrc/): prepares their inputs and says when they apply.

Forward pipeline on the GPU:
  1. selection tables (sorted scores, wavelet matrix, breakpoints) in PyTorch,
  2. ``_C.select``: per-query tau / top-k boundary / |F| (one thread per query),
  3. ``_C.build_lists``: per query tile, the pool keys any of its queries may select,
  4. ``_C.fwd``: gathered-tile attention with gates (mma.sync, online softmax).
The selection is computed on float32 scores (what the kernels compare against).
"""

from typing import Optional, Tuple

import torch

from . import _ext
from ._layout import QueryLayout
from ._selection import Selection, build_tables

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


def _tiles(nq: int, queries_per_tile: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    q0 = torch.arange(0, nq, queries_per_tile, device=device, dtype=torch.int32)
    q1 = torch.clamp(q0 + queries_per_tile, max=nq)
    return q0.contiguous(), q1.contiguous()


class _KernelWavelet:
    """The wavelet tables of _wavelet.WaveletMatrix, built by the CUDA kernel (int32)."""

    def __init__(self, ranks, weights):
        C = _ext.load_extension()
        self.zeros, self.wsum, self.nzeros = C.wavelet_build(
            ranks.int().contiguous(), weights.contiguous()
        )


def select(scores: torch.Tensor, layout: QueryLayout, topk: int) -> Selection:
    C = _ext.load_extension()
    u = scores.float().to(torch.float64).contiguous()
    tb = build_tables(u, make_wavelet=_KernelWavelet)
    wm = tb.wm
    tau, ub, jb, nF, rb = C.select_queries(
        wm.zeros, wm.wsum, wm.nzeros,
        tb.cb.contiguous(), tb.th_mid.int().contiguous(), tb.th_mid1.int().contiguous(),
        tb.sv.contiguous(), tb.perm.int().contiguous(),
        layout.pool_lo.contiguous(), layout.win_lo.contiguous(), int(topk),
    )
    sel = Selection(tau, ub, jb, nF, rb)
    sel.perm32 = tb.perm.int().contiguous()  # rank -> key, for the key lists
    sel.ranks32 = tb.ranks.int().contiguous()  # key -> rank, for the attention masks
    return sel


def forward(q, k, v, scores, layout: QueryLayout, topk: Optional[int], scale: float):
    """CUDA forward; returns (out [NQ,S,R,D], lse [S,R,NQ] float32, selection or None).

    Returns None if a tile's key list would overflow its topk + tile capacity, which only
    sliding (local-attention) pools can do; the caller then uses the PyTorch path.
    """
    C = _ext.load_extension()
    NQ, S, R, D = q.shape
    rp = _rows_per_kv(k, v, R)
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    if rp > 1 and (k.stride(2) != 0 or v.stride(2) != 0):
        rp = 1  # _aligned materialised the expansion
    tile_q0, tile_q1 = _tiles(NQ, _TILE_ROWS // rp, q.device)
    sel = None
    if scores is not None:
        sel = select(scores, layout, topk)
        cap = int(topk) + _TILE_ROWS // rp
        lists, counts, overflow = C.build_lists(
            sel.perm32, sel.rb, layout.pool_lo, layout.win_lo, tile_q0, tile_q1,
            layout.num_keys, cap,
        )
        if int(overflow.item()):
            return None
        u = scores.float().contiguous()
        out, lse = C.fwd(
            q, k, v, u, sel.tau, sel.rb, sel.ranks32, layout.pool_lo, layout.win_lo,
            layout.win_hi, tile_q0, tile_q1, lists, counts, rp, scale,
        )
    else:
        empty = torch.empty(0, device=q.device)
        out, lse = C.fwd(
            q, k, v, None, empty, empty, empty, layout.pool_lo, layout.win_lo, layout.win_hi,
            tile_q0, tile_q1, empty, empty, rp, scale,
        )
    return out, lse, sel
