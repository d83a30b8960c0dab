// Forward instantiations for bf16 (head dims 64 and 128).
#include "fwd_kernel.cuh"

namespace xsk {
cudaError_t run_fwd_bf16(const FwdParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_fwd<__nv_bfloat16, 64>(p, stream);
    case 128: return run_fwd<__nv_bfloat16, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t run_fwd_fp16(const FwdParams& p, int head_dim, cudaStream_t stream);

cudaError_t launch_fwd(const FwdParams& p, int dtype, int head_dim, cudaStream_t stream) {
  return dtype == 1 ? run_fwd_bf16(p, head_dim, stream) : run_fwd_fp16(p, head_dim, stream);
}
}  // namespace xsk
