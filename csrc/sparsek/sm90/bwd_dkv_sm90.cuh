// SparseK attention backward, dk/dv pass on Hopper (sm_90a, warpgroup MMAs).
//
// Same problem, partial-slot outputs and per-pair math as bwd_dkv_kernel (../bwd_kernel.cuh:
// read that first); what changes is the schedule.
// CTA = one key tile (BK = 128 keys) of one super-tile's key streams x one head group: the
// grid's x is the key tile, so the CTAs of one super-tile run side by side and share its
// Q / dO rows in L2 (the mma.sync pass walks every key tile of a super-tile in one CTA and
// re-reads them from DRAM).  Warpgroup 0 (the producer, 24 registers) loads the tile's K / V
// and then the Q / dO rows of each chunk of 64 rows some key of the tile is attended by
// (decided once per CTA from the rows' and keys' bounds; full chunks as TMA boxes) into a
// ring of three stages on mbarriers (full: the copies landed; empty: the 8 consumer warps
// released the stage).
// Warpgroups 1 and 2 (the consumers, 240 registers) hold 64 keys each (wgmma M = 64) and
// walk the chunks:
//   S^T = K Q^T and dP^T = V dO^T   (wgmma, both operands in shared memory, N = 64 rows),
//   P, dS and the score gradient's direct sums per (key, row), the BlockMode of each warp's
//   16 keys picking the cheapest exact rule,
//   dV += (P g)^T dO and dK += (dS g scale)^T Q   (wgmma, the A operand from registers).
// A consumer warp waits for a chunk's dK / dV products before it issues the next chunk's
// S^T / dP^T: the P / dS register operands of the one and the accumulators of the other
// would not fit 240 registers together (ptxas then serializes the wgmmas).  It releases the
// chunk's stage there, so the two consumers need not move in step: they meet only where
// the producer must wait for a stage.  (The tensor pipe runs one warpgroup's products while
// the other does its elementwise work.  Issuing S^T / dP^T in halves of 32 rows, with the
// previous products in flight, took 19.4 ms at 64K against 17.6 for whole chunks: twice the
// reads of K and V, smaller wgmmas.)  Tiles use wgmma's 128-byte swizzle (sw128).
#pragma once
#include <climits>
#include <cmath>

#include "../bwd_kernel.cuh"
#include "key_producer.cuh"  // (RegSplit, key_tma.h)
#include "wgmma.cuh"

