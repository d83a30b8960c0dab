// Host side of the Hopper producers' TMA path: tensor maps of K and V (FwdParams) and of
// Q and dO (BwdDkvParams).  The key producer (key_producer.cuh) gathers listed (top-k) keys
// one row at a time with cp.async; a contiguous run of keys (window tiles, exact mode) goes
// out as a few TMA boxes instead, which issue no per-row instructions and write the same
// 128-byte swizzled layout.  The dk/dv pass loads each full chunk of Q / dO rows so.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "../params.h"
#include "wgmma.cuh"  // (tma_load_4d)

namespace xsk {
namespace sm90 {

constexpr int kTmaKeyRows = 32;  // keys per TMA box: one producer warp's share of a tile

// cuTensorMapEncodeTiled from the driver (no link against libcuda), or nullptr.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                             cudaEnableDefault, &found);
#else  // (CUDA 12.0-12.4: the unversioned lookup, deprecated since)
    const cudaError_t err =
        cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // (not sticky; do not leave it for the launch's check)
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A tensor [N, S, R, D] (strides sn, ss, sr in elements, the last dim contiguous) as a 4-D
// map (D, R, S, N) with boxes of 64 columns x box_r heads x 1 x box_n rows, 128-byte
// swizzle: a box lands as box_r * box_n rows of 128 bytes, head-minor, in the layout of
// sw128.  A head axis with stride 0 (shared by heads) becomes an axis of extent 1 (the kernel
// reads coordinate 0 on it), so it takes boxes of one head only.
template <typename T, int D>
inline bool encode_map(const void* base, int64_t sn, int64_t ss, int64_t sr, int S, int R, int N,
                       int box_r, int box_n, TmaDesc* out) {
  const auto encode = tensor_map_encoder();
  if (!encode || N <= 0 || (sr == 0 && box_r > 1)) return false;
  constexpr int64_t kEl = sizeof(T);
  const cuuint64_t dims[4] = {(cuuint64_t)D, sr ? (cuuint64_t)R : 1, ss ? (cuuint64_t)S : 1,
                              (cuuint64_t)N};
  // (an axis of extent 1 still needs a valid stride: one row of D elements)
  const cuuint64_t strides[3] = {(cuuint64_t)((sr ? sr : D) * kEl),
                                 (cuuint64_t)((ss ? ss : D) * kEl), (cuuint64_t)(sn * kEl)};
  const cuuint32_t box[4] = {64, (cuuint32_t)box_r, 1, (cuuint32_t)box_n};
  const cuuint32_t unit[4] = {1, 1, 1, 1};
  const CUtensorMapDataType dt = std::is_same<T, __half>::value
                                     ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                     : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  static_assert(sizeof(TmaDesc) == sizeof(CUtensorMap), "TmaDesc holds a CUtensorMap");
  return encode(reinterpret_cast<CUtensorMap*>(out), dt, 4, const_cast<void*>(base), dims,
                strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The device side: the rows of a map from encode_map at (head r, selection head s, row n),
// one box per 64-column block, block cb to shared address dst + cb * block_bytes, completing
// `bar`'s transactions.  sr / ss are the tensor's strides as encode_map saw them: an axis of
// stride 0 has extent 1 in the map, so its coordinate is 0.
template <int D>
__device__ __forceinline__ void tma_load_rows(uint32_t dst, uint32_t block_bytes, const TmaDesc& map,
                                              uint64_t* bar, int64_t sr, int64_t ss, int r, int s,
                                              int n) {
#pragma unroll
  for (int cb = 0; cb < D / 64; ++cb)
    tma_load_4d(dst + cb * block_bytes, &map, bar, cb * 64, sr ? r : 0, ss ? s : 0, n);
}

// p with its K / V tensor maps (tma_keys = 1; boxes of kTmaKeyRows keys of one head), or
// with tma_keys = 0 (cp.async only) where the driver cannot encode them (sn, ss, sr must be
// multiples of 16 bytes, the base aligned).
template <typename T, int D>
inline FwdParams with_key_maps(FwdParams p) {
  p.tma_keys =
      encode_map<T, D>(p.k, p.k_sn, p.k_ss, p.k_sr, p.S, p.R, p.NK, 1, kTmaKeyRows, &p.tma_k) &&
      encode_map<T, D>(p.v, p.v_sn, p.v_ss, p.v_sr, p.S, p.R, p.NK, 1, kTmaKeyRows, &p.tma_v);
  return p;
}

// b with the Q / dO maps of the backward passes (tma_rows = 1): a box is `rows` rows, RP
// packed heads x rows / RP queries, in the kernels' row order (a dk/dv chunk, a dq
// consumer's half of the query tile).
template <typename T, int D>
inline BwdDqParams with_row_maps(BwdDqParams b, int rows) {
  const FwdParams& f = b.f;
  b.tma_rows = encode_map<T, D>(f.q, f.q_sn, f.q_ss, f.q_sr, f.S, f.R, f.NQ, f.RP,
                                rows / f.RP, &b.tma_q) &&
               encode_map<T, D>(b.dout, b.do_sn, b.do_ss, b.do_sr, f.S, f.R, f.NQ, f.RP,
                                rows / f.RP, &b.tma_do);
  return b;
}

}  // namespace sm90
}  // namespace xsk
