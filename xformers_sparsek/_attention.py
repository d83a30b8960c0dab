"""SparseK attention in plain PyTorch: the CPU path (and the fallback on any device).

Canonical layout (built by ``_problem``):
  q [NQ, S, R, D], k [NK, S, R, D], v [NK, S, R, Dv]   S = selection heads, R = query
  heads sharing one selection (a GQA group), NQ/NK = flattened (batch, sequence) axes.
  scores [S, NK] (None in exact mode), and the per-query intervals of ``_layout``.

Queries are processed in chunks.  A chunk gathers only the keys it can attend: its windows
plus the pool keys at or above the chunk's lowest top-k boundary (at most topk + chunk
keys on causal masks), so memory is O(chunk x (topk + window + chunk)) and time is
O(NQ x (topk + window)) rather than O(NQ x NK).
"""

from typing import Optional, Tuple

import torch

from ._selection import Selection, score_gradient, select
from ._layout import QueryLayout

_TARGET_TILE = 1 << 22  # elements of the [chunk, R, keys] score tile


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Chunk:
    """Gathered keys and gates for queries [c0, c1) of selection head s."""

    def __init__(self, layout, sel: Optional[Selection], u, s: int, c0: int, c1: int):
        dev = layout.pool_lo.device
        plo = layout.pool_lo[c0:c1]
        wlo = layout.win_lo[c0:c1]
        whi = layout.win_hi[c0:c1]
        lo, hi = int(plo.min()), int(whi.max())
        keys = torch.arange(lo, hi, device=dev)
        if sel is not None:
            ub, jb = sel.ub[s, c0:c1], sel.jb[s, c0:c1]
            # lowest boundary of the chunk (lexicographic in (score, index))
            ub_min = ub.min()
            jb_min = jb[ub == ub_min].min()
            us = u[s, lo:hi]
            keep = (keys >= wlo.min()) | (us > ub_min) | ((us == ub_min) & (keys >= jb_min))
            keys = keys[keep]
        self.keys = keys
        j = keys.unsqueeze(0)
        in_win = (j >= wlo.unsqueeze(1)) & (j < whi.unsqueeze(1))
        in_pool = (j >= plo.unsqueeze(1)) & (j < wlo.unsqueeze(1))
        if sel is None:
            self.selected = in_pool
            self.gate = None  # exact mode: every attended key has gate 1
            self.fractional = None
        else:
            uj = u[s, keys].unsqueeze(0)
            ub_c = sel.ub[s, c0:c1].unsqueeze(1).to(uj.dtype)
            jb_c = sel.jb[s, c0:c1].unsqueeze(1)
            self.selected = in_pool & ((uj > ub_c) | ((uj == ub_c) & (j >= jb_c)))
            p = (uj - sel.tau[s, c0:c1].unsqueeze(1).to(uj.dtype)).clamp(0.0, 1.0)
            self.gate = torch.where(in_win, 1.0, torch.where(self.selected, p, 0.0))
            self.fractional = self.selected & (p > 0) & (p < 1)
        self.attended = in_win | self.selected


