// Threading of the CPU kernels: every call is spread over the intra-op thread pool as one flat
// range of elements, whatever the number and sizes of its tensors.
#include "cpu/cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/kernel_table.h"

namespace fusedmf {
namespace cpu {
namespace {

// NOTE [cpu capability]
// The loops are compiled twice (kernels_base.cpp, kernels_avx2.cpp) and the table is picked here
// from what the CPU supports, like torch's own CPU kernels (ATEN_CPU_CAPABILITY), instead of
// building with -march=native: the build must run on any CPU of the architecture. With AVX2 + FMA
// the loops run 8 floats per instruction and round exactly where torch's AVX2 kernels round, so
// the CPU backend agrees bit for bit with the reference (NOTE [fma placement]).
// FUSEDMF_CPU_CAPABILITY=base forces the portable loops.
const KernelTable* detect() {
  const char* forced = std::getenv("FUSEDMF_CPU_CAPABILITY");
  const bool want_base = forced != nullptr && std::strcmp(forced, "base") == 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (!want_base) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      if (const KernelTable* table = avx2_math::kernel_table()) return table;
    }
  }
#else
  (void)want_base;
#endif
  return base_math::kernel_table();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = detect();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

// NOTE [cpu work split]
// The non-empty tensors of a call are laid end to end as one range of elements and ONE
// at::parallel_for cuts that range into one contiguous piece per thread, so ResNet-50's 161
// tensors (64 to 2.4M elements) balance across threads to the element, with a single fork/join
// per call. (torch's fused CPU SGD runs one parallel region per tensor: 161 fork/joins per step,
// which on a loaded machine cost up to a second per step in our measurements.) A piece crosses
// tensor boundaries; the loops see one (tensor, [begin, end)) at a time. kGrain is the smallest
// piece worth a thread: calls under 2 * kGrain elements stay on the calling thread.
constexpr int64_t kGrain = 32768;

template <class F>
void for_each_piece(const TensorLists& lists, const F& f) {
  std::vector<int64_t> tensor;          // indices of the non-empty tensors
  std::vector<int64_t> offset{0};       // their start in the flat range, and the total at the end
  tensor.reserve(lists.num_tensors);
  offset.reserve(lists.num_tensors + 1);
  for (int64_t i = 0; i < lists.num_tensors; ++i) {
    if (lists.numels[i] > 0) {
      tensor.push_back(i);
      offset.push_back(offset.back() + lists.numels[i]);
    }
  }
  const int64_t total = offset.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // the last tensor starting at or before `begin`
    size_t k = static_cast<size_t>(std::upper_bound(offset.begin(), offset.end(), begin) - offset.begin()) - 1;
    for (int64_t pos = begin; pos < end; ++k) {
      const int64_t stop = std::min(end, offset[k + 1]);
      f(tensor[k], pos - offset[k], stop - offset[k]);
      pos = stop;
    }
  });
}

TensorPtrs tensor_ptrs(const TensorLists& lists, int64_t i) {
  TensorPtrs t;
  for (int s = 0; s < kMaxSlots; ++s) t.slot[s] = lists.has(s) ? lists.ptrs[s][i] : nullptr;
  return t;
}

// NOTE [skip on overflow]: a non-zero found_inf means the call writes nothing at all.
bool skipped(const float* found_inf) { return found_inf != nullptr && *found_inf != 0.0f; }

}  // namespace

void mf_sgd(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
            const float* found_inf) {
  if (skipped(found_inf)) return;
  const SgdScalars s = SgdScalars::load(scalars);
  const float inv = signed_inv_grad_scale(inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f, s.maximize);
  const MomentumMode mode = !lists.has(kMomentum)   ? MomentumMode::kNone
                            : s.first_step != 0.0f ? MomentumMode::kFirstStep
                                                   : MomentumMode::kUpdate;
  const SgdKernel kernel = table().sgd(param, grad, lists.has(kMaster), mode);
  for_each_piece(lists, [&](int64_t i, int64_t begin, int64_t end) {
    kernel(tensor_ptrs(lists, i), begin, end, s, inv);
  });
}

