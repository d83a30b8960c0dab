// One single-token decode step of SparseKCache (xformers_sparsek/cache.py,
// docs/decoding.md), fused into three kernels instead of ~100 small PyTorch ones:
//
//   decode_update   one CTA per (sequence, KV head): the ring update, the top-set update,
//                   the insertion into the sorted pool scores, the threshold solve and the
//                   pruning, all in shared memory (the PyTorch step's exact algorithm);
//   decode_attend   (sequence, KV head, split) CTAs: the gated attention of the R query rows
//                   of the KV head over one 256-slot slice of the window + top-set slots
//                   (fp32; the split's softmax statistics go to the merge; no atomics);
//   decode_combine  merges the splits in a fixed order (deterministic).
//
// The state layout is SparseKCache's: K/V of window and top set in one [B, G, W + K, D]
// buffer per tensor (ring slot = pos % W first), float64 scores, int64 positions.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>

#include "launch.h"

namespace xsk {
namespace {

constexpr int kUpdateThreads = 512;
constexpr int kAttendWarps = 4;
constexpr int kMaxRows = 16;  // query heads per KV head handled by decode_attend

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
// decode_attend: the R query rows of KV head (b, g) over the slots [s0, s1) of its window +
// top set. Logits q.k * scale * gate, softmax over every valid slot, weights p * gate
// (DESIGN.md section 1); gate 1 in the ring, clip(u - tau, 0, 1) in the top set.
// Phase 1: the logits of every slot (8 lanes per slot, 4 slots per warp at a time) into
// shared memory; phase 2: each row's max and sum; phase 3: the weighted V sum (lanes over
// D, each warp a quarter of the slots), merged over the warps in a fixed order.
template <typename T>
struct Vec;  // conversions of packed pairs to float2
template <>
struct Vec<__half> {
  static __device__ __forceinline__ float2 two(const __half* p) { return __half22float2(*reinterpret_cast<const __half2*>(p)); }
  static __device__ __forceinline__ float2 two(uint32_t x) { return __half22float2(*reinterpret_cast<const __half2*>(&x)); }
};
template <>
struct Vec<__nv_bfloat16> {
  static __device__ __forceinline__ float2 two(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  static __device__ __forceinline__ float2 two(uint32_t x) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
  }
};

template <typename T, int D>
__global__ void __launch_bounds__(kAttendWarps * 32) decode_attend_kernel(DecodeParams p) {
  constexpr int kLanesPerSlot = 8, kSlotsPerWarp = 32 / kLanesPerSlot;
  constexpr int kChunk = D / kLanesPerSlot;  // K elements per lane in phase 1 (8 or 16)
  constexpr int EPL = D / 32;                // V elements per lane in phase 3 (2 or 4)
  extern __shared__ float sm[];
  const int bg = blockIdx.x, split = blockIdx.y, b = bg / p.G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int W = p.W, K = p.K, S = W + K, R = p.R, span = p.slots_per_split;
  float* sq = sm;                    // [R][D] the query rows
  float* sp = sq + R * D;            // [R][span] logits, then weights p * gate
  float* sgate = sp + R * span;      // [span]
  float* sstat = sgate + span;       // [R][2] max, sum
  float* sacc = sstat + 2 * R;       // [R][D] the merged V sums
  const bool vb = p.valid == nullptr || p.valid[b];
  if (!vb) return;  // decode_combine writes zeros
  const int64_t L = p.lens_next[b];
  const int64_t n_pool = L - W > 0 ? L - W : 0;
  const int n_ring = (int)(L < W ? L : W), n_top = (int)(n_pool < K ? n_pool : K);
  const double tau = p.tau[bg];
  const int s0 = split * span, n_here = min(S - s0, span);
  // slot i holds a key: ring slots written so far, top-set slots filled so far
  auto holds_key = [&](int i) { return i < W ? i < n_ring : i - W < n_top; };
  const T* qb = static_cast<const T*>(p.q) + (size_t)bg * R * D;
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) sq[i] = static_cast<float>(qb[i]);
  __syncthreads();

