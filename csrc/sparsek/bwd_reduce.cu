// Backward, pass 3: for every (group, key), add the key's partial dK / dV / score-gradient
// slots (written by bwd_dkv_kernel) in a fixed order -> deterministic results.
#include "launch.h"

namespace xsk {
namespace {

// Entries of key j of head s: order[off[s * NK + j] .. off[s * NK + j + 1]) are flat slot
// indices within a group's [ntiles * slots] slots; the groups (s, rgroup) of one head share
// the key lists, so group g reads head g / groups_per_head.
__global__ void bwd_reduce_kernel(const float* part_kv, const float* part_u,
                                  const int64_t* off, const int64_t* order, int NK, int D,
                                  int groups_per_head, int64_t group_slots, float* dk, float* dv,
                                  float* du) {
  const int j = blockIdx.x, g = blockIdx.y, s = g / groups_per_head;
  const int64_t a = off[(size_t)s * NK + j], b = off[(size_t)s * NK + j + 1];
  const float* base = part_kv + (size_t)g * group_slots * 2 * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sk = 0.f, sv = 0.f;
    for (int64_t e = a; e < b; ++e) {
      const float* src = base + order[e] * 2 * D;
      sk += src[d];
      sv += src[D + d];
    }
    dk[((size_t)g * NK + j) * D + d] = sk;
    dv[((size_t)g * NK + j) * D + d] = sv;
  }
  if (threadIdx.x == 0) {
    float su = 0.f;
    for (int64_t e = a; e < b; ++e) su += part_u[(size_t)g * group_slots + order[e]];
    du[(size_t)g * NK + j] = su;
  }
}

}  // namespace

cudaError_t launch_bwd_reduce(const float* part_kv, const float* part_u, const int64_t* off,
                              const int64_t* order, int groups, int groups_per_head, int NK,
                              int D, int64_t group_slots, float* dk, float* dv, float* du,
                              cudaStream_t stream) {
  if (groups == 0 || NK == 0) return cudaSuccess;
  dim3 grid(NK, groups);
  bwd_reduce_kernel<<<grid, 128, 0, stream>>>(part_kv, part_u, off, order, NK, D,
                                              groups_per_head, group_slots, dk, dv, du);
  return cudaGetLastError();
}

}  // namespace xsk
