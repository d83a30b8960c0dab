// SparseK attention backward, dq pass on Hopper (sm_90a, warpgroup MMAs).
//
// The same outputs as bwd_dq_kernel (../bwd_kernel.cuh: dq, and per row the sum G of the
// score gradient over its fractional keys) on the forward's schedule (fwd_kernel_sm90.cuh:
// read that first): persistent CTAs walk the work items (query tile of BM = 128 rows,
// selection head, head group), the producer warpgroup (key_producer.cuh) streams the key
// tiles, two consumer warpgroups of 64 rows each hold Q and dO in shared memory.  Per key
// tile a consumer runs two halves of 64 keys (the registers of S, dP and dQ do not fit a
// 128-key tile):
//   S = Q K^T and dP = dO V^T   (wgmma, both operands in shared memory),
//   P, dS and G per (row, key) under the tile's TileMode (the forward's per-tile rule),
//   dQ += (dS g scale) K        (wgmma, dS from registers; K as the MN-major operand).
// A stage is released once the products of its second half have completed (the consumer
// waits for them at the next tile's first S).
#pragma once
#include <algorithm>
#include <climits>
#include <cmath>

#include "../bwd_kernel.cuh"
#include "key_producer.cuh"
#include "wgmma.cuh"

namespace xsk {
namespace sm90 {

template <typename T, int D>
struct BwdDqSm90Traits {
  static constexpr int kBM = 128;   // = the forward's tiles and key lists
  static constexpr int kBN = 128;   // keys per producer tile
  static constexpr int kHalf = 64;  // keys per consumer step
  static constexpr int kStages = D == 128 ? 2 : 4;
  static constexpr int kThreads = 3 * 128;
  // The producer spills below 56 registers; the consumers hold S, dP, dQ and their halves.
  using Regs = RegSplit<56, 224>;
  static constexpr size_t kSmem = 1024 /* alignment slack */ + 2 * kBM * D * sizeof(T) +
                                  2 * kStages * (size_t)kBN * D * sizeof(T) +
                                  kStages * kBN * (2 * sizeof(int) + sizeof(float)) +
                                  kStages * 4 * sizeof(int4) + 2 * kStages * sizeof(uint64_t);
  static_assert(kSmem <= 227 * 1024, "shared memory");
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdDqSm90Traits<T, D>::kThreads, 1)
    bwd_dq_sm90_kernel(const __grid_constant__ BwdDqParams b, const int nitems) {
#if defined(XSK_SM90A)
  using Tr = BwdDqSm90Traits<T, D>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, HB = Tr::kHalf, NST = Tr::kStages, CH = D / 8;
  const FwdParams& p = b.f;
  extern __shared__ char smem_raw[];
  char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* sQ = reinterpret_cast<T*>(base);         // [D/64][BM][64]
  T* sO = sQ + BM * D;                        // [D/64][BM][64] dO rows
  T* sK = sO + BM * D;                        // [NST][D/64][BN][64]
  T* sV = sK + NST * BN * D;                  // [NST][D/64][BN][64]
  int* sIdx = reinterpret_cast<int*>(sV + NST * BN * D);  // [NST][BN] list entries
  float* sU = reinterpret_cast<float*>(sIdx + NST * BN);  // [NST][BN] key scores
  int* sRank = reinterpret_cast<int*>(sU + NST * BN);     // [NST][BN] key ranks
  int4* sStat = reinterpret_cast<int4*>(sRank + NST * BN);  // [NST][4 producer warps]
  uint64_t* full = reinterpret_cast<uint64_t*>(sStat + NST * 4);
  uint64_t* empty = full + NST;

  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);  // (known warp-uniform: see dk/dv)
  const int RP = p.RP;
  __shared__ uint64_t rows_full[2];  // per consumer: its item's Q / dO box landed (TMA)
  if (tid == 0) {
    for (int i = 0; i < NST; ++i) {
      mbar_init(&full[i], 256);  // per producer thread: its copies landed, its stores
      mbar_init(&empty[i], 8);
    }
    mbar_init(&rows_full[0], 1);
    mbar_init(&rows_full[1], 1);
  }
  __syncthreads();

  if (warp < 4) {
    setmaxnreg_dec<Tr::Regs::kProducerRegs>();
    produce_key_tiles<T, D, BN, NST>(p, nitems, warp, lane, sK, sV, sIdx, sU, sRank, sStat, full,
                                     empty);
    return;
  }

