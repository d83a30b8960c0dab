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
    exact.backward(torch.randn_like(exact))  # (contiguous key runs: the TMA paths)
# the selection tables' own kernels on rows of several 2048-element chunks (the rows above
# fit in one): the radix sort (row_sort.cu) and the wavelet build (wavelet_build.cu)
from xformers_sparsek import _cuda  # noqa: E402

u = torch.randn(3, 5000, device="cuda")
_, perm = _cuda._sort_rows(u)
_cuda._KernelWavelet(torch.argsort(perm, dim=1).int(), u.double())
# the fused decode step (csrc/sparsek/decode.cu): filling, then full pools with overflow
for dtype, D, R, window in [(torch.bfloat16, 128, 4, 8), (torch.float16, 64, 1, 0)]:
    B, G, topk = 2, 2, 16
    cache = xs.SparseKCache(B, G, D, topk, window, dtype=dtype, capacity=8, device="cuda")
    assert cache.fused_decode_reason is None, cache.fused_decode_reason
    valid = torch.ones(B, 1, dtype=torch.bool, device="cuda")
    for t in range(60):
        valid[1] = t % 5 != 0
        cache.update_and_attend(torch.randn(B, 1, G, R, D, device="cuda", dtype=dtype),
                                torch.randn(B, 1, G, D, device="cuda", dtype=dtype),
                                torch.randn(B, 1, G, D, device="cuda", dtype=dtype),
                                torch.randn(B, 1, G, device="cuda"), valid=valid)
torch.cuda.synchronize()
print("sanitize_small: ok", float(out.float().abs().sum()), float(q.grad.float().abs().sum()))
