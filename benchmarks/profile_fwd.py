"""Kernel-level breakdown of one SparseK forward (torch.profiler), for kernel work."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs

S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
Hq, Hkv, D, topk, window = 32, 8, 128, 2048, 512
G, H = Hkv, Hq // Hkv
q = torch.randn(1, S, G, H, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16).expand(1, S, G, H, D)
v = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16).expand(1, S, G, H, D)
sc = torch.randn(1, S, G, 1, device="cuda").expand(1, S, G, H)
bias = xab.LowerTriangularMask()
for _ in range(2):
    xs.sparsek_attention(q, k, v, sc, topk, window, bias)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    xs.sparsek_attention(q, k, v, sc, topk, window, bias)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
