"""Lazy access to the compiled extension ``xformers_sparsek._C``.

The package must import and work (PyTorch reference path) without the extension:
on CPU-only torch it is never built, and a stale/mismatched build must not break
``import xformers_sparsek``. Nothing here raises; callers ask for the reason instead.
"""

import importlib
from typing import Any, Optional

_UNSET = object()
_module: Any = _UNSET  # the loaded module, None if unavailable, _UNSET before the first try
_error: Optional[str] = None


def load_extension():
    """The ``xformers_sparsek._C`` module, or None if it is not available."""
    global _module, _error
    if _module is _UNSET:
        try:
            import torch  # loads libtorch/libc10, which _C links against

            # import_module, not `from . import _C`: a missing module then raises
            # ModuleNotFoundError naming it, which _describe() relies on.
            _module, _error = importlib.import_module(f"{__package__}._C"), None
        except Exception as e:  # ImportError, OSError (undefined symbol, ...): never raise
            _module, _error = None, _describe(e)
    return _module


def _describe(e: BaseException) -> str:
    missing = isinstance(e, ModuleNotFoundError)
    if missing and e.name == "torch":
        return "torch is not importable"
    if missing and e.name == f"{__package__}._C":
        import torch

        if not torch.version.cuda:
            return f"not built: CPU-only torch ({torch.__version__})"
        return ("not built: xformers_sparsek._C is missing (reinstall with "
                "`pip install --no-build-isolation .` where nvcc is available)")
    # Present but unloadable, e.g. built against another torch (undefined symbol).
    return f"failed to load xformers_sparsek._C: {type(e).__name__}: {e}"


def extension_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it loaded."""
    load_extension()
    return _error


# Per CUDA device index: why the kernels cannot run there (None: they can).  A device's
# capability does not change, and the checks cost ~10 us of host time per call.
_device_reasons: dict = {}


def cuda_unavailable_reason(device=None) -> Optional[str]:
    """Why the CUDA kernels cannot run on ``device`` (default: current CUDA device), or None."""
    if load_extension() is None:
        return _error
    try:
        import torch

        if device is not None:
            device = torch.device(device)
            if device.type != "cuda":
                return f"device {device} is not a CUDA device"
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        index = device.index if device is not None and device.index is not None else (
            torch.cuda.current_device())
        reason = _device_reasons.get(index, _UNSET)
        if reason is _UNSET:
            cap = torch.cuda.get_device_capability(index)
            reason = f"GPU capability sm_{cap[0]}{cap[1]} < sm_80" if tuple(cap) < (8, 0) else None
            _device_reasons[index] = reason
        return reason
    except Exception as e:  # bad device string, driver trouble, ...
        return f"{type(e).__name__}: {e}"


def cuda_kernels_available(device=None) -> bool:
    """Extension loaded, CUDA available, and ``device`` has compute capability >= 8.0."""
    return cuda_unavailable_reason(device) is None
