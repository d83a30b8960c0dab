"""Where one call's time goes: torch.profiler over the seed config (exact and sparse), the
64K forward, the 64K forward + backward and one SparseKCache decode step, printing the CUDA
kernels and the host time per call.

    python benchmarks/profile_calls.py [--out OUTDIR]
"""
import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import xformers_sparsek as xs
from common import long_s_attention


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
    avg = prof.key_averages()
    table = avg.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
    # the host side too: where the launch-side time goes (syncs show up as long CPU ops)
    table += "\n" + avg.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    text = (f"\n===== {name}: host {1e3 * host:.3f} ms/call, wall {1e3 * wall:.3f} ms/call "
            f"({iters} calls)\n{table}\n")
    print(text, flush=True)
    if out:
        with open(os.path.join(out, "profile.txt"), "a") as f:
            f.write(text)


def seed(out):
    B, H, S, D = 16, 96, 512, 64
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.float16) for _ in range(3))
    sc = torch.randn(B, S, H, device="cuda")
    report("seed exact", lambda: xs.sparsek_attention(q, k, v, None, None), 20, out)
    report("seed sparse topk=128", lambda: xs.sparsek_attention(q, k, v, sc, 128), 20, out)


def long_64k(out):
    call, _ = long_s_attention(65536, grad=True)

    def fwd():
        with torch.no_grad():  # (no graph: the plain eager path, as inference calls take)
            return call()

    report("long-64K fwd", fwd, 3, out)

    def fwd_bwd():
        o = call()
        o.backward(torch.ones_like(o))

    report("long-64K fwd+bwd", fwd_bwd, 2, out)


def decode_step(out):
    """One SparseKCache step at 32K context (the decode-C config of bench_decode.py)."""
    from xformers_sparsek.cache import SparseKCache

    B, G, Hg, D, ctx = 16, 8, 4, 128, 32768
    bf = dict(device="cuda", dtype=torch.bfloat16)
    cache = SparseKCache(B, G, D, topk=2048, window=512, **bf)
    for _ in range(ctx // 4096):
        kk = torch.randn(B, 4096, G, D, **bf)
        cache.update_and_attend(torch.randn(B, 4096, G, Hg, D, **bf), kk, kk,
                                torch.randn(B, 4096, G, device="cuda"))
    q1 = torch.randn(B, 1, G, Hg, D, **bf)
    k1 = torch.randn(B, 1, G, D, **bf)
    u1 = torch.randn(B, 1, G, device="cuda")
    report("decode step (eager, 32K context)",
           lambda: cache.update_and_attend(q1, k1, k1, u1), 10, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", nargs="*", default=["seed", "long_64k", "decode_step"],
                    choices=["seed", "long_64k", "decode_step"])
    args = ap.parse_args()
    for name in args.configs:  # each frees its tensors on return
        globals()[name](args.out)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
