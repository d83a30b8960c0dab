// One single-token decode step of SparseKCache (xformers_sparsek/cache.py,
// docs/decoding.md), fused into three kernels instead of ~100 small PyTorch ones:
//
//   decode_update   one CTA per (sequence, KV head): the ring update, the top-set update,
//                   the insertion into the sorted pool scores, the threshold solve and the
//                   pruning, all in shared memory (the PyTorch step's exact algorithm);
//   decode_attend   (sequence, KV head, split) CTAs: the gated attention of the R query rows
//                   of the KV head over one slice of the window + top-set slots, on tensor
//                   cores with a cp.async pipeline per warp (as many splits as fill the GPU
//                   in one wave: decode_attend_slots_per_split);
//   decode_combine  merges the splits in a fixed order (deterministic; skipped when one
//                   split covers the slots).
//
// The state layout is SparseKCache's: K/V of window and top set in one [B, G, W + K, D]
// buffer per tensor (ring slot = pos % W first), float64 scores, int64 positions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "launch.h"
#include "mma.cuh"

namespace xsk {
namespace {

constexpr int kUpdateThreads = 512;
constexpr int kAttendWarps = 4;
constexpr int kMaxRows = 16;  // query heads per KV head handled by decode_attend (one m16 tile)

// Block-wide exclusive scan of one double per thread (kUpdateThreads threads); returns the
// thread's exclusive prefix. `tmp` holds kUpdateThreads / 32 doubles.
__device__ double block_exclusive_scan(double x, double* tmp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double inc = x;
  for (int o = 1; o < 32; o <<= 1) {
    double y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) tmp[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    double t = lane < kUpdateThreads / 32 ? tmp[lane] : 0.0;
    double ti = t;
    for (int o = 1; o < 32; o <<= 1) {
      double y = __shfl_up_sync(0xffffffffu, ti, o);
      if (lane >= o) ti += y;
    }
    if (lane < kUpdateThreads / 32) tmp[lane] = ti - t;  // exclusive per warp
  }
  __syncthreads();
  double r = tmp[warp] + inc - x;
  __syncthreads();
  return r;
}

// Block-wide reduction of the breakpoint statistics of the threshold solve.
struct SolveStats {
  double t_a, f_a, t_b, f_b;  // max b / min f over f >= k; min b / max f over f <= k
};

__device__ SolveStats block_reduce(SolveStats s, SolveStats* tmp) {
  for (int o = 16; o > 0; o >>= 1) {
    s.t_a = fmax(s.t_a, __shfl_xor_sync(0xffffffffu, s.t_a, o));
    s.f_a = fmin(s.f_a, __shfl_xor_sync(0xffffffffu, s.f_a, o));
    s.t_b = fmin(s.t_b, __shfl_xor_sync(0xffffffffu, s.t_b, o));
    s.f_b = fmax(s.f_b, __shfl_xor_sync(0xffffffffu, s.f_b, o));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) tmp[warp] = s;
  __syncthreads();
  SolveStats r = tmp[0];
  for (int w = 1; w < kUpdateThreads / 32; ++w) {
    r.t_a = fmax(r.t_a, tmp[w].t_a);
    r.f_a = fmin(r.f_a, tmp[w].f_a);
    r.t_b = fmin(r.t_b, tmp[w].t_b);
    r.f_b = fmax(r.f_b, tmp[w].f_b);
  }
  __syncthreads();
  return r;
}

// The smallest top-set key by (score, position, slot): the one a better entering key evicts.
struct TopMin {
  double u;
  int64_t pos;
  int slot;
};

__device__ __forceinline__ bool less(const TopMin& a, const TopMin& b) {
  if (a.u != b.u) return a.u < b.u;
  if (a.pos != b.pos) return a.pos < b.pos;
  return a.slot < b.slot;
}

__device__ TopMin block_argmin(TopMin m, TopMin* tmp) {
  for (int o = 16; o > 0; o >>= 1) {
    TopMin y{__shfl_xor_sync(0xffffffffu, m.u, o),
             (int64_t)__shfl_xor_sync(0xffffffffu, (long long)m.pos, o),
             __shfl_xor_sync(0xffffffffu, m.slot, o)};
    if (less(y, m)) m = y;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) tmp[warp] = m;
  __syncthreads();
  TopMin r = tmp[0];
  for (int w = 1; w < kUpdateThreads / 32; ++w)
    if (less(tmp[w], r)) r = tmp[w];
  __syncthreads();
  return r;
}

// Copy `bytes` (a multiple of 16) from src to dst with the whole block.
__device__ __forceinline__ void block_copy16(void* dst, const void* src, int bytes) {
  for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x)
    reinterpret_cast<int4*>(dst)[i] = reinterpret_cast<const int4*>(src)[i];
}

// #{i < n : w[i] < x} (kUpper false) or #{i < n : w[i] <= x} (kUpper true) of an
// ascending array, known to be >= start: galloping search from start (the callers' answers
// move right in small steps, and a plain walk could cross the whole array).
template <bool kUpper>
__device__ __forceinline__ int count_below(const double* w, int n, int start, double x) {
  auto before = [&](int i) { return kUpper ? w[i] <= x : w[i] < x; };
  int lo = start, hi = start, step = 1;
  while (hi < n && before(hi)) lo = hi + 1, hi += step, step <<= 1;
  if (hi > n) hi = n;
  while (lo < hi) {  // answer in [lo, hi]
    const int mid = (lo + hi) >> 1;
    if (before(mid)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ------------------------------------------------------------------------------------------
// decode_update: one CTA per (b, g). Mirrors SparseKCache._decode_tensors + _insert_rows +
// _solve_and_prune + _tau_sorted (see there for why each step is exact).
__global__ void __launch_bounds__(kUpdateThreads) decode_update_kernel(DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int bg = blockIdx.x, b = bg / p.G;
  const int W = p.W, K = p.K, N = p.N, S = W + K;
  const int n = N + 1;  // the pool array with one extra slot in front
  double* wa = reinterpret_cast<double*>(smem_raw);  // [n + 1]: the old array, later P
  double* wb = wa + (n + 1);                        // [n + 1]: the new array
  unsigned char* stage_k = reinterpret_cast<unsigned char*>(wb + (n + 1));  // entering K row
  unsigned char* stage_v = stage_k + p.k_row_bytes;                         // entering V row
  __shared__ double scan_tmp[kUpdateThreads / 32];
  __shared__ SolveStats stats_tmp[kUpdateThreads / 32];
  __shared__ TopMin min_tmp[kUpdateThreads / 32];
  __shared__ int shared_c;

  const bool vb = p.valid == nullptr || p.valid[b];
  const int64_t L = p.lens[b];
  if (bg % p.G == 0 && threadIdx.x == 0) p.lens_next[b] = L + (vb ? 1 : 0);
  if (!vb) return;  // padding row: nothing is appended

  unsigned char* kbase = static_cast<unsigned char*>(p.kv_k) + (size_t)bg * S * p.k_row_bytes;
  unsigned char* vbase = static_cast<unsigned char*>(p.kv_v) + (size_t)bg * S * p.v_row_bytes;
  const unsigned char* k_new = static_cast<const unsigned char*>(p.k_new) + (size_t)bg * p.k_row_bytes;
  const unsigned char* v_new = static_cast<const unsigned char*>(p.v_new) + (size_t)bg * p.v_row_bytes;
  const double u_new = p.u_new[bg];

  // 1. The key entering the pool: with a window, the one leaving the ring (its slot takes
  //    the new token); without, the new token itself.
  bool ent;
  int64_t epos;
  double eu;
  if (W == 0) {
    block_copy16(stage_k, k_new, p.k_row_bytes);
    block_copy16(stage_v, v_new, p.v_row_bytes);
    ent = true, epos = L, eu = u_new;
  } else {
    const int slot = (int)(L % W);
    block_copy16(stage_k, kbase + (size_t)slot * p.k_row_bytes, p.k_row_bytes);
    block_copy16(stage_v, vbase + (size_t)slot * p.v_row_bytes, p.v_row_bytes);
    eu = p.win_u[(size_t)bg * W + slot];
    ent = L >= W, epos = L - W;
    __syncthreads();  // the old row is staged before the new token overwrites it
    block_copy16(kbase + (size_t)slot * p.k_row_bytes, k_new, p.k_row_bytes);
    block_copy16(vbase + (size_t)slot * p.v_row_bytes, v_new, p.v_row_bytes);
    if (threadIdx.x == 0) p.win_u[(size_t)bg * W + slot] = u_new;
  }
  if (!ent) return;
  const int64_t n_pool = L + 1 - W > 0 ? L + 1 - W : 0;  // including the entering key
  const bool filling = n_pool <= K;                      // every pool key is selected
  const double tmin_old = p.tau_min[bg];
  const bool ins = eu >= tmin_old;  // the pool scores gain eu
  const bool need = !filling && ins;  // tau must be solved again
  if (!ins && !filling) return;  // (fact 4: the key changes nothing)
  __syncthreads();  // the staged row is complete

  // 2. The top set: filling rows take the next free slot; full rows replace the smallest
  //    key by (u, pos) if eu is at least its score (the entering key, the most recent, wins
  //    ties).
  double* top_u = p.top_u + (size_t)bg * K;
  int64_t* top_pos = p.top_pos + (size_t)bg * K;
  int tslot;
  bool put;
  if (filling) {
    tslot = (int)(n_pool - 1 < K - 1 ? n_pool - 1 : K - 1);
    put = true;
  } else {
    TopMin m{INFINITY, INT64_MAX, INT32_MAX};
#pragma unroll 4
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
      TopMin c{top_u[i], top_pos[i], i};
      if (less(c, m)) m = c;
    }
    m = block_argmin(m, min_tmp);
    tslot = m.slot;
    put = eu >= m.u;
  }
  if (put) {
    block_copy16(kbase + (size_t)(W + tslot) * p.k_row_bytes, stage_k, p.k_row_bytes);
    block_copy16(vbase + (size_t)(W + tslot) * p.v_row_bytes, stage_v, p.v_row_bytes);
    if (threadIdx.x == 0) top_u[tslot] = eu, top_pos[tslot] = epos;
  }
  if (!ins) return;

  // 3. Insert eu into the ascending pool scores, one slot longer in front (wa[0] = -inf).
  double* pool = p.pool_u + (size_t)bg * N;
  // (four loads in flight per thread: this copy is on the step's critical path)
  for (int i0 = threadIdx.x; i0 < n; i0 += 4 * kUpdateThreads) {
    double x[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int i = i0 + t * kUpdateThreads;
      x[t] = i == 0 || i >= n ? -INFINITY : pool[i - 1];
    }
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (i0 + t * kUpdateThreads < n) wa[i0 + t * kUpdateThreads] = x[t];
  }
  __syncthreads();
  if (threadIdx.x == 0) shared_c = count_below<false>(wa, n, 0, eu);  // >= 1: eu is finite
  __syncthreads();
  const int c = shared_c;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    wb[i] = i < c - 1 ? wa[i + 1] : (i == c - 1 ? eu : wa[i]);
  __syncthreads();

  double tmin = tmin_old;
  if (need) {
    // 4. Threshold solve (cache._tau_sorted): f(t) = sum clip(w - t, 0, 1) at every
    //    breakpoint {w_j} U {w_j - 1} from prefix sums P of the real scores.
    const int per = (n + kUpdateThreads - 1) / kUpdateThreads;
    const int j0 = min(n, (int)threadIdx.x * per), j1 = min(n, j0 + per);
    double local = 0.0;
    for (int j = j0; j < j1; ++j) local += wb[j] > -INFINITY ? wb[j] : 0.0;
    double run = block_exclusive_scan(local, scan_tmp);
    double* P = wa;  // [n + 1]: P[j] = sum of the real w[0 .. j)
    for (int j = j0; j < j1; ++j) {
      P[j] = run;
      run += wb[j] > -INFINITY ? wb[j] : 0.0;
    }
    if (j1 == n && j0 < j1) P[n] = run;
    __syncthreads();
    const double k = (double)K;
    SolveStats st{-INFINITY, INFINITY, INFINITY, -INFINITY};
    // Each thread walks its own index range; the search positions only move right as j
    // grows (w ascending), so one binary search per thread and then a merge-like walk.
    // (padding breakpoints lie below every real one: skipped; every count starts at the
    // first real score r0, since all padding lies below any finite bound)
    const int r0 = count_below<true>(wb, n, 0, -INFINITY);
    int hi = r0, lo = r0;
    for (int j = max(j0, r0); j < j1; ++j) {
      const double wj = wb[j];
      const double b1 = wj + 1.0;
      hi = count_below<false>(wb, n, hi, b1);
      const double f1 = (double)(n - hi) + (P[hi] - P[j + 1]) - (double)(hi - (j + 1)) * wj;
      const double b2 = wj - 1.0;
      lo = count_below<true>(wb, n, lo, b2);
      const double f2 = (double)(n - j) + (P[j] - P[lo]) - (double)(j - lo) * b2;
      if (f1 >= k) st.t_a = fmax(st.t_a, wj), st.f_a = fmin(st.f_a, f1);
      if (f1 <= k) st.t_b = fmin(st.t_b, wj), st.f_b = fmax(st.f_b, f1);
      if (f2 >= k) st.t_a = fmax(st.t_a, b2), st.f_a = fmin(st.f_a, f2);
      if (f2 <= k) st.t_b = fmin(st.t_b, b2), st.f_b = fmax(st.f_b, f2);
    }
    st = block_reduce(st, stats_tmp);
    const bool inside = st.t_a < st.t_b;  // then f_a > k > f_b: tau inside (t_a, t_b)
    const double den = inside ? st.f_a - st.f_b : 1.0;
    double tau = inside ? st.t_a + (st.f_a - k) * (st.t_b - st.t_a) / den : st.t_b;
    const double u_k = wb[n - K], u_k1 = wb[n - K - 1];
    const bool flat = u_k - 1.0 >= u_k1;  // f == k on a whole interval: take its midpoint
    if (flat) tau = 0.5 * (u_k1 + u_k - 1.0);
    tmin = flat ? u_k1 : tau;
    if (threadIdx.x == 0) p.tau[bg] = tau, p.tau_min[bg] = tmin;
  }

  // 5. Prune to u >= tau_min (the array stays ascending), drop the front slot (counted if
  //    a finite score is lost there: capacity overflow) and store.
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const double x = wb[i + 1];
    pool[i] = x >= tmin ? x : -INFINITY;
  }
  if (threadIdx.x == 0 && wb[0] >= tmin && wb[0] > -INFINITY) p.overflow[bg] += 1;
}

// ------------------------------------------------------------------------------------------
// decode_attend: the R <= 16 query rows of KV head (b, g) over the slots [s0, s1) of its
// window + top set, as a small FlashAttention forward on mma.sync: the R rows padded to one
// m16 tile, 16-slot tiles, logits q.k * scale * gate, online softmax over every valid slot,
// weights p * gate (DESIGN.md section 1; gate 1 in the ring, clip(u - tau, 0, 1) in the top
// set). Each warp streams every kAttendWarps-th tile of the split through its own
// kAttendStages-deep cp.async ring (no block barriers in the loop: loads of the next tiles
// are in flight while the current one is computed; the step is bandwidth-bound). The warps'
// results are merged in warp order (deterministic); with one split the CTA writes the
// output, otherwise the split's partial (decode_combine merges them).
constexpr int kAttendTile = 16;    // slots per tile: one k-step of the P V product
constexpr int kAttendStages = 3;   // tiles per warp in flight or being computed
constexpr size_t kSmemReservedPerCta = 1024;  // shared memory the driver keeps per CTA

template <int D>
constexpr size_t attend_stage_bytes() {  // K and V tiles, then the tile's float64 scores
  return 2 * (size_t)kAttendTile * D * 2 + kAttendTile * sizeof(double);
}
template <int D>
constexpr size_t attend_smem_bytes() {
  return (size_t)kAttendWarps * kAttendStages * attend_stage_bytes<D>();
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttendWarps * 32) decode_attend_kernel(DecodeParams p) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per K/V row
  extern __shared__ __align__(16) unsigned char smem[];
  const int bg = blockIdx.x, split = blockIdx.y, b = bg / p.G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int W = p.W, K = p.K, S = W + K, R = p.R;
  const bool direct = p.splits == 1;  // write the output here (no decode_combine)
  const bool vb = p.valid == nullptr || p.valid[b];
  if (!vb) {  // a row that does not append: output 0 (decode_combine writes it otherwise)
    if (direct)
      for (int i = threadIdx.x; i < R * D; i += blockDim.x)
        static_cast<T*>(p.out)[(size_t)bg * R * D + i] = static_cast<T>(0.f);
    return;
  }
  const int64_t L = p.lens_next[b];
  const int64_t n_pool = L - W > 0 ? L - W : 0;
  const int n_ring = (int)(L < W ? L : W), n_top = (int)(n_pool < K ? n_pool : K);
  const double tau = p.tau[bg];
  const int s0 = split * p.slots_per_split, s1 = min(S, s0 + p.slots_per_split);
  const int n_tiles = (s1 - s0 + kAttendTile - 1) / kAttendTile;
  const int n_mine = n_tiles > warp ? (n_tiles - warp + kAttendWarps - 1) / kAttendWarps : 0;
  auto slot_ok = [&](int i) { return i < s1 && (i < W ? i < n_ring : i - W < n_top); };

  // This warp's stages.
  unsigned char* wsm = smem + (size_t)warp * kAttendStages * attend_stage_bytes<D>();
  auto stage_k = [&](int st) { return reinterpret_cast<T*>(wsm + st * attend_stage_bytes<D>()); };
  auto stage_v = [&](int st) { return stage_k(st) + kAttendTile * D; };
  auto stage_u = [&](int st) { return reinterpret_cast<double*>(stage_v(st) + kAttendTile * D); };
  const T* kbase = static_cast<const T*>(p.kv_k) + (size_t)bg * S * D;
  const T* vbase = static_cast<const T*>(p.kv_v) + (size_t)bg * S * D;
  const double* ubase = p.top_u + (size_t)bg * K;
  auto load_tile = [&](int it) {  // this warp's it-th tile into stage it % kAttendStages
    const int st = it % kAttendStages, first = s0 + (warp + it * kAttendWarps) * kAttendTile;
    T* sk = stage_k(st);
    T* sv = stage_v(st);
#pragma unroll
    for (int c = lane; c < kAttendTile * kChunks; c += 32) {
      const int row = c / kChunks, chunk = c % kChunks, i = first + row;
      const bool ok = slot_ok(i);  // invalid slots are zero-filled (0 * garbage may be NaN)
      const size_t off = (size_t)(ok ? i : 0) * D + chunk * 8;
      cp_async16(sk + swz<D>(row, chunk), kbase + off, ok);
      cp_async16(sv + swz<D>(row, chunk), vbase + off, ok);
    }
    if (lane < kAttendTile) {
      const int i = first + lane;
      const bool top = i >= W && slot_ok(i);
      const int n = top ? 8 : 0;
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_addr(stage_u(st) + lane)),
                   "l"(ubase + (top ? i - W : 0)), "r"(n));
    }
  };

  // The query rows as A fragments (rows >= R are zero).
  const T* qb = static_cast<const T*>(p.q) + (size_t)bg * R * D;
  const int r_lo = lane >> 2, r_hi = r_lo + 8;
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + (lane & 3) * 2;
    auto q2 = [&](int r, int col) {
      return r < R ? *reinterpret_cast<const uint32_t*>(qb + r * D + col) : 0u;
    };
    qa[kk][0] = q2(r_lo, c), qa[kk][1] = q2(r_hi, c);
    qa[kk][2] = q2(r_lo, c + 8), qa[kk][3] = q2(r_hi, c + 8);
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int c = 0; c < 4; ++c) o[n][c] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * 1.4426950408889634f;

