"""Input validation and the canonical problem shared by every entry point.

BMHK / BMGHK tensors become the canonical ``[NQ, S, R, D]`` views of ``_attention``:
  * BMHK ``[B, M, H, D]``: S = H selection heads, R = 1;
  * BMGHK ``[B, M, G, H, D]`` whose scores are shared over H (stride 0 or H == 1):
    S = G, R = H (the GQA group shares one selection, and K/V if they are expanded);
  * BMGHK with per-head scores: S = G*H, R = 1.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch

from ._layout import QueryLayout, build_layout, is_varlen
from ._paged import is_paged, paged_problems, unpage


def input_problems(q, k, v, scores, base) -> List[str]:
    """Reasons (argument named) why these tensors can't be used; empty if fine."""
    r: List[str] = []
    ts = {"query": q, "key": k, "value": v}
    for name, t in ts.items():
        if not isinstance(t, torch.Tensor):
            return [f"{name} must be a torch.Tensor, got {type(t).__name__}"]
    if q.ndim not in (4, 5) or k.ndim != q.ndim or v.ndim != q.ndim:
        return [
            "query/key/value must all be BMHK [B, M, H, K] or BMGHK [B, M, G, H, K]; got "
            f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        ]
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        r.append(f"query/key/value must share one floating dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if not (q.device == k.device == v.device):
        r.append(f"query/key/value must be on one device, got {q.device}/{k.device}/{v.device}")
    B, Mq = q.shape[:2]
    Mk = k.shape[1]
    if (
        k.shape[0] != B
        or v.shape[0] != B
        or v.shape[1] != Mk
        or k.shape[2:-1] != q.shape[2:-1]
        or v.shape[2:-1] != q.shape[2:-1]
        or k.shape[-1] != q.shape[-1]
    ):
        r.append(
            "incompatible shapes: query "
            f"{tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} (expected "
            "key [B, Mk, ..., K] and value [B, Mk, ..., Kv] with query's batch and heads)"
        )
    if scores is not None:
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
            r.append("scores must be a floating-point tensor")
        elif tuple(scores.shape) != tuple(k.shape[:-1]):
            r.append(
                f"scores.shape must equal key.shape[:-1] = {tuple(k.shape[:-1])}, "
                f"got {tuple(scores.shape)}"
            )
        elif scores.device != k.device:
            r.append(f"scores must be on the key's device {k.device}, got {scores.device}")
    if is_varlen(base):
        qs, ks = base.q_seqinfo.seqstart_py, base.k_seqinfo.seqstart_py
        if B != 1:
            r.append(f"block-diagonal attn_bias needs batch size 1, got query batch {B}")
        if qs[-1] != Mq or ks[-1] != Mk:
            r.append(
                f"block-diagonal attn_bias covers {qs[-1]} queries / {ks[-1]} keys but "
                f"query has {Mq} and key has {Mk}"
            )
    if is_paged(base):
        r += paged_problems(base, B, Mq, Mk)
    return r


@dataclass
class Problem:
    q: torch.Tensor  # [NQ, S, R, D]
    k: torch.Tensor  # [NK, S, R, D]
    v: torch.Tensor  # [NK, S, R, Dv]
    scores: Optional[torch.Tensor]  # [S, NK] or None (exact mode)
    layout: QueryLayout
    topk: Optional[int]
    scale: float
    shape5: tuple  # (B, Mq, Mk, G, H)
    bmhk: bool
    shared: bool

    def out_to_input(self, out_c: torch.Tensor) -> torch.Tensor:
        B, Mq, _, G, H = self.shape5
        if self.bmhk:
            return out_c.reshape(B, Mq, G, out_c.shape[-1])
        return out_c.reshape(B, Mq, G, H, out_c.shape[-1])

    def lse_to_xformers(self, lse_c: torch.Tensor) -> torch.Tensor:
        """[S, R, NQ] -> [B, H, Mq] (BMHK) or [B, G, H, Mq] (BMGHK); varlen is packed."""
        B, Mq, _, G, H = self.shape5
        lse = lse_c.reshape(G, H, B, Mq).permute(2, 0, 1, 3)
        return lse.squeeze(2) if self.bmhk else lse

    def lse_from_xformers(self, lse: torch.Tensor):
        """Inverse of lse_to_xformers: [S, R, NQ], or None if `lse` has another layout
        (e.g. the padded lse of another forward op)."""
        B, Mq, _, G, H = self.shape5
        want = (B, G, Mq) if self.bmhk and H == 1 else (B, G, H, Mq)
        if tuple(lse.shape) != want or lse.dtype != torch.float32:
            return None
        lse5 = lse.reshape(B, G, H, Mq)
        return lse5.permute(1, 2, 0, 3).reshape(self.q.shape[1], self.q.shape[2], B * Mq)

    def to_canonical(self, x: torch.Tensor) -> torch.Tensor:
        """A query-shaped tensor (e.g. the output or its gradient) in [NQ, S, R, D]."""
        x5 = x if x.ndim == 5 else x.unsqueeze(3)
        return x5.reshape(self.q.shape[:-1] + (x5.shape[-1],))

    def grad_to_input(self, g_c: torch.Tensor, keys: bool) -> torch.Tensor:
        B, Mq, Mk, G, H = self.shape5
        g = g_c.reshape(B, Mk if keys else Mq, G, H, g_c.shape[-1])
        return g.squeeze(3) if self.bmhk else g


def make_problem(q, k, v, scores, base, topk, window, scale) -> Problem:
    if is_paged(base):
        k, v, scores, base = unpage(k, v, scores, base)
    bmhk = q.ndim == 4
    if bmhk:  # [B, M, H, D]: S = H selection heads, R = 1 (reshaped directly: host time)
        B, Mq, G, D = q.shape
        H, shared = 1, True
    else:
        B, Mq, G, H, D = q.shape
        shared = scores is None or H == 1 or scores.stride(3) == 0
    Mk = k.shape[1]
    S, R = (G, H) if shared else (G * H, 1)
    qc = q.reshape(B * Mq, S, R, D)
    kc = k.reshape(B * Mk, S, R, D)
    vc = v.reshape(B * Mk, S, R, v.shape[-1])
    sc = None
    if scores is not None:
        sel_scores = scores[..., :1] if shared and not bmhk else scores
        sc = sel_scores.reshape(B * Mk, S).transpose(0, 1)
    layout = build_layout(base, B, Mq, Mk, window, q.device)
    if scale is None:
        scale = D**-0.5
    return Problem(qc, kc, vc, sc, layout, topk, float(scale), (B, Mq, Mk, G, H), bmhk, shared)
