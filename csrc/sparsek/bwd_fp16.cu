// Backward instantiations for fp16 (head dims 64 and 128).
#include "bwd_kernel.cuh"

namespace xsk {
cudaError_t run_bwd_dq_fp16(const BwdDqParams& b, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_bwd_dq<__half, 64>(b, stream);
    case 128: return run_bwd_dq<__half, 128>(b, stream);
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t run_bwd_dkv_fp16(const BwdDkvParams& kp, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_bwd_dkv<__half, 64>(kp, stream);
    case 128: return run_bwd_dkv<__half, 128>(kp, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace xsk
