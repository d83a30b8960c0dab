// Builds the per-row wavelet matrices of xformers_sparsek/_wavelet.py on the GPU.
//
// Level li handles rank bit (L - 1 - li).  For every prefix length p of the level's
// current order it stores the number of zero bits (zeros) and their weight sum (wsum); the
// next level's order is the stable partition "zeros first".  Each level is two launches
// over chunks of the rows: count the zeros of every chunk, then scan within the chunk
// (offset by the earlier chunks), write the tables and scatter to the next order.
#include "launch.h"
#include "wavelet.cuh"

namespace xsk {
namespace {

constexpr int kThreads = 256, kPerThread = 8, kChunk = kThreads * kPerThread;

__global__ void __launch_bounds__(kThreads)
    count_zeros_kernel(const int* r, const double* w, int n, int bit, int nchunks,
                       int* chunk_cnt, double* chunk_w) {
  const int c = blockIdx.x, row = blockIdx.y;
  const int* rr = r + (size_t)row * n;
  const double* ww = w + (size_t)row * n;
  int cnt = 0;
  double sw = 0.0;
  for (int t = 0; t < kPerThread; ++t) {
    const int p = c * kChunk + t * kThreads + threadIdx.x;
    if (p < n && !((rr[p] >> bit) & 1)) {
      ++cnt;
      sw += ww[p];
    }
  }
  // Block reduction (fixed order: deterministic).
  __shared__ int s_cnt[kThreads];
  __shared__ double s_w[kThreads];
  s_cnt[threadIdx.x] = cnt;
  s_w[threadIdx.x] = sw;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) {
      s_cnt[threadIdx.x] += s_cnt[threadIdx.x + off];
      s_w[threadIdx.x] += s_w[threadIdx.x + off];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    chunk_cnt[(size_t)row * nchunks + c] = s_cnt[0];
    chunk_w[(size_t)row * nchunks + c] = s_w[0];
  }
}

__global__ void __launch_bounds__(kThreads)
    write_level_kernel(const int* r, const double* w, int* r_next, double* w_next, int n,
                       int bit, int li, int nbits, int nchunks, const int* chunk_cnt,
                       const double* chunk_w, int* zeros, double* wsum, int* nzeros) {
  const int c = blockIdx.x, row = blockIdx.y;
  __shared__ int s_before, s_total;
  __shared__ double s_wbefore;
  if (threadIdx.x == 0) {
    int before = 0, total = 0;
    double wb = 0.0;
    for (int cc = 0; cc < nchunks; ++cc) {
      const int k = chunk_cnt[(size_t)row * nchunks + cc];
      if (cc < c) {
        before += k;
        wb += chunk_w[(size_t)row * nchunks + cc];
      }
      total += k;
    }
    s_before = before;
    s_total = total;
    s_wbefore = wb;
  }
  // Each thread owns kPerThread consecutive elements: local inclusive scan, then a block
  // scan of the per-thread totals (Hillis-Steele in shared memory).
  const int base = c * kChunk + threadIdx.x * kPerThread;
  const int* rr = r + (size_t)row * n;
  const double* ww = w + (size_t)row * n;
  int is0[kPerThread];
  double wv[kPerThread];
  int cnt = 0;
  double sw = 0.0;
  for (int t = 0; t < kPerThread; ++t) {
    const int p = base + t;
    is0[t] = (p < n) && !((rr[p] >> bit) & 1);
    wv[t] = p < n ? ww[p] : 0.0;
    cnt += is0[t];
    sw += is0[t] ? wv[t] : 0.0;
  }
  __shared__ int s_c[kThreads];
  __shared__ double s_w[kThreads];
  s_c[threadIdx.x] = cnt;
  s_w[threadIdx.x] = sw;
  __syncthreads();
  for (int off = 1; off < kThreads; off <<= 1) {
    const int c2 = threadIdx.x >= off ? s_c[threadIdx.x - off] : 0;
    const double w2 = threadIdx.x >= off ? s_w[threadIdx.x - off] : 0.0;
    __syncthreads();
    s_c[threadIdx.x] += c2;
    s_w[threadIdx.x] += w2;
    __syncthreads();
  }
  int zc = s_before + s_c[threadIdx.x] - cnt;  // zeros before this thread's first element
  double wc = s_wbefore + s_w[threadIdx.x] - sw;
  const int nz = s_total;
  int* z = zeros + ((size_t)row * nbits + li) * (n + 1);
  double* ws = wsum + ((size_t)row * nbits + li) * (n + 1);
  for (int t = 0; t < kPerThread; ++t) {
    const int p = base + t;
    if (p >= n) break;
    const int dest = is0[t] ? zc : nz + p - zc;
    zc += is0[t];
    wc += is0[t] ? wv[t] : 0.0;
    z[p + 1] = zc;
    ws[p + 1] = wc;
    r_next[(size_t)row * n + dest] = rr[p];
    w_next[(size_t)row * n + dest] = wv[t];
  }
  if (c == 0 && threadIdx.x == 0) {
    z[0] = 0;
    ws[0] = 0.0;
    nzeros[row * nbits + li] = nz;
  }
}

// out[row, j] = (weight sum of the elements of [lo_j, hi_j) with rank < th_hi[row, j]) minus
// (the same below th_lo[row, j]): one thread per (row, j).
__global__ void __launch_bounds__(kThreads)
    wavelet_range_sum_kernel(const int* zeros, const double* wsum, const int* nzeros, int rows,
                             int n, int nbits, int m, const int* lo, const int* hi,
                             const int* th_lo, const int* th_hi, double* out) {
  const int j = blockIdx.x * kThreads + threadIdx.x, row = blockIdx.y;
  if (j >= m) return;
  const size_t tab = (size_t)row * nbits * (n + 1), g = (size_t)row * m + j;
  int c_hi, c_lo;
  double s_hi, s_lo;
  wavelet_count_sum_below(zeros + tab, wsum + tab, nzeros + row * nbits, nbits, n, lo[j], hi[j],
                          th_hi[g], c_hi, s_hi);
  wavelet_count_sum_below(zeros + tab, wsum + tab, nzeros + row * nbits, nbits, n, lo[j], hi[j],
                          th_lo[g], c_lo, s_lo);
  out[g] = s_hi - s_lo;
}

}  // namespace

