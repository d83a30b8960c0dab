"""Where one call's time goes: torch.profiler over the seed config (exact and sparse) and the
64K forward, printing the CUDA kernels and the host time per call.

    python benchmarks/profile_calls.py [--out OUTDIR]
"""
import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs


def report(name, fn, iters, out):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - t) / iters  # launch-side time per call (no sync inside)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / iters
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18,
                                      max_name_column_width=60)
    text = (f"\n===== {name}: host {1e3 * host:.3f} ms/call, wall {1e3 * wall:.3f} ms/call "
            f"({iters} calls)\n{table}\n")
    print(text, flush=True)
    if out:
        with open(os.path.join(out, "profile.txt"), "a") as f:
            f.write(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    B, H, S, D = 16, 96, 512, 64
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.float16) for _ in range(3))
    sc = torch.randn(B, S, H, device="cuda")
    report("seed exact", lambda: xs.sparsek_attention(q, k, v, None, None), 20, args.out)
    report("seed sparse topk=128", lambda: xs.sparsek_attention(q, k, v, sc, 128), 20, args.out)
    S, G, Hg, D = 65536, 8, 4, 128
    q = torch.randn(1, S, G, Hg, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16).expand(1, S, G, Hg, D)
    v = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16).expand(1, S, G, Hg, D)
    s = torch.randn(1, S, G, 1, device="cuda").expand(1, S, G, Hg)
    bias = xab.LowerTriangularMask()
    report("long-64K fwd", lambda: xs.sparsek_attention(q, k, v, s, 2048, 512, bias), 3, args.out)
    qg, kg, vg, sg = (x.detach().requires_grad_() for x in (q, k[:, :, :, :1], v[:, :, :, :1],
                                                            s[:, :, :, :1]))

    def fwd_bwd():
        o = xs.sparsek_attention(qg, kg.expand(1, S, G, Hg, D), vg.expand(1, S, G, Hg, D),
                                 sg.expand(1, S, G, Hg), 2048, 512, bias)
        o.backward(torch.ones_like(o))

    report("long-64K fwd+bwd", fwd_bwd, 2, args.out)
    del q, k, v, s, qg, kg, vg, sg
    torch.cuda.empty_cache()

    # one decode step of SparseKCache at 32K context (the decode-C config of bench_decode.py)
    from xformers_sparsek.cache import SparseKCache

    B, G, Hg, D, ctx = 16, 8, 4, 128, 32768
    cache = SparseKCache(B, G, D, topk=2048, window=512, dtype=torch.bfloat16, device="cuda")
    for _ in range(ctx // 4096):
        kk = torch.randn(B, 4096, G, D, device="cuda", dtype=torch.bfloat16)
        cache.update_and_attend(torch.randn(B, 4096, G, Hg, D, device="cuda", dtype=torch.bfloat16),
                                kk, kk, torch.randn(B, 4096, G, device="cuda"))
    q1 = torch.randn(B, 1, G, Hg, D, device="cuda", dtype=torch.bfloat16)
    k1 = torch.randn(B, 1, G, D, device="cuda", dtype=torch.bfloat16)
    u1 = torch.randn(B, 1, G, device="cuda")
    report("decode step (eager, 32K context)",
           lambda: cache.update_and_attend(q1, k1, k1, u1), 10, args.out)


if __name__ == "__main__":
    main()
