// Forward instantiations for bf16 (head dims 64 and 128), and the forward launcher.
#include <cstdlib>
#include <cstring>

#include "fwd_kernel.cuh"
#include "launch.h"

#ifndef XSK_ARCHS
#define XSK_ARCHS ""
#endif

namespace xsk {
cudaError_t run_fwd_bf16(const FwdParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return run_fwd<__nv_bfloat16, 64>(p, stream);
    case 128: return run_fwd<__nv_bfloat16, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t run_fwd_fp16(const FwdParams& p, int head_dim, cudaStream_t stream);
cudaError_t run_fwd_sm90_bf16(const FwdParams& p, int head_dim, cudaStream_t stream);
cudaError_t run_fwd_sm90_fp16(const FwdParams& p, int head_dim, cudaStream_t stream);

// A Hopper kernel (sm90/) runs on compute capability 9.x when the build has sm_90a code;
// `env`=sm80 (XFORMERS_SPARSEK_FWD, XFORMERS_SPARSEK_BWD) forces the mma.sync kernel (tests
// and benchmarks compare both).
bool use_sm90(const char* env_name) {
  if (std::strstr(XSK_ARCHS, "90a") == nullptr) return false;
  const char* env = std::getenv(env_name);
  if (env != nullptr && std::strcmp(env, "sm80") == 0) return false;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return false;
  return major == 9;
}

cudaError_t launch_fwd(const FwdParams& p, int dtype, int head_dim, cudaStream_t stream) {
  if (use_sm90("XFORMERS_SPARSEK_FWD"))
    return dtype == 1 ? run_fwd_sm90_bf16(p, head_dim, stream)
                      : run_fwd_sm90_fp16(p, head_dim, stream);
  return dtype == 1 ? run_fwd_bf16(p, head_dim, stream) : run_fwd_fp16(p, head_dim, stream);
}
}  // namespace xsk
