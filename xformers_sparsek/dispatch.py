"""How SparseKOp joins xFormers' dispatch.

xFormers has no plugin registry: ``memory_efficient_attention`` looks ``_dispatch_fw``,
``_dispatch_bw`` and ``_memory_efficient_attention`` up in the globals of
``xformers.ops.fmha`` (DESIGN.md section 3), so we wrap those names there.

Two levels, by design:
  * **Always (on import):** inputs whose ``attn_bias`` is a ``SparseKMask`` go to
    SparseKOp.  Nothing else can run them, so existing models are unaffected.  If the mask's
    scores require grad, or 5-D (BMGHK) inputs need a backward with SparseKOp, the call is
    routed through ``sparsek_attention`` (xFormers' autograd function only returns
    dq/dk/dv, and its backward handles BMK/BMHK only).
  * **``enable()``:** SparseKOp is also appended *after* xFormers' own ops for standard
    biases, so it is used only where no built-in op supports the inputs (e.g. CPU tensors,
    or a machine where xFormers' binary did not load).  ``disable()`` undoes it.
  * **``sparsify(...)``** (sparsify.py): inside the block, calls with a causal standard
    bias (or any supported bias with ``noncausal=True``) get that bias wrapped into a
    ``SparseKMask`` from the block's scorer, then take the first route.  BMK inputs carrying
    a ``SparseKMask`` (scores ``[B, M]``) are run as BMHK with one head.
"""

import dataclasses
import textwrap

import torch
from xformers.ops import fmha

from ._paged import check_forward_only
from .mask import SparseKMask
from .ops import BwOp, FwOp
from .sparsify import active_sparsify

_FMHA = fmha._memory_efficient_attention_forward.__globals__
_ORIGINAL = {}
_ENABLED = False


def _reasons_error(name: str, op, inp) -> NotImplementedError:
    reasons = op.not_supported_reasons(inp)
    return NotImplementedError(
        f"No operator found for `{name}` with a SparseKMask:\n"
        + textwrap.indent("\n".join(reasons), "    ")
    )


def _dispatch_fw(inp, needs_gradient: bool):
    if isinstance(inp.attn_bias, SparseKMask):
        if FwOp.supports(inp):
            return FwOp
        raise _reasons_error("memory_efficient_attention_forward", FwOp, inp)
    try:
        return _ORIGINAL["_dispatch_fw"](inp, needs_gradient)
    except NotImplementedError as e:
        if _ENABLED and FwOp.supports(inp):
            return FwOp
        raise e


def _dispatch_bw(inp, varlen_lse_packed):
    if isinstance(inp.attn_bias, SparseKMask):
        if BwOp.supports(inp):
            return BwOp
        raise _reasons_error("memory_efficient_attention_backward", BwOp, inp)
    try:
        return _ORIGINAL["_dispatch_bw"](inp, varlen_lse_packed)
    except NotImplementedError as e:
        # BwOp recomputes its statistics, so it takes either lse format.
        if _ENABLED and BwOp.supports(inp):
            return BwOp
        raise e


def _runs_on_sparsek(inp, op) -> bool:
    """SparseKMask inputs run on SparseKOp unless another op is forced; plain biases only
    when SparseKOp is asked for explicitly."""
    if isinstance(inp.attn_bias, SparseKMask):
        return op is None or op[0] is FwOp
    return op is not None and op[0] is FwOp


def _needs_functional_path(inp, op) -> bool:
    """Cases xFormers' autograd function can't serve but sparsek_attention can: score
    gradients, and any backward of 5-D (BMGHK) inputs (xFormers' backward reshapes the
    gradient as BMK/BMHK only)."""
    if not torch.is_grad_enabled() or inp.p != 0.0:
        return False
    if inp.output_dtype not in (None, inp.query.dtype):
        return False
    if not _runs_on_sparsek(inp, op):
        return False
    b = inp.attn_bias
    ours = isinstance(b, SparseKMask)
    qkv_grad = any(t.requires_grad for t in (inp.query, inp.key, inp.value))
    return (ours and b.scores.requires_grad) or (inp.query.ndim == 5 and qkv_grad)


def _as_bmhk(inp):
    """BMK inputs [B, M, K] as BMHK with one head; a SparseKMask's [B, M] scores follow."""
    b = inp.attn_bias
    if isinstance(b, SparseKMask) and b.scores.ndim == 2:
        b = SparseKMask(b.scores.unsqueeze(-1), b.topk, b.window, b.base)
    q, k, v = (t.unsqueeze(2) for t in (inp.query, inp.key, inp.value))
    return dataclasses.replace(inp, query=q, key=k, value=v, attn_bias=b)


def _sparsified(inp, op):
    """``sparsify`` (see sparsify.py): wrap a standard bias into a SparseKMask, or None."""
    cfg = active_sparsify()
    if cfg is None or inp.p != 0.0 or isinstance(inp.attn_bias, (SparseKMask, torch.Tensor)):
        return None
    if op is not None and op[0] is not FwOp:
        return None  # the caller forced another op
    mask = cfg.mask_for(inp.query, inp.key, inp.value, inp.attn_bias)
    return None if mask is None else dataclasses.replace(inp, attn_bias=mask)


def _check_paged_grad(inp, op) -> None:
    """Paged biases are forward-only (as in xFormers' own paged ops): fail at the forward,
    not at the backward, when an autograd call on SparseKOp would need gradients.  The
    lower-level ``memory_efficient_attention_forward_requires_grad`` still returns the lse."""
    if not _runs_on_sparsek(inp, op):
        return
    b = inp.attn_bias
    if isinstance(b, SparseKMask):
        check_forward_only(b.base, (inp.query, inp.key, inp.value, b.scores))
    else:
        check_forward_only(b, (inp.query, inp.key, inp.value))


def _memory_efficient_attention(inp, op=None):
    if inp.query.ndim == 3 and not isinstance(inp.attn_bias, torch.Tensor) and (
        isinstance(inp.attn_bias, SparseKMask) or active_sparsify() is not None
    ):
        return _memory_efficient_attention(_as_bmhk(inp), op).squeeze(2)
    inp = _sparsified(inp, op) or inp
    _check_paged_grad(inp, op)
    if _needs_functional_path(inp, op):
        from .functional import sparsek_attention

        b = inp.attn_bias
        if isinstance(b, SparseKMask):
            return sparsek_attention(
                inp.query, inp.key, inp.value, b.scores, b.topk, b.window, b.base, inp.scale
            )
        return sparsek_attention(inp.query, inp.key, inp.value, None, None, 0, b, inp.scale)
    return _ORIGINAL["_memory_efficient_attention"](inp, op)


def install_routing() -> None:
    """Route SparseKMask inputs to SparseKOp (idempotent; done on import)."""
    for name, fn in (
        ("_dispatch_fw", _dispatch_fw),
        ("_dispatch_bw", _dispatch_bw),
        ("_memory_efficient_attention", _memory_efficient_attention),
    ):
        if name not in _ORIGINAL:
            _ORIGINAL[name] = _FMHA[name]
            _FMHA[name] = fn


def enable() -> None:
    """Let automatic dispatch fall back to SparseKOp for standard biases too."""
    global _ENABLED
    install_routing()
    _ENABLED = True


def disable() -> None:
    """Standard biases go back to xFormers' own ops only (SparseKMask keeps working)."""
    global _ENABLED
    _ENABLED = False


def is_enabled() -> bool:
    return _ENABLED
