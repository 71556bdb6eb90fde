// Chunked multi-tensor launcher, in the spirit of apex's csrc/multi_tensor_apply.cuh.
//
// NOTE [multi-tensor launch]
// Every tensor is cut into chunks of kChunkSize elements and one thread block updates one chunk.
// The launcher packs the pointers and sizes of up to kMaxTensors tensors and the (tensor, chunk)
// pair of up to kMaxBlocks blocks into a struct passed by value as a kernel argument (no device
// allocation, no host-to-device copy, so a step can be captured in a CUDA graph), and launches
// whenever that struct is full. How many fit is NOTE [launch limits] (launch_limits.h): 32 KiB of
// arguments on a CUDA >= 12.1 driver (ResNet-50's 161 tensors in one launch), else 4 KiB. Differences from apex, each a reported bug there:
//   - sizes and offsets are int64 (apex: int), so a tensor above 2^31 elements is not corrupted;
//     only the chunk index is int32 (tensors up to 2^31 chunks = 1.4e14 elements, else an error);
//   - zero-size tensors never enter the struct, and whatever is pending at the end is always
//     launched: apex decides on its final launch inside the loop over chunks of the last tensor,
//     so an empty last tensor drops the final launch and silently skips the tensors before it
//     (TransformerEngine #3207).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensor_lists.h"

// Every kernel launch goes through FUSEDMF_LAUNCH(grid, block, smem, stream, kernel)(args...):
// under nvcc it is exactly `kernel<<<grid, block, smem, stream>>>(args...)`; the host emulation of
// these sources (backend "cuda_emu", FUSEDMF_CUDA_EMU) defines it first to run the kernel's
// blocks and threads on the CPU. Variadic so that a template kernel's commas need no parentheses.
#ifndef FUSEDMF_LAUNCH
#define FUSEDMF_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FUSEDMF_LAUNCH_IS_CUDA 1
#endif

// 32 KiB kernel arguments need nvcc >= 12.1 to compile them (and sm_70+, which every nvcc that
// builds this project targets: CUDA 13 supports sm_75 and newer only). A host emulation without
// the toolkit's headers (no CUDART_VERSION) has no compile-time limit: the driver version decides.
#if !defined(CUDART_VERSION) || CUDART_VERSION >= 12010
#define FUSEDMF_LARGE_KERNEL_ARGS 1
#else
#define FUSEDMF_LARGE_KERNEL_ARGS 0
#endif

#include "cuda/launch_limits.h"

// A kernel parameter that every thread reads in place (__grid_constant__: no per-thread copy).
// The host emulation defines it first as a const reference to its launch's one copy of the
// arguments: a by-value parameter would be copied onto every emulated thread's stack (32 KiB of
// TensorListMeta per thread, most of the emulator's time). Under nvcc the text is unchanged.
#ifndef FUSEDMF_GRID_CONSTANT
#define FUSEDMF_GRID_CONSTANT(...) const __grid_constant__ __VA_ARGS__
#endif

