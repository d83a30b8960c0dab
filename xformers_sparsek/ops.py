"""The xFormers operator: ``SparseKOp = (FwOp, BwOp)``.

Support tables are class attributes, as for xFormers' own backends.  Without a
``SparseKMask`` the op is exact attention under the standard bias types it lists.
"""

from typing import Any, Iterable, List, Optional, Set, Tuple

import torch
from xformers.ops.fmha.common import (
    AttentionBwOpBase,
    AttentionFwOpBase,
    Context,
    Gradients,
    Inputs,
)

from . import _attention, _backend
from ._layout import SUPPORTED_BASE_BIASES
from ._paged import FORWARD_ONLY, is_paged
from ._problem import input_problems, make_problem
from .functional import forward_without_autograd, sparsek_attention
from .mask import SparseKMask

# Reasons xFormers' base class adds that do not apply to us: our CUDA support comes from
# our own extension (not xFormers' binary), and our CPU path handles bf16.
_FOREIGN_REASONS = ("xFormers wasn't build with CUDA support", "bf16 is only supported on A100+ GPUs")

_SCORE_GRAD_HINT = (
    "SparseKMask.scores requires grad, but this xFormers entry point can only return "
    "gradients for query/key/value. Call xformers_sparsek.sparsek_attention(q, k, v, "
    "scores, topk, window, attn_bias) (or memory_efficient_attention, which routes there), "
    "or pass scores.detach()."
)


def _split_bias(bias) -> Tuple[Any, Optional[SparseKMask]]:
    if isinstance(bias, SparseKMask):
        return bias.base, bias
    return bias, None


def _problem_of(inp: Inputs):
    base, mask = _split_bias(inp.attn_bias)
    if mask is None:
        return make_problem(inp.query, inp.key, inp.value, None, base, None, 0, inp.scale), 0
    return (
        make_problem(
            inp.query, inp.key, inp.value, mask.scores, base, mask.topk, mask.window, inp.scale
        ),
        mask.window,
    )


class _SupportMixin:
    OPERATOR = _attention.forward  # the PyTorch path always exists
    SUPPORTED_DEVICES: Set[str] = {"cpu", "cuda"}
    CUDA_MINIMUM_COMPUTE_CAPABILITY = (8, 0)
    SUPPORTED_DTYPES: Set[torch.dtype] = {torch.float32, torch.float16, torch.bfloat16}
    SUPPORTED_MAX_K = 256
    SUPPORTED_MIN_K = 8
    SUPPORTED_ATTN_BIAS_TYPES: Iterable[Any] = (SparseKMask,) + SUPPORTED_BASE_BIASES
    SUPPORTS_DROPOUT = False
    SUPPORTS_CUSTOM_SCALE = True
    SUPPORTS_DIFFERENT_VALUE_EMBED = True
    SUPPORTS_BMGHK = True
    IS_DETERMINISTIC = True
    # lse is [B, (G,) H, Mq]; for block-diagonal masks (B == 1) that is the packed form.
    VARLEN_LSE_PACKED = True

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> List[str]:
        reasons = [
            r for r in super().not_supported_reasons(d)  # type: ignore[misc]
            if not r.startswith(_FOREIGN_REASONS)
        ]
        if d.query.ndim not in (4, 5):
            # xFormers turns BMK into BMHK before calling us; anything else is malformed.
            return reasons + ["query must be BMK, BMHK or BMGHK"]
        base, mask = _split_bias(d.attn_bias)
        reasons += input_problems(
            d.query, d.key, d.value, mask.scores if mask is not None else None, base
        )
        return reasons


class FwOp(_SupportMixin, AttentionFwOpBase):
    """SparseK attention forward (PyTorch path on CPU, CUDA kernels on sm80+)."""

    NAME = "sparsekF"

    @classmethod
    def apply(cls, inp: Inputs, needs_gradient: bool) -> Tuple[torch.Tensor, Optional[Context]]:
        base, mask = _split_bias(inp.attn_bias)
        if mask is not None and mask.scores.requires_grad and torch.is_grad_enabled():
            if needs_gradient:
                raise ValueError(_SCORE_GRAD_HINT)
            # Forward-only entry point with grad enabled: deliver score gradients through
            # the functional path's autograd graph.
            out = sparsek_attention(
                inp.query, inp.key, inp.value, mask.scores, mask.topk, mask.window,
                base, inp.scale,
            )
            return out, None
        prob, _ = _problem_of(inp)
        out_c, lse_c = forward_without_autograd(prob)
        out = prob.out_to_input(out_c)
        ctx = Context(out=out, lse=prob.lse_to_xformers(lse_c)) if needs_gradient else None
        return out, ctx


class BwOp(_SupportMixin, AttentionBwOpBase):
    """SparseK attention backward: dq, dk, dv (score gradients: see sparsek_attention).

    It reuses the forward's lse when it is in SparseKOp's layout and otherwise recomputes
    the softmax statistics, so it accepts the lse of any forward op (packed or padded).
    """

    NAME = "sparsekB"

    @classmethod
    def not_supported_reasons(cls, d: Inputs) -> List[str]:
        reasons = super().not_supported_reasons(d)
        base = _split_bias(d.attn_bias)[0]
        if is_paged(base):
            reasons.append(FORWARD_ONLY.format(type(base).__name__))
        return reasons

    @classmethod
    def apply(cls, ctx: Context, inp: Inputs, grad: torch.Tensor) -> Gradients:
        base, mask = _split_bias(inp.attn_bias)
        if mask is not None and mask.scores.requires_grad:
            raise ValueError(_SCORE_GRAD_HINT)
        prob, _ = _problem_of(inp)
        # The forward's out/lse let the CUDA backward skip a recomputation; an lse in
        # another layout (another forward op) means the PyTorch path recomputes it.
        lse = prob.lse_from_xformers(ctx.lse)
        out = prob.to_canonical(ctx.out) if lse is not None else None
        dq, dk, dv, _ = _backend.backward(
            prob.to_canonical(grad), prob.q, prob.k, prob.v, prob.scores, out, lse,
            prob.layout, prob.topk, prob.scale, None, False,
        )
        return Gradients(
            dq=prob.grad_to_input(dq, keys=False),
            dk=prob.grad_to_input(dk, keys=True),
            dv=prob.grad_to_input(dv, keys=True),
        )


SparseKOp = (FwOp, BwOp)
