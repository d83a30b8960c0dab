"""Writes the selection search's inputs and outputs for the long-S config (B=1, 8 selection
heads, causal, topk=2048, window=512) as raw files, for benchmarks/select_harness.cu.

The arrays are the ones the package's CUDA path hands to ``select_queries`` (one float32
sort, ``select_tables``, ``wavelet_build``), and the outputs are that kernel's, so the
harness can check a kernel variant bit for bit.  On a GPU machine, from the repo root:
    python3 benchmarks/select_dump.py /tmp/sel64k [S]
"""
import os
import sys

import torch
from xformers.ops.fmha import attn_bias as xab

from common import LONG_S_TOPK, LONG_S_WINDOW, long_s_inputs
from xformers_sparsek import _ext
from xformers_sparsek._problem import make_problem


def main(out_dir, S=65536):
    C = _ext.load_extension()
    topk, window = LONG_S_TOPK, LONG_S_WINDOW
    q, k, sc = long_s_inputs(S)
    prob = make_problem(q, k, k, sc, xab.LowerTriangularMask(), topk, window, None)
    u = prob.scores.float().contiguous()
    sv32, perm = torch.sort(u, dim=1, stable=True)
    u64, sv, perm32, ranks, cb, thm, thm1 = C.select_tables(u, sv32, perm)
    zeros, wsum, nzeros = C.wavelet_build(ranks, u64)
    plo = prob.layout.pool_lo.contiguous()
    wlo = prob.layout.win_lo.contiguous()
    tau, ub, jb, nF, rb = C.select_queries(zeros, wsum, nzeros, cb, thm, thm1, sv, perm32, plo,
                                           wlo, topk)
    os.makedirs(out_dir, exist_ok=True)
    arrays = dict(zeros=zeros, wsum=wsum, nzeros=nzeros, cb=cb, th_mid=thm, th_mid1=thm1,
                  sv=sv, perm=perm32, pool_lo=plo, win_lo=wlo,
                  tau=tau, ub=ub, jb=jb, nF=nF, rb=rb)
    for name, t in arrays.items():
        t.contiguous().cpu().numpy().tofile(os.path.join(out_dir, name + ".bin"))
    S_heads, NK = sv.shape
    with open(os.path.join(out_dir, "meta.txt"), "w") as f:
        f.write(f"{S_heads} {plo.numel()} {NK} {zeros.shape[1]} {topk}\n")
    print(f"wrote {out_dir}: S={S_heads} NQ={plo.numel()} NK={NK} nbits={zeros.shape[1]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sel64k",
         int(sys.argv[2]) if len(sys.argv) > 2 else 65536)
