// Torch ops fusedmf::smega2_ and fusedmf::smega2_estimate_: SMEGA2's master step and look-ahead
// estimate (fusedmf/functional/smega2.py; the specification is reference.py's smega2_ and
// smega2_estimate_). Registered here with TORCH_LIBRARY_FRAGMENT so that they do not depend on
// csrc/bindings.cpp: CPU and CUDA implementations (csrc/cpu/cpu_ops.h, csrc/cuda/smega2.cu) and
// Meta ones, which serve as fake kernels (FakeTensor, torch.compile): they validate shapes and
// write nothing, as the ops return nothing.
//
// Every tensor is validated before any is written, with messages that name the list and index.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/cpu_ops.h"
#include "tensor_lists.h"

#ifdef FUSEDMF_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/smega2.h"
#endif
#ifdef FUSEDMF_WITH_CUDA_EMU
#include "cuda/emu/emu_api.h"
#endif

namespace fusedmf {
namespace smega2_ops {
namespace {

using TensorList = std::vector<at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

std::string dtype_name(at::ScalarType t) { return std::string(c10::toString(t)); }

bool to_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kFloat:
      *out = DType::F32;
      return true;
    case at::kHalf:
      *out = DType::F16;
      return true;
    case at::kBFloat16:
      *out = DType::BF16;
      return true;
    default:
      return false;
  }
}

enum class Kind : int8_t { kLowOrFull, kFp32 };  // allowed dtypes of a list

struct NamedList {
  const char* name;
  const TensorList* tensors;
  int slot;
  bool optional;  // may be empty (then the list is absent)
  Kind kind;
};

// Equal strides on every dimension of size > 1 (the stride of a size-1 dimension is never used).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() <= 1) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// List lengths, then every tensor against params[i] (lists[0]): defined, strided, one device,
// allowed and uniform dtype, the param's shape and layout, dense. Returns the device, or nullopt
// for an empty call. `meta`: the Meta (fake) kernel, which accepts meta tensors.
std::optional<at::Device> check_lists(const char* op, const std::vector<NamedList>& lists, bool meta) {
  const TensorList& params = *lists[0].tensors;
  const char* pname = lists[0].name;
  const size_t n = params.size();
  for (const NamedList& l : lists) {
    const size_t m = l.tensors->size();
    TORCH_CHECK_VALUE(m == n || (l.optional && m == 0), "fusedmf.", op, ": ", l.name, " has ", m, " tensors but ",
                      pname, " has ", n, l.optional ? " (it must be empty or hold one per param)" : " (one per param)");
  }
  if (n == 0) return std::nullopt;
  TORCH_CHECK_VALUE(params[0].defined(), "fusedmf.", op, ": ", pname, "[0] is None");
  const at::Device device = params[0].device();
  if (!meta) {
    TORCH_CHECK(device.is_cpu() || device.is_cuda(), "fusedmf.", op, ": tensors on ", device,
                " are not supported by fusedmf._C (CPU and CUDA only); use the 'reference' backend");
#ifndef FUSEDMF_WITH_CUDA
    TORCH_CHECK(device.is_cpu(), "fusedmf.", op, ": the tensors are on ", device,
                " but this build of fusedmf._C has no CUDA kernels; rebuild with `FUSEDMF_CUDA=1 pip install "
                "--no-build-isolation .` (needs nvcc and a CUDA build of torch)");
#endif
  }
  for (const NamedList& l : lists) {
    const TensorList& ts = *l.tensors;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      const at::Tensor& p = params[i];
      TORCH_CHECK_VALUE(t.defined(), "fusedmf.", op, ": ", l.name, "[", i, "] is None");
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fusedmf.", op, ": ", l.name, "[", i, "] has layout ", t.layout(),
                        "; fusedmf kernels need dense strided tensors");
      TORCH_CHECK_VALUE(t.device() == device, "fusedmf.", op, ": ", l.name, "[", i, "] is on ", t.device(), " but ",
                        pname, "[0] is on ", device, " (all tensors of one call must be on one device)");
      DType d{};
      const bool ok = l.kind == Kind::kFp32 ? t.scalar_type() == at::kFloat : to_dtype(t.scalar_type(), &d);
      TORCH_CHECK_TYPE(ok, "fusedmf.", op, ": ", l.name, "[", i, "] has dtype ", dtype_name(t.scalar_type()), "; ",
                       l.name, " must be ", l.kind == Kind::kFp32 ? "float32" : "float32, float16 or bfloat16",
                       " (float64 runs on the 'reference' backend)");
      TORCH_CHECK_TYPE(t.scalar_type() == ts[0].scalar_type(), "fusedmf.", op, ": ", l.name, "[", i, "] has dtype ",
                       dtype_name(t.scalar_type()), " but ", l.name, "[0] has dtype ", dtype_name(ts[0].scalar_type()),
                       " (dtypes must be uniform within each list)");
      TORCH_CHECK_VALUE(t.sizes() == p.sizes(), "fusedmf.", op, ": ", l.name, "[", i, "] has shape ", t.sizes(),
                        " but ", pname, "[", i, "] has shape ", p.sizes());
      TORCH_CHECK_VALUE(same_layout(t, p), "fusedmf.", op, ": ", l.name, "[", i, "] has strides ", t.strides(),
                        " but ", pname, "[", i, "] has strides ", p.strides(),
                        " (each tensor must have the memory layout of its param)");
      TORCH_CHECK_VALUE(t.numel() == 0 || t.is_non_overlapping_and_dense(), "fusedmf.", op, ": ", l.name, "[", i,
                        "] is not dense (shape ", t.sizes(), ", strides ", t.strides(),
                        "): the kernels read each tensor as one block of memory");
    }
  }
  return device;
}

