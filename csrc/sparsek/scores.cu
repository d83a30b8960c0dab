// The scores as the selection and the kernels read them: float32 [S, NK], contiguous, from a
// strided [S, NK] view of any floating dtype.  Non-finite scores are invalid input (the call
// raises ValueError); they are replaced by 0 here and flagged in `bad`, so that every later
// kernel sees finite values and the host can read the flag after launching the whole
// forward (the GPU never idles through that round trip).
#include <algorithm>
#include <cmath>

#include "convert.cuh"
#include "launch.h"

namespace xsk {

namespace {

using xsk::to_float;  // (the overloads of convert.cuh beside this one, not hidden by it)
__device__ __forceinline__ float to_float(double x) { return (float)x; }  // (as torch's .float())
// (16-bit and float32 values are finite iff their float value is; float64 ones are tested
// as given)
template <typename T>
__device__ __forceinline__ bool finite_of(T x) { return isfinite(to_float(x)); }
__device__ __forceinline__ bool finite_of(double x) { return isfinite(x); }

template <typename T>
__global__ void scores_f32_kernel(const T* __restrict__ in, int64_t st0, int64_t st1, int S,
                                  int NK, float* __restrict__ out, int* __restrict__ bad) {
  const int64_t n = (int64_t)S * NK;
  bool any_bad = false;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t s = e / NK, j = e - s * NK;
    const T x = in[s * st0 + j * st1];
    // (the given value's finiteness: a finite float64 beyond float32's range is not flagged;
    // it becomes inf, as .float() made it)
    const bool ok = finite_of(x);
    any_bad |= !ok;
    out[e] = ok ? to_float(x) : 0.0f;
  }
  if (any_bad) *bad = 1;  // (every writer stores the same value)
}

template <typename T>
cudaError_t launch_typed(const void* in, int64_t st0, int64_t st1, int S, int NK, float* out,
                         int* bad, cudaStream_t stream) {
  const int64_t n = (int64_t)S * NK;
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = (int)std::min<int64_t>((n + threads - 1) / threads, 2048);
  scores_f32_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(in), st0, st1, S,
                                                       NK, out, bad);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scores_f32(const void* in, int dtype, int64_t st0, int64_t st1, int S, int NK,
                              float* out, int* bad, cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch_typed<__half>(in, st0, st1, S, NK, out, bad, stream);
    case 1: return launch_typed<__nv_bfloat16>(in, st0, st1, S, NK, out, bad, stream);
    case 2: return launch_typed<float>(in, st0, st1, S, NK, out, bad, stream);
    case 3: return launch_typed<double>(in, st0, st1, S, NK, out, bad, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace xsk
