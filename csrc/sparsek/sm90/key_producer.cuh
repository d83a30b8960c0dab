// What the Hopper kernels (the forward and the backward's dq pass) share: their consumers'
// per-tile TileMode, the work items and the producer warpgroup.  A persistent CTA walks the
// items (query tile, selection head, head group); warpgroup 0 gathers each item's key tiles
// (BN = 128 keys of K and V, plus each key's index, score and rank in sparse mode) with
// cp.async, or TMA boxes for a warp's contiguous run of keys, into stage it % NST of a
// shared-memory ring (the copies arrive on full[stage] when they land) and waits on
// empty[stage] (the consumer warps' releases) before refilling it.
// It runs ahead into the next item while the consumers finish the current one; for the
// forward it also stages each item's Q rows and row data (ItemStage).
#pragma once
#include <algorithm>
#include <climits>

#include "../tile_common.cuh"
#include "key_tma.h"
#include "wgmma.cuh"

namespace xsk {
namespace sm90 {

// Register split (setmaxnreg), per kernel: RegSplit<producer, consumer>.  The CTA is
// launched with 168 x 384 registers and setmaxnreg only moves them between warpgroups, so
// producer + 2 x consumer <= 504 (a larger sum blocks the consumers' increase forever).
template <int kProducer, int kConsumer>
struct RegSplit {
  static_assert(kProducer + 2 * kConsumer <= 504, "registers the CTA does not have");
  static_assert(kProducer % 8 == 0 && kConsumer % 8 == 0, "setmaxnreg takes multiples of 8");
  static constexpr int kProducerRegs = kProducer, kConsumerRegs = kConsumer;
};

// How a consumer scores one key tile.  The rule of fwd_kernel.cuh per (row, key) costs a
// dozen instructions per element; most tiles need much less, decided once per tile:
//   kPoolFast:    list tile whose keys every row of the warpgroup selects (all in its pool,
//                 rank at/above every row's boundary): gate only;
//   kPoolChecked: other list tiles: the full rule;
//   kOpen:        contiguous tile inside every row's range: no mask, no gate;
//   kMasked:      contiguous tile crossing a row's range: bounds only.
enum class TileMode { kPoolFast, kPoolChecked, kOpen, kMasked };

// KeyStreams (tile_common.cuh) of one work item, computed by one warp alone (the persistent
// kernel's warps move between items without block-wide barriers).
template <int BN>
__device__ __forceinline__ KeyStreams warp_key_streams(const FwdParams& p, int tile, int s,
                                                       int q0, int q1, int lane) {
  int plo = INT_MAX, wlo = INT_MAX, whi = -1, in_lo = -1, in_hi = INT_MAX, pin_lo = -1;
  for (int i = q0 + lane; i < q1; i += 32) {
    const int a = (int)p.pool_lo[i], b = (int)p.win_lo[i], c = (int)p.win_hi[i];
    plo = min(plo, a), wlo = min(wlo, b), whi = max(whi, c);
    in_lo = max(in_lo, b), in_hi = min(in_hi, c), pin_lo = max(pin_lo, a);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    plo = min(plo, __shfl_xor_sync(0xffffffffu, plo, o));
    wlo = min(wlo, __shfl_xor_sync(0xffffffffu, wlo, o));
    whi = max(whi, __shfl_xor_sync(0xffffffffu, whi, o));
    in_lo = max(in_lo, __shfl_xor_sync(0xffffffffu, in_lo, o));
    in_hi = min(in_hi, __shfl_xor_sync(0xffffffffu, in_hi, o));
    pin_lo = max(pin_lo, __shfl_xor_sync(0xffffffffu, pin_lo, o));
  }
  return key_streams_from_bounds<BN>(p, tile, s, plo, wlo, whi, in_lo, in_hi, pin_lo);
}

// Work item -> (query tile, selection head, head group); the tile index runs fastest, so
// the CTAs in flight share the key lists' K/V of one head in L2.
struct Item {
  int tile, s, rgroup;
  __device__ Item(const FwdParams& p, int item)
      : tile(item % p.ntiles), s((item / p.ntiles) % p.S), rgroup(item / p.ntiles / p.S) {}
};

inline int num_items(const FwdParams& p) { return p.ntiles * p.S * (p.R / p.RP); }

// Launches a persistent kernel over `nitems` work items: one CTA per SM (fewer if there are
// fewer items), each walking items blockIdx.x, blockIdx.x + gridDim.x, ...
template <typename Params>
cudaError_t launch_persistent(void (*kernel)(Params, int), const Params& params, int nitems,
                              int threads, size_t smem, cudaStream_t stream) {
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  if (nitems == 0) return cudaSuccess;
  int dev = 0, sms = 0;
  if ((err = cudaGetDevice(&dev)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
    return err;
  kernel<<<std::min(nitems, sms), threads, smem, stream>>>(params, nitems);
  return cudaGetLastError();
}

// What the producer stages per work item for the forward's consumers (ItemStage), so that
// an item starts without a global round trip: its tile, the key streams, and per consumer
// warpgroup the bounds of TileMode::kPoolFast over its valid rows (per producer warp w, rows
// [32 w, 32 w + 32): max boundary rank, max pool start, min window start).
struct ItemMeta {
  KeyStreams ks;
  int q0, q1, s, rgroup;
  int4 bounds[4];
};

// Double-buffered item staging (buffer k % 2 for the CTA's k-th item): the item's BM rows of
// Q (swizzled), each row's RowInfo and the ItemMeta.  full[b] completes when the producer
// threads have written buffer b's RowInfo and ItemMeta (one arrival each); the Q copies are
// issued before the item's first key tile, so that tile's full[] barrier (which tracks each
// thread's earlier copies) covers them: consumers read Q only after waiting for a key tile.
// empty[b] completes when the 8 consumer warps are done with the buffer.
template <typename T>
struct ItemStage {
  T* q;             // [2][D/64][BM][64]
  RowInfo* rows;    // [2][BM]
  ItemMeta* meta;   // [2]
  uint64_t* full;   // [2]
  uint64_t* empty;  // [2]
};

// Key row jk's 16-byte piece at base + jk * stride_bytes -> shared address dst, zero-filled
// unless `mask & bit`; in PTX so that the address is one IMAD.WIDE and the test one LOP3
// (the same in C++ compiled to ~8 instructions per copy: a shift, a compare, moves).
__device__ __forceinline__ void cp_async16_key(uint32_t dst, const char* base, uint32_t jk,
                                               uint32_t stride_bytes, uint32_t mask,
                                               uint32_t bit) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b32 m, n;\n.reg .b64 a;\n"
      "and.b32 m, %3, %4;\nsetp.ne.u32 p, m, 0;\nselp.u32 n, 16, 0, p;\n"
      "mad.wide.u32 a, %1, %2, %5;\n"
      "cp.async.cg.shared.global [%0], [a], 16, n;\n}\n" ::"r"(dst),
      "r"(jk), "r"(stride_bytes), "r"(mask), "r"(bit), "l"(base)
      : "memory");
}

// Warp w gathers keys [32 w, 32 w + 32) of each tile: lane l reads key 32 w + l's list
// entry, score and rank (coalesced), then every key's K and V rows go out as one warp
// instruction per key (D = 128: 32 lanes x 16 bytes = one 256-byte row of K and of V)
// with the key index broadcast by a shuffle.  Each thread then arrives on full[stage] twice
// (the barrier expects 256 arrivals): once when its copies land (cp_async_mbar_arrive) and
// once now (releasing its plain stores of the tile's key metadata), so the producer never
// waits for its own copies and every stage of the ring can be in flight.  Consumers fence
// (fence_proxy_async) after waiting, before their wgmmas read what cp.async wrote.
// With kStage (the forward), it also stages each item (ItemStage): thread e loads row e's
// RowInfo, the warps copy the item's Q rows.
template <typename T, int D, int BN, int NST, bool kStage = false>
__device__ __forceinline__ void produce_key_tiles(const FwdParams& p, int nitems, int warp,
                                                  int lane, T* sK, T* sV, int* sIdx, float* sU,
                                                  int* sRank, int4* sStat, uint64_t* full,
                                                  uint64_t* empty,
                                                  const ItemStage<T> stage = ItemStage<T>{}) {
  static_assert(BN == 128, "the producer's 4 warps gather 32 keys each");
  constexpr int CH = D / 8, BM = 128;  // BM: rows of a staged item (= producer threads)
  const int RP = p.RP;
  constexpr int kKeysPerInstr = 32 / (2 * CH);  // 1 (D = 128) or 2 (D = 64)
  const int part = lane % (2 * CH), sub = lane / (2 * CH);
  const bool is_v = part >= CH;
  const int ch = part % CH;
  const int64_t sn = is_v ? p.v_sn : p.k_sn;
  const int e = warp * 32 + lane;  // this lane's key within a tile (and staged row)
  int it = 0;                      // key tiles streamed so far (all items)
  for (int item = blockIdx.x, k = 0; item < nitems; item += gridDim.x, ++k) {
    const Item w(p, item);
    const int q0 = p.tile_q0[w.tile], q1 = p.tile_q1[w.tile];
    const KeyStreams ks = warp_key_streams<BN>(p, w.tile, w.s, q0, q1, lane);
    const int ntiles_k = ks.tilesA + ks.tilesB;
    if constexpr (kStage) {
      const int qb = k & 1;
      const int qi = q0 + e / RP;
      const RowInfo row = load_row(p, w.s, qi, qi < q1);
      if (k >= 2) mbar_wait(&stage.empty[qb], ((k >> 1) - 1) & 1);
      const T* qbase = static_cast<const T*>(p.q);
      T* dq = stage.q + qb * BM * D;
      // Only items with key tiles read Q, and only such a tile's full[] tracks the copies
      // (an untracked copy could still land in the buffer when it is refilled).
      for (int c = e; ntiles_k > 0 && c < BM * CH; c += 128) {  // lanes: one row's chunks
        const int m = c / CH, cc = c % CH;
        const int qm = q0 + m / RP, r = w.rgroup * RP + m % RP;
        const bool valid = qm < q1;
        cp_async16(dq + sw128(BM, m, cc),
                   qbase + (valid ? (qm * p.q_sn + w.s * p.q_ss + r * p.q_sr + cc * 8) : 0),
                   valid);
      }
      stage.rows[qb * BM + e] = row;
      const bool valid = qi < q1;
      int mx_rb = valid ? row.rb : INT_MIN, mx_plo = valid ? row.plo : INT_MIN;
      int mn_wlo = valid ? row.wlo : INT_MAX;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        mx_rb = max(mx_rb, __shfl_xor_sync(0xffffffffu, mx_rb, o));
        mx_plo = max(mx_plo, __shfl_xor_sync(0xffffffffu, mx_plo, o));
        mn_wlo = min(mn_wlo, __shfl_xor_sync(0xffffffffu, mn_wlo, o));
      }
      ItemMeta& m = stage.meta[qb];
      if (lane == 0) m.bounds[warp] = make_int4(mx_rb, mx_plo, mn_wlo, 0);
      if (e == 0) {
        m.ks = ks;
        m.q0 = q0, m.q1 = q1, m.s = w.s, m.rgroup = w.rgroup;
      }
      mbar_arrive(&stage.full[qb]);  // (the Q copies land with the item's first key tile)
    }
    const int r_kv = w.rgroup * RP;  // K/V shared by the RP packed heads (stride 0 over R)
    // This lane's 16-byte column of every key row; key jk's chunk is at src + jk * sn_bytes
    // (one IMAD.WIDE).  Key strides in bytes fit 32 bits (a row of S x R x D elements).
    const char* src = reinterpret_cast<const char*>(static_cast<const T*>(is_v ? p.v : p.k) +
                                                    w.s * (is_v ? p.v_ss : p.k_ss) +
                                                    r_kv * (is_v ? p.v_sr : p.k_sr) + ch * 8);
    const uint32_t sn_bytes = static_cast<uint32_t>(sn * sizeof(T));
    for (int t = 0; t < ntiles_k; ++t, ++it) {
      const int st = it % NST;
      if (it >= NST) mbar_wait(&empty[st], ((it / NST) - 1) & 1);
      const bool listed = ks.rule(t) == KeyRule::kPoolSelected;
      int j = -1, rank = 0;
      float u = 0.f;
      if (listed) {
        const int pos = t * BN + e;
        if (pos < ks.nA) {
          j = ks.list[pos];
          u = p.u[(size_t)w.s * p.NK + j];
          rank = p.ranks[(size_t)w.s * p.NK + j];
        }
      } else {
        j = ks.key(t, e, BN);
      }
      // Key kk = i * kKeysPerInstr + sub of the warp's 32 (row 32 warp + kk of the tile):
      // its index comes by shuffle, its validity from one ballot (missing keys: zero-filled
      // rows).  In the 128-byte swizzle, row r's chunk c sits at chunk c ^ (r % 8), and
      // r % 8 = (i kKeysPerInstr % 8) ^ sub, so the destination is a per-lane base plus
      // constants.
      const uint32_t valid_ballot = __ballot_sync(0xffffffffu, j >= 0);
      if (p.tma_keys && !listed && valid_ballot == 0xffffffffu) {
        // the warp's 32 keys are j .. j + 31 of lane 0 (a contiguous stream, every key in
        // it): TMA boxes of K and V, counted on full[st] as transaction bytes
        if (lane == 0) {
          mbar_expect_tx(&full[st], 2 * 32 * D * sizeof(T));
          const uint32_t row0 = warp * 32 * 128;
          tma_load_rows<D>(smem_addr(sK + st * BN * D) + row0, BN * 128, p.tma_k, &full[st],
                           p.k_sr, p.k_ss, r_kv, w.s, j);
          tma_load_rows<D>(smem_addr(sV + st * BN * D) + row0, BN * 128, p.tma_v, &full[st],
                           p.v_sr, p.v_ss, r_kv, w.s, j);
        }
      } else {
        const uint32_t valid_keys = valid_ballot >> sub;
        const int jc = max(j, 0);
        const uint32_t dst = smem_addr((is_v ? sV : sK) + st * BN * D) + (ch >> 3) * BN * 128 +
                             (warp * 32 + sub) * 128;
        const uint32_t xo = ((ch & 7) ^ sub) << 4;
#pragma unroll
        for (int i = 0; i < 32 / kKeysPerInstr; ++i) {
          const int kk = i * kKeysPerInstr;  // + sub
          const uint32_t jk = __shfl_sync(0xffffffffu, jc, kk + sub);
          cp_async16_key(dst + kk * 128 + (xo ^ ((kk & 7) << 4)), src, jk, sn_bytes, valid_keys,
                         1u << kk);
        }
      }
      if (listed) {
        sIdx[st * BN + e] = j;
        sU[st * BN + e] = u;
        sRank[st * BN + e] = rank;
        // min rank, min and max key index, count of the warp's valid keys
        const bool valid = j >= 0;
        int mn_rank = valid ? rank : INT_MAX, mn_j = valid ? j : INT_MAX;
        int mx_j = valid ? j : -1;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
          mn_rank = min(mn_rank, __shfl_xor_sync(0xffffffffu, mn_rank, o));
          mn_j = min(mn_j, __shfl_xor_sync(0xffffffffu, mn_j, o));
          mx_j = max(mx_j, __shfl_xor_sync(0xffffffffu, mx_j, o));
        }
        const int nvalid = __popc(__ballot_sync(0xffffffffu, valid));
        if (lane == 0) sStat[st * 4 + warp] = make_int4(mn_rank, mn_j, mx_j, nvalid);
      }
      cp_async_mbar_arrive(&full[st]);
      mbar_arrive(&full[st]);
    }
  }
  cp_async_wait<0>();  // (no copy may outlive the CTA's shared memory)
}

}  // namespace sm90
}  // namespace xsk
