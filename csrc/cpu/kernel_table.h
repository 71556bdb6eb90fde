// The CPU loops of one CPU capability, as a table of function pointers.
//
// csrc/cpu/kernels_impl.h is compiled twice: by kernels_base.cpp for any CPU of the target
// architecture, and by kernels_avx2.cpp with target("avx2,fma") on x86-64. cpu_ops.cpp picks one
// table at run time (NOTE [cpu capability]) and does the threading; the loops only see one piece
// [begin, end) of one tensor.
#pragma once

#include <cstdint>

#include "tensor_lists.h"

namespace fusedmf {
namespace cpu {

enum class MomentumMode : int8_t {
  kNone,       // no momentum buffers: d = g
  kFirstStep,  // the buffer is written as u = g and never read (NOTE [skip on overflow]: torch's fused SGD reads an uninitialised buffer here)
  kUpdate,     // u = momentum * u + (1 - dampening) * g
};

// The data of tensor i of each list (TensorLists::ptrs[slot][i]), nullptr for an absent list.
struct TensorPtrs {
  void* slot[kMaxSlots];
};

using SgdKernel = void (*)(const TensorPtrs& t, int64_t begin, int64_t end, const SgdScalars& s,
                           float inv_grad_scale);
using AdamKernel = void (*)(const TensorPtrs& t, int64_t begin, int64_t end, const AdamScalars& s,
                            float inv_grad_scale);
// Whether data[begin, end) holds an inf or a NaN. The sum-of-squares variant also adds the sum of
// the squares of the elements to *sumsq when it returns false (NOTE [sums of squares]).
using NonFiniteKernel = bool (*)(const void* data, int64_t begin, int64_t end, double* sumsq);
// out[i] = cast(float(grad[i]) * scale) for i in [begin, end): one slot of a packed buffer
// (NOTE [pack layout] in fusedmf/functional/pack.py); `out` is the start of the slot. The
// sum-of-squares variant returns the sum of the squared fp32 products, the other 0.
using PackKernel = double (*)(const void* grad, void* out, int64_t begin, int64_t end, float scale);
// SMEGA2's master step and look-ahead estimate over [begin, end) of one tensor (slots of
// update_math.h: kGradAccumulator, kEstimateOut).
using Smega2Kernel = void (*)(const TensorPtrs& t, int64_t begin, int64_t end, const Smega2Scalars& s,
                              float inv_grad_scale);
using Smega2EstimateKernel = void (*)(const TensorPtrs& t, int64_t begin, int64_t end,
                                      const Smega2EstimateScalars& s);

struct KernelTable {
  const char* name;  // "avx2" or "base"
  SgdKernel (*sgd)(DType param, DType grad, bool master, MomentumMode momentum);
  AdamKernel (*adam)(DType param, DType grad, bool master, bool amsgrad);
  NonFiniteKernel (*non_finite)(DType dtype, bool sumsq);
  PackKernel (*pack)(DType grad, DType out, bool sumsq);
  Smega2Kernel (*smega2)(DType param, DType grad, bool master, bool cycle_end);
  // `weights`: the dtype read (F32 with masters), `out`: the estimate's
  Smega2EstimateKernel (*smega2_estimate)(DType weights, DType out, bool read_accumulator);
};

namespace base_math {
const KernelTable* kernel_table();
}
namespace avx2_math {
const KernelTable* kernel_table();  // nullptr when not compiled for x86-64
}

}  // namespace cpu
}  // namespace fusedmf
