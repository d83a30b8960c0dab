"""Build script for xformers_sparsek.

Install with ``pip install --no-build-isolation .``: the CUDA extension is built
against the torch already installed (torch is deliberately not a build-isolation
requirement, since an isolated build would fetch a different torch).

The extension ``xformers_sparsek._C`` is built when torch is a CUDA build and a
CUDA toolkit (nvcc) is found; otherwise the pure-Python package is installed and
one line says why. ``XFORMERS_SPARSEK_NO_CUDA=1`` forces the pure-Python install.
Environment: ``TORCH_CUDA_ARCH_LIST`` (e.g. "8.0;9.0a"), ``MAX_JOBS``, ``CUDA_HOME``.
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = ["8.0", "9.0a"]  # A100 (portable path) and H100 (wgmma needs sm_90a)


def read_version():
    # Read the file rather than import the package: importing it needs torch.
    ns = {}
    with open(os.path.join(HERE, "xformers_sparsek", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def has_cudart(root):
    pats = ("lib64/libcudart.so", "lib64/libcudart.so.*", "targets/x86_64-linux/lib/libcudart.so*")
    return any(glob.glob(os.path.join(root, p)) for p in pats)


def find_cuda_home():
    """Toolkit root: the directory holding bin/nvcc and the cudart library.

    torch's own guess (two levels above `which nvcc`) is wrong when nvcc on PATH
    is a wrapper script such as /usr/local/bin/nvcc -> `exec /usr/local/cuda-13.0/bin/nvcc "$@"`;
    the link then fails with `cannot find -lcudart`.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        with open(real, "rb") as f:
            head = f.read(4096)
        if not head.startswith(b"\x7fELF"):  # a script: look for the nvcc it execs
            text = head.decode("utf-8", "ignore")
            for p in re.findall(r"(/[^\s'\"$]*/bin/nvcc)(?![\w.-])", text):
                candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(p))))
    # Last resort: the conventional install locations, /usr/local/cuda first.
    others = sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += ["/usr/local/cuda"] + others
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and has_cudart(root):
            return root
    return None


def arch_gencode_flags():
    """-gencode flags for TORCH_CUDA_ARCH_LIST (default sm_80 + sm_90a).

    We pass the -gencode flags ourselves: torch's _get_cuda_arch_flags() returns []
    as soon as any nvcc flag contains 'arch', so torch adds no duplicates and its
    parsing of TORCH_CUDA_ARCH_LIST (which knows no "9.0a" on older torch) is bypassed.
    """
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    archs = [a for a in re.split(r"[;,\s]+", spec) if a] or DEFAULT_ARCHS
    flags, names = [], []
    for arch in archs:
        m = re.fullmatch(r"(?:sm_)?(\d+)\.?(\d)([af]?)(\+PTX)?", arch, re.IGNORECASE)
        if not m:
            sys.exit(f"xformers_sparsek: cannot parse TORCH_CUDA_ARCH_LIST entry {arch!r} "
                     "(expected e.g. '8.0', '9.0a', '9.0+PTX')")
        num = m.group(1) + m.group(2) + m.group(3).lower()
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):  # +PTX: also embed PTX for forward compatibility
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
        names.append(num)
    return flags, names


def cxx_std(torch):
    """torch >= 2.14 headers refuse C++17 (ATen.h: "#error C++20 or later ... is required");
    older ones accept both. Use one standard for .cpp and .cu so the objects agree."""
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten) as f:
            return "c++20" if "202002L" in f.read() else "c++17"
    except OSError:
        return "c++17"


def pip_cuda_include(cuda_home):
    """Headers ATen/cuda/CUDAContext.h needs (cusparse.h, cublas_v2.h, ...) when the toolkit
    is a minimal one without them (as on the CPU CI machine): take them from the
    nvidia-* wheels that the CUDA torch wheel depends on."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return None
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return None
    for root in nvidia.__path__:
        hits = sorted(glob.glob(os.path.join(root, "*", "include", "cusparse.h")))
        if hits:
            return os.path.dirname(hits[-1])
    return None


def cuda_extension():
    """(ext_modules, cmdclass), or ([], {}) with one line saying why not."""

    def skip(reason):
        print(f"xformers_sparsek: skipping CUDA extension ({reason}); "
              "installing the pure-Python package", file=sys.stderr)
        return [], {}

    if os.environ.get("XFORMERS_SPARSEK_NO_CUDA", "0") not in ("", "0"):
        return skip("XFORMERS_SPARSEK_NO_CUDA is set")
    try:
        import torch
    except ImportError:
        return skip("torch is not importable; install torch first, then "
                    "`pip install --no-build-isolation .`")
    if not torch.version.cuda:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("nvcc / CUDA toolkit not found; set CUDA_HOME")
    # Must be set before importing cpp_extension: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))  # ninja parallelism
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    gencode, arch_names = arch_gencode_flags()
    std = cxx_std(torch)
    print(f"xformers_sparsek: building CUDA extension (CUDA_HOME={cuda_home}, "
          f"archs={';'.join(arch_names)}, -std={std}, MAX_JOBS={os.environ['MAX_JOBS']})",
          file=sys.stderr)
    # Sources relative to setup.py (setuptools rejects absolute paths); sorted for stable builds.
    sources = sorted(
        os.path.relpath(p, HERE)
        for ext in ("cpp", "cu")
        for p in glob.glob(os.path.join(HERE, "csrc", "**", f"*.{ext}"), recursive=True)
    )
    # Uppercase name on purpose: torch scans nvcc flags for the substring 'arch'.
    define_archs = f'-DXSK_ARCHS="{";".join(arch_names)}"'
    cxx_flags = ["-O3", f"-std={std}", define_archs]
    extra_inc = pip_cuda_include(cuda_home)
    if extra_inc:  # -idirafter: searched last, so the toolkit's own headers still win
        cxx_flags += ["-idirafter", extra_inc]
    nvcc_flags = [
        "-O3", "--use_fast_math", f"-std={std}", "-lineinfo", "--expt-relaxed-constexpr",
        # torch defines the __CUDA_NO_HALF*__ macros; kernels want the fp16/bf16 operators.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "--threads", "2",  # compile the gencode targets of one file in parallel
        define_archs,
    ] + gencode
    ext = CUDAExtension(
        name="xformers_sparsek._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="xformers_sparsek",
    version=read_version(),
    description="SparseK attention (arXiv:2406.16747) as an xFormers fMHA operator, "
                "with CUDA kernels and a PyTorch reference path",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["xformers_sparsek", "xformers_sparsek.*"]),
    install_requires=["torch", "xformers>=0.0.35", "numpy"],
    extras_require={
        # transformers/diffusers: the integration tests (they skip without them)
        "test": ["pytest", "pybind11", "transformers>=5", "diffusers"],
        "hf": ["transformers>=5"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
