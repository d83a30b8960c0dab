// The selection kernels as they were before the faster search (csrc/sparsek/select.cu at
// commit 320b80b), verbatim but for this header's namespace and the one
// fused multiply-add written out (marked): the reference the new kernels
// are compared with, bit for bit, under the warp emulator (simt.h).  Test code only.
#pragma once
#include <cmath>

#include "sparsek/params.h"
#include "sparsek/wavelet.cuh"

namespace xsk_old {
using xsk::SelectParams;
using xsk::wavelet_count_sum_below;

constexpr int kStride = 32;

struct Query {
  const SelectParams& p;
  int s, lo, hi;  // head and pool [lo, hi)
  double n;

  __device__ const int* zeros(int li) const {
    return p.zeros + ((size_t)s * p.nbits + li) * (p.NK + 1);
  }
  __device__ const double* wsum(int li) const {
    return p.wsum + ((size_t)s * p.nbits + li) * (p.NK + 1);
  }
  __device__ int nzeros(int li) const { return __ldg(p.nzeros + s * p.nbits + li); }

  // Count and score sum of the pool keys whose rank is below theta.
  __device__ void count_sum_below(int theta, int& cnt, double& sum) const {
    wavelet_count_sum_below(zeros(0), wsum(0), p.nzeros + s * p.nbits, p.nbits, p.NK, lo, hi,
                            theta, cnt, sum);
  }

  __device__ int kth_smallest(int k) const {
    int rank = 0, a = lo, b = hi;
    for (int li = 0; li < p.nbits; ++li) {
      const int* z = zeros(li);
      const int za = __ldg(z + a), zb = __ldg(z + b);
      if (k >= zb - za) {
        k -= zb - za;
        rank |= 1 << (p.nbits - 1 - li);
        const int nz = nzeros(li);
        a = nz + a - za;
        b = nz + b - zb;
      } else {
        a = za;
        b = zb;
      }
    }
    return rank;
  }

