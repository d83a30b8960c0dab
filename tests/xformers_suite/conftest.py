"""Run xFormers' own ``tests/test_mem_eff_attention.py`` (v0.0.35) against SparseKOp.

Not collected by our own suite: ``scripts/run_xformers_suite.sh`` copies this file next to
xFormers' test module (and its ``utils.py``) in a temporary directory and runs pytest there.
Nothing from xFormers' test directory is stored in this repository.

What it does, before the test module is imported (conftests load first):
  * appends ``xformers_sparsek.FwOp`` / ``BwOp`` to ``fmha.ALL_FW_OPS`` / ``ALL_BW_OPS``
    (in place: the test module does ``from xformers.ops.fmha import ALL_FW_OPS``);
  * deselects every item whose parameters do not involve our op (xFormers' own ops, and
    tests with no op parameter), and items parametrized with ``SparseKMask``: xFormers'
    ``create_attn_bias`` cannot build one, and its dense reference checks exact mode only.
    Set ``SPARSEK_SUITE_ALL=1`` to keep every item (e.g. to see which op-less tests reach
    our op through dispatch);
  * calls ``xformers_sparsek.enable()``: several tests pass ``op=(our FwOp, None)`` and need
    automatic dispatch to find *a* backward op. With a working xFormers build on CUDA that
    would be one of xFormers' own; on a CPU-only torch, or where xFormers' binary does not
    load, there is none unless our op takes part in dispatch (``SPARSEK_SUITE_ENABLE=0``
    turns this off);
  * marks ``test_unsupported_cpu`` as a strict xfail: it asserts that no op accepts CPU
    inputs, and SparseKOp supports the CPU on purpose;
  * ``SPARSEK_SUITE_SAMPLE=N`` keeps a fixed 1/N of the big parametrizations (test_forward,
    test_backward, test_logsumexp, test_grad_checkpointing; chosen by a hash of the test
    name) for a quicker run; every other selected test still runs;
  * on a machine with CUDA, drops the ``cpu`` parametrizations (see ``_run_cpu_items``:
    xFormers' test helpers put block-diagonal biases on CUDA there; the CPU-only run covers
    them; ``SPARSEK_SUITE_CPU=1`` keeps them).

The hooks only act when xFormers' test module sits beside this file, so the conftest is
inert if pytest happens to load it from our own ``tests/`` tree.
"""

import os
import sys
import types
import zlib
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_ACTIVE = (_HERE / "test_mem_eff_attention.py").is_file()
_OUR_NAMES = ("sparsekF", "sparsekB")

if _ACTIVE:
    try:  # the test module imports scipy.stats.binomtest (dropout tests only)
        import scipy.stats  # noqa: F401
    except ImportError:  # e.g. the offline GPU machine: dropout tests never involve our op
        _stats = types.ModuleType("scipy.stats")

        def binomtest(*args, **kwargs):
            raise RuntimeError("scipy is not installed (stub from the sparsek conftest)")

        _stats.binomtest = binomtest
        _scipy = types.ModuleType("scipy")
        _scipy.stats = _stats
        sys.modules.setdefault("scipy", _scipy)
        sys.modules.setdefault("scipy.stats", _stats)

    import xformers_sparsek
    from xformers.ops import fmha

    _OURS = (xformers_sparsek.FwOp, xformers_sparsek.BwOp)
    if xformers_sparsek.FwOp not in fmha.ALL_FW_OPS:
        fmha.ALL_FW_OPS.append(xformers_sparsek.FwOp)
    if xformers_sparsek.BwOp not in fmha.ALL_BW_OPS:
        fmha.ALL_BW_OPS.append(xformers_sparsek.BwOp)
    if os.environ.get("SPARSEK_SUITE_ENABLE", "1") != "0":
        xformers_sparsek.enable()

_SAMPLED = ("test_forward", "test_backward", "test_logsumexp", "test_grad_checkpointing")
_NOT_APPLICABLE = {
    "test_unsupported_cpu": "asserts that no xFormers op accepts CPU inputs; SparseKOp "
    "supports the CPU by design (DESIGN.md section 3)",
}


def _mentions(value, targets) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_mentions(v, targets) for v in value)
    try:
        return value in targets
    except Exception:  # tensors etc.
        return False


def _involves_our_op(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_mentions(v, _OURS) for v in callspec.params.values()):
        return True
    return any(name in item.nodeid for name in _OUR_NAMES)


def _is_sparsek_mask_item(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(_mentions(v, (xformers_sparsek.SparseKMask,)) for v in callspec.params.values())


def pytest_report_header(config):
    if not _ACTIVE:
        return None
    import torch
    import xformers

    return (
        f"sparsek suite: xformers {xformers.__version__} tests, torch {torch.__version__}, "
        f"xformers_sparsek {xformers_sparsek.__version__} ({xformers_sparsek.__file__})"
    )


def _in_sample(item, n: int) -> bool:
    if n <= 1 or item.originalname not in _SAMPLED:
        return True
    return zlib.crc32(item.name.encode()) % n == 0


def _is_cpu_item(item) -> bool:
    # xFormers' test ids start "<op NAME>-<device>-<dtype>-..."
    return any(f"{name}-cpu-" in item.name for name in _OUR_NAMES)


def _run_cpu_items() -> bool:
    """On a machine with CUDA, xFormers' ``create_attn_bias`` builds block-diagonal biases on
    the default bias device (CUDA) even for the ``cpu`` parametrizations, and xFormers'
    input validation then rejects them ("Attention bias and Query/Key/Value should be on the
    same device") before any op runs: an artifact of the test helpers (xFormers' own ops
    never run on the CPU).  So the GPU run keeps the ``cuda`` items only; the CPU-only run
    covers the ``cpu`` ones.  SPARSEK_SUITE_CPU=1 keeps them anyway."""
    import torch

    return os.environ.get("SPARSEK_SUITE_CPU") == "1" or not torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if not _ACTIVE:
        return
    keep_all = os.environ.get("SPARSEK_SUITE_ALL") == "1"
    sample = int(os.environ.get("SPARSEK_SUITE_SAMPLE", "1") or 1)
    cpu_items = _run_cpu_items()
    keep, drop = [], []
    for item in items:
        if Path(str(item.fspath)).resolve().parent != _HERE:
            keep.append(item)  # not xFormers' module: leave alone
            continue
        if keep_all or (
            _involves_our_op(item) and not _is_sparsek_mask_item(item) and _in_sample(item, sample)
            and (cpu_items or not _is_cpu_item(item))
        ):
            keep.append(item)
            reason = _NOT_APPLICABLE.get(item.originalname)
            if reason and _involves_our_op(item):
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
