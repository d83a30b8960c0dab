"""Packaging / build checks: fast, and run everywhere (CPU CI and the GPU machine).

On a CUDA build of torch, test_extension_built is the compile check: CI builds the
extension with `pip install --no-build-isolation -e .` and this fails if it was not
built or does not load.
"""

import os
import subprocess
import sys

import pytest
import torch

import xformers_sparsek
from xformers_sparsek import _ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(*args, **kw):
    # cwd=REPO so an in-place build (no install, as on the GPU machine) is importable too.
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kw)


def test_version():
    from xformers_sparsek.version import __version__

    assert xformers_sparsek.__version__ == __version__


def test_import_without_extension():
    # None in sys.modules makes `import xformers_sparsek._C` fail, as on a CPU-only install.
    code = ("import sys; sys.modules['xformers_sparsek._C'] = None\n"
            "import xformers_sparsek\n"
            "from xformers_sparsek import _ext\n"
            "assert _ext.load_extension() is None\n"
            "assert _ext.extension_error()\n"
            "assert not _ext.cuda_kernels_available()\n"
            "print('ok')\n")
    r = run_py("-c", code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_info_mentions_torch(capsys):
    from xformers_sparsek._info import info

    text = info()
    assert isinstance(text, str) and "torch" in text and "backends:" in text
    assert text in capsys.readouterr().out


def test_cli_info():
    r = run_py("-m", "xformers_sparsek", "info")
    assert r.returncode == 0, r.stdout + r.stderr
    assert torch.__version__ in r.stdout and "cuda kernels:" in r.stdout


def test_cli_help_lists_subcommands():
    r = run_py("-m", "xformers_sparsek", "--help")
    assert r.returncode == 0, r.stderr
    assert "info" in r.stdout and "demo" in r.stdout


@pytest.mark.skipif(not torch.version.cuda,
                    reason=f"torch {torch.__version__} is a CPU-only build: the CUDA extension "
                           "is not built, nothing to check")
@pytest.mark.skipif(os.environ.get("XFORMERS_SPARSEK_NO_CUDA", "0") not in ("", "0"),
                    reason="XFORMERS_SPARSEK_NO_CUDA is set: pure-Python install requested")
def test_extension_built():
    ext = _ext.load_extension()
    assert ext is not None, f"CUDA torch but no extension: {_ext.extension_error()}"
    bi = ext.build_info()
    assert bi["archs"] and int(bi["cuda_version"]) >= 11000, bi


@pytest.mark.skipif(not _ext.cuda_kernels_available(),
                    reason=f"CUDA kernels unavailable: {_ext.cuda_unavailable_reason()}")
def test_cuda_build_covers_device_small():
    # A cubin for sm_XY runs on sm_XZ with Z >= Y; an arch-specific one (sm_90a) only on
    # that exact GPU. Catches e.g. TORCH_CUDA_ARCH_LIST=9.0a builds used on an A100.
    major, minor = torch.cuda.get_device_capability()
    archs = _ext.load_extension().build_info()["archs"]
    ok = [a for a in archs
          if int(a.rstrip("af")) // 10 == major and (
              int(a.rstrip("af")) % 10 == minor if a[-1] in "af" else int(a) % 10 <= minor)]
    assert ok, f"extension built for {archs}, GPU is sm_{major}{minor}"
