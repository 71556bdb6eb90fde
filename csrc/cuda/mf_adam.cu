// MF-Adam / MF-AdamW over lists of tensors: one pass over param (or master), grad, exp_avg and
// exp_avg_sq (and max_exp_avg_sq with AMSGrad, a sixth list), with the math of update_math.h
// (adam_update) on registers. Rounding as in mf_sgd.cu.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedmf {
namespace cuda {
namespace {

using FUSEDMF_MATH_NS::adam_update;
using FUSEDMF_MATH_NS::to_float;

template <class P, class G, bool kUseMaster, bool kAmsgrad>
struct AdamChunk {
  P* param;
  const G* grad;
  float* master;  // kUseMaster only
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // kAmsgrad only
  AdamScalars s;
  float inv_grad_scale;

  struct Frag {
    float w[kIlp], g[kIlp], m[kIlp], v[kIlp];
    float vmax[kIlp];  // kAmsgrad only (otherwise never touched, and allocated no register)
  };
  // The unaligned path two lanes at a time: four lanes of four streams (16 floats) live next to the
  // 9 scalars and across the correctly rounded division's slow-path calls left the 16-bit params
  // with fp32 masters 16-24 bytes of stack spills at the 64-register cap of kMinBlocksPerSm = 2
  // (nvcc 13.0, once the aligned loop kept two iterations in flight; tests/test_codegen.py).
  static constexpr int kUnalignedLanes = 2;

  __device__ bool aligned() const {
    return ilp_aligned(param) && ilp_aligned(grad) && (!kUseMaster || ilp_aligned(master)) && ilp_aligned(exp_avg) &&
           ilp_aligned(exp_avg_sq) && (!kAmsgrad || ilp_aligned(max_exp_avg_sq));
  }
  __device__ void load_vec(Frag& f, int64_t i) const {
    if constexpr (kUseMaster) {
      load_pack(master + i, f.w);
    } else {
      load_pack(param + i, f.w);
    }
    load_pack(grad + i, f.g);
    load_pack(exp_avg + i, f.m);
    load_pack(exp_avg_sq + i, f.v);
    if constexpr (kAmsgrad) load_pack(max_exp_avg_sq + i, f.vmax);
  }
  __device__ void store_vec(const Frag& f, int64_t i) const {
    store_pack(exp_avg + i, f.m);
    store_pack(exp_avg_sq + i, f.v);
    if constexpr (kAmsgrad) store_pack(max_exp_avg_sq + i, f.vmax);
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
    f.m[k] = exp_avg[i];
    f.v[k] = exp_avg_sq[i];
    if constexpr (kAmsgrad) f.vmax[k] = max_exp_avg_sq[i];
  }
  __device__ void store(const Frag& f, int k, int64_t i) const {
    exp_avg[i] = f.m[k];
    exp_avg_sq[i] = f.v[k];
    if constexpr (kAmsgrad) max_exp_avg_sq[i] = f.vmax[k];
    if constexpr (kUseMaster) master[i] = f.w[k];
    param[i] = FUSEDMF_MATH_NS::from_float<P>(f.w[k]);
  }
  __device__ void compute(Frag& f, int k) const {
    f.w[k] = adam_update<kAmsgrad>(s, inv_grad_scale, f.w[k], f.g[k], f.m[k], f.v[k], f.vmax[k]);
  }
};

// kAmsgrad: the sixth list (kMaxExpAvgSq) is read and written; a launch of depth 6.
template <class P, class G, bool kUseMaster, bool kAmsgrad>
struct AdamOp {
  // 2 x 512 threads per SM, 64 registers each (benchmarks/launch_model.py): without the bound the two
  // iterations in flight take 84-96 registers, one block per SM; with 3 (40 registers) ptxas spills.
  static constexpr int kMinBlocksPerSm = 2;
  const float* scalars;
  const float* inv_grad_scale;
  const float* found_inf;

  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // NOTE [skip on overflow]
    AdamChunk<P, G, kUseMaster, kAmsgrad> c;
    c.param = static_cast<P*>(base[kParam]) + begin;
    c.grad = static_cast<const G*>(base[kGrad]) + begin;
    c.master = kUseMaster ? static_cast<float*>(base[kMaster]) + begin : nullptr;
    c.exp_avg = static_cast<float*>(base[kExpAvg]) + begin;
    c.exp_avg_sq = static_cast<float*>(base[kExpAvgSq]) + begin;
    c.max_exp_avg_sq = kAmsgrad ? static_cast<float*>(base[kMaxExpAvgSq]) + begin : nullptr;
    c.s = AdamScalars::load(scalars);
    c.inv_grad_scale = signed_inv_grad_scale(inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f, c.s.maximize);
    typename AdamChunk<P, G, kUseMaster, kAmsgrad>::Frag f[kUnroll];
    chunk_apply(c, n, f);
  }
};

}  // namespace

cudaError_t launch_mf_adam(const TensorLists& lists, DType param, DType grad, const float* scalars,
                           const float* inv_grad_scale, const float* found_inf, cudaStream_t stream) {
  return visit_dtype(param, [&](auto p) {
    return visit_dtype(grad, [&](auto g) {
      return visit_bool(lists.has(kMaster), [&](auto master) {
        return visit_bool(lists.has(kMaxExpAvgSq), [&](auto amsgrad) {
          constexpr bool kAmsgrad = decltype(amsgrad)::value;
          const AdamOp<decltype(p), decltype(g), decltype(master)::value, kAmsgrad> op{scalars, inv_grad_scale,
                                                                                       found_inf};
          return multi_tensor_apply<kAmsgrad ? 6 : 5>(lists, op, stream);
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace fusedmf
