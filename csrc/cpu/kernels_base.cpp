// The CPU loops for any CPU of the target architecture (NOTE [cpu capability] in cpu_ops.cpp).
// On x86-64 without FMA, madd() rounds twice, as torch's own DEFAULT-capability kernels do; on
// aarch64 the base build has a fused multiply-add (NOTE [fma placement] in update_math.h).
#define FUSEDMF_MATH_NS base_math
#include "cpu/kernels_impl.h"

FUSEDMF_DEFINE_KERNEL_TABLE("base")
