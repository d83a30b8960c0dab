// Synchronization of the one-launch, several-phase kernels (wavelet_build.cu: one phase per
// wavelet level; row_sort.cu: one per radix pass).  CTAs draw tickets in (phase, row, chunk)
// order, so every CTA one waits for holds a smaller ticket and is already running; a counter
// per (row, phase) tells when all chunks of a row have finished a phase.
#pragma once

namespace xsk {

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// (no ordering: for words that carry their data themselves, so that several are in flight)
__device__ __forceinline__ int ld_relaxed(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// The whole CTA waits until *count reaches target: thread 0 polls with acquire loads, the
// barrier passes the ordering on to the other threads.  Call from every thread.
__device__ __forceinline__ void cta_wait_count(const int* count, int target) {
  if (threadIdx.x == 0)
    while (ld_acquire(count) < target) __nanosleep(64);
  __syncthreads();
}

// After the CTA's stores of a phase: the barrier, a fence, then one increment of *count
// that publishes them all.  Call from every thread.
__device__ __forceinline__ void cta_signal_count(int* count) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(count, 1);
  }
}

}  // namespace xsk
