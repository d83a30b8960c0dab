// SparseK attention forward, Hopper path (sm_90a, warpgroup MMAs).
//
// Same problem split, key streams, per-(row, key) rule and outputs as the mma.sync kernel
// (../fwd_kernel.cuh: read that first); what changes is how the work is scheduled.
// Work item = one query tile (BM = 128 rows: 128 / RP queries x RP packed heads) x one
// selection head x one head group.  Persistent CTAs (one per SM) walk the items; each has
// 3 warpgroups:
//   WG0, producer: stages each item (its Q rows, each row's RowInfo, the key streams:
//        ItemStage, double-buffered) and gathers key tile t (BN = 128 keys of K and V, plus
//        each key's index, score and rank in sparse mode) with cp.async into stage t % NST
//        of a ring; the copies arrive on full[stage] when they land, so it never waits for
//        them, only for empty[stage] before refilling a stage.  It runs ahead into the next
//        item while the consumers finish the current one (key_producer.cuh, shared with the
//        backward's dq pass).
//   WG1, WG2, consumers: 64 rows each; an item starts with no global load (the staged
//        buffer), a key tile after its full[] wait and a proxy fence.  Per tile: S = Q K^T
//        (wgmma, both operands in shared memory), gates, masks and the online softmax in
//        registers (a per-tile TileMode picks the cheapest exact rule), then
//        O += (P * gate) V (wgmma, P from registers).  A consumer releases a stage once its
//        P V product has completed; it waits for that only after issuing the next Q K^T, so
//        the tensor cores run the two back to back.  The two consumers drift apart freely:
//        one's softmax overlaps the other's matrix work (enforcing FA3's ping-pong turns
//        gained nothing at D = 64, nor did FA3's intra-warpgroup overlap of a tile's softmax
//        with the previous tile's P V: benchmarks/RESULTS.md, 2026-12-01 sixth and seventh
//        sessions).  An item ends with O / row sum written through the warpgroup's own Q
//        rows in shared memory and stored as whole 16-byte chunks.
// Tiles in shared memory use wgmma's 128-byte swizzle (sw128 in wgmma.cuh).
#pragma once
#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "../tile_common.cuh"
#include "key_producer.cuh"
#include "wgmma.cuh"

