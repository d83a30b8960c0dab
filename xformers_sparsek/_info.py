"""``python -m xformers_sparsek info``: what is installed and which backends can run.

torch and xformers are imported inside info() so that importing this module is free.
"""

import logging
import platform
import sys


def _xformers_line() -> str:
    # xformers logs a multi-line warning at import when its binary does not match
    # torch (always the case off torch 2.10+cu128); we report it in one line instead.
    xf_logger = logging.getLogger("xformers")
    old_level = xf_logger.level
    xf_logger.setLevel(logging.ERROR)
    try:
        import xformers
    except Exception as e:
        return f"not importable ({type(e).__name__}: {e})"
    finally:
        xf_logger.setLevel(old_level)
    cpp = getattr(xformers, "_cpp_lib", None)
    if getattr(xformers, "_has_cpp_library", False):
        kind = "CUDA build" if getattr(cpp, "_built_with_cuda", False) else "no CUDA"
        binary = f"loaded ({kind})"
    else:
        exc = getattr(cpp, "_cpp_library_load_exception", None)
        bi = getattr(exc, "build_info", None)
        if bi is not None:
            binary = (f"not loaded (built for torch {bi.torch_version}, "
                      f"Python {bi.python_version})")
        else:
            binary = "not loaded" + (f" ({str(exc).splitlines()[0]})" if exc else "")
    return f"{getattr(xformers, '__version__', '?')}, C++ binary {binary}"


def info() -> str:
    """Return (and print) a report of versions, devices and available backends."""
    from . import _ext
    from .version import __version__

    lines = [f"xformers_sparsek {__version__}",
             f"  python     {platform.python_version()} ({sys.executable})"]
    try:
        import torch
    except Exception as e:
        lines.append(f"  torch      not importable ({type(e).__name__}: {e})")
        torch = None
    if torch is not None:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        lines.append(f"  torch      {torch.__version__} ({build})")
        lines.append(f"  xformers   {_xformers_line()}")
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                cap = torch.cuda.get_device_capability(i)
                lines.append(f"  gpu {i}      {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
        else:
            lines.append("  gpu        none visible to torch")

    ext = _ext.load_extension()
    if ext is not None:
        try:
            bi = ext.build_info()
            detail = f"CUDA runtime {bi.get('cuda_version')}, archs {';'.join(bi.get('archs', []))}"
        except Exception as e:  # an extension without build_info() is still usable
            detail = f"build_info() failed: {e}"
        lines.append(f"  extension  xformers_sparsek._C loaded ({detail})")
    else:
        lines.append(f"  extension  {_ext.extension_error()}")

    reason = _ext.cuda_unavailable_reason()
    lines += ["backends:",
              "  torch (CPU/any device reference path): "
              + ("available" if torch is not None else "unavailable: torch is not importable"),
              "  cuda kernels: " + ("available" if reason is None else f"unavailable: {reason}")]
    text = "\n".join(lines)
    print(text)
    return text
