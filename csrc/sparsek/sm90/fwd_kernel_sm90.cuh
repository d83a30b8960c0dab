// SparseK attention forward, Hopper path (sm_90a, warpgroup MMAs).
//
// Same problem split, key streams, per-(row, key) rule and outputs as the mma.sync kernel
// (../fwd_kernel.cuh: read that first); what changes is how the work is scheduled.
// One CTA = one query tile (BM = 128 rows: 128 / RP queries x RP packed heads) x one
// selection head x one head group, 3 warpgroups:
//   WG0, producer: gathers key tile t (BN = 128 keys of K and V, plus each key's index,
//        score and rank in sparse mode) with cp.async into stage t % NST of a ring; the
//        copies of each producer thread arrive on full[stage] when they land.  Before
//        refilling a stage it waits on empty[stage].
//   WG1, WG2, consumers: 64 rows each.  Per tile: S = Q K^T (wgmma, both operands in
//        shared memory), gates, masks and the online softmax in registers, then
//        O += (P * gate) V (wgmma, P from registers).  A consumer releases a stage once its
//        P V product has completed; it waits for that only after issuing the next Q K^T,
//        so the tensor cores run the two back to back.  The two consumers drift apart
//        freely: one's softmax overlaps the other's matrix work.
// Tiles in shared memory use wgmma's 128-byte swizzle (sw128 in wgmma.cuh).
#pragma once
#include <cmath>

#include "../tile_common.cuh"
#include "wgmma.cuh"

namespace xsk {
namespace sm90 {

template <typename T, int D>
struct FwdSm90Traits {
  static constexpr int kBM = 128;  // = FwdTraits::kBM: same tiles and key lists
  static constexpr int kBN = 128;  // keys per tile (= producer threads: one key each for metadata)
  static constexpr int kStages = D == 128 ? 2 : 4;
  static constexpr int kThreads = 3 * 128;
  // Register split (setmaxnreg).  The CTA is launched with 168 x 384 registers and
  // setmaxnreg only moves them between warpgroups, so producer + 2 x consumer <= 504 (a
  // larger sum blocks the consumers' increase forever).  The producer spills below 56.
  static constexpr int kChunks = D / 8;
  static constexpr int kTileBytes = kBN * D * (int)sizeof(T);  // K or V of one stage
  static constexpr size_t kSmem = 1024 /* alignment slack */ + kBM * D * sizeof(T) +
                                  2 * kStages * (size_t)kTileBytes +
                                  kStages * kBN * (2 * sizeof(int) + sizeof(float)) +
                                  2 * kStages * sizeof(uint64_t);
  static_assert(kSmem <= 227 * 1024, "shared memory");
};

constexpr int kProducerRegs = 56, kConsumerRegs = 224;
static_assert(kProducerRegs + 2 * kConsumerRegs <= 504, "registers the CTA does not have");

template <typename T, int D>
__global__ void __launch_bounds__(FwdSm90Traits<T, D>::kThreads, 1)
    sparsek_fwd_sm90_kernel(const FwdParams p) {
#if defined(XSK_SM90A)
  using Tr = FwdSm90Traits<T, D>;
  constexpr int BM = Tr::kBM, BN = Tr::kBN, NST = Tr::kStages, CH = Tr::kChunks;
  extern __shared__ char smem_raw[];
  char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* sQ = reinterpret_cast<T*>(base);         // [D/64][BM][64]
  T* sK = sQ + BM * D;                        // [NST][D/64][BN][64]
  T* sV = sK + NST * BN * D;                  // [NST][D/64][BN][64]
  int* sIdx = reinterpret_cast<int*>(sV + NST * BN * D);  // [NST][BN] list entries
  float* sU = reinterpret_cast<float*>(sIdx + NST * BN);  // [NST][BN] key scores
  int* sRank = reinterpret_cast<int*>(sU + NST * BN);     // [NST][BN] key ranks
  uint64_t* full = reinterpret_cast<uint64_t*>(sRank + NST * BN);
  uint64_t* empty = full + NST;

  const int tile = blockIdx.x, s = blockIdx.y, rgroup = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile];
  const int RP = p.RP;

  if (tid == 0) {
    for (int i = 0; i < NST; ++i) {
      mbar_init(&full[i], 128);  // every producer thread arrives once per fill
      mbar_init(&empty[i], 8);   // every consumer warp arrives once per release
    }
  }
  // (make_key_streams starts with a __syncthreads, which also publishes the barrier inits)
  const KeyStreams ks = make_key_streams<BN>(p, tile, s, q0, q1);
  const int ntiles_k = ks.tilesA + ks.tilesB;

