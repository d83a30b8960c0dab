// Builds the per-row wavelet matrices of xformers_sparsek/_wavelet.py on the GPU.
//
// Level li handles rank bit (L - 1 - li).  For every prefix length p of the level's
// current order it stores the number of zero bits (zeros) and their weight sum (wsum); the
// next level's order is the stable partition "zeros first".
//
// One prologue (a memset and count_bits_kernel) counts, for every row and level, the zeros
// of the whole row (nzeros: the partition's split point, independent of the order), resets
// the scratch and writes the tables' p = 0 column.  Then one launch does every level
// (levels_kernel): each CTA takes the next chunk of kChunk elements in (level, row, chunk)
// order from a ticket counter, waits until the previous level of its row is complete,
// scans the chunk (ballot / popc for the counts, warp shuffle scans for the weight sums),
// publishes the chunk's (zero count, zero weight sum), and adds the published sums of all
// earlier chunks of its row in a fixed tree order (never a partial prefix whose composition
// depends on timing: the sums are bitwise reproducible).  The partitioned chunk is staged in
// shared memory so that the scatter to the next order is two contiguous, coalesced runs
// (zeros, ones).  Tickets make the waits safe: a CTA only waits for smaller tickets, held by
// CTAs that are already running.  (One launch per level cost ~10 us each at 64K keys, most
// of it the launch's ramp and tail.)
#include "launch.h"
#include "phase_sync.cuh"
#include "wavelet.cuh"

