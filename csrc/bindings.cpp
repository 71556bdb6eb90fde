// fusedmf._C: the Python binding of the CPU and CUDA kernels.
//
// The only file that includes pybind11 / torch/extension.h (docs/style.md: thin layers). It validates every
// tensor before any memory is touched, with messages that name the offending list and index, then
// hands raw pointers (csrc/tensor_lists.h) to the CPU loops (csrc/cpu/cpu_ops.h) or to the CUDA
// launchers (csrc/cuda/launch.h). All update functions are in place and return None; the contract
// is fusedmf/functional/__init__.py's and the math is reference.py's.
#include <torch/extension.h>
#include <torch/version.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/cpu_ops.h"
#include "tensor_lists.h"

#ifdef FUSEDMF_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>

#include "cuda/launch.h"
#endif
#ifdef FUSEDMF_WITH_CUDA_EMU
#include "cuda/emu/cuda_emu_runtime.h"
#include "cuda/emu/emu_api.h"
#endif

#define FUSEDMF_STRINGIFY_(...) #__VA_ARGS__
#define FUSEDMF_STRINGIFY(...) FUSEDMF_STRINGIFY_(__VA_ARGS__)

namespace fusedmf {
namespace {

namespace py = pybind11;
using TensorList = at::TensorList;  // ArrayRef<Tensor>: what the dispatcher hands a Tensor[] argument
using OptTensor = std::optional<at::Tensor>;

constexpr const char* kRebuildHint =
    "rebuild with `FUSEDMF_CUDA=1 pip install --no-build-isolation .` in the fusedmf checkout "
    "(needs nvcc and a CUDA build of torch)";

// torch's Python spelling of a dtype, for messages.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kComplexFloat:
      return "complex64";
    case at::kComplexDouble:
      return "complex128";
    case at::kComplexHalf:
      return "complex32";
    default:
      // "int32", "bool", ... as torch.<name>; a std::string_view from torch 2.13 on, so copied
      return std::string(c10::getDtypeNames(t).first);
  }
}

std::string dims(at::IntArrayRef a) { return c10::str(a); }  // "[4, 5]"

// One tensor list of a call: its Python name, its tensors, and the kernel slot it fills.
struct NamedList {
  const char* name;
  TensorList tensors;
  int slot;
  bool optional;  // may be empty (then the list is absent)
};

// ---------------------------------------------------------------------------------------------
// NOTE [dtype dispatch]
// The one place that maps torch dtypes to the kernels' DType and rejects what they do not
// support; the kernel side only switches on DType (tensor_lists.h visit_dtype).
constexpr const char* kSupportedCombinations =
    "supported (param, grad, master) combinations: param float32, float16 or bfloat16; grad float32, "
    "float16 or bfloat16, independently of the param; master none (params updated in place in fp32 "
    "arithmetic) or float32. float64 runs on the 'reference' backend";

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

struct Dtypes {
  DType param;
  DType grad;
};

Dtypes dispatch_dtypes(const char* op, at::ScalarType param, at::ScalarType grad,
                       std::optional<at::ScalarType> master) {
  Dtypes d{};
  const bool ok = to_dtype(param, &d.param) && to_dtype(grad, &d.grad) && (!master || *master == at::kFloat);
  TORCH_CHECK_TYPE(ok, "fusedmf.", op, ": unsupported dtypes: params ", dtype_name(param), ", grads ",
                   dtype_name(grad), ", master_params ", master ? dtype_name(*master) : std::string("none"), "; ",
                   kSupportedCombinations);
  return d;
}

// ---------------------------------------------------------------------------------------------
// Validation. Every check runs before any kernel, so a rejected call modifies nothing.