  if (warp < 4) {
    // ================================ producer ===========================================
    setmaxnreg_dec<kProducerRegs>();
    const T* kbase = static_cast<const T*>(p.k);
    const T* vbase = static_cast<const T*>(p.v);
    const int r_kv = rgroup * RP;  // K/V shared by the RP packed heads (stride 0 over R)
    for (int t = 0; t < ntiles_k; ++t) {
      const int st = t % NST;
      if (t >= NST) mbar_wait(&empty[st], ((t / NST) - 1) & 1);
      T* dK = sK + st * BN * D;
      T* dV = sV + st * BN * D;
#pragma unroll 4
      for (int c = tid; c < BN * CH; c += 128) {
        const int e = c / CH, ch = c % CH;
        const int j = ks.key(t, e, BN);
        const bool valid = j >= 0;
        const int64_t jj = valid ? j : 0;
        cp_async16(dK + sw128(BN, e, ch),
                   kbase + jj * p.k_sn + s * p.k_ss + r_kv * p.k_sr + ch * 8, valid);
        cp_async16(dV + sw128(BN, e, ch),
                   vbase + jj * p.v_sn + s * p.v_ss + r_kv * p.v_sr + ch * 8, valid);
      }
      if (ks.rule(t) == KeyRule::kPoolSelected) {  // list entry, score and rank of key tid
        const int pos = t * BN + tid;
        const bool valid = pos < ks.nA;
        const int j = valid ? ks.list[pos] : 0;
        cp_async4(sIdx + st * BN + tid, ks.list + (valid ? pos : 0), valid);
        cp_async4(sU + st * BN + tid, p.u + (size_t)s * p.NK + j, valid);
        cp_async4(sRank + st * BN + tid, p.ranks + (size_t)s * p.NK + j, valid);
      }
      mbar_arrive_on_cp_async(&full[st]);
    }
    cp_async_wait<0>();
    return;
  }

  // ================================== consumers ==========================================
  setmaxnreg_inc<kConsumerRegs>();
  const int wg = (warp >> 2) - 1;  // consumer 0 or 1: rows [64 wg, 64 wg + 64)
  const int ctid = tid - 128 * (wg + 1);
  const int g = lane >> 2, tq = lane & 3;
  auto row_of = [&](int x) { return wg * 64 + (warp & 3) * 16 + g + 8 * x; };
  RowInfo rows[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int qi = q0 + row_of(x) / RP;
    rows[x] = load_row(p, s, qi, qi < q1);
  }

