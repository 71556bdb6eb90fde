// The CPU loops of every update rule and of pack_. Included once per CPU capability, by
// kernels_base.cpp and kernels_avx2.cpp, which define before including it:
//   FUSEDMF_MATH_NS     the namespace of this variant (base_math / avx2_math), see update_math.h
//   FUSEDMF_CPU_TARGET  the target attribute of the loops (empty for base)
//   FUSEDMF_CPU_FMA     when the target has a fused multiply-add (NOTE [fma placement])
//
// Each loop is one piece [begin, end) of one tensor, on one thread (cpu_ops.cpp splits the work).
// The loops are plain C++ that GCC and Clang vectorize at -O3 (checked with -fopt-info-vec): all
// per-step flags that change memory traffic (master, momentum mode, dtypes) are template arguments,
// the others (nesterov, L2) are loop-invariant selects, and pointers are __restrict.
#pragma once

#include <cstdint>

#include "cpu/kernel_table.h"
#include "update_math.h"

#ifndef FUSEDMF_CPU_TARGET
#define FUSEDMF_CPU_TARGET
#endif

namespace fusedmf {
namespace cpu {
namespace FUSEDMF_MATH_NS {

using ::fusedmf::FUSEDMF_MATH_NS::adam_update;
using ::fusedmf::FUSEDMF_MATH_NS::from_float;
using ::fusedmf::FUSEDMF_MATH_NS::mul_rn;
using ::fusedmf::FUSEDMF_MATH_NS::non_finite;
using ::fusedmf::FUSEDMF_MATH_NS::sgd_update;
using ::fusedmf::FUSEDMF_MATH_NS::smega2_estimate;
using ::fusedmf::FUSEDMF_MATH_NS::smega2_update;
using ::fusedmf::FUSEDMF_MATH_NS::to_float;

template <class P, class G, bool kUseMaster, MomentumMode kMode>
FUSEDMF_CPU_TARGET void sgd_kernel(const TensorPtrs& t, int64_t begin, int64_t end, const SgdScalars& scalars,
                                   float inv_grad_scale) {
  constexpr bool kUseMomentum = kMode != MomentumMode::kNone;
  constexpr bool kFirstStep = kMode == MomentumMode::kFirstStep;
  P* __restrict param = static_cast<P*>(t.slot[kParam]);
  const G* __restrict grad = static_cast<const G*>(t.slot[kGrad]);
  float* __restrict master = static_cast<float*>(t.slot[kMaster]);
  float* __restrict momentum = static_cast<float*>(t.slot[kMomentum]);
  const SgdScalars s = scalars;  // a local copy: provably not aliased by the stores
  const float inv = inv_grad_scale;
  for (int64_t i = begin; i < end; ++i) {
    float w;
    if constexpr (kUseMaster) {
      w = master[i];
    } else {
      w = to_float(param[i]);
    }
    float u = 0.0f;
    if constexpr (kMode == MomentumMode::kUpdate) u = momentum[i];
    w = sgd_update<kUseMomentum>(s, inv, kFirstStep, w, to_float(grad[i]), u);
    if constexpr (kUseMomentum) momentum[i] = u;
    if constexpr (kUseMaster) master[i] = w;
    param[i] = from_float<P>(w);
  }
}

// kAmsgrad: also reads and writes the running maximum of v (kMaxExpAvgSq), which the denominator uses.
template <class P, class G, bool kUseMaster, bool kAmsgrad>
FUSEDMF_CPU_TARGET void adam_kernel(const TensorPtrs& t, int64_t begin, int64_t end, const AdamScalars& scalars,
                                    float inv_grad_scale) {
  P* __restrict param = static_cast<P*>(t.slot[kParam]);
  const G* __restrict grad = static_cast<const G*>(t.slot[kGrad]);
  float* __restrict master = static_cast<float*>(t.slot[kMaster]);
  float* __restrict exp_avg = static_cast<float*>(t.slot[kExpAvg]);
  float* __restrict exp_avg_sq = static_cast<float*>(t.slot[kExpAvgSq]);
  float* __restrict max_exp_avg_sq = static_cast<float*>(t.slot[kMaxExpAvgSq]);
  const AdamScalars s = scalars;
  const float inv = inv_grad_scale;
  for (int64_t i = begin; i < end; ++i) {
    float w;
    if constexpr (kUseMaster) {
      w = master[i];
    } else {
      w = to_float(param[i]);
    }
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    float vmax = 0.0f;
    if constexpr (kAmsgrad) vmax = max_exp_avg_sq[i];
    w = adam_update<kAmsgrad>(s, inv, w, to_float(grad[i]), m, v, vmax);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if constexpr (kAmsgrad) max_exp_avg_sq[i] = vmax;
    if constexpr (kUseMaster) master[i] = w;
    param[i] = from_float<P>(w);
  }
}

// SMEGA2: one pass over (master or param, grad, v, G); v is written only when the step closes a
// cycle, so the other N - 1 steps of a cycle move one fp32 stream less.
template <class P, class G, bool kUseMaster, bool kCycleEnd>
FUSEDMF_CPU_TARGET void smega2_kernel(const TensorPtrs& t, int64_t begin, int64_t end, const Smega2Scalars& scalars,
                                      float inv_grad_scale) {
  P* __restrict param = static_cast<P*>(t.slot[kParam]);
  const G* __restrict grad = static_cast<const G*>(t.slot[kGrad]);
  float* __restrict master = static_cast<float*>(t.slot[kMaster]);
  float* __restrict momentum = static_cast<float*>(t.slot[kMomentum]);
  float* __restrict accumulator = static_cast<float*>(t.slot[kGradAccumulator]);
  const Smega2Scalars s = scalars;
  const float inv = inv_grad_scale;
  for (int64_t i = begin; i < end; ++i) {
    float w;
    if constexpr (kUseMaster) {
      w = master[i];
    } else {
      w = to_float(param[i]);
    }
    float v = momentum[i];
    float acc = accumulator[i];
    w = smega2_update<kCycleEnd>(s, inv, w, to_float(grad[i]), v, acc);
    if constexpr (kCycleEnd) momentum[i] = v;
    accumulator[i] = acc;
    if constexpr (kUseMaster) master[i] = w;
    param[i] = from_float<P>(w);
  }
}

// W: what is read as the weight (float for a master, else the param type); O: the estimate's type.
template <class W, class O, bool kReadAccumulator>
FUSEDMF_CPU_TARGET void smega2_estimate_kernel(const TensorPtrs& t, int64_t begin, int64_t end,
                                               const Smega2EstimateScalars& scalars) {
  const W* __restrict weights = static_cast<const W*>(t.slot[t.slot[kMaster] != nullptr ? kMaster : kParam]);
  const float* __restrict momentum = static_cast<const float*>(t.slot[kMomentum]);
  const float* __restrict accumulator = static_cast<const float*>(t.slot[kGradAccumulator]);
  O* __restrict out = static_cast<O*>(t.slot[kEstimateOut]);
  const Smega2EstimateScalars s = scalars;
  for (int64_t i = begin; i < end; ++i) {
    const float acc = kReadAccumulator ? accumulator[i] : 0.0f;
    out[i] = from_float<O>(smega2_estimate<kReadAccumulator>(s, to_float(weights[i]), momentum[i], acc));
  }
}

// NOTE [sums of squares]
// The gradient-noise-scale statistics (fusedmf/noise.py) are sums of squares folded into loops that
// read the data anyway (pack_ and the non-finite check), so they cost no extra pass over memory.
// Squares accumulate in kLanes fp32 lanes (a pattern GCC vectorizes without -ffast-math: each lane
// is its own dependency chain) over blocks of kBlock elements, and each block's lanes are added in
// double: the relative error of a sum stays near kBlock / kLanes * 2^-24 whatever its length.
constexpr int64_t kBlock = 4096;
constexpr int kLanes = 16;

template <class T, bool kSumsq>
FUSEDMF_CPU_TARGET bool non_finite_kernel(const void* data, int64_t begin, int64_t end, double* sumsq) {
  const T* __restrict x = static_cast<const T*>(data);
  // Blocks of kBlock elements: an OR-reduction the compiler vectorizes, with an early exit between
  // blocks (an overflowing step stops reading at the first bad block of its thread; its sum of
  // squares is then meaningless, and the caller discards it).
  double total = 0.0;
  for (int64_t lo = begin; lo < end; lo += kBlock) {
    const int64_t hi = end - lo < kBlock ? end : lo + kBlock;
    uint32_t bad = 0;
    if constexpr (kSumsq) {
      float acc[kLanes] = {};
      int64_t i = lo;
      for (; i + kLanes <= hi; i += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          bad |= non_finite(x[i + k]) ? 1u : 0u;
          const float v = to_float(x[i + k]);
          acc[k] += v * v;
        }
      }
      for (; i < hi; ++i) {
        bad |= non_finite(x[i]) ? 1u : 0u;
        const float v = to_float(x[i]);
        acc[0] += v * v;
      }
      for (int k = 0; k < kLanes; ++k) total += acc[k];
    } else {
      for (int64_t i = lo; i < hi; ++i) bad |= non_finite(x[i]) ? 1u : 0u;
    }
    if (bad != 0) return true;
  }
  if constexpr (kSumsq) *sumsq += total;
  return false;
}

// NOTE [pack layout]: the product is formed in fp32 and rounded once to O (round to nearest
// even, as torch's .to() rounds); `scale` is the fp32 value of the Python float, as torch's
// mul(tensor, scalar) uses it.
// With kSumsq, also returns the sum of the squares of the fp32 products (before rounding to O):
// NOTE [sums of squares].
template <class G, class O, bool kSumsq>
FUSEDMF_CPU_TARGET double pack_kernel(const void* grad, void* out, int64_t begin, int64_t end, float scale) {
  const G* __restrict g = static_cast<const G*>(grad);
  O* __restrict o = static_cast<O*>(out);
  const float s = scale;
  if constexpr (!kSumsq) {
    for (int64_t i = begin; i < end; ++i) o[i] = from_float<O>(mul_rn(to_float(g[i]), s));
    return 0.0;
  } else {
    double total = 0.0;
    for (int64_t lo = begin; lo < end; lo += kBlock) {
      const int64_t hi = end - lo < kBlock ? end : lo + kBlock;
      float acc[kLanes] = {};
      int64_t i = lo;
      for (; i + kLanes <= hi; i += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          const float p = mul_rn(to_float(g[i + k]), s);
          o[i + k] = from_float<O>(p);
          acc[k] += p * p;
        }
      }
      for (; i < hi; ++i) {
        const float p = mul_rn(to_float(g[i]), s);
        o[i] = from_float<O>(p);
        acc[0] += p * p;
      }
      for (int k = 0; k < kLanes; ++k) total += acc[k];
    }
    return total;
  }
}

// ---- selection of one instantiation (host code, default target) ------------------------------

template <class P, class G, bool kUseMaster>
SgdKernel sgd_select_mode(MomentumMode mode) {
  switch (mode) {
    case MomentumMode::kFirstStep:
      return &sgd_kernel<P, G, kUseMaster, MomentumMode::kFirstStep>;
    case MomentumMode::kUpdate:
      return &sgd_kernel<P, G, kUseMaster, MomentumMode::kUpdate>;
    case MomentumMode::kNone:
    default:
      return &sgd_kernel<P, G, kUseMaster, MomentumMode::kNone>;
  }
}

inline SgdKernel select_sgd(DType param, DType grad, bool master, MomentumMode mode) {
  return visit_dtype(param, [&](auto p) {
    return visit_dtype(grad, [&](auto g) {
      return visit_bool(master, [&](auto m) {
        return sgd_select_mode<decltype(p), decltype(g), decltype(m)::value>(mode);
      });
    });
  });
}

inline AdamKernel select_adam(DType param, DType grad, bool master, bool amsgrad) {
  return visit_dtype(param, [&](auto p) {
    return visit_dtype(grad, [&](auto g) {
      return visit_bool(master, [&](auto m) {
        return visit_bool(amsgrad, [&](auto a) -> AdamKernel {
          return &adam_kernel<decltype(p), decltype(g), decltype(m)::value, decltype(a)::value>;
        });
      });
    });
  });
}

inline Smega2Kernel select_smega2(DType param, DType grad, bool master, bool cycle_end) {
  return visit_dtype(param, [&](auto p) {
    return visit_dtype(grad, [&](auto g) {
      return visit_bool(master, [&](auto m) {
        return visit_bool(cycle_end, [&](auto c) -> Smega2Kernel {
          return &smega2_kernel<decltype(p), decltype(g), decltype(m)::value, decltype(c)::value>;
        });
      });
    });
  });
}

inline Smega2EstimateKernel select_smega2_estimate(DType weights, DType out, bool read_accumulator) {
  return visit_dtype(weights, [&](auto w) {
    return visit_dtype(out, [&](auto o) {
      return visit_bool(read_accumulator, [&](auto r) -> Smega2EstimateKernel {
        return &smega2_estimate_kernel<decltype(w), decltype(o), decltype(r)::value>;
      });
    });
  });
}

inline NonFiniteKernel select_non_finite(DType dtype, bool sumsq) {
  return visit_dtype(dtype, [&](auto x) {
    return visit_bool(sumsq, [](auto q) -> NonFiniteKernel { return &non_finite_kernel<decltype(x), decltype(q)::value>; });
  });
}

inline PackKernel select_pack(DType grad, DType out, bool sumsq) {
  return visit_dtype(grad, [&](auto g) {
    return visit_dtype(out, [&](auto o) {
      return visit_bool(sumsq, [](auto q) -> PackKernel { return &pack_kernel<decltype(g), decltype(o), decltype(q)::value>; });
    });
  });
}

}  // namespace FUSEDMF_MATH_NS
}  // namespace cpu
}  // namespace fusedmf

// Defines the table of this capability; the including file expands it once.
#define FUSEDMF_DEFINE_KERNEL_TABLE(NAME)                                                          \
  namespace fusedmf {                                                                             \
  namespace cpu {                                                                                 \
  namespace FUSEDMF_MATH_NS {                                                                     \
  const KernelTable* kernel_table() {                                                             \
    static const KernelTable table{NAME, &select_sgd, &select_adam, &select_non_finite,          \
                                   &select_pack, &select_smega2, &select_smega2_estimate};       \
    return &table;                                                                                \
  }                                                                                               \
  }                                                                                               \
  }                                                                                               \
  }
