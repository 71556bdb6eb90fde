// The CPU loops for x86-64 CPUs with AVX2 and FMA (Haswell, Zen and later), chosen at run time by
// cpu_ops.cpp (NOTE [cpu capability]). Only the loops carry the target attribute: the math of
// update_math.h is inlined into them (FUSEDMF_INLINE), and nothing else in this file, nor any
// function another file may share with it, is compiled for AVX2, so the extension still loads and
// runs on CPUs without it.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#define FUSEDMF_MATH_NS avx2_math
#define FUSEDMF_CPU_FMA 1
#define FUSEDMF_CPU_TARGET __attribute__((target("avx2,fma")))
#include "cpu/kernels_impl.h"

FUSEDMF_DEFINE_KERNEL_TABLE("avx2")

#else  // not x86-64: no such capability

#include "cpu/kernel_table.h"

namespace fusedmf {
namespace cpu {
namespace avx2_math {
const KernelTable* kernel_table() { return nullptr; }
}  // namespace avx2_math
}  // namespace cpu
}  // namespace fusedmf

#endif
