// Host-only build of csrc/cuda/multi_tensor_apply.cuh, for tests/test_launch_model.py:
//   - the launcher's packing loop with a launch that records instead of running, to compare with
//     benchmarks/launch_model.py's replay of the same loop;
//   - `launch_packing coverage`: chunk_apply run thread after thread of one block (it has no
//     barrier) with an Op that counts, so that every element of a chunk is loaded, computed and
//     stored exactly once on the aligned (unrolled), unaligned and tail paths, and the aligned loop
//     issues two iterations' loads before it computes either (NOTE [ILP-4]).
// Needs only the CUDA runtime headers (no GPU, no nvcc): the device-side names the header mentions
// are declared here as plain host code.
//
// Packing mode: stdin: numels, one per line. stdout: for each (argument limit, depth), one line
//   "<arg_bytes> <depth> <blocks of launch 1> <blocks of launch 2> ..."
// then "driver<version> <depth> <blocks>..." for multi_tensor_apply's own choice under a stubbed
// cudaDriverGetVersion. Each block's element count is checked against the tensor it names (exit 1
// on a mismatch).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

// cuda_runtime_api.h gives these meanings for nvcc (attributes g++ would reject or ignore): here
// the kernels are plain functions that are never called.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __grid_constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __grid_constant__
#define __launch_bounds__(...)
struct FakeDim3 {
  unsigned x = 0;
};
static FakeDim3 threadIdx, blockIdx, blockDim;
static inline float __shfl_down_sync(unsigned, float x, int) { return x; }
static inline void __syncthreads() {}

namespace packing_test {
int driver_version = 0;  // what the stub cudaDriverGetVersion reports
std::vector<int> blocks;  // blocks of each recorded launch
std::vector<int64_t> elems;  // every block's element count, in launch order
struct Recorder {
  int grid;
  template <class Meta, class Op>
  void operator()(const Meta& meta, const Op&) const {
    blocks.push_back(grid);
    for (int b = 0; b < grid; ++b) {
      const int64_t left = meta.numels[meta.block_to_tensor[b]] - int64_t{meta.block_to_chunk[b]} * 65536;
      elems.push_back(left < 65536 ? left : 65536);
    }
  }
};
template <class Kernel>
Recorder record(int grid, Kernel*) {
  return {grid};
}
}  // namespace packing_test

// FUSEDMF_LAUNCH(grid, block, smem, stream, kernel)(meta, op): records grid and meta.
#define FUSEDMF_LAUNCH(grid, block, smem, stream, ...) packing_test::record(grid, &__VA_ARGS__)

#include "update_math.h"
#include "cuda/multi_tensor_apply.cuh"

namespace packing_test {
struct NoOp {  // never called: the recorder runs no block
  void operator()(void* const*, int64_t, int64_t) const {}
};

// The two runtime calls the launcher makes, stubbed (nothing links libcudart).
}  // namespace packing_test
extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" cudaError_t cudaDriverGetVersion(int* version) {
  *version = packing_test::driver_version;
  return cudaSuccess;
}

namespace packing_test {
// The launches of multi_tensor_apply<D>, the launcher's own choice of limit under `driver`.
template <int D>
void run_auto(const fusedmf::TensorLists& lists, int driver) {
  driver_version = driver;
  blocks.clear();
  if (fusedmf::cuda::multi_tensor_apply<D>(lists, NoOp{}, nullptr) != cudaSuccess) std::exit(2);
  std::printf("driver%d %d", driver, D);
  for (int b : blocks) std::printf(" %d", b);
  std::printf("\n");
}

template <int A, int D>
void run(const fusedmf::TensorLists& lists, const std::vector<int64_t>& expected) {
  blocks.clear();
  elems.clear();
  if (fusedmf::cuda::multi_tensor_apply_with<A, D>(lists, NoOp{}, nullptr) != cudaSuccess) std::exit(2);
  if (elems != expected) {
    std::fprintf(stderr, "arg %d depth %d: blocks name the wrong tensors or chunks\n", A, D);
    std::exit(1);
  }
  std::printf("%d %d", A, D);
  for (int b : blocks) std::printf(" %d", b);
  std::printf("\n");
}
}  // namespace packing_test

