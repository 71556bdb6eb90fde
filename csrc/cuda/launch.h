// Host launch functions of the CUDA kernels: plain C++ with raw pointers, no ATen, no pybind11,
// so that csrc/cuda/*.cu stay quick to compile and csrc/bindings.cpp is the only file that sees
// both torch and these kernels.
//
// Every function enqueues its kernels on `stream` and returns without synchronising:
//   lists            host arrays of device pointers and int64 numels (csrc/tensor_lists.h),
//                    already validated by the binding; zero-size tensors are skipped
//   param, grad      element types of the kParam / kGrad lists (masters and states are fp32)
//   scalars          device pointer to the per-step fp32 scalar vector (SGD_SLOTS / ADAM_SLOTS)
//   inv_grad_scale   device pointer to one fp32, or nullptr
//   found_inf        device pointer to one fp32, or nullptr; NOTE [skip on overflow]
// Kernels read all three from device memory, so a step can be captured in a CUDA graph and
// replayed with new scalar values.
// The return value is cudaGetLastError() after the last launch (cudaErrorInvalidValue if a
// tensor is too large for the launcher's int32 chunk index, see multi_tensor_apply.cuh).
#pragma once

#include <cuda_runtime_api.h>

#include "tensor_lists.h"

namespace fusedmf {
namespace cuda {

cudaError_t launch_mf_sgd(const TensorLists& lists, DType param, DType grad, const float* scalars,
                          const float* inv_grad_scale, const float* found_inf, cudaStream_t stream);

cudaError_t launch_mf_adam(const TensorLists& lists, DType param, DType grad, const float* scalars,
                           const float* inv_grad_scale, const float* found_inf, cudaStream_t stream);

// Tensors in lists.ptrs[0], all of `dtype`. Writes 1.0f to *found_inf if it sees an inf or a NaN;
// never clears it. sumsq (device pointer, or nullptr): adds the sum of the squares of the elements
// (meaningless once found_inf is set; NOTE [sums of squares] in csrc/cpu/kernels_impl.h).
cudaError_t launch_non_finite_check(const TensorLists& lists, DType dtype, float* found_inf, float* sumsq,
                                    cudaStream_t stream);

// pack_ (NOTE [pack layout] in fusedmf/functional/pack.py): for every tensor i, writes
// cast(float(grad_i[k]) * scale) to out_i[k], where lists.ptrs[kGrad][i] is the dense grad (all of
// dtype `grad`) and lists.ptrs[kPackOut][i] the start of its slot in the buffer (dtype `out`).
// One multi-tensor launch (several only when its kernel-argument struct fills up, NOTE
// [multi-tensor launch]). `scale` is a kernel argument, so a captured graph replays it unchanged.
// sumsq (device pointer, or nullptr): adds the sum of the squared fp32 products, before the cast.
cudaError_t launch_pack(const TensorLists& lists, DType grad, DType out, float scale, float* sumsq,
                        cudaStream_t stream);

// The nvcc that compiled the kernels, as major * 1000 + minor * 10 (CUDART_VERSION's encoding).
int nvcc_version();

}  // namespace cuda
}  // namespace fusedmf
