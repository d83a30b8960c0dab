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
//
// Order: the keys inside every query's pool range, [max pool_lo, min win_lo), come first,
// in descending rank; then the others (keys that some of the tile's queries see in their
// window instead, the last ~tile_size keys before the diagonal, or before their pool), in
// ascending index, found by one more pass over those few positions (their ranks, not a
// second walk).  The kernels decide per key tile (forward, dq) or per 16 keys (dk/dv)
// whether one cheap rule covers every (row, key) pair; rank order alone scattered those few
// keys over the list and made ~18% of a 64K forward's list tiles (and ~20% of the dk/dv
// pass's pool blocks) take the per-pair rule; at the end, ~9.5% (~5%) do, mostly a list's
// last, partial tile (a CPU model of the 64K benchmark's lists).  H200, 64K forward +
// backward: dk/dv 16.66 -> 13.43 ms, dq 10.17 -> 10.04, forward 6.64 -> 6.50, the three
// list builds 0.48 -> 0.53 ms; 40.4 -> 36.9 ms per call.
#include "launch.h"

namespace xsk {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32, kPer = 8;  // kPer: ranks per thread and pass
// A tile whose interval has more positions outside [max pool_lo, min win_lo) than one pass
// covers keeps plain rank order.
constexpr int kTailMax = kPer * kThreads;

// One pass of the block-wide stream compaction: entry (e, warp, lane) is key[e] of the
// thread (-1: none); the valid ones go to out[base ...] in (e, warp, lane) order (not past
// cap).  Returns how many were valid.  Two barriers; `off` alternates between passes (so
// one barrier fewer).
__device__ __forceinline__ int compact_pass(const int (&key)[kPer], int* off, int base, int* out,
                                            int cap) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  static_assert(kPer * kWarps == 64, "one scan of two counts per lane");
  unsigned ballot[kPer];
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
    if (pos < cap) out[pos] = key[e];
  }
  return off[kPer * kWarps];
}

__global__ void __launch_bounds__(kThreads) build_lists_kernel(ListParams p) {
  const int tile = blockIdx.x, s = blockIdx.y;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile];
  __shared__ long long s_rb_min;
  __shared__ int s_lo, s_hi, s_plo_max, s_wlo_min, s_all;
  if (threadIdx.x == 0) {
    s_rb_min = 0x7fffffffffffffffLL;
    s_lo = 0x7fffffff;
    s_hi = -1;
    s_plo_max = -1;
    s_wlo_min = 0x7fffffff;
    s_all = 0;
  }
  __syncthreads();
  for (int i = q0 + threadIdx.x; i < q1; i += kThreads) {
    const long long rb = p.rb[(size_t)s * p.NQ + i];
    atomicMin(&s_rb_min, rb);
    const int plo = (int)p.pool_lo[i], wlo = (int)p.win_lo[i];
    atomicMin(&s_lo, plo);
    atomicMax(&s_hi, wlo);
    atomicMax(&s_plo_max, plo);
    atomicMin(&s_wlo_min, wlo);
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
  // The walk: kPer * kThreads ranks per pass, entry (e, warp, lane) at rank
  // r0 - e * kThreads - warp * 32 - lane, so the list is in descending rank.  (A pass of 256
  // ranks took 0.49 ms at 64K: early tiles walk ~NK * topk / pool ranks, barrier-bound.)
  // It keeps the keys of [f_lo, f_hi); the tail pass after it the rest of [lo, hi).
  const int f_lo0 = max(lo, s_plo_max), f_hi0 = min(hi, s_wlo_min);
  const bool split = f_lo0 < f_hi0 && (f_lo0 - lo) + (hi - f_hi0) <= kTailMax;
  const int f_lo = split ? f_lo0 : lo, f_hi = split ? f_hi0 : hi;
  const int bottom = (int)s_rb_min;
  const int* perm = p.perm + (size_t)s * p.NK;
  __shared__ int s_off[2][kPer * kWarps + 1];
  int n = 0, pass = 0;
  for (int r0 = p.NK - 1; r0 >= bottom; r0 -= kPer * kThreads, ++pass) {
    int key[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int r = r0 - e * kThreads - threadIdx.x;
      key[e] = r >= bottom ? __ldg(perm + r) : -1;
      if (key[e] < f_lo || key[e] >= f_hi) key[e] = -1;
    }
    n += compact_pass(key, s_off[pass & 1], n, out, p.cap);
  }
  if (split) {  // the tail: positions x of [lo, f_lo) then [f_hi, hi), at/above the bottom rank
    const int* rank = p.ranks + (size_t)s * p.NK;
    const int n_lo = f_lo - lo, n_tail = n_lo + hi - f_hi;
    int key[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int x = e * kThreads + threadIdx.x;
      const int j = x < n_lo ? lo + x : f_hi + x - n_lo;
      key[e] = x < n_tail && __ldg(rank + j) >= bottom ? j : -1;
    }
    n += compact_pass(key, s_off[pass & 1], n, out, p.cap);
  }
  if (threadIdx.x == 0) {
    if (n > p.cap) atomicExch(p.overflow, 1);
    p.counts[(size_t)s * p.ntiles + tile] = n < p.cap ? n : p.cap;
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
