"""The long-S forward + backward at S tokens (default 64K): median milliseconds per call and
the CUDA kernels of one call by device time (torch.profiler).  A label names the build in
the output, e.g. when scripts/gpu_check.sh's "bwd" step times BWD_VARIANTS side by side.

    python benchmarks/bwd_kernels.py [S] [--label NAME] [--top 8]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from common import LONG_S_TOPK, LONG_S_WINDOW, long_s_inputs, median_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("S", type=int, nargs="?", default=65536)
    ap.add_argument("--label", default="tree")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    S = args.S
    q, k, sc = long_s_inputs(S)
    G, H, D = q.shape[2], q.shape[3], q.shape[4]
    # the leaves: one K / V / score per group, expanded over its H query heads in the call
    qg = q.detach().requires_grad_()
    kg = k[:, :, :, :1].contiguous().requires_grad_()
    vg = torch.randn_like(kg).requires_grad_()
    sg = sc[..., :1].contiguous().requires_grad_()

    def run():
        o = xs.sparsek_attention(qg, kg.expand(1, S, G, H, D), vg.expand(1, S, G, H, D),
                                 sg.expand(1, S, G, H), LONG_S_TOPK, LONG_S_WINDOW,
                                 xab.LowerTriangularMask())
        o.backward(torch.ones_like(o))

    times = [median_ms(run, 3) for _ in range(3)]
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = e.self_cuda_time_total if t is None else t
        if t > 0:
            kernels.append((t / 1e3, e.count, e.key))
    total = sum(t for t, _, _ in kernels)
    print(f"[{args.label}] S={S} fwd+bwd ms " + " ".join(f"{t:.2f}" for t in times) +
          f"; kernels {total:.2f} ms")
    for t, n, name in sorted(kernels, reverse=True)[:args.top]:
        print(f"[{args.label}]   {t:8.3f} ms x{n:<3d} {name[:90]}")


if __name__ == "__main__":
    main()
