"""Chooses the implementation for one call: the CUDA kernels or the PyTorch path."""

from . import _attention


def forward(q, k, v, scores, layout, topk, scale):
    return _attention.forward(q, k, v, scores, layout, topk, scale)


def backward(dout, q, k, v, scores, out, lse, layout, topk, scale, sel, need_dscores):
    return _attention.backward(
        dout, q, k, v, scores, layout, topk, scale, sel=sel, need_dscores=need_dscores
    )
