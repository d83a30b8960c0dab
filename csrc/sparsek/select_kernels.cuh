// Device code of the selection stage (launched by select.cu).  Per (head s, query i): the
// capped-simplex threshold tau, the top-k boundary and |F| (a port of _selection.select):
// the first breakpoint piece m whose right end has f(right) <= k holds tau ("the predicate"
// P(m)); P(m) costs two wavelet range queries of nbits levels each.
//
// The time goes into chains of dependent global loads (one per wavelet level), so:
//   * every descent runs its chains together, level by level (both thresholds of a piece,
//     two pieces, the two k-th smallest queries): one load latency per level, not one per
//     level and chain;
//   * a piece's counts and sums are kept from the probe that found it (no second descent for
//     tau), and |F| at tau is read from them when tau lies inside the piece (two sorted-score
//     comparisons instead of two binary searches and two descents);
//   * pass 0 (a warp per anchor query, every kStride-th) solves a few consecutive anchors in
//     turn (as many as fill the GPU once), the first probes of the next placed around the
//     previous one's piece;
//   * pass 1 (a warp per anchor gap, a lane per query) brackets each query's piece with its
//     two anchors' pieces in its first descent, then searches the bracket by thirds.  (A
//     guess walked along the breakpoints without wavelet queries, verified in one descent,
//     cost more than the descents it saved: H200, 8 x 64K, pass 0 + 1 624 us with it, 610
//     without.)
// Every output is computed by the same arithmetic as before from the same piece, so the
// result is bitwise the old one wherever the predicate is monotone over the pieces (then any
// search finds the same piece; see tests/test_select_emulation.py).
//
// Free of host-only CUDA, so that tests/select_emu/ can run this exact code on the CPU.
#pragma once
#include <cmath>
#include <cstdint>

#include "params.h"

