// Host launchers implemented in the .cu files; called from csrc/api/sparsek_api.cpp.
#pragma once
#include <cuda_runtime.h>

#include "params.h"

namespace xsk {

// scores [S, NK] (strides st0 / st1; dtype 0 = fp16, 1 = bf16, 2 = fp32, 3 = fp64) as float32
// out [S, NK] contiguous, non-finite values replaced by 0 and *bad set to 1 (scores.cu).
cudaError_t launch_scores_f32(const void* in, int dtype, int64_t st0, int64_t st1, int S, int NK,
                              float* out, int* bad, cudaStream_t stream);
// Per-row wavelet matrices (see wavelet_build.cu); r / w are overwritten (ping-pong with
// r_tmp / w_tmp); scratch: chunk_w [rows, nc] and sync [rows * nc + rows * nbits + 1] ints,
// nc = ceil(n / 2048).
cudaError_t launch_wavelet_build(int* r, double* w, int* r_tmp, double* w_tmp, int rows, int n,
                                 int nbits, int* sync, double* chunk_w, int* zeros,
                                 double* wsum, int* nzeros, cudaStream_t stream);
// out[row, j] = sum of weights over [lo[j], hi[j]) of row's matrix with th_lo <= rank < th_hi
// (th_* [rows, m]; the backward's fractional-mean term, _selection.fractional_mean_sum).
cudaError_t launch_wavelet_range_sum(const int* zeros, const double* wsum, const int* nzeros,
                                     int rows, int n, int nbits, int m, const int* lo,
                                     const int* hi, const int* th_lo, const int* th_hi,
                                     double* out, cudaStream_t stream);
// Stable per-row sort of u [rows, n] (row_sort.cu): values and int64 source indices, as
// torch.sort(u, dim=1, stable=True); scratch: row_sort_scratch_ints(rows, n) ints.
size_t row_sort_scratch_ints(int rows, int n);
cudaError_t launch_row_sort(const float* u, int rows, int n, int* scratch, float* out_val,
                            int64_t* out_idx, cudaStream_t stream);
// The selection tables after the per-head sort of float32 scores (select_tables.cu): u / sv
// as float64, perm as int32, ranks = its inverse, cb, th_mid, th_mid1 (_selection.build_tables).
cudaError_t launch_select_tables(const float* u32, const float* sv32, const int64_t* perm, int S,
                                 int n, double* u64, double* sv64, int* perm32, int* ranks32,
                                 double* cb, int* th_mid, int* th_mid1, cudaStream_t stream);
cudaError_t launch_select(const SelectParams& p, cudaStream_t stream);
cudaError_t launch_build_lists(const ListParams& p, cudaStream_t stream);
// dtype: 0 = fp16, 1 = bf16. Returns cudaErrorInvalidValue for unsupported head dims.
cudaError_t launch_fwd(const FwdParams& p, int dtype, int head_dim, cudaStream_t stream);

// Whether the Hopper (sm90/) kernels run: a compute capability 9.x device, a build with
// sm_90a code, and the environment variable env_name not set to "sm80" (fwd_bf16.cu).
bool use_sm90(const char* env_name);

// Backward passes 1 and 2 (bwd_kernel.cuh; on Hopper sm90/bwd_dq_sm90.cuh and
// sm90/bwd_dkv_sm90.cuh), then the deterministic reduction of pass 2's partials
// (bwd_reduce.cu).
cudaError_t launch_bwd(const BwdDqParams& b, const BwdDkvParams& kp, int dtype, int head_dim,
                       bool hopper, cudaStream_t stream);
// Pass 0 of the backward: delta [S, R, NQ] (fp32) = rowsum(dout * out) over [NQ, S, R, D]
// rows of fp16 (dtype 0) / bf16 (dtype 1) with D = 64 / 128 (cudaErrorInvalidValue otherwise).
cudaError_t launch_bwd_delta(const void* dout, const void* out, int dtype, int head_dim, int NQ,
                             int S, int R, int64_t do_sn, int64_t do_ss, int64_t do_sr,
                             int64_t o_sn, int64_t o_ss, int64_t o_sr, float* delta,
                             cudaStream_t stream);
// Pass 3: per (group, key) ordered sums of pass 2's partials into dk / dv (16-bit, strides
// o_s*, head (g % groups_per_head) * heads_per_group, zeros on the group's other heads) and
// du (fp32 [groups, NK]).
cudaError_t launch_bwd_reduce(const float* part_kv, const float* part_u, const int64_t* off,
                              const int64_t* order, int groups, int groups_per_head,
                              int heads_per_group, int NK, int D, int64_t group_slots, int dtype,
                              void* dk, void* dv, int64_t o_sn, int64_t o_ss, int64_t o_sr,
                              float* du, cudaStream_t stream);

// One SparseKCache decode step (decode.cu); dtype 0 = fp16, 1 = bf16; head_dim 64 or 128
// (K and V); cudaErrorInvalidValue otherwise or for R > decode_max_rows().
cudaError_t launch_decode(const DecodeParams& p, int dtype, int head_dim, cudaStream_t stream);
size_t decode_update_smem_bytes(int N, int k_row_bytes, int v_row_bytes);
int decode_max_rows();
// Slots per decode_attend CTA for B * G KV heads of S slots (a multiple of its 16-slot tile),
// on a device with num_sms SMs of smem_per_sm bytes of shared memory each.
int decode_attend_slots_per_split(int BG, int S, int head_dim, int num_sms, size_t smem_per_sm);

}  // namespace xsk
