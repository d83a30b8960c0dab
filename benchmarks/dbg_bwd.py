import torch, sys
sys.path.insert(0, "tests")
from xformers.ops.fmha import attn_bias as xab
import xformers_sparsek as xs
from test_cuda_kernels import make, grads, rel_err, cpu_bias, to_cpu64
for (bias, B, Mq, Mk, w, topk, gqa) in [(None, 1, 64, 64, 0, 100, False), (None, 1, 64, 64, 0, 8, False),
        (None, 1, 300, 300, 0, 8, False), (xab.LowerTriangularMask(), 1, 300, 300, 16, 24, False), (xab.LowerTriangularMask(), 1, 300, 300, 16, 24, True)]:
    q, k, v, s = make(B, Mq, Mk, 2, 4 if gqa else 2, 64, torch.bfloat16, gqa, seed=1)
    dout = torch.randn(q.shape, device="cuda").to(torch.bfloat16)
    got = grads(q, k, v, s, topk, w, bias, dout)
    ref = grads(*(to_cpu64(x) for x in (q, k, v, s)), topk, w, cpu_bias(bias), dout.cpu().double())
    print(type(bias).__name__, Mq, topk, w, gqa, " ".join(f"{n}={rel_err(a.cpu(), r):.3g}" for n, a, r in zip(["out","dq","dk","dv","ds"], got, ref)), flush=True)
    if gqa: 
        a, r = got[2].cpu().double(), ref[2]
        print(" dk ratio", (a.flatten()[:6] / r.flatten()[:6]).tolist())
