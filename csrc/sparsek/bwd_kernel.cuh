// SparseK attention backward (sm_80+ mma.sync path), deterministic: no float atomics.
//
// With s_ij = scale * m_ij * q_i.k_j, P = softmax, vv_ij = do_i.v_j, delta_i = do_i.o_i:
//   dS_ij = P_ij (m_ij vv_ij - delta_i),  dq_i = sum_j dS_ij m_ij scale k_j,
//   dk_j = sum_i dS_ij m_ij scale q_i,    dv_j = sum_i P_ij m_ij do_i,
//   g_ij = dL/dm_ij = P_ij vv_ij + dS_ij scale q_i.k_j   (score gradient, DESIGN.md 1).
// Pass 1 (bwd_dq_kernel) is query-centric like the forward: dq and, per row, G_i = sum of g
// over the row's selected fractional keys.  Pass 2 (bwd_dkv_kernel) is key-centric within a
// super-tile of queries: for every key the super-tile attends it sums over all the tile's
// rows and writes partial dk, dv and sum_i g_ij (fractional) to its own slot; a reduction
// (bwd_reduce.cu) adds each key's slots in a fixed order.  In both passes each warp decides
// per block of (row, key) pairs whether the rule can attend none of them (skipped), all of
// them (gate only) or some (the per-element rule): BlockMode.
// On Hopper, sm90/bwd_dq_sm90.cuh and sm90/bwd_dkv_sm90.cuh run the same two passes on
// wgmma with the helpers below (launch_bwd in bwd_bf16.cu picks the kernel set).
#pragma once
#include <climits>
#include <cmath>
#include <type_traits>

#include "tile_common.cuh"