namespace xsk {
namespace sm90 {

template <typename T, int D>
struct BwdDkvSm90Traits {
  static constexpr int kBK = 128;       // keys per CTA: 64 per warpgroup
  static constexpr int kRows = 64;      // rows per chunk
  static constexpr int kStages = 3;     // Q / dO chunk buffers
  // warpgroup 0 loads the chunks (producer), warpgroups 1 and 2 compute (64 keys each)
  static constexpr int kThreads = 384, kConsumerWarps = 8;
  // the consumers hold dK, dV (64 + 64 registers), S^T, dP^T of a chunk (32 + 32) and its
  // P / dS operands (16 + 16)
  using Regs = RegSplit<24, 240>;
  static constexpr int kMaxChunks = 32;  // rows per super-tile / kRows (_BWD_SUPER_ROWS <= 2048)
  static constexpr size_t kSmem = 1024 /* alignment slack */ + 2 * kBK * D * sizeof(T) +
                                  2 * kStages * kRows * D * sizeof(T) +
                                  2 * kStages * sizeof(uint64_t);  // full / empty barriers
  // dynamic + the static row tables (7 words per row) + the small static arrays (< 4 KB)
  static_assert(kSmem + kMaxChunks * kRows * 7 * 4 + 4096 <= 227 * 1024, "shared memory");
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdDkvSm90Traits<T, D>::kThreads, 1)
    bwd_dkv_sm90_kernel(const __grid_constant__ BwdDkvParams kp) {
#if defined(XSK_SM90A)
  using Tr = BwdDkvSm90Traits<T, D>;
  constexpr int BK = Tr::kBK, RW = Tr::kRows, NST = Tr::kStages, CH = D / 8;
  const BwdDqParams& b = kp.b;
  const FwdParams& p = b.f;
  extern __shared__ char smem_raw[];
  char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  T* sK = reinterpret_cast<T*>(base);  // [D/64][BK][64]
  T* sV = sK + BK * D;                 // [D/64][BK][64]
  T* sQ = sV + BK * D;                 // [NST][D/64][RW][64]
  T* sO = sQ + NST * RW * D;           // [NST][D/64][RW][64] dO rows
  uint64_t* full = reinterpret_cast<uint64_t*>(sO + NST * RW * D);  // [NST] chunk landed
  uint64_t* empty = full + NST;                                     // [NST] chunk released
  __shared__ int s_idx[BK], s_rank[BK];
  __shared__ float s_u[BK];
  // every row's metadata, loaded once (global loads in the chunk loop would stall its warps)
  constexpr int kMaxRows = Tr::kMaxChunks * RW;
  __shared__ __align__(16) int s_plo[kMaxRows], s_wlo[kMaxRows], s_whi[kMaxRows], s_rb[kMaxRows];
  __shared__ __align__(16) float s_tau[kMaxRows], s_lse2[kMaxRows], s_delta[kMaxRows];
  __shared__ RowBounds s_chunk[Tr::kMaxChunks];
  __shared__ int s_visit[Tr::kMaxChunks], s_nvisit;
  __shared__ __align__(8) uint8_t s_mode[Tr::kMaxChunks * 8];  // BlockMode [chunk][warp]
  static_assert(static_cast<int>(BlockMode::kSkip) == 0, "a chunk's word is 0: all skip");

  const int t = blockIdx.x, tile = blockIdx.y, group = blockIdx.z;
  const int RP = p.RP, s = group / (p.R / RP), rgroup = group % (p.R / RP);
  const int tid = threadIdx.x, lane = tid & 31;
  // (the warp index by a shuffle: ptxas then knows it is warp-uniform and keeps what
  // derives from it, the wgmma descriptors included, in uniform registers)
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  // consumer warp 0..7 and warpgroup 0..1 (meaningless for the producer's warps 0..3)
  const int cw = warp - 4, wg = cw >> 2;
  const int g = lane >> 2, tq = lane & 3;
  const int q0 = p.tile_q0[tile], q1 = p.tile_q1[tile];
  const KeyStreams ks = make_key_streams<BK>(p, tile, s, q0, q1);
  if (t >= ks.tilesA + ks.tilesB) return;  // (the grid covers the longest streams)
  const int nchunks = ((q1 - q0) * RP + RW - 1) / RW;
  if (nchunks > Tr::kMaxChunks) __trap();  // the host's super-tiles have <= 2048 rows
  const int r_kv = rgroup * RP;
  const KeyRule rule = ks.rule(t);
  const bool interior = ks.interior(t, BK);

  // ---- the key tile: K, V and each key's index, score and rank ---------------------------
  {
    const T* kbase = static_cast<const T*>(p.k) + s * p.k_ss + r_kv * p.k_sr;
    const T* vbase = static_cast<const T*>(p.v) + s * p.v_ss + r_kv * p.v_sr;
    // (by the producer's threads: full[0], which tracks their copies, then covers them)
    for (int c = tid; warp < 4 && c < BK * CH; c += 128) {
      const int e = c / CH, ch = c % CH;
      const int j = ks.key(t, e, BK);
      const int64_t jj = j >= 0 ? j : 0;
      cp_async16(sK + sw128(BK, e, ch), kbase + jj * p.k_sn + ch * 8, j >= 0);
      cp_async16(sV + sw128(BK, e, ch), vbase + jj * p.v_sn + ch * 8, j >= 0);
    }
    cp_async_commit();
    if (tid < BK) {
      const int j = ks.key(t, tid, BK);
      const bool real = ks.sparse && j >= 0;
      s_idx[tid] = j;
      s_u[tid] = real ? p.u[(size_t)s * p.NK + j] : 0.f;
      s_rank[tid] = real ? p.ranks[(size_t)s * p.NK + j] : -1;
    }
  }
  // ---- every row's metadata (rows past the super-tile: P = 0), then each chunk's bounds ----
  // (kBatch rows per thread loaded before any is stored: their global loads overlap; a row
  // at a time left the 12 warps waiting on one load chain after another)
  constexpr int kBatch = 4;
  for (int row0 = tid; row0 < nchunks * RW; row0 += kBatch * Tr::kThreads) {
    RowInfo ri[kBatch];
    float lse2[kBatch], delta[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = row0 + i * Tr::kThreads;
      const int qi = q0 + row / RP, r = rgroup * RP + row % RP;
      const bool valid = row < nchunks * RW && qi < q1;
      ri[i] = load_row(p, s, qi, valid);
      const size_t gi = ((size_t)s * p.R + r) * p.NQ + qi;
      lse2[i] = valid ? b.lse[gi] * kLog2e : INFINITY;
      delta[i] = valid ? b.delta[gi] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const int row = row0 + i * Tr::kThreads;
      if (row >= nchunks * RW) break;
      s_plo[row] = ri[i].plo;
      s_wlo[row] = ri[i].wlo;
      s_whi[row] = ri[i].whi;
      s_rb[row] = ri[i].rb;
      s_tau[row] = ri[i].tau;
      s_lse2[row] = lse2[i];
      s_delta[row] = delta[i];
    }
  }
  __syncthreads();
  for (int c = warp; c < nchunks; c += Tr::kThreads / 32) {  // a warp per chunk
    RowBounds rbd;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = c * RW + lane + 32 * h;
      const RowBounds r = row_bounds_of(
          RowInfo{s_plo[row], s_wlo[row], s_whi[row], s_rb[row], s_tau[row]});
      rbd = h == 0 ? r : merge(rbd, r);
    }
    rbd = warp_row_bounds(rbd);
    if (lane == 0) s_chunk[c] = rbd;
  }
  __syncthreads();

