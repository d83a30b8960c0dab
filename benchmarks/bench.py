"""DESIGN.md section 5 benchmark: SparseK vs dense SDPA (cuDNN, FlashAttention-2) on one GPU.

    python benchmarks/bench.py --out OUTDIR [--lengths 16384 32768 65536 131072] [--no-bwd]
    python benchmarks/bench.py --out OUTDIR --replot RUN/results.json   (the plot of a past run)

Anchors are measured in the same run as the op.  Times are medians of CUDA-event timings
after warm-up, on random inputs.  Writes OUTDIR/results.json, OUTDIR/results_section.md (a
dated section for benchmarks/RESULTS.md, appended there with --results or by hand with
`cat`) and draws OUTDIR/speedup.png.
"""

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from common import commit, median_ms, pyplot
from xformers_sparsek import _cuda
from xformers_sparsek._problem import make_problem


def sdpa_ms(backend, q, k, v, causal, gqa, backward, iters):
    def run():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        if backward:
            o.backward(torch.ones_like(o))

    try:
        with sdpa_kernel(backend):
            return median_ms(run, iters=iters, warmup=2)
    except Exception as e:  # backend refuses the shape/dtype
        print(f"  {backend.name} failed: {str(e).splitlines()[0][:120]}", flush=True)
        return float("nan")


def sm80_kernel_ms(fn, iters):
    """On Hopper, the same call with the mma.sync forward kernel forced (the launcher reads
    XFORMERS_SPARSEK_FWD per call): the old kernel measured beside the new one.  None
    elsewhere."""
    if torch.cuda.get_device_capability()[0] != 9:
        return None
    old = os.environ.get("XFORMERS_SPARSEK_FWD")
    os.environ["XFORMERS_SPARSEK_FWD"] = "sm80"
    try:
        return median_ms(fn, iters)
    finally:
        if old is None:
            del os.environ["XFORMERS_SPARSEK_FWD"]
        else:
            os.environ["XFORMERS_SPARSEK_FWD"] = old


def timed_row(config, mode, S, ms, cudnn_ms, flash_ms, flops=None, **extra):
    """One table row: a time against the two anchors of the same run, and the TFLOP/s that
    `flops` of work over that time make (the column "attended TFLOP/s")."""
    row = dict(config=config, mode=mode, S=S, ms=ms, cudnn_ms=cudnn_ms, flash_ms=flash_ms,
               speedup_cudnn=cudnn_ms / ms, speedup_flash=flash_ms / ms, **extra)
    if flops is not None:
        row["attended_tflops"] = flops / ms / 1e9
    return row


def attended_pairs(layout, topk, heads):
    pool = layout.pool_size
    sel = pool if topk is None else torch.clamp(pool, max=topk)
    return int((sel + (layout.win_hi - layout.win_lo)).sum()) * heads


def seed_config(iters):
    """B=16, H=96, S=512, D=64, fp16, no mask: exact and sparse topk=128; us per head."""
    B, H, S, D = 16, 96, 512, 64
    dt = torch.float16
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dt) for _ in range(3))
    sc = torch.randn(B, S, H, device="cuda")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    heads = B * H
    rows = []
    exact = lambda: xs.sparsek_attention(q, k, v, None, None)  # noqa: E731
    sparse = lambda: xs.sparsek_attention(q, k, v, sc, 128)  # noqa: E731
    t_exact = median_ms(exact, iters)
    t_sparse = median_ms(sparse, iters)
    t_cudnn = sdpa_ms(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, False, False, False, iters)
    t_flash = sdpa_ms(SDPBackend.FLASH_ATTENTION, qt, kt, vt, False, False, False, iters)
    timed = [("exact", t_exact), ("sparse topk=128", t_sparse)]
    t80 = sm80_kernel_ms(exact, iters)
    if t80 is not None:
        timed += [("exact, mma.sync fwd", t80), ("sparse, mma.sync fwd", sm80_kernel_ms(sparse, iters))]
    for mode, t in timed:
        rows.append(timed_row("seed", mode, S, t, t_cudnn, t_flash, us_per_head=1e3 * t / heads))
    return rows


