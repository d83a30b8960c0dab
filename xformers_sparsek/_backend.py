"""Chooses the implementation for one call: the CUDA kernels or the PyTorch path.

The CUDA kernels run when ``_cuda.unsupported_reason`` finds nothing against the inputs;
otherwise (CPU tensors, float32, other head dims, ...) the PyTorch path runs, on any
device.  ``XFORMERS_SPARSEK_FORCE_TORCH=1`` forces the PyTorch path (for testing).

Non-finite scores are a ValueError on both paths.  The PyTorch path checks them first (a host
sync); the CUDA path zeroes them on the GPU and reads the flag after its launches
(``_cuda.forward``), so the GPU does not idle through the check.
"""

import os

import torch

from . import _attention, _cuda


def check_scores_finite(scores) -> None:
    if scores is not None and not bool(torch.isfinite(scores).all()):
        raise ValueError(_cuda.SCORES_NOT_FINITE)


def _use_cuda(q, k, v, scores, layout) -> bool:
    if os.environ.get("XFORMERS_SPARSEK_FORCE_TORCH", "0") not in ("", "0"):
        return False
    return _cuda.unsupported_reason(q, k, v, scores, layout) is None


def forward(q, k, v, scores, layout, topk, scale):
    if _use_cuda(q, k, v, scores, layout):
        res = _cuda.forward(q, k, v, scores, layout, topk, scale)  # (checks the scores)
        if res is not None:
            return res
    else:
        check_scores_finite(scores)
    return _attention.forward(q, k, v, scores, layout, topk, scale)


def backward(dout, q, k, v, scores, out, lse, layout, topk, scale, sel, need_dscores):
    if _use_cuda(q, k, v, scores, layout):
        res = _cuda.backward(dout, q, k, v, scores, out, lse, layout, topk, scale, sel)
        if res is not None:
            dq, dk, dv, ds = res
            return dq, dk, dv, (ds if need_dscores else None)
    return _attention.backward(
        dout, q, k, v, scores, layout, topk, scale, sel=sel, need_dscores=need_dscores
    )
