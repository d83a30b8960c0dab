"""How SparseKOp joins xFormers' dispatch.

xFormers has no plugin registry: ``memory_efficient_attention`` looks ``_dispatch_fw``,
``_dispatch_bw`` and ``_memory_efficient_attention`` up in the globals of
``xformers.ops.fmha`` (DESIGN.md section 3), so we wrap those names there.

Two levels, by design:
  * **Always (on import):** inputs whose ``attn_bias`` is a ``SparseKMask`` go to
    SparseKOp.  Nothing else can run them, so existing models are unaffected.  If the mask's
    scores require grad, the call is routed through ``sparsek_attention`` so that the
    scores receive gradients (xFormers' autograd function only returns dq/dk/dv).
  * **``enable()``:** SparseKOp is also appended *after* xFormers' own ops for standard
    biases, so it is used only where no built-in op supports the inputs (e.g. CPU tensors,
    or a machine where xFormers' binary did not load).  ``disable()`` undoes it.
"""

import textwrap

import torch
from xformers.ops import fmha

from .mask import SparseKMask
from .ops import BwOp, FwOp

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


def _memory_efficient_attention(inp, op=None):
    b = inp.attn_bias
    if (
        isinstance(b, SparseKMask)
        and b.scores.requires_grad
        and torch.is_grad_enabled()
        and (op is None or op[0] is FwOp)
        and inp.p == 0.0
        and inp.output_dtype in (None, inp.query.dtype)
    ):
        from .functional import sparsek_attention

        return sparsek_attention(
            inp.query, inp.key, inp.value, b.scores, b.topk, b.window, b.base, inp.scale
        )
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