void mf_adam(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
             const float* found_inf) {
  if (skipped(found_inf)) return;
  const AdamScalars s = AdamScalars::load(scalars);
  const float inv = signed_inv_grad_scale(inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f, s.maximize);
  const AdamKernel kernel = table().adam(param, grad, lists.has(kMaster), lists.has(kMaxExpAvgSq));
  for_each_piece(lists, [&](int64_t i, int64_t begin, int64_t end) {
    kernel(tensor_ptrs(lists, i), begin, end, s, inv);
  });
}

void smega2(const TensorLists& lists, DType param, DType grad, const float* scalars, const float* inv_grad_scale,
            const float* found_inf) {
  if (skipped(found_inf)) return;
  const Smega2Scalars s = Smega2Scalars::load(scalars);
  const float inv = signed_inv_grad_scale(inv_grad_scale != nullptr ? *inv_grad_scale : 1.0f, s.maximize);
  const Smega2Kernel kernel = table().smega2(param, grad, lists.has(kMaster), s.cycle_end != 0.0f);
  for_each_piece(lists, [&](int64_t i, int64_t begin, int64_t end) {
    kernel(tensor_ptrs(lists, i), begin, end, s, inv);
  });
}

void smega2_estimate(const TensorLists& lists, DType weights, DType out, const float* scalars) {
  const Smega2EstimateScalars s = Smega2EstimateScalars::load(scalars);
  const Smega2EstimateKernel kernel = table().smega2_estimate(weights, out, s.accumulator_coef != 0.0f);
  for_each_piece(lists, [&](int64_t i, int64_t begin, int64_t end) {
    kernel(tensor_ptrs(lists, i), begin, end, s);
  });
}

// Partial sums of one call, one slot per thread of the pool, added in thread order at the end: a
// call's sum does not depend on which thread finishes first (NOTE [sums of squares]).
class ThreadSums {
 public:
  ThreadSums() : sums_(static_cast<size_t>(std::max(at::get_num_threads(), 1)), 0.0) {}
  void add(double x) {
    const size_t t = static_cast<size_t>(at::get_thread_num());
    sums_[t < sums_.size() ? t : 0] += x;  // parallel_for runs at most get_num_threads() pieces at once
  }
  double total() const {
    double s = 0.0;
    for (double x : sums_) s += x;
    return s;
  }

 private:
  std::vector<double> sums_;
};

void non_finite_check(const TensorLists& lists, DType dtype, float* found_inf, float* sumsq) {
  if (skipped(found_inf)) return;  // already set; it is never cleared, so nothing to learn
  const NonFiniteKernel kernel = table().non_finite(dtype, sumsq != nullptr);
  std::atomic<bool> found{false};
  ThreadSums sums;
  for_each_piece(lists, [&](int64_t i, int64_t begin, int64_t end) {
    double piece = 0.0;
    if (!found.load(std::memory_order_relaxed) && kernel(lists.ptrs[0][i], begin, end, &piece)) {
      found.store(true, std::memory_order_relaxed);
    }
    sums.add(piece);
  });
  if (found.load()) *found_inf = 1.0f;
  if (sumsq != nullptr) *sumsq = static_cast<float>(static_cast<double>(*sumsq) + sums.total());
}

void pack(const TensorLists& lists, const DType* grad_dtypes, DType out, float scale, float* sumsq) {
  const KernelTable& t = table();
  std::vector<PackKernel> kernels(static_cast<size_t>(lists.num_tensors));
  for (int64_t i = 0; i < lists.num_tensors; ++i) kernels[i] = t.pack(grad_dtypes[i], out, sumsq != nullptr);
  ThreadSums sums;
  for_each_piece(lists, [&](int64_t i, int64_t begin, int64_t end) {
    sums.add(kernels[i](lists.ptrs[kGrad][i], lists.ptrs[kPackOut][i], begin, end, scale));
  });
  if (sumsq != nullptr) *sumsq = static_cast<float>(static_cast<double>(*sumsq) + sums.total());
}

const char* capability() { return table().name; }

bool set_capability(const std::string& name) {
  const KernelTable* t = nullptr;
  if (name == "base") {
    t = base_math::kernel_table();
  } else if (name == "avx2") {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) t = avx2_math::kernel_table();
#endif
  }
  if (t == nullptr) return false;
  g_table.store(t, std::memory_order_release);
  return true;
}

}  // namespace cpu
}  // namespace fusedmf
