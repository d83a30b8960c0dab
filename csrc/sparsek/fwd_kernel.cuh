// SparseK attention forward (sm_80+ mma.sync path).
//
// One CTA = one query tile x one selection head x one group of RP query heads sharing
// K/V (GQA rows are packed into M: BM = 64 rows = (64 / RP) queries x RP heads), 4 warps of
// 16 rows.  The CTA walks two key streams in tiles of BN = 64 keys:
//   A. sparse mode: the tile's gathered pool-key list (lists.cu), attended by a row iff
//      the key is in the row's pool and its rank is at/above the row's top-k boundary
//      rank, gate clip(u - tau);
//      exact mode: the contiguous range of every allowed key, gate 1;
//   B. sparse mode only: the contiguous window range, attended iff in the row's window.
// Pools and windows are disjoint per row, so no (row, key) pair is counted twice.
// K/V rows are gathered with 16-byte cp.async into a double-buffered, swizzled tile;
// S = QK^T and O += (P * gate) V run on mma.m16n8k16 with an online softmax in base 2.
#pragma once
#include <cmath>

#include "mma.cuh"
#include "params.h"

namespace xsk {

template <typename T, int D>
struct FwdTraits {
  static constexpr int kBM = 64, kBN = 64, kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr size_t kSmem =
      sizeof(T) * (kBM * D + 2 * 2 * kBN * D) + 2 * kBN * (2 * sizeof(int) + sizeof(float));
};

enum class KeyRule { kPoolSelected, kWindow, kAllowed };

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<T, D>::kThreads)
    sparsek_fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<T, D>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, CH = Tr::kChunks;
  extern __shared__ __align__(128) char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;          // [2][BN][D]
  T* sV = sK + 2 * BN * D;      // [2][BN][D]
  int* sIdx = reinterpret_cast<int*>(sV + 2 * BN * D);  // [2][BN] key index, -1 = none
  float* sU = reinterpret_cast<float*>(sIdx + 2 * BN);  // [2][BN] key score
  int* sRank = reinterpret_cast<int*>(sU + 2 * BN);     // [2][BN] key rank in its head

  const int tile = blockIdx.x, s = blockIdx.y, rgroup = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile];
  const int RP = p.RP;
  const bool sparse = p.u != nullptr;

  // ---- key streams of this tile ------------------------------------------------------
  // Extents over the tile's queries; [in_lo, in_hi) / [pin_lo, ...) are the keys inside
  // every row's window / allowed range, where a tile needs no per-element mask.
  __shared__ int s_plo, s_wlo, s_whi, s_in_lo, s_in_hi, s_pin_lo;
  if (tid == 0) {
    s_plo = s_wlo = 0x7fffffff;
    s_whi = s_in_lo = s_pin_lo = -1;
    s_in_hi = 0x7fffffff;
  }
  __syncthreads();
  for (int i = q0 + tid; i < q1; i += Tr::kThreads) {
    const int a = (int)p.pool_lo[i], b = (int)p.win_lo[i], c = (int)p.win_hi[i];
    atomicMin(&s_plo, a);
    atomicMin(&s_wlo, b);
    atomicMax(&s_whi, c);
    atomicMax(&s_in_lo, b);
    atomicMin(&s_in_hi, c);
    atomicMax(&s_pin_lo, a);
  }
  __syncthreads();
  const int* list = nullptr;
  int nA, rangeA_lo = 0;
  if (sparse) {
    list = p.lists + ((size_t)s * p.ntiles + tile) * p.cap;
    nA = p.counts[(size_t)s * p.ntiles + tile];
  } else {
    rangeA_lo = s_plo;
    nA = max(0, s_whi - s_plo);
  }
  const int nB = sparse ? max(0, s_whi - s_wlo) : 0;
  const int tilesA = (nA + BN - 1) / BN, tilesB = (nB + BN - 1) / BN;
  const int ntiles_k = tilesA + tilesB;

  // ---- per-row metadata: each thread owns rows lane/4 and lane/4 + 8 of its warp -------
  const T* qbase = static_cast<const T*>(p.q);
  int row_q[2], row_r[2], plo[2], wlo[2], whi[2], rb[2];
  float tau[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = warp * 16 + (lane >> 2) + 8 * h;
    row_q[h] = q0 + m / RP;
    row_r[h] = rgroup * RP + m % RP;
    const bool valid = row_q[h] < q1;
    plo[h] = valid ? (int)p.pool_lo[row_q[h]] : 0;
    wlo[h] = valid ? (int)p.win_lo[row_q[h]] : 0;
    whi[h] = valid ? (int)p.win_hi[row_q[h]] : 0;
    if (sparse && valid) {
      const size_t g = (size_t)s * p.NQ + row_q[h];
      tau[h] = (float)p.tau[g];
      rb[h] = (int)p.rb[g];
    } else {
      tau[h] = -INFINITY;
      rb[h] = -1;
    }
  }

  // ---- Q tile -> shared (zero rows past the tile) -------------------------------------
  for (int c = tid; c < BM * CH; c += Tr::kThreads) {
    const int m = c / CH, ch = c % CH;
    const int qi = q0 + m / RP, r = rgroup * RP + m % RP;
    const bool valid = qi < q1;
    const T* src = qbase + (valid ? (qi * p.q_sn + s * p.q_ss + r * p.q_sr + ch * 8) : 0);
    cp_async16(sQ + swz<D>(m, ch), src, valid);
  }
  cp_async_commit();

  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
  const int r_kv = rgroup * RP;  // K/V are shared by the RP packed heads (stride 0 over R)
  auto key_of = [&](int t, int e) -> int {
    if (t < tilesA) {
      const int pos = t * BN + e;
      if (pos >= nA) return -1;
      return sparse ? list[pos] : rangeA_lo + pos;
    }
    const int pos = (t - tilesA) * BN + e;
    return pos < nB ? s_wlo + pos : -1;
  };
  auto load_tile = [&](int t, int buf) {
    T* dK = sK + buf * BN * D;
    T* dV = sV + buf * BN * D;
    for (int c = tid; c < BN * CH; c += Tr::kThreads) {
      const int e = c / CH, ch = c % CH;
      const int j = key_of(t, e);
      const bool valid = j >= 0;
      const int64_t jj = valid ? j : 0;
      cp_async16(dK + swz<D>(e, ch), kbase + jj * p.k_sn + s * p.k_ss + r_kv * p.k_sr + ch * 8,
                 valid);
      cp_async16(dV + swz<D>(e, ch), vbase + jj * p.v_sn + s * p.v_ss + r_kv * p.v_sr + ch * 8,
                 valid);
    }
    for (int e = tid; e < BN; e += Tr::kThreads) {
      const int j = key_of(t, e);
      sIdx[buf * BN + e] = j;
      sU[buf * BN + e] = (sparse && j >= 0) ? p.u[(size_t)s * p.NK + j] : 0.f;
      sRank[buf * BN + e] = (sparse && j >= 0) ? p.ranks[(size_t)s * p.NK + j] : -1;
    }
  };

  if (ntiles_k > 0) load_tile(0, 0);
  cp_async_commit();

  // ---- Q fragments (registers, reused for every key tile) ------------------------------
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int mi = lane >> 3;
    const int row = warp * 16 + (mi & 1) * 8 + (lane & 7);
    ldmatrix_x4(qf[kk], sQ + swz<D>(row, kk * 2 + (mi >> 1)));
  }

  float o_acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int c = 0; c < 4; ++c) o_acc[n][c] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int t = 0; t < ntiles_k; ++t) {
    const int buf = t & 1;
    if (t + 1 < ntiles_k) load_tile(t + 1, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* cK = sK + buf * BN * D;
    const T* cV = sV + buf * BN * D;
    // S = Q K^T for this warp's 16 rows x 64 keys.
    float sc[BN / 8][4];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) sc[n][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int n2 = 0; n2 < BN / 16; ++n2) {
        uint32_t b[4];
        const int mi = lane >> 3;
        const int key = n2 * 16 + (mi >> 1) * 8 + (lane & 7);
        ldmatrix_x4(b, cK + swz<D>(key, kk * 2 + (mi & 1)));
        Mma<T>::run(sc[2 * n2], qf[kk], b[0], b[1]);
        Mma<T>::run(sc[2 * n2 + 1], qf[kk], b[2], b[3]);
      }
    }

    // Gates, masks and the online softmax (base 2).
    const KeyRule rule =
        t < tilesA ? (sparse ? KeyRule::kPoolSelected : KeyRule::kAllowed) : KeyRule::kWindow;
    // A contiguous tile inside every row's window (or allowed range) needs no mask.
    const int k0 = (t < tilesA) ? rangeA_lo + t * BN : s_wlo + (t - tilesA) * BN;
    const int k_end = (t < tilesA) ? rangeA_lo + nA : s_wlo + nB;
    const bool interior =
        (rule == KeyRule::kWindow && k0 >= s_in_lo && k0 + BN <= min(s_in_hi, k_end)) ||
        (rule == KeyRule::kAllowed && k0 >= s_pin_lo && k0 + BN <= min(s_in_hi, k_end));
    float gate[BN / 8][4];
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int h = c >> 1;
        const int e = n * 8 + (lane & 3) * 2 + (c & 1);
        float g = 1.f;
        bool att = true;
        if (rule == KeyRule::kPoolSelected) {
          const int j = sIdx[buf * BN + e];
          att = j >= plo[h] && j < wlo[h] && sRank[buf * BN + e] >= rb[h];
          g = fminf(fmaxf(sU[buf * BN + e] - tau[h], 0.f), 1.f);
        } else if (!interior) {
          const int j = sIdx[buf * BN + e];
          att = j >= 0 && j < whi[h] && j >= (rule == KeyRule::kWindow ? wlo[h] : plo[h]);
        }
        const float x = att ? sc[n][c] * (p.scale_log2 * g) : -INFINITY;
        sc[n][c] = x;
        gate[n][c] = g;
        tile_max[h] = fmaxf(tile_max[h], x);
      }
    }
    float scale_o[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(row_max[h], tile_max[h]);
      // Rows with nothing attended yet keep max = -inf; exp2 of (-inf) - (-inf) is avoided.
      scale_o[h] = (new_max == -INFINITY) ? 1.f : exp2f(row_max[h] - new_max);
      row_max[h] = new_max;
      row_sum[h] *= scale_o[h];
    }
    uint32_t pf[BN / 16][4];  // P * gate as A fragments of the PV product
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
      float pe[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int h = c >> 1;
        // exp2(-inf - finite) = 0; rows with nothing attended yet use max 0 (no NaN)
        pe[c] = exp2f(sc[n][c] - (row_max[h] == -INFINITY ? 0.f : row_max[h]));
        row_sum[h] += pe[c];
        pe[c] *= gate[n][c];
      }
      pf[n >> 1][(n & 1) * 2 + 0] = Mma<T>::pack(pe[0], pe[1]);
      pf[n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o_acc[n][0] *= scale_o[0];
      o_acc[n][1] *= scale_o[0];
      o_acc[n][2] *= scale_o[1];
      o_acc[n][3] *= scale_o[1];
    }
    // O += (P * gate) V
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
#pragma unroll
      for (int n2 = 0; n2 < D / 16; ++n2) {
        uint32_t b[4];
        const int mi = lane >> 3;
        const int key = kc * 16 + (mi & 1) * 8 + (lane & 7);
        ldmatrix_x4_trans(b, cV + swz<D>(key, n2 * 2 + (mi >> 1)));
        Mma<T>::run(o_acc[2 * n2], pf[kc], b[0], b[1]);
        Mma<T>::run(o_acc[2 * n2 + 1], pf[kc], b[2], b[3]);
      }
    }
    __syncthreads();  // this buffer is refilled next iteration
  }

  // ---- epilogue -------------------------------------------------------------------------
  T* obase = static_cast<T*>(p.o);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    const bool valid = row_q[h] < q1;
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    if (valid) {
      T* orow = obase + row_q[h] * p.o_sn + s * p.o_ss + row_r[h] * p.o_sr;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const int d = n * 8 + (lane & 3) * 2;
        const uint32_t packed = Mma<T>::pack(o_acc[n][2 * h] * inv, o_acc[n][2 * h + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + d) = packed;
      }
      if ((lane & 3) == 0) {
        const float lse = row_sum[h] > 0.f ? (row_max[h] + log2f(row_sum[h])) * 0.6931471805599453f
                                           : -INFINITY;
        p.lse[((size_t)s * p.R + row_r[h]) * p.NQ + row_q[h]] = lse;
      }
    }
  }
}

template <typename T, int D>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, D>;
  auto kernel = sparsek_fwd_kernel<T, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmem);
  if (err != cudaSuccess) return err;
  dim3 grid(p.ntiles, p.S, p.R / p.RP);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace xsk
