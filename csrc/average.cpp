// Torch ops fusedmf::pack_delta_ and fusedmf::apply_average_: the fused model averaging of
// fusedmf.comm.LocalSGD (csrc/average.h). Registered here with TORCH_LIBRARY_FRAGMENT so that they
// do not depend on csrc/bindings.cpp; CPU loops in csrc/average_cpu_impl.h (one build per CPU
// capability), CUDA kernels in csrc/cuda/average.cu,
// the math in csrc/update_math.h (NOTE [model averaging rounding]), the specification in
// fusedmf/functional/average.py. Every tensor is validated before anything is written.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "average.h"
#include "average_cpu_impl.h"
#include "cpu/cpu_ops.h"

#ifdef FUSEDMF_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#ifdef FUSEDMF_WITH_CUDA_EMU
#include "cuda/emu/emu_api.h"
#endif

namespace fusedmf {
namespace average {
namespace {

using TensorList = std::vector<at::Tensor>;

// elements per task of at::parallel_for: below this a tensor runs on the calling thread
constexpr int64_t kGrain = int64_t{1} << 15;

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

std::string name_of(at::ScalarType t) { return std::string(c10::toString(t)); }

struct Named {
  const char* name;
  const TensorList* tensors;
  int slot;
  bool optional;
  bool fp32_only;
};

// Same memory layout: equal strides on every dimension of size > 1.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() <= 1) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Validates every list against lists[0] (index by index); returns the device of the call.
at::Device check(const char* op, const std::vector<Named>& lists) {
  const TensorList& head = *lists[0].tensors;
  const size_t n = head.size();
  TORCH_CHECK_VALUE(n > 0, "fusedmf.", op, ": ", lists[0].name, " is empty");
  for (const Named& l : lists) {
    const size_t m = l.tensors->size();
    TORCH_CHECK_VALUE(m == n || (l.optional && m == 0), "fusedmf.", op, ": ", l.name, " has ", m, " tensors but ",
                      lists[0].name, " has ", n, l.optional ? " (it must be empty or hold one per tensor)" : "");
  }
  TORCH_CHECK_VALUE(head[0].defined(), "fusedmf.", op, ": ", lists[0].name, "[0] is None");
  const at::Device device = head[0].device();
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), "fusedmf.", op, ": tensors on ", device,
              " are not supported (CPU and CUDA only); use the 'reference' backend");
  for (const Named& l : lists) {
    const TensorList& ts = *l.tensors;
    for (size_t i = 0; i < ts.size(); ++i) {
      const at::Tensor& t = ts[i];
      const at::Tensor& h = head[i];
      TORCH_CHECK_VALUE(t.defined(), "fusedmf.", op, ": ", l.name, "[", i, "] is None");
      TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fusedmf.", op, ": ", l.name, "[", i, "] has layout ", t.layout(),
                        "; the kernels need dense strided tensors");
      TORCH_CHECK_VALUE(t.device() == device, "fusedmf.", op, ": ", l.name, "[", i, "] is on ", t.device(), " but ",
                        lists[0].name, "[0] is on ", device, " (all tensors of one call must be on one device)");
      DType d{};
      TORCH_CHECK_TYPE(to_dtype(t.scalar_type(), &d) && (!l.fp32_only || t.scalar_type() == at::kFloat), "fusedmf.",
                       op, ": ", l.name, "[", i, "] has dtype ", name_of(t.scalar_type()), "; ", l.name, " must be ",
                       l.fp32_only ? "float32" : "float32, float16 or bfloat16",
                       " (float64 runs on the 'reference' backend)");
      TORCH_CHECK_TYPE(t.scalar_type() == ts[0].scalar_type(), "fusedmf.", op, ": ", l.name, "[", i, "] has dtype ",
                       name_of(t.scalar_type()), " but ", l.name, "[0] has ", name_of(ts[0].scalar_type()),
                       " (dtypes must be uniform within each list)");
      TORCH_CHECK_VALUE(t.sizes() == h.sizes(), "fusedmf.", op, ": ", l.name, "[", i, "] has shape ", t.sizes(),
                        " but ", lists[0].name, "[", i, "] has shape ", h.sizes());
      TORCH_CHECK_VALUE(t.numel() == 0 || t.is_non_overlapping_and_dense(), "fusedmf.", op, ": ", l.name, "[", i,
                        "] is not dense (shape ", t.sizes(), ", strides ", t.strides(), ")");
      TORCH_CHECK_VALUE(same_layout(t, h), "fusedmf.", op, ": ", l.name, "[", i, "] has strides ", t.strides(),
                        " but ", lists[0].name, "[", i, "] has strides ", h.strides(),
                        " (every tensor must have the memory layout of its partner)");
    }
  }
  return device;
}

