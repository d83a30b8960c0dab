// Selection stage, per (head, query): the capped-simplex threshold tau, the top-k boundary
// and |F|, by binary search over the breakpoint pieces with O(log N) wavelet-matrix range
// queries.  A line-by-line port of the vectorised PyTorch version in _selection.py (the
// tables are built there); one thread per (head, query).
#include <cmath>

#include "launch.h"

namespace xsk {
namespace {

struct Range {
  int lo, hi;
};

// Count and score sum of the elements of [lo, hi) whose rank is below theta.
__device__ __forceinline__ void count_sum_below(const SelectParams& p, Range r, int theta,
                                                int& cnt, double& sum) {
  cnt = 0;
  sum = 0.0;
  int lo = r.lo, hi = r.hi;
  for (int li = 0; li < p.nbits; ++li) {
    const int level = p.nbits - 1 - li;
    const int* z = p.zeros + (size_t)li * (p.N + 1);
    const int zlo = __ldg(z + lo), zhi = __ldg(z + hi);
    if ((theta >> level) & 1) {
      const double* ws = p.wsum + (size_t)li * (p.N + 1);
      cnt += zhi - zlo;
      sum += __ldg(ws + hi) - __ldg(ws + lo);
      const int nz = __ldg(p.nzeros + li);
      lo = nz + lo - zlo;
      hi = nz + hi - zhi;
    } else {
      lo = zlo;
      hi = zhi;
    }
  }
}

__device__ __forceinline__ int kth_smallest(const SelectParams& p, Range r, int k) {
  int rank = 0, lo = r.lo, hi = r.hi;
  for (int li = 0; li < p.nbits; ++li) {
    const int level = p.nbits - 1 - li;
    const int* z = p.zeros + (size_t)li * (p.N + 1);
    const int zlo = __ldg(z + lo), zhi = __ldg(z + hi);
    const int nzero_here = zhi - zlo;
    if (k >= nzero_here) {
      k -= nzero_here;
      rank |= 1 << level;
      const int nz = __ldg(p.nzeros + li);
      lo = nz + lo - zlo;
      hi = nz + hi - zhi;
    } else {
      lo = zlo;
      hi = zhi;
    }
  }
  return rank;
}

struct Piece {
  double a, nf, sf, f_right;
};

__device__ __forceinline__ Piece eval_piece(const SelectParams& p, Range r, int s, int m,
                                            double n) {
  const int npieces = 2 * p.NK - 1;
  const size_t g = (size_t)s * npieces + m;
  int c0, c1;
  double s0, s1;
  count_sum_below(p, r, __ldg(p.th_mid + g), c0, s0);
  count_sum_below(p, r, __ldg(p.th_mid1 + g), c1, s1);
  Piece pc;
  pc.a = n - c1;
  pc.nf = c1 - c0;
  pc.sf = s1 - s0;
  const double right = __ldg(p.cb + (size_t)s * (2 * p.NK) + m + 1);
  pc.f_right = pc.a + pc.sf - pc.nf * right;
  return pc;
}

__global__ void select_kernel(SelectParams p) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (int64_t)p.S * p.NQ) return;
  const int s = t / p.NQ, i = t % p.NQ;
  const int plo = (int)p.pool_lo[i], wlo = (int)p.win_lo[i];
  const int n = wlo - plo;
  if (n <= p.topk) {  // the whole pool is selected with gate 1
    p.tau[t] = -INFINITY;
    p.ub[t] = -INFINITY;
    p.jb[t] = 0;
    p.nF[t] = 0;
    p.rb[t] = -1;
    return;
  }
  const Range r{s * p.NK + plo, s * p.NK + wlo};
  const double k = p.topk;
  const int npieces = 2 * p.NK - 1;
  // First piece whose right end has f <= k (the last piece ends at max(u), f = 0).
  int p_lo = -1, p_hi = npieces - 1;
  while (p_hi - p_lo > 1) {
    const int m = (p_lo + p_hi) / 2;
    if (eval_piece(p, r, s, m, n).f_right <= k) p_hi = m; else p_lo = m;
  }
  const Piece pc = eval_piece(p, r, s, p_hi, n);
  const double left = p.cb[(size_t)s * (2 * p.NK) + p_hi];
  const double right = p.cb[(size_t)s * (2 * p.NK) + p_hi + 1];
  double tau;
  if (pc.nf > 0) {
    tau = (pc.a + pc.sf - k) / pc.nf;
    tau = fmin(fmax(tau, left), right);
  } else {
    tau = 0.5 * (left + right);  // f == k on the whole piece: take its midpoint
  }
  const int rb = kth_smallest(p, r, n - p.topk);
  p.tau[t] = tau;
  p.nF[t] = (int64_t)pc.nf;
  p.rb[t] = rb;
  p.ub[t] = p.sv[rb];  // sv and perm are [S, NK]: flat index = global rank
  p.jb[t] = p.perm[rb];
}

}  // namespace

cudaError_t launch_select(const SelectParams& p, cudaStream_t stream) {
  const int64_t total = (int64_t)p.S * p.NQ;
  if (total == 0) return cudaSuccess;
  const int threads = 128;
  select_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace xsk
