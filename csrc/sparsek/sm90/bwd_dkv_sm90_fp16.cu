// Hopper dk/dv backward pass instantiations for fp16 (head dims 64 and 128).
#include "bwd_dkv_sm90.cuh"

namespace xsk {
cudaError_t run_bwd_dkv_sm90_fp16(const BwdDkvParams& kp, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return sm90::run_bwd_dkv_sm90<__half, 64>(kp, stream);
    case 128: return sm90::run_bwd_dkv_sm90<__half, 128>(kp, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace xsk
