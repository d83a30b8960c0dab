"""The selection kernels (csrc/sparsek/select_kernels.cuh) run on the CPU, bit for bit.

tests/select_emu/ compiles the kernels' own source with the host compiler under a small
warp emulator (every lane a fiber, warp intrinsics evaluated when all 32 lanes reach them)
together with the kernels as they were before the faster search (select_old.cuh).  On
tables built by ``_selection.build_tables`` both must give the same tau / ub / jb / nF / rb
to the bit, and match the PyTorch reference ``_selection.select``, on ties, near-equal
scores, every base bias (varlen, windows, bottom-right, local attention), topk from 1 to
past the pool, and several anchors per pass-0 warp.  No GPU needed.
"""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import BIAS_TYPES, kind_id, make_bias
from xformers.ops.fmha import attn_bias as xab

from xformers_sparsek import _selection
from xformers_sparsek._layout import build_layout

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CPU = torch.device("cpu")
FIELDS = ("tau", "ub", "jb", "nF", "rb")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("select_emu") / "libselect_emu.so")
    subprocess.run(
        ["g++", "-O2", "-std=c++17", "-ffp-contract=off", "-U_FORTIFY_SOURCE", "-fPIC",
         "-shared", "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(HERE, "select_emu"),
         os.path.join(HERE, "select_emu", "harness.cpp"), "-o", out],
        check=True,
    )
    return ctypes.CDLL(out)


def tables(scores, layout, topk):
    u = scores.float().double().contiguous()
    tb = _selection.build_tables(u)
    c = lambda t, dt: np.ascontiguousarray(t.numpy().astype(dt))  # noqa: E731
    return dict(zeros=c(tb.wm.zeros, np.int32), wsum=c(tb.wm.wsum, np.float64),
                nzeros=c(tb.wm.nzeros, np.int32), nbits=tb.wm.nbits, cb=c(tb.cb, np.float64),
                th_mid=c(tb.th_mid, np.int32), th_mid1=c(tb.th_mid1, np.int32),
                sv=c(tb.sv, np.float64), perm=c(tb.perm, np.int32),
                pool_lo=c(layout.pool_lo, np.int64), win_lo=c(layout.win_lo, np.int64),
                S=u.shape[0], NQ=layout.num_queries, NK=u.shape[1], topk=int(topk))


def run(lib, T, which, anchors_per_warp=4):
    """which: 0 = the old kernels, 1 = the new ones."""
    S, NQ = T["S"], T["NQ"]
    o = dict(piece=np.full((S, NQ), -7, np.int32), tau=np.zeros((S, NQ)), ub=np.zeros((S, NQ)),
             jb=np.zeros((S, NQ), np.int64), nF=np.zeros((S, NQ), np.int64),
             rb=np.zeros((S, NQ), np.int64))
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    i = ctypes.c_int
    err = lib.run_select(
        i(which), p(T["zeros"]), p(T["wsum"]), p(T["nzeros"]), i(T["nbits"]), p(T["cb"]),
        p(T["th_mid"]), p(T["th_mid1"]), p(T["sv"]), p(T["perm"]), p(T["pool_lo"]),
        p(T["win_lo"]), i(S), i(NQ), i(T["NK"]), i(T["topk"]), p(o["piece"]), p(o["tau"]),
        p(o["ub"]), p(o["jb"]), p(o["nF"]), p(o["rb"]), i(anchors_per_warp), None)
    assert err == 0, "divergent warp intrinsic"
    return o


def bits(a):
    return a.view(np.int64) if a.dtype == np.float64 else a


def check(lib, scores, layout, topk, apws=(4,)):
    T = tables(scores, layout, topk)
    old = run(lib, T, 0)
    ref = _selection.select(scores.float(), layout, topk)
    for apw in apws:
        new = run(lib, T, 1, apw)
        for f in FIELDS:
            assert np.array_equal(bits(new[f]), bits(old[f])), (f, apw)
    for f in FIELDS:  # the PyTorch reference: the same bits here (the kernels' one fused
        # multiply-add could in principle flip a comparison that rounds differently)
        assert np.array_equal(bits(old[f]), bits(getattr(ref, f).numpy())), f


def draw(dist, shape):
    if dist == "randn":
        return torch.randn(shape)
    if dist == "ties":
        return torch.randint(0, 4, shape).float() * 0.5
    if dist == "near_equal":
        return 1 + 1e-6 * torch.randn(shape)
    if dist == "bf16":
        return torch.randn(shape).bfloat16().float()
    if dist == "spread":
        return 30 * torch.randn(shape)
    raise AssertionError(dist)


DISTS = ["randn", "ties", "near_equal", "bf16", "spread"]


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("window", [0, 7, 64])
def test_causal(emu, dist, window):
    # (512: a power of two, whose top wavelet level the descents skip)
    for n, topk in ((70, 1), (300, 20), (512, 40), (1500, 100), (2600, 257), (200, 250)):
        sc = draw(dist, (2, n))
        lay = build_layout(xab.LowerTriangularMask(), 1, n, n, window, CPU)
        check(emu, sc, lay, topk, apws=(1, 3) if n > 1000 else (4, 16))


@pytest.mark.parametrize("kind", BIAS_TYPES, ids=kind_id)
@pytest.mark.parametrize("dist", ["randn", "ties", "near_equal"])
def test_every_bias(emu, kind, dist):
    base, B, Mq, Mk, causal = make_bias(kind, max_len=301, allow_empty=True)
    sc = draw(dist, (2, B * Mk))
    for window in ([0, 7, 64] if causal else [0]):
        lay = build_layout(base, B, Mq, Mk, window, CPU)
        for topk in (1, 5, 40, Mk + 1):
            check(emu, sc, lay, topk, apws=(1, 4))


def test_benchmark_shape_slice(emu):
    """The benchmark's pattern (causal, window 512, topk 2048, N(0, 1)) at 8K keys."""
    n = 8192
    sc = torch.randn(2, n)
    lay = build_layout(xab.LowerTriangularMask(), 1, n, n, 512, CPU)
    check(emu, sc, lay, 2048, apws=(4,))
