// pack_delta_ / apply_average_ CPU loops for any CPU of the target architecture (csrc/average_cpu_impl.h).
#define FUSEDMF_MATH_NS base_math
#include "average_cpu_impl.h"

FUSEDMF_DEFINE_AVERAGE_LOOPS("base")
