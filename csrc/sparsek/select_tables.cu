// The selection tables of _selection.build_tables for float32 scores, in one launch after
// the per-head sort (xformers_sparsek/_cuda.py: select).  Per head, with a = the sorted
// scores (float32, read as the exact float64 values) and b = a - 1.0 (float64, the same
// rounding as torch's ``sv - 1.0``), it writes what build_tables computes with ~15 PyTorch
// launches (a second sort among them):
//   * u64 = u as float64, sv64 = a as float64, perm32 = perm, ranks32[perm[r]] = r;
//   * cb = sorted(a ++ b): a merge of the two sorted rows (merge path, a before b on equal
//     values, which is the order of the stable sort of the concatenation);
//   * th_mid[m] = #{a <= mid_m}, th_mid1[m] = #{a <= mid_m + 1.0} with
//     mid_m = 0.5 * (cb[m] + cb[m + 1]): the counts torch.searchsorted(right=True) returns
//     (its test ``!(a[k] > x)``), found by an exponential search from the count the merge
//     suggests (the hint only sets the cost, never the result).
// Rounded double operations are written as __d*_rn so that no FMA contraction changes them,
// and float -> double conversions as f2d (no flush of subnormals under --use_fast_math).
#include "launch.h"

namespace xsk {
namespace {

constexpr int kThreads = 256;

// (The helpers and table_entry are __host__ __device__ so that a host harness can run the
// exact code on the CPU; only the kernel itself is device code.)
#define XSK_HD __host__ __device__ __forceinline__

// Exact float -> double, subnormals included: the build's --use_fast_math would otherwise
// emit cvt.ftz.f64.f32, which flushes them to zero (torch's .double() keeps them).
XSK_HD double f2d(float x) {
#ifdef __CUDA_ARCH__
  double d;
  asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
  return d;
#else
  return (double)x;
#endif
}

XSK_HD double ld(const float* a, int k) {
#ifdef __CUDA_ARCH__
  return f2d(__ldg(a + k));
#else
  return f2d(a[k]);
#endif
}

XSK_HD double dadd(double x, double y) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(x, y);
#else
  return x + y;
#endif
}

XSK_HD double dmul(double x, double y) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(x, y);
#else
  return x * y;
#endif
}

// b[k] = a[k] - 1.0, rounded as torch's float64 subtraction.
XSK_HD double ld_b(const float* a, int k) { return dadd(ld(a, k), -1.0); }

// torch.searchsorted(a, x, right=True) for the sorted row a[0, n): the count of k with
// !(a[k] > x), found from any hint in [0, n] by an exponential then a binary search.
XSK_HD int count_le(const float* a, int n, double x, int hint) {
  int lo, hi;  // the count lies in [lo, hi]
  if (hint < n && !(ld(a, hint) > x)) {
    lo = hint + 1;  // count > hint: gallop up
    int step = 1;
    while (lo + step - 1 < n && !(ld(a, lo + step - 1) > x)) {
      lo += step;
      step <<= 1;
    }
    hi = lo + step - 1 < n ? lo + step - 1 : n;
  } else {
    hi = hint;  // count <= hint: gallop down
    int step = 1;
    while (hi - step >= 0 && ld(a, hi - step) > x) {
      hi -= step;
      step <<= 1;
    }
    lo = hi - step + 1 > 0 ? hi - step + 1 : 0;
  }
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (!(ld(a, mid) > x)) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Whether the merge's next element, with i of a and j of b taken, comes from a.
XSK_HD bool take_a(const float* a, int n, int i, int j) {
  return i < n && (j >= n || ld(a, i) <= ld_b(a, j));
}

// Everything of merged position m (0 <= m < 2n) of one head: a = the head's sorted scores,
// u / perm / outputs at the head's rows (cb [2n], th_mid / th_mid1 [2n - 1]).
XSK_HD void table_entry(int m, int n, const float* a, const float* u, const int64_t* perm,
                        double* u64, double* sv64, int* perm32, int* ranks32, double* cb,
                        int* th_mid, int* th_mid1) {
  if (m < n) {
    u64[m] = f2d(u[m]);
    sv64[m] = ld(a, m);
    const int r = (int)perm[m];
    perm32[m] = r;
    ranks32[r] = m;
  }
  // Merge path: i = how many elements of a are among the merge's first m.  a[t] is among
  // them iff a[t] <= b[m - 1 - t] (monotone in t: true, then false).
  int lo = m > n ? m - n : 0, hi = m < n ? m : n;
  while (lo < hi) {
    const int t = (lo + hi) >> 1;
    if (ld(a, t) <= ld_b(a, m - 1 - t)) lo = t + 1; else hi = t;
  }
  int i = lo, j = m - lo;
  const bool ta = take_a(a, n, i, j);
  const double x0 = ta ? ld(a, i) : ld_b(a, j);
  cb[m] = x0;
  if (m == 2 * n - 1) return;
  const int na = i + (ta ? 1 : 0);  // elements of a among the first m + 1 (all <= x0)
  if (ta) ++i; else ++j;
  const double x1 = take_a(a, n, i, j) ? ld(a, i) : ld_b(a, j);
  const double mid = dmul(dadd(x0, x1), 0.5);  // 0.5 * (cb[m] + cb[m + 1])
  th_mid[m] = count_le(a, n, mid, na);
  th_mid1[m] = count_le(a, n, dadd(mid, 1.0), m + 1 - na);
}

__global__ void __launch_bounds__(kThreads)
    select_tables_kernel(const float* __restrict__ u32, const float* __restrict__ sv32,
                         const int64_t* __restrict__ perm, int n, double* __restrict__ u64,
                         double* __restrict__ sv64, int* __restrict__ perm32,
                         int* __restrict__ ranks32, double* __restrict__ cb,
                         int* __restrict__ th_mid, int* __restrict__ th_mid1) {
  const int m = blockIdx.x * kThreads + threadIdx.x;  // merged position
  if (m >= 2 * n) return;
  const size_t row = (size_t)blockIdx.y * n;
  table_entry(m, n, sv32 + row, u32 + row, perm + row, u64 + row, sv64 + row, perm32 + row,
              ranks32 + row, cb + 2 * row, th_mid + 2 * row - blockIdx.y,
              th_mid1 + 2 * row - blockIdx.y);
}

}  // namespace

cudaError_t launch_select_tables(const float* u32, const float* sv32, const int64_t* perm, int S,
                                 int n, double* u64, double* sv64, int* perm32, int* ranks32,
                                 double* cb, int* th_mid, int* th_mid1, cudaStream_t stream) {
  if (S == 0 || n == 0) return cudaSuccess;
  const dim3 grid((unsigned)((2 * (int64_t)n + kThreads - 1) / kThreads), (unsigned)S);
  select_tables_kernel<<<grid, kThreads, 0, stream>>>(u32, sv32, perm, n, u64, sv64, perm32,
                                                      ranks32, cb, th_mid, th_mid1);
  return cudaGetLastError();
}

}  // namespace xsk