// Same memory layout as the param: equal strides on every dimension of size > 1 (a stride of a
// size-1 dimension is never used; channels_last and contiguous agree on [N, C, 1, 1]).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() <= 1) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Checks list lengths, then each tensor of each list against params (lists[0]); returns the
// device of the call (that of params[0]). Requires at least one param.
at::Device check_lists(const char* op, const std::vector<NamedList>& lists) {
  const TensorList params = lists[0].tensors;
  const char* pname = lists[0].name;  // "params", or "tensors" for non_finite_check_
  const size_t n = params.size();
  for (const NamedList& l : lists) {
    const size_t m = l.tensors.size();
    if (l.optional) {
      TORCH_CHECK_VALUE(m == 0 || m == n, "fusedmf.", op, ": ", l.name, " has ", m, " tensors but ", pname, " has ",
                        n, " (", l.name, " must be empty or hold one tensor per param)");
    } else {
      TORCH_CHECK_VALUE(m == n, "fusedmf.", op, ": ", l.name, " has ", m, " tensors but ", pname, " has ", n,
                        " (one per param is required)");
    }
  }
  const at::Device device = params[0].device();
  for (const NamedList& l : lists) {
    const TensorList ts = l.tensors;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      const at::Tensor& p = params[i];
      TORCH_CHECK_VALUE(t.defined(), "fusedmf.", op, ": ", l.name, "[", i, "] is None");
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fusedmf.", op, ": ", l.name, "[", i, "] has layout ",
                        t.layout(), "; fusedmf kernels need dense strided tensors");
      TORCH_CHECK_VALUE(t.device() == device, "fusedmf.", op, ": ", l.name, "[", i, "] is on ", t.device(),
                        " but ", pname, "[0] is on ", device, " (all tensors of one call must be on one device)");
      TORCH_CHECK_TYPE(t.scalar_type() == ts[0].scalar_type(), "fusedmf.", op, ": ", l.name, "[", i,
                       "] has dtype ", dtype_name(t.scalar_type()), " but ", l.name, "[0] has dtype ",
                       dtype_name(ts[0].scalar_type()), " (dtypes must be uniform within each list)");
      TORCH_CHECK_VALUE(t.sizes() == p.sizes(), "fusedmf.", op, ": ", l.name, "[", i, "] has shape ",
                        dims(t.sizes()), " but ", pname, "[", i, "] has shape ", dims(p.sizes()));
      TORCH_CHECK_VALUE(same_layout(t, p), "fusedmf.", op, ": ", l.name, "[", i, "] has strides ",
                        dims(t.strides()), " but ", pname, "[", i, "] has strides ", dims(p.strides()),
                        " (each tensor must have the memory layout of its param)");
      TORCH_CHECK_VALUE(t.numel() == 0 || t.is_non_overlapping_and_dense(), "fusedmf.", op, ": ", l.name, "[", i,
                        "] is not dense (shape ", dims(t.sizes()), ", strides ", dims(t.strides()),
                        "): the kernels read each tensor as one block of memory; pass contiguous tensors "
                        "(channels_last is fine)");
    }
  }
  return device;
}

// `written[i]` must not be the memory of another list's tensor i: the kernel reads every list of an
// element before it writes any, so a shared tensor would be left holding one list's value.
void check_not_aliased(const char* op, const NamedList& written, const std::vector<NamedList>& lists) {
  for (size_t i = 0; i < written.tensors.size(); ++i) {
    const at::Tensor& w = written.tensors[i];
    if (w.numel() == 0) continue;
    for (const NamedList& l : lists) {
      if (&l == &written || l.tensors.empty()) continue;
      TORCH_CHECK_VALUE(l.tensors[i].data_ptr() != w.data_ptr(), "fusedmf.", op, ": ", written.name, "[", i,
                        "] and ", l.name, "[", i, "] are the same memory; they must be separate tensors");
    }
  }
}

void check_state_dtype(const char* op, const NamedList& l, const char* what) {
  if (l.tensors.empty()) return;
  const at::ScalarType t = l.tensors[0].scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat, "fusedmf.", op, ": ", l.name, "[0] has dtype ", dtype_name(t), " but ", what,
                   " must be float32; ", kSupportedCombinations);
}

// A one-tensor argument (scalars, inv_grad_scale, found_inf): float32, `numel` elements,
// contiguous, on `device` (when known).
void check_aux(const char* op, const char* name, const at::Tensor& t, int64_t numel,
               const std::optional<at::Device>& device, const char* numel_hint) {
  TORCH_CHECK_VALUE(t.defined(), "fusedmf.", op, ": ", name, " is None");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "fusedmf.", op, ": ", name, " has dtype ",
                   dtype_name(t.scalar_type()), " but must be float32");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fusedmf.", op, ": ", name, " has layout ", t.layout(),
                    "; it must be a dense tensor");
  TORCH_CHECK_VALUE(t.numel() == numel, "fusedmf.", op, ": ", name, " has ", t.numel(), " elements but must have ",
                    numel, numel_hint);
  TORCH_CHECK_VALUE(t.is_contiguous(), "fusedmf.", op, ": ", name, " must be contiguous");
  if (device) {
    TORCH_CHECK_VALUE(t.device() == *device, "fusedmf.", op, ": ", name, " is on ", t.device(),
                      " but the tensors are on ", *device);
  }
}

void check_device_supported(const char* op, const at::Device& device) {
  if (device.is_cpu()) return;
  TORCH_CHECK(device.is_cuda(), "fusedmf.", op, ": tensors on ", device,
              " are not supported by fusedmf._C (CPU and CUDA only); use the 'reference' backend");
#ifndef FUSEDMF_WITH_CUDA
  TORCH_CHECK(false, "fusedmf.", op, ": the tensors are on ", device,
              " but this build of fusedmf._C has no CUDA kernels; ", kRebuildHint);
#endif
}