// `written[i]` must not be the memory of another list's tensor i (that would corrupt state).
void check_not_aliased(const char* op, const NamedList& written, const std::vector<NamedList>& lists, bool meta) {
  if (meta) return;
  for (size_t i = 0; i < written.tensors->size(); ++i) {
    const at::Tensor& w = (*written.tensors)[i];
    if (w.numel() == 0) continue;
    for (const NamedList& l : lists) {
      if (l.tensors == written.tensors || l.tensors->empty()) continue;
      TORCH_CHECK_VALUE((*l.tensors)[i].data_ptr() != w.data_ptr(), "fusedmf.", op, ": ", written.name, "[", i,
                        "] and ", l.name, "[", i, "] are the same memory; they must be separate tensors");
    }
  }
}

// A one-tensor argument (scalars, inv_grad_scale, found_inf): float32, `numel` elements,
// contiguous, on the tensors' device (when there are tensors).
void check_aux(const char* op, const char* name, const at::Tensor& t, int64_t numel,
               const std::optional<at::Device>& device, const char* hint) {
  TORCH_CHECK_VALUE(t.defined(), "fusedmf.", op, ": ", name, " is None");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "fusedmf.", op, ": ", name, " has dtype ",
                   dtype_name(t.scalar_type()), " but must be float32");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.numel() == numel && t.is_contiguous(), "fusedmf.", op, ": ", name,
                    " must be a contiguous float32 tensor of ", numel, " elements", hint, ", got shape ", t.sizes());
  if (device) {
    TORCH_CHECK_VALUE(t.device() == *device, "fusedmf.", op, ": ", name, " is on ", t.device(),
                      " but the tensors are on ", *device);
  }
}

struct Prepared {
  std::vector<int64_t> numels;
  std::vector<void*> ptrs[kMaxSlots];
  TensorLists lists;
};

Prepared prepare(const std::vector<NamedList>& lists) {
  Prepared p;
  const TensorList& head = *lists[0].tensors;
  p.numels.reserve(head.size());
  for (const at::Tensor& t : head) p.numels.push_back(t.numel());
  p.lists.num_tensors = static_cast<int64_t>(head.size());
  p.lists.numels = p.numels.data();
  for (const NamedList& l : lists) {
    if (l.tensors->empty()) continue;
    std::vector<void*>& v = p.ptrs[l.slot];
    v.reserve(l.tensors->size());
    for (const at::Tensor& t : *l.tensors) v.push_back(t.numel() > 0 ? t.data_ptr() : nullptr);
    p.lists.ptrs[l.slot] = v.data();
  }
  return p;
}

DType dtype_of(const TensorList& ts) {
  DType d = DType::F32;
  to_dtype(ts[0].scalar_type(), &d);  // validated
  return d;
}

