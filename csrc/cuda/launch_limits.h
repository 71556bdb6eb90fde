// NOTE [launch limits]
// The one description of how many tensors and blocks one multi-tensor launch carries (NOTE
// [multi-tensor launch] in multi_tensor_apply.cuh). benchmarks/launch_model.py reads this file
// (the FUSEDMF_LAUNCH_LIMIT rows below, by pattern) to predict launch counts, so the model and the
// launcher cannot drift apart: edit the numbers here only.
//
// FUSEDMF_LAUNCH_LIMIT(param_bytes, depth, max_tensors, max_blocks):
//   param_bytes  the kernel-argument limit the row is sized for: 4096 works on every driver and
//                GPU; 32764 needs a CUDA >= 12.1 driver on sm_70+ (nvcc >= 12.1 to compile it)
//   depth        number of tensor lists of the launch (1, 2, 4, 5, and 6 for AMSGrad's MF-Adam)
//   max_tensors  tensors per launch: TensorListMeta holds depth + 1 eight-byte words per tensor
//   max_blocks   blocks (chunks) per launch: 4 bytes of chunk index plus 1 byte (<= 256 tensors)
//                or 2 bytes (more) of tensor index per block
// Each row leaves room in its limit for the Op argument beside the struct (static_asserts in
// multi_tensor_apply.cuh check both).
#pragma once

#define FUSEDMF_LAUNCH_LIMITS(FUSEDMF_LAUNCH_LIMIT) \
  FUSEDMF_LAUNCH_LIMIT(4096, 1, 110, 320)           \
  FUSEDMF_LAUNCH_LIMIT(4096, 2, 96, 320)            \
  FUSEDMF_LAUNCH_LIMIT(4096, 4, 48, 320)            \
  FUSEDMF_LAUNCH_LIMIT(4096, 5, 36, 320)            \
  FUSEDMF_LAUNCH_LIMIT(4096, 6, 42, 320)            \
  FUSEDMF_LAUNCH_LIMIT(32764, 1, 1260, 2048)        \
  FUSEDMF_LAUNCH_LIMIT(32764, 2, 840, 2048)         \
  FUSEDMF_LAUNCH_LIMIT(32764, 4, 504, 2048)         \
  FUSEDMF_LAUNCH_LIMIT(32764, 5, 416, 2048)         \
  FUSEDMF_LAUNCH_LIMIT(32764, 6, 360, 2048)
