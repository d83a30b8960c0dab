"""``SparseKMask``: the xFormers attention bias that carries the SparseK parameters."""

from typing import Optional

import torch
from xformers.ops.fmha.attn_bias import AttentionBias

from ._layout import SUPPORTED_BASE_BIASES, is_causal


def _bias_names() -> str:
    return ", ".join(t.__name__ if t is not type(None) else "None" for t in SUPPORTED_BASE_BIASES)


def check_int(name: str, value, lo: int, where: str = "", or_none: bool = False,
              hint: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``lo`` (or None when
    ``or_none``).  The message names the argument; ``where`` prefixes it (e.g.
    "add_scorers: ") and ``hint`` follows the bound."""
    if or_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        alt = " or None" if or_none else hint
        raise ValueError(f"{where}{name} must be an int >= {lo}{alt}, got {value!r}")


def check_topk_window_base(topk, window, base) -> None:
    """Argument checks shared by SparseKMask and sparsek_attention (raise on bad input)."""
    if type(base) not in SUPPORTED_BASE_BIASES:
        raise NotImplementedError(
            f"base/attn_bias: unsupported bias type {type(base).__name__}; "
            f"supported: {_bias_names()}"
        )
    check_int("topk", topk, 1)
    check_int("window", window, 0)
    if window > 0 and not is_causal(base):
        raise ValueError(
            f"window={window} needs a causal base mask (a sliding window is defined by "
            f"distance to the query's own position); got {type(base).__name__}"
        )


class SparseKMask(AttentionBias):
    """SparseK attention around a standard xFormers bias.

    Args:
        scores: one importance score per key and KV head, shaped ``key.shape[:-1]``
            (``[B, Mk, H]`` for BMHK, ``[B, Mk, G, H]`` for BMGHK, where it is typically
            expanded with stride 0 over H so that a GQA group shares one selection).
        topk: number of pool keys each query keeps (``>= 1``).
        window: sliding window of always-attended recent keys (causal bases only).
        base: the xFormers bias that defines the allowed keys (None = all keys).

    The keys a query attends and their gates are defined in DESIGN.md section 1.  If
    ``scores.requires_grad``, ``memory_efficient_attention`` routes the call through
    :func:`xformers_sparsek.sparsek_attention` so the scores receive gradients.
    """

    def __init__(
        self,
        scores: torch.Tensor,
        topk: int,
        window: int = 0,
        base: Optional[AttentionBias] = None,
    ) -> None:
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
            raise ValueError(
                "scores must be a floating-point torch.Tensor shaped key.shape[:-1], "
                f"got {type(scores).__name__}"
                + (f" of dtype {scores.dtype}" if isinstance(scores, torch.Tensor) else "")
            )
        check_topk_window_base(topk, window, base)
        self.scores = scores
        self.topk = topk
        self.window = window
        self.base = base

    def to(self, device) -> "SparseKMask":
        base = self.base.to(device) if hasattr(self.base, "to") else self.base
        return SparseKMask(self.scores.to(device), self.topk, self.window, base)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
        raise NotImplementedError(
            "SparseKMask has no additive-bias form: its gates scale the logits and the "
            "values. Use xformers_sparsek.reference.sparsek_reference for a dense reference."
        )

    def __repr__(self) -> str:
        return (
            f"SparseKMask(scores={tuple(self.scores.shape)}, topk={self.topk}, "
            f"window={self.window}, base={type(self.base).__name__})"
        )
