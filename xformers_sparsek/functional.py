"""Functional API and the torch.library custom ops behind every entry point.

``xformers_sparsek::fwd`` / ``xformers_sparsek::bwd`` take the canonical problem (see
``_problem``) as plain tensors, so they work under autograd and
``torch.compile(fullgraph=True)`` (fake implementations give the output shapes).  Each runs
the CUDA kernels when the extension supports the inputs and the PyTorch path otherwise.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _attention, _backend
from ._layout import QueryLayout
from ._paged import check_forward_only
from ._problem import input_problems, make_problem
from ._selection import Selection
from .mask import check_topk_window_base


def _layout_of(pool_lo, win_lo, win_hi, seq_starts, num_keys: int, window: int,
               nested: bool = False, causal: bool = True) -> QueryLayout:
    # The intervals, the sequence starts (the kernels' tiles), whether pools are nested and
    # the causal flag (with nested: the bound of the window spans) are all the kernels and
    # the PyTorch path need; the segment list only matters while build_layout turns a bias
    # into intervals.
    return QueryLayout(pool_lo, win_lo, win_hi, pool_lo.numel(), num_keys, [], causal, window,
                       seq_starts, nested and seq_starts is not None)


@torch.library.custom_op("xformers_sparsek::fwd", mutates_args=())
def sparsek_fwd(
    q: Tensor, k: Tensor, v: Tensor, scores: Optional[Tensor],
    pool_lo: Tensor, win_lo: Tensor, win_hi: Tensor, seq_starts: Optional[Tensor],
    topk: int, window: int, scale: float, nested: bool = False, causal: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> out [NQ,S,R,Dv], lse [S,R,NQ], and the selection (tau, ub, jb, nF) [S,NQ].
    Raises ValueError on non-finite scores (_backend.forward checks them)."""
    layout = _layout_of(pool_lo, win_lo, win_hi, seq_starts, k.shape[0], window, nested, causal)
    topk_ = topk if scores is not None else None
    out, lse, sel = _backend.forward(q, k, v, scores, layout, topk_, scale)
    if sel is None:
        e = q.new_empty(0, dtype=torch.float64)
        i = q.new_empty(0, dtype=torch.int64)
        return out, lse, e, e.clone(), i, i.clone()
    return out, lse, sel.tau, sel.ub, sel.jb, sel.nF


@sparsek_fwd.register_fake
def _(q, k, v, scores, pool_lo, win_lo, win_hi, seq_starts, topk, window, scale, nested=False,
      causal=True):
    NQ, S, R, _ = q.shape
    out = q.new_empty(NQ, S, R, v.shape[-1])
    lse = q.new_empty(S, R, NQ, dtype=_attention.compute_dtype(q.dtype))
    n = (S, NQ) if scores is not None else (0,)
    f = q.new_empty(n, dtype=torch.float64)
    i = q.new_empty(n, dtype=torch.int64)
    return out, lse, f, f.clone(), i, i.clone()


@torch.library.custom_op("xformers_sparsek::bwd", mutates_args=())
def sparsek_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, scores: Optional[Tensor],
    out: Tensor, lse: Tensor, tau: Tensor, ub: Tensor, jb: Tensor, nF: Tensor,
    pool_lo: Tensor, win_lo: Tensor, win_hi: Tensor, seq_starts: Optional[Tensor],
    topk: int, window: int, scale: float, need_dscores: bool, nested: bool = False,
    causal: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    layout = _layout_of(pool_lo, win_lo, win_hi, seq_starts, k.shape[0], window, nested, causal)
    sel = Selection(tau, ub, jb, nF) if scores is not None else None
    topk_ = topk if scores is not None else None
    dq, dk, dv, ds = _backend.backward(
        dout, q, k, v, scores, out, lse, layout, topk_, scale, sel, need_dscores
    )
    if ds is None:
        ds = q.new_empty(0, dtype=torch.float32)
    else:
        ds = ds.to(scores.dtype)
    return dq, dk, dv, ds


@sparsek_bwd.register_fake
def _(dout, q, k, v, scores, out, lse, tau, ub, jb, nF, pool_lo, win_lo, win_hi, seq_starts,
      topk, window, scale, need_dscores, nested=False, causal=True):
    ds = (
        scores.new_empty(scores.shape)
        if scores is not None and need_dscores
        else q.new_empty(0, dtype=torch.float32)
    )
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds


