"""DESIGN.md section 5, decode-C rows: one new token per step with a ``SparseKCache`` against
dense SDPA decoding over the full KV cache, measured in the same run.

    python benchmarks/bench_decode.py --out OUTDIR [--contexts 8192 32768 131072]
    python benchmarks/bench_decode.py --smoke          # tiny shapes, any device (CPU here)

Config: B=16, Hq=32, Hkv=8, D=128, bf16, topk=2048, window=512.  For each context length C
the cache is filled by a chunked prefill of C tokens (random K/V/scores, ``--prefill-chunk``
tokens per call), then ``--steps`` decode steps are timed one by one (CUDA events, median),
eagerly (``update_and_attend``) and replayed as a CUDA graph (``SparseKCache.capture``).  The dense anchor is
``F.scaled_dot_product_attention`` of one query over the C-token cache (GQA, no mask).
"KV bytes" is what each side holds for the layer: the dense cache grows as C, the SparseK
cache is fixed at construction (window + topk K/V entries per KV head, plus scores).
Writes OUTDIR/decode.json and OUTDIR/decode_section.md (a dated section for
benchmarks/RESULTS.md) and OUTDIR/decode.png (step latency vs context).
"""

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from common import back_to_back_ms, commit, median_ms, pyplot
from xformers_sparsek import SparseKCache


