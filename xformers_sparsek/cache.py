"""``SparseKCache``: a constant-memory per-layer KV cache for generation with SparseK attention.

Semantics: DESIGN.md section 1 on a causal base (``LowerTriangularMask`` over the whole
sequence; the new queries of a step are bottom-right aligned).  Design notes: docs/decoding.md.

What the cache keeps, per batch element and KV head, after ``L`` tokens (``n = L - window``
of them in the pool of the last query):

  * the window: a ring buffer of the ``window`` most recent keys (K, V and score);
  * the top set ``T``: the ``min(n, topk)`` pool keys selected by the last query (K, V,
    score and position);
  * the *fractional list*: the scores (only) of the other pool keys with ``u >= tau_min``
    (``tau_min``: the least solution of the capped-simplex equation of the last query), at
    most ``capacity`` of them, the largest kept on overflow.

Why this is exact: along a causal sequence the pool only grows, so ``tau`` and the k-th
largest pool score never decrease and ``T_{i+1} ⊆ T_i ∪ {keys entering the pool}``: a pool
key outside ``T`` is never attended again (its K/V can go) and a key below ``tau_min``
contributes ``clip(u - tau, 0, 1) = 0`` to every later threshold equation (its score can go
too).  The fractional list is what ``tau`` still needs; it is exact while it fits in
``capacity`` (``overflow`` counts the keys dropped because it did not).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

NEG_INF = float("-inf")


def _capped_simplex_tau(u: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Per row of ``u`` [N, L] (float64, ``-inf`` = no key; every row holds > topk finite
    values): ``tau`` with ``sum clip(u - tau, 0, 1) = topk`` and ``tau_min``, the least such
    value.

    ``tau`` follows the convention of ``_selection.select``: where the equation holds on a
    whole interval (the k-th largest score at least 1 above the (k+1)-th) it is the interval's
    midpoint; ``tau_min`` is then its left end, the (k+1)-th largest score.

    One stable sort of the 2L breakpoints {u} U {u - 1} and prefix sums over it: between
    consecutive breakpoints the saturated count, the fractional count and the fractional
    score sum are constant and read off the merged order, so f at every breakpoint costs
    O(1).  O(L log L) per row.
    """
    N, L = u.shape
    finite = torch.isfinite(u)
    lowest = torch.where(finite, u, float("inf")).amin(dim=1, keepdim=True)
    # Padding 2 below the smallest key contributes 0 wherever tau can lie (tau > min u - 1).
    x = torch.where(finite, u, lowest - 2.0)
    cb, order = torch.sort(torch.cat([x, x - 1.0], dim=1), dim=1, stable=True)
    is_u = order < L  # breakpoint u_j (else u_j - 1)
    uval = x.gather(1, order % L)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # after merged item m: i0 = #{u <= cb[m]}, i1 = #{u - 1 <= cb[m]}, and their score sums
    i0 = torch.cumsum(is_u, dim=1)[:, :-1]
    i1 = torch.cumsum(~is_u, dim=1)[:, :-1]
    s0 = torch.cumsum(torch.where(is_u, uval, zero), dim=1)[:, :-1]
    s1 = torch.cumsum(torch.where(is_u, zero, uval), dim=1)[:, :-1]
    left, right = cb[:, :-1], cb[:, 1:]  # piece m = [cb[m], cb[m+1]]
    a = (L - i1).to(torch.float64)  # saturated on the piece
    nf = i1 - i0  # fractional on the piece
    sf = torch.where(nf == 0, zero, s1 - s0)
    f_right = a + sf - nf.to(torch.float64) * right
    k = float(topk)
    # f is non-increasing: tau lies in the first piece whose right end has f <= k
    m = torch.argmax((f_right <= k).to(torch.int8), dim=1, keepdim=True)
    g = lambda t: t.gather(1, m).squeeze(1)  # noqa: E731
    tau = (g(a) + g(sf) - k) / g(nf).clamp(min=1).to(torch.float64)
    tau = torch.minimum(torch.maximum(tau, g(left)), g(right))
    sv = cb.masked_select(is_u).view(N, L)  # the scores, ascending
    u_k = sv[:, L - topk]
    u_k1 = sv[:, L - topk - 1]
    flat = u_k - 1.0 >= u_k1
    tau = torch.where(flat, 0.5 * (u_k1 + u_k - 1.0), tau)
    tau_min = torch.where(flat, u_k1, tau)
    return tau, tau_min