namespace xsk {

constexpr float kLog2e = 1.4426950408889634f;

// How a warp treats one block of (row, key) pairs, decided once per block from the rows' and
// keys' bounds: kSkip when the rule attends no pair (its contributions would be exact
// zeros), kAll when it attends every pair (the gate is all that is left of the rule), else
// kRule, the per-element rule of tile_common.cuh.  Results are the same bits in every mode.
enum class BlockMode { kSkip, kAll, kRule };

struct RowBounds {  // over a block's rows (invalid rows: plo = wlo = whi = 0, rb = -1)
  int plo_min, plo_max, wlo_min, wlo_max, whi_min, whi_max, rb_max;
};
struct KeyBounds {  // over a block's valid keys (j_max < 0: none)
  int j_min, j_max, rank_min;
  bool all_valid;
};

__device__ __forceinline__ int warp_min(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ int warp_max(int x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Bounds over the rows the lanes of a warp hold (call from all lanes).
__device__ __forceinline__ RowBounds warp_row_bounds(RowBounds r) {
  return RowBounds{warp_min(r.plo_min), warp_max(r.plo_max), warp_min(r.wlo_min),
                   warp_max(r.wlo_max), warp_min(r.whi_min), warp_max(r.whi_max),
                   warp_max(r.rb_max)};
}
__device__ __forceinline__ RowBounds row_bounds_of(const RowInfo& r) {
  return RowBounds{r.plo, r.plo, r.wlo, r.wlo, r.whi, r.whi, r.rb};
}
__device__ __forceinline__ RowBounds merge(const RowBounds& a, const RowBounds& b) {
  return RowBounds{min(a.plo_min, b.plo_min), max(a.plo_max, b.plo_max), min(a.wlo_min, b.wlo_min),
                   max(a.wlo_max, b.wlo_max), min(a.whi_min, b.whi_min), max(a.whi_max, b.whi_max),
                   max(a.rb_max, b.rb_max)};
}
__device__ __forceinline__ KeyBounds warp_key_bounds(int j, int rank) {  // one key per lane
  const bool valid = j >= 0;
  const int invalid = __popc(__ballot_sync(0xffffffffu, !valid));
  return KeyBounds{warp_min(valid ? j : INT_MAX), warp_max(valid ? j : -1),
                   warp_min(valid ? rank : INT_MAX), invalid == 0};
}

// The same over a warp whose threads hold two keys each (j[0], j[1]: the rows g and g + 8 of
// an m16 accumulator tile).
__device__ __forceinline__ KeyBounds warp_key_bounds(const int (&j)[2], const int (&rank)[2]) {
  const bool v0 = j[0] >= 0, v1 = j[1] >= 0;
  return KeyBounds{warp_min(min(v0 ? j[0] : INT_MAX, v1 ? j[1] : INT_MAX)),
                   warp_max(max(v0 ? j[0] : -1, v1 ? j[1] : -1)),
                   warp_min(min(v0 ? rank[0] : INT_MAX, v1 ? rank[1] : INT_MAX)),
                   __all_sync(0xffffffffu, v0 && v1) != 0};
}
__device__ __forceinline__ KeyBounds merge(const KeyBounds& a, const KeyBounds& b) {
  return KeyBounds{min(a.j_min, b.j_min), max(a.j_max, b.j_max), min(a.rank_min, b.rank_min),
                   a.all_valid && b.all_valid};
}

// The block's mode under attends()'s rule; `interior` (every row of the CTA attends the
// contiguous tile) is what attends() takes.
__device__ __forceinline__ BlockMode block_mode(KeyRule rule, bool interior, const KeyBounds& k,
                                                const RowBounds& r) {
  if (k.j_max < 0) return BlockMode::kSkip;  // no valid key
  if (rule == KeyRule::kPoolSelected) {  // a row attends keys in [plo, wlo) at/above its rb
    if (k.j_max < r.plo_min || k.j_min >= r.wlo_max) return BlockMode::kSkip;
    if (k.all_valid && k.j_min >= r.plo_max && k.j_max < r.wlo_min && k.rank_min >= r.rb_max)
      return BlockMode::kAll;
    return BlockMode::kRule;
  }
  if (interior) return k.all_valid ? BlockMode::kAll : BlockMode::kRule;
  // a row attends keys in [wlo, whi) (window) or [plo, whi) (allowed)
  const bool win = rule == KeyRule::kWindow;
  const int lo_min = win ? r.wlo_min : r.plo_min, lo_max = win ? r.wlo_max : r.plo_max;
  if (k.j_max < lo_min || k.j_min >= r.whi_max) return BlockMode::kSkip;
  if (k.all_valid && k.j_min >= lo_max && k.j_max < r.whi_min) return BlockMode::kAll;
  return BlockMode::kRule;
}

// Runs f(std::true_type) for a kAll block (no rule per element), else f(std::false_type).
template <typename F>
__device__ __forceinline__ void with_block_mode(BlockMode mode, F&& f) {
  if (mode == BlockMode::kAll)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// The backward of one (row, key) pair with raw score s and dp = do.v, under gate g (att: the
// row attends the key): P, dS * g * scale, and whether the pair is a fractional pool key, with
// its term of the score gradient's sums (DESIGN.md section 1).
__device__ __forceinline__ bool pair_backward(bool att, bool pool, float g, float s, float dp,
                                              float lse2, float delta, float scale_log2,
                                              float scale, float& pr, float& ds, float& term) {
  pr = att ? exp2f(s * (scale_log2 * g) - lse2) : 0.f;
  const float dss = pr * (g * dp - delta) * scale;
  ds = dss * g;
  term = fmaf(dss, s, pr * dp);
  return pool && att && g > 0.f && g < 1.f;
}

template <typename T, int D>
struct BwdDqTraits {
  static constexpr int kBM = 64, kBN = 32, kWarps = 4, kThreads = kWarps * 32, kStages = 2;
  // 3 CTAs per SM (as shared memory allows at D = 128): at most 168 registers per thread
  static constexpr int kMinBlocks = 3;
  static constexpr size_t kSmem = sizeof(T) * (2 * kBM * D + kStages * 2 * kBN * D) +
                                  kStages * kBN * (2 * sizeof(int) + sizeof(float));
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdDqTraits<T, D>::kThreads, BwdDqTraits<T, D>::kMinBlocks)
    bwd_dq_kernel(const BwdDqParams b) {
  using Tr = BwdDqTraits<T, D>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, NST = Tr::kStages;
  const FwdParams& p = b.f;
  extern __shared__ __align__(128) char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sO = sQ + BM * D;  // dO rows
  T* sK = sO + BM * D;
  T* sV = sK + NST * BN * D;
  int* sIdx = reinterpret_cast<int*>(sV + NST * BN * D);
  float* sU = reinterpret_cast<float*>(sIdx + NST * BN);
  int* sRank = reinterpret_cast<int*>(sU + NST * BN);

  const int tile = blockIdx.x, s = blockIdx.y, rgroup = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile], RP = p.RP;
  const KeyStreams ks = make_key_streams<BN>(p, tile, s, q0, q1);
  const int ntiles_k = ks.tilesA + ks.tilesB;

  RowInfo rows[2];
  float lse2[2], delta[2];
  int row_q[2], row_r[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = warp * 16 + (lane >> 2) + 8 * h;
    row_q[h] = q0 + m / RP;
    row_r[h] = rgroup * RP + m % RP;
    const bool valid = row_q[h] < q1;
    rows[h] = load_row(p, s, row_q[h], valid);
    const size_t g = ((size_t)s * p.R + row_r[h]) * p.NQ + row_q[h];
    lse2[h] = valid ? b.lse[g] * kLog2e : 0.f;
    delta[h] = valid ? b.delta[g] : 0.f;
  }
  // this warp's 16 rows, for the per-tile BlockMode
  const RowBounds wrows = warp_row_bounds(merge(row_bounds_of(rows[0]), row_bounds_of(rows[1])));
  load_rows<T, D>(static_cast<const T*>(p.q), p.q_sn, p.q_ss, p.q_sr, s, q0, q1, rgroup * RP,
                  RP, BM, sQ);
  load_rows<T, D>(static_cast<const T*>(b.dout), b.do_sn, b.do_ss, b.do_sr, s, q0, q1,
                  rgroup * RP, RP, BM, sO);
  cp_async_commit();
  const int r_kv = rgroup * RP;
  auto load_tile = [&](int t) {
    const int st = t % NST;
    load_kv_tile<T, D, BN>(p, ks, t, s, r_kv, sK + st * BN * D, sV + st * BN * D,
                           sIdx + st * BN, sU + st * BN, sRank + st * BN);
  };
  if (ntiles_k > 0) load_tile(0);
  cp_async_commit();

  float dq_acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int c = 0; c < 4; ++c) dq_acc[n][c] = 0.f;
  float grow[2] = {0.f, 0.f};

  for (int t = 0; t < ntiles_k; ++t) {
    const int st = t % NST;
    if (t + 1 < ntiles_k) load_tile(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const KeyRule rule = ks.rule(t);
    const bool interior = ks.interior(t, BN);
    static_assert(BN == 32, "one key of the tile per lane");
    const BlockMode mode = block_mode(rule, interior,
                                      warp_key_bounds(sIdx[st * BN + lane], sRank[st * BN + lane]),
                                      wrows);
    if (mode != BlockMode::kSkip) {  // (a skipped block adds exact zeros)
      const T* cK = sK + st * BN * D;
      const T* cV = sV + st * BN * D;
      float sc[BN / 8][4], dp[BN / 8][4];
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) sc[n][c] = dp[n][c] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int mi = lane >> 3;
        uint32_t qa[4], oa[4];
        const int row = warp * 16 + (mi & 1) * 8 + (lane & 7);
        ldmatrix_x4(qa, sQ + swz<D>(row, kk * 2 + (mi >> 1)));
        ldmatrix_x4(oa, sO + swz<D>(row, kk * 2 + (mi >> 1)));
#pragma unroll
        for (int n2 = 0; n2 < BN / 16; ++n2) {
          uint32_t kb[4], vb[4];
          const int key = n2 * 16 + (mi >> 1) * 8 + (lane & 7);
          ldmatrix_x4(kb, cK + swz<D>(key, kk * 2 + (mi & 1)));
          ldmatrix_x4(vb, cV + swz<D>(key, kk * 2 + (mi & 1)));
          Mma<T>::run(sc[2 * n2], qa, kb[0], kb[1]);
          Mma<T>::run(sc[2 * n2 + 1], qa, kb[2], kb[3]);
          Mma<T>::run(dp[2 * n2], oa, vb[0], vb[1]);
          Mma<T>::run(dp[2 * n2 + 1], oa, vb[2], vb[3]);
        }
      }
      uint32_t dsf[BN / 16][4];
      // dS * g * scale (the A fragment of dQ's product) and the rows' sums G; kAllPairs: the
      // block's mode is kAll (no rule per element).
      auto elementwise = [&](auto all_pairs) {
        constexpr bool kAllPairs = decltype(all_pairs)::value;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) {
          float ds[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int h = c >> 1, e = st * BN + n * 8 + (lane & 3) * 2 + (c & 1);
            float g;
            bool att;
            if constexpr (kAllPairs) {  // attends()'s gate, without its tests
              att = true;
              g = rule == KeyRule::kPoolSelected ? gate_of(sU[e], rows[h].tau)
                                                 : 1.f;
            } else {
              att = attends(rule, interior, rows[h], sIdx[e], sRank[e], sU[e], g);
            }
            float pr, term;
            if (pair_backward(att, rule == KeyRule::kPoolSelected, g, sc[n][c], dp[n][c], lse2[h],
                              delta[h], p.scale_log2, b.scale, pr, ds[c], term))
              grow[h] += term;
          }
          dsf[n >> 1][(n & 1) * 2 + 0] = Mma<T>::pack(ds[0], ds[1]);
          dsf[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(ds[2], ds[3]);
        }
      };
      with_block_mode(mode, elementwise);
      // dQ += dS K  (K rows as the k16 x n8 operand: transposed load)
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
          uint32_t kb[4];
          const int mi = lane >> 3;
          const int key = kc * 16 + (mi & 1) * 8 + (lane & 7);
          ldmatrix_x4_trans(kb, cK + swz<D>(key, n2 * 2 + (mi >> 1)));
          Mma<T>::run(dq_acc[2 * n2], dsf[kc], kb[0], kb[1]);
          Mma<T>::run(dq_acc[2 * n2 + 1], dsf[kc], kb[2], kb[3]);
        }
      }
    }  // mode != kSkip
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dqbase = static_cast<T*>(b.dq);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    grow[h] += __shfl_xor_sync(0xffffffffu, grow[h], 1);
    grow[h] += __shfl_xor_sync(0xffffffffu, grow[h], 2);
    if (row_q[h] >= q1) continue;
    T* drow = dqbase + row_q[h] * b.dq_sn + s * b.dq_ss + row_r[h] * b.dq_sr;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int d = n * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(drow + d) = Mma<T>::pack(dq_acc[n][2 * h], dq_acc[n][2 * h + 1]);
    }
    if ((lane & 3) == 0 && b.grow != nullptr)
      b.grow[((size_t)s * p.R + row_r[h]) * p.NQ + row_q[h]] = grow[h];
  }
}

