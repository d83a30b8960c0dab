// The backward's two small passes around the kernels of bwd_kernel.cuh / sm90/:
//   pass 0, delta = rowsum(dout * out) per (row, head) in fp32 (the products of two 16-bit
//   values are exact in fp32; one warp per row, a fixed shuffle tree: deterministic), read
//   once from the 16-bit tensors instead of through fp32 copies of both;
//   pass 3, for every (group, key), the sum of the key's partial dK / dV / score-gradient
//   slots (written by the dk/dv pass) in a fixed order -> deterministic results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "launch.h"

namespace xsk {
namespace {

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// delta[(s * R + r) * NQ + i] = sum_d dout[i, s, r, d] * out[i, s, r, d]; a warp per (i, s, r),
// lane l holding elements [l * D / 32, (l + 1) * D / 32) (D = 64 or 128: 4 or 8 bytes).
template <typename T, int D>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const T* dout, const T* out, int NQ, int S,
                                                        int R, int64_t do_sn, int64_t do_ss,
                                                        int64_t do_sr, int64_t o_sn, int64_t o_ss,
                                                        int64_t o_sr, float* delta) {
  constexpr int E = D / 32;  // elements per lane
  using Vec = typename std::conditional<E == 4, uint2, uint32_t>::type;
  const int64_t row = (int64_t)blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= (int64_t)NQ * S * R) return;
  const int r = row % R, s = (row / R) % S, i = row / ((int64_t)R * S);
  const Vec a = *reinterpret_cast<const Vec*>(dout + i * do_sn + s * do_ss + r * do_sr + lane * E);
  const Vec b = *reinterpret_cast<const Vec*>(out + i * o_sn + s * o_ss + r * o_sr + lane * E);
  const T* x = reinterpret_cast<const T*>(&a);
  const T* y = reinterpret_cast<const T*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) acc += to_float(x[e]) * to_float(y[e]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) delta[((int64_t)s * R + r) * NQ + i] = acc;
}

