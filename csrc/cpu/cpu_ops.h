// CPU entry points called by csrc/bindings.cpp once it has validated every tensor. Pointers are
// host pointers; `scalars`, `inv_grad_scale` and `found_inf` are read on the host (nullptr: absent).
#pragma once

#include <string>

#include "tensor_lists.h"

namespace fusedmf {
namespace cpu {

void mf_sgd(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
            const float* found_inf);

void mf_adam(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
             const float* found_inf);

// Tensors in lists.ptrs[0]; sets *found_inf = 1 if any element is inf or NaN, never clears it.
void non_finite_check(const TensorLists& lists, DType dtype, float* found_inf);

// NOTE [cpu capability]: "avx2" or "base", chosen on first use.
const char* capability();
// For tests: force "base" or "avx2" (false if this machine or build cannot run it).
bool set_capability(const std::string& name);

}  // namespace cpu
}  // namespace fusedmf