// The validated call, as raw pointers.
struct Prepared {
  std::vector<int64_t> numels;
  std::vector<void*> ptrs[kMaxSlots];
  TensorLists lists;
};

Prepared prepare(const std::vector<NamedList>& lists) {
  Prepared p;
  const TensorList params = lists[0].tensors;
  p.numels.reserve(params.size());
  for (const at::Tensor& t : params) p.numels.push_back(t.numel());
  p.lists.num_tensors = static_cast<int64_t>(params.size());
  p.lists.numels = p.numels.data();
  for (const NamedList& l : lists) {
    if (l.tensors.empty()) continue;  // an absent optional list
    std::vector<void*>& v = p.ptrs[l.slot];
    v.reserve(l.tensors.size());
    for (const at::Tensor& t : l.tensors) v.push_back(t.numel() > 0 ? t.data_ptr() : nullptr);
    p.lists.ptrs[l.slot] = v.data();
  }
  return p;
}

const float* data_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

#ifdef FUSEDMF_WITH_CUDA
void check_launch(const char* op, cudaError_t e) {
  TORCH_CHECK(e != cudaErrorInvalidValue, "fusedmf.", op, ": a tensor is too large for the multi-tensor launcher (",
              "more than 2^31 chunks of 65536 elements)");
  TORCH_CHECK(e == cudaSuccess, "fusedmf.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(e));
}
#endif

// Which kernels a CPU call runs: the CPU loops, or csrc/cuda's kernels emulated on the host
// (backend "cuda_emu", ops fusedmf::cuda_emu_<rule>). Both run after the same validation.
enum class CpuKernels { kCpu, kCudaEmu };

#ifdef FUSEDMF_WITH_CUDA_EMU
#define FUSEDMF_RUN_EMU(op, call) cuda_emu_api::check_launch(op, cuda_emu_api::call)
#else
#define FUSEDMF_RUN_EMU(op, call) TORCH_CHECK(false, "fusedmf.", op, ": built without FUSEDMF_CUDA_EMU=1")
#endif

// Validates the lists, the scalar vector and the AMP tensors of one update call; returns the
// device, or nullopt for an empty call (then only the scalar vector's dtype and length are checked).
std::optional<at::Device> check_update_call(const char* op, const std::vector<NamedList>& lists,
                                            const at::Tensor& scalars, int64_t num_scalars, const char* slots_name,
                                            const OptTensor& inv_grad_scale, const OptTensor& found_inf) {
  std::optional<at::Device> device;
  if (!lists[0].tensors.empty()) {
    check_device_supported(op, lists[0].tensors[0].device());
    device = check_lists(op, lists);
  } else {
    for (const NamedList& l : lists) {
      TORCH_CHECK_VALUE(l.tensors.empty(), "fusedmf.", op, ": ", l.name, " has ", l.tensors.size(),
                        " tensors but params is empty");
    }
  }
  const std::string hint = std::string(" (one per name in fusedmf.functional.scalars.") + slots_name + ")";
  check_aux(op, "scalars", scalars, num_scalars, device, hint.c_str());
  if (inv_grad_scale) check_aux(op, "inv_grad_scale", *inv_grad_scale, 1, device, "");
  if (found_inf) check_aux(op, "found_inf", *found_inf, 1, device, "");
  return device;
}

// ---------------------------------------------------------------------------------------------

template <CpuKernels kKernels>
void mf_sgd_(TensorList params, TensorList grads, TensorList momentum_buffers,
             TensorList master_params, const at::Tensor& scalars, const OptTensor& inv_grad_scale,
             const OptTensor& found_inf) {
  constexpr const char* op = "mf_sgd_";
  const std::vector<NamedList> lists{{"params", params, kParam, false},
                                     {"grads", grads, kGrad, false},
                                     {"momentum_buffers", momentum_buffers, kMomentum, true},
                                     {"master_params", master_params, kMaster, true}};
  const auto device =
      check_update_call(op, lists, scalars, kSgdNumScalars, "SGD_SLOTS", inv_grad_scale, found_inf);
  if (!device) return;  // empty lists: a no-op
  const Dtypes d = dispatch_dtypes(
      op, params[0].scalar_type(), grads[0].scalar_type(),
      master_params.empty() ? std::nullopt : std::optional<at::ScalarType>(master_params[0].scalar_type()));
  check_state_dtype(op, lists[2], "momentum buffers");
  const Prepared p = prepare(lists);
  if (device->is_cpu() && kKernels == CpuKernels::kCudaEmu) {
    FUSEDMF_RUN_EMU(op, mf_sgd(p.lists, d.param, d.grad, scalars.data_ptr<float>(), data_or_null(inv_grad_scale),
                               data_or_null(found_inf)));
    return;
  }
  if (device->is_cpu()) {
    cpu::mf_sgd(p.lists, d.param, d.grad, scalars.data_ptr<float>(), data_or_null(inv_grad_scale),
                data_or_null(found_inf));
    return;
  }
#ifdef FUSEDMF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(*device);
  check_launch(op, cuda::launch_mf_sgd(p.lists, d.param, d.grad, scalars.data_ptr<float>(),
                                       data_or_null(inv_grad_scale), data_or_null(found_inf),
                                       at::cuda::getCurrentCUDAStream(device->index()).stream()));
#endif
}

template <CpuKernels kKernels>
void mf_adam_(TensorList params, TensorList grads, TensorList exp_avgs,
              TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList master_params,
              const at::Tensor& scalars, const OptTensor& inv_grad_scale, const OptTensor& found_inf) {
  constexpr const char* op = "mf_adam_";
  // max_exp_avg_sqs empty: plain Adam; one fp32 tensor per param: AMSGrad (the kernels pick the
  // variant from whether the list is present).
  const std::vector<NamedList> lists{{"params", params, kParam, false},
                                     {"grads", grads, kGrad, false},
                                     {"exp_avgs", exp_avgs, kExpAvg, false},
                                     {"exp_avg_sqs", exp_avg_sqs, kExpAvgSq, false},
                                     {"max_exp_avg_sqs", max_exp_avg_sqs, kMaxExpAvgSq, true},
                                     {"master_params", master_params, kMaster, true}};
  const auto device =
      check_update_call(op, lists, scalars, kAdamNumScalars, "ADAM_SLOTS", inv_grad_scale, found_inf);
  if (!device) return;
  const Dtypes d = dispatch_dtypes(
      op, params[0].scalar_type(), grads[0].scalar_type(),
      master_params.empty() ? std::nullopt : std::optional<at::ScalarType>(master_params[0].scalar_type()));
  check_state_dtype(op, lists[2], "Adam states");
  check_state_dtype(op, lists[3], "Adam states");
  check_state_dtype(op, lists[4], "Adam states");
  check_not_aliased(op, lists[4], lists);
  const Prepared p = prepare(lists);
  if (device->is_cpu() && kKernels == CpuKernels::kCudaEmu) {
    FUSEDMF_RUN_EMU(op, mf_adam(p.lists, d.param, d.grad, scalars.data_ptr<float>(), data_or_null(inv_grad_scale),
                                data_or_null(found_inf)));
    return;
  }
  if (device->is_cpu()) {
    cpu::mf_adam(p.lists, d.param, d.grad, scalars.data_ptr<float>(), data_or_null(inv_grad_scale),
                 data_or_null(found_inf));
    return;
  }
#ifdef FUSEDMF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(*device);
  check_launch(op, cuda::launch_mf_adam(p.lists, d.param, d.grad, scalars.data_ptr<float>(),
                                        data_or_null(inv_grad_scale), data_or_null(found_inf),
                                        at::cuda::getCurrentCUDAStream(device->index()).stream()));
#endif
}

template <CpuKernels kKernels>
void non_finite_check_(TensorList tensors, const at::Tensor& found_inf, const OptTensor& sumsq) {
  constexpr const char* op = "non_finite_check_";
  std::optional<at::Device> device;
  if (!tensors.empty()) {
    check_device_supported(op, tensors[0].device());
    // The tensors play the part of params: only device, dtype uniformity and density matter.
    device = check_lists(op, {{"tensors", tensors, 0, false}});
  }
  check_aux(op, "found_inf", found_inf, 1, device, "");
  float* sq = nullptr;
  if (sumsq.has_value()) {
    check_aux(op, "sumsq", *sumsq, 1, device ? device : std::optional<at::Device>(found_inf.device()), "");
    TORCH_CHECK_VALUE(sumsq->data_ptr() != found_inf.data_ptr(), "fusedmf.", op,
                      ": sumsq and found_inf are the same memory; they must be two tensors");
    sq = sumsq->data_ptr<float>();
  }
  if (!device) return;
  DType dtype{};
  TORCH_CHECK_TYPE(to_dtype(tensors[0].scalar_type(), &dtype), "fusedmf.", op, ": tensors[0] has dtype ",
                   dtype_name(tensors[0].scalar_type()), "; supported: float32, float16, bfloat16");
  const Prepared p = prepare({{"tensors", tensors, 0, false}});
  if (device->is_cpu() && kKernels == CpuKernels::kCudaEmu) {
    FUSEDMF_RUN_EMU(op, non_finite_check(p.lists, dtype, found_inf.data_ptr<float>(), sq));
    return;
  }
  if (device->is_cpu()) {
    cpu::non_finite_check(p.lists, dtype, found_inf.data_ptr<float>(), sq);
    return;
  }
#ifdef FUSEDMF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(*device);
  check_launch(op, cuda::launch_non_finite_check(p.lists, dtype, found_inf.data_ptr<float>(), sq,
                                                 at::cuda::getCurrentCUDAStream(device->index()).stream()));
#endif
}

// NOTE [pack layout] (fusedmf/functional/pack.py): grads[i] goes to out[offsets[i] ...], each slot
// rounded up to kPackAlignBytes. Grads may mix fp32/fp16/bf16 (a bucket can hold params of several
// dtypes, and zero slots of the buffer's dtype); a grad that is not dense is packed from a copy
// laid out as torch.empty_like(grad), the slot order of the reference.
template <CpuKernels kKernels>
void pack_(TensorList grads, const at::Tensor& out, double scale, const OptTensor& sumsq) {
  constexpr const char* op = "pack_";
  TORCH_CHECK_VALUE(out.defined(), "fusedmf.", op, ": out is None");
  check_device_supported(op, out.device());
  const at::Device device = out.device();
  TORCH_CHECK_VALUE(out.layout() == at::kStrided, "fusedmf.", op, ": out has layout ", out.layout(),
                    "; it must be a dense 1-D buffer");
  DType out_dtype{};
  TORCH_CHECK_TYPE(to_dtype(out.scalar_type(), &out_dtype), "fusedmf.", op, ": out has dtype ",
                   dtype_name(out.scalar_type()),
                   "; supported: float32, float16, bfloat16 (float64 runs on the 'reference' backend)");
  TORCH_CHECK_VALUE(out.dim() == 1 && out.is_contiguous(), "fusedmf.", op,
                    ": out must be a contiguous 1-D buffer, got shape ", dims(out.sizes()), " and strides ",
                    dims(out.strides()));
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(out.data_ptr()) % kPackAlignBytes == 0, "fusedmf.", op,
                    ": out must start on a ", kPackAlignBytes, "-byte boundary (NOTE [pack layout]); its data is at ",
                    reinterpret_cast<uintptr_t>(out.data_ptr()) % kPackAlignBytes, " bytes past one");
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<DType> grad_dtypes(grads.size());
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(g.defined(), "fusedmf.", op, ": grads[", i, "] is None");
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, "fusedmf.", op, ": grads[", i, "] has layout ", g.layout(),
                      "; fusedmf kernels need dense strided tensors");
    TORCH_CHECK_VALUE(g.device() == device, "fusedmf.", op, ": grads[", i, "] is on ", g.device(), " but out is on ",
                      device, " (all tensors of one call must be on one device)");
    TORCH_CHECK_TYPE(to_dtype(g.scalar_type(), &grad_dtypes[i]), "fusedmf.", op, ": grads[", i, "] has dtype ",
                     dtype_name(g.scalar_type()),
                     "; supported: float32, float16, bfloat16 (float64 runs on the 'reference' backend)");
  }
  // offsets[i] = round_up(offsets[i - 1] + numel, align): pack.py's pack_offsets
  const int64_t align = kPackAlignBytes / static_cast<int64_t>(out.element_size());
  std::vector<int64_t> offsets(grads.size());
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    offsets[i] = total;
    total += (grads[i].numel() + align - 1) / align * align;
  }
  TORCH_CHECK_VALUE(total <= out.numel(), "fusedmf.", op, ": the grads need ", total,
                    " elements of out (slots padded to ", kPackAlignBytes, " bytes, NOTE [pack layout]), out has ",
                    out.numel());
  float* sq = nullptr;
  if (sumsq.has_value()) {
    check_aux(op, "sumsq", *sumsq, 1, device, "");
    const uintptr_t at = reinterpret_cast<uintptr_t>(sumsq->data_ptr());
    const uintptr_t lo = reinterpret_cast<uintptr_t>(out.data_ptr());
    TORCH_CHECK_VALUE(at + sizeof(float) <= lo || at >= lo + static_cast<uintptr_t>(out.nbytes()), "fusedmf.", op,
                      ": sumsq lies inside out; it must be a separate 1-element float32 tensor");
    sq = sumsq->data_ptr<float>();
  }
  if (total == 0) return;  // no grads, or only zero-size ones