namespace xsk {
namespace sm90 {

// How far (base 2) a row's logits may rise above its running maximum before the maximum
// moves (the consumer loop's lazy rescaling): P stays below 2^8.
constexpr float kMaxSlack = 8.f;

template <typename T, int D>
struct FwdSm90Traits {
  static constexpr int kBM = 128;  // = FwdTraits::kBM: same tiles and key lists
  static constexpr int kBN = 128;  // keys per tile (= producer threads: one key each for metadata)
  static constexpr int kStages = D == 128 ? 2 : 4;
  static constexpr int kThreads = 3 * 128;
  // The producer also stages each item (ItemStage): it spills below 80 registers at D = 64
  // and below 96 at D = 128; the consumers hold the S, P and O fragments (64 + 32 + 64
  // registers at D = 128).
  using Regs = std::conditional_t<D == 64, RegSplit<80, 208>, RegSplit<96, 200>>;
  static constexpr int kTileBytes = kBN * D * (int)sizeof(T);  // K or V of one stage
  // Q and the item metadata are double-buffered (ItemStage, key_producer.cuh).
  static constexpr size_t kSmem = 1024 /* alignment slack */ + 2 * kBM * D * sizeof(T) +
                                  2 * kStages * (size_t)kTileBytes +
                                  kStages * kBN * (2 * sizeof(int) + sizeof(float)) +
                                  kStages * 4 * sizeof(int4) +
                                  (2 * kStages + 4) * sizeof(uint64_t) +
                                  2 * sizeof(ItemMeta) + 2 * kBM * sizeof(RowInfo);
  static_assert(kSmem <= 227 * 1024, "shared memory");
  static_assert(kBN == 128, "the producer's 4 warps gather 32 keys each");
};

// Turns the tile's raw scores S (thread's columns 8 i + 2 tq + {0, 1}, rows x = 0 / 1) into
// logits s * gate in units of the scale (gate 1 in the ungated modes kOpen, kMasked), -inf
// where the row does not attend; returns the row maxima.  tile_probs applies the scale
// inside its exp2 argument (one FFMA), and the caller scales the maxima (scale > 0: the
// launcher guarantees it, so the scaled maximum is the maximum of the scaled logits).
template <TileMode M, int BN>
__device__ __forceinline__ void tile_logits(float (&sc)[BN / 2], float (&tile_max)[2],
                                            const RowInfo (&rows)[2], const int (&lo)[2],
                                            const int* idx, const float* u, const int* rank,
                                            int tq, int nvalid, int key0) {
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int e = i * 8 + tq * 2;
    int2 kj = make_int2(key0 + e, key0 + e + 1), kr = make_int2(0, 0);
    float2 ku = make_float2(0.f, 0.f);
    if constexpr (M == TileMode::kPoolFast || M == TileMode::kPoolChecked)
      ku = *reinterpret_cast<const float2*>(u + e);
    if constexpr (M == TileMode::kPoolChecked) {
      kj = *reinterpret_cast<const int2*>(idx + e);
      kr = *reinterpret_cast<const int2*>(rank + e);
      if (e >= nvalid) kj.x = -1;
      if (e + 1 >= nvalid) kj.y = -1;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int x = c >> 1;
      const int j = (c & 1) ? kj.y : kj.x;
      float v;
      if constexpr (M == TileMode::kOpen) {
        v = sc[4 * i + c];
      } else if constexpr (M == TileMode::kMasked) {
        v = (j >= lo[x] && j < rows[x].whi) ? sc[4 * i + c] : -INFINITY;
      } else {
        v = sc[4 * i + c] * gate_of((c & 1) ? ku.y : ku.x, rows[x].tau);
        if constexpr (M == TileMode::kPoolChecked) {
          const int r = (c & 1) ? kr.y : kr.x;
          const bool att = j >= 0 && j >= rows[x].plo && j < rows[x].wlo && r >= rows[x].rb;
          v = att ? v : -INFINITY;
        }
      }
      sc[4 * i + c] = v;
      tile_max[x] = fmaxf(tile_max[x], v);
    }
  }
}

// exp2(logit * scale_log2 - max), the row sums, and P * gate packed as the register A
// operand of the P V product (k16 block kc = n8 blocks 2 kc and 2 kc + 1).
template <typename T, bool kGate, int BN>
__device__ __forceinline__ void tile_probs(const float (&sc)[BN / 2], uint32_t (&pf)[BN / 16][4],
                                           float (&row_sum)[2], const float (&mx)[2],
                                           const RowInfo (&rows)[2], const float* u, int tq,
                                           float scale_log2) {
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    float2 ku = make_float2(0.f, 0.f);
    if constexpr (kGate) ku = *reinterpret_cast<const float2*>(u + i * 8 + tq * 2);
    float pe[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int x = c >> 1;
      pe[c] = exp2f(fmaf(sc[4 * i + c], scale_log2, -mx[x]));
      row_sum[x] += pe[c];
      if constexpr (kGate) pe[c] *= gate_of((c & 1) ? ku.y : ku.x, rows[x].tau);
    }
    pf[i >> 1][(i & 1) * 2 + 0] = Mma<T>::pack(pe[0], pe[1]);
    pf[i >> 1][(i & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
  }
}

// Persistent: each CTA walks work items blockIdx.x, blockIdx.x + gridDim.x, ...; the ring's
// stage and phase follow a running count of key tiles, so the producer streams the next
// item's keys while the consumers finish the current one.
template <typename T, int D>
__global__ void __launch_bounds__(FwdSm90Traits<T, D>::kThreads, 1)
    sparsek_fwd_sm90_kernel(const __grid_constant__ FwdParams p, const int nitems) {
#if defined(XSK_SM90A)
  using Tr = FwdSm90Traits<T, D>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, NST = Tr::kStages;
  extern __shared__ char smem_raw[];
  char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* sQ = reinterpret_cast<T*>(base);         // [2][D/64][BM][64] (two items' rows)
  T* sK = sQ + 2 * BM * D;                    // [NST][D/64][BN][64]
  T* sV = sK + NST * BN * D;                  // [NST][D/64][BN][64]
  int* sIdx = reinterpret_cast<int*>(sV + NST * BN * D);  // [NST][BN] list entries
  float* sU = reinterpret_cast<float*>(sIdx + NST * BN);  // [NST][BN] key scores
  int* sRank = reinterpret_cast<int*>(sU + NST * BN);     // [NST][BN] key ranks
  int4* sStat = reinterpret_cast<int4*>(sRank + NST * BN);  // [NST][4 producer warps]
  uint64_t* full = reinterpret_cast<uint64_t*>(sStat + NST * 4);
  uint64_t* empty = full + NST;
  uint64_t* item_full = empty + NST;                                 // [2]
  uint64_t* item_empty = item_full + 2;                              // [2]
  ItemMeta* sMeta = reinterpret_cast<ItemMeta*>(item_empty + 2);     // [2]
  RowInfo* sRows = reinterpret_cast<RowInfo*>(sMeta + 2);            // [2][BM]
  static_assert((2 * NST + 4) * sizeof(uint64_t) % alignof(ItemMeta) == 0, "ItemMeta alignment");
  const ItemStage<T> stage{sQ, sRows, sMeta, item_full, item_empty};

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int RP = p.RP;

  if (tid == 0) {
    for (int i = 0; i < NST; ++i) {
      mbar_init(&full[i], 256);  // per producer thread: its copies landed, its stores
      mbar_init(&empty[i], 8);   // every consumer warp arrives once per release
    }
    for (int i = 0; i < 2; ++i) {
      mbar_init(&stage.full[i], 128);  // one arrival per producer thread
      mbar_init(&stage.empty[i], 8);
    }
  }
  __syncthreads();  // publishes the barrier inits; the only block-wide barrier

  if (warp < 4) {
    // ================================ producer ===========================================
    setmaxnreg_dec<Tr::Regs::kProducerRegs>();
    produce_key_tiles<T, D, BN, NST, true>(p, nitems, warp, lane, sK, sV, sIdx, sU, sRank, sStat,
                                           full, empty, stage);
    return;
  }

  // ================================== consumers ==========================================
  setmaxnreg_inc<Tr::Regs::kConsumerRegs>();
  const int wg = (warp >> 2) - 1;  // consumer 0 or 1: rows [64 wg, 64 wg + 64)
  const int g = lane >> 2, tq = lane & 3;
  auto row_of = [&](int x) { return wg * 64 + (warp & 3) * 16 + g + 8 * x; };
  int it = 0;  // key tiles consumed so far (all items)
  // wgmma descriptors (their 32-bit start words, wgmma.cuh): this warpgroup's rows of Q
  // buffer 0 and stage 0 of K (K-major) and V (MN-major); buffers, stages and K-steps are
  // offsets added inside the wgmma's asm
  constexpr int EB = sizeof(T);
  const uint32_t desc_q = desc_lo(make_desc(sQ + wg * 64 * 64, 16, 1024));
  const uint32_t desc_k = desc_lo(make_desc(sK, 16, 1024));
  const uint32_t desc_v = desc_lo(make_desc(sV, BN * 128, 1024));

  for (int item = blockIdx.x, k = 0; item < nitems; item += gridDim.x, ++k) {
    // The producer staged this item (Q rows, row info, key streams) in buffer k % 2.
    const int qb = k & 1;
    mbar_wait(&stage.full[qb], (k >> 1) & 1);  // (its Q rows: with the first key tile)
    const ItemMeta& meta = stage.meta[qb];
    const KeyStreams ks = meta.ks;
    const int q0 = meta.q0, q1 = meta.q1, s = meta.s, rgroup = meta.rgroup;
    const int ntiles_k = ks.tilesA + ks.tilesB;
    const uint32_t item16 = (qb * BM * D * EB) >> 4;  // this item's Q buffer (16-byte units)
    RowInfo rows[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) rows[x] = stage.rows[qb * BM + row_of(x)];
    // Bounds over this warpgroup's valid rows (for TileMode::kPoolFast): max boundary rank,
    // max pool start, min window start.
    const int4 b0 = meta.bounds[2 * wg], b1 = meta.bounds[2 * wg + 1];
    const int wg_rb = max(b0.x, b1.x), wg_plo = max(b0.y, b1.y), wg_wlo = min(b0.z, b1.z);

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    fence_regs(o);  // else the zeroing may sink into the wgmma pipeline and serialize it
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    float sc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) sc[i] = 0.f;

    for (int t = 0; t < ntiles_k; ++t, ++it) {
      const int st = it % NST;
      mbar_wait(&full[st], (it / NST) & 1);
      fence_proxy_async();  // the stage was written by cp.async (see produce_key_tiles)

      // S = Q K^T
      const uint32_t stage16 = (st * BN * D * EB) >> 4;  // (descriptor units: 16 bytes)
      fence_regs(sc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        WgmmaSSLo<T, BN>::run(sc, desc_q, item16 + (kstep_bytes(kk, BM, EB) >> 4), desc_k,
                              stage16 + (kstep_bytes(kk, BN, EB) >> 4), kk > 0);
      }
      wgmma_commit();
      fence_regs(sc);
      if (t > 0) {  // P V of the previous tile done: release its stage
        wgmma_wait<1>();
        if (lane == 0) mbar_arrive(&empty[(it - 1) % NST]);
      }
      wgmma_wait<0>();
      fence_regs(sc);
      fence_regs(o);

      // Gates, masks and the online softmax (base 2).
      const KeyRule rule = ks.rule(t);
      const bool listed = rule == KeyRule::kPoolSelected;
      const int* tIdx = sIdx + st * BN;
      const float* tU = sU + st * BN;
      const int* tRank = sRank + st * BN;
      float tile_max[2] = {-INFINITY, -INFINITY};
      if (listed) {
        int mn_rank = INT_MAX, mn_j = INT_MAX, mx_j = -1, nvalid = 0;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int4 v = sStat[st * 4 + q];
          mn_rank = min(mn_rank, v.x), mn_j = min(mn_j, v.y), mx_j = max(mx_j, v.z);
          nvalid += v.w;
        }
        const int lo[2] = {0, 0};
        if (nvalid == BN && mn_rank >= wg_rb && mn_j >= wg_plo && mx_j < wg_wlo)
          tile_logits<TileMode::kPoolFast, BN>(sc, tile_max, rows, lo, tIdx, tU, tRank, tq,
                                               nvalid, 0);
        else
          tile_logits<TileMode::kPoolChecked, BN>(sc, tile_max, rows, lo, tIdx, tU, tRank, tq,
                                                  ks.nA - t * BN, 0);
      } else {
        const int key0 = t < ks.tilesA ? ks.a_lo + t * BN : ks.b_lo + (t - ks.tilesA) * BN;
        const int lo[2] = {rule == KeyRule::kWindow ? rows[0].wlo : rows[0].plo,
                           rule == KeyRule::kWindow ? rows[1].wlo : rows[1].plo};
        if (ks.interior(t, BN))
          tile_logits<TileMode::kOpen, BN>(sc, tile_max, rows, lo, tIdx, tU, tRank, tq, 0, key0);
        else
          tile_logits<TileMode::kMasked, BN>(sc, tile_max, rows, lo, tIdx, tU, tRank, tq, 0,
                                             key0);
      }
      // A lazy running maximum m per row: it moves (and O and the row sum are rescaled) only
      // when some row of the warp sees a logit above its m + kMaxSlack; otherwise the tile's
      // exp2(logit - m) stay below 2^kMaxSlack, which the fp32 sums and 16-bit P hold to the
      // same relative precision.  Most tiles then skip the 64 multiplies of O.
      bool moved = false;
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        tile_max[x] = fmaxf(tile_max[x], __shfl_xor_sync(0xffffffffu, tile_max[x], 1));
        tile_max[x] = fmaxf(tile_max[x], __shfl_xor_sync(0xffffffffu, tile_max[x], 2));
        tile_max[x] *= p.scale_log2;  // (logits in units of the scale: see tile_logits)
        moved |= tile_max[x] > row_max[x] + kMaxSlack;  // (-inf + slack = -inf)
      }
      if (__any_sync(0xffffffffu, moved)) {
        float scale_o[2];
#pragma unroll
        for (int x = 0; x < 2; ++x) {
          const float new_max = fmaxf(row_max[x], tile_max[x]);
          scale_o[x] = (new_max == -INFINITY) ? 1.f : exp2f(row_max[x] - new_max);
          row_max[x] = new_max;
          row_sum[x] *= scale_o[x];
        }
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o[4 * i + 0] *= scale_o[0];
          o[4 * i + 1] *= scale_o[0];
          o[4 * i + 2] *= scale_o[1];
          o[4 * i + 3] *= scale_o[1];
        }
      }
      float mx[2];
#pragma unroll
      for (int x = 0; x < 2; ++x) mx[x] = row_max[x] == -INFINITY ? 0.f : row_max[x];  // no NaN
      uint32_t pf[BN / 16][4];
      if (listed)
        tile_probs<T, true, BN>(sc, pf, row_sum, mx, rows, tU, tq, p.scale_log2);
      else
        tile_probs<T, false, BN>(sc, pf, row_sum, mx, rows, tU, tq, p.scale_log2);

