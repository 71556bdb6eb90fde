// Sets *found_inf = 1 if any element of the tensors is inf or NaN; never clears it. Reads the bits
// only (exponent all ones), kIlp elements per access where aligned.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedmf {
namespace cuda {
namespace {

using FUSEDMF_MATH_NS::non_finite;

using FUSEDMF_MATH_NS::to_float;

// With kSumsq the squares are summed on the way (NOTE [sums of squares] in csrc/cpu/kernels_impl.h).
template <class T, bool kSumsq>
struct NonFiniteChunk {
  const T* x;

  struct Frag {
    bool bad;  // sticky over the thread's iterations (of this frag)
    float sq;  // this frag's part of the thread's sum of squares
  };

  __device__ void take(Frag& f, T v) const {
    f.bad |= non_finite(v);
    if constexpr (kSumsq) {
      const float y = to_float(v);
      f.sq = fmaf(y, y, f.sq);
    }
  }
  __device__ bool aligned() const { return ilp_aligned(x); }
  __device__ void load_vec(Frag& f, int64_t i) const {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(x + i);
#pragma unroll
    for (int k = 0; k < kIlp; ++k) take(f, pack.v[k]);
  }
  __device__ void store_vec(const Frag&, int64_t) const {}
  __device__ void load(Frag& f, int, int64_t i) const { take(f, x[i]); }
  __device__ void store(const Frag&, int, int64_t) const {}
  __device__ void compute(Frag&, int) const {}
};

template <class T, bool kSumsq>
struct NonFiniteOp {
  float* found_inf;
  float* sumsq;  // kSumsq: the fp32 accumulator (one atomicAdd per block)

  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    // Already set by an earlier check or block: nothing to learn. Read once per block, so that
    // the exit is uniform and every thread reaches __syncthreads_or below.
    __shared__ bool already_set;
    if (threadIdx.x == 0) already_set = *found_inf != 0.0f;
    __syncthreads();
    if (already_set) return;
    NonFiniteChunk<T, kSumsq> c{static_cast<const T*>(base[0]) + begin};
    typename NonFiniteChunk<T, kSumsq>::Frag f[kUnroll];
    for (auto& frag : f) frag = {false, 0.0f};
    chunk_apply(c, n, f);
    bool bad = false;
    float sq = 0.0f;
    for (const auto& frag : f) {  // the kUnroll frags of this thread, in order
      bad = bad || frag.bad;
      sq += frag.sq;
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
    if constexpr (kSumsq) {
      const float total = block_sum(sq);
      if (threadIdx.x == 0) atomicAdd(sumsq, total);
    }
  }
};

}  // namespace

cudaError_t launch_non_finite_check(const TensorLists& lists, DType dtype, float* found_inf, float* sumsq,
                                    cudaStream_t stream) {
  return visit_dtype(dtype, [&](auto x) {
    return visit_bool(sumsq != nullptr, [&](auto q) {
      const NonFiniteOp<decltype(x), decltype(q)::value> op{found_inf, sumsq};
      return multi_tensor_apply<1>(lists, op, stream);
    });
  });
}

}  // namespace cuda
}  // namespace fusedmf
