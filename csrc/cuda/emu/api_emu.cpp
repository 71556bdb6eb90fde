// The emulated launchers behind csrc/cuda/emu/emu_api.h, and the shim's test-only kernels.
#include "cuda/emu/cuda_emu.h"
// after the shim (namespace cuda -> cuda_emu)
#include "average.h"
#include "cuda/emu/emu_api.h"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/smega2.h"

namespace fusedmf {
namespace cuda_emu_api {

int mf_sgd(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
           const float* found_inf) {
  return cuda_emu::launch_mf_sgd(lists, param, grad, scalars, inv_grad_scale, found_inf, nullptr);
}
int mf_adam(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
            const float* found_inf) {
  return cuda_emu::launch_mf_adam(lists, param, grad, scalars, inv_grad_scale, found_inf, nullptr);
}
int non_finite_check(const TensorLists& lists, DType dtype, float* found_inf, float* sumsq) {
  return cuda_emu::launch_non_finite_check(lists, dtype, found_inf, sumsq, nullptr);
}
int pack(const TensorLists& lists, DType grad, DType out, float scale, float* sumsq) {
  return cuda_emu::launch_pack(lists, grad, out, scale, sumsq, nullptr);
}
int smega2(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
           const float* found_inf) {
  return cuda_emu::launch_smega2(lists, param, grad, scalars, inv_grad_scale, found_inf, nullptr);
}
int smega2_estimate(const TensorLists& lists, DType param, DType out, const float* scalars) {
  return cuda_emu::launch_smega2_estimate(lists, param, out, scalars, nullptr);
}
int pack_delta(const TensorLists& lists, DType source, DType out, float scale) {
  return cuda_emu::launch_pack_delta(lists, source, out, scale, nullptr);
}
int apply_average(const TensorLists& lists, DType avg, DType param, bool update_consensus) {
  return cuda_emu::launch_apply_average(lists, avg, param, update_consensus, nullptr);
}

namespace {

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void early_exit_barrier_kernel(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_kernel(float* out, unsigned mask) {
  out[threadIdx.x] = __shfl_down_sync(mask, 1.0f, 1);
}

struct Big {
  char bytes[5000];
};
__global__ void big_args_kernel(const __grid_constant__ Big big, float* out) { out[0] = big.bytes[0]; }

__global__ void vector_load_kernel(const float* in, float* out) {
  float r[cuda_emu::kIlp];
  cuda_emu::load_pack(in, r);
  out[threadIdx.x] = r[0];
}

__global__ void block_sum_kernel(float* out) {
  const float total = cuda_emu::block_sum(1.0f);
  if (threadIdx.x == 0) *out = total;
}

}  // namespace

double selftest(const char* name_c) {
  const std::string name(name_c);
  alignas(16) static thread_local float out[2048];
  if (name == "divergent_barrier") {
    FUSEDMF_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(out);
  } else if (name == "early_exit_barrier") {
    FUSEDMF_LAUNCH(1, 64, 0, nullptr, early_exit_barrier_kernel)(out);
  } else if (name == "partial_warp_shuffle") {
    FUSEDMF_LAUNCH(1, 48, 0, nullptr, shuffle_kernel)(out, 0xFFFFFFFFu);
  } else if (name == "partial_mask_shuffle") {
    FUSEDMF_LAUNCH(1, 64, 0, nullptr, shuffle_kernel)(out, 0x0000FFFFu);
  } else if (name == "full_shuffle") {
    FUSEDMF_LAUNCH(1, 64, 0, nullptr, shuffle_kernel)(out, 0xFFFFFFFFu);
    return out[31];  // lane 31 has no lane 32 below it: its own value
  } else if (name == "misaligned_vector_load") {
    FUSEDMF_LAUNCH(1, 32, 0, nullptr, vector_load_kernel)(out + 1, out + 64);  // out: 16-byte aligned
  } else if (name == "aligned_vector_load") {
    out[4] = 3.0f;
    FUSEDMF_LAUNCH(1, 32, 0, nullptr, vector_load_kernel)(out + 4, out + 64);
    return out[64];
  } else if (name == "oversize_args") {
    Big big{};
    FUSEDMF_LAUNCH(1, 32, 0, nullptr, big_args_kernel)(big, out);
  } else if (name == "grid_zero") {
    FUSEDMF_LAUNCH(0, 32, 0, nullptr, block_sum_kernel)(out);
  } else if (name == "grid_too_large") {
    FUSEDMF_LAUNCH(dim3(0x80000000u), 32, 0, nullptr, block_sum_kernel)(out);
  } else if (name == "block_too_large") {
    FUSEDMF_LAUNCH(1, 1056, 0, nullptr, block_sum_kernel)(out);
  } else if (name.rfind("block_sum_", 0) == 0) {
    const int threads = std::stoi(name.substr(10));
    FUSEDMF_LAUNCH(1, threads, 0, nullptr, block_sum_kernel)(out);
    return out[0];
  } else {
    throw std::invalid_argument("fusedmf cuda_emu: no self-test named " + name);
  }
  return static_cast<double>(cudaGetLastError());
}

}  // namespace cuda_emu_api
}  // namespace fusedmf