// Written tensors must not share memory with another list of the same index.
void check_distinct(const char* op, const Named& written, const std::vector<Named>& others) {
  for (size_t i = 0; i < written.tensors->size(); ++i) {
    const at::Tensor& w = (*written.tensors)[i];
    if (w.numel() == 0) continue;
    for (const Named& o : others) {
      if (o.tensors == written.tensors || o.tensors->empty()) continue;
      const at::Tensor& t = (*o.tensors)[i];
      TORCH_CHECK_VALUE(t.numel() == 0 || t.data_ptr() != w.data_ptr(), "fusedmf.", op, ": ", written.name, "[", i,
                        "] and ", o.name, "[", i, "] are the same memory");
    }
  }
}

struct Prepared {
  std::vector<int64_t> numels;
  std::vector<void*> ptrs[kMaxSlots];
  TensorLists lists;
};

Prepared prepare(const std::vector<Named>& lists) {
  Prepared p;
  const TensorList& head = *lists[0].tensors;
  for (const at::Tensor& t : head) p.numels.push_back(t.numel());
  p.lists.num_tensors = static_cast<int64_t>(head.size());
  p.lists.numels = p.numels.data();
  for (const Named& l : lists) {
    if (l.tensors->empty()) continue;
    std::vector<void*>& v = p.ptrs[l.slot];
    for (const at::Tensor& t : *l.tensors) v.push_back(t.numel() > 0 ? t.data_ptr() : nullptr);
    p.lists.ptrs[l.slot] = v.data();
  }
  return p;
}

DType dtype_of(const TensorList& ts) {
  DType d{};
  to_dtype(ts[0].scalar_type(), &d);
  return d;
}

// ---- CPU: the loops of the current capability (csrc/average_cpu_impl.h), one piece per task ----------

// The loops compiled for the capability the other CPU kernels use (NOTE [cpu capability]), so that
// fusedmf._C._set_cpu_capability switches these too.
const CpuLoops& cpu_loops() {
  if (std::strcmp(cpu::capability(), "avx2") == 0) {
    if (const CpuLoops* loops = avx2_math::cpu_loops()) return *loops;
  }
  return *base_math::cpu_loops();
}

template <class F>
void for_each_tensor(const TensorLists& lists, F&& body) {
  for (int64_t t = 0; t < lists.num_tensors; ++t) {
    const int64_t n = lists.numels[t];
    if (n == 0) continue;
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { body(t, b, e); });
  }
}

void cpu_pack_delta(const TensorLists& lists, DType source, DType out, float scale) {
  const DeltaLoop loop = cpu_loops().delta(source, out);
  for_each_tensor(lists, [&](int64_t t, int64_t b, int64_t e) {
    loop(lists.ptrs[kDeltaSource][t], lists.ptrs[kDeltaConsensus][t], lists.ptrs[kDeltaOut][t], b, e, scale);
  });
}

void cpu_apply_average(const TensorLists& lists, DType avg, DType param, bool update) {
  const bool master = lists.has(kAvgMaster);
  const ApplyLoop loop = cpu_loops().apply(avg, param, master, update);
  for_each_tensor(lists, [&](int64_t t, int64_t b, int64_t e) {
    loop(lists.ptrs[kAvgIn][t], lists.ptrs[kAvgConsensus][t], master ? lists.ptrs[kAvgMaster][t] : nullptr,
         lists.ptrs[kAvgParam][t], b, e);
  });
}

// ---- the ops ------------------------------------------------------------------------------

std::vector<Named> delta_lists(const TensorList& sources, const TensorList& consensus, const TensorList& out) {
  return {{"sources", &sources, kDeltaSource, false, false},
          {"consensus", &consensus, kDeltaConsensus, false, true},
          {"out", &out, kDeltaOut, false, false}};
}

std::vector<Named> apply_lists(const TensorList& averages, const TensorList& consensus, const TensorList& masters,
                               const TensorList& params) {
  return {{"params", &params, kAvgParam, false, false},
          {"averages", &averages, kAvgIn, false, false},
          {"consensus", &consensus, kAvgConsensus, false, true},
          {"masters", &masters, kAvgMaster, true, true}};
}

