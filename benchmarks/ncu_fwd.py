"""Runs the 64K SparseK forward a few times (for `ncu --kernel-name regex:sparsek_fwd`)."""
import sys

import torch
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs

S = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
G, H, D = 8, 4, 128
q = torch.randn(1, S, G, H, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16).expand(1, S, G, H, D)
v = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16).expand(1, S, G, H, D)
sc = torch.randn(1, S, G, 1, device="cuda").expand(1, S, G, H)
for _ in range(3):
    xs.sparsek_attention(q, k, v, sc, 2048, 512, xab.LowerTriangularMask())
torch.cuda.synchronize()
