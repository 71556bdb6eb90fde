// SMEGA2 over lists of tensors: the master step reads (param or master, grad, v, G) and writes
// them back in one pass; the estimate reads (param or master, v, G) and writes the look-ahead
// weights. The math is update_math.h's (smega2_update, smega2_estimate) on registers, rounded as
// the reference rounds (NOTE [fma placement]), so results match the CPU backend bit for bit.
//
// Per-step flags live in the device scalar vector (a step stays capturable in a CUDA graph), so
// each block reads them and takes the matching instantiation: cycle_end (v refreshed and written,
// G cleared; otherwise v is only read) and, for the estimate, whether G is read at all.
#include "cuda/smega2.h"
// after smega2.h, which names the namespace (FUSEDMF_CUDA_NS)
#include "cuda/multi_tensor_apply.cuh"

namespace fusedmf {
namespace FUSEDMF_CUDA_NS {
namespace {

using FUSEDMF_MATH_NS::from_float;
using FUSEDMF_MATH_NS::smega2_estimate;
using FUSEDMF_MATH_NS::smega2_update;
using FUSEDMF_MATH_NS::to_float;

// One chunk of one tensor of the master step: see chunk_apply (NOTE [ILP-4]).
template <class P, class G, bool kUseMaster, bool kCycleEnd>
struct Smega2Chunk {
  P* param;
  const G* grad;
  float* master;  // kUseMaster only
  float* momentum;
  float* accumulator;
  Smega2Scalars s;
  float inv_grad_scale;

  struct Frag {
    float w[kIlp], g[kIlp], v[kIlp], acc[kIlp];
  };

  __device__ bool aligned() const {
    return ilp_aligned(param) && ilp_aligned(grad) && (!kUseMaster || ilp_aligned(master)) && ilp_aligned(momentum) &&
           ilp_aligned(accumulator);
  }
  __device__ void load_vec(Frag& f, int64_t i) const {
    if constexpr (kUseMaster) {
      load_pack(master + i, f.w);
    } else {
      load_pack(param + i, f.w);
    }
    load_pack(grad + i, f.g);
    load_pack(momentum + i, f.v);
    load_pack(accumulator + i, f.acc);
  }
  __device__ void store_vec(const Frag& f, int64_t i) const {
    if constexpr (kCycleEnd) store_pack(momentum + i, f.v);
    store_pack(accumulator + i, f.acc);
    if constexpr (kUseMaster) store_pack(master + i, f.w);
    store_pack(param + i, f.w);
  }
  __device__ void load(Frag& f, int k, int64_t i) const {
    if constexpr (kUseMaster) {
      f.w[k] = master[i];
    } else {
      f.w[k] = to_float(param[i]);
    }
    f.g[k] = to_float(grad[i]);
    f.v[k] = momentum[i];
    f.acc[k] = accumulator[i];
  }
  __device__ void store(const Frag& f, int k, int64_t i) const {
    if constexpr (kCycleEnd) momentum[i] = f.v[k];
    accumulator[i] = f.acc[k];
    if constexpr (kUseMaster) master[i] = f.w[k];
    param[i] = from_float<P>(f.w[k]);
  }
  __device__ void compute(Frag& f, int k) const {
    f.w[k] = smega2_update<kCycleEnd>(s, inv_grad_scale, f.w[k], f.g[k], f.v[k], f.acc[k]);
  }
};

template <class P, class G, bool kUseMaster>
struct Smega2Op {
  // 2 x 512 threads per SM, at most 64 registers each: without the bound the two iterations in
  // flight took 71-80 registers (nvcc 13.0), one block per SM. No spills (tests/test_codegen.py).
  static constexpr int kMinBlocksPerSm = 2;
  const float* scalars;
  const float* inv_grad_scale;
  const float* found_inf;

  template <bool kCycleEnd>
  __device__ void run(void* const* base, int64_t begin, int64_t n, const Smega2Scalars& s, float inv) const {
    Smega2Chunk<P, G, kUseMaster, kCycleEnd> c;
    c.param = static_cast<P*>(base[kParam]) + begin;
    c.grad = static_cast<const G*>(base[kGrad]) + begin;
    c.master = kUseMaster ? static_cast<float*>(base[kMaster]) + begin : nullptr;
    c.momentum = static_cast<float*>(base[kMomentum]) + begin;
    c.accumulator = static_cast<float*>(base[kGradAccumulator]) + begin;
    c.s = s;
    c.inv_grad_scale = inv;
    typename Smega2Chunk<P, G, kUseMaster, kCycleEnd>::Frag f[kUnroll];
    chunk_apply(c, n, f);
  }

  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // NOTE [skip on overflow]
    const Smega2Scalars s = Smega2Scalars::load(scalars);
    const float inv = signed_inv_grad_scale(inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f, s.maximize);
    if (s.cycle_end != 0.0f) {
      run<true>(base, begin, n, s, inv);
    } else {
      run<false>(base, begin, n, s, inv);
    }
  }
};

// One chunk of the estimate. W: the weight read (float for a master, else the param type).
template <class W, class O, bool kReadAccumulator>
struct EstimateChunk {
  const W* weights;
  const float* momentum;
  const float* accumulator;  // kReadAccumulator only
  O* out;
  Smega2EstimateScalars s;

