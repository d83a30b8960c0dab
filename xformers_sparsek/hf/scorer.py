"""``SparseKScorer``: the per-layer scoring network (pure PyTorch, no transformers import).

score_j = w_g . v_j + slope_g * j   (+ b_g, off by default: it cannot change anything)   for key j and KV head g,

where ``v_j`` is the layer's *value* state of token j for head g (the output of ``v_proj``,
which carries no rotary position, unlike the key states) and ``j`` the key's absolute index
in the layer's key sequence.  The score of key j depends on token j only (causal-safe), and
it can be recomputed from the value cache at any decoding step.

Initialisation (see docs/huggingface.md): ``w = 0`` and ``slope = init_slope``.  Then
the scores rise along the sequence, top-k picks the ``topk`` most recent pool keys and the
model starts as a sliding window of ``window + topk`` keys.  With ``slope >= 1`` every gate is
exactly 0 or 1 (an exact sliding window, but no gradient reaches the scorer: the capped-simplex
Jacobian is zero where no gate is fractional); with ``0.5 <= slope < 1`` the oldest selected
key gets gate ``(1 + slope) / 2`` and the next one ``(1 - slope) / 2`` (not attended), so
gradients flow.  Default ``init_slope = 0.5``: gates 1, ..., 1, 0.75.  ``slope = 0`` would be a
poor start: all pool scores tie, ties still pick the most recent keys, but every gate is
``topk / |P_i|``.
"""

from typing import Optional

import torch
from torch import nn


class SparseKScorer(nn.Module):
    """Linear score of each key's value state plus a position slope, one per KV head.

    Args:
        num_kv_heads: KV heads of the layer (``config.num_key_value_heads``).
        head_dim: dimension of the value states per head.
        topk: pool keys kept per query (``None``: exact attention, the scorer is unused).
        window: always-attended recent keys (causal layers).
        init_slope: initial position slope (see the module docstring).
        bias: add a per-head constant.  Off by default: the capped-simplex projection is
            invariant to adding one constant to all scores of a head (tau shifts with it), so
            a per-head bias never changes the output and never receives a gradient.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        topk: Optional[int] = None,
        window: int = 0,
        init_slope: float = 0.5,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.topk = topk
        self.window = int(window)
        self.init_slope = float(init_slope)
        self.weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads)) if bias else None
        self.slope = nn.Parameter(torch.full((num_kv_heads,), float(init_slope)))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()
            self.slope.fill_(self.init_slope)

    def forward(self, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """values ``[B, Hkv, S, Dv]`` (HF layout), positions ``[S]`` or ``[B, S]`` (absolute
        key indices) -> float32 scores ``[B, S, Hkv]``."""
        u = torch.einsum("bhsd,hd->bsh", values.float(), self.weight.float())
        if self.bias is not None:
            u = u + self.bias.float()
        pos = positions.to(device=u.device, dtype=torch.float32)
        return u + pos[..., None] * self.slope.float()

    def extra_repr(self) -> str:
        return (
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, topk={self.topk}, "
            f"window={self.window}, init_slope={self.init_slope}"
        )
