// Forward instantiations for fp16 (head dims 64 and 128).
#include "fwd_kernel.cuh"

namespace xsk {
cudaError_t run_fwd_fp16(const FwdParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_fwd<__half, 64>(p, stream);
    case 128: return run_fwd<__half, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace xsk