#ifdef FUSEDMF_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;  // the copies below and the launches run on out's device
  if (device.is_cuda()) guard.emplace(device);
#endif
  // Everything is validated: from here on only copies of non-dense grads, then the kernels.
  std::vector<at::Tensor> dense;  // keeps those copies alive until the kernels are enqueued
  std::vector<int64_t> numels(grads.size());
  std::vector<void*> src(grads.size()), dst(grads.size());
  char* const base = static_cast<char*>(out.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor* g = &grads[i];
    numels[i] = g->numel();
    if (numels[i] == 0) continue;
    if (!g->is_non_overlapping_and_dense()) {
      dense.push_back(at::empty_like(*g).copy_(*g));  // the layout of the grad's slot (pack.py slot_strides)
      g = &dense.back();
    }
    src[i] = g->data_ptr();
    dst[i] = base + offsets[i] * static_cast<int64_t>(out.element_size());
  }
  TensorLists lists;
  lists.num_tensors = n;
  lists.numels = numels.data();
  lists.ptrs[kGrad] = src.data();
  lists.ptrs[kPackOut] = dst.data();
  const float scale32 = static_cast<float>(scale);  // what torch.mul(fp32 tensor, scale) multiplies by
  if (device.is_cpu() && kKernels == CpuKernels::kCpu) {
    cpu::pack(lists, grad_dtypes.data(), out_dtype, scale32, sq);
    return;
  }
  // One multi-tensor launch per grad dtype present (one in the usual uniform bucket): the
  // launcher's lists carry one dtype each. The other dtypes' tensors are masked out as zero-size.