class SparseKCache:
    """Constant-memory KV cache of one attention layer for SparseK generation.

    Args:
        batch, kv_heads, head_dim: the K layout ``[batch, M, kv_heads, head_dim]``.
        topk, window: the SparseK parameters (as ``sparsek_attention`` on a causal mask).
        value_dim: V's last dim (default ``head_dim``).
        capacity: size of the scores-only list of fractional pool keys (default
            ``4 * topk``); exact while it fits, see ``overflow``.
        dtype, device: of the cached K/V (scores are kept in float64).

    Memory per layer, independent of the context length:
    ``batch * kv_heads * ((window + topk) * ((head_dim + value_dim) * itemsize + 8)
    + 8 * topk + 8 * capacity)`` bytes (K/V + scores of window and top set, positions of the
    top set, fractional scores).
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        topk: int,
        window: int,
        *,
        value_dim: Optional[int] = None,
        capacity: Optional[int] = None,
        dtype: torch.dtype = torch.float32,
        device="cpu",
    ) -> None:
        def pos_int(name, x, lo):
            if isinstance(x, bool) or not isinstance(x, int) or x < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")

        pos_int("batch", batch, 1)
        pos_int("kv_heads", kv_heads, 1)
        pos_int("head_dim", head_dim, 1)
        pos_int("topk", topk, 1)
        pos_int("window", window, 0)
        value_dim = head_dim if value_dim is None else value_dim
        pos_int("value_dim", value_dim, 1)
        capacity = 4 * topk if capacity is None else capacity
        pos_int("capacity", capacity, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.batch, self.kv_heads, self.head_dim, self.value_dim = batch, kv_heads, head_dim, value_dim
        self.topk, self.window, self.capacity = topk, window, capacity
        self.dtype, self.device = dtype, torch.device(device)
        B, G, W, K, C = batch, kv_heads, window, topk, capacity
        kw = dict(device=self.device)
        self.win_k = torch.zeros(B, G, W, head_dim, dtype=dtype, **kw)  # ring, slot = pos % W
        self.win_v = torch.zeros(B, G, W, value_dim, dtype=dtype, **kw)
        self.win_u = torch.zeros(B, G, W, dtype=torch.float64, **kw)
        self.top_k = torch.zeros(B, G, K, head_dim, dtype=dtype, **kw)
        self.top_v = torch.zeros(B, G, K, value_dim, dtype=dtype, **kw)
        self.top_u = torch.full((B, G, K), NEG_INF, dtype=torch.float64, **kw)
        self.top_pos = torch.full((B, G, K), -1, dtype=torch.int64, **kw)
        self.frac_u = torch.full((B, G, C), NEG_INF, dtype=torch.float64, **kw)
        self.tau = torch.full((B, G), NEG_INF, dtype=torch.float64, **kw)  # gates' threshold
        self.tau_min = torch.full((B, G), NEG_INF, dtype=torch.float64, **kw)  # pruning bound
        self.overflow = torch.zeros(B, G, dtype=torch.int64, **kw)
        self._len = 0
        self._nfrac = 0  # max fractional-list length over the heads (a sorted prefix)

    # ------------------------------------------------------------------ state / stats

    @property
    def seq_len(self) -> int:
        """Tokens seen (the context length of the next query is seq_len + 1)."""
        return self._len

    @property
    def pool_size(self) -> int:
        """Pool size of the last query (keys older than the window)."""
        return max(0, self._len - self.window)

    @property
    def kv_entries(self) -> int:
        """K/V entries per KV head that hold data now (<= window + topk)."""
        return min(self._len, self.window) + min(self.pool_size, self.topk)

    def kv_bytes(self) -> int:
        """Bytes held by the cache's tensors (K/V, scores, positions): fixed at construction,
        independent of the context length."""
        ts = (self.win_k, self.win_v, self.win_u, self.top_k, self.top_v, self.top_u,
              self.top_pos, self.frac_u)
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def overflow_count(self) -> int:
        """Fractional keys dropped so far because ``capacity`` was full (0 = exact)."""
        return int(self.overflow.sum())

    def reset(self) -> None:
        for t in (self.win_k, self.win_v, self.win_u, self.top_k, self.top_v):
            t.zero_()
        for t in (self.top_u, self.frac_u, self.tau, self.tau_min):
            t.fill_(NEG_INF)
        self.top_pos.fill_(-1)
        self.overflow.zero_()
        self._len = 0
        self._nfrac = 0

    # ------------------------------------------------------------------ input checks

    def _check(self, q, k, v, scores):
        B, G, D, Dv = self.batch, self.kv_heads, self.head_dim, self.value_dim
        for name, t in (("q", q), ("k", k), ("v", v), ("scores", scores)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point torch.Tensor, got "
                                 f"{type(t).__name__}" + (f" {t.dtype}" if isinstance(t, torch.Tensor) else ""))
            if t.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {t.device}")
        if k.ndim != 4 or k.shape[0] != B or k.shape[1] < 1 or k.shape[2:] != (G, D):
            raise ValueError(f"k must be [B={B}, M>=1, kv_heads={G}, head_dim={D}], got {tuple(k.shape)}")
        M = k.shape[1]
        if tuple(v.shape) != (B, M, G, Dv):
            raise ValueError(f"v must be [{B}, {M}, {G}, value_dim={Dv}], got {tuple(v.shape)}")
        if tuple(scores.shape) != (B, M, G):
            raise ValueError(f"scores must be [{B}, {M}, {G}] (k.shape[:-1]), got {tuple(scores.shape)}")
        if q.ndim == 5:
            ok = q.shape[:3] == (B, M, G) and q.shape[3] >= 1 and q.shape[4] == D
        elif q.ndim == 4:
            ok = q.shape[:2] == (B, M) and q.shape[2] % G == 0 and q.shape[2] > 0 and q.shape[3] == D
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"q must be [{B}, {M}, kv_heads={G}, R, {D}] or [{B}, {M}, R*{G}, {D}] (query head h "
                f"uses KV head h // R), got {tuple(q.shape)}")
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("scores must be finite (found NaN or inf)")

    # ------------------------------------------------------------------ the pool

    def _pool_insert(self, ek: Tensor, ev: Tensor, eu: Tensor, epos: Tensor) -> None:
        """Keys entering the pool (oldest first): ek [B,G,E,D], ev, eu [B,G,E] (float64),
        epos [E] absolute positions.  Updates the top set, tau and the fractional list to
        those of a query whose pool is the old pool plus these keys."""
        B, G, E = eu.shape
        if E == 0:
            return
        K, C = self.topk, self.capacity
        cu = torch.cat([self.top_u, eu], dim=2)
        cp = torch.cat([self.top_pos, epos.view(1, 1, E).expand(B, G, E)], dim=2)
        # order by (u, pos) descending: sort by pos first, then stably by u
        o1 = torch.argsort(cp, dim=2, descending=True, stable=True)
        o2 = torch.argsort(cu.gather(2, o1), dim=2, descending=True, stable=True)
        order = o1.gather(2, o2)
        keep, out = order[..., :K], order[..., K:]
        ck = torch.cat([self.top_k, ek.to(self.dtype)], dim=2)
        cv = torch.cat([self.top_v, ev.to(self.dtype)], dim=2)
        # in place: the buffers keep their storage (fixed memory, CUDA-graph friendly)
        self.top_k.copy_(ck.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, ck.shape[-1])))
        self.top_v.copy_(cv.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, cv.shape[-1])))
        self.top_u.copy_(cu.gather(2, keep))
        self.top_pos.copy_(cp.gather(2, keep))
        if self.pool_size <= K:  # (already includes the entering keys)
            return  # the whole pool is selected (no key can have left it)
        self._update_tau_and_fractional(cu.gather(2, out))

    def _pool_insert_one(self, ek: Tensor, ev: Tensor, eu: Tensor, pos: int) -> None:
        """One key entering the pool (ek [B,G,D], ev [B,G,Dv], eu [B,G] float64), in place:
        O(topk + capacity) per KV head plus the sort of the threshold solve, which is
        skipped when the key is below every head's tau_min (it then changes nothing)."""
        K, C = self.topk, self.capacity
        n_pool = self.pool_size  # includes this key
        if n_pool <= K:  # still filling the top set: slot n_pool - 1 in every head
            s = n_pool - 1
            self.top_k[:, :, s] = ek
            self.top_v[:, :, s] = ev
            self.top_u[:, :, s] = eu
            self.top_pos[:, :, s] = pos
            return
        if n_pool > K + 1 and not bool((eu >= self.tau_min).any()):
            return  # below tau_min everywhere: contributes 0 to tau now and later
        # the smallest top key by (u, pos); the new key (the most recent) wins ties
        umin = self.top_u.min(dim=2, keepdim=True).values
        cand = torch.where(self.top_u == umin, self.top_pos, torch.iinfo(torch.int64).max)
        slot = cand.argmin(dim=2, keepdim=True)  # [B, G, 1]
        umin = umin.squeeze(2)
        replace = eu >= umin
        out_u = torch.where(replace, umin, eu)  # the key that leaves (or never enters) T

        def put(buf, new):
            idx = slot.unsqueeze(-1).expand(-1, -1, 1, buf.shape[-1]) if buf.ndim == 4 else slot
            cur = buf.gather(2, idx)
            r = replace.view(replace.shape + (1,) * (cur.ndim - 2))
            buf.scatter_(2, idx, torch.where(r, new.view(cur.shape).to(buf.dtype), cur))

        put(self.top_k, ek)
        put(self.top_v, ev)
        put(self.top_u, eu)
        put(self.top_pos, torch.full_like(eu, pos, dtype=torch.int64))
        self._update_tau_and_fractional(out_u.unsqueeze(2))

    def _update_tau_and_fractional(self, rest_new: Tensor) -> None:
        """Threshold of the current pool = top set U fractional list U rest_new (the scores
        of the pool keys just left out of the top set); prune the list to u >= tau_min."""
        B, G, K, C = self.batch, self.kv_heads, self.topk, self.capacity
        rest = torch.cat([self.frac_u[:, :, :self._nfrac], rest_new], dim=2)
        tau, tau_min = _capped_simplex_tau(
            torch.cat([self.top_u, rest], dim=2).reshape(B * G, -1), K)
        self.tau = tau.view(B, G)
        self.tau_min = tau_min.view(B, G)
        rest = torch.where(rest >= self.tau_min.unsqueeze(2), rest, NEG_INF)
        n_keep = torch.isfinite(rest).sum(dim=2)
        self.overflow += (n_keep - C).clamp(min=0)
        # keep the largest (at most C), sorted descending, as the prefix of the buffer
        n = min(C, int(n_keep.max()))
        if n:
            self.frac_u[:, :, :n] = torch.topk(rest, n, dim=2).values
        self.frac_u[:, :, n:self._nfrac] = NEG_INF
        self._nfrac = n

    # ------------------------------------------------------------------ attention

    def update_and_attend(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor,
                          scale: Optional[float] = None) -> Tensor:
        """Append M >= 1 new tokens per sequence and return the attention output of their M
        queries over the whole context so far (causal, bottom-right aligned), equal to
        ``sparsek_attention`` over the full context for those queries.

        q [B, M, Hkv, R, D] (R query heads per KV head) or [B, M, Hkv*R, D];
        k [B, M, Hkv, D], v [B, M, Hkv, Dv], scores [B, M, Hkv]
        -> out [B, M, Hkv, R, Dv] (or [B, M, Hkv*R, Dv]) in q's dtype.
        """
        self._check(q, k, v, scores)
        flat = q.ndim == 4
        B, M, G = scores.shape
        q5 = q.view(B, M, G, q.shape[2] // G, q.shape[3]) if flat else q
        scale = self.head_dim ** -0.5 if scale is None else float(scale)
        with torch.no_grad():
            if M == 1:
                out = self._decode(q5, k, v, scores, scale)
            else:
                out = self._prefill(q5, k, v, scores, scale)
        return out.reshape(B, M, -1, out.shape[-1]) if flat else out

    def _decode(self, q, k, v, scores, scale):
        """One new token: O(window + topk + capacity) per KV head (plus a sort for tau)."""
        B, _, G = scores.shape
        W, L = self.window, self._len
        u_new = scores[:, 0].to(torch.float64)  # [B, G]
        k_new, v_new = k[:, 0].to(self.dtype), v[:, 0].to(self.dtype)
        self._len = L + 1
        if W == 0:
            self._pool_insert_one(k_new, v_new, u_new, L)
        else:
            slot = L % W
            if L >= W:  # the key at position L - W leaves the window, enters the pool
                self._pool_insert_one(self.win_k[:, :, slot].clone(), self.win_v[:, :, slot].clone(),
                                      self.win_u[:, :, slot].clone(), L - W)
            self.win_k[:, :, slot] = k_new
            self.win_v[:, :, slot] = v_new
            self.win_u[:, :, slot] = u_new
        return self._attend_cached(q[:, 0], scale).unsqueeze(1)

    def _attend_cached(self, q, scale):
        """q [B, G, R, D] for the query at position seq_len - 1 -> out [B, G, R, Dv]."""
        W, L, K = self.window, self._len, self.topk
        cdt = torch.float64 if q.dtype == torch.float64 or self.dtype == torch.float64 else torch.float32
        qc = q.to(cdt)
        logits, vals = [], []
        if W > 0:
            s_w = torch.einsum("bgrd,bgkd->bgrk", qc, self.win_k.to(cdt)) * scale
            valid_w = torch.arange(W, device=self.device) < min(L, W)  # ring slots written
            logits.append(s_w.masked_fill(~valid_w, NEG_INF))
            vals.append(self.win_v.to(cdt))
        n_top = min(self.pool_size, K)
        gate = None
        if n_top > 0:
            valid_t = torch.arange(K, device=self.device) < n_top
            gate = (self.top_u - self.tau.unsqueeze(-1)).clamp(0.0, 1.0)  # [B,G,K]
            gate = torch.where(valid_t, gate, 0.0).to(cdt).unsqueeze(2)
            s_t = torch.einsum("bgrd,bgkd->bgrk", qc, self.top_k.to(cdt)) * (scale * gate)
            logits.append(s_t.masked_fill(~valid_t, NEG_INF))
            vals.append(self.top_v.to(cdt))
        s = torch.cat(logits, dim=-1)
        mx = s.amax(dim=-1, keepdim=True)
        a = torch.exp(s - torch.where(torch.isinf(mx), 0.0, mx))
        a = a / a.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(cdt).tiny)
        out = 0
        if W > 0:
            out = torch.einsum("bgrk,bgkd->bgrd", a[..., :W], vals[0])
        if gate is not None:
            out = out + torch.einsum("bgrk,bgkd->bgrd", a[..., W:] * gate, vals[-1])
        return out.to(q.dtype)

    def _prefill(self, q, k, v, scores, scale):
        """M > 1 new tokens: one ``sparsek_attention`` call over the compressed context
        [fractional (score only) | top set | window | new tokens] (see docs/decoding.md)."""
        from .functional import sparsek_attention
        from xformers.ops.fmha import attn_bias as xab

        B, M, G = scores.shape
        R = q.shape[3]
        W, L, K = self.window, self._len, self.topk
        dt = self.dtype
        k, v, u_new = k.to(dt), v.to(dt), scores.to(torch.float64)
        # cached window keys in position order: positions [L - nw, L)
        nw = min(L, W)
        ring_slots = torch.tensor([p % W for p in range(L - nw, L)], dtype=torch.long,
                                  device=self.device) if nw else None
        wk = self.win_k[:, :, ring_slots] if nw else self.win_k[:, :, :0]
        wv = self.win_v[:, :, ring_slots] if nw else self.win_v[:, :, :0]
        wu = self.win_u[:, :, ring_slots] if nw else self.win_u[:, :, :0]
        # top set in position order
        n_top = min(self.pool_size, K)
        po = torch.argsort(self.top_pos, dim=2)[..., K - n_top:]
        tk = self.top_k.gather(2, po.unsqueeze(-1).expand(-1, -1, -1, self.head_dim))
        tv = self.top_v.gather(2, po.unsqueeze(-1).expand(-1, -1, -1, self.value_dim))
        tu = self.top_u.gather(2, po)
        # fractional keys: scores only (never attended again), padded per head with a score
        # below everything (contributes 0 to every tau, never selected)
        n_frac = self._nfrac
        fu = self.frac_u[:, :, :n_frac]
        # [B, G, Lc] compressed context + new tokens
        new_k, new_v, new_u = (x.transpose(1, 2) for x in (k, v, u_new))
        ctx_u = torch.cat([fu, tu, wu, new_u], dim=2)
        if n_frac:
            lowest = torch.where(torch.isfinite(ctx_u), ctx_u, float("inf")).amin()
            ctx_u = torch.where(torch.isfinite(ctx_u), ctx_u, lowest - 2.0)
        zk = self.top_k.new_zeros(B, G, n_frac, self.head_dim)
        zv = self.top_v.new_zeros(B, G, n_frac, self.value_dim)
        ctx_k = torch.cat([zk, tk, wk, new_k], dim=2)
        ctx_v = torch.cat([zv, tv, wv, new_v], dim=2)
        Lc = ctx_u.shape[2]
        kk = ctx_k.transpose(1, 2).unsqueeze(3).expand(B, Lc, G, R, self.head_dim)
        vv = ctx_v.transpose(1, 2).unsqueeze(3).expand(B, Lc, G, R, self.value_dim)
        uu = ctx_u.transpose(1, 2).unsqueeze(3).expand(B, Lc, G, R)
        bias = xab.LowerTriangularFromBottomRightMask() if Lc > M else xab.LowerTriangularMask()
        out = sparsek_attention(q.to(dt), kk, vv, uu, K, W, attn_bias=bias, scale=scale)
        # state update: the window slides over [cached window | new tokens]
        seq_k = torch.cat([wk, new_k], dim=2)
        seq_v = torch.cat([wv, new_v], dim=2)
        seq_u = torch.cat([wu, new_u], dim=2)
        first = L - nw  # position of seq_*[:, :, 0]
        n_ent = max(0, nw + M - W)
        self._len = L + M
        if n_ent:
            epos = torch.arange(first, first + n_ent, device=self.device)
            self._pool_insert(seq_k[:, :, :n_ent], seq_v[:, :, :n_ent], seq_u[:, :, :n_ent], epos)
        if W:
            n_win = seq_u.shape[2] - n_ent
            slots = torch.tensor([p % W for p in range(first + n_ent, first + n_ent + n_win)],
                                 dtype=torch.long, device=self.device)
            self.win_k[:, :, slots] = seq_k[:, :, n_ent:]
            self.win_v[:, :, slots] = seq_v[:, :, n_ent:]
            self.win_u[:, :, slots] = seq_u[:, :, n_ent:]
        return out.to(q.dtype)
