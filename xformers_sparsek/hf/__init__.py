"""Hugging Face transformers integration (needs ``transformers >= 5``; importing this module
does not import transformers, ``register()`` and ``SparseKHFCache`` do).

    from xformers_sparsek.hf import add_scorers
    model = AutoModelForCausalLM.from_pretrained(...)
    add_scorers(model, topk=256, window=128)   # registers and selects attn_implementation="sparsek"

See docs/huggingface.md.
"""

from .attention import NAME, sparsek_attention_forward
from .scorer import SparseKScorer

_REGISTERED = False


def register(name: str = NAME) -> str:
    """Register ``attn_implementation=name`` (default ``"sparsek"``) with transformers'
    ``AttentionInterface`` and ``AttentionMaskInterface`` (the latter with ``sdpa_mask``, so
    padded batches arrive with a boolean mask).  Idempotent; returns the name."""
    global _REGISTERED
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for bad in ("flash", "sdpa", "flex_attention", "/"):
        if bad in name:
            raise ValueError(f"register: name {name!r} must not contain {bad!r} (transformers routes those elsewhere)")
    AttentionInterface.register(name, sparsek_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    _REGISTERED = True
    return name


from .model import (  # noqa: E402
    add_scorers,
    from_pretrained,
    load_scorer_weights,
    remove_scorers,
    scorer_parameters,
)


def __getattr__(name):
    # SparseKHFCache subclasses transformers' Cache: import it (and transformers) on first use.
    if name == "SparseKHFCache":
        from .cache import SparseKHFCache

        return SparseKHFCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "register",
    "sparsek_attention_forward",
    "SparseKScorer",
    "add_scorers",
    "remove_scorers",
    "scorer_parameters",
    "load_scorer_weights",
    "from_pretrained",
    "SparseKHFCache",
    "NAME",
]