namespace xsk {
namespace {

constexpr int kThreads = 256, kPerThread = 8, kChunk = kThreads * kPerThread;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
// csrc/api/sparsek_api.cpp sizes the scratch per 2048 elements: chunk_w [rows, nc] (a weight
// sum per chunk) and the int words `sync` [rows * nc status | rows * nbits done | ticket].
static_assert(kChunk == 2048, "scratch is allocated per 2048 elements");
// A chunk's published status: (level + 1) << kTagShift | zero count (<= kChunk).
constexpr int kTagShift = 16;
static_assert(kChunk < (1 << kTagShift), "count field");

// Element q of a chunk lives in warp q / 256, item (q % 256) / 32, lane q % 32: every load
// and table store of a warp touches 32 consecutive elements.
__device__ __forceinline__ int chunk_pos(int wp, int k, int lane) {
  return wp * (kPerThread * 32) + k * 32 + lane;
}

// nzeros[row, li] += zeros of bit (nbits - 1 - li) in the chunk (nzeros zeroed before);
// status[row, c] = 0 (no level published), done[row, li] = 0, the ticket = 0; the p = 0
// column of the tables = 0.
__global__ void __launch_bounds__(kThreads)
    count_bits_kernel(const int* __restrict__ r, int n, int nbits, int nc, int* status,
                      int* done, int* ticket, int* zeros, double* wsum, int* nzeros) {
  const int c = blockIdx.x, row = blockIdx.y;
  const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5;
  __shared__ int s_cnt[32];
  if (threadIdx.x < 32) s_cnt[threadIdx.x] = 0;
  const int base = c * kChunk, nvalid = min(kChunk, n - base);
  const int* rr = r + (size_t)row * n + base;
  int rv[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int q = chunk_pos(wp, k, lane);
    rv[k] = q < nvalid ? rr[q] : -1;  // -1: every bit set, never counted as a zero
  }
  __syncthreads();
  for (int b = 0; b < nbits; ++b) {
    int cnt = 0;
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) cnt += __popc(__ballot_sync(kFull, !((rv[k] >> b) & 1)));
    if (lane == 0 && cnt) atomicAdd(&s_cnt[nbits - 1 - b], cnt);
  }
  __syncthreads();
  if (threadIdx.x < nbits) {
    const int li = threadIdx.x;
    if (s_cnt[li]) atomicAdd(&nzeros[row * nbits + li], s_cnt[li]);
    if (c == 0) {
      zeros[((size_t)row * nbits + li) * (n + 1)] = 0;
      wsum[((size_t)row * nbits + li) * (n + 1)] = 0.0;
      done[row * nbits + li] = 0;
    }
  }
  if (threadIdx.x == 0) {
    status[row * nc + c] = 0;
    if (c == 0 && row == 0) *ticket = 0;
  }
}

__global__ void __launch_bounds__(kThreads)
    levels_kernel(int* r_even, double* w_even, int* r_odd, double* w_odd, int n, int nbits,
                  int nc, int nblocks, int* status, int* done, int* ticket, double* chunk_w,
                  int* zeros, double* wsum, const int* __restrict__ nzeros) {
  __shared__ int s_r[kChunk];
  __shared__ double s_w[kChunk];
  __shared__ int s_wc[kWarps];
  __shared__ double s_ww[kWarps];
  __shared__ int s_id, s_before;
  __shared__ double s_wbefore;
  const int tid = threadIdx.x, lane = tid & 31, wp = tid >> 5;

  // Ticket t: level t / nblocks, chunk (row, c) = t % nblocks.  Every chunk a CTA waits for
  // (its row's previous level, the earlier chunks of its row and level) has a smaller
  // ticket, so it belongs to a CTA that is already running.
  if (tid == 0) s_id = atomicAdd(ticket, 1);
  __syncthreads();
  const int li = s_id / nblocks, id = s_id - li * nblocks;
  const int row = id / nc, c = id - row * nc, bit = nbits - 1 - li;
  // Level li reads the order it partitions from one buffer pair and scatters the next level's
  // into the other; level li - 1 of the row (which read that other pair) is complete first.
  const int* r = (li & 1) ? r_odd : r_even;
  const double* w = (li & 1) ? w_odd : w_even;
  int* r_next = (li & 1) ? r_even : r_odd;
  double* w_next = (li & 1) ? w_even : w_odd;
  if (li > 0) cta_wait_count(done + row * nbits + li - 1, nc);
  const int base = c * kChunk, nvalid = min(kChunk, n - base);
  const int nz = nzeros[row * nbits + li];
  const int* rr = r + (size_t)row * n + base;
  const double* ww = w + (size_t)row * n + base;
  int rv[kPerThread];
  double wv[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int q = chunk_pos(wp, k, lane);
    // (L2 loads: written by other CTAs of this launch)
    rv[k] = q < nvalid ? __ldcg(rr + q) : -1;  // past the end: a "one" (never counted/written)
    wv[k] = q < nvalid ? __ldcg(ww + q) : 0.0;
  }
  // Per item k: m = the warp's zero mask, x = inclusive scan over the lanes of the zero
  // weights (Kogge-Stone, the kPerThread scans interleaved).
  unsigned m[kPerThread];
  double x[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const bool z0 = !((rv[k] >> bit) & 1);
    m[k] = __ballot_sync(kFull, z0);
    x[k] = z0 ? wv[k] : 0.0;
  }
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const double y = __shfl_up_sync(kFull, x[k], d);
      if (lane >= d) x[k] += y;
    }
  }
  // cc / cw: zeros and their weight sum in the warp's items before item k.
  int cc[kPerThread];
  double cw[kPerThread];
  int accc = 0;
  double accw = 0.0;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    cc[k] = accc;
    cw[k] = accw;
    accc += __popc(m[k]);
    accw += __shfl_sync(kFull, x[k], 31);
  }
  if (lane == 0) {
    s_wc[wp] = accc;
    s_ww[wp] = accw;
  }
  __syncthreads();
  // Every warp scans the kWarps warp totals the same way: exclusive prefix of this warp and
  // the chunk's totals.
  int tc = lane < kWarps ? s_wc[lane] : 0;
  double tw = lane < kWarps ? s_ww[lane] : 0.0;
