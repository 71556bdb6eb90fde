// Found only by the emulated build when no CUDA toolkit is on the include path (csrc/cuda/emu/cuda_emu.h).
#pragma once
#include "cuda/emu/cuda_emu.h"