def _setup_context(ctx, inputs, output):
    (q, k, v, scores, pool_lo, win_lo, win_hi, seq_starts, topk, window, scale, nested,
     causal) = inputs
    out, lse, tau, ub, jb, nF = output
    ctx.save_for_backward(q, k, v, scores, out, lse, tau, ub, jb, nF, pool_lo, win_lo, win_hi,
                          seq_starts)
    ctx.args = (topk, window, scale, nested, causal)
    ctx.mark_non_differentiable(lse, tau, ub, jb, nF)


def _backward(ctx, dout, _dlse, _dtau, _dub, _djb, _dnF):
    (q, k, v, scores, out, lse, tau, ub, jb, nF, pool_lo, win_lo, win_hi,
     seq_starts) = ctx.saved_tensors
    topk, window, scale, nested, causal = ctx.args
    need_ds = scores is not None and ctx.needs_input_grad[3]
    dq, dk, dv, ds = sparsek_bwd(
        dout, q, k, v, scores, out, lse, tau, ub, jb, nF, pool_lo, win_lo, win_hi, seq_starts,
        topk, window, scale, need_ds, nested, causal,
    )
    return (dq, dk, dv, (ds if need_ds else None), None, None, None, None, None, None, None,
            None, None)


torch.library.register_autograd("xformers_sparsek::fwd", _backward, setup_context=_setup_context)


def _plain_eager_call(tensors) -> bool:
    """True when the custom op's wrapping would do nothing for this call: eager mode, plain
    tensors, no dispatch mode active and no autograd graph to record.  The forward then runs
    directly: the wrapping costs ~0.07 ms of host time per call (measured on the H100/H200
    device machine, seed config), a quarter of a whole small call."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return True


def forward_without_autograd(prob) -> Tuple[Tensor, Tensor]:
    """(out [NQ,S,R,Dv], lse [S,R,NQ]) of the canonical problem, no custom op, no graph
    (ValueError on non-finite scores, from _backend.forward)."""
    out, lse, _ = _backend.forward(prob.q, prob.k, prob.v, prob.scores, prob.layout, prob.topk,
                                   prob.scale)
    return out, lse


def run_problem(prob, window: int) -> Tuple[Tensor, Tensor]:
    """(out [NQ,S,R,Dv], lse [S,R,NQ]) of the canonical problem, through the custom op unless
    the call is plain eager without autograd (_plain_eager_call)."""
    if _plain_eager_call((prob.q, prob.k, prob.v, prob.scores)):
        return forward_without_autograd(prob)
    lay = prob.layout
    return sparsek_fwd(
        prob.q, prob.k, prob.v, prob.scores, lay.pool_lo, lay.win_lo, lay.win_hi,
        lay.seq_starts, prob.topk or 0, window, prob.scale, lay.nested, lay.causal,
    )[:2]


def sparsek_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scores: Optional[Tensor],
    topk: Optional[int],
    window: int = 0,
    attn_bias=None,
    scale: Optional[float] = None,
    *,
    return_lse: bool = False,
):
    """SparseK attention (DESIGN.md section 1) with gradients to q, k, v and scores.

    Args:
        q: ``[B, Mq, H, K]`` (BMHK) or ``[B, Mq, G, H, K]`` (BMGHK, GQA with expanded K/V).
        k, v: ``[B, Mk, H, K]`` / ``[B, Mk, H, Kv]`` (or the BMGHK forms).
        scores: ``key.shape[:-1]``, one finite score per key (and head); ``None`` together
            with ``topk=None`` gives exact attention under ``attn_bias``.
        topk: pool keys kept per query.
        window: sliding window of always-attended recent keys (causal ``attn_bias`` only).
        attn_bias: a standard xFormers bias (see ``SUPPORTED_BASE_BIASES``) or None.
        scale: logit scale, default ``K ** -0.5``.
    Returns the output shaped like ``q`` with ``v``'s last dim (and the lse
    ``[B, (G,) H, Mq]`` if ``return_lse``).
    """
    if (scores is None) != (topk is None):
        raise ValueError("scores and topk must both be given (sparse) or both be None (exact)")
    if topk is not None:
        check_topk_window_base(topk, window, attn_bias)
    else:
        check_topk_window_base(1, window, attn_bias)
    reasons = input_problems(q, k, v, scores, attn_bias)
    if reasons:
        raise ValueError("sparsek_attention: " + "; ".join(reasons))
    check_forward_only(attn_bias, (q, k, v, scores))
    prob = make_problem(q, k, v, scores, attn_bias, topk, window, scale)
    out_c, lse_c = run_problem(prob, window)
    out = prob.out_to_input(out_c)
    return (out, prob.lse_to_xformers(lse_c)) if return_lse else out
