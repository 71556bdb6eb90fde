// The CPU loops of pack_delta_ / apply_average_ (csrc/average.h), compiled once per CPU capability
// like csrc/cpu/kernels_impl.h (NOTE [cpu capability] in csrc/cpu/cpu_ops.cpp): by
// average_cpu_base.cpp for any CPU of the architecture and by average_cpu_avx2.cpp with
// target("avx2,fma"), which makes the fp16/bf16 conversions about 3x faster (measured: 4.2M fp32 ->
// fp16 differences, 33 ms base vs ~10 ms with AVX2, one thread). The including file defines
// FUSEDMF_MATH_NS and FUSEDMF_CPU_TARGET first. Each loop is one piece [begin, end) of one tensor.
#pragma once

#include <cstdint>

#include "average.h"
#include "update_math.h"

#ifndef FUSEDMF_CPU_TARGET
#define FUSEDMF_CPU_TARGET
#endif

namespace fusedmf {
namespace average {

// out[i] = cast(delta_pack(float(source[i]), consensus[i], scale)) for i in [begin, end)
using DeltaLoop = void (*)(const void* source, const void* consensus, void* out, int64_t begin, int64_t end,
                           float scale);
// m = average_apply(consensus[i], float(avg[i])); consensus/master/param written as the op says
using ApplyLoop = void (*)(const void* avg, void* consensus, void* master, void* param, int64_t begin, int64_t end);

struct CpuLoops {
  const char* name;  // "base" or "avx2"
  DeltaLoop (*delta)(DType source, DType out);
  ApplyLoop (*apply)(DType avg, DType param, bool master, bool update);
};

namespace FUSEDMF_MATH_NS {

using ::fusedmf::FUSEDMF_MATH_NS::average_apply;
using ::fusedmf::FUSEDMF_MATH_NS::delta_pack;
using ::fusedmf::FUSEDMF_MATH_NS::from_float;
using ::fusedmf::FUSEDMF_MATH_NS::to_float;

template <class S, class O>
FUSEDMF_CPU_TARGET void delta_loop(const void* source, const void* consensus, void* out, int64_t begin, int64_t end,
                                   float scale) {
  const S* __restrict w = static_cast<const S*>(source);
  const float* __restrict c = static_cast<const float*>(consensus);
  O* __restrict o = static_cast<O*>(out);
  const float s = scale;
  for (int64_t i = begin; i < end; ++i) o[i] = from_float<O>(delta_pack(to_float(w[i]), c[i], s));
}

template <class A, class P, bool kMaster, bool kUpdate>
FUSEDMF_CPU_TARGET void apply_loop(const void* avg, void* consensus, void* master, void* param, int64_t begin,
                                   int64_t end) {
  const A* __restrict a = static_cast<const A*>(avg);
  float* __restrict c = static_cast<float*>(consensus);
  float* __restrict m = static_cast<float*>(master);
  P* __restrict p = static_cast<P*>(param);
  for (int64_t i = begin; i < end; ++i) {
    const float x = average_apply(c[i], to_float(a[i]));
    if constexpr (kUpdate) c[i] = x;
    if constexpr (kMaster) m[i] = x;
    p[i] = from_float<P>(x);
  }
}

inline DeltaLoop select_delta(DType source, DType out) {
  return visit_dtype(source, [&](auto s) {
    return visit_dtype(out, [](auto o) -> DeltaLoop { return &delta_loop<decltype(s), decltype(o)>; });
  });
}

inline ApplyLoop select_apply(DType avg, DType param, bool master, bool update) {
  return visit_dtype(avg, [&](auto a) {
    return visit_dtype(param, [&](auto p) {
      return visit_bool(master, [&](auto m) {
        return visit_bool(update, [&](auto u) -> ApplyLoop {
          return &apply_loop<decltype(a), decltype(p), decltype(m)::value, decltype(u)::value>;
        });
      });
    });
  });
}

}  // namespace FUSEDMF_MATH_NS

namespace base_math {
const CpuLoops* cpu_loops();
}
namespace avx2_math {
const CpuLoops* cpu_loops();  // nullptr when not compiled for x86-64
}

}  // namespace average
}  // namespace fusedmf

#define FUSEDMF_DEFINE_AVERAGE_LOOPS(NAME)                                          \
  namespace fusedmf {                                                               \
  namespace average {                                                               \
  namespace FUSEDMF_MATH_NS {                                                       \
  const CpuLoops* cpu_loops() {                                                     \
    static const CpuLoops loops{NAME, &select_delta, &select_apply};                \
    return &loops;                                                                  \
  }                                                                                 \
  }                                                                                 \
  }                                                                                 \
  }