#pragma unroll
  for (int it = 0; it < kAttendStages - 1; ++it) {
    if (it < n_mine) load_tile(it);
    cp_async_commit();
  }
  for (int it = 0; it < n_mine; ++it) {
    if (it + kAttendStages - 1 < n_mine) load_tile(it + kAttendStages - 1);
    cp_async_commit();
    cp_async_wait<kAttendStages - 1>();  // tile `it` has landed (this lane's copies)
    __syncwarp();                        // ... and every lane's
    const int st = it % kAttendStages, first = s0 + (warp + it * kAttendWarps) * kAttendTile;
    const T* sk = stage_k(st);
    const T* sv = stage_v(st);
    const double* su = stage_u(st);
    const int mi = lane >> 3;

    // S = Q K^T: 16 rows x 16 slots.
    float s[2][4] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kb[4];
      ldmatrix_x4(kb, sk + swz<D>((mi >> 1) * 8 + (lane & 7), kk * 2 + (mi & 1)));
      Mma<T>::run(s[0], qa[kk], kb[0], kb[1]);
      Mma<T>::run(s[1], qa[kk], kb[2], kb[3]);
    }
    // Gates (as cache._attend: the float64 gate rounded to float32), masks, online softmax.
    float gate[2][2], tmax[2] = {-INFINITY, -INFINITY};
    bool ok[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = n * 8 + (lane & 3) * 2 + c, i = first + col;
        ok[n][c] = slot_ok(i);
        gate[n][c] = i < W ? 1.f : (float)fmin(fmax(su[col] - tau, 0.0), 1.0);
      }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float v = ok[n][c & 1] ? s[n][c] * (scale_log2 * gate[n][c & 1]) : -INFINITY;
        s[n][c] = v;
        tmax[c >> 1] = fmaxf(tmax[c >> 1], v);
      }
    float rescale[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      tmax[x] = fmaxf(tmax[x], __shfl_xor_sync(0xffffffffu, tmax[x], 1));
      tmax[x] = fmaxf(tmax[x], __shfl_xor_sync(0xffffffffu, tmax[x], 2));
      const float m = fmaxf(row_max[x], tmax[x]);
      rescale[x] = m == -INFINITY ? 1.f : exp2f(row_max[x] - m);
      row_max[x] = m;
      row_sum[x] *= rescale[x];
    }
    uint32_t pa[4];  // (P * gate) as the A fragment of the P V product
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      float pe[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float m = row_max[c >> 1] == -INFINITY ? 0.f : row_max[c >> 1];
        pe[c] = exp2f(s[n][c] - m);  // masked slots: exp2(-inf) = 0
        row_sum[c >> 1] += pe[c];    // the softmax denominator counts gated slots in full
        pe[c] *= gate[n][c & 1];
      }
      pa[n * 2 + 0] = Mma<T>::pack(pe[0], pe[1]);
      pa[n * 2 + 1] = Mma<T>::pack(pe[2], pe[3]);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= rescale[0], o[n][1] *= rescale[0];
      o[n][2] *= rescale[1], o[n][3] *= rescale[1];
    }