const float* data_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

#ifdef FUSEDMF_WITH_CUDA
void check_launch(const char* op, cudaError_t e) {
  TORCH_CHECK(e != cudaErrorInvalidValue, "fusedmf.", op,
              ": a tensor is too large for the multi-tensor launcher (more than 2^31 chunks of 65536 elements)");
  TORCH_CHECK(e == cudaSuccess, "fusedmf.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}
#endif

// ---------------------------------------------------------------------------------------------

void smega2_impl(const TensorList& params, const TensorList& grads, const TensorList& momentum_buffers,
                 const TensorList& grad_accumulators, const TensorList& master_params, const at::Tensor& scalars,
                 const OptTensor& inv_grad_scale, const OptTensor& found_inf, bool meta, bool emu) {
  constexpr const char* op = "smega2_";
  const std::vector<NamedList> lists{{"params", &params, kParam, false, Kind::kLowOrFull},
                                     {"grads", &grads, kGrad, false, Kind::kLowOrFull},
                                     {"momentum_buffers", &momentum_buffers, kMomentum, false, Kind::kFp32},
                                     {"grad_accumulators", &grad_accumulators, kGradAccumulator, false, Kind::kFp32},
                                     {"master_params", &master_params, kMaster, true, Kind::kFp32}};
  const auto device = check_lists(op, lists, meta);
  for (size_t k = 0; k < lists.size(); ++k) {
    if (k != 1) check_not_aliased(op, lists[k], lists, meta);  // every list but the grads is written
  }
  const char* hint = " (one per name in fusedmf.functional.scalars.SMEGA2_SLOTS)";
  check_aux(op, "scalars", scalars, kSmega2NumScalars, device, hint);
  if (inv_grad_scale) check_aux(op, "inv_grad_scale", *inv_grad_scale, 1, device, "");
  if (found_inf) check_aux(op, "found_inf", *found_inf, 1, device, "");
  if (!device || meta) return;
  const Prepared p = prepare(lists);
  const DType param = dtype_of(params), grad = dtype_of(grads);
#ifdef FUSEDMF_WITH_CUDA_EMU
  if (emu) {
    cuda_emu_api::check_launch(op, cuda_emu_api::smega2(p.lists, param, grad, scalars.data_ptr<float>(),
                                              data_or_null(inv_grad_scale), data_or_null(found_inf)));
    return;
  }
#endif
  if (device->is_cpu()) {
    cpu::smega2(p.lists, param, grad, scalars.data_ptr<float>(), data_or_null(inv_grad_scale),
                data_or_null(found_inf));
    return;
  }
#ifdef FUSEDMF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(*device);
  check_launch(op, cuda::launch_smega2(p.lists, param, grad, scalars.data_ptr<float>(), data_or_null(inv_grad_scale),
                                       data_or_null(found_inf),
                                       at::cuda::getCurrentCUDAStream(device->index()).stream()));
#endif
}

void smega2_estimate_impl(const TensorList& params, const TensorList& momentum_buffers,
                          const TensorList& grad_accumulators, const TensorList& master_params,
                          const TensorList& out, const at::Tensor& scalars, bool meta, bool emu) {
  constexpr const char* op = "smega2_estimate_";
  const std::vector<NamedList> lists{{"params", &params, kParam, false, Kind::kLowOrFull},
                                     {"momentum_buffers", &momentum_buffers, kMomentum, false, Kind::kFp32},
                                     {"grad_accumulators", &grad_accumulators, kGradAccumulator, false, Kind::kFp32},
                                     {"master_params", &master_params, kMaster, true, Kind::kFp32},
                                     {"out", &out, kEstimateOut, false, Kind::kLowOrFull}};
  const auto device = check_lists(op, lists, meta);
  check_not_aliased(op, lists[4], lists, meta);
  check_aux(op, "scalars", scalars, kSmega2EstimateNumScalars, device,
            " (one per name in fusedmf.functional.scalars.SMEGA2_ESTIMATE_SLOTS)");
  if (!device || meta) return;
  const Prepared p = prepare(lists);
  const DType param = dtype_of(params), out_dtype = dtype_of(out);
#ifdef FUSEDMF_WITH_CUDA_EMU
  if (emu) {
    cuda_emu_api::check_launch(op, cuda_emu_api::smega2_estimate(p.lists, param, out_dtype, scalars.data_ptr<float>()));
    return;
  }
#endif
  if (device->is_cpu()) {
    cpu::smega2_estimate(p.lists, master_params.empty() ? param : DType::F32, out_dtype, scalars.data_ptr<float>());
    return;
  }
#ifdef FUSEDMF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(*device);
  check_launch(op, cuda::launch_smega2_estimate(p.lists, param, out_dtype, scalars.data_ptr<float>(),
                                                at::cuda::getCurrentCUDAStream(device->index()).stream()));
#endif
}

template <bool kMeta, bool kEmu = false>
void smega2_(const TensorList& params, const TensorList& grads, const TensorList& momentum_buffers,
             const TensorList& grad_accumulators, const TensorList& master_params, const at::Tensor& scalars,
             const OptTensor& inv_grad_scale, const OptTensor& found_inf) {
  smega2_impl(params, grads, momentum_buffers, grad_accumulators, master_params, scalars, inv_grad_scale, found_inf,
              kMeta, kEmu);
}

template <bool kMeta, bool kEmu = false>
void smega2_estimate_(const TensorList& params, const TensorList& momentum_buffers,
                      const TensorList& grad_accumulators, const TensorList& master_params, const TensorList& out,
                      const at::Tensor& scalars) {
  smega2_estimate_impl(params, momentum_buffers, grad_accumulators, master_params, out, scalars, kMeta, kEmu);
}

}  // namespace
}  // namespace smega2_ops
}  // namespace fusedmf

