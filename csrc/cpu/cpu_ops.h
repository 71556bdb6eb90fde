// CPU entry points called by csrc/bindings.cpp once it has validated every tensor. Pointers are
// host pointers; `scalars`, `inv_grad_scale` and `found_inf` are read on the host (nullptr: absent).
#pragma once

#include <string>

#include "tensor_lists.h"

namespace fusedmf {
namespace cpu {

void mf_sgd(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
            const float* found_inf);

// AMSGrad when lists.has(kMaxExpAvgSq).
void mf_adam(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
             const float* found_inf);

// Tensors in lists.ptrs[0]; sets *found_inf = 1 if any element is inf or NaN, never clears it.
// sumsq (nullptr: not wanted): adds the sum of the squares of the elements to *sumsq; meaningless
// when found_inf is or becomes set (NOTE [sums of squares] in kernels_impl.h).
void non_finite_check(const TensorLists& lists, DType dtype, float* found_inf, float* sumsq);

// pack_ (NOTE [pack layout] in fusedmf/functional/pack.py): for every tensor i, writes
// cast(float(grad_i[k]) * scale) to out_i[k], where lists.ptrs[kGrad][i] is the dense grad and
// lists.ptrs[kPackOut][i] the start of its slot; grad_dtypes[i] is the dtype of grad i (grads may
// mix dtypes), `out` that of the buffer. One parallel region for the whole call. sumsq (nullptr: not
// wanted): adds the sum of the squared fp32 products, before the cast, to *sumsq.
void pack(const TensorLists& lists, const DType* grad_dtypes, DType out, float scale, float* sumsq);

// SMEGA2's master step (slots kParam, kGrad, kMaster, kMomentum, kGradAccumulator) and its
// look-ahead estimate (kParam or kMaster read, kMomentum, kGradAccumulator, kEstimateOut written).
// `weights` is the dtype read by the estimate (F32 with masters), `out` that of kEstimateOut.
void smega2(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
            const float* found_inf);
void smega2_estimate(const TensorLists& lists, DType weights, DType out, const float* scalars);

// NOTE [cpu capability]: "avx2" or "base", chosen on first use.
const char* capability();
// For tests: force "base" or "avx2" (false if this machine or build cannot run it).
bool set_capability(const std::string& name);

}  // namespace cpu
}  // namespace fusedmf