cudaError_t launch_wavelet_range_sum(const int* zeros, const double* wsum, const int* nzeros,
                                     int rows, int n, int nbits, int m, const int* lo,
                                     const int* hi, const int* th_lo, const int* th_hi,
                                     double* out, cudaStream_t stream) {
  if (rows == 0 || m == 0) return cudaSuccess;
  wavelet_range_sum_kernel<<<dim3((m + kThreads - 1) / kThreads, rows), kThreads, 0, stream>>>(
      zeros, wsum, nzeros, rows, n, nbits, m, lo, hi, th_lo, th_hi, out);
  return cudaGetLastError();
}

cudaError_t launch_wavelet_build(int* r, double* w, int* r_tmp, double* w_tmp, int rows, int n,
                                 int nbits, int* chunk_cnt, double* chunk_w, int* zeros,
                                 double* wsum, int* nzeros, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  const int nchunks = (n + kChunk - 1) / kChunk;
  dim3 grid(nchunks, rows);
  for (int li = 0; li < nbits; ++li) {
    const int bit = nbits - 1 - li;
    count_zeros_kernel<<<grid, kThreads, 0, stream>>>(r, w, n, bit, nchunks, chunk_cnt, chunk_w);
    write_level_kernel<<<grid, kThreads, 0, stream>>>(r, w, r_tmp, w_tmp, n, bit, li, nbits,
                                                      nchunks, chunk_cnt, chunk_w, zeros, wsum,
                                                      nzeros);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    int* rs = r; r = r_tmp; r_tmp = rs;
    double* wsw = w; w = w_tmp; w_tmp = wsw;
  }
  return cudaSuccess;
}

}  // namespace xsk
