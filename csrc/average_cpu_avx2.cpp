// pack_delta_ / apply_average_ CPU loops for x86-64 CPUs with AVX2 and FMA (csrc/average_cpu_impl.h),
// chosen at run time with the rest of the CPU kernels (NOTE [cpu capability] in csrc/cpu/cpu_ops.cpp).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#define FUSEDMF_MATH_NS avx2_math
#define FUSEDMF_CPU_FMA 1
#define FUSEDMF_CPU_TARGET __attribute__((target("avx2,fma")))
#include "average_cpu_impl.h"

FUSEDMF_DEFINE_AVERAGE_LOOPS("avx2")

#else

#include "average_cpu_impl.h"

namespace fusedmf {
namespace average {
namespace avx2_math {
const CpuLoops* cpu_loops() { return nullptr; }
}  // namespace avx2_math
}  // namespace average
}  // namespace fusedmf

#endif