#ifdef FUSEDMF_WITH_CUDA
  const cudaStream_t stream = device.is_cuda() ? at::cuda::getCurrentCUDAStream(device.index()).stream() : nullptr;
#endif
  const DType order[] = {DType::F32, DType::F16, DType::BF16};
  std::vector<int64_t> group_numels(grads.size());
  for (const DType d : order) {
    bool any = false;
    for (int64_t i = 0; i < n; ++i) {
      group_numels[i] = grad_dtypes[i] == d ? numels[i] : 0;
      any = any || group_numels[i] > 0;
    }
    if (!any) continue;
    TensorLists group = lists;
    group.numels = group_numels.data();
    if (device.is_cpu()) {
      FUSEDMF_RUN_EMU(op, pack(group, d, out_dtype, scale32, sq));
      continue;
    }
#ifdef FUSEDMF_WITH_CUDA
    check_launch(op, cuda::launch_pack(group, d, out_dtype, scale32, sq, stream));
#endif
  }
}

bool has_cuda() {
#ifdef FUSEDMF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string compiler() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("GCC ") + __VERSION__;
#else
  return "unknown";
#endif
}

#ifdef FUSEDMF_WITH_CUDA
std::string cuda_version_string(int v) {  // CUDART_VERSION encoding: 13000 -> "13.0"
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}
#endif

