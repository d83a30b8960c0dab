"""Runs the long-S SparseK forward (or forward + backward with --bwd) a few times at S tokens,
for ncu, e.g. `ncu --kernel-name regex:sparsek_fwd ... python3 benchmarks/ncu_fwd.py 65536` or
`ncu --kernel-name regex:bwd_dkv_sm90 --launch-count 1 ... python3 benchmarks/ncu_fwd.py
32768 --bwd` (benchmarks/ncu_source.py summarizes ncu's per-instruction page)."""
import sys

import torch
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs

args = [a for a in sys.argv[1:] if not a.startswith("--")]
bwd = "--bwd" in sys.argv
S = int(args[0]) if args else 65536
G, H, D = 8, 4, 128
q = torch.randn(1, S, G, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
k1 = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
v1 = torch.randn(1, S, G, 1, D, device="cuda", dtype=torch.bfloat16, requires_grad=bwd)
sc1 = torch.randn(1, S, G, 1, device="cuda", requires_grad=bwd)
for _ in range(1 if bwd else 3):
    o = xs.sparsek_attention(q, k1.expand(1, S, G, H, D), v1.expand(1, S, G, H, D),
                             sc1.expand(1, S, G, H), 2048, 512, xab.LowerTriangularMask())
    if bwd:
        o.backward(torch.ones_like(o))
torch.cuda.synchronize()
