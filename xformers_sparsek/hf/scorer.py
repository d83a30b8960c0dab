"""``SparseKScorer``: the per-layer scoring network (pure PyTorch, no transformers import).

score_j = w_g . v_j + slope_g * j   (+ b_g, off by default: it cannot change anything)
          (+ sink_bonus if j < sinks)   for key j and KV head g,

where ``v_j`` is the layer's *value* state of token j for head g (the output of ``v_proj``,
which carries no rotary position, unlike the key states) and ``j`` the key's position in
its own sequence (0 = its first real token).  The score of key j depends on token j only
(causal-safe), and it can be recomputed from the value cache at any decoding step.

Initialisation (see docs/huggingface.md): ``w = 0`` and ``slope = init_slope``.  Then
the scores rise along the sequence, top-k picks the ``topk`` most recent pool keys and the
model starts as a sliding window of ``window + topk`` keys.  With ``slope >= 1`` every gate is
exactly 0 or 1 (an exact sliding window, but no gradient reaches the scorer: the capped-simplex
Jacobian is zero where no gate is fractional); with ``0.5 <= slope < 1`` the oldest selected
key gets gate ``(1 + slope) / 2`` and the next one ``(1 - slope) / 2`` (not attended), so
gradients flow.  Default ``init_slope = 0.5``: gates 1, ..., 1, 0.75.  ``slope = 0`` would be a
poor start: all pool scores tie, ties still pick the most recent keys, but every gate is
``topk / |P_i|``.

Attention sinks (``sinks=4`` by default): keys at sequence positions ``0 .. sinks-1`` (the first
*real* tokens of each sequence: callers pass per-sequence positions, not padded-batch
indices) get a constant, non-learned ``sink_bonus`` (default ``1e6``) added to their score, so
they are in the top-k with gate 1 (they use ``sinks`` of the ``topk`` slots; the recent keys get
gates 1, ..., 1, 0.75 over the other ``topk - sinks`` slots at init).  This holds while
``sink_bonus >= max_j (w.v_j + slope*j) - min_sink (w.v_s + slope*s) + 1``, i.e. at init
``slope * (L - 1) + 1 <= sink_bonus``: ``L`` up to about 2e6 tokens at ``slope = 0.5``.
(Scores are float32: at 1e6 their ulp is 0.0625, harmless since a sink's gate is clipped to
1 and the selection runs in float64.)  Sinks break the invariance of the selection to a
per-sequence constant shift of the positions, hence the per-sequence positions.
"""

from typing import Optional

import torch
from torch import nn

from ..mask import check_int


class SparseKScorer(nn.Module):
    """Linear score of each key's value state plus a position slope, one per KV head.

    Args:
        num_kv_heads: KV heads of the layer (``config.num_key_value_heads``).
        head_dim: dimension of the value states per head.
        topk: pool keys kept per query (``None``: exact attention, the scorer is unused).
        window: always-attended recent keys (causal layers).
        init_slope: initial position slope (see the module docstring).
        sinks: the first ``sinks`` tokens of each sequence always get the top-k with gate 1
            (see the module docstring); ``0``: no sinks.
        sink_bonus: the constant added to the sinks' scores (not a parameter).
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
        sinks: int = 4,
        sink_bonus: float = 1e6,
    ) -> None:
        super().__init__()
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.topk = topk
        self.window = int(window)
        self.init_slope = float(init_slope)
        check_int("sinks", sinks, 0, "SparseKScorer: ")
        self.sinks = sinks
        self.sink_bonus = float(sink_bonus)
        self.weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_kv_heads)) if bias else None
        self.slope = nn.Parameter(torch.full((num_kv_heads,), float(init_slope)))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()
            self.slope.fill_(self.init_slope)

    def forward(self, values: torch.Tensor, positions: torch.Tensor,
                sinks: bool = True) -> torch.Tensor:
        """values ``[B, Hkv, S, Dv]`` (HF layout), positions ``[S]`` or ``[B, S]`` (each key's
        position in its own sequence: 0 = its first real token) -> float32 scores
        ``[B, S, Hkv]``.  ``sinks=False`` leaves out the sink bonus."""
        u = torch.einsum("bhsd,hd->bsh", values.float(), self.weight.float())
        if self.bias is not None:
            u = u + self.bias.float()
        pos = positions.to(device=u.device)
        u = u + pos.to(torch.float32)[..., None] * self.slope.float()
        if sinks and self.sinks > 0:
            is_sink = (pos >= 0) & (pos < self.sinks)
            u = u + torch.where(is_sink, self.sink_bonus, 0.0).to(torch.float32)[..., None]
        return u

    def extra_repr(self) -> str:
        return (
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, topk={self.topk}, "
            f"window={self.window}, init_slope={self.init_slope}, sinks={self.sinks}"
        )