#pragma unroll
    for (int n2 = 0; n2 < D / 16; ++n2) {
      uint32_t vbf[4];
      ldmatrix_x4_trans(vbf, sv + swz<D>((mi & 1) * 8 + (lane & 7), n2 * 2 + (mi >> 1)));
      Mma<T>::run(o[2 * n2], pa, vbf[0], vbf[1]);
      Mma<T>::run(o[2 * n2 + 1], pa, vbf[2], vbf[3]);
    }
    __syncwarp();  // every lane is done with stage st before it is refilled
  }
  cp_async_wait<0>();
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 1);
    row_sum[x] += __shfl_xor_sync(0xffffffffu, row_sum[x], 2);
  }

  // Merge the warps in warp order through shared memory (the stages are free now).
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);         // [warps][16][D]
  float* sm_ = so + kAttendWarps * 16 * D;            // [warps][16] running max (log2)
  float* sl = sm_ + kAttendWarps * 16;                // [warps][16] sums
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int r = (c >> 1) ? r_hi : r_lo, d = n * 8 + (lane & 3) * 2 + (c & 1);
      so[(warp * 16 + r) * D + d] = o[n][c];
    }
  if ((lane & 3) == 0) {
    sm_[warp * 16 + r_lo] = row_max[0], sm_[warp * 16 + r_hi] = row_max[1];
    sl[warp * 16 + r_lo] = row_sum[0], sl[warp * 16 + r_hi] = row_sum[1];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < R * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttendWarps; ++w) mm = fmaxf(mm, sm_[w * 16 + r]);
    float ll = 0.f, aa = 0.f;
