// The backward's two small passes around the kernels of bwd_kernel.cuh / sm90/:
//   pass 0, delta = rowsum(dout * out) per (row, head) in fp32 (the products of two 16-bit
//   values are exact in fp32; a fixed order and shuffle tree per row: deterministic), read
//   once from the 16-bit tensors instead of through fp32 copies of both;
//   pass 3, for every (group, key), the sum of the key's partial dK / dV / score-gradient
//   slots (written by the dk/dv pass) in a fixed order -> deterministic results.
#include "convert.cuh"
#include "launch.h"

namespace xsk {
namespace {

// delta[(s * R + r) * NQ + i] = sum_d dout[i, s, r, d] * out[i, s, r, d].  A row's D
// elements are read as 16-byte vectors by kLanes = D / 8 lanes (32 / kLanes rows per warp
// load), each warp issuing the loads of kUnroll such row groups before summing any, then a
// fixed shuffle tree per row.  The pass is bound by the bytes in flight: a warp per row with
// 8-byte loads took 0.49 ms at 64K (~2.2 TB/s of the H200's ~4.8).
template <typename T, int D>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const T* dout, const T* out, int NQ, int S,
                                                        int R, int64_t do_sn, int64_t do_ss,
                                                        int64_t do_sr, int64_t o_sn, int64_t o_ss,
                                                        int64_t o_sr, float* delta) {
  constexpr int kLanes = D / 8, kRowsPerLoad = 32 / kLanes, kUnroll = 4;
  const int64_t rows = (int64_t)NQ * S * R;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t first =
      ((int64_t)blockIdx.x * 8 + warp) * (kRowsPerLoad * kUnroll) + lane / kLanes;
  const int col = (lane % kLanes) * 8;
  // (i, s, r) of this lane's first row by division, then stepped: a 64-bit division is a
  // ~70-instruction call, and one per row made the pass slower than a warp per row)
  int64_t i = first / ((int64_t)S * R);
  int s = (int)((first / R) % S), r = (int)(first % R);
  uint4 a[kUnroll], b[kUnroll];
  int64_t dst[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t row = first + u * kRowsPerLoad;
    a[u] = b[u] = make_uint4(0u, 0u, 0u, 0u);
    dst[u] = ((int64_t)s * R + r) * NQ + i;
    if (row < rows) {
      a[u] = *reinterpret_cast<const uint4*>(dout + i * do_sn + s * do_ss + r * do_sr + col);
      b[u] = *reinterpret_cast<const uint4*>(out + i * o_sn + s * o_ss + r * o_sr + col);
    }
    for (r += kRowsPerLoad; r >= R;) {  // the next row group's (i, s, r)
      r -= R;
      if (++s == S) s = 0, ++i;
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const T* x = reinterpret_cast<const T*>(&a[u]);
    const T* y = reinterpret_cast<const T*>(&b[u]);
    float acc = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(x[e]) * to_float(y[e]);
#pragma unroll
    for (int o = kLanes / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane % kLanes == 0 && first + u * kRowsPerLoad < rows) delta[dst[u]] = acc;
  }
}

// Entries of key j of head s: order[off[s * NK + j] .. off[s * NK + j + 1]) are flat slot
// indices within a group's [ntiles * slots] slots; the groups (s, rgroup) of one head share
// the key lists, so group g reads head g / groups_per_head.  Group g's sums go to head
// rgroup * heads_per_group of dk / dv [NK, S, R, D] (16-bit, rounded once, here), its other
// heads get zeros: autograd's sum over the stride-0 expansion of K / V adds the heads.
// (Written here instead of an fp32 [G, NK, D] result that PyTorch zero-filled, copied and
// converted into the expanded layout: ~0.8 ms of the 64K backward.)
template <typename T>
__global__ void bwd_reduce_kernel(const float* part_kv, const float* part_u,
                                  const int64_t* off, const int64_t* order, int NK, int D,
                                  int groups_per_head, int heads_per_group, int64_t group_slots,
                                  T* dk, T* dv, int64_t o_sn, int64_t o_ss, int64_t o_sr,
                                  float* du) {
  const int j = blockIdx.x, g = blockIdx.y, s = g / groups_per_head;
  const int r0 = (g % groups_per_head) * heads_per_group;
  const int64_t a = off[(size_t)s * NK + j], b = off[(size_t)s * NK + j + 1];
  const float* base = part_kv + (size_t)g * group_slots * 2 * D;
  T* dk_row = dk + j * o_sn + s * o_ss + r0 * o_sr;
  T* dv_row = dv + j * o_sn + s * o_ss + r0 * o_sr;
  // kBatch slots' loads in flight before their adds (in slot order: the same sums; a key
  // has ~6 slots at 64K, so the batch is predicated, not a main loop and a tail): one slot
  // at a time left the loads latency-bound (2.06 ms at 64K, ~1 ms of DRAM traffic).  Thread
  // d < D sums column d of dK and dV; thread 0 also sums the score gradient, its loads in
  // the same batch (a loop of its own after the columns' added one more trip to memory).
  constexpr int kBatch = 8;
  const int d = threadIdx.x;  // the launch has blockDim.x >= D
  const bool sums_column = d < D, sums_u = d == 0;
  const float* pu = part_u + (size_t)g * group_slots;
  float sk = 0.f, sv = 0.f, su = 0.f;
  for (int64_t e0 = a; e0 < b; e0 += kBatch) {
    float xk[kBatch] = {}, xv[kBatch] = {}, xu[kBatch] = {};
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (e0 + i < b) {
        const int64_t slot = order[e0 + i];
        if (sums_column) {
          xk[i] = base[slot * 2 * D + d];
          xv[i] = base[slot * 2 * D + D + d];
        }
        if (sums_u) xu[i] = pu[slot];
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      if (e0 + i < b) {
        sk += xk[i];
        sv += xv[i];
        su += xu[i];
      }
    }
  }
  if (sums_column) {
    dk_row[d] = from_float<T>(sk);
    dv_row[d] = from_float<T>(sv);
    for (int i = 1; i < heads_per_group; ++i) {
      dk_row[i * o_sr + d] = from_float<T>(0.f);
      dv_row[i * o_sr + d] = from_float<T>(0.f);
    }
  }
  if (sums_u) du[(size_t)g * NK + j] = su;
}

}  // namespace

cudaError_t launch_bwd_delta(const void* dout, const void* out, int dtype, int head_dim, int NQ,
                             int S, int R, int64_t do_sn, int64_t do_ss, int64_t do_sr,
                             int64_t o_sn, int64_t o_ss, int64_t o_sr, float* delta,
                             cudaStream_t stream) {
  const int64_t rows = (int64_t)NQ * S * R;
  if (rows == 0) return cudaSuccess;
  if (head_dim != 64 && head_dim != 128) return cudaErrorInvalidValue;
  const int64_t rows_per_block = 8 * (32 / (head_dim / 8)) * 4;  // warps x rows per load x kUnroll
  const dim3 grid((unsigned)((rows + rows_per_block - 1) / rows_per_block));
  auto run = [&](auto kernel, auto type_tag) {
    using T = decltype(type_tag);
    kernel<<<grid, 256, 0, stream>>>(static_cast<const T*>(dout), static_cast<const T*>(out), NQ,
                                     S, R, do_sn, do_ss, do_sr, o_sn, o_ss, o_sr, delta);
    return cudaGetLastError();
  };
  if (dtype == 1) {
    if (head_dim == 64) return run(bwd_delta_kernel<__nv_bfloat16, 64>, __nv_bfloat16{});
    if (head_dim == 128) return run(bwd_delta_kernel<__nv_bfloat16, 128>, __nv_bfloat16{});
  } else {
    if (head_dim == 64) return run(bwd_delta_kernel<__half, 64>, __half{});
    if (head_dim == 128) return run(bwd_delta_kernel<__half, 128>, __half{});
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_bwd_reduce(const float* part_kv, const float* part_u, const int64_t* off,
                              const int64_t* order, int groups, int groups_per_head,
                              int heads_per_group, int NK, int D, int64_t group_slots, int dtype,
                              void* dk, void* dv, int64_t o_sn, int64_t o_ss, int64_t o_sr,
                              float* du, cudaStream_t stream) {
  if (groups == 0 || NK == 0) return cudaSuccess;
  constexpr int kThreads = 128;  // one thread per column of dK / dV
  if (D > kThreads) return cudaErrorInvalidValue;
  dim3 grid(NK, groups);
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    bwd_reduce_kernel<T><<<grid, kThreads, 0, stream>>>(
        part_kv, part_u, off, order, NK, D, groups_per_head, heads_per_group, group_slots,
        static_cast<T*>(dk), static_cast<T*>(dv), o_sn, o_ss, o_sr, du);
    return cudaGetLastError();
  };
  return dtype == 1 ? run(__nv_bfloat16{}) : run(__half{});
}

}  // namespace xsk