def long_config(S, backward, iters):
    """B=1, Hq=32, Hkv=8, D=128, bf16, causal, topk=2048, window=512."""
    Hq, Hkv, D, topk, window = 32, 8, 128, 2048, 512
    G, H = Hkv, Hq // Hkv
    dt = torch.bfloat16
    q = torch.randn(1, S, G, H, D, device="cuda", dtype=dt)
    k = torch.randn(1, S, G, 1, D, device="cuda", dtype=dt)
    v = torch.randn(1, S, G, 1, D, device="cuda", dtype=dt)
    sc = torch.randn(1, S, G, 1, device="cuda")
    ke, ve, se = k.expand(1, S, G, H, D), v.expand(1, S, G, H, D), sc.expand(1, S, G, H)
    bias = xab.LowerTriangularMask()
    prob = make_problem(q, ke, ve, se, bias, topk, window, None)
    pairs = attended_pairs(prob.layout, topk, Hq)
    t_fwd = median_ms(lambda: xs.sparsek_attention(q, ke, ve, se, topk, window, bias), iters)
    t_sel = median_ms(lambda: _cuda.select(prob.scores, prob.layout, topk), iters)
    qt = q.reshape(1, S, Hq, D).transpose(1, 2)
    kt = k.reshape(1, S, Hkv, D).transpose(1, 2)
    vt = v.reshape(1, S, Hkv, D).transpose(1, 2)
    a_iters = max(2, iters // 2)
    t_cudnn = sdpa_ms(SDPBackend.CUDNN_ATTENTION, qt, kt, vt, True, True, False, a_iters)
    t_flash = sdpa_ms(SDPBackend.FLASH_ATTENTION, qt, kt, vt, True, True, False, a_iters)
    dense_flops = 4 * (S * (S + 1) / 2) * D * Hq
    config = f"long-{S // 1024}K"
    rows = [timed_row(config, "fwd", S, t_fwd, t_cudnn, t_flash, 4 * pairs * D,
                      select_ms=t_sel, select_frac=t_sel / t_fwd,
                      cudnn_tflops=dense_flops / t_cudnn / 1e9)]
    # exact mode (no SparseKMask: every causal key, the same kernels) against the same anchor
    t_ex = median_ms(lambda: xs.sparsek_attention(q, ke, ve, None, None, 0, bias), a_iters)
    rows.append(timed_row(config, "exact fwd", S, t_ex, t_cudnn, t_flash, dense_flops))
    t80 = sm80_kernel_ms(lambda: xs.sparsek_attention(q, ke, ve, se, topk, window, bias), iters)
    if t80 is not None:
        rows.append(timed_row(config, "fwd, mma.sync fwd", S, t80, t_cudnn, t_flash,
                              4 * pairs * D))
    if backward:
        qg, kg, vg, sg = (x.detach().requires_grad_() for x in (q, k, v, sc))

        def fb():
            o = xs.sparsek_attention(qg, kg.expand(1, S, G, H, D), vg.expand(1, S, G, H, D),
                                     sg.expand(1, S, G, H), topk, window, bias)
            o.backward(torch.ones_like(o))

        t_fb = median_ms(fb, max(2, iters // 3), warmup=1)
        qt2, kt2, vt2 = (x.detach().requires_grad_() for x in (qt, kt, vt))
        c_fb = sdpa_ms(SDPBackend.CUDNN_ATTENTION, qt2, kt2, vt2, True, True, True, a_iters)
        f_fb = sdpa_ms(SDPBackend.FLASH_ATTENTION, qt2, kt2, vt2, True, True, True, a_iters)
        rows.append(timed_row(config, "fwd+bwd", S, t_fb, c_fb, f_fb, 4 * 3.5 * pairs * D))
    peak = torch.cuda.max_memory_allocated() / 2**30
    for r in rows:
        r["peak_gib"] = peak
    return rows


def table(rows):
    head = "| config | mode | time (ms) | select | cuDNN (ms) | FA2 (ms) | vs cuDNN | vs FA2 | attended TFLOP/s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        sel = f"{r['select_ms']:.2f} ms ({100 * r['select_frac']:.1f}%)" if "select_ms" in r else ""
        extra = f" ({r['us_per_head']:.2f} us/head)" if "us_per_head" in r else ""
        tf = f"{r['attended_tflops']:.0f}" if "attended_tflops" in r else ""
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['ms']:.3f}{extra} | {sel} | {r['cudnn_ms']:.3f} | "
            f"{r['flash_ms']:.3f} | {r['speedup_cudnn']:.2f}x | {r['speedup_flash']:.2f}x | {tf} |"
        )
    return "\n".join(lines)


def plot(rows, path, device):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("fwd", "fwd+bwd"):
        pts = [(r["S"], r["speedup_cudnn"]) for r in rows if r["config"].startswith("long") and r["mode"] == mode]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{mode} vs cuDNN")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speedup over dense causal SDPA (x)")
    ax.set_title(f"SparseK (topk=2048, window=512) vs dense, {device}, bf16", fontsize=9)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--bwd-max", type=int, default=131072, help="longest S timed with backward")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--results", default=None, help="also append the section to this file")
    ap.add_argument("--commit", default=None, help="commit being measured (for the record)")
    ap.add_argument("--replot", default=None, metavar="RESULTS_JSON",
                    help="only redraw OUT/speedup.png from a run's results.json (no GPU)")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            run = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        plot(run["rows"], os.path.join(args.out, "speedup.png"), run["meta"]["device"])
        return
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    rows = seed_config(args.iters)
    print(table(rows), flush=True)
    for S in args.lengths:
        rows += long_config(S, not args.no_bwd and S <= args.bwd_max, args.iters)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        print(table([r for r in rows if r["S"] == S]), flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = dict(date=stamp, device=dev, commit=commit(args.commit), torch=torch.__version__)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plot(rows, os.path.join(args.out, "speedup.png"), dev)
    text = (f"\n## {stamp} — {dev}, commit {meta['commit']}, torch {meta['torch']}\n\n"
            + table(rows) + "\n")
    print(text, flush=True)
    with open(os.path.join(args.out, "results_section.md"), "w") as f:
        f.write(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
