"""``sparsify``: run unchanged xFormers models with SparseK attention.

    import xformers_sparsek
    with xformers_sparsek.sparsify(topk=2048, window=512):
        logits = model(tokens)        # its memory_efficient_attention calls become SparseK

Inside the block, every ``xformers.ops.memory_efficient_attention`` call whose ``attn_bias``
is a causal standard bias (``LowerTriangularMask``, ``BlockDiagonalCausalMask`` and its
local-attention / bottom-right / padded-keys relatives, see ``SUPPORTED_BASE_BIASES``) runs
with ``SparseKMask(scorer(q, k, v, bias), topk, window, base=bias)`` instead.  With
``noncausal=True`` non-causal biases (None, ``BlockDiagonalMask``) are sparsified too, with
``topk`` only (a sliding window needs a causal base).  Everything else is left alone: tensor
biases, calls with dropout, calls that already carry a ``SparseKMask``, calls that force
another ``op=``, and calls for which the scorer returns ``None``.

State lives in a ``contextvars.ContextVar`` (per thread and per asyncio task); blocks nest
and restore the previous setting on exit; ``sparsify(None)`` turns it off inside a block.
``sparsify(...).enable()`` sets a process-wide default (seen by every thread that has no
block of its own); ``disable_sparsify()`` clears it.
"""

import contextvars
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._layout import SUPPORTED_BASE_BIASES, is_causal
from .mask import SparseKMask, check_int
from .scorers import mean_query_scorer

_UNSET = object()
_CURRENT: contextvars.ContextVar = contextvars.ContextVar(
    "xformers_sparsek_sparsify", default=_UNSET
)
_GLOBAL: Optional["SparsifyConfig"] = None


@dataclass(frozen=True)
class SparsifyConfig:
    """What :func:`sparsify` applies.

    Args:
        topk: pool keys kept per query (int >= 1).
        window: sliding window of always-attended recent keys (causal biases only; ignored
            for non-causal ones).
        scorer: ``scorer(q, k, v, bias) -> scores`` shaped ``key.shape[:-1]`` (or None to
            leave a call exact); default :data:`xformers_sparsek.mean_query_scorer`.
        noncausal: also sparsify non-causal biases (None, ``BlockDiagonalMask``).
    """

    topk: int
    window: int = 0
    scorer: Optional[Callable] = None
    noncausal: bool = False

    def __post_init__(self) -> None:
        check_int("topk", self.topk, 1, "sparsify: ", hint=" (or None = off)")
        check_int("window", self.window, 0, "sparsify: ")
        if self.scorer is not None and not callable(self.scorer):
            raise ValueError(
                "sparsify: scorer must be a callable scorer(q, k, v, attn_bias) -> scores, "
                f"got {type(self.scorer).__name__}"
            )

    def mask_for(self, query, key, value, attn_bias) -> Optional[SparseKMask]:
        """The SparseKMask this config puts around ``attn_bias`` (None: leave the call)."""
        if type(attn_bias) not in SUPPORTED_BASE_BIASES:
            return None
        causal = is_causal(attn_bias)
        if not causal and not self.noncausal:
            return None
        scorer = self.scorer if self.scorer is not None else mean_query_scorer
        scores = scorer(query, key, value, attn_bias)
        if scores is None:
            return None
        if (
            not isinstance(scores, torch.Tensor)
            or not scores.is_floating_point()
            or tuple(scores.shape) != tuple(key.shape[:-1])
        ):
            got = (
                f"{scores.dtype} tensor of shape {tuple(scores.shape)}"
                if isinstance(scores, torch.Tensor)
                else type(scores).__name__
            )
            raise ValueError(
                f"sparsify: scorer {scorer!r} must return None or floating-point scores "
                f"shaped key.shape[:-1] = {tuple(key.shape[:-1])}, got {got}"
            )
        return SparseKMask(scores, self.topk, self.window if causal else 0, base=attn_bias)


class sparsify:
    """Context manager: SparseK for unchanged ``memory_efficient_attention`` calls.

    ``sparsify(topk, window=0, scorer=None, *, noncausal=False)``; ``sparsify(None)``
    switches it off inside the block.  ``__enter__`` returns the active
    :class:`SparsifyConfig` (or None).  ``.enable()`` makes it the process-wide default.
    One object may be entered several times, nested or from several threads.
    """

    def __init__(
        self,
        topk: Optional[int],
        window: int = 0,
        scorer: Optional[Callable] = None,
        *,
        noncausal: bool = False,
    ) -> None:
        self.config = None if topk is None else SparsifyConfig(topk, window, scorer, noncausal)
        # tokens of this object's open blocks, per context (thread / task)
        self._tokens: contextvars.ContextVar = contextvars.ContextVar(
            f"sparsify_tokens_{id(self)}", default=()
        )

    def __enter__(self) -> Optional[SparsifyConfig]:
        from .dispatch import install_routing

        install_routing()
        token = _CURRENT.set(self.config)
        self._tokens.set(self._tokens.get() + (token,))
        return self.config

    def __exit__(self, *exc) -> None:
        tokens = self._tokens.get()
        self._tokens.set(tokens[:-1])
        _CURRENT.reset(tokens[-1])

    def enable(self) -> "sparsify":
        """Make this the process-wide default (until :func:`disable_sparsify`)."""
        global _GLOBAL
        from .dispatch import install_routing

        install_routing()
        _GLOBAL = self.config
        return self

    def __repr__(self) -> str:
        return f"sparsify({self.config!r})"


def disable_sparsify() -> None:
    """Clear the process-wide default set by ``sparsify(...).enable()``."""
    global _GLOBAL
    _GLOBAL = None


def active_sparsify() -> Optional[SparsifyConfig]:
    """The config in force here: the innermost ``with sparsify`` block, else the
    process-wide default, else None."""
    cur = _CURRENT.get()
    return _GLOBAL if cur is _UNSET else cur
