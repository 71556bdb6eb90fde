// pack_delta_ and apply_average_ on the GPU: the fused model averaging of fusedmf.comm.LocalSGD
// (csrc/average.h; spec fusedmf/functional/average.py; NOTE [model averaging rounding] in
// csrc/update_math.h). One multi-tensor launch per call (NOTE [multi-tensor launch]); every chunk
// of 16-byte-aligned tensors takes the vector path (NOTE [ILP-4]).
#include <cuda_runtime.h>

#include "average.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedmf {
namespace cuda {
namespace {

using FUSEDMF_MATH_NS::average_apply;
using FUSEDMF_MATH_NS::delta_pack;
using FUSEDMF_MATH_NS::from_float;
using FUSEDMF_MATH_NS::to_float;

// out = cast((float(source) - consensus) * scale) over one chunk.
template <class S, class O>
struct DeltaChunk {
  const S* source;
  const float* consensus;
  O* out;
  float scale;

  struct Frag {
    float w[kIlp];
    float c[kIlp];
  };

  __device__ bool aligned() const { return ilp_aligned(source) && ilp_aligned(consensus) && ilp_aligned(out); }
  __device__ void load_vec(Frag& f, int64_t i) const {
    load_pack(source + i, f.w);
    load_pack(consensus + i, f.c);
  }
  __device__ void store_vec(const Frag& f, int64_t i) const { store_pack(out + i, f.w); }
  __device__ void load(Frag& f, int k, int64_t i) const {
    f.w[k] = to_float(source[i]);
    f.c[k] = consensus[i];
  }
  __device__ void store(const Frag& f, int k, int64_t i) const { out[i] = from_float<O>(f.w[k]); }
  __device__ void compute(Frag& f, int k) const { f.w[k] = delta_pack(f.w[k], f.c[k], scale); }
};

template <class S, class O>
struct DeltaOp {
  float scale;
  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    DeltaChunk<S, O> c{static_cast<const S*>(base[kDeltaSource]) + begin,
                       static_cast<const float*>(base[kDeltaConsensus]) + begin,
                       static_cast<O*>(base[kDeltaOut]) + begin, scale};
    typename DeltaChunk<S, O>::Frag f[kUnroll];
    chunk_apply(c, n, f);
  }
};

// m = consensus + float(avg); master = m; param = cast(m); consensus = m (kUpdate) over one chunk.
template <class A, class P, bool kMaster, bool kUpdate>
struct ApplyChunk {
  const A* avg;
  float* consensus;
  float* master;
  P* param;

  struct Frag {
    float a[kIlp];
    float c[kIlp];
  };

  __device__ bool aligned() const {
    return ilp_aligned(avg) && ilp_aligned(consensus) && ilp_aligned(param) && (!kMaster || ilp_aligned(master));
  }
  __device__ void load_vec(Frag& f, int64_t i) const {
    load_pack(avg + i, f.a);
    load_pack(consensus + i, f.c);
  }
  __device__ void store_vec(const Frag& f, int64_t i) const {
    if constexpr (kUpdate) store_pack(consensus + i, f.c);
    if constexpr (kMaster) store_pack(master + i, f.c);
    store_pack(param + i, f.c);
  }
  __device__ void load(Frag& f, int k, int64_t i) const {
    f.a[k] = to_float(avg[i]);
    f.c[k] = consensus[i];
  }
  __device__ void store(const Frag& f, int k, int64_t i) const {
    if constexpr (kUpdate) consensus[i] = f.c[k];
    if constexpr (kMaster) master[i] = f.c[k];
    param[i] = from_float<P>(f.c[k]);
  }
  __device__ void compute(Frag& f, int k) const { f.c[k] = average_apply(f.c[k], f.a[k]); }
};

template <class A, class P, bool kMaster, bool kUpdate>
struct ApplyOp {
  // 2 x 512 threads per SM, at most 64 registers each: unbounded, bf16 averages applied to fp32
  // masters and params took 71 registers (nvcc 13.0), one block per SM. No spills (tests/test_codegen.py).
  static constexpr int kMinBlocksPerSm = 2;
  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    using Chunk = ApplyChunk<A, P, kMaster, kUpdate>;
    float* master = kMaster ? static_cast<float*>(base[kAvgMaster]) + begin : nullptr;
    Chunk c{static_cast<const A*>(base[kAvgIn]) + begin, static_cast<float*>(base[kAvgConsensus]) + begin, master,
            static_cast<P*>(base[kAvgParam]) + begin};
    typename Chunk::Frag f[kUnroll];
    chunk_apply(c, n, f);
  }
};

}  // namespace

int launch_pack_delta(const TensorLists& lists, DType source, DType out, float scale, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(visit_dtype(source, [&](auto src) {
    return visit_dtype(out, [&](auto o) {
      return multi_tensor_apply<4>(lists, DeltaOp<decltype(src), decltype(o)>{scale}, s);
    });
  }));
}

int launch_apply_average(const TensorLists& lists, DType avg, DType param, bool update_consensus, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool master = lists.has(kAvgMaster);
  return static_cast<int>(visit_dtype(avg, [&](auto a) {
    return visit_dtype(param, [&](auto p) {
      return visit_bool(master, [&](auto m) {
        return visit_bool(update_consensus, [&](auto u) {
          return multi_tensor_apply<4>(lists, ApplyOp<decltype(a), decltype(p), decltype(m)::value, decltype(u)::value>{}, s);
        });
      });
    });
  }));
}

}  // namespace cuda
}  // namespace fusedmf
