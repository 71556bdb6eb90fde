// Host launch functions of SMEGA2's CUDA kernels (csrc/cuda/smega2.cu), with the conventions of
// csrc/cuda/launch.h: raw pointers validated by the binding (csrc/smega2_ops.cpp), enqueued on
// `stream` without synchronising; `scalars` (SMEGA2_SLOTS / SMEGA2_ESTIMATE_SLOTS),
// `inv_grad_scale` and `found_inf` are device pointers read by the kernels.
#pragma once

#ifndef FUSEDMF_CUDA_EMU  // csrc/cuda/emu's shim provides the runtime types instead
#include <cuda_runtime_api.h>
#endif

#include "tensor_lists.h"

#ifndef FUSEDMF_CUDA_NS
#define FUSEDMF_CUDA_NS cuda
#endif

namespace fusedmf {
namespace FUSEDMF_CUDA_NS {

// Slots kParam, kGrad, kMaster (optional), kMomentum, kGradAccumulator.
cudaError_t launch_smega2(const TensorLists& lists, DType param, DType grad, const float* scalars,
                          const float* inv_grad_scale, const float* found_inf, cudaStream_t stream);

// Slots kParam (read when there is no master), kMaster (optional, read), kMomentum,
// kGradAccumulator (read only when accumulator_coef != 0), kEstimateOut (written, dtype `out`).
cudaError_t launch_smega2_estimate(const TensorLists& lists, DType param, DType out, const float* scalars,
                                   cudaStream_t stream);

}  // namespace FUSEDMF_CUDA_NS
}  // namespace fusedmf
