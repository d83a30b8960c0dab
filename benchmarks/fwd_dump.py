"""Writes the Hopper forward kernel's inputs for the long-S config (B=1, Hq=32, Hkv=8, D=128,
bf16, causal, topk=2048, window=512; or exact mode) as raw files, for
benchmarks/fwd_long_harness.cu.

It runs the package's forward once and records the arguments of the extension's `fwd` call
(the selection's tau / boundary ranks / key ranks, the tiles' key lists, the layout), so the
harness times kernel variants on the real work items without torch.  q, k and v are not
written: the harness draws its own.  On a GPU machine, from the repo root:
    python3 benchmarks/fwd_dump.py /tmp/fwd64k [S] [sparse|exact]
"""
import os
import sys

from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from common import LONG_S_TOPK, LONG_S_WINDOW, long_s_inputs
from xformers_sparsek import _ext


def main(out_dir, S=65536, mode="sparse"):
    C = _ext.load_extension()
    topk, window = LONG_S_TOPK, LONG_S_WINDOW
    q, k, sc = long_s_inputs(S)
    recorded = {}
    fwd = C.fwd

    def record(*args):
        recorded["args"] = args
        return fwd(*args)

    C.fwd = record
    try:
        if mode == "sparse":
            xs.sparsek_attention(q, k, k, sc, topk, window, xab.LowerTriangularMask())
        else:
            xs.sparsek_attention(q, k, k, None, None, 0, xab.LowerTriangularMask())
    finally:
        C.fwd = fwd
    (qc, kc, vc, u, tau, rb, ranks, plo, wlo, whi, t0, t1, lists, counts, rp, scale) = \
        recorded["args"]
    os.makedirs(out_dir, exist_ok=True)
    arrays = dict(pool_lo=plo, win_lo=wlo, win_hi=whi, tile_q0=t0, tile_q1=t1)
    if u is not None:
        arrays.update(u=u, tau=tau, rb=rb, ranks=ranks, lists=lists, counts=counts)
    for name, t in arrays.items():
        t.contiguous().cpu().numpy().tofile(os.path.join(out_dir, name + ".bin"))
    NQ, S_heads, R, Dh = qc.shape
    cap = lists.shape[2] if u is not None else 0
    with open(os.path.join(out_dir, "meta.txt"), "w") as f:
        f.write(f"{NQ} {S_heads} {R} {Dh} {kc.shape[0]} {t0.numel()} {cap} {rp} {scale!r} "
                f"{int(u is not None)}\n")
    print(f"wrote {out_dir}: NQ={NQ} S={S_heads} R={R} RP={rp} tiles={t0.numel()} cap={cap}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fwd64k",
         int(sys.argv[2]) if len(sys.argv) > 2 else 65536,
         sys.argv[3] if len(sys.argv) > 3 else "sparse")
