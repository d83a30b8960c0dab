// Hopper forward instantiations for fp16 (head dims 64 and 128).
#include "fwd_kernel_sm90.cuh"

namespace xsk {
cudaError_t run_fwd_sm90_fp16(const FwdParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return sm90::run_fwd_sm90<__half, 64>(p, stream);
    case 128: return sm90::run_fwd_sm90<__half, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace xsk
