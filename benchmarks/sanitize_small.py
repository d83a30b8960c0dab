"""One small forward + backward through every CUDA kernel, for compute-sanitizer."""
import torch
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs

torch.manual_seed(0)
for gqa, dtype, D in [(True, torch.bfloat16, 128), (False, torch.float16, 64)]:
    B, M, G, H = 1, 200, 2, 4 if gqa else 1
    q = torch.randn(B, M, G, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, M, G, 1, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, M, G, 1, D, device="cuda", dtype=dtype, requires_grad=True)
    s = torch.randn(B, M, G, 1, device="cuda", requires_grad=True)
    e = (B, M, G, H)
    out = xs.sparsek_attention(q, k.expand(*e, D), v.expand(*e, D), s.expand(*e), 24, 16,
                               xab.LowerTriangularMask())
    out.backward(torch.randn_like(out))
    exact = xs.sparsek_attention(q, k.expand(*e, D), v.expand(*e, D), None, None, 0,
                                 xab.LowerTriangularMask())
torch.cuda.synchronize()
print("sanitize_small: ok", float(out.float().abs().sum()), float(q.grad.float().abs().sum()))