template <bool kEmu = false>
void pack_delta_(at::TensorList sources_, at::TensorList consensus_, at::TensorList out_, double scale) {
  constexpr const char* op = "pack_delta_";
  const TensorList sources = sources_.vec(), consensus = consensus_.vec(), out = out_.vec();
  const auto lists = delta_lists(sources, consensus, out);
  const at::Device device = check(op, lists);
  check_distinct(op, lists[2], lists);
  const Prepared p = prepare(lists);
  const float scale32 = static_cast<float>(scale);  // what torch.mul(fp32 tensor, scale) multiplies by
#ifdef FUSEDMF_WITH_CUDA_EMU
  if (kEmu) {
    cuda_emu_api::check_launch(op, cuda_emu_api::pack_delta(p.lists, dtype_of(sources), dtype_of(out), scale32));
    return;
  }
#endif
  if (device.is_cpu()) {
    cpu_pack_delta(p.lists, dtype_of(sources), dtype_of(out), scale32);
    return;
  }
#ifdef FUSEDMF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  const int e = cuda::launch_pack_delta(p.lists, dtype_of(sources), dtype_of(out), scale32,
                                        at::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(e == 0, "fusedmf.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(e)));
#endif
}

template <bool kEmu = false>
void apply_average_(at::TensorList averages_, at::TensorList consensus_, at::TensorList masters_,
                    at::TensorList params_, bool update_consensus) {
  constexpr const char* op = "apply_average_";
  const TensorList averages = averages_.vec(), consensus = consensus_.vec(), masters = masters_.vec(),
                   params = params_.vec();
  const auto lists = apply_lists(averages, consensus, masters, params);
  const at::Device device = check(op, lists);
  for (size_t k : {size_t{0}, size_t{2}, size_t{3}}) check_distinct(op, lists[k], lists);
  const Prepared p = prepare(lists);
#ifdef FUSEDMF_WITH_CUDA_EMU
  if (kEmu) {
    cuda_emu_api::check_launch(op, cuda_emu_api::apply_average(p.lists, dtype_of(averages), dtype_of(params), update_consensus));
    return;
  }
#endif
  if (device.is_cpu()) {
    cpu_apply_average(p.lists, dtype_of(averages), dtype_of(params), update_consensus);
    return;
  }
#ifdef FUSEDMF_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  const int e = cuda::launch_apply_average(p.lists, dtype_of(averages), dtype_of(params), update_consensus,
                                           at::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(e == 0, "fusedmf.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(e)));
#endif
}

// Fake (meta) kernels for torch.compile / FakeTensorMode: the ops write in place and return
// nothing, so a fake run has nothing to compute.
void pack_delta_fake(at::TensorList, at::TensorList, at::TensorList, double) {}
void apply_average_fake(at::TensorList, at::TensorList, at::TensorList, at::TensorList, bool) {}

#ifndef FUSEDMF_WITH_CUDA
void no_cuda(const char* op) {
  TORCH_CHECK(false, "fusedmf.", op, ": the tensors are on a CUDA device but this build of fusedmf._C has no CUDA ",
              "kernels; rebuild with `FUSEDMF_CUDA=1 pip install --no-build-isolation .` (needs nvcc and a CUDA "
              "build of torch)");
}
void pack_delta_no_cuda(at::TensorList, at::TensorList, at::TensorList, double) { no_cuda("pack_delta_"); }
void apply_average_no_cuda(at::TensorList, at::TensorList, at::TensorList, at::TensorList, bool) {
  no_cuda("apply_average_");
}
#endif

}  // namespace
}  // namespace average
}  // namespace fusedmf

// The signatures, shared by the CPU/CUDA ops and the cuda_emu_ ops.
#define FUSEDMF_SCHEMA_PACK_DELTA "(Tensor[] sources, Tensor[] consensus, Tensor(a!)[] out, float scale) -> ()"
#define FUSEDMF_SCHEMA_APPLY_AVERAGE                                                          \
  "(Tensor[] averages, Tensor(a!)[] consensus, Tensor(b!)[] masters, Tensor(c!)[] params, " \
  "bool update_consensus) -> ()"

TORCH_LIBRARY_FRAGMENT(fusedmf, m) {
  m.def("pack_delta_" FUSEDMF_SCHEMA_PACK_DELTA);
  m.def("apply_average_" FUSEDMF_SCHEMA_APPLY_AVERAGE);
#ifdef FUSEDMF_WITH_CUDA_EMU
  m.def("cuda_emu_pack_delta_" FUSEDMF_SCHEMA_PACK_DELTA);
  m.def("cuda_emu_apply_average_" FUSEDMF_SCHEMA_APPLY_AVERAGE);
#endif
}

TORCH_LIBRARY_IMPL(fusedmf, CPU, m) {
  m.impl("pack_delta_", &fusedmf::average::pack_delta_<>);
  m.impl("apply_average_", &fusedmf::average::apply_average_<>);
#ifdef FUSEDMF_WITH_CUDA_EMU
  m.impl("cuda_emu_pack_delta_", &fusedmf::average::pack_delta_<true>);
  m.impl("cuda_emu_apply_average_", &fusedmf::average::apply_average_<true>);
#endif
}

TORCH_LIBRARY_IMPL(fusedmf, CUDA, m) {
#ifdef FUSEDMF_WITH_CUDA
  m.impl("pack_delta_", &fusedmf::average::pack_delta_<>);
  m.impl("apply_average_", &fusedmf::average::apply_average_<>);
#else
  m.impl("pack_delta_", &fusedmf::average::pack_delta_no_cuda);
  m.impl("apply_average_", &fusedmf::average::apply_average_no_cuda);
#endif
}

TORCH_LIBRARY_IMPL(fusedmf, Meta, m) {
  m.impl("pack_delta_", &fusedmf::average::pack_delta_fake);
  m.impl("apply_average_", &fusedmf::average::apply_average_fake);
#ifdef FUSEDMF_WITH_CUDA_EMU
  m.impl("cuda_emu_pack_delta_", &fusedmf::average::pack_delta_fake);
  m.impl("cuda_emu_apply_average_", &fusedmf::average::apply_average_fake);
#endif
}