#pragma unroll
    for (int w = 0; w < kAttendWarps; ++w) {
      const float mw = sm_[w * 16 + r], f = mw == -INFINITY ? 0.f : exp2f(mw - mm);
      ll += sl[w * 16 + r] * f;
      aa += so[(w * 16 + r) * D + d] * f;
    }
    if (direct) {
      static_cast<T*>(p.out)[(size_t)bg * R * D + idx] = static_cast<T>(aa / fmaxf(ll, FLT_MIN));
    } else {
      const size_t part = ((size_t)bg * p.splits + split) * R + r;
      p.part_o[part * D + d] = aa;
      if (d == 0) p.part_m[part] = mm, p.part_l[part] = ll;
    }
  }
}

// decode_combine: out[b, g, r, :] from the splits' partials (max in log2 units), in split
// order.
template <typename T>
__global__ void decode_combine_kernel(DecodeParams p, int D) {
  const int bg = blockIdx.x, b = bg / p.G, R = p.R;
  const bool vb = p.valid == nullptr || p.valid[b];
  T* out = static_cast<T*>(p.out) + (size_t)bg * R * D;
  for (int idx = threadIdx.x; idx < R * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    float val = 0.f;
    if (vb) {
      float mm = -INFINITY;
      for (int s = 0; s < p.splits; ++s) mm = fmaxf(mm, p.part_m[((size_t)bg * p.splits + s) * R + r]);
      float ll = 0.f, aa = 0.f;
      for (int s = 0; s < p.splits; ++s) {
        const size_t part = ((size_t)bg * p.splits + s) * R + r;
        const float f = p.part_m[part] == -INFINITY ? 0.f : exp2f(p.part_m[part] - mm);
        ll += p.part_l[part] * f;
        aa += p.part_o[part * D + d] * f;
      }
      val = aa / fmaxf(ll, FLT_MIN);
    }
    out[idx] = static_cast<T>(val);
  }
}

