// The runtime of the host emulation of csrc/cuda (csrc/cuda/emu/cuda_emu.h): launch checks, the
// fiber scheduler that runs a block's threads, barriers, shuffles, and the settings that tests
// change from Python (thread order, argument limit, driver version; fusedmf._C._cuda_emu_*).
// Plain C++: included by the emulated TUs (through cuda_emu.h) and by the binding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace fusedmf_emu {

enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
using cudaError_t = cudaError;
struct CUstream_emu;
using cudaStream_t = CUstream_emu*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The current fiber's coordinates (one OS thread runs one fiber at a time).
extern thread_local uint3 tl_thread_idx;
extern thread_local uint3 tl_block_idx;
extern thread_local dim3 tl_block_dim;
extern thread_local dim3 tl_grid_dim;

cudaError_t take_last_error();
cudaError_t peek_last_error();
const char* error_string(cudaError_t e);

// ---- settings (from Python: fusedmf._C._cuda_emu_set_*) ----
enum class ThreadOrder { kForward, kReverse, kShuffle };
void set_thread_order(ThreadOrder order, uint64_t seed);
ThreadOrder thread_order();
void set_param_limit(size_t bytes);  // 32764 (CUDA >= 12.1, sm_70+) or 4096 (older drivers)
size_t param_limit();
void set_driver_version(int v);
int driver_version();
int64_t launches();  // kernel launches emulated since load

// ---- launches ----
// Throws std::runtime_error for what a GPU would refuse or leave undefined.
void check_launch(dim3 grid, dim3 block, size_t smem, size_t param_bytes);

using BlockBody = void (*)(void* ctx);
void run_grid_erased(dim3 grid, dim3 block, BlockBody body, void* ctx);

template <class F>
void run_grid(dim3 grid, dim3 block, F&& f) {
  using Fn = std::remove_reference_t<F>;
  run_grid_erased(grid, block, [](void* ctx) { (*static_cast<Fn*>(ctx))(); }, const_cast<void*>(static_cast<const void*>(&f)));
}

// A vector access of `bytes` at `p`, not aligned to its size: what a GPU faults on. Throws.
[[noreturn]] void misaligned_access(const char* file, int line, const void* p, size_t bytes);

// ---- barriers and shuffles: suspend the calling fiber until its block / warp arrives ----
enum SyncKind { kSyncPlain, kSyncOr, kSyncAnd, kSyncCount };
int syncthreads(const char* file, int line, int pred, SyncKind kind);
void syncwarp(const char* file, int line);

enum ShflKind { kShflIdx, kShflDown, kShflUp, kShflXor };
// Exchanges 8 bytes among the 32 lanes of the caller's warp; returns the source lane's bytes.
uint64_t shfl_bits(const char* file, int line, unsigned mask, uint64_t bits, ShflKind kind, int arg);

template <class T>
T shfl(const char* file, int line, unsigned mask, T v, ShflKind kind, int arg) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "emulated shuffle of 1-8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_bits(file, line, mask, bits, kind, arg);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace fusedmf_emu