def _chunk_size(nq: int, r: int, budget_keys: int) -> int:
    """Queries per chunk.  A chunk of C causal queries gathers about budget + 2C keys (its
    windows and the keys entering its pools), so C ~ budget / 2 keeps that overhead at
    most 2x, and the [C, R, keys] tile stays under _TARGET_TILE elements."""
    c = min(_TARGET_TILE // max(1, r * 2 * budget_keys), max(64, budget_keys // 2))
    return int(max(16, min(nq, c)))


def _budget(layout: QueryLayout, topk: Optional[int]) -> int:
    """Keys a query attends at most (pool part + window)."""
    longest_window = int((layout.win_hi - layout.win_lo).max()) if layout.num_queries else 0
    pool = topk if topk is not None else int(layout.pool_size.max()) if layout.num_queries else 0
    return max(1, pool + longest_window)


def _scores_and_probs(qc, kc, ch: _Chunk, scale: float, keep_qk: bool = False):
    """(q.k, gate [C,1,K] or None, softmax probabilities [C,R,K], lse [C,R]).

    Written with in-place ops: on the CPU these memory passes dominate the chunk's cost.
    """
    qk = torch.einsum("crd,krd->crk", qc, kc)
    gate = ch.gate.unsqueeze(1).to(qc.dtype) if ch.gate is not None else None
    s = qk.clone() if keep_qk else qk
    s.mul_(scale if gate is None else gate * scale)
    s.masked_fill_(~ch.attended.unsqueeze(1), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m.masked_fill_(torch.isinf(m), 0.0)  # empty rows: avoid -inf - -inf
    a = s.sub_(m).exp_()
    total = a.sum(dim=-1, keepdim=True)
    lse = (total.log() + m).squeeze(-1)  # [C, R]; -inf for empty rows
    a.div_(total.clamp_(min=torch.finfo(total.dtype).tiny))
    return (qk if keep_qk else None), gate, a, lse


def _exact_chunk_cpu(qc, kc, vc, ch: _Chunk, scale: float):
    """Exact mode on the CPU: PyTorch's fused flash-attention CPU kernel with the chunk's
    mask.  Returns (out [C,R,Dv], lse [C,R])."""
    bias = torch.zeros(ch.attended.shape, dtype=qc.dtype).masked_fill_(~ch.attended, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qc.transpose(0, 1).unsqueeze(0), kc.transpose(0, 1).unsqueeze(0).contiguous(),
        vc.transpose(0, 1).unsqueeze(0).contiguous(), 0.0, False, attn_mask=bias, scale=scale,
    )
    lse = lse[0].transpose(0, 1)
    empty = ~ch.attended.any(dim=1, keepdim=True)  # the kernel reports lse 0 for those
    return out[0].transpose(0, 1), lse.masked_fill(empty, float("-inf"))


def _chunks(q, k, v, layout: QueryLayout, sel, u, topk, cdt):
    """(s, c0, c1, chunk, q, k, v) for every non-empty query chunk of every selection head,
    with the chunk's gathered keys, in the compute dtype."""
    NQ, S, R, _ = q.shape
    C = _chunk_size(NQ, R, _budget(layout, topk))
    for s in range(S):
        for c0 in range(0, NQ, C):
            c1 = min(NQ, c0 + C)
            ch = _Chunk(layout, sel, u, s, c0, c1)
            if ch.keys.numel():
                yield s, c0, c1, ch, q[c0:c1, s].to(cdt), k[ch.keys, s].to(cdt), v[ch.keys, s].to(cdt)


def forward(
    q, k, v, scores, layout: QueryLayout, topk: Optional[int], scale: float
) -> Tuple[torch.Tensor, torch.Tensor, Optional[Selection]]:
    """Returns out [NQ, S, R, Dv] (q.dtype), lse [S, R, NQ] (float32/64), selection."""
    NQ, S, R, _ = q.shape
    cdt = compute_dtype(q.dtype)
    sel = select(scores, layout, topk) if scores is not None else None
    u = scores.to(torch.float64) if scores is not None else None
    out = torch.zeros(NQ, S, R, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((S, R, NQ), float("-inf"), dtype=cdt, device=q.device)
    for s, c0, c1, ch, qc, kc, vc in _chunks(q, k, v, layout, sel, u, topk, cdt):
        fused = q.device.type == "cpu" and cdt == torch.float32 and qc.shape[-1] == vc.shape[-1]
        if ch.gate is None and fused:  # the CPU flash kernel needs K == Kv
            o_c, lse_c = _exact_chunk_cpu(qc, kc, vc, ch, scale)
        else:
            _, gate, a, lse_c = _scores_and_probs(qc, kc, ch, scale)
            o_c = torch.einsum("crk,krd->crd", a if gate is None else a.mul_(gate), vc)
        out[c0:c1, s] = o_c.to(q.dtype)
        lse[s, :, c0:c1] = lse_c.transpose(0, 1)
    return out, lse, sel


def backward(
    dout, q, k, v, scores, layout: QueryLayout, topk: Optional[int], scale: float,
    sel: Optional[Selection] = None, need_dscores: bool = True,
):
    """Gradients (dq, dk, dv, dscores) of the SparseK attention output.

    dscores follows DESIGN.md section 1: g_ij = dL/dm_ij on selected fractional keys,
    du_j = sum_i [j in F_i] (g_ij - mean_{l in F_i} g_il); the 'mean' part is gathered per
    key by ``fractional_mean_sum``.
    """
    NQ, S, R, D = q.shape
    cdt = compute_dtype(q.dtype)
    if scores is not None and sel is None:
        sel = select(scores, layout, topk)
    u = scores.to(torch.float64) if scores is not None else None
    dq = torch.zeros(NQ, S, R, D, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape[0], S, R, D, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape[0], S, R, v.shape[-1], dtype=cdt, device=q.device)
    want_du = scores is not None and need_dscores
    du_direct = torch.zeros(S, layout.num_keys, dtype=torch.float64, device=q.device)
    g_row = torch.zeros(S, NQ, dtype=torch.float64, device=q.device)
    for s, c0, c1, ch, qc, kc, vc in _chunks(q, k, v, layout, sel, u, topk, cdt):
        doc = dout[c0:c1, s].to(cdt)
        qk, gate, a, _ = _scores_and_probs(qc, kc, ch, scale, keep_qk=True)
        vv = torch.einsum("crd,krd->crk", doc, vc)  # do_i . v_j
        dp = vv if gate is None else vv * gate
        di = (a * dp).sum(-1, keepdim=True)  # = do_i . o_i
        ds = a * (dp - di)  # dL/ds_ij
        dsg = ds * scale if gate is None else ds * (gate * scale)
        dq[c0:c1, s] = torch.einsum("crk,krd->crd", dsg, kc)
        # ch.keys are unique, so these indexed adds are deterministic on every device
        dk[ch.keys, s] += torch.einsum("crk,crd->krd", dsg, qc)
        w = a if gate is None else a * gate
        dv[ch.keys, s] += torch.einsum("crk,crd->krd", w, doc)
        if want_du:
            # dL/dm_ij = a_ij (do_i . v_j) + dL/ds_ij * scale * (q_i . k_j), summed over
            # the R query heads that share this selection.
            g = (a * vv + ds * (scale * qk)).sum(1)
            g = torch.where(ch.fractional, g, 0.0).to(torch.float64)
            g_row[s, c0:c1] = g.sum(-1)
            du_direct[s, ch.keys] += g.sum(0)
    dscores = score_gradient(scores, layout, sel, du_direct, g_row) if want_du else None
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dscores
