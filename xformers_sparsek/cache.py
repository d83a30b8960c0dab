"""``SparseKCache``: a constant-memory per-layer KV cache for generation with SparseK attention.

Semantics: DESIGN.md section 1 on a causal base (``LowerTriangularMask`` over the whole
sequence; the new queries of a step are bottom-right aligned).  Design notes: docs/decoding.md.

What the cache keeps, per batch element and KV head, after ``L`` tokens (``n = L - window``
of them in the pool of the last query):

  * the window: a ring buffer of the ``window`` most recent keys (K, V and score);
  * the top set ``T``: the ``min(n, topk)`` pool keys selected by the last query (K, V,
    score and position);
  * the scores (only) of the pool keys with ``u >= tau_min`` (``tau_min``: the least
    solution of the capped-simplex equation of the last query), sorted: the top set's
    scores and the *fractional list* of the other ones, at most ``capacity`` of those, the
    largest kept on overflow.

Why this is exact: along a causal sequence the pool only grows, so ``tau`` and the k-th
largest pool score never decrease and ``T_{i+1} ⊆ T_i ∪ {keys entering the pool}``: a pool
key outside ``T`` is never attended again (its K/V can go) and a key below ``tau_min``
contributes ``clip(u - tau, 0, 1) = 0`` to every later threshold equation (its score can go
too).  The fractional list is what ``tau`` still needs; it is exact while it fits in
``capacity`` (``overflow`` counts the keys dropped because it did not).

GPU notes: a single-token step (``M = 1``) has static shapes and no host synchronisation
apart from the input check of ``update_and_attend`` (finite scores); ``capture()`` records
it as a CUDA graph (no check, one replay per step).  On CUDA, fp16/bf16 caches with head
dim 64 or 128 run it as three fused kernels (csrc/sparsek/decode.cu; see
``fused_decode_reason``); the others run the PyTorch tensor step, which ``capture(
compile=True)`` can compile.  See docs/decoding.md, "The fused CUDA step".
"""

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._backend import check_scores_finite
from .mask import check_int

NEG_INF = float("-inf")
POS_INF = float("inf")


def _half_bmm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(a, b, out_dtype=torch.float32)`` runs on half inputs here (CUDA,
    recent torch): fp32 logits without an fp32 copy of the cached K/V.  Probed once per
    cache, eagerly (no try/except inside the step, which may be compiled or captured)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        a = torch.zeros(1, 1, 8, dtype=dtype, device=device)
        torch.bmm(a, a.transpose(1, 2), out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError):
        return False


def _fused_decode_reason(device: torch.device, dtype: torch.dtype, head_dim: int,
                         value_dim: int, pool_slots: int) -> Optional[str]:
    """Why the fused CUDA decode step (csrc/sparsek/decode.cu) cannot serve a cache of this
    kind, or None.  ``XFORMERS_SPARSEK_DECODE=torch`` forces the PyTorch step (the one
    ``capture(compile=True)`` compiles), e.g. to compare the two."""
    if device.type != "cuda":
        return "not a CUDA cache"
    if os.environ.get("XFORMERS_SPARSEK_DECODE", "") == "torch":
        return "XFORMERS_SPARSEK_DECODE=torch"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (the fused step takes float16 / bfloat16)"
    if head_dim != value_dim or head_dim not in (64, 128):
        return f"head_dim {head_dim} / value_dim {value_dim} (the fused step takes 64 or 128, equal)"
    from ._ext import cuda_unavailable_reason, load_extension

    reason = cuda_unavailable_reason(device)
    if reason is not None:
        return reason
    ext = load_extension()
    if not hasattr(ext, "decode_step"):
        return "the extension predates the fused decode step (rebuild it)"
    with torch.cuda.device(device):
        limit = ext.decode_max_pool_slots(head_dim)
    if pool_slots > limit:
        return f"topk + capacity = {pool_slots} > {limit} (shared memory of this GPU)"
    return None