template <typename T, int D>
struct BwdDkvTraits {
  static constexpr int kBK = 64, kRows = 64, kWarps = 4, kThreads = kWarps * 32;
  // K, V of one key tile; Q, dO of two row chunks; per-row metadata of two row chunks and
  // the RowBounds of each chunk's two 32-row halves.
  static constexpr size_t kSmem = sizeof(T) * (2 * kBK * D + 2 * 2 * kRows * D) +
                                  kBK * (2 * sizeof(int) + sizeof(float)) +
                                  2 * kRows * 7 * sizeof(float) + 2 * 2 * sizeof(RowBounds);
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdDkvTraits<T, D>::kThreads)
    bwd_dkv_kernel(const BwdDkvParams kp) {
  using Tr = BwdDkvTraits<T, D>;
  constexpr int BK = Tr::kBK, RW = Tr::kRows;
  const BwdDqParams& b = kp.b;
  const FwdParams& p = b.f;
  extern __shared__ __align__(128) char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BK * D;
  T* sQ = sV + BK * D;            // [2][RW][D]
  T* sO = sQ + 2 * RW * D;        // [2][RW][D]
  int* sIdx = reinterpret_cast<int*>(sO + 2 * RW * D);
  float* sU = reinterpret_cast<float*>(sIdx + BK);
  int* sRank = reinterpret_cast<int*>(sU + BK);
  // per-row metadata [2][RW] each
  int* rPlo = sRank + BK;
  int* rWlo = rPlo + 2 * RW;
  int* rWhi = rWlo + 2 * RW;
  int* rRb = rWhi + 2 * RW;
  float* rTau = reinterpret_cast<float*>(rRb + 2 * RW);
  float* rLse2 = rTau + 2 * RW;
  float* rDelta = rLse2 + 2 * RW;
  RowBounds* rBounds = reinterpret_cast<RowBounds*>(rDelta + 2 * RW);  // [2][2 halves]
  static_assert(RW == 64, "load_chunk: one row per thread of warps 0 and 1");

  const int tile = blockIdx.x, s = blockIdx.y, rgroup = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile], RP = p.RP;
  const int nrows = (q1 - q0) * RP, nchunks = (nrows + RW - 1) / RW;
  const KeyStreams ks = make_key_streams<BK>(p, tile, s, q0, q1);
  const int ntiles_k = ks.tilesA + ks.tilesB;
  const int r_kv = rgroup * RP;
  const int group = s * (p.R / RP) + rgroup;

  auto load_chunk = [&](int c) {  // rows [c*RW, c*RW + RW) of the super-tile
    const int st = c & 1;
    const int qa = q0 + c * (RW / RP);
    const int qb = min(q1, qa + RW / RP);
    load_rows<T, D>(static_cast<const T*>(p.q), p.q_sn, p.q_ss, p.q_sr, s, qa, qb, rgroup * RP,
                    RP, RW, sQ + st * RW * D);
    load_rows<T, D>(static_cast<const T*>(b.dout), b.do_sn, b.do_ss, b.do_sr, s, qa, qb,
                    rgroup * RP, RP, RW, sO + st * RW * D);
    if (threadIdx.x < RW) {
      const int m = threadIdx.x;
      const int qi = qa + m / RP, r = rgroup * RP + m % RP;
      const bool valid = qi < qb;
      const RowInfo ri = load_row(p, s, qi, valid);
      rPlo[st * RW + m] = ri.plo;
      rWlo[st * RW + m] = ri.wlo;
      rWhi[st * RW + m] = ri.whi;
      rRb[st * RW + m] = ri.rb;
      rTau[st * RW + m] = ri.tau;
      const size_t g = ((size_t)s * p.R + r) * p.NQ + qi;
      rLse2[st * RW + m] = valid ? b.lse[g] * kLog2e : INFINITY;  // invalid rows: P = 0
      rDelta[st * RW + m] = valid ? b.delta[g] : 0.f;
      const RowBounds rb = warp_row_bounds(row_bounds_of(ri));
      if ((threadIdx.x & 31) == 0) rBounds[st * 2 + (threadIdx.x >> 5)] = rb;
    }
  };

  for (int t = 0; t < ntiles_k; ++t) {
    __syncthreads();  // previous tile's smem is free
    load_kv_tile<T, D, BK>(p, ks, t, s, r_kv, sK, sV, sIdx, sU, sRank);
    cp_async_commit();
    if (nchunks > 0) load_chunk(0);
    cp_async_commit();
    const KeyRule rule = ks.rule(t);
    const bool interior = ks.interior(t, BK);

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) dk_acc[n][c] = dv_acc[n][c] = 0.f;
    float du[2] = {0.f, 0.f};
    int kj[2], krank[2];
    float ku[2];
    KeyBounds kbound;  // of this warp's 16 keys

    for (int c = 0; c < nchunks; ++c) {
      const int st = c & 1;
      if (c + 1 < nchunks) load_chunk(c + 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      if (c == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int e = warp * 16 + (lane >> 2) + 8 * h;
          kj[h] = sIdx[e];
          krank[h] = sRank[e];
          ku[h] = sU[e];
        }
        kbound = warp_key_bounds(kj, krank);
      }
      const BlockMode mode =
          block_mode(rule, interior, kbound, merge(rBounds[st * 2], rBounds[st * 2 + 1]));
      if (mode != BlockMode::kSkip) {  // (a skipped block adds exact zeros)
        const T* cQ = sQ + st * RW * D;
        const T* cO = sO + st * RW * D;
        // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x RW rows.
        float sct[RW / 8][4], dpt[RW / 8][4];
#pragma unroll
        for (int n = 0; n < RW / 8; ++n)
#pragma unroll
          for (int cc = 0; cc < 4; ++cc) sct[n][cc] = dpt[n][cc] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const int mi = lane >> 3;
          uint32_t ka[4], va[4];
          const int key = warp * 16 + (mi & 1) * 8 + (lane & 7);
          ldmatrix_x4(ka, sK + swz<D>(key, kk * 2 + (mi >> 1)));
          ldmatrix_x4(va, sV + swz<D>(key, kk * 2 + (mi >> 1)));
#pragma unroll
          for (int n2 = 0; n2 < RW / 16; ++n2) {
            uint32_t qb[4], ob[4];
            const int row = n2 * 16 + (mi >> 1) * 8 + (lane & 7);
            ldmatrix_x4(qb, cQ + swz<D>(row, kk * 2 + (mi & 1)));
            ldmatrix_x4(ob, cO + swz<D>(row, kk * 2 + (mi & 1)));
            Mma<T>::run(sct[2 * n2], ka, qb[0], qb[1]);
            Mma<T>::run(sct[2 * n2 + 1], ka, qb[2], qb[3]);
            Mma<T>::run(dpt[2 * n2], va, ob[0], ob[1]);
            Mma<T>::run(dpt[2 * n2 + 1], va, ob[2], ob[3]);
          }
        }
        uint32_t pf[RW / 16][4], dsf[RW / 16][4];
        // P * g and dS * g * scale (A fragments of the products below); the score gradient's
        // direct sums du.  kAllPairs: the block's mode is kAll (no rule per element).
        auto elementwise = [&](auto all_pairs) {
          constexpr bool kAllPairs = decltype(all_pairs)::value;
#pragma unroll
          for (int n = 0; n < RW / 8; ++n) {
            float pv[4], ds[4];
#pragma unroll
            for (int cc = 0; cc < 4; ++cc) {
              const int h = cc >> 1;  // which of the thread's two keys
              const int m = st * RW + n * 8 + (lane & 3) * 2 + (cc & 1);
              float g;
              bool att;
              if constexpr (kAllPairs) {  // attends()'s gate, without its tests
                att = true;
                g = rule == KeyRule::kPoolSelected ? gate_of(ku[h], rTau[m]) : 1.f;
              } else {
                const RowInfo ri{rPlo[m], rWlo[m], rWhi[m], rRb[m], rTau[m]};
                att = kj[h] >= 0 && attends(rule, interior, ri, kj[h], krank[h], ku[h], g);
              }
              float pr, term;
              if (pair_backward(att, rule == KeyRule::kPoolSelected, g, sct[n][cc], dpt[n][cc],
                                rLse2[m], rDelta[m], p.scale_log2, b.scale, pr, ds[cc], term))
                du[h] += term;
              pv[cc] = pr * g;
            }
            pf[n >> 1][(n & 1) * 2 + 0] = Mma<T>::pack(pv[0], pv[1]);
            pf[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pv[2], pv[3]);
            dsf[n >> 1][(n & 1) * 2 + 0] = Mma<T>::pack(ds[0], ds[1]);
            dsf[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(ds[2], ds[3]);
          }
        };
        with_block_mode(mode, elementwise);
        // dV += (P g) dO and dK += (dS g scale) Q over this chunk's rows.
#pragma unroll
        for (int kc = 0; kc < RW / 16; ++kc) {
#pragma unroll
          for (int n2 = 0; n2 < D / 16; ++n2) {
            uint32_t ob[4], qb[4];
            const int mi = lane >> 3;
            const int row = kc * 16 + (mi & 1) * 8 + (lane & 7);
            ldmatrix_x4_trans(ob, cO + swz<D>(row, n2 * 2 + (mi >> 1)));
            ldmatrix_x4_trans(qb, cQ + swz<D>(row, n2 * 2 + (mi >> 1)));
            Mma<T>::run(dv_acc[2 * n2], pf[kc], ob[0], ob[1]);
            Mma<T>::run(dv_acc[2 * n2 + 1], pf[kc], ob[2], ob[3]);
            Mma<T>::run(dk_acc[2 * n2], dsf[kc], qb[0], qb[1]);
            Mma<T>::run(dk_acc[2 * n2 + 1], dsf[kc], qb[2], qb[3]);
          }
        }
      }  // mode != kSkip
      __syncthreads();  // chunk st is refilled next iteration
    }
    cp_async_wait<0>();
    if (nchunks == 0) continue;
    // Write this key tile's partials to its slots.
    const int slot0 = t < ks.tilesA ? t * BK : kp.list_slots + (t - ks.tilesA) * BK;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      du[h] += __shfl_xor_sync(0xffffffffu, du[h], 1);
      du[h] += __shfl_xor_sync(0xffffffffu, du[h], 2);
      const int e = warp * 16 + (lane >> 2) + 8 * h;
      if (kj[h] < 0) continue;
      const size_t slot = ((size_t)group * p.ntiles + tile) * kp.slots + slot0 + e;
      float* dst = kp.part_kv + slot * 2 * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int d = n * 8 + (lane & 3) * 2;
        *reinterpret_cast<float2*>(dst + d) = make_float2(dk_acc[n][2 * h], dk_acc[n][2 * h + 1]);
        *reinterpret_cast<float2*>(dst + D + d) =
            make_float2(dv_acc[n][2 * h], dv_acc[n][2 * h + 1]);
      }
      if ((lane & 3) == 0) kp.part_u[slot] = du[h];
    }
  }
}

template <typename T, int D>
cudaError_t run_bwd_dq(const BwdDqParams& b, cudaStream_t stream) {
  using Tr = BwdDqTraits<T, D>;
  auto kernel = bwd_dq_kernel<T, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmem);
  if (err != cudaSuccess) return err;
  dim3 grid(b.f.ntiles, b.f.S, b.f.R / b.f.RP);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(b);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t run_bwd_dkv(const BwdDkvParams& kp, cudaStream_t stream) {
  using Tr = BwdDkvTraits<T, D>;
  auto kernel = bwd_dkv_kernel<T, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmem);
  if (err != cudaSuccess) return err;
  dim3 grid(kp.b.f.ntiles, kp.b.f.S, kp.b.f.R / kp.b.f.RP);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(kp);
  return cudaGetLastError();
}

}  // namespace xsk
