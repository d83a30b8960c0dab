// Stable sort of every row of a float32 matrix [rows, n]: the sorted values and the source
// index of each (int64), the same as torch.sort(u, dim=1, stable=True) (-0.0 and +0.0 equal,
// ties in index order).  The selection sorts 8 rows of 64K scores; torch's segmented sort
// takes ~13 launches and ~110 us of host time there, this takes two launches and a memset.
//
// LSD radix sort, four passes of 8 bits over an order-preserving uint32 image of the value,
// on chunks of kChunk elements, all passes in one launch (as wavelet_build.cu):
//   * count_digits_kernel: per row and pass, the histogram of the digit over the whole row
//     (independent of the order), so every digit's start in the row is known up front;
//   * passes_kernel: every CTA takes the next chunk in (pass, row, chunk) order from a ticket
//     counter, waits until its row's previous pass is complete, ranks its elements stably
//     within the chunk (match_any per warp and item, then across warps), publishes the
//     chunk's digit counts, adds those of the earlier chunks of its row (smaller tickets,
//     so CTAs that are already running) and scatters to the digit's place in the next order.
// Integer counts only: the result does not depend on timing.
#include "launch.h"
#include "phase_sync.cuh"

namespace xsk {
namespace {

constexpr int kThreads = 256, kPerThread = 8, kChunk = kThreads * kPerThread;
constexpr int kWarps = kThreads / 32, kBins = 256, kPasses = 4;
static_assert(kBins == kThreads, "one thread per digit value");
constexpr int kBatch = 8;  // earlier chunks' counts loaded together
constexpr unsigned kFull = 0xffffffffu;
// A published chunk count: (pass + 1) << kTagShift | count (<= kChunk).
constexpr int kTagShift = 16;

// Order-preserving image of a float (finite or infinite): -0.0 maps with +0.0.
__device__ __forceinline__ unsigned sort_key(float x) {
  unsigned b = __float_as_uint(x);
  if (b == 0x80000000u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Element q of a chunk: warp q / 256, item (q % 256) / 32, lane q % 32 (coalesced loads).
__device__ __forceinline__ int chunk_pos(int wp, int k, int lane) {
  return wp * (kPerThread * 32) + k * 32 + lane;
}

// row_hist[row, pass, digit] += the chunk's counts (zeroed before).
__global__ void __launch_bounds__(kThreads)
    count_digits_kernel(const float* __restrict__ u, int n, int* __restrict__ row_hist) {
  __shared__ int s_hist[kPasses][kBins];
  const int c = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) s_hist[p][tid] = 0;
  __syncthreads();
  const int base = c * kChunk, nvalid = min(kChunk, n - base);
  const float* ur = u + (size_t)row * n + base;
  for (int q = tid; q < nvalid; q += kThreads) {
    const unsigned key = sort_key(__ldg(ur + q));
#pragma unroll
    for (int p = 0; p < kPasses; ++p) atomicAdd(&s_hist[p][(key >> (8 * p)) & 0xff], 1);
  }
  __syncthreads();
#pragma unroll
  for (int p = 0; p < kPasses; ++p)
    if (s_hist[p][tid]) atomicAdd(&row_hist[((size_t)row * kPasses + p) * kBins + tid], s_hist[p][tid]);
}

__global__ void __launch_bounds__(kThreads)
    passes_kernel(const float* __restrict__ u, int n, int nc, int nblocks,
                  const int* __restrict__ row_hist, int* chunk_hist, int* done, int* ticket,
                  unsigned* key_a, int* idx_a, unsigned* key_b, int* idx_b,
                  float* __restrict__ out_val, int64_t* __restrict__ out_idx) {
  __shared__ int s_warp[kWarps][kBins];  // per warp: its count of each digit, then its
                                         // first position in the chunk's next order
  __shared__ int s_start[kBins];         // the digit's first position in the row's next order
  __shared__ int s_cstart[kBins];        // ... in the chunk's
  __shared__ unsigned s_key[kChunk];
  __shared__ int s_idx[kChunk];
  __shared__ int s_scan[kWarps], s_scan_c[kWarps];
  __shared__ int s_id;
  const int tid = threadIdx.x, lane = tid & 31, wp = tid >> 5;
  if (tid == 0) s_id = atomicAdd(ticket, 1);
  for (int w = 0; w < kWarps; ++w) s_warp[w][tid] = 0;
  __syncthreads();
  const int pass = s_id / nblocks, id = s_id - pass * nblocks;
  const int row = id / nc, c = id - row * nc, shift = 8 * pass;
  // pass 0 reads u; passes 1..3 read the buffer the previous pass wrote (a, b, a)
  const unsigned* key_in = (pass & 1) ? key_a : key_b;
  const int* idx_in = (pass & 1) ? idx_a : idx_b;
  unsigned* key_out = (pass & 1) ? key_b : key_a;
  int* idx_out = (pass & 1) ? idx_b : idx_a;
  if (pass > 0) cta_wait_count(done + row * kPasses + pass - 1, nc);
  const int base = c * kChunk, nvalid = min(kChunk, n - base);
  const size_t roff = (size_t)row * n;
  unsigned key[kPerThread];
  int idx[kPerThread], local[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int q = chunk_pos(wp, k, lane);
    if (q < nvalid) {
      if (pass == 0) {
        key[k] = sort_key(__ldg(u + roff + base + q));
        idx[k] = base + q;
      } else {  // (L2 loads: written by other CTAs of this launch)
        key[k] = __ldcg(key_in + roff + base + q);
        idx[k] = __ldcg(idx_in + roff + base + q);
      }
    }
  }
  // Stable rank within the warp's items, in chunk order: the elements of item k with the
  // same digit (match_any) come after the warp's earlier ones with that digit.
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const bool valid = chunk_pos(wp, k, lane) < nvalid;
    const int d = valid ? (int)((key[k] >> shift) & 0xff) : kBins;  // kBins: past the end
    const unsigned peers = __match_any_sync(kFull, d);
    const int before = valid ? s_warp[wp][d] : 0;
    local[k] = before + __popc(peers & ((1u << lane) - 1));
    __syncwarp();
    if (valid && lane == __ffs(peers) - 1) s_warp[wp][d] = before + __popc(peers);
    __syncwarp();
  }
  __syncthreads();
  // Thread tid = digit tid: exclusive prefix over the warps, the chunk's count.
  int cnt = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int x = s_warp[w][tid];
    s_warp[w][tid] = cnt;
    cnt += x;
  }
  int* my_hist = chunk_hist + ((size_t)row * nc + c) * kBins;
  st_release(my_hist + tid, ((pass + 1) << kTagShift) | cnt);
  // Exclusive scans over the 256 digits (thread tid = digit tid) of the row's histogram (the
  // digit's start in the row) and of the chunk's counts (its start in the chunk).
  const int total = row_hist[((size_t)row * kPasses + pass) * kBins + tid];
  int incl_t = total, incl_c = cnt;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int yt = __shfl_up_sync(kFull, incl_t, d), yc = __shfl_up_sync(kFull, incl_c, d);
    if (lane >= d) {
      incl_t += yt;
      incl_c += yc;
    }
  }
  if (lane == 31) {
    s_scan[wp] = incl_t;
    s_scan_c[wp] = incl_c;
  }
  // The earlier chunks' counts of this digit (smaller tickets: running CTAs).  Relaxed loads
  // in batches, so that they are in flight together (the count is the tagged word itself).
  int earlier = 0;
  const int* h = chunk_hist + (size_t)row * nc * kBins + tid;
  for (int j0 = 0; j0 < c; j0 += kBatch) {
    int v[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      v[b] = j0 + b < c ? ld_relaxed(h + (size_t)(j0 + b) * kBins) : (pass + 1) << kTagShift;
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      while ((v[b] >> kTagShift) != pass + 1) v[b] = ld_relaxed(h + (size_t)(j0 + b) * kBins);
      earlier += v[b] & ((1 << kTagShift) - 1);
    }
  }
  __syncthreads();
  int before_t = 0, before_c = 0;
  for (int w = 0; w < wp; ++w) {
    before_t += s_scan[w];
    before_c += s_scan_c[w];
  }
  s_start[tid] = before_t + incl_t - total + earlier;
  const int chunk_start = before_c + incl_c - cnt;
  s_cstart[tid] = chunk_start;
  // Stage the chunk in its next order (digit, then chunk order), so that the scatter writes
  // each digit's run contiguously.
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s_warp[w][tid] += chunk_start;
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    if (chunk_pos(wp, k, lane) >= nvalid) continue;
    const int lpos = s_warp[wp][(key[k] >> shift) & 0xff] + local[k];
    s_key[lpos] = key[k];
    s_idx[lpos] = idx[k];
  }
  __syncthreads();
  for (int i = tid; i < nvalid; i += kThreads) {
    const unsigned kv = s_key[i];
    const int d = (kv >> shift) & 0xff, dest = s_start[d] + i - s_cstart[d];
    if (pass == kPasses - 1) {
      out_val[roff + dest] = __ldg(u + roff + s_idx[i]);
      out_idx[roff + dest] = s_idx[i];
    } else {
      key_out[roff + dest] = kv;
      idx_out[roff + dest] = s_idx[i];
    }
  }
  // The row's next pass may start once all its chunks have scattered.
  if (pass + 1 < kPasses) cta_signal_count(done + row * kPasses + pass);
}

}  // namespace

