// Range queries over one row of the wavelet matrices built by wavelet_build.cu (layout in
// xformers_sparsek/_wavelet.py): zeros / wsum point at the row's [nbits, n + 1] tables.
#pragma once

namespace xsk {

// Count and weight sum of the elements of [lo, hi) whose rank is below theta.
__device__ __forceinline__ void wavelet_count_sum_below(const int* zeros, const double* wsum,
                                                        const int* nzeros, int nbits, int n,
                                                        int lo, int hi, int theta, int& cnt,
                                                        double& sum) {
  cnt = 0;
  sum = 0.0;
  int li = 0;
  if (n > 0 && (n & (n - 1)) == 0) {
    // n a power of two: level 0 (rank bit nbits - 1) is all zeros, zeros[p] = p; only
    // theta = n has the bit (the whole range, then the empty ones region).  No dependent load.
    if ((theta >> (nbits - 1)) & 1) {
      cnt += hi - lo;
      sum += __ldg(wsum + hi) - __ldg(wsum + lo);  // (as the general step: 0.0 + x)
      lo = hi = n;
    }
    li = 1;
  }
  for (; li < nbits; ++li) {
    const int* z = zeros + (size_t)li * (n + 1);
    const int za = __ldg(z + lo), zb = __ldg(z + hi);
    if ((theta >> (nbits - 1 - li)) & 1) {
      const double* ws = wsum + (size_t)li * (n + 1);
      cnt += zb - za;
      sum += __ldg(ws + hi) - __ldg(ws + lo);
      const int nz = __ldg(nzeros + li);
      lo = nz + lo - za;
      hi = nz + hi - zb;
    } else {
      lo = za;
      hi = zb;
    }
  }
}

}  // namespace xsk
