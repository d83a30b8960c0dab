"""The long-S forward + backward at S tokens (default 64K): median milliseconds per call and
the CUDA kernels of one call by device time (torch.profiler).  A label names the build in
the output, e.g. when scripts/gpu_check.sh's "bwd" step times BWD_VARIANTS side by side.

    python benchmarks/bwd_kernels.py [S] [--label NAME] [--top 8] [--super-rows N]

--super-rows sets the dk/dv super-tile rows (_cuda._BWD_SUPER_ROWS; the Hopper kernel's
row tables hold BwdDkvSm90Traits::kMaxChunks x 64 rows, so a variant with fewer chunks needs
fewer rows).
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import kernel_rows, long_s_attention, median_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("S", type=int, nargs="?", default=65536)
    ap.add_argument("--label", default="tree")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--super-rows", type=int, default=None)
    args = ap.parse_args()
    if args.super_rows:
        from xformers_sparsek import _cuda

        _cuda._BWD_SUPER_ROWS = args.super_rows
    S = args.S
    call, _ = long_s_attention(S, grad=True)

    def run():
        o = call()
        o.backward(torch.ones_like(o))

    times = [median_ms(run, 3) for _ in range(3)]
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = kernel_rows(prof)
    total = sum(t for t, _, _ in kernels)
    print(f"[{args.label}] S={S} fwd+bwd ms " + " ".join(f"{t:.2f}" for t in times) +
          f"; kernels {total:.2f} ms")
    for t, n, name in kernels[:args.top]:
        print(f"[{args.label}]   {t:8.3f} ms x{n:<3d} {name[:90]}")


if __name__ == "__main__":
    main()