size_t row_sort_scratch_ints(int rows, int n) {
  const size_t nc = (n + kChunk - 1) / kChunk;
  return (size_t)rows * kPasses * kBins + (size_t)rows * nc * kBins + (size_t)rows * kPasses + 1 +
         4 * (size_t)rows * n;
}

cudaError_t launch_row_sort(const float* u, int rows, int n, int* scratch, float* out_val,
                            int64_t* out_idx, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  const int nc = (n + kChunk - 1) / kChunk;
  const long long nblocks = (long long)rows * nc;
  if (nblocks * kPasses >= (1LL << 31)) return cudaErrorInvalidValue;  // tickets
  int* row_hist = scratch;
  int* chunk_hist = row_hist + (size_t)rows * kPasses * kBins;
  int* done = chunk_hist + (size_t)rows * nc * kBins;
  int* ticket = done + (size_t)rows * kPasses;
  const size_t sync_ints = (size_t)(ticket + 1 - scratch);
  unsigned* key_a = reinterpret_cast<unsigned*>(ticket + 1);
  int* idx_a = reinterpret_cast<int*>(key_a + (size_t)rows * n);
  unsigned* key_b = reinterpret_cast<unsigned*>(idx_a + (size_t)rows * n);
  int* idx_b = reinterpret_cast<int*>(key_b + (size_t)rows * n);
  cudaError_t err = cudaMemsetAsync(scratch, 0, sizeof(int) * sync_ints, stream);
  if (err != cudaSuccess) return err;
  count_digits_kernel<<<dim3(nc, rows), kThreads, 0, stream>>>(u, n, row_hist);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  passes_kernel<<<(unsigned)(nblocks * kPasses), kThreads, 0, stream>>>(
      u, n, nc, (int)nblocks, row_hist, chunk_hist, done, ticket, key_a, idx_a, key_b, idx_b,
      out_val, out_idx);
  return cudaGetLastError();
}

}  // namespace xsk