namespace fusedmf {
namespace cuda {

constexpr int kBlockSize = 512;
constexpr int64_t kChunkSize = 65536;  // elements per block: 128 per thread, 16 rounds of 2 x ILP-4
constexpr int kIlp = 4;
// Aligned iterations whose loads are in flight together (NOTE [ILP-4]): both iterations' vectors
// are loaded before either is computed, so each thread has 2 x kIlp elements of every list in
// flight (benchmarks/launch_model.py: a launch of few waves is bound by memory latency).
constexpr int kUnroll = 2;

// Kernel-argument limits (NOTE [launch limits]): the classic one, and the one of CUDA >= 12.1
// drivers on sm_70+.
constexpr int kSmallArgs = 4096;
constexpr int kLargeArgs = 32764;

// Tensors and blocks per launch, by argument limit and depth (number of lists): the rows of
// launch_limits.h, the one description that benchmarks/launch_model.py also reads.
template <int kArgBytes, int kDepth>
struct LaunchLimit;
#define FUSEDMF_DEFINE_LAUNCH_LIMIT(arg_bytes, depth, max_tensors, max_blocks) \
  template <>                                                                 \
  struct LaunchLimit<arg_bytes, depth> {                                      \
    static constexpr int kMaxTensors = max_tensors;                           \
    static constexpr int kMaxBlocks = max_blocks;                             \
  };
FUSEDMF_LAUNCH_LIMITS(FUSEDMF_DEFINE_LAUNCH_LIMIT)
#undef FUSEDMF_DEFINE_LAUNCH_LIMIT

template <int kArgBytes, int kDepth>
struct TensorListMeta {
  static constexpr int kMaxTensors = LaunchLimit<kArgBytes, kDepth>::kMaxTensors;
  static constexpr int kMaxBlocks = LaunchLimit<kArgBytes, kDepth>::kMaxBlocks;
  // One byte per block while it can name every tensor, else two.
  using TensorIndex = std::conditional_t<(kMaxTensors <= 256), uint8_t, uint16_t>;
  static_assert(kMaxTensors <= 65536, "block_to_tensor is at most uint16");
  void* ptrs[kDepth][kMaxTensors];  // ptrs[slot][t]: nullptr for an absent list
  int64_t numels[kMaxTensors];
  int32_t block_to_chunk[kMaxBlocks];
  TensorIndex block_to_tensor[kMaxBlocks];
};
// The Op argument sits beside the struct: at most 96 bytes of it under the 4 KiB limit, 316 under
// 32 KiB (multi_tensor_apply checks the sum for each Op).
#define FUSEDMF_CHECK_META_SIZE(arg_bytes, depth, max_tensors, max_blocks)                     \
  static_assert(sizeof(TensorListMeta<arg_bytes, depth>) <= (arg_bytes == kSmallArgs ? 4000 : 32448), \
                "TensorListMeta over its kernel-argument limit");
FUSEDMF_LAUNCH_LIMITS(FUSEDMF_CHECK_META_SIZE)
#undef FUSEDMF_CHECK_META_SIZE

// Whether this process may pass 32 KiB kernel arguments: a CUDA >= 12.1 driver
// (cudaDriverGetVersion() >= 12010). Queried once and cached under nvcc; under an emulated
// launch (FUSEDMF_LAUNCH defined by the includer) queried every time, so that the emulator's
// settable driver version takes effect at once.
inline bool driver_allows_large_args() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess && version >= 12010;
}
inline bool large_kernel_args() {
#if !FUSEDMF_LARGE_KERNEL_ARGS
  return false;
#elif defined(FUSEDMF_LAUNCH_IS_CUDA)
  static const bool allowed = driver_allows_large_args();
  return allowed;
#else
  return driver_allows_large_args();
#endif
}

// Minimum resident blocks per SM that an Op asks of __launch_bounds__ (its static member
// kMinBlocksPerSm; 1, no constraint, when it has none): ptxas then caps registers per thread at
// 65536 / (kBlockSize * kMinBlocksPerSm).
template <class Op, class = void>
struct MinBlocksPerSm {
  static constexpr int value = 1;
};
template <class Op>
struct MinBlocksPerSm<Op, std::void_t<decltype(Op::kMinBlocksPerSm)>> {
  static constexpr int value = Op::kMinBlocksPerSm;
};

// Lanes that chunk_apply's unaligned path loads before it computes them (a chunk type's static
// member kUnalignedLanes; kIlp, all of them, when it has none). NOTE [ILP-4].
template <class Op, class = void>
struct UnalignedLanes {
  static constexpr int value = kIlp;
};
template <class Op>
struct UnalignedLanes<Op, std::void_t<decltype(Op::kUnalignedLanes)>> {
  static constexpr int value = Op::kUnalignedLanes;
};

// One block per chunk; `op(base, begin, n)` updates elements [begin, begin + n) of the tensor
// whose data pointers (one per list) are base[0..kDepth).
template <int kArgBytes, int kDepth, class Op>
__global__ void __launch_bounds__(kBlockSize, MinBlocksPerSm<Op>::value)
    multi_tensor_kernel(FUSEDMF_GRID_CONSTANT(TensorListMeta<kArgBytes, kDepth>) meta, const Op op) {
  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numels[t] - begin;
  const int64_t n = left < kChunkSize ? left : kChunkSize;
  void* base[kDepth];
#pragma unroll
  for (int d = 0; d < kDepth; ++d) base[d] = meta.ptrs[d][t];
  op(base, begin, n);
}

// The packing loop of one argument limit. See NOTE [multi-tensor launch].
template <int kArgBytes, int kDepth, class Op>
cudaError_t multi_tensor_apply_with(const TensorLists& lists, const Op& op, cudaStream_t stream) {
  using Meta = TensorListMeta<kArgBytes, kDepth>;
  static_assert((sizeof(Meta) + alignof(Op) - 1) / alignof(Op) * alignof(Op) + sizeof(Op) <= kArgBytes,
                "kernel arguments (TensorListMeta + Op) over the launch limit");
  constexpr int64_t kMaxChunks = int64_t{1} << 31;
  Meta meta;
  int loc_tensor = 0;  // tensors in meta
  int loc_block = 0;   // blocks in meta
  cudaError_t status = cudaSuccess;
  auto launch = [&] {
    FUSEDMF_LAUNCH(loc_block, kBlockSize, 0, stream, multi_tensor_kernel<kArgBytes, kDepth, Op>)(meta, op);
    const cudaError_t e = cudaGetLastError();
    if (status == cudaSuccess) status = e;
    loc_block = 0;
  };
  for (int64_t i = 0; i < lists.num_tensors; ++i) {
    const int64_t numel = lists.numels[i];
    if (numel <= 0) continue;  // zero-size: nothing to do, and no slot taken
    const int64_t chunks = (numel + kChunkSize - 1) / kChunkSize;
    if (chunks > kMaxChunks) return cudaErrorInvalidValue;
#pragma unroll
    for (int d = 0; d < kDepth; ++d) meta.ptrs[d][loc_tensor] = lists.has(d) ? lists.ptrs[d][i] : nullptr;
    meta.numels[loc_tensor] = numel;
    ++loc_tensor;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[loc_block] = static_cast<typename Meta::TensorIndex>(loc_tensor - 1);
      meta.block_to_chunk[loc_block] = static_cast<int32_t>(c);
      ++loc_block;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = loc_tensor == Meta::kMaxTensors && last_chunk;
      const bool blocks_full = loc_block == Meta::kMaxBlocks;
      if (tensors_full || blocks_full) {
        launch();
        if (last_chunk) {
          loc_tensor = 0;
        } else {  // the current tensor continues in the next launch, as its tensor 0
#pragma unroll
          for (int d = 0; d < kDepth; ++d) meta.ptrs[d][0] = meta.ptrs[d][loc_tensor - 1];
          meta.numels[0] = meta.numels[loc_tensor - 1];
          loc_tensor = 1;
        }
      }
    }
  }
  if (loc_block > 0) launch();  // always flush what is pending
  return status;
}