namespace xsk {
namespace select_impl {

constexpr int kStride = 32;          // anchor spacing: one warp of pass 1 per gap
constexpr unsigned kAll = 0xffffffffu;
// pass 0's blocks per SM: its registers capped at 80 on sm_90 (XSK_SELECT_PASS0_MIN_BLOCKS
// overrides, for benchmarks/select_harness.cu's variants)
#if defined(XSK_SELECT_PASS0_MIN_BLOCKS)
constexpr int kAnchorMinBlocks = XSK_SELECT_PASS0_MIN_BLOCKS;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kAnchorMinBlocks = 5;
#else
constexpr int kAnchorMinBlocks = 6;
#endif

// One query's pool [lo, hi) in head s.
struct Query {
  const SelectParams& p;
  int s, lo, hi, n;
  __device__ const int* zeros() const { return p.zeros + (size_t)s * p.nbits * (p.NK + 1); }
  __device__ const double* wsum() const { return p.wsum + (size_t)s * p.nbits * (p.NK + 1); }
  __device__ const int* nzeros() const { return p.nzeros + s * p.nbits; }
  __device__ const double* cb() const { return p.cb + (size_t)s * (2 * p.NK); }
  __device__ const int* th_mid() const { return p.th_mid + (size_t)s * (2 * p.NK - 1); }
  __device__ const int* th_mid1() const { return p.th_mid1 + (size_t)s * (2 * p.NK - 1); }
  __device__ const double* sv() const { return p.sv + (size_t)s * p.NK; }
};

// What a probe of piece m keeps: the pool counts below th_mid[m] / th_mid1[m] (t0 / t1) and
// sum_F u.  a = n - c1 and |F| = c1 - c0 follow exactly.
struct Piece {
  double sf;
  int c0, c1, t0, t1;
};

// With NK a power of two, the ranks 0 .. NK - 1 never set the top bit of the wavelet's
// L = bit_length(NK) levels: level 0 is all zeros (kept for the thresholds theta = NK).
__host__ __device__ __forceinline__ bool top_level_all_zeros(int NK) {
  return NK > 0 && (NK & (NK - 1)) == 0;
}

// NC count / score-sum chains (_wavelet.count_sum_below, thresholds theta) and, with kth,
// r0 / r1 = the ranks of the k0-th and (k0 - 1)-th smallest pool keys (kth_smallest; r0 / r1
// untouched without kth), descended
// together: the loads of one level are independent across chains, so they are all issued
// before any is used.  Same operations, in the same order per chain, as
// wavelet_count_sum_below / the old kth_smallest.
template <int NC>
__device__ __forceinline__ void descend(const Query& q, const int (&theta)[NC],
                                        const bool (&on)[NC], int (&cnt)[NC],
                                        double (&sum)[NC], bool kth, int k0, int& r0,
                                        int& r1) {
  const int L = q.p.nbits, stride = q.p.NK + 1;
  const int* z = q.zeros();
  const double* ws = q.wsum();
  const int* nzs = q.nzeros();
  int lo[NC], hi[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    lo[c] = q.lo;
    hi[c] = q.hi;
    cnt[c] = 0;
    sum[c] = 0.0;
  }
  int ka = q.lo, kb = q.hi, kc = q.lo, kd = q.hi, kk0 = k0, kk1 = k0 - 1, rk0 = 0, rk1 = 0;
  // With NK a power of two, level 0 is all zeros (zeros[p] = p): its counts need no load
  // (one dependent load fewer per chain).  Same values as the loads would give.
  const bool skip0 = top_level_all_zeros(q.p.NK);
  for (int li = 0; li < L; ++li, z += stride, ws += stride) {
    const int bit = L - 1 - li;
    const int nz = __ldg(nzs + li);
    int za[NC], zb[NC];
    double wa[NC], wb[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      za[c] = zb[c] = 0;
      wa[c] = wb[c] = 0.0;
      if (on[c]) {
        za[c] = li == 0 && skip0 ? lo[c] : __ldg(z + lo[c]);
        zb[c] = li == 0 && skip0 ? hi[c] : __ldg(z + hi[c]);
        if ((theta[c] >> bit) & 1) {
          wb[c] = __ldg(ws + hi[c]);
          wa[c] = __ldg(ws + lo[c]);
        }
      }
    }
    int zka = 0, zkb = 0, zkc = 0, zkd = 0;
    if (kth && li == 0 && skip0) {
      zka = ka;
      zkb = kb;
      zkc = kc;
      zkd = kd;
    } else if (kth) {
      zka = __ldg(z + ka);
      zkb = __ldg(z + kb);
      zkc = __ldg(z + kc);
      zkd = __ldg(z + kd);
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (!on[c]) continue;
      if ((theta[c] >> bit) & 1) {
        cnt[c] += zb[c] - za[c];
        sum[c] += wb[c] - wa[c];
        lo[c] = nz + lo[c] - za[c];
        hi[c] = nz + hi[c] - zb[c];
      } else {
        lo[c] = za[c];
        hi[c] = zb[c];
      }
    }
    if (kth) {
      // one level of a k-th smallest chain: into the ones (bit set) or the zeros
      auto kth_level = [&](int& kk, int& rk, int& a, int& b, int za_, int zb_) {
        if (kk >= zb_ - za_) {
          kk -= zb_ - za_;
          rk |= 1 << bit;
          a = nz + a - za_;
          b = nz + b - zb_;
        } else {
          a = za_;
          b = zb_;
        }
      };
      kth_level(kk0, rk0, ka, kb, zka, zkb);
      kth_level(kk1, rk1, kc, kd, zkc, zkd);
    }
  }
  if (kth) {
    r0 = rk0;
    r1 = rk1;
  }
}

// f at the right end of a probed piece, exactly as the old kernel computed it (its SASS:
// a DFMA of a + sum_F u and -|F| * right).
__device__ __forceinline__ double f_right(const Query& q, const Piece& v, double right) {
  const double a = (double)q.n - v.c1, nf = v.c1 - v.c0;
  const double sf = (v.c1 == v.c0) ? 0.0 : v.sf;  // exactly 0 for an empty F
  return __fma_rn(-nf, right, a + sf);
}

// Probes pieces m[j] (where on[j]): their Piece and whether f(right end) <= k.  With kth, the
// same descent also finds the ranks r0 / r1 of the (n - k)-th / (n - k - 1)-th smallest.
template <int NP>
__device__ __forceinline__ void probe(const Query& q, const int (&m)[NP], const bool (&on)[NP],
                                      Piece (&v)[NP], bool (&le_k)[NP], bool kth, int& r0,
                                      int& r1) {
  int th[2 * NP];
  bool ch[2 * NP];
  double right[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    ch[2 * j] = ch[2 * j + 1] = on[j];
    th[2 * j] = on[j] ? __ldg(q.th_mid() + m[j]) : 0;
    th[2 * j + 1] = on[j] ? __ldg(q.th_mid1() + m[j]) : 0;
    right[j] = on[j] ? __ldg(q.cb() + m[j] + 1) : 0.0;
  }
  int cnt[2 * NP];
  double sum[2 * NP];
  descend<2 * NP>(q, th, ch, cnt, sum, kth, q.n - q.p.topk, r0, r1);
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    v[j].c0 = cnt[2 * j];
    v[j].c1 = cnt[2 * j + 1];
    v[j].sf = sum[2 * j + 1] - sum[2 * j];
    v[j].t0 = th[2 * j];
    v[j].t1 = th[2 * j + 1];
    le_k[j] = on[j] && f_right(q, v[j], right[j]) <= q.p.topk;
  }
}

// #{j : sv[j] <= x} (inclusive) or #{j : sv[j] < x}: the partition point of a monotone
// predicate over the sorted scores, found by an exponential search from hint (the count
// a bisection over all of sv finds, in a few loads when the hint is close).
__device__ __forceinline__ int count_sorted(const double* sv, int n, double x, bool inclusive,
                                            int hint) {
  auto below = [&](int j) {
    const double v = __ldg(sv + j);
    return inclusive ? v <= x : v < x;
  };
  int lo, hi, step = 1;
  hint = min(max(hint, 0), n);
  if (hint < n && below(hint)) {  // count > hint: gallop up
    lo = hint + 1;
    while (lo + step - 1 < n && below(lo + step - 1)) {
      lo += step;
      step <<= 1;
    }
    hi = min(lo + step - 1, n);
  } else {  // count <= hint: gallop down
    hi = hint;
    while (hi - step >= 0 && !below(hi - step)) {
      hi -= step;
      step <<= 1;
    }
    lo = max(hi - step + 1, 0);
  }
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (below(mid)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Outputs of a query whose pool is selected whole (n <= topk).
__device__ __forceinline__ void write_whole_pool(const SelectParams& p, int64_t t) {
  p.tau[t] = -INFINITY;
  p.ub[t] = -INFINITY;
  p.jb[t] = 0;
  p.nF[t] = 0;
  p.rb[t] = -1;
  p.piece[t] = -1;
}

// Given the piece p_hi that holds tau (its probe v) and the ranks r0 / r1 of the (n - k)-th /
// (n - k - 1)-th smallest pool keys, solves tau and writes the outputs of query t.
__device__ __forceinline__ void finish_query(const Query& q, int64_t t, int p_hi,
                                             const Piece& v, int r0, int r1) {
  const SelectParams& p = q.p;
  const double a = (double)q.n - v.c1, nf = v.c1 - v.c0;
  const double sf = (v.c1 == v.c0) ? 0.0 : v.sf;
  const double* cb = q.cb();
  const double left = __ldg(cb + p_hi), right = __ldg(cb + p_hi + 1);
  const double* sv = q.sv();
  const double u_k = __ldg(sv + r0), u_k1 = __ldg(sv + r1);
  // tau lies in (left, right]: a + sum_F u - |F| tau = k there.
  double tau = fmin(fmax((a + sf - p.topk) / fmax(nf, 1.0), left), right);
  // f == k on a whole interval iff the k-th largest pool score is at least 1 above the
  // (k+1)-th: tau is not unique there; take the interval's midpoint.
  if (u_k - 1.0 >= u_k1) tau = 0.5 * (u_k1 + u_k - 1.0);
  // |F| at tau (keys with tau < u < tau + 1) = pool count below #{sv < tau + 1} minus below
  // #{sv <= tau}.  Inside the piece these thresholds are the probe's t1 / t0 (no breakpoint
  // lies strictly inside a piece), which two comparisons each confirm; else (tau at a piece
  // end, or the flat midpoint elsewhere) they are counted and descended for.
  const double tau1 = tau + 1.0;
  const int NK = p.NK;
  const bool le_ok = (v.t0 == 0 || __ldg(sv + v.t0 - 1) <= tau) &&
                     (v.t0 == NK || !(__ldg(sv + v.t0) <= tau));
  const bool lt_ok = (v.t1 == 0 || __ldg(sv + v.t1 - 1) < tau1) &&
                     (v.t1 == NK || !(__ldg(sv + v.t1) < tau1));
  int c_le = v.c0, c_lt1 = v.c1;
  if (!le_ok || !lt_ok) {
    const int th[2] = {le_ok ? v.t0 : count_sorted(sv, NK, tau, true, v.t0),
                       lt_ok ? v.t1 : count_sorted(sv, NK, tau1, false, v.t1)};
    const bool on[2] = {!le_ok, !lt_ok};
    int cnt[2], unused_r0, unused_r1;
    double unused[2];
    descend<2>(q, th, on, cnt, unused, false, 0, unused_r0, unused_r1);
    if (!le_ok) c_le = cnt[0];
    if (!lt_ok) c_lt1 = cnt[1];
  }
  p.tau[t] = tau;
  p.nF[t] = c_lt1 - c_le;
  p.rb[t] = r0;
  p.ub[t] = u_k;
  p.jb[t] = __ldg(p.perm + (size_t)q.s * NK + r0);
  p.piece[t] = p_hi;
}

__device__ __forceinline__ Piece shfl_piece(const Piece& v, int src) {
  Piece r;
  r.sf = __shfl_sync(kAll, v.sf, src);
  r.c0 = __shfl_sync(kAll, v.c0, src);
  r.c1 = __shfl_sync(kAll, v.c1, src);
  r.t0 = __shfl_sync(kAll, v.t0, src);
  r.t1 = __shfl_sync(kAll, v.t1, src);
  return r;
}

// Pass 0's first probes for an anchor after the warp's previous one (piece prev): prev - 1,
// prev .. prev + 14, then prev + 16, 24, 32, 48, ..., 3072 (pieces only grow along a causal
// sequence, over a 32-query gap mostly by under ~100, rarely by thousands).
__device__ __forceinline__ int near_offset(int lane) {
  return lane < 16 ? lane - 1 : (2 + (lane & 1)) << ((lane - 16) / 2 + 3);
}

// Pass 0: a warp per anchors_per_warp consecutive anchor queries (every kStride-th and the
// last), searched in turn, the 32 lanes probing 32 pieces per round (the first piece with
// f(right end) <= k: the bisection's piece, f being non-increasing).
__global__ void __launch_bounds__(128, kAnchorMinBlocks) select_anchor_kernel(SelectParams p,
                                                               int anchors_per_warp) {
  const int lane = threadIdx.x & 31;
  const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int n_regular = (p.NQ + kStride - 1) / kStride;
  const int n_anchor = n_regular + ((p.NQ - 1) % kStride != 0 ? 1 : 0);
  const int warps_per_head = (n_anchor + anchors_per_warp - 1) / anchors_per_warp;
  if (w >= (int64_t)p.S * warps_per_head) return;  // (whole warps: w is warp-uniform)
  const int s = (int)(w / warps_per_head);
  const int a_begin = (int)(w % warps_per_head) * anchors_per_warp;
  const int a_end = min(a_begin + anchors_per_warp, n_anchor);
  const int npieces = 2 * p.NK - 1;
  int prev = -1;  // piece of the warp's previous anchor
  for (int a = a_begin; a < a_end; ++a) {
    const int i = a < n_regular ? a * kStride : p.NQ - 1;
    const int64_t t = (int64_t)s * p.NQ + i;
    const int plo = (int)p.pool_lo[i], wlo = (int)p.win_lo[i];
    if (wlo - plo <= p.topk) {  // the whole pool is selected with gate 1
      if (lane == 0) write_whole_pool(p, t);
      continue;
    }
    const Query q{p, s, plo, wlo, wlo - plo};
    // Invariant: piece p_lo (or -1) has f(right end) > k, piece p_hi has f(right end) <= k
    // (hv: its probe, once probed).
    int p_lo = -1, p_hi = npieces - 1, r0 = 0, r1 = 0;
    bool have = false, kth = true;
    Piece hv{};
    for (int round = 0; p_hi - p_lo > 1; ++round) {
      const int gap = p_hi - p_lo;
      int m;
      if (round == 0 && prev >= 0)
        m = prev + near_offset(lane);
      else
        m = gap <= 32 ? p_lo + 1 + lane : p_lo + (int)((int64_t)(lane + 1) * gap / 33);
      const int mm[1] = {m};
      const bool on[1] = {p_lo < m && m < p_hi};
      Piece v[1];
      bool le[1];
      probe<1>(q, mm, on, v, le, kth, r0, r1);  // (the k-th smallest ranks: first round)
      kth = false;
      const unsigned at_most_k = __ballot_sync(kAll, le[0]);
      const unsigned probed = __ballot_sync(kAll, on[0]);
      const int first = at_most_k ? __ffs(at_most_k) - 1 : -1;  // first lane with f <= k
      const unsigned below = first < 0 ? probed : probed & ((1u << first) - 1);
      const int lo_lane = below ? 31 - __clz(below) : -1;  // last probing lane below it
      const int new_hi = first < 0 ? p_hi : __shfl_sync(kAll, m, first);
      const int new_lo = lo_lane < 0 ? p_lo : __shfl_sync(kAll, m, lo_lane);
      if (first >= 0) {
        hv = shfl_piece(v[0], first);
        have = true;
      }
      p_hi = new_hi;
      p_lo = new_lo;
    }
    if (kth || !have) {  // (rare: no round, or the last piece never probed)
      const int mm[1] = {p_hi};
      const bool on[1] = {!have};
      Piece v[1];
      bool le[1];
      probe<1>(q, mm, on, v, le, kth, r0, r1);
      if (!have) hv = v[0];
    }
    if (lane == 0) finish_query(q, t, p_hi, hv, r0, r1);
    prev = p_hi;
  }
}

// Pass 1's blocks per SM (register cap): unset leaves it uncapped (122 registers on sm_90a: 4
// blocks of 128 threads per SM).  Caps spill (5 blocks: 54 bytes); benchmarks/
// select_harness.cu times variants (-DXSK_SELECT_PASS1_MIN_BLOCKS=5).
#if defined(XSK_SELECT_PASS1_MIN_BLOCKS) && XSK_SELECT_PASS1_MIN_BLOCKS > 1
#define XSK_SELECT_PASS1_BOUNDS __launch_bounds__(128, XSK_SELECT_PASS1_MIN_BLOCKS)
#else
#define XSK_SELECT_PASS1_BOUNDS __launch_bounds__(128)
#endif

// Pass 1: a warp per anchor gap, lane l on query i0 + l (lane 0: the anchor itself, solved).
__global__ void XSK_SELECT_PASS1_BOUNDS select_kernel(SelectParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int n_regular = (p.NQ + kStride - 1) / kStride;
  if (w >= (int64_t)p.S * n_regular) return;  // (whole warps)
  const int s = (int)(w / n_regular), i0 = (int)(w % n_regular) * kStride, i = i0 + lane;
  const bool mine = lane > 0 && i < p.NQ - 1;  // (i0 and NQ - 1 are anchors)
  const int64_t t = (int64_t)s * p.NQ + i;
  int plo = 0, wlo = 0;
  if (mine) {
    plo = (int)p.pool_lo[i];
    wlo = (int)p.win_lo[i];
  }
  const bool need = mine && wlo - plo > p.topk;
  if (mine && !need) write_whole_pool(p, t);
  if (!__any_sync(kAll, need)) return;  // (warp-uniform)
  const int npieces = 2 * p.NK - 1;
  const int64_t ta = (int64_t)s * p.NQ + i0, tb = (int64_t)s * p.NQ + min(i0 + kStride, p.NQ - 1);
  const int P0 = p.piece[ta], P1 = p.piece[tb];  // the two anchors' pieces
  if (!need) return;
  // From here on, lane by lane (no warp intrinsics).  Rounds of two probes each: first the
  // anchors' pieces (P0 - 1 and P1) where they narrow the bracket, finding the two k-th
  // smallest ranks in the same descent; then thirds of the bracket.  (Along a causal
  // sequence a query's piece lies between its anchors': the first round leaves a bracket of
  // about P1 - P0 pieces.)
  const Query q{p, s, plo, wlo, wlo - plo};
  const int lo_hint = P0 - 1, hi_hint = P1 < npieces - 1 ? P1 : -1;
  int p_lo = -1, p_hi = npieces - 1, r0 = 0, r1 = 0;
  bool have = false, hints = true, first = true;
  Piece hv{};
  while (first || p_hi - p_lo > 1) {
    auto inside = [&](int x) { return p_lo < x && x < p_hi; };
    int ma = -1, mb = -1;
    if (hints) {  // the anchors' pieces, where they narrow the bracket
      hints = false;
      ma = inside(lo_hint) ? lo_hint : -1;
      mb = inside(hi_hint) ? hi_hint : -1;
      if (ma >= 0 && mb >= 0 && ma >= mb) {  // (not a causal gap)
        if (ma == mb) mb = -1; else { const int x = ma; ma = mb; mb = x; }
      }
      // one inside: pair it with the piece next to the bracket's end on its other side
      if (ma < 0 && mb >= 0 && p_lo + 1 < mb) ma = p_lo + 1;
      else if (mb < 0 && ma >= 0 && ma < p_hi - 1) mb = p_hi - 1;
    }
    if (!inside(ma) && !inside(mb)) {  // thirds of the bracket (or its one inner piece)
      const int gap = p_hi - p_lo;
      ma = p_lo + max(gap / 3, 1);
      mb = p_lo + 2 * gap / 3;
    }
    const int mm[2] = {ma, mb};
    const bool on[2] = {inside(ma), inside(mb) && mb > ma};
    Piece v[2];
    bool le[2];
    probe<2>(q, mm, on, v, le, first, r0, r1);
    first = false;
    if (on[0] && le[0]) {
      p_hi = ma;
      hv = v[0];
      have = true;
    } else {
      if (on[0]) p_lo = ma;
      if (on[1]) {
        if (le[1]) {
          p_hi = mb;
          hv = v[1];
          have = true;
        } else {
          p_lo = mb;
        }
      }
    }
  }
  if (!have) {  // (the last piece, never probed)
    const int mm[1] = {p_hi};
    const bool on[1] = {true};
    Piece v[1];
    bool le[1];
    int k0, k1;
    probe<1>(q, mm, on, v, le, false, k0, k1);
    hv = v[0];
  }
  finish_query(q, t, p_hi, hv, r0, r1);
}

}  // namespace select_impl
}  // namespace xsk
