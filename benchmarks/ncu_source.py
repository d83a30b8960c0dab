"""Where a kernel's warps stall, per SASS instruction: a summary of ncu's source page.

On the GPU machine (SourceCounters holds the per-instruction stall samples):
    ncu --clock-control none --kernel-name regex:bwd_dkv_sm90 --launch-count 1 \\
        --section SourceCounters --section WarpStateStats -o /tmp/rep \\
        python3 benchmarks/ncu_fwd.py 32768 --bwd
    ncu -i /tmp/rep.ncu-rep --page source --csv --print-source sass > /tmp/src.csv
    python3 benchmarks/ncu_source.py /tmp/src.csv [--top 30] [--block 100]
(scripts/gpu_check.sh's "ncu" step runs all three.)  Prints the share of the samples of
each block of --block consecutive instructions with the most executions of any of them (a
loop body runs once per iteration, a prologue once per warp), the --top instructions with
their two main stall reasons, and the shares per opcode.  ncu's CSV has no column for the
wgmma stalls: what the listed reasons leave of an instruction's samples is printed as
"other" (at an HGMMA or WARPGROUP.DEPBAR, that is the tensor pipe).
"""
import argparse
import collections
import csv
import gzip


def num(x):
    try:
        return float(x.replace(",", ""))
    except (AttributeError, ValueError):
        return 0.0


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        rows = list(csv.reader(f))
    head = next(i for i, r in enumerate(rows) if any("Sampling" in c for c in r))
    return rows[head], [r for r in rows[head + 1:] if len(r) == len(rows[head])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output (or .gz)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--block", type=int, default=100)
    args = ap.parse_args()
    hdr, data = load(args.csv)
    col = {c: i for i, c in enumerate(hdr)}
    samples = col["Warp Stall Sampling (All Samples)"]
    execs = col["Instructions Executed"]
    src = col["Source"]
    reasons = [c for c in hdr if c.startswith("stall_") and "Not Issued" not in c]
    smp = [num(r[samples]) for r in data]
    total = sum(smp) or 1.0
    print(f"{len(data)} instructions, {total:.0f} samples")

    print(f"\nper block of {args.block} instructions (share, most executions in the block):")
    for a in range(0, len(data), args.block):
        share = sum(smp[a:a + args.block]) / total
        if share >= 0.005:
            ex = max(num(r[execs]) for r in data[a:a + args.block])
            print(f"  {a:5d}-{a + args.block - 1:5d}  {100 * share:5.1f}%  {ex:12.0f}")

    print(f"\ntop {args.top} instructions:")
    for i in sorted(range(len(data)), key=lambda i: -smp[i])[:args.top]:
        r = data[i]
        why = sorted(((num(r[col[c]]), c[6:]) for c in reasons), reverse=True)
        other = smp[i] - sum(v for v, _ in why)
        why = sorted(why + [(other, "other")], reverse=True)[:2]
        print(f"  {100 * smp[i] / total:5.1f}%  #{i:<5d} x{num(r[execs]):<10.0f} "
              f"{r[src].strip()[:64]:64s} " + ", ".join(f"{n} {100 * v / max(smp[i], 1):.0f}%"
                                                       for v, n in why))

    ops = collections.Counter()
    for r, v in zip(data, smp):
        words = [w for w in r[src].split() if not w.startswith("@")]
        ops[words[0] if words else "?"] += v
    print("\nper opcode: " + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in ops.most_common(20)))


if __name__ == "__main__":
    main()
