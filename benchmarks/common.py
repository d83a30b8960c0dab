"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

import statistics
import subprocess
import time


def _elapsed_ms(fn, calls, cuda):
    """Milliseconds for `calls` calls of `fn` issued back to back: CUDA events around them,
    or perf_counter on the CPU."""
    import torch

    if cuda:
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - t)


def _warm(fn, warmup, cuda):
    import torch

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()


def median_ms(fn, iters=10, warmup=3, cuda=True):
    """Median milliseconds of single calls of `fn`: CUDA events, or perf_counter on the CPU."""
    _warm(fn, warmup, cuda)
    return statistics.median(_elapsed_ms(fn, 1, cuda) for _ in range(iters))


def back_to_back_ms(fn, n=50, reps=3, cuda=True):
    """Milliseconds per call of `fn` issued n times back to back (median of reps): the GPU
    time per call once the host runs ahead, as in a generation loop (no launch gaps)."""
    _warm(fn, 1, cuda)
    return statistics.median(_elapsed_ms(fn, n, cuda) / n for _ in range(reps))


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", flush=True)
        return None
    return plt


def commit(given=None):
    """The commit benchmarked: `given` (the device's copy of the tree has no .git), else git."""
    if given:
        return given
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


# The long-S config (B=1, Hq=32 in G=8 groups of H=4, D=128, bf16, causal) as the dump
# scripts draw it: one K tensor (also used as V) and one score per key, each expanded over a
# group's query heads.
LONG_S_GROUPS, LONG_S_HEADS, LONG_S_DIM, LONG_S_TOPK, LONG_S_WINDOW = 8, 4, 128, 2048, 512


def long_s_inputs(S, seed=0):
    """(q, k, scores) of the long-S config at S tokens, drawn in that order after seeding."""
    import torch

    G, H, D = LONG_S_GROUPS, LONG_S_HEADS, LONG_S_DIM
    torch.manual_seed(seed)
    q = torch.randn(1, S, G, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16).expand(1, S, G, H, D)
    sc = torch.randn(1, S, G, 1, device="cuda").expand(1, S, G, H)
    return q, k, sc


def long_s_attention(S, grad=False, seed=0):
    """(call, leaves) of the long-S config at S tokens.  The leaves are q and one K, V and
    score per group (q, K and the scores as long_s_inputs draws them, V drawn after them),
    requiring grad when `grad`; call() runs sparsek_attention on them, with K, V and the
    scores expanded over each group's query heads, and returns its output."""
    import torch
    from xformers.ops.fmha import attn_bias as xab

    import xformers_sparsek as xs

    G, H, D = LONG_S_GROUPS, LONG_S_HEADS, LONG_S_DIM
    q, k, sc = long_s_inputs(S, seed)
    k1 = k[:, :, :, :1].contiguous()
    v1 = torch.randn_like(k1)
    leaves = [x.detach().requires_grad_(grad) for x in (q, k1, v1, sc[..., :1].contiguous())]

    def call():
        ql, kl, vl, sl = leaves
        return xs.sparsek_attention(ql, kl.expand(1, S, G, H, D), vl.expand(1, S, G, H, D),
                                    sl.expand(1, S, G, H), LONG_S_TOPK, LONG_S_WINDOW,
                                    xab.LowerTriangularMask())

    return call, leaves


def kernel_rows(prof):
    """The CUDA kernels of a torch.profiler run: (ms of device time, calls, name), most time
    first."""
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = e.self_cuda_time_total if t is None else t
        if t > 0:
            rows.append((t / 1e3, e.count, e.key))
    return sorted(rows, reverse=True)
