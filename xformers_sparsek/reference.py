"""A brute-force float64 reference of DESIGN.md section 1, for tests and debugging.

Deliberately independent of the fast paths: the allowed keys come from xFormers'
``materialize`` of the base bias, each query's pool is sorted on its own, tau is found by
scanning all breakpoints, and attention is dense.  O(Mq * Mk^2) per head: small inputs
only.  Differentiable (autograd) in q, k, v and scores.
"""

from typing import Optional, Tuple

import torch
from xformers.ops.fmha import attn_bias as xab


def capped_simplex_tau(u: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """tau with sum clip(u - tau, 0, 1) = k (needs u.numel() > k); returns (tau, F mask).

    Scans every piece between consecutive breakpoints {u} U {u - 1}; on the piece holding
    tau, tau = (a + sum_F u - k) / |F| (differentiable in u).  Where f == k on a whole piece
    (no fractional key: every key saturated or zero) tau is not unique; we take that
    piece's midpoint (the gates are the same for any choice).
    """
    with torch.no_grad():
        v = u.detach()
        bp = torch.cat([v, v - 1]).sort().values

        def counts(t):
            frac = (v > t) & (v < t + 1)
            return int((v >= t + 1).sum()), frac

        for m in range(bp.numel() - 1):
            a, frac = counts(0.5 * (bp[m] + bp[m + 1]))
            if a + float((v[frac] - bp[m + 1]).sum()) <= k:
                break  # first piece whose right end has f <= k: tau is in (bp[m], bp[m+1]]
        flat_mid = None
        for m2 in range(m + 1, bp.numel() - 1):  # next piece of positive width
            if bp[m2 + 1] > bp[m2]:
                t2 = 0.5 * (bp[m2] + bp[m2 + 1])
                a2, frac2 = counts(t2)
                if a2 == k and not frac2.any():
                    flat_mid = t2
                break
    if not frac.any():  # rounding stopped the scan on a flat piece itself
        flat_mid = 0.5 * (bp[m] + bp[m + 1])
    if flat_mid is not None:
        tau = (u * 0).sum() + flat_mid
    else:
        tau = ((a + u[frac].sum() - k) / frac.sum()).clamp(float(bp[m]), float(bp[m + 1]))
    with torch.no_grad():
        frac = (v > tau) & (v < tau + 1)  # F at tau itself (strict), as the fast paths use
    return tau, frac


def _positions(bias, mq: int, mk: int) -> Optional[torch.Tensor]:
    """Absolute key position of every query for causal biases (None if not causal)."""
    causal = (
        xab.LowerTriangularMask, xab.LowerTriangularFromBottomRightMask,
        xab.BlockDiagonalCausalMask, xab.BlockDiagonalCausalFromBottomRightMask,
        xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
        xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
    )
    if not isinstance(bias, causal):
        return None
    bottom_right = isinstance(
        bias,
        (xab.LowerTriangularFromBottomRightMask, xab.BlockDiagonalCausalFromBottomRightMask,
         xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
         xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask),
    )
    if isinstance(bias, (xab.BlockDiagonalMask, xab.BlockDiagonalPaddedKeysMask)):
        qs = bias.q_seqinfo.seqstart_py
        ks = bias.k_seqinfo.seqstart_py
        kl = getattr(bias.k_seqinfo, "seqlen_py", None)
        pos = torch.empty(mq, dtype=torch.int64)
        for s in range(len(qs) - 1):
            nq = qs[s + 1] - qs[s]
            nk = kl[s] if kl is not None else ks[s + 1] - ks[s]
            r = torch.arange(nq)
            pos[qs[s]: qs[s + 1]] = ks[s] + r + (nk - nq if bottom_right else 0)
        return pos
    return torch.arange(mq) + (mk - mq if bottom_right else 0)


def sparsek_reference(
    q, k, v, scores, topk: Optional[int], window: int = 0, attn_bias=None, scale=None
):
    """Output (like q, v's last dim) and lse ([B, (G,) H, Mq]) in float64."""
    bmhk = q.ndim == 4
    if bmhk:
        q, k, v = q.unsqueeze(3), k.unsqueeze(3), v.unsqueeze(3)
        scores = scores.unsqueeze(3) if scores is not None else None
    q, k, v = q.double(), k.double(), v.double()
    scores = scores.double() if scores is not None else None
    B, Mq, G, H, D = q.shape
    Mk = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    if attn_bias is None:
        allowed = torch.ones(Mq, Mk, dtype=torch.bool)
    else:
        allowed = torch.isfinite(attn_bias.materialize((Mq, Mk), dtype=torch.float64))
    pos = _positions(attn_bias, Mq, Mk)
    outs, lses = [], []
    for b in range(B):
        for g in range(G):
            for h in range(H):
                gates, attended = [], []
                for i in range(Mq):
                    A = allowed[i]
                    W = torch.zeros_like(A)
                    if window > 0:
                        j = torch.arange(Mk)
                        W = A & (pos[i] - j < window)
                    P = A & ~W
                    row = W.double()
                    att = W.clone()
                    pool = P.nonzero().squeeze(1)
                    if topk is None or pool.numel() <= topk:
                        row = row + P.double()
                        att |= P
                    else:
                        u = scores[b, pool, g, h]
                        tau, _ = capped_simplex_tau(u, topk)
                        ud = u.detach().tolist()
                        order = sorted(range(pool.numel()), key=lambda t: (ud[t], int(pool[t])))
                        top = torch.tensor(order[-topk:])
                        p = (u[top] - tau).clamp(0, 1)
                        row = row.index_put((pool[top],), p, accumulate=True)
                        att[pool[top]] = True
                    gates.append(row)
                    attended.append(att)
                m = torch.stack(gates)  # [Mq, Mk] gates, 0 where not attended
                attended = torch.stack(attended)
                s = scale * m * (q[b, :, g, h] @ k[b, :, g, h].T)
                s = s.masked_fill(~attended, float("-inf"))
                lse = torch.logsumexp(s, -1)
                a = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(1))
                outs.append((a * m) @ v[b, :, g, h])
                lses.append(lse)
    out = torch.stack(outs).reshape(B, G, H, Mq, -1).permute(0, 3, 1, 2, 4)
    lse = torch.stack(lses).reshape(B, G, H, Mq)
    if bmhk:
        return out.squeeze(3), lse.squeeze(2)
    return out, lse