def _tau_sorted(w: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Capped-simplex threshold per row of ``w`` [..., n] (float64, ascending, ``-inf``
    padding first, no ``+inf``/NaN; rows that matter hold > topk finite values): ``tau`` with
    ``sum clip(w - tau, 0, 1) = topk`` and ``tau_min``, the least such value.

    No sort and no data-dependent shapes (CUDA-graph safe): f(t) = sum clip(w - t, 0, 1) is
    evaluated at all 2n breakpoints {w_j} U {w_j - 1} with prefix sums and one
    ``searchsorted`` per half (the other count is the breakpoint's own index), then tau is
    interpolated between the last breakpoint with f >= topk and the first one with
    f <= topk (f is linear in between).  Conventions of ``_selection.select``: where the
    equation holds on a whole interval (the k-th largest score at least 1 above the
    (k+1)-th) tau is the interval's midpoint and ``tau_min`` its left end, the (k+1)-th
    largest score.  Rows with <= topk finite values give meaningless values (callers mask
    them).
    """
    n = w.shape[-1]
    w = w.contiguous()
    real = w > NEG_INF
    P = torch.nn.functional.pad(torch.cumsum(torch.where(real, w, 0.0), dim=-1), (1, 0))
    j = torch.arange(n, device=w.device)
    # f(b) = #{w >= b + 1} + sum_{b < w < b + 1} (w - b), i.e. with lo = #{w <= b},
    # hi = #{w < b + 1}: (n - hi) + P[hi] - P[lo] - (hi - lo) b.  Keys equal to b (or to
    # b + 1) contribute 0 (or 1) on either side of the boundary, so the breakpoint's own
    # index can stand for the count there: lo = j + 1 at b = w_j, hi = j at b = w_j - 1.
    # (f is continuous: rounding at piece boundaries only moves it by an ulp.)
    hi1 = torch.searchsorted(w, w + 1.0)
    f1 = (n - hi1) + (P.gather(-1, hi1) - P[..., 1:]) - (hi1 - (j + 1)) * w
    b2 = w - 1.0
    lo2 = torch.searchsorted(w, b2, right=True)
    f2 = (n - j) + (P[..., :-1] - P.gather(-1, lo2)) - (j - lo2) * b2
    k = float(topk)
    f = torch.stack([f1, f2])  # [2, ..., n]
    b = torch.stack([w, b2])
    f = torch.where(real, f, POS_INF)  # padding breakpoints: below every real one
    ge, le = f >= k, f <= k
    t_a = torch.where(ge, b, NEG_INF).amax(dim=-1).amax(dim=0)
    f_a = torch.where(ge, f, POS_INF).amin(dim=-1).amin(dim=0)
    t_b = torch.where(le, b, POS_INF).amin(dim=-1).amin(dim=0)
    f_b = torch.where(le, f, NEG_INF).amax(dim=-1).amax(dim=0)
    inside = t_a < t_b  # then f_a > k > f_b: tau inside the piece (t_a, t_b)
    den = torch.where(inside, f_a - f_b, 1.0)
    tau = torch.where(inside, t_a + (f_a - k) * (t_b - t_a) / den, t_b)
    u_k = w[..., n - topk]
    u_k1 = w[..., n - topk - 1]
    flat = u_k - 1.0 >= u_k1
    tau = torch.where(flat, 0.5 * (u_k1 + u_k - 1.0), tau)
    tau_min = torch.where(flat, u_k1, tau)
    return tau, tau_min


def _capped_simplex_tau(u: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    """Per row of ``u`` [N, L] (float64, ``-inf`` = no key, any order; every row holds
    > topk finite values): ``(tau, tau_min)`` as ``_tau_sorted``."""
    return _tau_sorted(torch.sort(u, dim=-1).values, topk)


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
    + 16 * topk + 8 * capacity)`` bytes (K/V + scores of window and top set, positions of
    the top set, the sorted scores of top set and fractional list).
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
        check_int("batch", batch, 1)
        check_int("kv_heads", kv_heads, 1)
        check_int("head_dim", head_dim, 1)
        check_int("topk", topk, 1)
        check_int("window", window, 0)
        value_dim = head_dim if value_dim is None else value_dim
        check_int("value_dim", value_dim, 1)
        capacity = 4 * topk if capacity is None else capacity
        check_int("capacity", capacity, 1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.batch, self.kv_heads, self.head_dim, self.value_dim = batch, kv_heads, head_dim, value_dim
        self.topk, self.window, self.capacity = topk, window, capacity
        # the device tensors report ("cuda" -> "cuda:0"), so that inputs compare equal to it
        self.dtype, self.device = dtype, torch.empty(0, device=device).device
        B, G, W, K, C = batch, kv_heads, window, topk, capacity
        kw = dict(device=self.device)
        # K/V of window and top set in one buffer per tensor ([:W] ring, slot = pos % W;
        # [W:] top set), so a decode step attends over it with one matmul each.
        self.kv_k = torch.zeros(B, G, W + K, head_dim, dtype=dtype, **kw)
        self.kv_v = torch.zeros(B, G, W + K, value_dim, dtype=dtype, **kw)
        self.win_k, self.top_k = self.kv_k[:, :, :W], self.kv_k[:, :, W:]
        self.win_v, self.top_v = self.kv_v[:, :, :W], self.kv_v[:, :, W:]
        self.win_u = torch.zeros(B, G, W, dtype=torch.float64, **kw)
        self.top_u = torch.full((B, G, K), NEG_INF, dtype=torch.float64, **kw)
        self.top_pos = torch.full((B, G, K), -1, dtype=torch.int64, **kw)
        # all pool scores >= tau_min, ascending, -inf padding first: the top set's scores
        # are the last min(pool, topk), the fractional list the (at most capacity) before.
        self.pool_u = torch.full((B, G, K + C), NEG_INF, dtype=torch.float64, **kw)
        self.tau = torch.full((B, G), NEG_INF, dtype=torch.float64, **kw)  # gates' threshold
        self.tau_min = torch.full((B, G), NEG_INF, dtype=torch.float64, **kw)  # pruning bound
        self.overflow = torch.zeros(B, G, dtype=torch.int64, **kw)
        self.lens = torch.zeros(B, dtype=torch.int64, **kw)  # tokens seen per sequence
        self._lens_host: Optional[List[int]] = [0] * batch  # host copy (None: read lens)
        # single-token steps without host syncs (static work, CUDA-graph safe): on CUDA; on
        # the CPU they skip the threshold solve when it changes nothing (tests may set it)
        self._sync_free = self.device.type != "cpu"
        self._half_bmm = _half_bmm_ok(self.device, dtype)
        # the fused CUDA step (one update, one attention and one merge kernel) where it applies
        self.fused_decode_reason = _fused_decode_reason(self.device, dtype, head_dim, value_dim,
                                                        K + C)
        # query heads per KV head the fused step takes (read once: not on every step)
        self._fused_max_rows = 0
        if self.fused_decode_reason is None:
            from ._ext import load_extension

            self._fused_max_rows = load_extension().decode_max_rows()

    # ------------------------------------------------------------------ state / stats

    @property
    def _lens(self) -> List[int]:
        if self._lens_host is None:
            self._lens_host = self.lens.tolist()  # (a sync, outside the decode step)
        return self._lens_host

    @_lens.setter
    def _lens(self, values: List[int]) -> None:
        self.lens.copy_(torch.tensor(values, dtype=torch.int64))
        self._lens_host = list(values)

    @property
    def frac_u(self) -> Tensor:
        """[B, Hkv, capacity] the fractional list (ascending, -inf = empty) once the pool
        exceeds topk."""
        return self.pool_u[..., :self.capacity]

    @property
    def seq_len(self) -> int:
        """Tokens seen (the longest sequence's, if they differ: see seq_lens)."""
        return max(self._lens)

    @property
    def seq_lens(self) -> List[int]:
        """Tokens seen by each sequence of the batch."""
        return list(self._lens)

    @property
    def pool_size(self) -> int:
        """Pool size of the last query (keys older than the window; longest sequence)."""
        return max(0, self.seq_len - self.window)

    @property
    def kv_entries(self) -> int:
        """K/V entries per KV head that hold data now (<= window + topk; longest sequence)."""
        return min(self.seq_len, self.window) + min(self.pool_size, self.topk)

    def kv_bytes(self) -> int:
        """Bytes held by the cache's tensors (K/V, scores, positions): fixed at construction,
        independent of the context length."""
        ts = (self.kv_k, self.kv_v, self.win_u, self.top_u, self.top_pos, self.pool_u)
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def overflow_count(self) -> int:
        """Fractional keys dropped so far because ``capacity`` was full (0 = exact)."""
        return int(self.overflow.sum())

    def reset(self) -> None:
        for t in (self.kv_k, self.kv_v, self.win_u):
            t.zero_()
        for t in (self.top_u, self.pool_u, self.tau, self.tau_min):
            t.fill_(NEG_INF)
        self.top_pos.fill_(-1)
        self.overflow.zero_()
        self.lens.zero_()
        self._lens_host = [0] * self.batch

    # ------------------------------------------------------------------ input checks

    def _check(self, q, k, v, scores, values=True):
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
        # (the one host sync of an eager CUDA decode step; capture() skips it)
        if values:
            check_scores_finite(scores)

    # ------------------------------------------------------------------ the pool

    def _pool_insert(self, ek: Tensor, ev: Tensor, eu: Tensor, epos: Tensor) -> None:
        """Keys entering the pool (oldest first): ek [B,G,E,D], ev, eu [B,G,E] (float64),
        epos [E] absolute positions.  Updates the top set, tau and the sorted pool scores to
        those of a query whose pool is the old pool plus these keys (multi-token steps)."""
        B, G, E = eu.shape
        if E == 0:
            return
        K = self.topk
        cu = torch.cat([self.top_u, eu], dim=2)
        cp = torch.cat([self.top_pos, epos.view(1, 1, E).expand(B, G, E)], dim=2)
        # order by (u, pos) descending: sort by pos first, then stably by u
        o1 = torch.argsort(cp, dim=2, descending=True, stable=True)
        o2 = torch.argsort(cu.gather(2, o1), dim=2, descending=True, stable=True)
        keep = o1.gather(2, o2)[..., :K]
        ck = torch.cat([self.top_k, ek.to(self.dtype)], dim=2)
        cv = torch.cat([self.top_v, ev.to(self.dtype)], dim=2)
        # in place: the buffers keep their storage (fixed memory, CUDA-graph friendly)
        self.top_k.copy_(ck.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, ck.shape[-1])))
        self.top_v.copy_(cv.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, cv.shape[-1])))
        self.top_u.copy_(cu.gather(2, keep))
        self.top_pos.copy_(cp.gather(2, keep))
        # pool scores >= tau_min plus the entering ones, ascending (one -inf slot in front:
        # the array is one longer than pool_u, as in _insert_rows)
        w = torch.cat([self.pool_u.new_full((B, G, 1), NEG_INF), self.pool_u, eu], dim=2)
        w = torch.sort(w, dim=2).values
        solve = self.pool_size > K  # (already includes the entering keys)
        self._solve_and_prune(w, None if solve else False)

    def _solve_and_prune(self, w: Tensor, rows) -> None:
        """w [B, G, N + E]: the current pool's scores (>= old tau_min), ascending, with at
        least E + ... leading slots to drop.  rows: [B, G] bool (re-solve tau there), None
        (everywhere) or False (nowhere: the pool is <= topk).  Prunes to u >= tau_min, keeps
        the largest N = topk + capacity in pool_u and counts the finite scores dropped."""
        N = self.pool_u.shape[2]
        if rows is not False:
            ws = w
            if not self._sync_free:  # CPU: solve on the live (finite) tail only
                n_live = int((w > NEG_INF).sum(dim=2).max())
                ws = w[..., w.shape[2] - min(w.shape[2], max(n_live, self.topk + 2)):]
            tau, tau_min = _tau_sorted(ws, self.topk)
            if rows is not None:
                tau = torch.where(rows, tau, self.tau)
                tau_min = torch.where(rows, tau_min, self.tau_min)
            self.tau.copy_(tau)
            self.tau_min.copy_(tau_min)
            w = torch.where(w >= self.tau_min.unsqueeze(2), w, NEG_INF)  # stays ascending
        drop = w.shape[2] - N
        self.overflow += (w[..., :drop] > NEG_INF).sum(dim=2)
        self.pool_u.copy_(w[..., drop:])

    def _insert_rows(self, ek: Tensor, ev: Tensor, eu: Tensor, epos: Tensor, ent: Tensor,
                     n_pool: Tensor) -> None:
        """At most one key per sequence entering its pool, in place: ek [B,G,D], ev [B,G,Dv],
        eu [B,G] float64, epos [B] positions, ent [B] bool (a key enters), n_pool [B] pool
        sizes including it.  Static shapes, no host sync on CUDA: O(topk + capacity) per KV
        head (a masked one-slot update of the top set, an insertion into the sorted pool
        scores, the sort-free threshold solve).  On the CPU the threshold solve is skipped
        when no head needs it (the key below tau_min everywhere: it changes nothing)."""
        K = self.topk
        B, G = eu.shape
        cpu = not self._sync_free
        filling = ent & (n_pool <= K)  # the whole pool is selected: next free slot
        full = ent & (n_pool > K)
        need = full.view(B, 1) & (eu >= self.tau_min)  # tau_min = -inf until the pool > topk
        ins = ent.view(B, 1) & (eu >= self.tau_min)  # the pool scores gain eu
        if cpu and not bool(ins.any()):
            return  # (filling rows always insert)
        # full rows: the smallest top key by (u, pos) leaves if eu >= its score (the
        # entering key, the most recent, wins ties); filling rows: the next free slot.
        # One masked one-slot update of the top set for both.
        umin = self.top_u.min(dim=2, keepdim=True).values
        cand = torch.where(self.top_u == umin, self.top_pos, torch.iinfo(torch.int64).max)
        slot = cand.argmin(dim=2, keepdim=True)  # [B, G, 1]
        fslot = (n_pool - 1).clamp(0, K - 1).view(B, 1, 1)
        slot = torch.where(filling.view(B, 1, 1), fslot, slot)
        replace = need & (eu >= umin.squeeze(2))
        self._put(slot, replace | filling.view(B, 1), ek, ev, eu, epos)
        # insert eu into the ascending pool scores, one slot longer in front (w[0] = -inf)
        # (where nothing is inserted x = -inf, c = 0 and w stays as it is)
        x = torch.where(ins, eu, NEG_INF).unsqueeze(2)  # [B, G, 1]
        s = self.pool_u
        w = torch.cat([s.new_full((B, G, 1), NEG_INF), s], dim=2)
        c = torch.searchsorted(w, x)  # #{w < x} >= 1 where x is finite
        i = torch.arange(w.shape[2], device=w.device)
        left = torch.cat([w[..., 1:], w[..., -1:]], dim=2)  # w[i + 1]
        w = torch.where(i < c - 1, left, torch.where(i == c - 1, x, w))
        if cpu and not bool(need.any()):
            rows = False
        else:
            rows = need
        self._solve_and_prune(w, rows)

    def _put(self, slot, mask, ek, ev, eu, epos) -> None:
        """Top-set slot `slot` [B,G,1] := the entering key where mask [B,G]."""
        B, G = mask.shape
        pos = epos.view(B, 1).expand(B, G)
        for buf, new in ((self.top_k, ek), (self.top_v, ev), (self.top_u, eu), (self.top_pos, pos)):
            idx = slot.unsqueeze(-1).expand(-1, -1, 1, buf.shape[-1]) if buf.ndim == 4 else slot
            cur = buf.gather(2, idx)
            m = mask.view(B, G, *(1,) * (cur.ndim - 2))
            buf.scatter_(2, idx, torch.where(m, new.reshape(cur.shape).to(buf.dtype), cur))

    # ------------------------------------------------------------------ attention

    def update_and_attend(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor,
                          scale: Optional[float] = None, *,
                          valid: Optional[Tensor] = None) -> Tensor:
        """Append M >= 1 new tokens per sequence and return the attention output of their M
        queries over the whole context so far (causal, bottom-right aligned), equal to
        ``sparsek_attention`` over the full context for those queries.

        q [B, M, Hkv, R, D] (R query heads per KV head) or [B, M, Hkv*R, D];
        k [B, M, Hkv, D], v [B, M, Hkv, Dv], scores [B, M, Hkv]
        -> out [B, M, Hkv, R, Dv] (or [B, M, Hkv*R, Dv]) in q's dtype.

        valid [B, M] bool (optional): False marks padding (e.g. a left-padded prompt): that
        token is not appended and its output row is 0.  Sequences may then have different
        lengths (``seq_lens``); each is attended as its own causal sequence.
        """
        self._check(q, k, v, scores)
        B, M, G = scores.shape
        if valid is not None:
            if (not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool
                    or tuple(valid.shape) != (B, M) or valid.device != self.device):
                raise ValueError(f"valid must be a bool tensor [{B}, {M}] on {self.device}, got "
                                 + (f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor)
                                    else type(valid).__name__))
            # (a single-token step handles valid rows on the device: no sync there on CUDA)
            if (M > 1 or not self._sync_free) and bool(valid.all()):
                valid = None
        flat = q.ndim == 4
        q5 = q.view(B, M, G, q.shape[2] // G, q.shape[3]) if flat else q
        scale = self.head_dim ** -0.5 if scale is None else float(scale)
        with torch.no_grad():
            if M == 1:
                out = self._decode(q5, k, v, scores, scale, valid)
            elif valid is None and len(set(self._lens)) == 1:
                out = self._prefill(q5, k, v, scores, scale)
            else:
                out = self._prefill_rows(q5, k, v, scores, scale, valid)
        return out.reshape(B, M, -1, out.shape[-1]) if flat else out

    def capture(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor,
                scale: Optional[float] = None, *, graph: Optional[bool] = None,
                compile: bool = False, compile_backend: str = "inductor") -> "DecodeStep":
        """A reusable single-token step for inputs shaped like these (M = 1, every sequence
        appends): ``step = cache.capture(q, k, v, scores)``, then ``out = step(q, k, v,
        scores)`` per token (same as ``update_and_attend``).  On CUDA (``graph`` None or
        True) the step is recorded once as a CUDA graph and each call replays it: inputs
        are copied into static buffers, ``out`` is a static buffer overwritten by the next
        call (clone it to keep it), and score values are not checked (shapes are).  On the
        CPU (or ``graph=False``) each call runs the same static step eagerly.  Capturing
        does not change the cache; use the step only while the cache is not reset.
        ``compile=True`` first compiles the step's tensor work with
        ``torch.compile(fullgraph=True, dynamic=False, backend=compile_backend)`` (fuses its
        ~160 small kernels into a few; the first call compiles, which takes a while)."""
        return DecodeStep(self, q, k, v, scores, scale, graph, compile, compile_backend)

    _STATE = ("kv_k", "kv_v", "win_k", "win_v", "win_u", "top_k", "top_v", "top_u", "top_pos",
              "pool_u", "tau", "tau_min", "overflow", "lens")

    def _prefill_rows(self, q, k, v, scores, scale, valid):
        """M > 1 tokens with per-sequence lengths or padding: each sequence's valid tokens
        go through the equal-length path on a one-row view of the state."""
        B, M, G, R, _ = q.shape
        out = q.new_zeros(B, M, G, R, self.value_dim)
        lens = list(self._lens)
        for b in range(B):
            rows = torch.arange(M, device=self.device) if valid is None else valid[b].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            r = SparseKCache.__new__(SparseKCache)
            r.__dict__.update(self.__dict__)
            for name in self._STATE:  # views: r's in-place updates land in self's buffers
                setattr(r, name, getattr(self, name)[b:b + 1])
            r.batch, r._lens_host = 1, [lens[b]]
            sel = lambda t: t[b:b + 1, rows]  # noqa: E731
            if rows.numel() == 1:
                o = r._decode(sel(q), sel(k), sel(v), sel(scores), scale, None)
            else:
                o = r._prefill(sel(q), sel(k), sel(v), sel(scores), scale)
            out[b, rows] = o[0]
            lens[b] = r._lens[0]
        self._lens_host = lens
        return out

    def _decode(self, q, k, v, scores, scale, valid: Optional[Tensor]):
        """One new token per sequence (sequences may have different lengths; rows with
        valid False append nothing and get a zero output): O(window + topk + capacity) per
        KV head, vectorised over batch and heads, static shapes, no host sync on CUDA."""
        out = self._decode_fn(q.shape[3])(q, k, v, scores, scale, valid)
        if self._lens_host is not None:
            self._lens_host = [n + 1 for n in self._lens_host] if valid is None else None
        return out

    def _decode_fn(self, rows: int):
        """The single-token step for ``rows`` query heads per KV head: the fused CUDA kernels
        where they apply, else the PyTorch tensor step."""
        if self.fused_decode_reason is None and rows <= self._fused_max_rows:
            return self._decode_fused
        return self._decode_tensors

    def _decode_fused(self, q, k, v, scores, scale, valid: Optional[Tensor]):
        """``_decode_tensors`` in three CUDA kernels (csrc/sparsek/decode.cu): the same state
        updates (the threshold solve in another summation order: tau may differ in the last
        bits) and fp32 attention."""
        from ._ext import load_extension

        dt = self.dtype
        out = load_extension().decode_step(
            q[:, 0].to(dt).contiguous(), k[:, 0].to(dt).contiguous(), v[:, 0].to(dt).contiguous(),
            scores[:, 0].to(torch.float64).contiguous(),
            None if valid is None else valid[:, 0].contiguous(),
            self.kv_k, self.kv_v, self.win_u, self.top_u, self.top_pos, self.pool_u, self.tau,
            self.tau_min, self.overflow, self.lens, self.window, scale)
        return out.to(q.dtype).unsqueeze(1)

    def _decode_tensors(self, q, k, v, scores, scale, valid: Optional[Tensor]):
        """The tensor work of ``_decode`` (state updated in place; what capture() records
        and may compile)."""
        B, _, G = scores.shape
        W, dev = self.window, self.device
        L = self.lens.clone()
        vb = torch.ones(B, dtype=torch.bool, device=dev) if valid is None else valid[:, 0]
        u_new = scores[:, 0].to(torch.float64)  # [B, G]
        k_new, v_new = k[:, 0].to(self.dtype), v[:, 0].to(self.dtype)
        if W == 0:
            ent, ek, ev, eu, epos = vb, k_new, v_new, u_new, L
        else:
            # the key at position L - W leaves the window (its ring slot gets the new token)
            # and enters the pool
            slot = (L % W).view(B, 1, 1).expand(B, G, 1)
            ik = slot.unsqueeze(-1).expand(B, G, 1, self.head_dim)
            iv = slot.unsqueeze(-1).expand(B, G, 1, self.value_dim)
            ek = self.win_k.gather(2, ik).squeeze(2)
            ev = self.win_v.gather(2, iv).squeeze(2)
            eu = self.win_u.gather(2, slot).squeeze(2)
            ent, epos = vb & (L >= W), L - W
            if valid is not None:
                vk = vb.view(B, 1, 1)
                k_new, v_new = torch.where(vk, k_new, ek), torch.where(vk, v_new, ev)
                u_new = torch.where(vb.view(B, 1), u_new, eu)
            self.win_k.scatter_(2, ik, k_new.unsqueeze(2))
            self.win_v.scatter_(2, iv, v_new.unsqueeze(2))
            self.win_u.scatter_(2, slot, u_new.unsqueeze(2))
        L = L + vb.to(torch.int64)
        self.lens.copy_(L)
        n_pool = (L - W).clamp(min=0)
        self._insert_rows(ek, ev, eu, epos, ent, n_pool)
        out = self._attend(q[:, 0], scale, L, n_pool)
        if valid is not None:
            out = torch.where(vb.view(B, 1, 1, 1), out, 0.0)
        return out.unsqueeze(1)

    def _attend(self, q, scale, L, n_pool):
        """q [B, G, R, D]: the query at position L[b] - 1 of each sequence -> [B, G, R, Dv]
        over its window (ring) and top set: two batched matmuls over the [window | top]
        K/V buffers (half K/V on CUDA: fp32 logits and accumulation, no fp32 copy)."""
        W, K, dev = self.window, self.topk, self.device
        B, G, R, D = q.shape
        Dv, S = self.value_dim, W + K
        cdt = torch.float64 if q.dtype == torch.float64 or self.dtype == torch.float64 else torch.float32
        i = torch.arange(S, device=dev)
        # slot valid: ring slots written (< min(L, W)); top slots filled (< min(pool, K))
        ok = torch.where(i < W, i < L.clamp(max=W).view(B, 1), i - W < n_pool.clamp(max=K).view(B, 1))
        gate = torch.cat([torch.ones(B, G, W, dtype=torch.float64, device=dev),
                          (self.top_u - self.tau.unsqueeze(-1)).clamp(0.0, 1.0)], dim=2)
        gate = torch.where(ok.view(B, 1, S), gate, 0.0).to(cdt)  # [B, G, S]
        kk = self.kv_k.view(B * G, S, D)
        vv = self.kv_v.view(B * G, S, Dv)
        half = self._half_bmm
        if half:
            s = torch.bmm(q.to(self.dtype).reshape(B * G, R, D), kk.transpose(1, 2),
                          out_dtype=torch.float32)
        else:
            s = torch.bmm(q.to(cdt).reshape(B * G, R, D), kk.to(cdt).transpose(1, 2))
        s = s.view(B, G, R, S) * (scale * gate).unsqueeze(2)
        s = s.masked_fill(~ok.view(B, 1, 1, S), NEG_INF)
        mx = s.amax(dim=-1, keepdim=True)
        a = torch.exp(s - torch.where(torch.isinf(mx), 0.0, mx))
        a = a / a.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(cdt).tiny)
        p = (a * gate.unsqueeze(2)).view(B * G, R, S)
        if half:
            out = torch.bmm(p.to(self.dtype), vv, out_dtype=torch.float32)
        else:
            out = torch.bmm(p, vv.to(cdt))
        return out.view(B, G, R, Dv).to(q.dtype)

    def _prefill(self, q, k, v, scores, scale):
        """M > 1 new tokens: one ``sparsek_attention`` call over the compressed context
        [fractional (score only) | top set | window | new tokens] (see docs/decoding.md)."""
        from .functional import sparsek_attention
        from xformers.ops.fmha import attn_bias as xab

        B, M, G = scores.shape
        R = q.shape[3]
        W, L, K = self.window, self._lens[0], self.topk  # all sequences at length L
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
        n_frac = int(torch.isfinite(self.frac_u).sum(dim=2).max()) if n_top == K else 0
        fu = self.frac_u[:, :, self.capacity - n_frac:]  # ascending, -inf first
        # [B, G, Lc] compressed context + new tokens
        new_k, new_v, new_u = (x.transpose(1, 2) for x in (k, v, u_new))
        ctx_u = torch.cat([fu, tu, wu, new_u], dim=2)
        if n_frac:
            lowest = torch.where(torch.isfinite(ctx_u), ctx_u, float("inf")).amin()
            ctx_u = torch.where(torch.isfinite(ctx_u), ctx_u, lowest - 2.0)
        # K/V built directly in the [B, Lc, Hkv, D] key layout: expanded over the R query
        # heads (stride 0) they reshape to the kernels' layout without a copy, and the
        # kernels load each key once for the whole GQA group
        zk = k.new_zeros(B, n_frac, G, self.head_dim)
        zv = v.new_zeros(B, n_frac, G, self.value_dim)
        ctx_k = torch.cat([zk, tk.transpose(1, 2), wk.transpose(1, 2), k], dim=1)
        ctx_v = torch.cat([zv, tv.transpose(1, 2), wv.transpose(1, 2), v], dim=1)
        Lc = ctx_u.shape[2]
        kk = ctx_k.unsqueeze(3).expand(B, Lc, G, R, self.head_dim)
        vv = ctx_v.unsqueeze(3).expand(B, Lc, G, R, self.value_dim)
        uu = ctx_u.transpose(1, 2).unsqueeze(3).expand(B, Lc, G, R)
        bias = xab.LowerTriangularFromBottomRightMask() if Lc > M else xab.LowerTriangularMask()
        out = sparsek_attention(q.to(dt), kk, vv, uu, K, W, attn_bias=bias, scale=scale)
        # state update: the window slides over [cached window | new tokens]
        seq_k = torch.cat([wk, new_k], dim=2)
        seq_v = torch.cat([wv, new_v], dim=2)
        seq_u = torch.cat([wu, new_u], dim=2)
        first = L - nw  # position of seq_*[:, :, 0]
        n_ent = max(0, nw + M - W)
        self._lens = [L + M] * B
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


