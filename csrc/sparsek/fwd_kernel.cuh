// SparseK attention forward (sm_80+ mma.sync path).
//
// One CTA = one query tile x one selection head x one group of RP query heads sharing
// K/V (GQA rows are packed into M: BM = 128 rows = (128 / RP) queries x RP heads), 4 warps
// of 32 rows (two m16 tiles, so every K/V fragment read from shared memory feeds two
// MMAs).  The CTA walks two key streams in tiles of BN = 32 keys:
//   A. sparse mode: the tile's gathered pool-key list (lists.cu), attended by a row iff
//      the key is in the row's pool and its rank is at/above the row's top-k boundary
//      rank, gate clip(u - tau);
//      exact mode: the contiguous range of every allowed key, gate 1;
//   B. sparse mode only: the contiguous window range, attended iff in the row's window.
// Pools and windows are disjoint per row, so no (row, key) pair is counted twice.
// K/V rows are gathered with 16-byte cp.async into a multi-stage, swizzled ring;
// S = QK^T and O += (P * gate) V run on mma.m16n8k16 with an online softmax in base 2.
#pragma once
#include <cmath>

#include "tile_common.cuh"

namespace xsk {

template <typename T, int D>
struct FwdTraits {
  static constexpr int kBM = 128, kBN = 32, kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kMT = kBM / kWarps / 16;  // m16 tiles per warp
  static constexpr int kStages = 3;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr size_t kSmem = sizeof(T) * (kBM * D + kStages * 2 * kBN * D) +
                                  kStages * kBN * (2 * sizeof(int) + sizeof(float));
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdTraits<T, D>::kThreads)
    sparsek_fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<T, D>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, MT = Tr::kMT;
  constexpr int NST = Tr::kStages, NR = 2 * MT;  // rows owned per thread
  extern __shared__ __align__(128) char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;            // [NST][BN][D]
  T* sV = sK + NST * BN * D;      // [NST][BN][D]
  int* sIdx = reinterpret_cast<int*>(sV + NST * BN * D);  // [NST][BN] key index, -1 = none
  float* sU = reinterpret_cast<float*>(sIdx + NST * BN);  // [NST][BN] key score
  int* sRank = reinterpret_cast<int*>(sU + NST * BN);     // [NST][BN] key rank in its head

  const int tile = blockIdx.x, s = blockIdx.y, rgroup = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile];
  const int RP = p.RP;

  const KeyStreams ks = make_key_streams<BN>(p, tile, s, q0, q1);
  const int ntiles_k = ks.tilesA + ks.tilesB;

  // ---- per-row metadata: thread owns rows warp*32 + mt*16 + lane/4 (+8) ---------------
  auto row_of = [&](int x) { return warp * (16 * MT) + (x >> 1) * 16 + (lane >> 2) + 8 * (x & 1); };
  RowInfo rows[NR];
#pragma unroll
  for (int x = 0; x < NR; ++x) {
    const int qi = q0 + row_of(x) / RP;
    rows[x] = load_row(p, s, qi, qi < q1);
  }

  // ---- Q tile -> shared (zero rows past the tile) -------------------------------------
  load_rows<T, D>(static_cast<const T*>(p.q), p.q_sn, p.q_ss, p.q_sr, s, q0, q1, rgroup * RP,
                  RP, BM, sQ);
  cp_async_commit();

  const int r_kv = rgroup * RP;  // K/V are shared by the RP packed heads (stride 0 over R)
  auto load_tile = [&](int t) {
    const int st = t % NST;
    load_kv_tile<T, D, BN>(p, ks, t, s, r_kv, sK + st * BN * D, sV + st * BN * D,
                           sIdx + st * BN, sU + st * BN, sRank + st * BN);
  };
  // Prologue: stages 0 .. NST-2 in flight (one commit group per stage, empty or not).
#pragma unroll
  for (int t = 0; t < NST - 1; ++t) {
    if (t < ntiles_k) load_tile(t);
    cp_async_commit();
  }

  float o_acc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) o_acc[mt][n][c] = 0.f;
  float row_max[NR], row_sum[NR];