  if (tid == 0) {
    for (int i = 0; i < NST; ++i) {
      mbar_init(&full[i], 2 * 128);              // per producer thread: copies landed, arrival
      mbar_init(&empty[i], Tr::kConsumerWarps);  // per consumer warp
    }
  }
  // Consumers: this thread's two keys (accumulator rows g and g + 8 of its warp's 16), the
  // bounds of its warp's keys, and its warp's BlockMode per chunk (one byte each, a chunk's
  // 8 in one 8-byte word).
  int kj[2] = {-1, -1}, krank[2] = {-1, -1};
  float ku[2] = {0.f, 0.f};
  KeyBounds warp_keys{};
  if (cw >= 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int e = wg * 64 + (cw & 3) * 16 + g + 8 * h;
      kj[h] = s_idx[e];
      krank[h] = s_rank[e];
      ku[h] = s_u[e];
    }
    warp_keys = warp_key_bounds(kj, krank);
    static_assert(Tr::kMaxChunks <= 32 && Tr::kConsumerWarps == 8, "a lane per chunk, 8 warps");
    if (lane < nchunks)
      s_mode[lane * 8 + cw] =
          static_cast<uint8_t>(block_mode(rule, interior, warp_keys, s_chunk[lane]));
  }
  __syncthreads();
  if (warp == 0) {  // the chunks some key of the tile is attended by (a lane per chunk)
    const bool visit =
        lane < nchunks && *reinterpret_cast<const uint64_t*>(s_mode + lane * 8) != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, visit);
    if (visit) s_visit[__popc(ballot & ((1u << lane) - 1))] = lane;
    if (lane == 0) s_nvisit = __popc(ballot);
  }
  __syncthreads();
  const int nvisit = s_nvisit;

  // ---- producer: Q and dO rows of chunk s_visit[v] into stage v % NST ----------------------
  // Thread tid copies rows m and m + 32 (m = tid / 4) of every chunk: 16-byte pieces c0,
  // c0 + 4, ... (c0 = tid % 4).  Row rr of the super-tile is head r_kv + rr % RP of query
  // q0 + rr / RP (RP a power of two).  In the 128-byte swizzle piece ch of row m sits at
  // ch ^ (m % 8); c0 + 4 j = c0 ^ 4 j (c0 < 4), so piece j is at a per-thread constant plus
  // (j / 2) 64-column blocks and, for odd j, a per-thread +-4 pieces.  Each thread arrives on
  // full[stage] twice: when its copies land and now; it refills a stage once the 8 consumer
  // warps released it (empty).
  if (warp < 4) {
    setmaxnreg_dec<Tr::Regs::kProducerRegs>();
    const T* qbase = static_cast<const T*>(p.q);
    const T* dobase = static_cast<const T*>(b.dout);
    constexpr int kPieces = CH / 4;  // pieces per row and thread (4 at D = 128)
    static_assert(CH % 8 == 0, "copy pattern: 4 lanes per row");
    const int rp_shift = __ffs(RP) - 1;
    const int m = tid / 4, c0 = tid % 4;
    const int x0 = c0 ^ (m & 7);  // (rows m and m + 32: the same m % 8)
    const int dst0 = m * 64 + (x0 << 3), dst_odd = ((x0 ^ 4) - x0) << 3;
    for (int v = 0; v < nvisit; ++v) {
      const int c = s_visit[v], st = v % NST;
      if (v >= NST) mbar_wait(&empty[st], ((v / NST) - 1) & 1);
      if (b.tma_rows && q0 + (((c + 1) * RW) >> rp_shift) <= q1) {
        // a full chunk: TMA boxes of its 64 rows (RP heads x 64 / RP queries, in row order),
        // counted on full[st] as transaction bytes.  (A chunk with rows past the super-tile
        // takes the copies below, which zero-fill those rows: a box would load the next
        // queries' rows, and their products with P = 0 are NaN where such a row is not finite.)
        if (tid == 0) {
          mbar_expect_tx(&full[st], 2 * RW * D * sizeof(T));
          const int qc = q0 + ((c * RW) >> rp_shift);
          tma_load_rows<D>(smem_addr(sQ + st * RW * D), RW * 128, b.tma_q, &full[st], p.q_sr,
                           p.q_ss, r_kv, s, qc);
          tma_load_rows<D>(smem_addr(sO + st * RW * D), RW * 128, b.tma_do, &full[st], b.do_sr,
                           b.do_ss, r_kv, s, qc);
        }
        cp_async_mbar_arrive(&full[st]);
        mbar_arrive(&full[st]);
        continue;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = c * RW + m + 32 * h;  // the row in the super-tile
        const int qi = q0 + (rr >> rp_shift), r = r_kv + (rr & (RP - 1));
        const bool valid = qi < q1;
        const T* qs = valid ? qbase + s * p.q_ss + (int64_t)r * p.q_sr + (int64_t)qi * p.q_sn + c0 * 8
                            : qbase;
        const T* os = valid ? dobase + s * b.do_ss + (int64_t)r * b.do_sr +
                                  (int64_t)qi * b.do_sn + c0 * 8
                            : dobase;
        T* dQ = sQ + st * RW * D + dst0 + 32 * h * 64;
        T* dO = sO + st * RW * D + dst0 + 32 * h * 64;
#pragma unroll
        for (int j = 0; j < kPieces; ++j) {
          const int dj = (j >> 1) * RW * 64 + ((j & 1) ? dst_odd : 0);
          cp_async16(dQ + dj, qs + (valid ? j * 32 : 0), valid);
          cp_async16(dO + dj, os + (valid ? j * 32 : 0), valid);
        }
      }
      cp_async_mbar_arrive(&full[st]);
      mbar_arrive(&full[st]);
    }
    cp_async_wait<0>();  // (no copy may outlive the CTA's shared memory)
    return;
  }

  // ================================== consumers ==========================================
  setmaxnreg_inc<Tr::Regs::kConsumerRegs>();
  float dk[D / 2], dv[D / 2], sct[RW / 2], dpt[RW / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
#pragma unroll
  for (int i = 0; i < RW / 2; ++i) sct[i] = dpt[i] = 0.f;
  fence_regs(dk);  // else the zeroing may sink into the wgmma pipeline and serialize it
  fence_regs(dv);
  float du[2] = {0.f, 0.f};
  // wgmma descriptors (their 32-bit start words): this warpgroup's 64 keys of K and V (row
  // offset in each 64-column block), and stage 0 of the chunk rows as the K-major (S^T, dP^T)
  // and the MN-major (dK, dV) operand; K-steps and stages are offsets (>> 4).
  constexpr int EB = sizeof(T);
  const uint32_t desc_k = desc_lo(make_desc(sK + wg * 64 * 64, 16, 1024));
  const uint32_t desc_v = desc_lo(make_desc(sV + wg * 64 * 64, 16, 1024));
  const uint32_t desc_q = desc_lo(make_desc(sQ, 16, 1024));
  const uint32_t desc_o = desc_lo(make_desc(sO, 16, 1024));
  const uint32_t desc_qt = desc_lo(make_desc(sQ, RW * 128, 1024));
  const uint32_t desc_ot = desc_lo(make_desc(sO, RW * 128, 1024));

  // A stage is released (each consumer warp arrives on empty) once the products that read
  // it have completed: before the next chunk's S^T / dP^T are issued.  The wait also frees
  // the previous chunk's P / dS registers (this chunk's fragments do not fit beside them).
  auto finish_previous_chunk = [&](int v) {
    wgmma_wait<0>();
    fence_regs(dk);
    fence_regs(dv);
    if (v > 0 && lane == 0) mbar_arrive(&empty[(v - 1) % NST]);
  };
  for (int v = 0; v < nvisit; ++v) {
    const int st = v % NST, c = s_visit[v];
    mbar_wait(&full[st], (v / NST) & 1);
    fence_proxy_async();  // cp.async writes (generic proxy) -> wgmma reads (async proxy)
    const uint32_t wg_modes =
        static_cast<uint32_t>(*reinterpret_cast<const uint64_t*>(s_mode + c * 8) >> (32 * wg));
    if (wg_modes == 0) {  // all 4 warps skip the chunk: its products add zeros
      finish_previous_chunk(v);
      continue;
    }
    const BlockMode mode = static_cast<BlockMode>((wg_modes >> (8 * (cw & 3))) & 0xff);
    const uint32_t stage16 = (st * RW * D * EB) >> 4;  // (descriptor units: 16 bytes)

    // S^T = K Q^T, dP^T = V dO^T over the chunk's rows
    finish_previous_chunk(v);
    fence_regs(sct);
    fence_regs(dpt);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      WgmmaSSLo<T, RW>::run(sct, desc_k, kstep_bytes(kk, BK, EB) >> 4, desc_q + stage16,
                            kstep_bytes(kk, RW, EB) >> 4, kk > 0);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      WgmmaSSLo<T, RW>::run(dpt, desc_v, kstep_bytes(kk, BK, EB) >> 4, desc_o + stage16,
                            kstep_bytes(kk, RW, EB) >> 4, kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(sct);
    fence_regs(dpt);
    fence_regs(dk);
    fence_regs(dv);

    // P g and dS g scale as the A operands of the products below; the direct score sums
    // du.  Accumulator element 4 i + cc: key g + 8 (cc >> 1), row 8 i + 2 tq + (cc & 1) of
    // the chunk; the metadata of a thread's two rows of block i are adjacent (one 8-byte
    // load each).
    uint32_t pf[RW / 16][4], dsf[RW / 16][4];
    // kAllPairs: the block is kAll; kPool (with kAllPairs): its keys are pool keys (else
    // window / allowed keys, gate 1: no gate and no score-gradient term to compute).
    auto elementwise = [&](auto all_pairs, auto pool_keys) {
      constexpr bool kAllPairs = decltype(all_pairs)::value;
      constexpr bool kPool = decltype(pool_keys)::value;
#pragma unroll
      for (int i = 0; i < RW / 8; ++i) {
        const int m = c * RW + i * 8 + tq * 2;
        const float2 tau2 = *reinterpret_cast<const float2*>(s_tau + m);
        const float2 lse2 = *reinterpret_cast<const float2*>(s_lse2 + m);
        const float2 delta2 = *reinterpret_cast<const float2*>(s_delta + m);
        int2 plo2, wlo2, whi2, rb2;
        if constexpr (!kAllPairs) {
          plo2 = *reinterpret_cast<const int2*>(s_plo + m);
          wlo2 = *reinterpret_cast<const int2*>(s_wlo + m);
          whi2 = *reinterpret_cast<const int2*>(s_whi + m);
          rb2 = *reinterpret_cast<const int2*>(s_rb + m);
        }
        float pv[4], ds[4];
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const int h = cc >> 1;
          const bool y = cc & 1;  // the second of the two rows
          const float tau = y ? tau2.y : tau2.x;
          float gate;
          bool att;
          if constexpr (kAllPairs) {  // attends()'s gate, without its tests
            att = true;
            gate = kPool ? gate_of(ku[h], tau) : 1.f;
          } else {
            const RowInfo ri{y ? plo2.y : plo2.x, y ? wlo2.y : wlo2.x, y ? whi2.y : whi2.x,
                             y ? rb2.y : rb2.x, tau};
            att = kj[h] >= 0 && attends(rule, interior, ri, kj[h], krank[h], ku[h], gate);
          }
          float pr, term;
          const bool pool = kAllPairs ? kPool : rule == KeyRule::kPoolSelected;
          if (pair_backward(att, pool, gate, sct[4 * i + cc], dpt[4 * i + cc],
                            y ? lse2.y : lse2.x, y ? delta2.y : delta2.x, p.scale_log2,
                            b.scale, pr, ds[cc], term))
            du[h] += term;
          pv[cc] = pr * gate;
        }
        pf[i >> 1][(i & 1) * 2 + 0] = Mma<T>::pack(pv[0], pv[1]);
        pf[i >> 1][(i & 1) * 2 + 1] = Mma<T>::pack(pv[2], pv[3]);
        dsf[i >> 1][(i & 1) * 2 + 0] = Mma<T>::pack(ds[0], ds[1]);
        dsf[i >> 1][(i & 1) * 2 + 1] = Mma<T>::pack(ds[2], ds[3]);
      }
    };
    if (mode != BlockMode::kAll)  // (a kSkip warp's rule attends nothing: zeros)
      elementwise(std::false_type{}, std::false_type{});
    else if (rule == KeyRule::kPoolSelected)
      elementwise(std::true_type{}, std::true_type{});
    else
      elementwise(std::true_type{}, std::false_type{});

    // dV += (P g)^T dO, dK += (dS g scale)^T Q over the chunk's rows (B MN-major: 16 rows
    // of 128 bytes per k-step)
    fence_regs(dk);
    fence_regs(dv);
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < RW / 16; ++kc)
      WgmmaRSLo<T, D>::run(dv, pf[kc], desc_ot + stage16, (kc * 16 * 64 * EB) >> 4);
#pragma unroll
    for (int kc = 0; kc < RW / 16; ++kc)
      WgmmaRSLo<T, D>::run(dk, dsf[kc], desc_qt + stage16, (kc * 16 * 64 * EB) >> 4);
    wgmma_commit();
    fence_regs(dk);
    fence_regs(dv);
  }
  wgmma_wait<0>();
  fence_regs(dk);
  fence_regs(dv);

  // ---- this key tile's partials -> its slots ----------------------------------------------
  const int slot0 = t < ks.tilesA ? t * BK : kp.list_slots + (t - ks.tilesA) * BK;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    du[h] += __shfl_xor_sync(0xffffffffu, du[h], 1);
    du[h] += __shfl_xor_sync(0xffffffffu, du[h], 2);
    if (kj[h] < 0) continue;
    const int e = wg * 64 + (cw & 3) * 16 + g + 8 * h;
    const size_t slot = ((size_t)group * p.ntiles + tile) * kp.slots + slot0 + e;
    float* dst = kp.part_kv + slot * 2 * D;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int d = i * 8 + tq * 2;
      *reinterpret_cast<float2*>(dst + d) = make_float2(dk[4 * i + 2 * h], dk[4 * i + 2 * h + 1]);
      *reinterpret_cast<float2*>(dst + D + d) =
          make_float2(dv[4 * i + 2 * h], dv[4 * i + 2 * h + 1]);
    }
    if (tq == 0) kp.part_u[slot] = du[h];
  }
#else
  __trap();  // built without sm_90a code: run_bwd_dkv_sm90 is never called then
#endif
}

// The grid covers the longest key streams a super-tile can have: its list (at most
// list_slots keys) and its window span (at most slots - list_slots keys).
template <typename T, int D>
cudaError_t run_bwd_dkv_sm90(const BwdDkvParams& kp, cudaStream_t stream) {
  using Tr = BwdDkvSm90Traits<T, D>;
  auto kernel = bwd_dkv_sm90_kernel<T, D>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmem);
  if (err != cudaSuccess) return err;
  const FwdParams& f = kp.b.f;
  const int tiles_k = (kp.list_slots + Tr::kBK - 1) / Tr::kBK +
                      (kp.slots - kp.list_slots + Tr::kBK - 1) / Tr::kBK;
  if (tiles_k == 0 || f.ntiles == 0 || f.S == 0) return cudaSuccess;
  dim3 grid(tiles_k, f.ntiles, f.S * (f.R / f.RP));
  BwdDkvParams km = kp;
  km.b = with_row_maps<T, D>(kp.b, Tr::kRows);
  kernel<<<grid, Tr::kThreads, Tr::kSmem, stream>>>(km);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace xsk