// Launches `op` over every non-empty tensor of `lists` (slots 0 .. kDepth-1), with 32 KiB kernel
// arguments where the driver allows them (one launch for ResNet-50's 161 tensors), else 4 KiB.
template <int kDepth, class Op>
cudaError_t multi_tensor_apply(const TensorLists& lists, const Op& op, cudaStream_t stream) {
#if FUSEDMF_LARGE_KERNEL_ARGS
  if (large_kernel_args()) return multi_tensor_apply_with<kLargeArgs, kDepth>(lists, op, stream);
#endif
  return multi_tensor_apply_with<kSmallArgs, kDepth>(lists, op, stream);
}

// ---- loads and stores of 1 or kIlp elements, converted to / from float -------------------------

template <class T>
struct alignas(kIlp * sizeof(T)) Pack {
  T v[kIlp];
};

template <class T>
__device__ __forceinline__ bool ilp_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// A GPU faults on a vector access that is not aligned to its size ("misaligned address"); x86 does
// not, so the host emulation defines this first to raise the fault (csrc/cuda/emu/cuda_emu.h).
#ifndef FUSEDMF_CHECK_VECTOR_ACCESS
#define FUSEDMF_CHECK_VECTOR_ACCESS(p, bytes)
#endif

template <class T>
__device__ __forceinline__ void load_pack(const T* p, float (&r)[kIlp]) {
  FUSEDMF_CHECK_VECTOR_ACCESS(p, sizeof(Pack<T>));
  const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
  for (int k = 0; k < kIlp; ++k) r[k] = FUSEDMF_MATH_NS::to_float(pack.v[k]);
}

