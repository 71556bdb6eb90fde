// MF-SGD / MF-NAG over lists of tensors: one pass reads param (or master), grad and momentum and
// writes them back, with the math of update_math.h (sgd_update) on registers.
//
// Rounding: the update rounds where reference.py's torch kernels round (NOTE [fma placement]); the
// explicit __fmaf_rn leaves nvcc's default -fmad=true nothing to contract, and division and square
// root are IEEE (no --use_fast_math), so results match the CPU backend bit for bit. Should a future
// edit reintroduce a contractible a * b + c, CUDA results would differ from the reference by a few
// ulps: tests/test_codegen.py finds no FFMA that nvcc contracted in the sm_90 SASS, and
// tests/test_cuda_emu.py compares these kernels, run on the host, with the CPU backend bit for bit.
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedmf {
namespace cuda {
namespace {

using FUSEDMF_MATH_NS::sgd_update;
using FUSEDMF_MATH_NS::to_float;

// One chunk of one tensor: see chunk_apply (NOTE [ILP-4]).
template <class P, class G, bool kUseMaster, bool kUseMomentum>
struct SgdChunk {
  P* param;
  const G* grad;
  float* master;    // kUseMaster only
  float* momentum;  // kUseMomentum only
  SgdScalars s;
  float inv_grad_scale;
  bool first_step;  // the momentum buffer is written as g and not read

  struct Frag {
    float w[kIlp], g[kIlp], u[kIlp];
  };

  __device__ bool aligned() const {
    return ilp_aligned(param) && ilp_aligned(grad) && (!kUseMaster || ilp_aligned(master)) &&
           (!kUseMomentum || ilp_aligned(momentum));
  }
  __device__ void load_vec(Frag& f, int64_t i) const {
    if constexpr (kUseMaster) {
      load_pack(master + i, f.w);
    } else {
      load_pack(param + i, f.w);
    }
    load_pack(grad + i, f.g);
    if (kUseMomentum && !first_step) load_pack(momentum + i, f.u);
  }
  __device__ void store_vec(const Frag& f, int64_t i) const {
    if constexpr (kUseMomentum) store_pack(momentum + i, f.u);
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
    if (kUseMomentum && !first_step) f.u[k] = momentum[i];
  }
  __device__ void store(const Frag& f, int k, int64_t i) const {
    if constexpr (kUseMomentum) momentum[i] = f.u[k];
    if constexpr (kUseMaster) master[i] = f.w[k];
    param[i] = FUSEDMF_MATH_NS::from_float<P>(f.w[k]);
  }
  __device__ void compute(Frag& f, int k) const {
    f.w[k] = sgd_update<kUseMomentum>(s, inv_grad_scale, first_step, f.w[k], f.g[k], f.u[k]);
  }
};

template <class P, class G, bool kUseMaster, bool kUseMomentum>
struct SgdOp {
  // 3 x 512 threads per SM, 40 registers each (benchmarks/launch_model.py): without the bound the two
  // iterations in flight take up to 64 registers, 2 blocks per SM; with 4 (32 registers) ptxas spills.
  static constexpr int kMinBlocksPerSm = 3;
  const float* scalars;
  const float* inv_grad_scale;
  const float* found_inf;

  __device__ void operator()(void* const* base, int64_t begin, int64_t n) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return;  // NOTE [skip on overflow]
    SgdChunk<P, G, kUseMaster, kUseMomentum> c;
    c.param = static_cast<P*>(base[kParam]) + begin;
    c.grad = static_cast<const G*>(base[kGrad]) + begin;
    c.master = kUseMaster ? static_cast<float*>(base[kMaster]) + begin : nullptr;
    c.momentum = kUseMomentum ? static_cast<float*>(base[kMomentum]) + begin : nullptr;
    c.s = SgdScalars::load(scalars);
    c.inv_grad_scale = signed_inv_grad_scale(inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f, c.s.maximize);
    c.first_step = c.s.first_step != 0.0f;
    typename SgdChunk<P, G, kUseMaster, kUseMomentum>::Frag f[kUnroll];
    chunk_apply(c, n, f);
  }
};

}  // namespace

cudaError_t launch_mf_sgd(const TensorLists& lists, DType param, DType grad, const float* scalars,
                          const float* inv_grad_scale, const float* found_inf, cudaStream_t stream) {
  return visit_dtype(param, [&](auto p) {
    return visit_dtype(grad, [&](auto g) {
      return visit_bool(lists.has(kMaster), [&](auto master) {
        return visit_bool(lists.has(kMomentum), [&](auto momentum) {
          const SgdOp<decltype(p), decltype(g), decltype(master)::value, decltype(momentum)::value> op{
              scalars, inv_grad_scale, found_inf};
          return multi_tensor_apply<4>(lists, op, stream);
        });
      });
    });
  });
}

int nvcc_version() { return __CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10; }

}  // namespace cuda
}  // namespace fusedmf