py::dict build_info() {
  py::dict info;
  info["compiler"] = compiler();
  info["torch"] = std::string(TORCH_VERSION);
  info["cuda"] = has_cuda();
#ifdef FUSEDMF_WITH_CUDA
  info["cuda_runtime"] = cuda_version_string(CUDART_VERSION);  // headers compiled against
  info["nvcc"] = cuda_version_string(cuda::nvcc_version());
#ifdef FUSEDMF_CUDA_ARCHS
  info["cuda_archs"] = std::string(FUSEDMF_STRINGIFY(FUSEDMF_CUDA_ARCHS));
#else
  info["cuda_archs"] = py::none();
#endif
#else
  info["cuda_runtime"] = py::none();
  info["nvcc"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  info["cpu_capability"] = std::string(cpu::capability());
  info["cpu_capabilities"] = std::vector<std::string>{"base", "avx2"};
  return info;
}

}  // namespace
}  // namespace fusedmf

// NOTE [op schemas]
// Every kernel is a torch op (torch.ops.fusedmf.<rule>): the dispatcher picks the CPU or CUDA
// kernel from the tensors' device, torch.compile / FakeTensor see the schema (the fake kernels are
// registered in Python, fusedmf/functional/_ops.py), and the profiler shows the op's name.
// Mutated arguments are marked (a!); nothing is returned. The same signature is registered for
// the Triton kernels as fusedmf::triton_<rule> (fusedmf/functional/_ops.py SCHEMAS, which
// tests/test_ops.py checks against these strings).
// The signature of each rule, shared by its CPU/CUDA op and its cuda_emu_ op (and equal to
// fusedmf/functional/_ops.py SCHEMAS, which tests/test_ops.py checks against the registered ops).
#define FUSEDMF_SCHEMA_MF_SGD                                                                                 \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] master_params, " \
  "Tensor scalars, Tensor? inv_grad_scale=None, Tensor? found_inf=None) -> ()"
#define FUSEDMF_SCHEMA_MF_ADAM                                                                               \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "                \
  "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor scalars, "                             \
  "Tensor? inv_grad_scale=None, Tensor? found_inf=None) -> ()"
