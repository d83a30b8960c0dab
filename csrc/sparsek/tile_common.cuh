// Pieces shared by the forward and backward kernels: the key streams of a query tile,
// the per-(row, key) attention rule with its gate, and the gathered K/V tile loader.
#pragma once
#include <cmath>

#include "mma.cuh"
#include "params.h"

namespace xsk {

enum class KeyRule { kPoolSelected, kWindow, kAllowed };

// What one row (query) needs to decide, per key, whether it attends and with which gate.
struct RowInfo {
  int plo, wlo, whi, rb;
  float tau;
};

__device__ __forceinline__ RowInfo load_row(const FwdParams& p, int s, int qi, bool valid) {
  RowInfo r{0, 0, 0, -1, -INFINITY};
  if (!valid) return r;
  r.plo = (int)p.pool_lo[qi];
  r.wlo = (int)p.win_lo[qi];
  r.whi = (int)p.win_hi[qi];
  if (p.u != nullptr) {
    const size_t g = (size_t)s * p.NQ + qi;
    r.tau = (float)p.tau[g];
    r.rb = (int)p.rb[g];
  }
  return r;
}

// A pool key's gate clip(u - tau, 0, 1), in one FADD.SAT: __saturatef(u - tau) and
// fminf(fmaxf(u - tau, 0), 1) compile to two and three instructions.  (The kernels build
// with --use_fast_math, whose FTZ this keeps.)
__device__ __forceinline__ float gate_of(float u, float tau) {
  float g;
  asm("add.ftz.sat.f32 %0, %1, %2;" : "=f"(g) : "f"(u), "f"(-tau));
  return g;
}

// DESIGN.md section 1 for one (row, key): pool keys at/above the row's top-k boundary get
// gate clip(u - tau, 0, 1); window (or, in exact mode, allowed) keys get gate 1.
__device__ __forceinline__ bool attends(KeyRule rule, bool interior, const RowInfo& r, int j,
                                        int rank, float u, float& gate) {
  gate = 1.f;
  if (rule == KeyRule::kPoolSelected) {
    gate = gate_of(u, r.tau);
    return j >= r.plo && j < r.wlo && rank >= r.rb;
  }
  if (interior) return true;
  return j >= 0 && j < r.whi && j >= (rule == KeyRule::kWindow ? r.wlo : r.plo);
}

// The key streams of query tile `tile` (queries [q0, q1)) for head s:
//   A. sparse: the tile's gathered pool-key list; exact: the contiguous allowed range;
//   B. sparse only: the contiguous window range.
// [in_lo, in_hi) / [pin_lo, in_hi) are the keys inside every row's window / allowed range:
// contiguous key tiles there need no per-element mask.
struct KeyStreams {
  const int* list;
  int nA, a_lo, nB, b_lo, tilesA, tilesB, in_lo, in_hi, pin_lo;
  bool sparse;