template <typename T, int D>
cudaError_t launch_attend(const DecodeParams& p, cudaStream_t stream) {
  constexpr size_t smem = attend_smem_bytes<D>();
  cudaError_t err = cudaFuncSetAttribute(decode_attend_kernel<T, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  decode_attend_kernel<T, D><<<dim3(p.B * p.G, p.splits), kAttendWarps * 32, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess || p.splits == 1) return err;
  decode_combine_kernel<T><<<p.B * p.G, 128, 0, stream>>>(p, D);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_attend(const DecodeParams& p, int D, cudaStream_t stream) {
  if (D == 64) return launch_attend<T, 64>(p, stream);
  if (D == 128) return launch_attend<T, 128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

int decode_attend_slots_per_split(int BG, int S, int head_dim, int num_sms, size_t smem_per_sm) {
  // As many splits as fill the GPU in one wave of resident CTAs, but at least one tile per warp.
  const size_t smem = head_dim == 64 ? attend_smem_bytes<64>() : attend_smem_bytes<128>();
  const int per_sm = std::max(1, (int)(smem_per_sm / (smem + kSmemReservedPerCta)));
  const int min_slots = kAttendTile * kAttendWarps;
  const int max_splits = std::max(1, (S + min_slots - 1) / min_slots);
  const int splits = std::min(max_splits, std::max(1, num_sms * per_sm / std::max(1, BG)));
  const int per = (S + splits - 1) / splits;
  return (per + kAttendTile - 1) / kAttendTile * kAttendTile;
}

size_t decode_update_smem_bytes(int N, int k_row_bytes, int v_row_bytes) {
  return 2 * (size_t)(N + 2) * sizeof(double) + k_row_bytes + v_row_bytes;
}

int decode_max_rows() { return kMaxRows; }

cudaError_t launch_decode(const DecodeParams& p, int dtype, int head_dim, cudaStream_t stream) {
  if (p.R < 1 || p.R > kMaxRows || (head_dim != 64 && head_dim != 128)) return cudaErrorInvalidValue;
  const size_t smem = decode_update_smem_bytes(p.N, p.k_row_bytes, p.v_row_bytes);
  cudaError_t err = cudaFuncSetAttribute(decode_update_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  decode_update_kernel<<<p.B * p.G, kUpdateThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return dtype == 0 ? launch_attend<__half>(p, head_dim, stream)
                    : launch_attend<__nv_bfloat16>(p, head_dim, stream);
}

}  // namespace xsk
