// The raw view of one call's tensor lists that the binding hands to the CPU loops and to the CUDA
// launchers, after it has validated every tensor (docs/style.md: kernels see plain structs, not tensors).
#pragma once

#include <cstdint>
#include <type_traits>

#include "update_math.h"

namespace fusedmf {

struct TensorLists {
  int64_t num_tensors = 0;
  // numels[i]: elements of tensor i of every list (same shape and layout within tuple i).
  // Zero-size tensors are skipped by every consumer.
  const int64_t* numels = nullptr;
  // ptrs[slot][i]: first element of tensor i of list `slot` (kParam, kGrad, kMaster, ...); dense
  // memory, so elements are contiguous from there. ptrs[slot] == nullptr: the list is absent.
  void* const* ptrs[kMaxSlots] = {};

  bool has(int slot) const { return ptrs[slot] != nullptr; }
};

// The one mapping from DType to storage type on the kernel side: f(float{}), f(f16{}) or f(bf16{}).
// The binding has already rejected every other dtype (its error lists the supported combinations).
template <class F>
auto visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F16:
      return f(f16{});
    case DType::BF16:
      return f(bf16{});
    case DType::F32:
    default:
      return f(float{});
  }
}

// f(std::true_type{}) or f(std::false_type{}): turns a runtime flag into a template argument.
template <class F>
auto visit_bool(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

}  // namespace fusedmf
