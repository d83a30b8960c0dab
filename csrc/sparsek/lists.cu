// For each (query tile, head): the pool keys that any query of the tile may select.
//
// Query i selects pool key j iff rank(j) >= rb_i (ranks order a head's keys by (score,
// index)).
// For a tile, every selected key has rank >= min rb and lies in [min pool_lo, max win_lo),
// so walking the head's ranks downwards from the top and keeping the keys inside that
// interval yields the tile's key list.  On nested (causal / full) pools the list has at
// most topk + tile_size keys (DESIGN.md section 1).  A tile containing a query whose whole
// pool is selected (rb = -1) lists the interval itself.  Lists are in a fixed order, so
// everything downstream is deterministic.
#include "launch.h"

namespace xsk {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32, kPer = 8;  // kPer: ranks per thread and pass

__global__ void __launch_bounds__(kThreads) build_lists_kernel(ListParams p) {
  const int tile = blockIdx.x, s = blockIdx.y;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile];
  __shared__ long long s_rb_min;
  __shared__ int s_lo, s_hi, s_all;
  if (threadIdx.x == 0) {
    s_rb_min = 0x7fffffffffffffffLL;
    s_lo = 0x7fffffff;
    s_hi = -1;
    s_all = 0;
  }
  __syncthreads();
  for (int i = q0 + threadIdx.x; i < q1; i += kThreads) {
    const long long rb = p.rb[(size_t)s * p.NQ + i];
    atomicMin(&s_rb_min, rb);
    atomicMin(&s_lo, (int)p.pool_lo[i]);
    atomicMax(&s_hi, (int)p.win_lo[i]);
    if (rb < 0) s_all = 1;
  }
  __syncthreads();
  const int lo = s_lo, hi = s_hi;
  int* out = p.lists + ((size_t)s * p.ntiles + tile) * p.cap;
  if (hi <= lo) {
    if (threadIdx.x == 0) p.counts[(size_t)s * p.ntiles + tile] = 0;
    return;
  }
  if (s_all) {  // list the interval
    const int n = hi - lo;
    if (n > p.cap) {
      if (threadIdx.x == 0) atomicExch(p.overflow, 1);
      return;
    }
    for (int t = threadIdx.x; t < n; t += kThreads) out[t] = lo + t;
    if (threadIdx.x == 0) p.counts[(size_t)s * p.ntiles + tile] = n;
    return;
  }
  // Block-wide stream compaction in rank order, kPer * kThreads ranks per pass: entry
  // (e, warp, lane) has rank r0 - e * kThreads - warp * 32 - lane, so (e, warp, lane) order
  // is descending rank.  Two barriers per pass (a pass of 256 ranks with two barriers took
  // 0.49 ms at 64K: early tiles walk ~NK * topk / pool ranks, barrier-bound).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int top = p.NK - 1;
  const int bottom = (int)s_rb_min;
  const int* perm = p.perm + (size_t)s * p.NK;
  static_assert(kPer * kWarps == 64, "one scan of two counts per lane");
  __shared__ int s_off[2][kPer * kWarps + 1];  // (double-buffered: one barrier less a pass)
  int base = 0;
  for (int r0 = top, pass = 0; r0 >= bottom; r0 -= kPer * kThreads, ++pass) {
    int* off = s_off[pass & 1];
    int key[kPer];
    unsigned ballot[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int r = r0 - e * kThreads - threadIdx.x;
      key[e] = r >= bottom ? __ldg(perm + r) : -1;
      if (key[e] < lo || key[e] >= hi) key[e] = -1;
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      ballot[e] = __ballot_sync(0xffffffffu, key[e] >= 0);
      if (lane == 0) off[e * kWarps + warp] = __popc(ballot[e]);
    }
    __syncthreads();
    if (warp == 0) {  // exclusive scan of the 64 counts in (e, warp) order
      const int a = off[2 * lane], b = off[2 * lane + 1];
      int x = a + b;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
      }
      off[2 * lane] = x - a - b;
      off[2 * lane + 1] = x - b;
      if (lane == 31) off[kPer * kWarps] = x;
    }
    __syncthreads();
    const unsigned below = (1u << lane) - 1;
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      if (key[e] < 0) continue;
      const int pos = base + off[e * kWarps + warp] + __popc(ballot[e] & below);
      if (pos < p.cap) out[pos] = key[e];
    }
    base += off[kPer * kWarps];
  }
  if (threadIdx.x == 0) {
    if (base > p.cap) atomicExch(p.overflow, 1);
    p.counts[(size_t)s * p.ntiles + tile] = base < p.cap ? base : p.cap;
  }
}

}  // namespace

cudaError_t launch_build_lists(const ListParams& p, cudaStream_t stream) {
  if (p.ntiles == 0 || p.S == 0) return cudaSuccess;
  dim3 grid(p.ntiles, p.S);
  build_lists_kernel<<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace xsk
