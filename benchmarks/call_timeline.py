"""One long-S call (the forward, or forward + backward with --bwd) at S tokens: its median
single-call and back-to-back times, the host time until it returns, every CUDA kernel of one
call by device time, the timeline of that call (kernels of 20 us or more and idle gaps of
8 us or more: where the GPU waits for the host) and the large PyTorch ops with their shapes
and callers.

    python benchmarks/call_timeline.py [S] [--bwd]

(The torch profiler slows the host down, so the timeline's gaps are upper bounds; the
eleventh session ran this script as .gpu/fprof.py.)
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import back_to_back_ms, kernel_rows, long_s_attention, median_ms

BIG_OPS = ("aten::add_", "aten::fill_", "aten::copy_", "aten::sum", "aten::zeros", "aten::sort",
           "aten::add")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    S = int(args[0]) if args else 65536
    bwd = "--bwd" in sys.argv
    call, _ = long_s_attention(S, grad=bwd)

    def run():
        o = call()
        if bwd:
            o.backward(torch.ones_like(o))

    t, tb = median_ms(run, 7), back_to_back_ms(run, 5)
    torch.cuda.synchronize()
    host = []
    for _ in range(5):
        t0 = time.perf_counter()
        run()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    host.sort()

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU],
                 record_shapes=True) as prof:
        run()
        torch.cuda.synchronize()
    rows = kernel_rows(prof)
    print(f"S={S} {'fwd+bwd' if bwd else 'fwd'}: single {t:.3f} ms, back-to-back {tb:.3f} ms, "
          f"host (until return) {1e3 * host[2]:.3f} ms, kernels {sum(r[0] for r in rows):.3f} ms "
          f"(CPU ops and their kernels both listed)")
    for ms, n, name in rows[:30]:
        print(f"   {ms:8.3f} ms x{n:<3d} {name[:80]}")

    events = prof.events()
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    t0 = kernels[0].time_range.start
    last, idle = t0, 0.0
    print("  timeline (us from the first kernel; gaps >= 8 us, kernels >= 20 us):")
    for e in kernels:
        gap = e.time_range.start - last
        idle += max(gap, 0.0)
        dur = e.time_range.end - e.time_range.start
        if gap >= 8 or dur >= 20:
            print(f"   {e.time_range.start - t0:9.1f} gap {gap:7.1f} dur {dur:8.1f} {e.name[:70]}")
        last = max(last, e.time_range.end)
    print(f"  span {last - t0:.1f} us, idle {idle:.1f} us")
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or e.name not in BIG_OPS:
            continue
        us = sum(k.duration for k in e.kernels)
        if us >= 20:
            chain, parent = [], e.cpu_parent
            while parent is not None and len(chain) < 3:
                chain.append(parent.name[:40])
                parent = parent.cpu_parent
            print(f"   {us:8.1f} us {e.name} {e.input_shapes} <- {' <- '.join(chain)}")


if __name__ == "__main__":
    main()