def cuda_activities(fn) -> int:
    """GPU activities (kernels, memcpy/memset) of one call of fn, from the profiler (-1 if
    it is unavailable)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001
        print(f"  (profiler unavailable: {type(e).__name__}: {e})", flush=True)
        return -1


def decode_row(C, B, Hq, Hkv, D, topk, window, steps, dtype, device, prefill_chunk,
               compile_step=False):
    R = Hq // Hkv
    g = torch.Generator(device=device).manual_seed(C)
    cuda = device.type == "cuda"

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dt)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cache = SparseKCache(B, Hkv, D, topk, window, dtype=dtype, device=device)
    # Prefill in chunks (each chunk is a multi-token step over the compressed context
    # [fractional scores | top set | window | chunk]), so memory stays bounded by the chunk,
    # never by C (docs/decoding.md, "Benchmark budget").
    sync()
    t0 = time.perf_counter()
    for c0 in range(0, C, prefill_chunk):
        m = min(prefill_chunk, C - c0)
        cache.update_and_attend(rnd(B, m, Hkv, R, D), rnd(B, m, Hkv, D), rnd(B, m, Hkv, D),
                                rnd(B, m, Hkv, dt=torch.float32))
    sync()
    prefill_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    print(f"  C={C}: prefill {prefill_s:.2f} s ({-(-C // prefill_chunk)} chunks), peak "
          f"{peak / 2**30:.1f} GiB, overflow {cache.overflow_count}", flush=True)
    q1, k1, v1 = rnd(B, 1, Hkv, R, D), rnd(B, 1, Hkv, D), rnd(B, 1, Hkv, D)
    u1 = rnd(B, 1, Hkv, dt=torch.float32)
    # eager step: ~160 small kernels launched from Python, one host sync (the input check)
    t_eager = median_ms(lambda: cache.update_and_attend(q1, k1, v1, u1), steps, 2, cuda)
    n_eager = n_comp = -1
    if cuda:  # (docs/decoding.md predicts ~160 per step)
        n_eager = cuda_activities(lambda: cache.update_and_attend(q1, k1, v1, u1))
        print(f"  eager step: {t_eager:.3f} ms, {n_eager} GPU activities", flush=True)
    # captured step: the same kernels replayed as one CUDA graph (CPU: run eagerly)
    t_graph, t_b2b, graph_error = float("nan"), float("nan"), None
    try:
        step = cache.capture(q1, k1, v1, u1)
        t_graph = median_ms(lambda: step(q1, k1, v1, u1), steps, 3, cuda)
        t_b2b = back_to_back_ms(lambda: step(q1, k1, v1, u1), 50, 3, cuda)
        del step
    except Exception as e:  # noqa: BLE001  (report, keep the eager numbers)
        graph_error = f"{type(e).__name__}: {e}"
        print(f"  capture failed: {graph_error}", flush=True)
    # the PyTorch tensor step (what runs where the fused kernels do not apply), as a graph
    t_torch, fused = float("nan"), cache.fused_decode_reason
    if cuda and fused is None:
        cache.fused_decode_reason = "benchmark: the PyTorch step"
        step = cache.capture(q1, k1, v1, u1)
        t_torch = median_ms(lambda: step(q1, k1, v1, u1), steps, 3, cuda)
        del step
        cache.fused_decode_reason = None
    print(f"  step: {'fused CUDA kernels' if fused is None else 'PyTorch (' + fused + ')'}; "
          f"graph {t_graph:.3f} ms (back to back {t_b2b:.3f}), eager {t_eager:.3f} ms, PyTorch step "
          f"graph {t_torch:.3f} ms",
          flush=True)
    # the PyTorch step compiled by inductor first (--compile; failed in inductor's codegen
    # on torch 2.11)
    t_comp, comp_error, comp_s = float("nan"), None, float("nan")
    if compile_step:
        cache.fused_decode_reason = "benchmark: the compiled PyTorch step"
        try:
            t0 = time.perf_counter()
            step = cache.capture(q1, k1, v1, u1, compile=True)
            comp_s = time.perf_counter() - t0
            t_comp = median_ms(lambda: step(q1, k1, v1, u1), steps, 3, cuda)
            # kernels of the compiled step, run outside the graph
            n_comp = cuda_activities(step._run)
            cache._lens_host = None  # (step._run appended a token; re-read the lengths)
            del step
        except Exception as e:  # noqa: BLE001
            comp_error = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"  compiled capture failed: {comp_error}", flush=True)
        cache.fused_decode_reason = fused
        print(f"  compiled step: capture+compile {comp_s:.1f} s, {t_comp:.3f} ms/step, "
              f"{n_comp} GPU activities", flush=True)
    sparse_bytes = cache.kv_bytes()
    del cache
    if cuda:
        torch.cuda.empty_cache()

    # Dense anchor: one query against the full C-token cache (what a dense model holds).
    kd, vd = rnd(B, Hkv, C, D), rnd(B, Hkv, C, D)
    qd = rnd(B, Hq, 1, D)
    dense = lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)  # noqa: E731
    t_dense = median_ms(dense, steps, 2, cuda)
    t_dense_b2b = back_to_back_ms(dense, 20, 3, cuda)
    dense_bytes = (kd.numel() + vd.numel()) * kd.element_size()
    del kd, vd
    best = t_graph if t_graph == t_graph else t_eager
    return dict(context=C, sparse_ms=best, sparse_eager_ms=t_eager, sparse_graph_ms=t_graph,
                sparse_torch_graph_ms=t_torch, fused=fused is None,
                sparse_compiled_graph_ms=t_comp, compile_s=comp_s, compile_error=comp_error,
                gpu_activities_eager=n_eager, gpu_activities_compiled=n_comp,
                dense_ms=t_dense, speedup=t_dense / best,
                sparse_graph_b2b_ms=t_b2b, dense_b2b_ms=t_dense_b2b,
                speedup_b2b=t_dense_b2b / t_b2b,
                speedup_compiled=t_dense / t_comp if t_comp == t_comp else float("nan"),
                prefill_s=prefill_s, peak_gib=peak / 2**30, graph_error=graph_error,
                sparse_kv_bytes=sparse_bytes, dense_kv_bytes=dense_bytes)


def table(rows):
    lines = ["| context | SparseK step, CUDA graph (ms) | SparseK step, eager (ms) | PyTorch "
             "step, graph (ms) | dense SDPA step (ms) | speedup (graph) | SparseK KV (MiB) | "
             "dense KV (MiB) | prefill (s) | SparseK graph, back to back (ms/step) | dense, back "
             "to back (ms/step) | speedup (back to back) |",
             "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['context']} | {r['sparse_graph_ms']:.3f} | {r['sparse_eager_ms']:.3f} | "
                     f"{r.get('sparse_torch_graph_ms', float('nan')):.3f} | "
                     f"{r['dense_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['sparse_kv_bytes'] / 2**20:.1f} | {r['dense_kv_bytes'] / 2**20:.1f} | "
                     f"{r['prefill_s']:.2f} | {r.get('sparse_graph_b2b_ms', float('nan')):.3f} | "
                     f"{r.get('dense_b2b_ms', float('nan')):.3f} | "
                     f"{r.get('speedup_b2b', float('nan')):.2f}x |")
    if len(rows) > 1:
        lines.append(f"\nStep latency at the longest context / the shortest: "
                     f"{rows[-1]['sparse_ms'] / rows[0]['sparse_ms']:.2f}x (SparseK), "
                     f"{rows[-1]['dense_ms'] / rows[0]['dense_ms']:.2f}x (dense). "
                     f"Issue bar: SparseK <= 1.2x, and >= 10x faster than dense at the longest.")
    return "\n".join(lines)


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["context"] for r in rows]
    ax.plot(xs, [r["sparse_ms"] for r in rows], "o-", label="SparseK + SparseKCache (graph)")
    ax.plot(xs, [r["sparse_eager_ms"] for r in rows], "^--", label="SparseK + SparseKCache (eager)")
    ax.plot(xs, [r["dense_ms"] for r in rows], "s-", label="dense SDPA, full cache")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel("decode step latency (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--contexts", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    ap.add_argument("--compile", action="store_true",
                    help="also time the PyTorch step compiled by torch.compile (+ CUDA graph)")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        device = torch.device("cpu")
        cfg = dict(B=2, Hq=4, Hkv=2, D=16, topk=16, window=8, dtype=torch.float32)
        contexts, chunk = [64, 256], 64
    else:
        device = torch.device("cuda")
        cfg = dict(B=16, Hq=32, Hkv=8, D=128, topk=2048, window=512, dtype=torch.bfloat16)
        contexts, chunk = args.contexts, args.prefill_chunk
    rows = []
    for C in contexts:
        rows.append(decode_row(C, steps=args.steps, device=device, prefill_chunk=chunk,
                               compile_step=device.type == "cuda" and args.compile, **cfg))
        print(table(rows[-1:]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = dict(date=stamp, device=dev, commit=commit(args.commit), torch=torch.__version__,
                config={k: str(v) for k, v in cfg.items()})
    with open(os.path.join(args.out, "decode.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, os.path.join(args.out, "decode.png"))
    text = (f"\n## decode — {stamp} — {dev}, commit {meta['commit']}, torch {meta['torch']}\n\n"
            f"B={cfg['B']}, Hq={cfg['Hq']}, Hkv={cfg['Hkv']}, D={cfg['D']}, {cfg['dtype']}, "
            f"topk={cfg['topk']}, window={cfg['window']}; median of {args.steps} steps.\n\n"
            + table(rows) + "\n")
    print(text, flush=True)
    with open(os.path.join(args.out, "decode_section.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