namespace coverage_test {
using fusedmf::cuda::kIlp;
using fusedmf::cuda::kUnroll;

int failures = 0;
void fail(const char* what, int64_t n, bool aligned, unsigned threads, int64_t i) {
  if (failures++ < 10)
    std::fprintf(stderr, "coverage: %s (n=%lld aligned=%d threads=%u element %lld)\n", what,
                 static_cast<long long>(n), aligned, threads, static_cast<long long>(i));
}

struct CountOp {
  int64_t n;
  bool is_aligned;
  unsigned threads;
  std::vector<int>* computed;
  std::vector<int>* stored;
  int* loads_in_a_row;   // vector loads since this thread's last compute
  int* max_in_a_row;     // the most vector loads issued before a compute
  struct Frag {
    int64_t idx[kIlp];
  };
  bool aligned() const { return is_aligned; }
  void load_vec(Frag& f, int64_t i) const {
    for (int k = 0; k < kIlp; ++k) f.idx[k] = i + k;
    ++*loads_in_a_row;
  }
  void store_vec(const Frag& f, int64_t i) const {
    for (int k = 0; k < kIlp; ++k) store(f, k, i + k);
  }
  void load(Frag& f, int k, int64_t i) const { f.idx[k] = i; }
  void store(const Frag& f, int k, int64_t i) const {
    if (f.idx[k] != i) fail("stored from the wrong lane", n, is_aligned, threads, i);
    if (i < 0 || i >= n) return fail("store out of range", n, is_aligned, threads, i);
    ++(*stored)[i];
  }
  void compute(Frag& f, int k) const {
    if (*loads_in_a_row > *max_in_a_row) *max_in_a_row = *loads_in_a_row;
    *loads_in_a_row = 0;
    const int64_t i = f.idx[k];
    if (i < 0 || i >= n) return fail("compute out of range", n, is_aligned, threads, i);
    ++(*computed)[i];
  }
};

// The same, with chunk_apply's unaligned path loading `kLanes` lanes at a time (kUnalignedLanes).
template <int kLanes>
struct GroupedCountOp : CountOp {
  static constexpr int kUnalignedLanes = kLanes;
};

// Returns the most vector loads a thread issued back to back before computing.
template <class Op = CountOp>
int run(int64_t n, bool aligned, unsigned threads) {
  std::vector<int> computed(n), stored(n);
  int max_in_a_row = 0;
  blockDim.x = threads;
  for (unsigned t = 0; t < threads; ++t) {
    threadIdx.x = t;
    int loads_in_a_row = 0;
    Op op;
    static_cast<CountOp&>(op) = CountOp{n, aligned, threads, &computed, &stored, &loads_in_a_row, &max_in_a_row};
    typename Op::Frag f[kUnroll];
    fusedmf::cuda::chunk_apply(op, n, f);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (computed[i] != 1) fail("computed other than once", n, aligned, threads, i);
    if (stored[i] != 1) fail("stored other than once", n, aligned, threads, i);
  }
  return max_in_a_row;
}

int main() {
  const int64_t chunk = fusedmf::cuda::kChunkSize;
  const unsigned block = fusedmf::cuda::kBlockSize;
  // full chunks, an odd number of vectors per thread, a tail of 1..3, fewer elements than threads
  const int64_t sizes[] = {chunk, chunk - 1, chunk - 3, 3 * 2048 + 4 * 7, 3 * 2048 + 5, 2048 + 2, 513, 511, 4, 3, 1, 0};
  for (int64_t n : sizes)
    for (bool aligned : {true, false})
      for (unsigned threads : {block, 64u}) {
        run(n, aligned, threads);
        run<GroupedCountOp<2>>(n, aligned, threads);
        run<GroupedCountOp<1>>(n, aligned, threads);
      }
  const int in_flight = run(chunk, true, block);
  std::printf("coverage failures %d\n", failures);
  std::printf("aligned vector loads in flight %d\n", in_flight);
  return failures == 0 ? 0 : 1;
}
}  // namespace coverage_test

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "coverage") return coverage_test::main();
  std::vector<int64_t> numels;
  long long n;
  while (std::scanf("%lld", &n) == 1) numels.push_back(n);
  std::vector<int64_t> expected;  // every chunk of every non-empty tensor, in order
  for (int64_t x : numels)
    for (int64_t b = 0; b < x; b += 65536) expected.push_back(x - b < 65536 ? x - b : 65536);
  std::vector<void*> ptrs(numels.size(), reinterpret_cast<void*>(64));
  fusedmf::TensorLists lists;
  lists.num_tensors = static_cast<int64_t>(numels.size());
  lists.numels = numels.data();
  for (int d = 0; d < 6; ++d) lists.ptrs[d] = ptrs.data();
  using namespace fusedmf::cuda;
  packing_test::run<kSmallArgs, 1>(lists, expected);
  packing_test::run<kSmallArgs, 2>(lists, expected);
  packing_test::run<kSmallArgs, 4>(lists, expected);
  packing_test::run<kSmallArgs, 5>(lists, expected);
  packing_test::run<kSmallArgs, 6>(lists, expected);
  packing_test::run<kLargeArgs, 1>(lists, expected);
  packing_test::run<kLargeArgs, 2>(lists, expected);
  packing_test::run<kLargeArgs, 4>(lists, expected);
  packing_test::run<kLargeArgs, 5>(lists, expected);
  packing_test::run<kLargeArgs, 6>(lists, expected);
  for (int driver : {12000, 12010, 13000}) {  // FUSEDMF_LAUNCH is ours: no caching, see large_kernel_args()
    packing_test::run_auto<1>(lists, driver);
    packing_test::run_auto<2>(lists, driver);
    packing_test::run_auto<4>(lists, driver);
    packing_test::run_auto<5>(lists, driver);
    packing_test::run_auto<6>(lists, driver);
  }
  return 0;
}