      // O += (P * gate) V
      fence_regs(o);
      wgmma_fence();
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
        WgmmaRSLo<T, D>::run(o, pf[kc], desc_v, stage16 + ((kc * 16 * 64 * EB) >> 4));
      }
      wgmma_commit();
      fence_regs(o);
    }
    wgmma_wait<0>();
    fence_regs(o);
    if (ntiles_k > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % NST]);  // the item's last tile
    // ---- epilogue -----------------------------------------------------------------------
    // O / row sum goes through this warpgroup's own 64 rows of the item's Q buffer (its
    // last Q K^T has completed; no other warp reads them), so each row leaves as whole
    // 16-byte chunks: stores straight from the fragments would write half sectors.
    T* sO = sQ + qb * BM * D;  // (= cQ)
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 1);
      row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 2);
      const float inv = row_sum[x] > 0.f ? 1.f / row_sum[x] : 0.f;
      // chunk i of row m sits at chunk i ^ (m % 8): the 32 lanes hit 32 banks
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<uint32_t*>(sO + sw128(BM, row_of(x), i) + tq * 2) =
            Mma<T>::pack(o[4 * i + 2 * x] * inv, o[4 * i + 2 * x + 1] * inv);
      const int qi = q0 + row_of(x) / RP, r = rgroup * RP + row_of(x) % RP;
      if (tq == 0 && qi < q1) {
        const float lse = row_sum[x] > 0.f
                              ? (row_max[x] + log2f(row_sum[x])) * 0.6931471805599453f
                              : -INFINITY;
        p.lse[((size_t)s * p.R + r) * p.NQ + qi] = lse;
      }
    }
    named_barrier(1 + wg, 128);  // the warpgroup's rows are in shared memory
    T* obase = static_cast<T*>(p.o);
    constexpr int CH = D / 8;
    const int tw = tid - 128 * (wg + 1);  // thread within the warpgroup
#pragma unroll
    for (int n = 0; n < 64 * CH / 128; ++n) {
      const int c = n * 128 + tw;
      const int m = wg * 64 + c / CH, ch = c % CH;
      const int qi = q0 + m / RP, r = rgroup * RP + m % RP;
      const int4 val = *reinterpret_cast<const int4*>(sO + sw128(BM, m, ch));
      if (qi < q1)
        *reinterpret_cast<int4*>(obase + qi * p.o_sn + s * p.o_ss + r * p.o_sr + ch * 8) = val;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&stage.empty[qb]);  // its Q rows (now read) and metadata
  }
#else
  __trap();  // built without sm_90a code: run_fwd_sm90 is never called then (see launch)
#endif
}

template <typename T, int D>
cudaError_t run_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdSm90Traits<T, D>;
  return launch_persistent(sparsek_fwd_sm90_kernel<T, D>, with_key_maps<T, D>(p), num_items(p),
                           Tr::kThreads, Tr::kSmem, stream);
}

}  // namespace sm90
}  // namespace xsk