#define FUSEDMF_SCHEMA_NON_FINITE_CHECK "(Tensor[] tensors, Tensor(a!) found_inf, Tensor(b!)? sumsq=None) -> ()"
#define FUSEDMF_SCHEMA_PACK "(Tensor[] grads, Tensor(a!) out, float scale, Tensor(b!)? sumsq=None) -> ()"

TORCH_LIBRARY(fusedmf, m) {
  m.set_python_module("fusedmf.functional._ops");  // registers the fake kernels (extension-cpp's pattern)
  m.def("mf_sgd_" FUSEDMF_SCHEMA_MF_SGD);
  m.def("mf_adam_" FUSEDMF_SCHEMA_MF_ADAM);
  m.def("non_finite_check_" FUSEDMF_SCHEMA_NON_FINITE_CHECK);
  m.def("pack_" FUSEDMF_SCHEMA_PACK);
#ifdef FUSEDMF_WITH_CUDA_EMU
  m.def("cuda_emu_mf_sgd_" FUSEDMF_SCHEMA_MF_SGD);
  m.def("cuda_emu_mf_adam_" FUSEDMF_SCHEMA_MF_ADAM);
  m.def("cuda_emu_non_finite_check_" FUSEDMF_SCHEMA_NON_FINITE_CHECK);
  m.def("cuda_emu_pack_" FUSEDMF_SCHEMA_PACK);
#endif
}

// One function per op serves both keys: it validates, then branches on the device (a CUDA call
// into a build without CUDA kernels gets the rebuild hint from check_device_supported, not the
// dispatcher's "could not run" message).
#define FUSEDMF_IMPL_ALL(m)                                                       \
  m.impl("mf_sgd_", &fusedmf::mf_sgd_<fusedmf::CpuKernels::kCpu>);                \
  m.impl("mf_adam_", &fusedmf::mf_adam_<fusedmf::CpuKernels::kCpu>);              \
  m.impl("non_finite_check_", &fusedmf::non_finite_check_<fusedmf::CpuKernels::kCpu>); \
  m.impl("pack_", &fusedmf::pack_<fusedmf::CpuKernels::kCpu>)

TORCH_LIBRARY_IMPL(fusedmf, CPU, m) {
  FUSEDMF_IMPL_ALL(m);
#ifdef FUSEDMF_WITH_CUDA_EMU
  // CPU tensors only: the emulator runs csrc/cuda's kernels on host memory.
  m.impl("cuda_emu_mf_sgd_", &fusedmf::mf_sgd_<fusedmf::CpuKernels::kCudaEmu>);
  m.impl("cuda_emu_mf_adam_", &fusedmf::mf_adam_<fusedmf::CpuKernels::kCudaEmu>);
  m.impl("cuda_emu_non_finite_check_", &fusedmf::non_finite_check_<fusedmf::CpuKernels::kCudaEmu>);
  m.impl("cuda_emu_pack_", &fusedmf::pack_<fusedmf::CpuKernels::kCudaEmu>);
#endif
}
TORCH_LIBRARY_IMPL(fusedmf, CUDA, m) { FUSEDMF_IMPL_ALL(m); }
// A sparse tensor in a call dispatches here; the binding refuses it naming the tensor and its layout.
TORCH_LIBRARY_IMPL(fusedmf, SparseCPU, m) { FUSEDMF_IMPL_ALL(m); }
TORCH_LIBRARY_IMPL(fusedmf, SparseCUDA, m) { FUSEDMF_IMPL_ALL(m); }