// The bits of one element, zero-extended (a 16-bit format keeps its raw IEEE / bfloat16 bits).
__device__ __forceinline__ uint32_t element_bits(float x) { return FUSEDMF_MATH_NS::float_bits(x); }
__device__ __forceinline__ uint32_t element_bits(f16 x) { return x.bits; }
__device__ __forceinline__ uint32_t element_bits(bf16 x) { return x.bits; }

// One 128-bit / 64-bit global store of 32-bit words, as PTX st.global.v4.b32 / .v2.b32 (a plain,
// weak store: SASS STG.E.128 / STG.E.64). Written in PTX because a C++ store, of a Pack or of a
// uint4 alike, reaches nvcc 13.0's optimiser as element stores that it must merge back, and with
// two iterations in flight it left one of them split into 32-bit stores in most kernels
// (tests/test_codegen.py caught it); the toolkit's __stwb is one access too but a strong one
// (STG.E.128.STRONG.SM). The host emulation copies the words.
__device__ __forceinline__ void store_global_words(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
#if defined(FUSEDMF_CUDA_EMU)
  const uint32_t w[4] = {a, b, c, d};
  std::memcpy(p, w, sizeof(w));
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
#endif
}
__device__ __forceinline__ void store_global_words(void* p, uint32_t a, uint32_t b) {
#if defined(FUSEDMF_CUDA_EMU)
  const uint32_t w[2] = {a, b};
  std::memcpy(p, w, sizeof(w));
#else
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(a), "r"(b) : "memory");
#endif
}

// Converts kIlp elements and stores them as one vector (16 B for fp32, 8 B for 16-bit types).
template <class T>
__device__ __forceinline__ void store_pack(T* p, const float (&r)[kIlp]) {
  static_assert(kIlp == 4 && (sizeof(T) == 4 || sizeof(T) == 2), "store_pack packs 4 x 32 or 4 x 16 bits");
  FUSEDMF_CHECK_VECTOR_ACCESS(p, sizeof(Pack<T>));
  uint32_t e[kIlp];
#pragma unroll
  for (int k = 0; k < kIlp; ++k) e[k] = element_bits(FUSEDMF_MATH_NS::from_float<T>(r[k]));
  if constexpr (sizeof(T) == 4) {
    store_global_words(p, e[0], e[1], e[2], e[3]);
  } else {  // little-endian: element 0 in the low half of the first word
    store_global_words(p, e[0] | (e[1] << 16), e[2] | (e[3] << 16));
  }
}

