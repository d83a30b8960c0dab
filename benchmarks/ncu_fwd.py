"""Runs the long-S SparseK forward (or forward + backward with --bwd) a few times at S tokens,
for ncu, e.g. `ncu --kernel-name regex:sparsek_fwd ... python3 benchmarks/ncu_fwd.py 65536` or
`ncu --kernel-name regex:bwd_dkv_sm90 --launch-count 1 ... python3 benchmarks/ncu_fwd.py
32768 --bwd` (benchmarks/ncu_source.py summarizes ncu's per-instruction page)."""
import sys

import torch

from common import long_s_attention

args = [a for a in sys.argv[1:] if not a.startswith("--")]
bwd = "--bwd" in sys.argv
call, _ = long_s_attention(int(args[0]) if args else 65536, grad=bwd)
for _ in range(1 if bwd else 3):
    o = call()
    if bwd:
        o.backward(torch.ones_like(o))
torch.cuda.synchronize()
