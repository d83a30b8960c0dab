"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

import statistics
import subprocess
import time


def median_ms(fn, iters=10, warmup=3, cuda=True):
    """Median milliseconds of single calls of `fn`: CUDA events, or perf_counter on the CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        if cuda:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts)


def back_to_back_ms(fn, n=50, reps=3, cuda=True):
    """Milliseconds per call of `fn` issued n times back to back (median of reps): the GPU
    time per call once the host runs ahead, as in a generation loop (no launch gaps)."""
    import torch

    fn()
    if cuda:
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        if cuda:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n):
                fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / n)
        else:
            t = time.perf_counter()
            for _ in range(n):
                fn()
            ts.append(1e3 * (time.perf_counter() - t) / n)
    return statistics.median(ts)


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