  // Piece m: saturated count a, |F|, sum_F u, and f at the piece's right end.
  __device__ void piece(int m, double& a, double& nf, double& sf, double& f_right) const {
    const size_t g = (size_t)s * (2 * p.NK - 1) + m;
    int c0, c1;
    double s0, s1;
    count_sum_below(__ldg(p.th_mid + g), c0, s0);
    count_sum_below(__ldg(p.th_mid1 + g), c1, s1);
    a = n - c1;
    nf = c1 - c0;
    // exactly 0 for an empty F, so a flat piece reads f == k exactly
    sf = (c1 == c0) ? 0.0 : s1 - s0;
    // (emulation: the fused multiply-add that ptxas makes of this line, DFMA(nf, -cb, a + sf))
    f_right = __fma_rn(-nf, __ldg(p.cb + (size_t)s * (2 * p.NK) + m + 1), a + sf);
  }
  __device__ bool right_end_at_most_k(int m) const {
    double a, nf, sf, f;
    piece(m, a, nf, sf, f);
    return f <= p.topk;
  }
};

// Writes the outputs of query (s, i) whose pool is selected whole (n <= topk).
__device__ void write_whole_pool(const SelectParams& p, int64_t t) {
  p.tau[t] = -INFINITY;
  p.ub[t] = -INFINITY;
  p.jb[t] = 0;
  p.nF[t] = 0;
  p.rb[t] = -1;
  p.piece[t] = -1;
}

// Given the piece p_hi that holds tau, solves tau there and writes the outputs of query t.
__device__ void finish_query(const SelectParams& p, const Query& qr, int64_t t, int p_hi) {
  const int s = qr.s, n = (int)qr.n;
  double a, nf, sf, f;
  qr.piece(p_hi, a, nf, sf, f);
  const double* cb = p.cb + (size_t)s * (2 * p.NK);
  const double left = cb[p_hi], right = cb[p_hi + 1];
  // tau lies in (left, right]: a + sum_F u - |F| tau = k there.
  double tau = fmin(fmax((a + sf - p.topk) / fmax(nf, 1.0), left), right);
  // f == k on a whole interval iff the k-th largest pool score is at least 1 above the
  // (k+1)-th (top k saturated, the rest zero, for t in [u_(k+1), u_(k) - 1]): tau is not
  // unique there; take the interval's midpoint (same gates, every key off the kinks).
  const double* sv = p.sv + (size_t)s * p.NK;
  const int rb = qr.kth_smallest(n - p.topk);
  const double u_k = sv[rb], u_k1 = sv[qr.kth_smallest(n - p.topk - 1)];
  if (u_k - 1.0 >= u_k1) tau = 0.5 * (u_k1 + u_k - 1.0);
  // |F| at tau itself (keys with tau < u < tau + 1), the set the backward sums over.
  auto upper = [&](double x, bool inclusive) {  // #sorted scores <= x (or < x)
    int lo = 0, hi = p.NK;
    while (lo < hi) {
      const int m = (lo + hi) / 2;
      if (inclusive ? sv[m] <= x : sv[m] < x) lo = m + 1; else hi = m;
    }
    return lo;
  };
  int c_le, c_lt1;
  double unused;
  qr.count_sum_below(upper(tau, true), c_le, unused);
  qr.count_sum_below(upper(tau + 1.0, false), c_lt1, unused);
  p.tau[t] = tau;
  p.nF[t] = c_lt1 - c_le;
  p.rb[t] = rb;
  p.ub[t] = u_k;
  p.jb[t] = p.perm[(size_t)s * p.NK + rb];
  p.piece[t] = p_hi;
}

// Pass 0: one warp per anchor query (every kStride-th and the last), the 32 lanes probing
// 32 pieces per round: the first piece whose right end has f <= k in ~4 rounds instead of
// ~17 bisection steps (f is non-increasing in the piece, so this is the bisection's piece).
__global__ void select_anchor_kernel(SelectParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int n_regular = (p.NQ + kStride - 1) / kStride;
  const int n_anchor = n_regular + ((p.NQ - 1) % kStride != 0 ? 1 : 0);
  if (w >= (int64_t)p.S * n_anchor) return;  // (whole warps: w is warp-uniform)
  const int s = w / n_anchor, a_idx = w % n_anchor;
  const int i = a_idx < n_regular ? a_idx * kStride : p.NQ - 1;
  const int64_t t = (int64_t)s * p.NQ + i;
  const int plo = (int)p.pool_lo[i], wlo = (int)p.win_lo[i];
  const int n = wlo - plo;
  if (n <= p.topk) {  // the whole pool is selected with gate 1
    if (lane == 0) write_whole_pool(p, t);
    return;
  }
  const Query qr{p, s, plo, wlo, (double)n};
  // Invariant: piece p_lo (or -1) has f(right end) > k, piece p_hi has f(right end) <= k.
  int p_lo = -1, p_hi = 2 * p.NK - 2;
  while (p_hi - p_lo > 1) {
    const int gap = p_hi - p_lo;  // probes strictly inside (p_lo, p_hi), increasing in lane
    const int m = gap <= 32 ? p_lo + 1 + lane : p_lo + (int)((int64_t)(lane + 1) * gap / 33);
    const bool probe = m < p_hi;
    const unsigned at_most_k = __ballot_sync(0xffffffffu, probe && qr.right_end_at_most_k(m));
    const unsigned probed = __ballot_sync(0xffffffffu, probe);
    const int first = at_most_k ? __ffs(at_most_k) - 1 : -1;  // first lane with f <= k
    const int last_probe = 31 - __clz(probed);
    const int lo_lane = first < 0 ? last_probe : first - 1;  // last lane below it, if any
    const int new_hi = first < 0 ? p_hi : __shfl_sync(0xffffffffu, m, first);
    const int new_lo = lo_lane < 0 ? p_lo : __shfl_sync(0xffffffffu, m, lo_lane);
    p_hi = new_hi;
    p_lo = new_lo;
  }
  if (lane == 0) finish_query(p, qr, t, p_hi);
}

// Pass 1: one thread per other query, searching between its two anchors' pieces (verifying
// the bracket, so any layout stays exact).
__global__ void select_kernel(SelectParams p) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (int64_t)p.S * p.NQ) return;
  const int s = t / p.NQ, i = t % p.NQ;
  const bool anchor = (i % kStride == 0) || i == p.NQ - 1;
  if (anchor) return;
  const int plo = (int)p.pool_lo[i], wlo = (int)p.win_lo[i];
  const int n = wlo - plo;
  if (n <= p.topk) {
    write_whole_pool(p, t);
    return;
  }
  const Query qr{p, s, plo, wlo, (double)n};
  const int npieces = 2 * p.NK - 1;
  int p_lo = -1, p_hi = npieces - 1;
  const int i0 = i - i % kStride, i1 = min(i0 + kStride, p.NQ - 1);
  const int lo_guess = p.piece[(size_t)s * p.NQ + i0] - 1;
  const int hi_guess = p.piece[(size_t)s * p.NQ + i1];
  if (hi_guess >= 0 && hi_guess < npieces - 1 && qr.right_end_at_most_k(hi_guess))
    p_hi = hi_guess;
  if (lo_guess >= 0 && lo_guess < p_hi && !qr.right_end_at_most_k(lo_guess)) p_lo = lo_guess;
  while (p_hi - p_lo > 1) {
    const int m = (p_lo + p_hi) / 2;
    if (qr.right_end_at_most_k(m)) p_hi = m; else p_lo = m;
  }
  finish_query(p, qr, t, p_hi);
}

}  // namespace xsk_old
