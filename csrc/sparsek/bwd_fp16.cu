// Backward instantiations for fp16 (head dims 64 and 128).
#include "bwd_kernel.cuh"

namespace xsk {
cudaError_t run_bwd_fp16(const BwdDqParams& b, const BwdDkvParams& kp, int head_dim,
                         cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_bwd<__half, 64>(b, kp, stream);
    case 128: return run_bwd<__half, 128>(b, kp, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace xsk
