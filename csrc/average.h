// The fused model-averaging kernels of fusedmf.comm.LocalSGD: pack_delta_ and apply_average_.
//
// Spec: fusedmf/functional/average.py (the reference); math: delta_pack / average_apply in
// csrc/update_math.h (NOTE [model averaging rounding]); binding and CPU loops: csrc/average.cpp;
// CUDA kernels: csrc/cuda/average.cu; Triton: triton_kernels/average.py.
#pragma once

#include <cstdint>

#include "tensor_lists.h"

namespace fusedmf {

// Tensor-list slots of the two ops (each call uses at most four lists).
// pack_delta_(sources, consensus, out, scale): out[i] = cast((float(sources[i]) - consensus[i]) * scale)
constexpr int kDeltaOut = 0;        // the slot views of the flat communication buffer (written)
constexpr int kDeltaSource = 1;     // fp32 masters or the params themselves (fp32/fp16/bf16; read)
constexpr int kDeltaConsensus = 2;  // fp32 consensus (read)
// apply_average_(averages, consensus, masters, params, update_consensus)
constexpr int kAvgIn = 0;         // the reduced slot views (fp32/fp16/bf16; read)
constexpr int kAvgConsensus = 1;  // fp32 consensus (read; written when update_consensus)
constexpr int kAvgMaster = 2;     // fp32 masters (optional; written)
constexpr int kAvgParam = 3;      // params (fp32/fp16/bf16; written)

namespace cuda {
#if defined(FUSEDMF_WITH_CUDA) || defined(__CUDACC__)
// Enqueue on `stream` (a cudaStream_t passed as void*, so this header needs no CUDA headers);
// returns cudaGetLastError() as an int (0: success).
int launch_pack_delta(const TensorLists& lists, DType source, DType out, float scale, void* stream);
int launch_apply_average(const TensorLists& lists, DType avg, DType param, bool update_consensus, void* stream);
#endif
}  // namespace cuda

}  // namespace fusedmf