  __device__ int key(int t, int e, int BN) const {
    if (t < tilesA) {
      const int pos = t * BN + e;
      if (pos >= nA) return -1;
      return sparse ? list[pos] : a_lo + pos;
    }
    const int pos = (t - tilesA) * BN + e;
    return pos < nB ? b_lo + pos : -1;
  }
  __device__ KeyRule rule(int t) const {
    return t < tilesA ? (sparse ? KeyRule::kPoolSelected : KeyRule::kAllowed) : KeyRule::kWindow;
  }
  __device__ bool interior(int t, int BN) const {
    const KeyRule r = rule(t);
    const int k0 = t < tilesA ? a_lo + t * BN : b_lo + (t - tilesA) * BN;
    const int k_end = t < tilesA ? a_lo + nA : b_lo + nB;
    if (r == KeyRule::kWindow) return k0 >= in_lo && k0 + BN <= min(in_hi, k_end);
    if (r == KeyRule::kAllowed) return k0 >= pin_lo && k0 + BN <= min(in_hi, k_end);
    return false;
  }
};

// The key streams of query tile `tile` of head s from its queries' bounds: plo / wlo the
// smallest pool / window start, whi the largest window end, [in_lo, in_hi) / pin_lo as in
// KeyStreams.  Int: int, or const int& to read block-wide bounds from shared memory where
// each field is set.
template <int BN, typename Int = int>
__device__ __forceinline__ KeyStreams key_streams_from_bounds(const FwdParams& p, int tile, int s,
                                                              Int plo, Int wlo, Int whi,
                                                              Int in_lo, Int in_hi, Int pin_lo) {
  KeyStreams ks;
  ks.sparse = p.u != nullptr;
  if (ks.sparse) {
    ks.list = p.lists + ((size_t)s * p.ntiles + tile) * p.cap;
    ks.nA = p.counts[(size_t)s * p.ntiles + tile];
    ks.a_lo = 0;
  } else {
    ks.list = nullptr;
    ks.a_lo = plo;
    ks.nA = max(0, whi - plo);
  }
  ks.b_lo = wlo;
  ks.nB = ks.sparse ? max(0, whi - wlo) : 0;
  ks.tilesA = (ks.nA + BN - 1) / BN;
  ks.tilesB = (ks.nB + BN - 1) / BN;
  ks.in_lo = in_lo;
  ks.in_hi = in_hi;
  ks.pin_lo = pin_lo;
  return ks;
}

// The same from block-wide bounds. Call from every thread of the block (uses shared memory
// and __syncthreads).
template <int BN>
__device__ KeyStreams make_key_streams(const FwdParams& p, int tile, int s, int q0, int q1) {
  __shared__ int s_plo, s_wlo, s_whi, s_in_lo, s_in_hi, s_pin_lo;
  if (threadIdx.x == 0) {
    s_plo = s_wlo = 0x7fffffff;
    s_whi = s_in_lo = s_pin_lo = -1;
    s_in_hi = 0x7fffffff;
  }
  __syncthreads();
  for (int i = q0 + threadIdx.x; i < q1; i += blockDim.x) {
    const int a = (int)p.pool_lo[i], b = (int)p.win_lo[i], c = (int)p.win_hi[i];
    atomicMin(&s_plo, a);
    atomicMin(&s_wlo, b);
    atomicMax(&s_whi, c);
    atomicMax(&s_in_lo, b);
    atomicMin(&s_in_hi, c);
    atomicMax(&s_pin_lo, a);
  }
  __syncthreads();
  return key_streams_from_bounds<BN, const int&>(p, tile, s, s_plo, s_wlo, s_whi, s_in_lo,
                                                 s_in_hi, s_pin_lo);
}

// Gathers key tile t (BN rows of K and V, D columns) into swizzled shared memory, plus each
// key's index, score and rank.  K/V of the packed heads are shared (head r_kv).
template <typename T, int D, int BN>
__device__ void load_kv_tile(const FwdParams& p, const KeyStreams& ks, int t, int s, int r_kv,
                             T* dK, T* dV, int* idx, float* u, int* rank) {
  constexpr int CH = D / 8;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  for (int c = threadIdx.x; c < BN * CH; c += blockDim.x) {
    const int e = c / CH, ch = c % CH;
    const int j = ks.key(t, e, BN);
    const bool valid = j >= 0;
    const int64_t jj = valid ? j : 0;
    cp_async16(dK + swz<D>(e, ch), kbase + jj * p.k_sn + s * p.k_ss + r_kv * p.k_sr + ch * 8,
               valid);
    cp_async16(dV + swz<D>(e, ch), vbase + jj * p.v_sn + s * p.v_ss + r_kv * p.v_sr + ch * 8,
               valid);
  }
  for (int e = threadIdx.x; e < BN; e += blockDim.x) {
    const int j = ks.key(t, e, BN);
    idx[e] = j;
    u[e] = (ks.sparse && j >= 0) ? p.u[(size_t)s * p.NK + j] : 0.f;
    rank[e] = (ks.sparse && j >= 0) ? p.ranks[(size_t)s * p.NK + j] : -1;
  }
}

// Rows [0, BM) of a tile: row m is query q0 + m / RP of head r0 + m % RP.  Loads them
// (zero rows past q1) from a [N, S, R, D] tensor into swizzled shared memory.
template <typename T, int D>
__device__ void load_rows(const T* base, int64_t sn, int64_t ss, int64_t sr, int s, int q0,
                          int q1, int r0, int RP, int BM, T* dst) {
  constexpr int CH = D / 8;
  for (int c = threadIdx.x; c < BM * CH; c += blockDim.x) {
    const int m = c / CH, ch = c % CH;
    const int qi = q0 + m / RP, r = r0 + m % RP;
    const bool valid = qi < q1;
    const T* src = base + (valid ? (qi * sn + s * ss + r * sr + ch * 8) : 0);
    cp_async16(dst + swz<D>(m, ch), src, valid);
  }
}

}  // namespace xsk
