// pack_: gathers a list of gradients into one flat buffer, prescaled and cast (NOTE [pack layout]
// in fusedmf/functional/pack.py). Slot i of the buffer starts at out + offsets[i], a 16-byte
// boundary, so with 16-byte-aligned grads every chunk takes the vector path (NOTE [ILP-4]).
//
// Rounding: __fmul_rn forms the fp32 product and from_float rounds it once to the buffer's dtype
// (round to nearest even), as torch.mul(grad.float(), scale, out=slot) does: bit for bit the
// reference's values.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedmf {
namespace cuda {
namespace {

using FUSEDMF_MATH_NS::mul_rn;
using FUSEDMF_MATH_NS::to_float;

// One chunk of one grad and its slot: see chunk_apply (NOTE [ILP-4]). With kSumsq the squares of
// the fp32 products are summed on the way (NOTE [sums of squares] in csrc/cpu/kernels_impl.h).
template <class G, class O, bool kSumsq>
struct PackChunk {
  const G* grad;
  O* out;
  float scale;

  struct Frag {
    float x[kIlp];
    float sq;  // this frag's part of the thread's sum of squares, across iterations
  };

  __device__ bool aligned() const { return ilp_aligned(grad) && ilp_aligned(out); }
  __device__ void load_vec(Frag& f, int64_t i) const { load_pack(grad + i, f.x); }
  __device__ void store_vec(const Frag& f, int64_t i) const { store_pack(out + i, f.x); }
  __device__ void load(Frag& f, int k, int64_t i) const { f.x[k] = to_float(grad[i]); }
  __device__ void store(const Frag& f, int k, int64_t i) const { out[i] = FUSEDMF_MATH_NS::from_float<O>(f.x[k]); }
  __device__ void compute(Frag& f, int k) const {
    f.x[k] = mul_rn(f.x[k], scale);
    if constexpr (kSumsq) f.sq = fmaf(f.x[k], f.x[k], f.sq);
  }
};

template <class G, class O, bool kSumsq>
struct PackOp {
  float scale;
  float* sumsq;  // kSumsq: the fp32 accumulator (one atomicAdd per block)

  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    using Chunk = PackChunk<G, O, kSumsq>;
    Chunk c{static_cast<const G*>(base[kGrad]) + begin, static_cast<O*>(base[kPackOut]) + begin, scale};
    typename Chunk::Frag f[kUnroll];
    for (auto& frag : f) frag.sq = 0.0f;
    chunk_apply(c, n, f);
    if constexpr (kSumsq) {
      float sq = 0.0f;
      for (const auto& frag : f) sq += frag.sq;  // the kUnroll frags of this thread, in order
      const float total = block_sum(sq);
      if (threadIdx.x == 0) atomicAdd(sumsq, total);
    }
  }
};

static_assert(kPackOut == 0 && kGrad == 1, "pack_ launches over slots 0 and 1");

}  // namespace

cudaError_t launch_pack(const TensorLists& lists, DType grad, DType out, float scale, float* sumsq,
                        cudaStream_t stream) {
  return visit_dtype(grad, [&](auto g) {
    return visit_dtype(out, [&](auto o) {
      return visit_bool(sumsq != nullptr, [&](auto q) {
        const PackOp<decltype(g), decltype(o), decltype(q)::value> op{scale, sumsq};
        return multi_tensor_apply<2>(lists, op, stream);
      });
    });
  });
}

}  // namespace cuda
}  // namespace fusedmf
