// csrc/cuda/average.cu compiled for the host (backend "cuda_emu"; csrc/cuda/emu/cuda_emu.h).
#include "cuda/emu/cuda_emu.h"
// after the shim, which renames namespace cuda to cuda_emu
#include "cuda/average.cu"