_COMPILED = {}


def _compiled_decode(backend: str):
    """``SparseKCache._decode_tensors`` through ``torch.compile``, one wrapper per backend
    (caches of the same shapes and parameters reuse the compiled code)."""
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(SparseKCache._decode_tensors, fullgraph=True,
                                           dynamic=False, backend=backend)
    return _COMPILED[backend]


class DecodeStep:
    """A captured single-token step of a ``SparseKCache`` (see ``SparseKCache.capture``)."""

    def __init__(self, cache: SparseKCache, q, k, v, scores, scale, graph, compile=False,
                 compile_backend="inductor"):
        cache._check(q, k, v, scores)
        if scores.shape[1] != 1:
            raise ValueError(f"capture() records a single-token step: M must be 1, got {scores.shape[1]}")
        self.cache = cache
        self.flat = q.ndim == 4
        self.scale = cache.head_dim ** -0.5 if scale is None else float(scale)
        self.q, self.k, self.v, self.scores = (t.clone() for t in (q, k, v, scores))
        use_graph = cache.device.type == "cuda" if graph is None else bool(graph)
        if use_graph and cache.device.type != "cuda":
            raise ValueError("graph=True needs a CUDA cache")
        self.graph = None
        self.out = None
        rows = q.shape[2] // scores.shape[2] if self.flat else q.shape[3]  # per KV head
        self._fn = cache._decode_fn(rows)
        if compile:
            fn = _compiled_decode(compile_backend)
            self._fn = lambda *args: fn(cache, *args)
            self._warm()  # compile now (state restored), not inside the first timed call
        if use_graph:
            self._record()

    def _run(self):
        B, _, G = self.scores.shape
        q5 = self.q.view(B, 1, G, self.q.shape[2] // G, self.q.shape[3]) if self.flat else self.q
        with torch.no_grad():
            out = self._fn(q5, self.k, self.v, self.scores, self.scale, None)
        return out.reshape(B, 1, -1, out.shape[-1]) if self.flat else out

    def _warm(self, n=1):
        """Run the step n times (on a side stream on CUDA) and restore the cache's state."""
        c = self.cache
        saved = {name: getattr(c, name).clone() for name in SparseKCache._STATE if name not in
                 ("win_k", "win_v", "top_k", "top_v")}  # (views of kv_k / kv_v)
        if c.device.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(n):
                    self._run()
            torch.cuda.current_stream().wait_stream(s)
        else:
            for _ in range(n):
                self._run()
        for name, t in saved.items():
            getattr(c, name).copy_(t)

    def _record(self):
        self._warm(2)  # cuBLAS handles, allocator (and compilation), then undone
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._run()  # (capturing runs nothing: the cache is unchanged)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor) -> Tensor:
        c = self.cache
        dsts, srcs = (self.q, self.k, self.v, self.scores), (q, k, v, scores)
        for name, src, dst in zip(("q", "k", "v", "scores"), srcs, dsts):
            if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.device != dst.device:
                raise ValueError(f"{name} must be shaped {tuple(dst.shape)} on {dst.device} (as captured)")
        torch._foreach_copy_(dsts, srcs)  # one launch for the four static inputs, not four
        if self.graph is None:
            out = self._run()
        else:
            self.graph.replay()
            out = self.out
        if c._lens_host is not None:
            c._lens_host = [n + 1 for n in c._lens_host]
        return out