  // Phase 1: logits.
  const T* kb = static_cast<const T*>(p.kv_k) + (size_t)bg * S * D;
  const double* top_u = p.top_u + (size_t)bg * K;
  const int grp = lane / kLanesPerSlot, sub = lane % kLanesPerSlot;
  // (the loop bound is warp-uniform: the shuffles below need every lane)
  for (int base = warp * kSlotsPerWarp; base < n_here; base += 2 * kAttendWarps * kSlotsPerWarp) {
    const int j0 = base + grp;
    uint4 kr[2][kChunk / 8];
    bool ok[2];
    float gate[2];
#pragma unroll
    for (int t = 0; t < 2; ++t) {  // both slots' loads first
      const int j = j0 + t * kAttendWarps * kSlotsPerWarp, i = s0 + j;
      ok[t] = j < n_here && holds_key(i);
      // as cache._attend: the float64 gate rounded to float32
      gate[t] = !ok[t] || i < W ? 1.f : (float)fmin(fmax(top_u[i - W] - tau, 0.0), 1.0);
#pragma unroll
      for (int c = 0; c < kChunk / 8; ++c)
        kr[t][c] = ok[t] ? reinterpret_cast<const uint4*>(kb + (size_t)i * D + sub * kChunk)[c]
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int j = j0 + t * kAttendWarps * kSlotsPerWarp;
      float kx[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk / 8; ++c) {
        const uint32_t w4[4] = {kr[t][c].x, kr[t][c].y, kr[t][c].z, kr[t][c].w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          const float2 f = Vec<T>::two(w4[h]);
          kx[c * 8 + 2 * h] = f.x, kx[c * 8 + 2 * h + 1] = f.y;
        }
      }
      const float sg = p.scale * gate[t];  // the scale times the gate in float32, as there
      for (int r = 0; r < R; ++r) {
        const float* qr = sq + r * D + sub * kChunk;
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < kChunk; ++e) d += qr[e] * kx[e];
#pragma unroll
        for (int o = kLanesPerSlot / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (sub == 0 && j < n_here) sp[r * span + j] = ok[t] ? d * sg : -INFINITY;
      }
      if (sub == 0 && j < n_here) sgate[j] = ok[t] ? gate[t] : 0.f;
    }
  }
  __syncthreads();

  // Phase 2: per row, the max and the sum of exp over the valid slots; weights p * gate.
  for (int r = warp; r < R; r += kAttendWarps) {
    float* row = sp + r * span;
    float mx = -INFINITY;
    for (int j = lane; j < n_here; j += 32) mx = fmaxf(mx, row[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
    for (int j = lane; j < n_here; j += 32) {
      const float e = mx == -INFINITY ? 0.f : __expf(row[j] - mx);  // -inf logits give 0
      sum += e;
      row[j] = e * sgate[j];
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) sstat[2 * r] = mx, sstat[2 * r + 1] = sum;
  }
  __syncthreads();

  // Phase 3: acc[r] = sum_j p[r][j] v_j, each warp over every kAttendWarps-th slot.
  const T* vbuf = static_cast<const T*>(p.kv_v) + (size_t)bg * S * D;
  constexpr int kUnroll = 4;
  float acc[kMaxRows][EPL];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r)
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[r][e] = 0.f;
  for (int j0 = warp; j0 < n_here; j0 += kAttendWarps * kUnroll) {
    float vx[kUnroll][EPL];
    bool ok[kUnroll];
#pragma unroll
    for (int t = 0; t < kUnroll; ++t) {
      const int j = j0 + t * kAttendWarps, i = s0 + j;
      ok[t] = j < n_here && holds_key(i);
#pragma unroll
      for (int e = 0; e < EPL; e += 2) {
        const float2 f = ok[t] ? Vec<T>::two(vbuf + (size_t)i * D + lane * EPL + e) : make_float2(0.f, 0.f);
        vx[t][e] = f.x, vx[t][e + 1] = f.y;
      }
    }
#pragma unroll
    for (int t = 0; t < kUnroll; ++t) {
      if (!ok[t]) continue;
      const int j = j0 + t * kAttendWarps;
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r >= R) break;
        const float w = sp[r * span + j];
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[r][e] += w * vx[t][e];
      }
    }
  }
  // Merge the warps' sums in warp order (deterministic), then write the split's partial.
  for (int w = 0; w < kAttendWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        if (r >= R) break;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          float* dst = sacc + r * D + lane * EPL + e;
          *dst = w == 0 ? acc[r][e] : *dst + acc[r][e];
        }
      }
    }
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < R * D; idx += blockDim.x) {
    const int r = idx / D;
    const size_t part = ((size_t)bg * p.splits + split) * R + r;
    p.part_o[part * D + idx % D] = sacc[idx];
    if (idx % D == 0) p.part_m[part] = sstat[2 * r], p.part_l[part] = sstat[2 * r + 1];
  }
}

// decode_combine: out[b, g, r, :] from the splits' partials, in split order.
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
        const float f = p.part_m[part] == -INFINITY ? 0.f : __expf(p.part_m[part] - mm);
        ll += p.part_l[part] * f;
        aa += p.part_o[part * D + d] * f;
      }
      val = aa / fmaxf(ll, FLT_MIN);
    }
    out[idx] = static_cast<T>(val);
  }
}

template <typename T>
cudaError_t launch_attend(const DecodeParams& p, int D, cudaStream_t stream) {
  dim3 grid(p.B * p.G, p.splits);
  const size_t smem = ((size_t)2 * p.R * D + (size_t)(p.R + 1) * p.slots_per_split + 2 * p.R) * sizeof(float);
  if (D == 64) decode_attend_kernel<T, 64><<<grid, kAttendWarps * 32, smem, stream>>>(p);
  else if (D == 128) decode_attend_kernel<T, 128><<<grid, kAttendWarps * 32, smem, stream>>>(p);
  else return cudaErrorInvalidValue;
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  decode_combine_kernel<T><<<p.B * p.G, 128, 0, stream>>>(p, D);
  return cudaGetLastError();
}

}  // namespace

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
