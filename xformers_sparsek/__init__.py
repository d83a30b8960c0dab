"""xformers_sparsek: SparseK attention as an xFormers fMHA operator.

    import xformers.ops as xops
    from xformers_sparsek import SparseKMask, SparseKOp
    out = xops.memory_efficient_attention(q, k, v, attn_bias=SparseKMask(scores, topk=2048,
                                          window=512, base=xops.LowerTriangularMask()),
                                          op=SparseKOp)

Importing the package routes ``SparseKMask`` inputs to ``SparseKOp`` (nothing else can run
them); ``enable()`` additionally lets automatic dispatch fall back to ``SparseKOp`` for
standard biases that no built-in xFormers op supports.  See ``dispatch``.
"""

from ._info import info
from .cache import SparseKCache
from ._layout import SUPPORTED_BASE_BIASES
from .dispatch import disable, enable, install_routing, is_enabled
from .functional import sparsek_attention
from .mask import SparseKMask
from .ops import BwOp, FwOp, SparseKOp
from .scorers import MeanQueryScorer, mean_query_scorer
from .sparsify import SparsifyConfig, active_sparsify, disable_sparsify, sparsify
from .version import __version__

install_routing()

# Hugging Face integration (xformers_sparsek.hf), importable without transformers installed.
_HF_NAMES = ("SparseKScorer", "add_scorers", "register_hf")


def __getattr__(name):
    if name in _HF_NAMES:
        from . import hf

        return hf.register if name == "register_hf" else getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SparseKOp",
    "FwOp",
    "BwOp",
    "SparseKMask",
    "sparsek_attention",
    "SparseKCache",
    "enable",
    "disable",
    "is_enabled",
    "sparsify",
    "SparsifyConfig",
    "active_sparsify",
    "disable_sparsify",
    "MeanQueryScorer",
    "mean_query_scorer",
    "info",
    "SUPPORTED_BASE_BIASES",
    "__version__",
    *_HF_NAMES,
]
