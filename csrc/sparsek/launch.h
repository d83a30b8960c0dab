// Host launchers implemented in the .cu files; called from csrc/api/sparsek_api.cpp.
#pragma once
#include <cuda_runtime.h>

#include "params.h"

namespace xsk {

cudaError_t launch_select(const SelectParams& p, cudaStream_t stream);
cudaError_t launch_build_lists(const ListParams& p, cudaStream_t stream);
// dtype: 0 = fp16, 1 = bf16. Returns cudaErrorInvalidValue for unsupported head dims.
cudaError_t launch_fwd(const FwdParams& p, int dtype, int head_dim, cudaStream_t stream);

}  // namespace xsk
