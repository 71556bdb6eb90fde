// The host emulation of csrc/cuda (backend "cuda_emu", FUSEDMF_CUDA_EMU=1; docs/backends.md).
//
// Included first by every emulated translation unit (csrc/cuda/emu/*_emu.cpp, which then include
// the unchanged csrc/cuda/*.cu), it lets g++ compile the CUDA sources for the host:
//   - the device code takes its __CUDA_ARCH__ branches (update_math.h's __f*_rn intrinsics and
//     f16/bf16 conversions, emulated below as exact IEEE single operations: the TUs are compiled
//     with -ffp-contract=off, so a * b + c is never fused behind the source's back);
//   - FUSEDMF_LAUNCH runs the grid on the host: blocks one after another, each block's threads as
//     fibers (cuda_emu_runtime.cpp) switched only at barriers and shuffles, in a settable order
//     (forward, reverse, seeded shuffle: a missing barrier shows in one order only);
//   - what would be undefined on a GPU throws a std::runtime_error (a Python RuntimeError):
//     barrier divergence, shuffles with inactive lanes or partial warps, an argument struct over
//     the launch limit, out-of-range launch dimensions.
// The kernels land in namespace fusedmf::cuda_emu (and their math in emu_math), so they link
// beside the real CUDA kernels of fusedmf::cuda in one fusedmf._C.
#pragma once

// Everything from the C++ library first, before __CUDACC__ is defined (glibc's headers react to it).
#include <math.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/emu/cuda_emu_runtime.h"

#define FUSEDMF_CUDA_EMU 1
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define __CUDACC_VER_MAJOR__ 13
#define __CUDACC_VER_MINOR__ 0
#define FUSEDMF_MATH_NS emu_math  // not cuda_math: nvcc's host pass defines that one differently
#define FUSEDMF_CUDA_NS cuda_emu
// The sources open `namespace cuda`; quoted #include names are not macro-expanded, so the
// includes of "cuda/..." headers are untouched.
#define cuda cuda_emu

// The toolkit's headers, where a toolkit is on the include path, must add nothing: mark them as
// included. Without a toolkit, csrc/cuda/emu/include/ (-idirafter) provides files of these names.
#define __CUDA_RUNTIME_H__
#define __CUDA_RUNTIME_API_H__
#define __CUDA_FP16_H__
#define __CUDA_BF16_H__

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
// multi_tensor_apply.cuh: the launch's argument struct, read in place by every thread
#define FUSEDMF_GRID_CONSTANT(...) const __VA_ARGS__&
// multi_tensor_apply.cuh's vector loads and stores: a misaligned one faults on a GPU
#define FUSEDMF_CHECK_VECTOR_ACCESS(p, bytes) \
  (reinterpret_cast<uintptr_t>(p) % (bytes) == 0 ? (void)0 : ::fusedmf_emu::misaligned_access(__FILE__, __LINE__, (p), (bytes)))
// One OS thread runs one block's fibers at a time, so a thread_local is that block's shared memory.
#define __shared__ static thread_local

// ---- runtime types ------------------------------------------------------------------------------
using fusedmf_emu::cudaError;
using fusedmf_emu::cudaError_t;
using fusedmf_emu::cudaErrorInvalidConfiguration;
using fusedmf_emu::cudaErrorInvalidValue;
using fusedmf_emu::cudaSuccess;
using fusedmf_emu::cudaStream_t;
using fusedmf_emu::dim3;
using fusedmf_emu::uint3;

inline cudaError_t cudaGetLastError() { return fusedmf_emu::take_last_error(); }
inline cudaError_t cudaPeekAtLastError() { return fusedmf_emu::peek_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return fusedmf_emu::error_string(e); }
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = fusedmf_emu::driver_version();
  return cudaSuccess;
}

#define threadIdx (::fusedmf_emu::tl_thread_idx)
#define blockIdx (::fusedmf_emu::tl_block_idx)
#define blockDim (::fusedmf_emu::tl_block_dim)
#define gridDim (::fusedmf_emu::tl_grid_dim)
#define warpSize 32