#pragma unroll
  for (int d = 1; d < kWarps; d <<= 1) {
    const int yc = __shfl_up_sync(kFull, tc, d);
    const double yw = __shfl_up_sync(kFull, tw, d);
    if (lane >= d) {
      tc += yc;
      tw += yw;
    }
  }
  const int zc = __shfl_sync(kFull, tc, kWarps - 1);  // zeros in the chunk
  const double zw = __shfl_sync(kFull, tw, kWarps - 1);
  const int pc = __shfl_sync(kFull, tc, (wp + 31) & 31);
  const double pw = __shfl_sync(kFull, tw, (wp + 31) & 31);
  const int wexc_c = wp ? pc : 0;  // zeros in the chunk before this warp
  const double wexc_w = wp ? pw : 0.0;

  if (wp == 0) {
    // Publish this chunk, then add the earlier chunks of the row: lane l sums chunks
    // l, l + 32, ... in order, then a fixed shuffle tree.
    const int s0 = row * nc;
    if (lane == 0) {
      chunk_w[s0 + c] = zw;
      st_release(status + s0 + c, ((li + 1) << kTagShift) | zc);
    }
    int bc = 0;
    double bw = 0.0;
    for (int j = lane; j < c; j += 32) {
      int s;
      while (((s = ld_acquire(status + s0 + j)) >> kTagShift) != li + 1) {
      }
      bc += s & ((1 << kTagShift) - 1);
      bw += __ldcg(chunk_w + s0 + j);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      bc += __shfl_down_sync(kFull, bc, off);
      bw += __shfl_down_sync(kFull, bw, off);
    }
    if (lane == 0) {
      s_before = bc;
      s_wbefore = bw;
    }
  }
  // Stage the partitioned chunk: zeros at [0, zc), ones at [zc, nvalid), each in order.
  unsigned lane_le = kFull >> (31 - lane);
  int zin[kPerThread];  // zeros in the chunk up to and including this element
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int q = chunk_pos(wp, k, lane);
    zin[k] = wexc_c + cc[k] + __popc(m[k] & lane_le);
    const bool z0 = (m[k] >> lane) & 1;
    if (q < nvalid) {
      const int lpos = z0 ? zin[k] - 1 : zc + q - zin[k];
      s_r[lpos] = rv[k];
      s_w[lpos] = wv[k];
    }
  }
  __syncthreads();
  const int before = s_before;
  const double wbefore = s_wbefore;
  const size_t tab = ((size_t)row * nbits + li) * (n + 1) + base + 1;
  int* z = zeros + tab;
  double* ws = wsum + tab;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int q = chunk_pos(wp, k, lane);
    if (q < nvalid) {
      z[q] = before + zin[k];
      ws[q] = wbefore + (wexc_w + (cw[k] + x[k]));
    }
  }
  // Zeros go to [before, before + zc), ones to nz + (ones before the chunk) onwards.
  int* rn = r_next + (size_t)row * n;
  double* wn = w_next + (size_t)row * n;
  const int ones_at = nz + base - before - zc;
  for (int i = tid; i < nvalid; i += kThreads) {
    const int dest = i < zc ? before + i : ones_at + i;
    rn[dest] = s_r[i];
    wn[dest] = s_w[i];
  }
  // The row's next level may start once all its chunks have scattered: every thread's
  // stores, then one release (cumulative over the barrier) on the row's counter.
  if (li + 1 < nbits) cta_signal_count(done + row * nbits + li);
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
                                 int nbits, int* sync, double* chunk_w, int* zeros,
                                 double* wsum, int* nzeros, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (nbits < 1 || nbits > 31) return cudaErrorInvalidValue;  // status tag, s_cnt[32]
  const int nchunks = (n + kChunk - 1) / kChunk, nblocks = rows * nchunks;
  if ((long long)nblocks * nbits >= (1LL << 31)) return cudaErrorInvalidValue;  // tickets
  int* status = sync;
  int* done = status + (size_t)rows * nchunks;
  int* ticket = done + (size_t)rows * nbits;
  cudaError_t err = cudaMemsetAsync(nzeros, 0, sizeof(int) * rows * nbits, stream);
  if (err != cudaSuccess) return err;
  count_bits_kernel<<<dim3(nchunks, rows), kThreads, 0, stream>>>(r, n, nbits, nchunks, status,
                                                                    done, ticket, zeros, wsum,
                                                                    nzeros);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  levels_kernel<<<nblocks * nbits, kThreads, 0, stream>>>(r, w, r_tmp, w_tmp, n, nbits,
                                                          nchunks, nblocks, status, done, ticket,
                                                          chunk_w, zeros, wsum, nzeros);
  return cudaGetLastError();
}

}  // namespace xsk
