// Host-only build of the launcher's packing loop (csrc/cuda/multi_tensor_apply.cuh) with a launch
// that records instead of running: tests/test_launch_model.py compares what it packs with
// benchmarks/launch_model.py's replay of the same loop. Needs only the CUDA runtime headers (no
// GPU, no nvcc): the device-side names the header mentions are declared here, never called.
//
// stdin: numels, one per line. stdout: for each (argument limit, depth), one line
//   "<arg_bytes> <depth> <blocks of launch 1> <blocks of launch 2> ..."
// then "driver<version> <depth> <blocks>..." for multi_tensor_apply's own choice under a stubbed
// cudaDriverGetVersion; and each block's element count is checked against the tensor it names (exit 1 on a mismatch).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

int main() {
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
  for (int d = 0; d < 5; ++d) lists.ptrs[d] = ptrs.data();
  using namespace fusedmf::cuda;
  packing_test::run<kSmallArgs, 1>(lists, expected);
  packing_test::run<kSmallArgs, 2>(lists, expected);
  packing_test::run<kSmallArgs, 4>(lists, expected);
  packing_test::run<kSmallArgs, 5>(lists, expected);
  packing_test::run<kLargeArgs, 1>(lists, expected);
  packing_test::run<kLargeArgs, 2>(lists, expected);
  packing_test::run<kLargeArgs, 4>(lists, expected);
  packing_test::run<kLargeArgs, 5>(lists, expected);
  for (int driver : {12000, 12010, 13000}) {  // FUSEDMF_LAUNCH is ours: no caching, see large_kernel_args()
    packing_test::run_auto<1>(lists, driver);
    packing_test::run_auto<2>(lists, driver);
    packing_test::run_auto<4>(lists, driver);
    packing_test::run_auto<5>(lists, driver);
  }
  return 0;
}
