"""Shared helpers for the xformers_sparsek test suite.

Everything here is test code written independently of the library: the allowed keys come from
xFormers' ``materialize``, query positions from a table of the mask semantics, and the SparseK
selection (top-k by (score, index), capped-simplex threshold by scanning breakpoints) is a
plain numpy brute force.  Tests import these helpers with ``from conftest import ...``.
"""

import logging
import random
import warnings
import zlib
from dataclasses import dataclass
from typing import List, Optional

# xFormers logs a warning when its C++ binary does not match torch: harmless here.
logging.getLogger("xformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*xFormers.*")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from xformers.ops.fmha import attn_bias as xab  # noqa: E402

from xformers_sparsek import _ext  # noqa: E402

# --------------------------------------------------------------------------------------------
# markers / devices

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available: GPU test runs on the device machine"
)
cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.cuda_kernels_available()),
    reason=f"CUDA kernels unavailable: {_ext.cuda_unavailable_reason()}",
)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_intraop_thread():
    """For modules of many tiny problems: on a shared 2-core machine intra-op threads only
    contend (use with ``pytestmark = pytest.mark.usefixtures("one_intraop_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Fresh but reproducible random inputs: every test gets its own seed (from its id)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    yield


# --------------------------------------------------------------------------------------------
# inputs


def rand_inputs(B, Mq, Mk, G, H, D, Dv, dtype, device="cpu", gqa_expand=True, score_scale=1.0):
    """Random q, k, v, scores in BMHK (G=None) or BMGHK layout.

    BMGHK with ``gqa_expand``: K, V and scores are expanded with stride 0 over H (one KV head
    and one selection per group).  Scores are float64 for float64 inputs, float32 otherwise.
    """
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    kw = dict(device=device)
    if G is None:
        q = torch.randn(B, Mq, H, D, dtype=dtype, **kw)
        k = torch.randn(B, Mk, H, D, dtype=dtype, **kw)
        v = torch.randn(B, Mk, H, Dv, dtype=dtype, **kw)
        s = torch.randn(B, Mk, H, dtype=sdt, **kw) * score_scale
        return q, k, v, s
    q = torch.randn(B, Mq, G, H, D, dtype=dtype, **kw)
    hk = 1 if gqa_expand else H
    k = torch.randn(B, Mk, G, hk, D, dtype=dtype, **kw).expand(B, Mk, G, H, D)
    v = torch.randn(B, Mk, G, hk, Dv, dtype=dtype, **kw).expand(B, Mk, G, H, Dv)
    s = (torch.randn(B, Mk, G, hk, dtype=sdt, **kw) * score_scale).expand(B, Mk, G, H)
    return q, k, v, s


def leaves(*ts, dtype=None, device=None):
    """Graph inputs for autograd: (views, leaves).

    Each tensor becomes a fresh leaf requiring grad; an expanded (stride-0) tensor becomes an
    expand() of a leaf holding one copy, as a user's GQA K/V/scores would.  Gradients are
    compared on the leaves (the expanded view's per-head split is not observable).
    ``dtype`` / ``device`` convert the leaves (keeping the expansion).
    """
    views, bases = [], []
    for t in ts:
        if 0 in t.stride():
            idx = tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())
            base = t[idx].detach().to(device or t.device, dtype or t.dtype)
            base = base.clone().requires_grad_()
            views.append(base.expand(t.shape))
        else:
            base = t.detach().to(device or t.device, dtype or t.dtype).clone().requires_grad_()
            views.append(base)
        bases.append(base)
    return views, bases


# --------------------------------------------------------------------------------------------
# biases

BIAS_TYPES = (
    type(None),
    xab.LowerTriangularMask,
    xab.LowerTriangularFromBottomRightMask,
    xab.LowerTriangularFromBottomRightLocalAttentionMask,
    xab.BlockDiagonalMask,
    xab.BlockDiagonalCausalMask,
    xab.BlockDiagonalCausalFromBottomRightMask,
    xab.BlockDiagonalCausalLocalAttentionMask,
    xab.BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
    xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
)
CAUSAL_TYPES = BIAS_TYPES[1:4] + BIAS_TYPES[5:]
# query position = index within its sequence + (keys - queries) for these:
BOTTOM_RIGHT_TYPES = (
    xab.LowerTriangularFromBottomRightMask,
    xab.LowerTriangularFromBottomRightLocalAttentionMask,
    xab.BlockDiagonalCausalFromBottomRightMask,
    xab.BlockDiagonalCausalLocalAttentionFromBottomRightMask,
    xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
    xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask,
)
VARLEN_TYPES = BIAS_TYPES[4:]


def kind_id(kind) -> str:
    return "None" if kind is type(None) else kind.__name__


def _odd(lo, hi):
    return random.choice([n for n in range(lo, hi + 1) if n % 2 == 1])


def make_bias(kind, max_len: int = 11, allow_empty: bool = False):
    """A random instance of bias type ``kind`` -> (bias, B, Mq, Mk, is_causal).

    Varlen kinds get 1..4 sequences of odd lengths (batch 1); the others batch 1..2 and
    lengths up to ``max_len``.  ``allow_empty`` permits queries that see no key at all
    (bottom-right masks with more queries than keys).  Biases live on the CPU (xFormers
    puts them on CUDA by default where a GPU is present): use ``bias.to(device)``.
    """
    nseq = random.randint(1, 4)

    def lens(lo=1, hi=max_len):
        return [_odd(lo, hi) for _ in range(nseq)]

    def win(hi):
        return random.randint(1, max(1, hi))

    causal = kind in CAUSAL_TYPES
    if kind is type(None) or kind is xab.LowerTriangularMask:
        B, Mq, Mk = random.randint(1, 2), _odd(1, max_len), _odd(1, max_len)
        return (None if kind is type(None) else xab.LowerTriangularMask()), B, Mq, Mk, causal
    if kind in (xab.LowerTriangularFromBottomRightMask,
                xab.LowerTriangularFromBottomRightLocalAttentionMask):
        B, Mk = random.randint(1, 2), _odd(3, max_len)
        Mq = _odd(1, max_len) if allow_empty else _odd(1, Mk)
        if kind is xab.LowerTriangularFromBottomRightMask:
            return xab.LowerTriangularFromBottomRightMask(), B, Mq, Mk, causal
        return kind(win(Mk)), B, Mq, Mk, causal
    if kind in (xab.BlockDiagonalMask, xab.BlockDiagonalCausalMask,
                xab.BlockDiagonalCausalLocalAttentionMask):
        ql, kl = lens(), lens()
        base = xab.BlockDiagonalMask.from_seqlens(ql, kl, device=CPU)
        if kind is xab.BlockDiagonalCausalMask:
            base = base.make_causal()
        elif kind is xab.BlockDiagonalCausalLocalAttentionMask:
            # xFormers requires q_len - window < k_len in every block
            w = max(max(q - k + 1 for q, k in zip(ql, kl)), win(max(kl)))
            base = base.make_local_attention(w)
        return base, 1, sum(ql), sum(kl), causal
    if kind in (xab.BlockDiagonalCausalFromBottomRightMask,
                xab.BlockDiagonalCausalLocalAttentionFromBottomRightMask):
        kl = lens(3)
        ql = [_odd(1, k) for k in kl]  # xFormers requires k_len >= q_len
        base = xab.BlockDiagonalMask.from_seqlens(ql, kl, device=CPU)
        if kind is xab.BlockDiagonalCausalFromBottomRightMask:
            base = base.make_causal_from_bottomright()
        else:
            base = base.make_local_attention_from_bottomright(win(max(kl)))
        return base, 1, sum(ql), sum(kl), causal
    if kind in (xab.BlockDiagonalCausalWithOffsetPaddedKeysMask,
                xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask):
        pad = _odd(3, max_len)
        kl = [_odd(1, pad) for _ in range(nseq)]
        ql = [_odd(1, max_len) if allow_empty else _odd(1, k) for k in kl]
        if kind is xab.BlockDiagonalCausalWithOffsetPaddedKeysMask:
            base = kind.from_seqlens(ql, pad, kl, device=CPU)
        else:
            base = kind.from_seqlens_local(ql, pad, kl, win(pad)).to(CPU)
        return base, 1, sum(ql), pad * nseq, causal
    raise AssertionError(f"no factory for {kind}")


def allowed_matrix(bias, B, Mq, Mk) -> np.ndarray:
    """[B, Mq, Mk] bool: the keys the base bias allows (from xFormers' materialize)."""
    if bias is None:
        return np.ones((B, Mq, Mk), dtype=bool)
    a = torch.isfinite(bias.materialize((Mq, Mk), dtype=torch.float32)).numpy()
    return np.broadcast_to(a, (B, Mq, Mk))


def query_positions(bias, Mq, Mk) -> np.ndarray:
    """[Mq] key position of every query (DESIGN.md section 1), for causal biases."""
    br = isinstance(bias, BOTTOM_RIGHT_TYPES)
    if not isinstance(bias, VARLEN_TYPES):
        return np.arange(Mq) + (Mk - Mq if br else 0)
    pos = np.zeros(Mq, dtype=np.int64)
    qs = bias.q_seqinfo.seqstart_py
    ks = bias.k_seqinfo.seqstart_py
    klen = getattr(bias.k_seqinfo, "seqlen_py", None)
    for s in range(len(qs) - 1):
        nq = qs[s + 1] - qs[s]
        nk = klen[s] if klen is not None else ks[s + 1] - ks[s]
        pos[qs[s]:qs[s + 1]] = ks[s] + np.arange(nq) + (nk - nq if br else 0)
    return pos


# --------------------------------------------------------------------------------------------
# brute-force SparseK selection (numpy, float64)


def brute_tau(u: np.ndarray, k: int):
    """All solutions of sum clip(u - t, 0, 1) = k, as an interval (t_lo, t_hi); needs len(u) > k.

    If the k-th and (k+1)-th largest scores are at least 1 apart, f == k exactly on
    [u_(k+1), u_(k) - 1] (k keys saturated, the rest at 0): tau is not unique.  Otherwise f is
    strictly decreasing through k: f is linear between the breakpoints {u} U {u - 1}, so find
    the last breakpoint with f >= k (bisection over the sorted breakpoints; f is monotone) and
    interpolate on the next piece.
    """
    u = np.asarray(u, dtype=np.float64)
    assert u.size > k
    desc = np.sort(u)[::-1]
    if desc[k - 1] - desc[k] >= 1.0:
        return desc[k], desc[k - 1] - 1.0
    bp = np.unique(np.concatenate([u, u - 1.0]))

    def f(t):
        return np.clip(u - t, 0.0, 1.0).sum()

    lo, hi = 0, bp.size - 1  # f(bp[lo]) = len(u) > k > 0 = f(bp[hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(bp[mid]) >= k:
            lo = mid
        else:
            hi = mid
    f_lo, f_hi = f(bp[lo]), f(bp[hi])
    t = bp[lo] + (f_lo - k) / (f_lo - f_hi) * (bp[hi] - bp[lo])
    return t, t


@dataclass
class RowSelection:
    window: List[int]  # keys attended with gate 1 (window)
    pool: List[int]
    selected: List[int]  # pool keys attended
    gates: np.ndarray  # gates of `selected`
    tau: Optional[tuple]  # (t_lo, t_hi) or None where the whole pool is selected
    nF: Optional[int]  # |{j in pool: tau < u_j < tau + 1}| where tau is unique
    margin: float  # distance of the row from the kinks of the selection (inf if none)


def brute_row(u_keys: np.ndarray, allowed: np.ndarray, pos: Optional[int], window: int,
              topk: int) -> RowSelection:
    """Brute-force selection of one query row.

    u_keys: scores of all keys [Mk]; allowed: bool [Mk]; pos: the query's key position
    (causal biases; window 0 otherwise).
    """
    keys = np.nonzero(allowed)[0]
    if window > 0:
        in_win = (pos - keys) < window
    else:
        in_win = np.zeros(keys.size, dtype=bool)
    wkeys, pool = keys[in_win], keys[~in_win]
    if pool.size <= topk:
        return RowSelection(list(wkeys), list(pool), list(pool), np.ones(pool.size), None, None,
                            np.inf)
    u = u_keys[pool].astype(np.float64)
    order = sorted(range(pool.size), key=lambda t: (u[t], pool[t]), reverse=True)
    top = order[:topk]
    t_lo, t_hi = brute_tau(u, topk)
    tau = 0.5 * (t_lo + t_hi)
    gates = np.clip(u[top] - tau, 0.0, 1.0)
    # kinks: a top-k tie at the boundary, or a score at tau or tau + 1
    kth, nxt = u[order[topk - 1]], u[order[topk]]
    margin = kth - nxt
    nF = None
    if t_lo == t_hi:
        margin = min(margin, np.abs(u - tau).min(), np.abs(u - tau - 1.0).min())
        nF = int(((u > tau) & (u < tau + 1.0)).sum())
    else:
        # flat piece: tau is not unique, gates are 0/1 and score gradients vanish; a row is
        # away from the kinks if the flat interval has room on both sides
        margin = min(margin, t_hi - t_lo)
    return RowSelection(list(wkeys), list(pool), [int(pool[t]) for t in top], gates,
                        (t_lo, t_hi), nF, float(margin))


def brute_rows(scores_bmh: np.ndarray, allowed: np.ndarray, pos, window: int, topk: int):
    """scores_bmh [B, Mk, S] (one selection head per column), allowed [B, Mq, Mk] ->
    dict (b, s, i) -> RowSelection."""
    B, Mk, S = scores_bmh.shape
    Mq = allowed.shape[1]
    out = {}
    for b in range(B):
        for s in range(S):
            for i in range(Mq):
                p = None if pos is None else int(pos[i])
                out[b, s, i] = brute_row(scores_bmh[b, :, s], allowed[b, i], p, window, topk)
    return out


def selection_heads(scores: torch.Tensor) -> np.ndarray:
    """scores [B, Mk, H] or [B, Mk, G, H] (expanded over H) -> [B, Mk, S] float64 numpy.

    BMGHK scores expanded with stride 0 over H share one selection per group.
    """
    s = scores.detach().to("cpu", torch.float64)
    if s.ndim == 4:
        s = s[..., 0] if scores.stride(3) == 0 else s.reshape(s.shape[0], s.shape[1], -1)
    return s.numpy()


def kink_margin(scores, bias, B, Mq, Mk, window, topk) -> float:
    """Smallest distance of any row's selection from a kink (top-k tie, gate at 0 or 1)."""
    rows = brute_rows(selection_heads(scores), allowed_matrix(bias, B, Mq, Mk),
                      query_positions(bias, Mq, Mk) if window else None, window, topk)
    return min([r.margin for r in rows.values()] + [np.inf])


def brute_sparsek(q, k, v, scores, topk, window=0, bias=None, scale=None):
    """Dense float64 numpy SparseK forward from the brute-force selection -> (out, lse).

    Shapes as sparsek_attention (BMHK or BMGHK; per-head scores unless expanded over H).
    """
    bmhk = q.ndim == 4
    t = [x.detach().to("cpu", torch.float64) for x in (q, k, v)]
    if bmhk:
        t = [x.unsqueeze(3) for x in t]
    qn, kn, vn = (x.numpy() for x in t)
    B, Mq, G, H, D = qn.shape
    Mk = kn.shape[1]
    scale = D ** -0.5 if scale is None else scale
    allowed = allowed_matrix(bias, B, Mq, Mk)
    pos = query_positions(bias, Mq, Mk) if window else None
    if scores is not None:
        sn = scores.detach().to("cpu", torch.float64)
        sn = (sn.unsqueeze(3) if bmhk else sn).numpy()  # [B, Mk, G, H]
    out = np.zeros((B, Mq, G, H, vn.shape[-1]))
    lse = np.full((B, G, H, Mq), -np.inf)
    for b in range(B):
        for g in range(G):
            for h in range(H):
                for i in range(Mq):
                    if scores is None:
                        keys = list(np.nonzero(allowed[b, i])[0])
                        gates = np.ones(len(keys))
                    else:
                        r = brute_row(sn[b, :, g, h], allowed[b, i],
                                      None if pos is None else int(pos[i]), window, topk)
                        keys = r.window + r.selected
                        gates = np.concatenate([np.ones(len(r.window)), r.gates])
                    if not keys:
                        continue
                    logits = scale * gates * (kn[b, keys, g, h] @ qn[b, i, g, h])
                    mx = logits.max()
                    e = np.exp(logits - mx)
                    lse[b, g, h, i] = mx + np.log(e.sum())
                    out[b, i, g, h] = (e / e.sum() * gates) @ vn[b, keys, g, h]
    if bmhk:
        return out[:, :, :, 0], lse[:, :, 0]
    return out, lse


def dense_exact(q, k, v, bias, scale=None, keep_graph=False):
    """Exact attention from bias.materialize (float64 torch); rows without keys give 0.

    ``keep_graph``: differentiable in q, k, v (then they must already be float64 CPU)."""
    bmhk = q.ndim == 4
    if not keep_graph:
        q, k, v = (x.detach().to("cpu", torch.float64) for x in (q, k, v))
    heads = q.shape[2:-1]
    if not bmhk:  # fold G into H
        q, k, v = (x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1]) for x in (q, k, v))
    B, Mq, _, D = q.shape
    Mk = k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    logits = scale * torch.einsum("bqhd,bkhd->bhqk", q, k)
    if bias is not None:
        logits = logits + bias.materialize((Mq, Mk), dtype=torch.float64)
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out.reshape(B, Mq, *heads, -1)


def max_abs(a, b) -> float:
    a, b = (torch.as_tensor(x).detach().to("cpu", torch.float64) for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    both_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    d = torch.where(both_inf, 0.0, (a - b).abs())
    return float(d.nan_to_num(float("inf")).max()) if d.numel() else 0.0


def rel_err(out, ref) -> float:
    out, ref = (torch.as_tensor(x).detach().to("cpu", torch.float64) for x in (out, ref))
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
