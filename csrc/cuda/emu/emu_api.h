// The emulated CUDA launchers (backend "cuda_emu"), as the bindings call them: plain C++ with no
// CUDA types, so that csrc/bindings.cpp, csrc/smega2_ops.cpp and csrc/average.cpp include this
// beside the real csrc/cuda/launch.h. Defined in csrc/cuda/emu/api_emu.cpp, which forwards to
// fusedmf::cuda_emu::launch_* (csrc/cuda/*.cu compiled with the shim). Each returns the launcher's
// cudaError_t as an int (0: success, 1: cudaErrorInvalidValue); what a GPU would leave undefined
// throws std::runtime_error (NOTE [emulated block] in cuda_emu_runtime.cpp).
#pragma once

#include <stdexcept>
#include <string>

#include "tensor_lists.h"

namespace fusedmf {
namespace cuda_emu_api {

int mf_sgd(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
           const float* found_inf);
int mf_adam(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
            const float* found_inf);
int non_finite_check(const TensorLists& lists, DType dtype, float* found_inf, float* sumsq);
int pack(const TensorLists& lists, DType grad, DType out, float scale, float* sumsq);
int smega2(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
           const float* found_inf);
int smega2_estimate(const TensorLists& lists, DType param, DType out, const float* scalars);
int pack_delta(const TensorLists& lists, DType source, DType out, float scale);
int apply_average(const TensorLists& lists, DType avg, DType param, bool update_consensus);

// Raises the bindings' error for a launcher's result (as a Python RuntimeError through torch).
inline void check_launch(const char* op, int e) {
  if (e == 1) {
    throw std::runtime_error(std::string("fusedmf.") + op +
                             ": a tensor is too large for the multi-tensor launcher (more than 2^31 chunks of 65536 "
                             "elements)");
  }
  if (e != 0) {
    throw std::runtime_error(std::string("fusedmf.") + op + ": emulated CUDA kernel launch failed with error " +
                             std::to_string(e));
  }
}

// Test-only kernels that do what a GPU leaves undefined (tests/test_cuda_emu.py): "divergent_barrier",
// "early_exit_barrier", "partial_warp_shuffle", "partial_mask_shuffle", "oversize_args", "grid_zero",
// "grid_too_large", "block_too_large", and "block_sum_<threads>" (returns block_sum of 1.0 per
// thread). Throws for an unknown name.
double selftest(const char* name);

}  // namespace cuda_emu_api
}  // namespace fusedmf