// NOTE [ILP-4]
// Each thread moves kIlp elements per iteration. When every pointer of the chunk is aligned to
// kIlp elements, they move as one vector access per list (16 B for fp32, 8 B for 16-bit types) on
// consecutive elements, kUnroll (2) iterations at a time: both loaded before either is computed,
// since memory latency, not bandwidth, bounds a launch of few waves (benchmarks/launch_model.py);
// a last odd vector goes alone. Otherwise (views at odd offsets) as kIlp scalar accesses
// blockDim.x apart, still coalesced, loaded all before any is used (apex's ILP scheme; an Op whose
// kIlp lanes of scalars would not fit its register budget loads them in groups, kUnalignedLanes).
// Every path and the chunk's tail call the same update_math.h function on registers, once per
// element and lanes in the same order, so the unrolling changes no result.
//
// An Op used with chunk_apply provides:
//   struct Frag                                       registers of kIlp elements
//   bool aligned() const                              all pointers of the chunk kIlp-aligned
//   void load_vec(Frag&, int64_t i) const             elements i .. i+kIlp-1 (aligned path)
//   void store_vec(const Frag&, int64_t i) const
//   void load(Frag&, int k, int64_t i) const          element i into lane k
//   void store(const Frag&, int k, int64_t i) const
//   void compute(Frag&, int k) const                  the update of lane k
//   optional: static constexpr int kUnalignedLanes    lanes the unaligned path loads together
//                                                     (a divisor of kIlp; kIlp when absent)
// `f` (kUnroll frags) lives across iterations: a reduction keeps its state in every frag, starts
// each at its identity, and combines f[0] .. f[kUnroll-1] after chunk_apply (the aligned loop
// feeds them all; its odd last vector, the unaligned path and the tail feed f[0]).
template <class Op>
__device__ __forceinline__ void chunk_apply(const Op& op, int64_t n, typename Op::Frag (&f)[kUnroll]) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * kIlp;
  if (op.aligned()) {
    const int64_t n_vec = n - n % kIlp;
    int64_t i = static_cast<int64_t>(threadIdx.x) * kIlp;
    static_assert(kUnroll == 2, "the aligned loop below keeps two iterations in flight");
    for (; i + stride < n_vec; i += 2 * stride) {  // i and i + stride both start a whole vector
      op.load_vec(f[0], i);
      op.load_vec(f[1], i + stride);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) op.compute(f[0], k);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) op.compute(f[1], k);
      op.store_vec(f[0], i);
      op.store_vec(f[1], i + stride);
    }
    if (i < n_vec) {  // the odd last vector of this thread
      op.load_vec(f[0], i);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) op.compute(f[0], k);
      op.store_vec(f[0], i);
    }
    for (int64_t j = n_vec + threadIdx.x; j < n; j += blockDim.x) {  // fewer than kIlp left
      op.load(f[0], 0, j);
      op.compute(f[0], 0);
      op.store(f[0], 0, j);
    }
  } else {
    constexpr int kGroup = UnalignedLanes<Op>::value;
    static_assert(kGroup > 0 && kIlp % kGroup == 0, "kUnalignedLanes must divide kIlp");
    for (int64_t i0 = 0; i0 < n; i0 += stride) {
#pragma unroll
      for (int k0 = 0; k0 < kIlp; k0 += kGroup) {  // lanes k0 .. k0+kGroup-1: loaded, computed, stored
#pragma unroll
        for (int k = k0; k < k0 + kGroup; ++k) {
          const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
          if (i < n) op.load(f[0], k, i);
        }
#pragma unroll
        for (int k = k0; k < k0 + kGroup; ++k) {
          const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
          if (i < n) op.compute(f[0], k);
        }
#pragma unroll
        for (int k = k0; k < k0 + kGroup; ++k) {
          const int64_t i = i0 + threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
          if (i < n) op.store(f[0], k, i);
        }
      }
    }
  }
}

// Sum of `x` over the block, valid in thread 0 (every thread of the block must call it). Used by
// the sums of squares of pack_ and the non-finite check (NOTE [sums of squares] in
// csrc/cpu/kernels_impl.h): one atomicAdd per block into the caller's fp32 accumulator.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[kBlockSize / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  x = 0.0f;
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;
}

}  // namespace cuda
}  // namespace fusedmf
