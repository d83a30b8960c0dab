// Backward instantiations for bf16 (head dims 64 and 128), and the backward launcher.
#include "bwd_kernel.cuh"
#include "launch.h"

namespace xsk {
cudaError_t run_bwd_dq_bf16(const BwdDqParams& b, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_bwd_dq<__nv_bfloat16, 64>(b, stream);
    case 128: return run_bwd_dq<__nv_bfloat16, 128>(b, stream);
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t run_bwd_dkv_bf16(const BwdDkvParams& kp, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_bwd_dkv<__nv_bfloat16, 64>(kp, stream);
    case 128: return run_bwd_dkv<__nv_bfloat16, 128>(kp, stream);
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t run_bwd_dq_fp16(const BwdDqParams& b, int head_dim, cudaStream_t stream);
cudaError_t run_bwd_dkv_fp16(const BwdDkvParams& kp, int head_dim, cudaStream_t stream);
cudaError_t run_bwd_dq_sm90_bf16(const BwdDqParams& b, int head_dim, cudaStream_t stream);
cudaError_t run_bwd_dq_sm90_fp16(const BwdDqParams& b, int head_dim, cudaStream_t stream);
cudaError_t run_bwd_dkv_sm90_bf16(const BwdDkvParams& kp, int head_dim, cudaStream_t stream);
cudaError_t run_bwd_dkv_sm90_fp16(const BwdDkvParams& kp, int head_dim, cudaStream_t stream);

// hopper: the Hopper kernels (sm90/; the caller checked use_sm90("XFORMERS_SPARSEK_BWD") and
// tiled pass 1 in the forward's 128-row tiles), else the mma.sync kernels (64-row tiles).
cudaError_t launch_bwd(const BwdDqParams& b, const BwdDkvParams& kp, int dtype, int head_dim,
                       bool hopper, cudaStream_t stream) {
  const bool bf16 = dtype == 1;
  cudaError_t err;
  if (hopper) {
    err = bf16 ? run_bwd_dq_sm90_bf16(b, head_dim, stream)
               : run_bwd_dq_sm90_fp16(b, head_dim, stream);
    if (err != cudaSuccess) return err;
    return bf16 ? run_bwd_dkv_sm90_bf16(kp, head_dim, stream)
                : run_bwd_dkv_sm90_fp16(kp, head_dim, stream);
  }
  err = bf16 ? run_bwd_dq_bf16(b, head_dim, stream) : run_bwd_dq_fp16(b, head_dim, stream);
  if (err != cudaSuccess) return err;
  return bf16 ? run_bwd_dkv_bf16(kp, head_dim, stream) : run_bwd_dkv_fp16(kp, head_dim, stream);
}
}  // namespace xsk
