// Hopper backward instantiations for bf16 (head dims 64 and 128): the dq and dk/dv passes.
#include "bwd_dkv_sm90.cuh"
#include "bwd_dq_sm90.cuh"

namespace xsk {
cudaError_t run_bwd_dq_sm90_bf16(const BwdDqParams& b, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return sm90::run_bwd_dq_sm90<__nv_bfloat16, 64>(b, stream);
    case 128: return sm90::run_bwd_dq_sm90<__nv_bfloat16, 128>(b, stream);
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t run_bwd_dkv_sm90_bf16(const BwdDkvParams& kp, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return sm90::run_bwd_dkv_sm90<__nv_bfloat16, 64>(kp, stream);
    case 128: return sm90::run_bwd_dkv_sm90<__nv_bfloat16, 128>(kp, stream);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace xsk