#pragma unroll
  for (int x = 0; x < NR; ++x) {
    row_max[x] = -INFINITY;
    row_sum[x] = 0.f;
  }

  for (int t = 0; t < ntiles_k; ++t) {
    const int st = t % NST;
    if (t + NST - 1 < ntiles_k) load_tile(t + NST - 1);
    cp_async_commit();
    cp_async_wait<NST - 1>();  // Q and tile t have landed
    __syncthreads();

    const T* cK = sK + st * BN * D;
    const T* cV = sV + st * BN * D;
    // S = Q K^T for this warp's 32 rows x BN keys.
    float sc[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) sc[mt][n][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int mi = lane >> 3;
      uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp * (16 * MT) + mt * 16 + (mi & 1) * 8 + (lane & 7);
        ldmatrix_x4(qa[mt], sQ + swz<D>(row, kk * 2 + (mi >> 1)));
      }
#pragma unroll
      for (int n2 = 0; n2 < BN / 16; ++n2) {
        uint32_t b[4];
        const int key = n2 * 16 + (mi >> 1) * 8 + (lane & 7);
        ldmatrix_x4(b, cK + swz<D>(key, kk * 2 + (mi & 1)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(sc[mt][2 * n2], qa[mt], b[0], b[1]);
          Mma<T>::run(sc[mt][2 * n2 + 1], qa[mt], b[2], b[3]);
        }
      }
    }

    // Gates, masks and the online softmax (base 2).
    const KeyRule rule = ks.rule(t);
    const bool interior = ks.interior(t, BN);
    // Per-key data of the 2 * BN/8 keys this thread touches (shared by its rows).
    int kj[BN / 8][2], krank[BN / 8][2];
    float ku[BN / 8][2];
#pragma unroll
    for (int n = 0; n < BN / 8; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int e = st * BN + n * 8 + (lane & 3) * 2 + c;
        kj[n][c] = sIdx[e];
        ku[n][c] = sU[e];
        krank[n][c] = sRank[e];
      }
    float tile_max[NR];
#pragma unroll
    for (int x = 0; x < NR; ++x) tile_max[x] = -INFINITY;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int x = mt * 2 + (c >> 1);
          float g;
          const bool att =
              attends(rule, interior, rows[x], kj[n][c & 1], krank[n][c & 1], ku[n][c & 1], g);
          const float v = att ? sc[mt][n][c] * (p.scale_log2 * g) : -INFINITY;
          sc[mt][n][c] = v;
          tile_max[x] = fmaxf(tile_max[x], v);
        }
    float scale_o[NR];
#pragma unroll
    for (int x = 0; x < NR; ++x) {
      tile_max[x] = fmaxf(tile_max[x], __shfl_xor_sync(0xffffffffu, tile_max[x], 1));
      tile_max[x] = fmaxf(tile_max[x], __shfl_xor_sync(0xffffffffu, tile_max[x], 2));
      const float new_max = fmaxf(row_max[x], tile_max[x]);
      scale_o[x] = (new_max == -INFINITY) ? 1.f : exp2f(row_max[x] - new_max);
      row_max[x] = new_max;
      row_sum[x] *= scale_o[x];
    }
    // P * gate as A fragments of the PV product (gate recomputed: cheaper than keeping it).
    uint32_t pf[MT][BN / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        float pe[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int x = mt * 2 + (c >> 1);
          // exp2(-inf - finite) = 0; rows with nothing attended yet use max 0 (no NaN)
          pe[c] = exp2f(sc[mt][n][c] - (row_max[x] == -INFINITY ? 0.f : row_max[x]));
          row_sum[x] += pe[c];
          // (gate_of's value: with gate_of this kernel spilled 12 more bytes)
          if (rule == KeyRule::kPoolSelected)
            pe[c] *= fminf(fmaxf(ku[n][c & 1] - rows[x].tau, 0.f), 1.f);
        }
        pf[mt][n >> 1][(n & 1) * 2 + 0] = Mma<T>::pack(pe[0], pe[1]);
        pf[mt][n >> 1][(n & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
      }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o_acc[mt][n][0] *= scale_o[mt * 2];
        o_acc[mt][n][1] *= scale_o[mt * 2];
        o_acc[mt][n][2] *= scale_o[mt * 2 + 1];
        o_acc[mt][n][3] *= scale_o[mt * 2 + 1];
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
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Mma<T>::run(o_acc[mt][2 * n2], pf[mt][kc], b[0], b[1]);
          Mma<T>::run(o_acc[mt][2 * n2 + 1], pf[mt][kc], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // stage st is refilled NST - 1 iterations later
  }
  cp_async_wait<0>();

  // ---- epilogue -------------------------------------------------------------------------
  T* obase = static_cast<T*>(p.o);
#pragma unroll
  for (int x = 0; x < NR; ++x) {
    const int mt = x >> 1, h = x & 1;
    row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 1);
    row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 2);
    const int qi = q0 + row_of(x) / RP, r = rgroup * RP + row_of(x) % RP;
    if (qi >= q1) continue;
    const float inv = row_sum[x] > 0.f ? 1.f / row_sum[x] : 0.f;
    T* orow = obase + qi * p.o_sn + s * p.o_ss + r * p.o_sr;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int d = n * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(orow + d) =
          Mma<T>::pack(o_acc[mt][n][2 * h] * inv, o_acc[mt][n][2 * h + 1] * inv);
    }
    if ((lane & 3) == 0) {
      const float lse = row_sum[x] > 0.f
                            ? (row_max[x] + log2f(row_sum[x])) * 0.6931471805599453f
                            : -INFINITY;
      p.lse[((size_t)s * p.R + r) * p.NQ + qi] = lse;
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
