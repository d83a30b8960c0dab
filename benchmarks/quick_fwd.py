"""Quick forward timing at long context (a subset of benchmarks/bench.py), for kernel work."""
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs
from xformers_sparsek import _cuda
from xformers_sparsek._problem import make_problem


def bench(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main(lengths):
    torch.manual_seed(0)
    Hq, Hkv, D, topk, window = 32, 8, 128, 2048, 512
    for S in lengths:
        G, H = Hkv, Hq // Hkv
        q = torch.randn(1, S, G, H, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16)
        sc = torch.randn(1, S, G, 1, device="cuda")
        ke, ve, se = k.expand(1, S, G, H, D), v.expand(1, S, G, H, D), sc.expand(1, S, G, H)
        bias = xab.LowerTriangularMask()
        t_sparse = bench(lambda: xs.sparsek_attention(q, ke, ve, se, topk, window, bias))
        prob = make_problem(q, ke, ve, se, bias, topk, window, None)
        t_sel = bench(lambda: _cuda.select(prob.scores, prob.layout, topk))
        qt = q.reshape(1, S, Hq, D).transpose(1, 2)
        kt = k.reshape(1, S, Hkv, D).transpose(1, 2)
        vt = v.reshape(1, S, Hkv, D).transpose(1, 2)
        res = {}
        for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
            try:
                with sdpa_kernel(be):
                    res[name] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True), iters=5)
            except Exception as e:
                res[name] = float("nan"); print(name, "failed:", str(e)[:200])
        flops = 4 * S * (topk + window) * D * Hq
        print(f"S={S}: sparsek fwd {t_sparse:.2f} ms (select {t_sel:.2f} ms) | cudnn {res['cudnn']:.2f} ms "
              f"flash {res['flash']:.2f} ms | speedup vs cudnn {res['cudnn']/t_sparse:.2f}x | "
              f"attended {flops / t_sparse / 1e9:.0f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main([int(x) for x in sys.argv[1:]] or [16384, 65536])