  struct Frag {
    float w[kIlp], v[kIlp], acc[kIlp];
  };

  __device__ bool aligned() const {
    return ilp_aligned(weights) && ilp_aligned(momentum) && (!kReadAccumulator || ilp_aligned(accumulator)) &&
           ilp_aligned(out);
  }
  __device__ void load_vec(Frag& f, int64_t i) const {
    load_pack(weights + i, f.w);
    load_pack(momentum + i, f.v);
    if constexpr (kReadAccumulator) load_pack(accumulator + i, f.acc);
  }
  __device__ void store_vec(const Frag& f, int64_t i) const { store_pack(out + i, f.w); }
  __device__ void load(Frag& f, int k, int64_t i) const {
    f.w[k] = to_float(weights[i]);
    f.v[k] = momentum[i];
    if constexpr (kReadAccumulator) f.acc[k] = accumulator[i];
  }
  __device__ void store(const Frag& f, int k, int64_t i) const { out[i] = from_float<O>(f.w[k]); }
  __device__ void compute(Frag& f, int k) const {
    f.w[k] = smega2_estimate<kReadAccumulator>(s, f.w[k], f.v[k], kReadAccumulator ? f.acc[k] : 0.0f);
  }
};

template <class W, class O, bool kUseMaster>
struct EstimateOp {
  // as Smega2Op: 16-bit weights into an fp32 estimate took 72 registers unbounded, one block per SM
  static constexpr int kMinBlocksPerSm = 2;
  const float* scalars;

  template <bool kReadAccumulator>
  __device__ void run(void* const* base, int64_t begin, int64_t n, const Smega2EstimateScalars& s) const {
    EstimateChunk<W, O, kReadAccumulator> c;
    // a compile-time slot: a runtime index into `base` would put the array in local memory
    c.weights = static_cast<const W*>(base[kUseMaster ? kMaster : kParam]) + begin;
    c.momentum = static_cast<const float*>(base[kMomentum]) + begin;
    c.accumulator = kReadAccumulator ? static_cast<const float*>(base[kGradAccumulator]) + begin : nullptr;
    c.out = static_cast<O*>(base[kEstimateOut]) + begin;
    c.s = s;
    typename EstimateChunk<W, O, kReadAccumulator>::Frag f[kUnroll];
    chunk_apply(c, n, f);
  }

  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    const Smega2EstimateScalars s = Smega2EstimateScalars::load(scalars);
    if (s.accumulator_coef != 0.0f) {
      run<true>(base, begin, n, s);
    } else {
      run<false>(base, begin, n, s);
    }
  }
};

}  // namespace

cudaError_t launch_smega2(const TensorLists& lists, DType param, DType grad, const float* scalars,
                          const float* inv_grad_scale, const float* found_inf, cudaStream_t stream) {
  return visit_dtype(param, [&](auto p) {
    return visit_dtype(grad, [&](auto g) {
      return visit_bool(lists.has(kMaster), [&](auto master) {
        const Smega2Op<decltype(p), decltype(g), decltype(master)::value> op{scalars, inv_grad_scale, found_inf};
        return multi_tensor_apply<5>(lists, op, stream);
      });
    });
  });
}

cudaError_t launch_smega2_estimate(const TensorLists& lists, DType param, DType out, const float* scalars,
                                   cudaStream_t stream) {
  const bool master = lists.has(kMaster);
  return visit_dtype(master ? DType::F32 : param, [&](auto w) {
    return visit_dtype(out, [&](auto o) {
      return visit_bool(master, [&](auto m) {
        const EstimateOp<decltype(w), decltype(o), decltype(m)::value> op{scalars};
        return multi_tensor_apply<5>(lists, op, stream);
      });
    });
  });
}

}  // namespace FUSEDMF_CUDA_NS
}  // namespace fusedmf