  setmaxnreg_inc<Tr::Regs::kConsumerRegs>();
  const int wg = (warp >> 2) - 1;  // consumer 0 or 1: rows [64 wg, 64 wg + 64)
  const int ctid = tid - 128 * (wg + 1);
  const int g = lane >> 2, tq = lane & 3;
  __shared__ int4 s_rowstat[8];
  auto row_of = [&](int x) { return wg * 64 + (warp & 3) * 16 + g + 8 * x; };
  int it = 0;          // key tiles consumed so far (all items)
  int rows_phase = 0;  // parity of rows_full[wg]'s next phase
  float sc[HB / 2], dp[HB / 2];
#pragma unroll
  for (int i = 0; i < HB / 2; ++i) sc[i] = dp[i] = 0.f;

  for (int item = blockIdx.x; item < nitems; item += gridDim.x) {
    const Item w(p, item);
    const int s = w.s, rgroup = w.rgroup;
    const int q0 = p.tile_q0[w.tile], q1 = p.tile_q1[w.tile];
    const KeyStreams ks = warp_key_streams<BN>(p, w.tile, s, q0, q1, lane);
    const int ntiles_k = ks.tilesA + ks.tilesB;
    named_barrier(1 + wg, 128);  // the previous item's reads of sQ, sO, s_rowstat are done
    // This consumer's Q and dO rows -> shared memory, issued first so that they load beside
    // the rows' data below: its 64 rows as TMA boxes (RP heads x 64 / RP queries, in row
    // order) when all are in the tile, else copies that zero-fill the rows past it.
    const bool rows_by_tma = b.tma_rows && q0 + (wg + 1) * 64 / RP <= q1;
    if (rows_by_tma) {
      if (ctid == 0) {
        mbar_arrive_expect_tx(&rows_full[wg], 2 * 64 * D * sizeof(T));
        const int qc = q0 + wg * 64 / RP, r0 = rgroup * RP;
        tma_load_rows<D>(smem_addr(sQ + wg * 64 * 64), BM * 128, b.tma_q, &rows_full[wg],
                         p.q_sr, p.q_ss, r0, s, qc);
        tma_load_rows<D>(smem_addr(sO + wg * 64 * 64), BM * 128, b.tma_do, &rows_full[wg],
                         b.do_sr, b.do_ss, r0, s, qc);
      }
    } else {
      const T* qbase = static_cast<const T*>(p.q);
      const T* dobase = static_cast<const T*>(b.dout);
      for (int c = ctid; c < 64 * CH; c += 128) {
        const int m = wg * 64 + c / CH, ch = c % CH;
        const int qi = q0 + m / RP, r = rgroup * RP + m % RP;
        const bool valid = qi < q1;
        cp_async16(sQ + sw128(BM, m, ch),
                   qbase + (valid ? (qi * p.q_sn + s * p.q_ss + r * p.q_sr + ch * 8) : 0), valid);
        cp_async16(sO + sw128(BM, m, ch),
                   dobase + (valid ? (qi * b.do_sn + s * b.do_ss + r * b.do_sr + ch * 8) : 0),
                   valid);
      }
      cp_async_commit();
    }
    RowInfo rows[2];
    float lse2[2], delta[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const int qi = q0 + row_of(x) / RP, r = rgroup * RP + row_of(x) % RP;
      const bool valid = qi < q1;
      rows[x] = load_row(p, s, qi, valid);
      const size_t gi = ((size_t)s * p.R + r) * p.NQ + qi;
      lse2[x] = valid ? b.lse[gi] * kLog2e : INFINITY;  // invalid rows: P = 0
      delta[x] = valid ? b.delta[gi] : 0.f;
    }

    {  // bounds over this warpgroup's valid rows, for TileMode::kPoolFast
      int mx_rb = INT_MIN, mx_plo = INT_MIN, mn_wlo = INT_MAX;
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        if (q0 + row_of(x) / RP < q1) {
          mx_rb = max(mx_rb, rows[x].rb);
          mx_plo = max(mx_plo, rows[x].plo);
          mn_wlo = min(mn_wlo, rows[x].wlo);
        }
      }
      mx_rb = warp_max(mx_rb);
      mx_plo = warp_max(mx_plo);
      mn_wlo = warp_min(mn_wlo);
      if (lane == 0) s_rowstat[warp - 4] = make_int4(mx_rb, mx_plo, mn_wlo, 0);
    }
    if (rows_by_tma) {
      mbar_wait(&rows_full[wg], rows_phase);
      rows_phase ^= 1;
    } else {
      cp_async_wait<0>();
    }
    fence_proxy_async();
    named_barrier(1 + wg, 128);  // also publishes s_rowstat
    int wg_rb = INT_MIN, wg_plo = INT_MIN, wg_wlo = INT_MAX;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int4 r = s_rowstat[wg * 4 + q];
      wg_rb = max(wg_rb, r.x);
      wg_plo = max(wg_plo, r.y);
      wg_wlo = min(wg_wlo, r.z);
    }

