// Backward instantiations for bf16 (head dims 64 and 128).
#include "bwd_kernel.cuh"

namespace xsk {
cudaError_t run_bwd_bf16(const BwdDqParams& b, const BwdDkvParams& kp, int head_dim,
                         cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_bwd<__nv_bfloat16, 64>(b, kp, stream);
    case 128: return run_bwd<__nv_bfloat16, 128>(b, kp, stream);
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t run_bwd_fp16(const BwdDqParams& b, const BwdDkvParams& kp, int head_dim,
                         cudaStream_t stream);

cudaError_t launch_bwd(const BwdDqParams& b, const BwdDkvParams& kp, int dtype, int head_dim,
                       cudaStream_t stream) {
  return dtype == 1 ? run_bwd_bf16(b, kp, head_dim, stream) : run_bwd_fp16(b, kp, head_dim, stream);
}
}  // namespace xsk