// Entries of key j of head s: order[off[s * NK + j] .. off[s * NK + j + 1]) are flat slot
// indices within a group's [ntiles * slots] slots; the groups (s, rgroup) of one head share
// the key lists, so group g reads head g / groups_per_head.  Group g's sums go to head
// rgroup * heads_per_group of dk / dv [NK, S, R, D] (16-bit, rounded once, here), its other
// heads get zeros: autograd's sum over the stride-0 expansion of K / V adds the heads.
// (Written here instead of an fp32 [G, NK, D] result that PyTorch zero-filled, copied and
// converted into the expanded layout: ~0.8 ms of the 64K backward.)
//
// A warp per (key, group), lane l summing elements [l V, l V + V) of dK and dV (V = D / 32:
// a key's slot in one 16- / 8-byte load per lane and tensor), kReduceBatch slots' loads in
// flight before their adds (a key has ~6 slots at 64K: the batch is predicated).  The adds
// run in slot order for each element, as one thread per element would do them.  (A
// 128-thread block per key with one slot's loads at a time took 2.06 ms at 64K for ~1 ms
// of DRAM traffic.)
constexpr int kReduceWarps = 8, kReduceBatch = 8;
template <typename T, int D>
__global__ void __launch_bounds__(kReduceWarps * 32)
    bwd_reduce_kernel(const float* part_kv, const float* part_u, const int64_t* off,
                      const int64_t* order, int NK, int groups_per_head, int heads_per_group,
                      int64_t group_slots, T* dk, T* dv, int64_t o_sn, int64_t o_ss,
                      int64_t o_sr, float* du) {
  constexpr int V = D / 32;
  static_assert(V == 2 || V == 4, "D = 64 or 128");
  using FV = typename std::conditional<V == 4, float4, float2>::type;
  using Packed = typename std::conditional<V == 4, uint2, uint32_t>::type;  // V 16-bit values
  const int lane = threadIdx.x & 31;
  const int j = blockIdx.x * kReduceWarps + (threadIdx.x >> 5), g = blockIdx.y;
  if (j >= NK) return;
  const int s = g / groups_per_head, r0 = (g % groups_per_head) * heads_per_group;
  const int64_t a = off[(size_t)s * NK + j], b = off[(size_t)s * NK + j + 1];
  const float* base = part_kv + (size_t)g * group_slots * 2 * D + lane * V;
  float sk[V], sv[V];
#pragma unroll
  for (int c = 0; c < V; ++c) sk[c] = sv[c] = 0.f;
  for (int64_t e0 = a; e0 < b; e0 += kReduceBatch) {
    FV xk[kReduceBatch], xv[kReduceBatch];
#pragma unroll
    for (int i = 0; i < kReduceBatch; ++i) {
      if (e0 + i < b) {
        const float* src = base + order[e0 + i] * 2 * D;
        xk[i] = *reinterpret_cast<const FV*>(src);
        xv[i] = *reinterpret_cast<const FV*>(src + D);
      }
    }
#pragma unroll
    for (int i = 0; i < kReduceBatch; ++i) {
      if (e0 + i < b) {
        const float* fk = reinterpret_cast<const float*>(&xk[i]);
        const float* fv = reinterpret_cast<const float*>(&xv[i]);
#pragma unroll
        for (int c = 0; c < V; ++c) {
          sk[c] += fk[c];
          sv[c] += fv[c];
        }
      }
    }
  }
  Packed pk, pv;
  T* tk = reinterpret_cast<T*>(&pk);
  T* tv = reinterpret_cast<T*>(&pv);
#pragma unroll
  for (int c = 0; c < V; ++c) {
    tk[c] = from_float<T>(sk[c]);
    tv[c] = from_float<T>(sv[c]);
  }
  const int64_t row = j * o_sn + s * o_ss + r0 * o_sr + lane * V;
  *reinterpret_cast<Packed*>(dk + row) = pk;
  *reinterpret_cast<Packed*>(dv + row) = pv;
  for (int i = 1; i < heads_per_group; ++i) {  // (+0.0 is all-zero bits in both formats)
    *reinterpret_cast<Packed*>(dk + row + i * o_sr) = Packed{};
    *reinterpret_cast<Packed*>(dv + row + i * o_sr) = Packed{};
  }
  if (lane == 0) {
    const float* pu = part_u + (size_t)g * group_slots;
    float su = 0.f;
    for (int64_t e0 = a; e0 < b; e0 += kReduceBatch) {
      float x[kReduceBatch];
#pragma unroll
      for (int i = 0; i < kReduceBatch; ++i)
        if (e0 + i < b) x[i] = pu[order[e0 + i]];
#pragma unroll
      for (int i = 0; i < kReduceBatch; ++i)
        if (e0 + i < b) su += x[i];
    }
    du[(size_t)g * NK + j] = su;
  }
}

}  // namespace

cudaError_t launch_bwd_delta(const void* dout, const void* out, int dtype, int head_dim, int NQ,
                             int S, int R, int64_t do_sn, int64_t do_ss, int64_t do_sr,
                             int64_t o_sn, int64_t o_ss, int64_t o_sr, float* delta,
                             cudaStream_t stream) {
  const int64_t rows = (int64_t)NQ * S * R;
  if (rows == 0) return cudaSuccess;
  const dim3 grid((unsigned)((rows + 7) / 8));
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
  if (D != 64 && D != 128) return cudaErrorInvalidValue;
  // (16-byte rows: the dk / dv writes are V 16-bit values per lane)
  if ((o_sn | o_ss | o_sr) % 8 != 0 || reinterpret_cast<uintptr_t>(dk) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(dv) % 16 != 0)
    return cudaErrorInvalidValue;
  dim3 grid((NK + kReduceWarps - 1) / kReduceWarps, groups);
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    auto kernel = D == 128 ? bwd_reduce_kernel<T, 128> : bwd_reduce_kernel<T, 64>;
    kernel<<<grid, kReduceWarps * 32, 0, stream>>>(
        part_kv, part_u, off, order, NK, groups_per_head, heads_per_group, group_slots,
        static_cast<T*>(dk), static_cast<T*>(dv), o_sn, o_ss, o_sr, du);
    return cudaGetLastError();
  };
  return dtype == 1 ? run(__nv_bfloat16{}) : run(__half{});
}

}  // namespace xsk