// What still needs Python objects (dicts, strings) stays a small pybind11 module; the kernels are
// the ops above, registered when this module is imported.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fusedmf;
  m.doc() = "fusedmf compiled kernels: importing this registers torch.ops.fusedmf.*; see fusedmf/functional";
  m.def("has_cuda", &has_cuda, "Whether this build contains the CUDA kernels.");
  m.def("build_info", &build_info, "Compiler, CUDA version and archs this extension was built with.");
  m.def("_cpu_capability", []() { return std::string(cpu::capability()); },
        "The CPU kernel variant in use: 'avx2' or 'base' (NOTE [cpu capability]).");
  m.def("_set_cpu_capability", &cpu::set_capability, py::arg("name"),
        "For tests: use the 'base' or 'avx2' CPU kernels; False if this CPU or build cannot.");
  // NOTE [one scalar layout]: the kernels' slot constants (csrc/update_math.h) by name, checked
  // against fusedmf/functional/scalars.py SGD_SLOTS / ADAM_SLOTS / SMEGA2_SLOTS when the ops are
  // first loaded.
  py::dict sgd, adam, smega2;
  sgd["lr"] = kSgdLr;
  sgd["momentum"] = kSgdMomentum;
  sgd["one_minus_dampening"] = kSgdOneMinusDampening;
  sgd["l2_weight_decay"] = kSgdL2WeightDecay;
  sgd["decay_factor"] = kSgdDecayFactor;
  sgd["nesterov"] = kSgdNesterov;
  sgd["first_step"] = kSgdFirstStep;
  sgd["maximize"] = kSgdMaximize;
  adam["lr"] = kAdamLr;
  adam["beta1"] = kAdamBeta1;
  adam["one_minus_beta1"] = kAdamOneMinusBeta1;
  adam["beta2"] = kAdamBeta2;
  adam["one_minus_beta2"] = kAdamOneMinusBeta2;
  adam["eps"] = kAdamEps;
  adam["l2_weight_decay"] = kAdamL2WeightDecay;
  adam["decay_factor"] = kAdamDecayFactor;
  adam["neg_step_size"] = kAdamNegStepSize;
  adam["bias_correction2_sqrt"] = kAdamBiasCorrection2Sqrt;
  adam["maximize"] = kAdamMaximize;
  smega2["lr"] = kSmega2Lr;
  smega2["momentum"] = kSmega2Momentum;
  smega2["momentum_scale"] = kSmega2MomentumScale;
  smega2["l2_weight_decay"] = kSmega2L2WeightDecay;
  smega2["cycle_end"] = kSmega2CycleEnd;
  smega2["maximize"] = kSmega2Maximize;
  m.attr("SGD_SLOT_INDEX") = sgd;
  m.attr("ADAM_SLOT_INDEX") = adam;
  m.attr("SMEGA2_SLOT_INDEX") = smega2;
  m.attr("SMEGA2_NUM_SCALARS") = kSmega2NumScalars;
  m.attr("SGD_NUM_SCALARS") = kSgdNumScalars;
  m.def("has_cuda_emu", []() {
#ifdef FUSEDMF_WITH_CUDA_EMU
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the emulated CUDA kernels (backend 'cuda_emu', FUSEDMF_CUDA_EMU=1).");
#ifdef FUSEDMF_WITH_CUDA_EMU
  // The emulator's settings and counters (csrc/cuda/emu/cuda_emu_runtime.h), for tests.
  m.def("_cuda_emu_launches", &fusedmf_emu::launches, "Kernel launches emulated since fusedmf._C was loaded.");
  m.def(
      "_cuda_emu_set_thread_order",
      [](const std::string& order, uint64_t seed) {
        fusedmf_emu::ThreadOrder o;
        if (order == "forward") {
          o = fusedmf_emu::ThreadOrder::kForward;
        } else if (order == "reverse") {
          o = fusedmf_emu::ThreadOrder::kReverse;
        } else if (order == "shuffle") {
          o = fusedmf_emu::ThreadOrder::kShuffle;
        } else {
          throw py::value_error("fusedmf._C._cuda_emu_set_thread_order: order must be 'forward', 'reverse' or "
                                "'shuffle', got '" + order + "'");
        }
        fusedmf_emu::set_thread_order(o, seed);
      },
      py::arg("order"), py::arg("seed") = 0,
      "The order in which each emulated block's threads run between barriers (NOTE [emulated block]).");
  m.def("_cuda_emu_thread_order", []() {
    switch (fusedmf_emu::thread_order()) {
      case fusedmf_emu::ThreadOrder::kReverse:
        return std::string("reverse");
      case fusedmf_emu::ThreadOrder::kShuffle:
        return std::string("shuffle");
      default:
        return std::string("forward");
    }
  });
  m.def("_cuda_emu_set_param_limit", [](int64_t bytes) { fusedmf_emu::set_param_limit(static_cast<size_t>(bytes)); },
        py::arg("bytes"), "Kernel-argument limit: 32764 (CUDA >= 12.1, sm_70+; the default) or 4096 (older drivers).");
  m.def("_cuda_emu_param_limit", []() { return static_cast<int64_t>(fusedmf_emu::param_limit()); });
  m.def("_cuda_emu_set_driver_version", &fusedmf_emu::set_driver_version, py::arg("version"),
        "What the emulated cudaDriverGetVersion returns (CUDART_VERSION encoding; default 13000).");
  m.def("_cuda_emu_driver_version", &fusedmf_emu::driver_version);
  m.def("_cuda_emu_selftest", [](const std::string& name) { return cuda_emu_api::selftest(name.c_str()); },
        py::arg("name"), "Runs one of the shim's test-only kernels (csrc/cuda/emu/emu_api.h).");
#endif
  m.attr("ADAM_NUM_SCALARS") = kAdamNumScalars;
}