#define __syncthreads() (::fusedmf_emu::syncthreads(__FILE__, __LINE__, 0, ::fusedmf_emu::kSyncPlain))
#define __syncthreads_or(p) (::fusedmf_emu::syncthreads(__FILE__, __LINE__, (p) ? 1 : 0, ::fusedmf_emu::kSyncOr))
#define __syncthreads_and(p) (::fusedmf_emu::syncthreads(__FILE__, __LINE__, (p) ? 1 : 0, ::fusedmf_emu::kSyncAnd))
#define __syncthreads_count(p) (::fusedmf_emu::syncthreads(__FILE__, __LINE__, (p) ? 1 : 0, ::fusedmf_emu::kSyncCount))
#define __syncwarp(...) (::fusedmf_emu::syncwarp(__FILE__, __LINE__))

#define __shfl_sync(m, v, l, ...) (::fusedmf_emu::shfl(__FILE__, __LINE__, (m), (v), ::fusedmf_emu::kShflIdx, (l)))
#define __shfl_down_sync(m, v, d, ...) \
  (::fusedmf_emu::shfl(__FILE__, __LINE__, (m), (v), ::fusedmf_emu::kShflDown, (d)))
#define __shfl_up_sync(m, v, d, ...) (::fusedmf_emu::shfl(__FILE__, __LINE__, (m), (v), ::fusedmf_emu::kShflUp, (d)))
#define __shfl_xor_sync(m, v, x, ...) (::fusedmf_emu::shfl(__FILE__, __LINE__, (m), (v), ::fusedmf_emu::kShflXor, (x)))

// Blocks run one at a time and a block's fibers switch only at barriers and shuffles, so an
// atomic read-modify-write is a plain one here.
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;  // float: as CUDA's, a NaN operand leaves *p
  return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
inline int atomicOr(int* p, int v) {
  const int old = *p;
  *p = old | v;
  return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline void __threadfence() {}

// ---- single-rounding float operations: exact IEEE binary32, never contracted (-ffp-contract=off) ----
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float __int_as_float(int i) { return __uint_as_float(static_cast<uint32_t>(i)); }

// ---- half and bfloat16 (cuda_fp16.h / cuda_bf16.h): storage types and their conversions ----
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

// GCC's _Float16 (x86-64, GCC >= 12) converts exactly and rounds to nearest even: an implementation
// independent of update_math.h's host (c10) conversions, which the CPU backend uses.
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, sizeof(v));
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  if (f != f) return __half{0x7FFFu};  // cuda_fp16's canonical NaN
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, sizeof(h.x));
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<uint32_t>(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  if (f != f) return __nv_bfloat16{0x7FFFu};  // cuda_bf16's canonical NaN
  const uint32_t u = __float_as_uint(f);
  // round to nearest, ties to the even mantissa: add half an ulp of bf16 (less one when the
  // kept lsb is 0), then truncate; an overflow of the exponent correctly yields inf
  const uint32_t lsb = (u >> 16) & 1u;
  return __nv_bfloat16{static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16)};
}

// ---- the launch: FUSEDMF_LAUNCH(grid, block, smem, stream, kernel)(args...) ----
#define FUSEDMF_LAUNCH(grid, block, smem, stream, ...) \
  ::fusedmf_emu::make_launch(dim3(grid), dim3(block), (smem), (stream), __VA_ARGS__)

namespace fusedmf_emu {

// The size of a kernel's parameter block as nvcc lays it out: each parameter at its alignment.
template <class... P>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = (off + alignof(P) - 1) / alignof(P) * alignof(P) + sizeof(P)), ...);
  return off;
}

template <class... P>
struct Launch {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);

  template <class... A>
  void operator()(A&&... args) const {
    check_launch(grid, block, smem, param_bytes<std::decay_t<P>...>());
    // the parameters as the kernel receives them (copied once, like the argument buffer)
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto* const k = kernel;
    run_grid(grid, block, [&params, k] { std::apply(k, params); });
  }
};

template <class... P>
Launch<P...> make_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{grid, block, smem, kernel};
}

}  // namespace fusedmf_emu