    // wgmma descriptors: this warpgroup's Q and dO rows, stage 0 of K and V (K-major) and of K
    // (MN-major); the K-steps, halves and stages are desc_add offsets
    constexpr int EB = sizeof(T);
    const uint64_t desc_q = make_desc(sQ + wg * 64 * 64, 16, 1024);
    const uint64_t desc_o = make_desc(sO + wg * 64 * 64, 16, 1024);
    const uint64_t desc_k = make_desc(sK, 16, 1024), desc_v = make_desc(sV, 16, 1024);
    const uint64_t desc_kt = make_desc(sK, BN * 128, 1024);

    float dq[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
    fence_regs(dq);  // else the zeroing may sink into the wgmma pipeline and serialize it
    float grow[2] = {0.f, 0.f};

    for (int t = 0; t < ntiles_k; ++t, ++it) {
      const int st = it % NST;
      mbar_wait(&full[st], (it / NST) & 1);
      fence_proxy_async();  // the stage was written by cp.async (see produce_key_tiles)
      const uint32_t stage_bytes = st * BN * D * EB;
      const KeyRule rule = ks.rule(t);
      const bool listed = rule == KeyRule::kPoolSelected;
      const bool interior = ks.interior(t, BN);
      const int key0 = t < ks.tilesA ? ks.a_lo + t * BN : ks.b_lo + (t - ks.tilesA) * BN;
      const int lo[2] = {rule == KeyRule::kWindow ? rows[0].wlo : rows[0].plo,
                         rule == KeyRule::kWindow ? rows[1].wlo : rows[1].plo};

#pragma unroll 1
      for (int hf = 0; hf < 2; ++hf) {
        // S = Q K^T and dP = dO V^T over the half's 64 keys
        fence_regs(sc);
        fence_regs(dp);
        wgmma_fence();
        const uint32_t half_bytes = stage_bytes + hf * HB * 64 * EB;  // (keys hf * HB)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          WgmmaSS<T, HB>::run(sc, desc_add(desc_q, kstep_bytes(kk, BM, EB)),
                              desc_add(desc_k, half_bytes + kstep_bytes(kk, BN, EB)), kk > 0);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          WgmmaSS<T, HB>::run(dp, desc_add(desc_o, kstep_bytes(kk, BM, EB)),
                              desc_add(desc_v, half_bytes + kstep_bytes(kk, BN, EB)), kk > 0);
        wgmma_commit();
        wgmma_wait<0>();  // (also the previous half's dQ products)
        fence_regs(sc);
        fence_regs(dp);
        fence_regs(dq);
        if (hf == 0 && t > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % NST]);

        // The half's TileMode (the forward's): list keys every row of the warpgroup selects
        // (the producer's statistics of its warps 2 hf and 2 hf + 1) need the gate only.
        TileMode mode;
        if (listed) {
          const int4 a = sStat[st * 4 + 2 * hf], c = sStat[st * 4 + 2 * hf + 1];
          const bool fast = a.w + c.w == HB && min(a.x, c.x) >= wg_rb &&
                            min(a.y, c.y) >= wg_plo && max(a.z, c.z) < wg_wlo;
          mode = fast ? TileMode::kPoolFast : TileMode::kPoolChecked;
        } else {
          mode = interior ? TileMode::kOpen : TileMode::kMasked;
        }
        const int* tIdx = sIdx + st * BN + hf * HB;
        const float* tU = sU + st * BN + hf * HB;
        const int* tRank = sRank + st * BN + hf * HB;
        // Element 4 i + c: row x = c >> 1, key e = 8 i + 2 tq + (c & 1) of the half.
        uint32_t dsf[HB / 16][4];
        auto elementwise = [&](auto mode_c) {
          constexpr TileMode M = decltype(mode_c)::value;
#pragma unroll
          for (int i = 0; i < HB / 8; ++i) {
            const int e = i * 8 + tq * 2;
            float2 ku = make_float2(0.f, 0.f);
            int2 kj = make_int2(key0 + hf * HB + e, key0 + hf * HB + e + 1);
            int2 kr = make_int2(0, 0);
            if constexpr (M == TileMode::kPoolFast || M == TileMode::kPoolChecked)
              ku = *reinterpret_cast<const float2*>(tU + e);
            if constexpr (M == TileMode::kPoolChecked) {
              kj = *reinterpret_cast<const int2*>(tIdx + e);  // -1 past the list
              kr = *reinterpret_cast<const int2*>(tRank + e);
            }
            float ds[4];
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int x = c >> 1;
              const int j = (c & 1) ? kj.y : kj.x;
              float gate = 1.f;
              bool att = true;
              if constexpr (M == TileMode::kPoolFast || M == TileMode::kPoolChecked)
                gate = gate_of((c & 1) ? ku.y : ku.x, rows[x].tau);
              if constexpr (M == TileMode::kPoolChecked) {
                const int r = (c & 1) ? kr.y : kr.x;
                att = j >= 0 && j >= rows[x].plo && j < rows[x].wlo && r >= rows[x].rb;
              } else if constexpr (M == TileMode::kMasked) {
                att = j >= lo[x] && j < rows[x].whi;
              }
              float pr, term;
              if (pair_backward(att, listed, gate, sc[4 * i + c], dp[4 * i + c], lse2[x],
                                delta[x], p.scale_log2, b.scale, pr, ds[c], term))
                grow[x] += term;
            }
            dsf[i >> 1][(i & 1) * 2 + 0] = Mma<T>::pack(ds[0], ds[1]);
            dsf[i >> 1][(i & 1) * 2 + 1] = Mma<T>::pack(ds[2], ds[3]);
          }
        };
        switch (mode) {
          case TileMode::kPoolFast:
            elementwise(std::integral_constant<TileMode, TileMode::kPoolFast>{});
            break;
          case TileMode::kPoolChecked:
            elementwise(std::integral_constant<TileMode, TileMode::kPoolChecked>{});
            break;
          case TileMode::kOpen:
            elementwise(std::integral_constant<TileMode, TileMode::kOpen>{});
            break;
          default:
            elementwise(std::integral_constant<TileMode, TileMode::kMasked>{});
        }

