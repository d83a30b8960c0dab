// Selection stage, per (head, query): the capped-simplex threshold tau, the top-k boundary
// and |F|, by a search over the breakpoint pieces with O(log N) wavelet-matrix range queries
// (the kernels and how they search: select_kernels.cuh).  A port of the vectorised PyTorch
// version in _selection.py (the tables are built there, or by select_tables.cu).
//
// Pass 0 solves every 32nd query (and the last), pass 1 the others from their two solved
// neighbours.
#include <algorithm>

#include "launch.h"
#include "select_kernels.cuh"

namespace xsk {

namespace {

constexpr int kThreads = 128;

// Warps of pass 0 the device holds at once (cached per device).
int anchor_warps_resident() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 1;
  if (dev < 64 && cached[dev]) return cached[dev];
  int sms = 1, blocks = 1;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, select_impl::select_anchor_kernel,
                                                kThreads, 0);
  const int r = std::max(1, sms * blocks * (kThreads / 32));
  if (dev < 64) cached[dev] = r;
  return r;
}

}  // namespace

cudaError_t launch_select(const SelectParams& p, cudaStream_t stream) {
  using namespace select_impl;
  const int64_t total = (int64_t)p.S * p.NQ;
  if (total == 0) return cudaSuccess;
  const int threads = kThreads;
  const int64_t n_regular = (p.NQ + kStride - 1) / kStride;
  const int64_t n_anchor = n_regular + ((p.NQ - 1) % kStride != 0 ? 1 : 0);
  // Anchors per warp: as few as let all of pass 0's warps run at once (a warp's later
  // anchors take ~1.5 rounds of probes, its first ~4; a second wave would double the time).
  const int64_t resident = anchor_warps_resident();
  const int per_warp = (int)std::min<int64_t>(
      16, std::max<int64_t>(1, ((int64_t)p.S * n_anchor + resident - 1) / resident));
  const int64_t anchor_threads = (int64_t)p.S * ((n_anchor + per_warp - 1) / per_warp) * 32;
  select_anchor_kernel<<<(unsigned)((anchor_threads + threads - 1) / threads), threads, 0,
                         stream>>>(p, per_warp);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t gap_threads = (int64_t)p.S * n_regular * 32;
  select_kernel<<<(unsigned)((gap_threads + threads - 1) / threads), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace xsk