// The signatures, shared by the CPU/CUDA ops and the cuda_emu_ ops.
#define FUSEDMF_SCHEMA_SMEGA2                                                                                  \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] grad_accumulators, "   \
  "Tensor(d!)[] master_params, Tensor scalars, Tensor? inv_grad_scale=None, Tensor? found_inf=None) -> ()"
#define FUSEDMF_SCHEMA_SMEGA2_ESTIMATE                                    \
  "(Tensor[] params, Tensor[] momentum_buffers, Tensor[] grad_accumulators, " \
  "Tensor[] master_params, Tensor(a!)[] out, Tensor scalars) -> ()"

TORCH_LIBRARY_FRAGMENT(fusedmf, m) {
  m.def("smega2_" FUSEDMF_SCHEMA_SMEGA2);
  m.def("smega2_estimate_" FUSEDMF_SCHEMA_SMEGA2_ESTIMATE);
#ifdef FUSEDMF_WITH_CUDA_EMU
  m.def("cuda_emu_smega2_" FUSEDMF_SCHEMA_SMEGA2);
  m.def("cuda_emu_smega2_estimate_" FUSEDMF_SCHEMA_SMEGA2_ESTIMATE);
#endif
}

TORCH_LIBRARY_IMPL(fusedmf, CPU, m) {
  m.impl("smega2_", &fusedmf::smega2_ops::smega2_<false>);
  m.impl("smega2_estimate_", &fusedmf::smega2_ops::smega2_estimate_<false>);
#ifdef FUSEDMF_WITH_CUDA_EMU
  m.impl("cuda_emu_smega2_", &fusedmf::smega2_ops::smega2_<false, true>);
  m.impl("cuda_emu_smega2_estimate_", &fusedmf::smega2_ops::smega2_estimate_<false, true>);
#endif
}

#ifdef FUSEDMF_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedmf, CUDA, m) {
  m.impl("smega2_", &fusedmf::smega2_ops::smega2_<false>);
  m.impl("smega2_estimate_", &fusedmf::smega2_ops::smega2_estimate_<false>);
}
#endif

TORCH_LIBRARY_IMPL(fusedmf, Meta, m) {
  m.impl("smega2_", &fusedmf::smega2_ops::smega2_<true>);
  m.impl("smega2_estimate_", &fusedmf::smega2_ops::smega2_estimate_<true>);
#ifdef FUSEDMF_WITH_CUDA_EMU
  m.impl("cuda_emu_smega2_", &fusedmf::smega2_ops::smega2_<true, true>);
  m.impl("cuda_emu_smega2_estimate_", &fusedmf::smega2_ops::smega2_estimate_<true, true>);
#endif
}