        // dQ += (dS g scale) K over the half's keys
        fence_regs(dq);
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < HB / 16; ++kc)
          WgmmaRS<T, D>::run(dq, dsf[kc],
                             desc_add(desc_kt, stage_bytes + (hf * HB + kc * 16) * 64 * EB));
        wgmma_commit();
        fence_regs(dq);
      }
    }
    wgmma_wait<0>();
    fence_regs(dq);
    if (ntiles_k > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % NST]);  // the item's last tile

    // ---- epilogue: dq rows and G ----------------------------------------------------------
    T* dqbase = static_cast<T*>(b.dq);
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      grow[x] += __shfl_xor_sync(0xffffffffu, grow[x], 1);
      grow[x] += __shfl_xor_sync(0xffffffffu, grow[x], 2);
      const int qi = q0 + row_of(x) / RP, r = rgroup * RP + row_of(x) % RP;
      if (qi >= q1) continue;
      T* drow = dqbase + qi * b.dq_sn + s * b.dq_ss + r * b.dq_sr;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<uint32_t*>(drow + i * 8 + tq * 2) =
            Mma<T>::pack(dq[4 * i + 2 * x], dq[4 * i + 2 * x + 1]);
      if (tq == 0 && b.grow != nullptr) b.grow[((size_t)s * p.R + r) * p.NQ + qi] = grow[x];
    }
  }
#else
  __trap();  // built without sm_90a code: run_bwd_dq_sm90 is never called then
#endif
}

template <typename T, int D>
cudaError_t run_bwd_dq_sm90(const BwdDqParams& b, cudaStream_t stream) {
  using Tr = BwdDqSm90Traits<T, D>;
  BwdDqParams bm = with_row_maps<T, D>(b, 64);  // (a consumer's 64 rows per box)
  bm.f = with_key_maps<T, D>(b.f);
  return launch_persistent(bwd_dq_sm90_kernel<T, D>, bm, num_items(b.f), Tr::kThreads, Tr::kSmem,
                           stream);
}

}  // namespace sm90
}  // namespace xsk