  // Q rows of this consumer -> shared memory (zero rows past the tile).
  {
    const T* qbase = static_cast<const T*>(p.q);
    for (int c = ctid; c < 64 * CH; c += 128) {
      const int m = wg * 64 + c / CH, ch = c % CH;
      const int qi = q0 + m / RP, r = rgroup * RP + m % RP;
      const bool valid = qi < q1;
      cp_async16(sQ + sw128(BM, m, ch),
                 qbase + (valid ? (qi * p.q_sn + s * p.q_ss + r * p.q_sr + ch * 8) : 0), valid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    named_barrier(1 + wg, 128);
  }

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  fence_regs(o);  // else the zeroing may sink into the wgmma pipeline and serialize it
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  float sc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) sc[i] = 0.f;

  for (int t = 0; t < ntiles_k; ++t) {
    const int st = t % NST;
    mbar_wait(&full[st], (t / NST) & 1);
    fence_proxy_async();  // cp.async writes (generic proxy) -> wgmma reads (async proxy)

    // S = Q K^T
    const T* cK = sK + st * BN * D;
    const T* cV = sV + st * BN * D;
    fence_regs(sc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint64_t da = make_desc(sQ + (kk >> 2) * BM * 64 + wg * 64 * 64 + (kk & 3) * 16, 16, 1024);
      const uint64_t db = make_desc(cK + (kk >> 2) * BN * 64 + (kk & 3) * 16, 16, 1024);
      WgmmaSS<T, BN>::run(sc, da, db, kk > 0);
    }
    wgmma_commit();
    fence_regs(sc);
    if (t > 0) {  // P V of the previous tile done: release its stage
      wgmma_wait<1>();
      if (lane == 0) mbar_arrive(&empty[(t - 1) % NST]);
    }
    wgmma_wait<0>();
    fence_regs(sc);
    fence_regs(o);

    // Gates, masks and the online softmax (base 2): thread holds rows row_of(0 / 1), columns
    // 8 i + 2 tq + {0, 1} of each n8 block i.
    const KeyRule rule = ks.rule(t);
    const bool interior = ks.interior(t, BN);
    const bool listed = ks.sparse && t < ks.tilesA;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      const int e = i * 8 + tq * 2;
      int kj[2], kr[2] = {-1, -1};
      float ku[2] = {0.f, 0.f};
      if (listed) {
        const int2 jj = *reinterpret_cast<const int2*>(sIdx + st * BN + e);
        const float2 uu = *reinterpret_cast<const float2*>(sU + st * BN + e);
        const int2 rr = *reinterpret_cast<const int2*>(sRank + st * BN + e);
        const int pos = t * BN + e;
        kj[0] = pos < ks.nA ? jj.x : -1;
        kj[1] = pos + 1 < ks.nA ? jj.y : -1;
        ku[0] = uu.x, ku[1] = uu.y, kr[0] = rr.x, kr[1] = rr.y;
      } else {
        kj[0] = ks.key(t, e, BN);
        kj[1] = ks.key(t, e + 1, BN);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int x = c >> 1;
        float gate;
        const bool att = attends(rule, interior, rows[x], kj[c & 1], kr[c & 1], ku[c & 1], gate);
        const float v = att ? sc[4 * i + c] * (p.scale_log2 * gate) : -INFINITY;
        sc[4 * i + c] = v;
        tile_max[x] = fmaxf(tile_max[x], v);
      }
    }
    float scale_o[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      tile_max[x] = fmaxf(tile_max[x], __shfl_xor_sync(0xffffffffu, tile_max[x], 1));
      tile_max[x] = fmaxf(tile_max[x], __shfl_xor_sync(0xffffffffu, tile_max[x], 2));
      const float new_max = fmaxf(row_max[x], tile_max[x]);
      scale_o[x] = (new_max == -INFINITY) ? 1.f : exp2f(row_max[x] - new_max);
      row_max[x] = new_max;
      row_sum[x] *= scale_o[x];
    }
    // P * gate as the register A operand of the P V product (k16 block kc = n8 blocks
    // 2 kc and 2 kc + 1).
    uint32_t pf[BN / 16][4];
#pragma unroll
    for (int i = 0; i < BN / 8; ++i) {
      float gk[2] = {1.f, 1.f};
      if (rule == KeyRule::kPoolSelected) {
        const float2 uu = *reinterpret_cast<const float2*>(sU + st * BN + i * 8 + tq * 2);
        gk[0] = uu.x, gk[1] = uu.y;
      }
      float pe[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int x = c >> 1;
        // exp2(-inf - finite) = 0; rows with nothing attended yet use max 0 (no NaN)
        pe[c] = exp2f(sc[4 * i + c] - (row_max[x] == -INFINITY ? 0.f : row_max[x]));
        row_sum[x] += pe[c];
        if (rule == KeyRule::kPoolSelected) pe[c] *= fminf(fmaxf(gk[c & 1] - rows[x].tau, 0.f), 1.f);
      }
      pf[i >> 1][(i & 1) * 2 + 0] = Mma<T>::pack(pe[0], pe[1]);
      pf[i >> 1][(i & 1) * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      o[4 * i + 0] *= scale_o[0];
      o[4 * i + 1] *= scale_o[0];
      o[4 * i + 2] *= scale_o[1];
      o[4 * i + 3] *= scale_o[1];
    }

    // O += (P * gate) V
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      const uint64_t db = make_desc(cV + kc * 16 * 64, BN * 128, 1024);
      WgmmaRS<T, D>::run(o, pf[kc], db);
    }
    wgmma_commit();
    fence_regs(o);
  }
  wgmma_wait<0>();
  fence_regs(o);

  // ---- epilogue -------------------------------------------------------------------------
  T* obase = static_cast<T*>(p.o);
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 1);
    row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 2);
    const int qi = q0 + row_of(x) / RP, r = rgroup * RP + row_of(x) % RP;
    if (qi >= q1) continue;
    const float inv = row_sum[x] > 0.f ? 1.f / row_sum[x] : 0.f;
    T* orow = obase + qi * p.o_sn + s * p.o_ss + r * p.o_sr;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int d = i * 8 + tq * 2;
      *reinterpret_cast<uint32_t*>(orow + d) =
          Mma<T>::pack(o[4 * i + 2 * x] * inv, o[4 * i + 2 * x + 1] * inv);
    }
    if (tq == 0) {
      const float lse = row_sum[x] > 0.f
                            ? (row_max[x] + log2f(row_sum[x])) * 0.6931471805599453f
                            : -INFINITY;
      p.lse[((size_t)s * p.R + r) * p.NQ + qi] = lse;
    }
  }
#else
  __trap();  // built without sm_90a code: run_fwd_sm90 is never called then (see launch)
#endif
}

template <typename T, int D>
cudaError_t run_fwd_sm90(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdSm90Traits<T, D>;
  auto kernel = sparsek_fwd_sm90_kernel<T, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmem);
  if (err != cudaSuccess) return err;
  dim3 grid(p.ntiles, p.S, p.R / p.RP);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace xsk
