// The runtime of the host emulation of csrc/cuda: see cuda_emu_runtime.h and cuda_emu.h.
//
// NOTE [emulated block]
// One block runs on one OS thread: each of its blockDim threads is a fiber (ucontext) with its
// own stack. The scheduler resumes the runnable fibers once per round, in the configured order;
// a fiber runs until it exits or reaches a barrier (__syncthreads*: the whole block) or a shuffle
// (its warp). When every live member of a group waits at the same call site, for the same time,
// the group is released. Anything else is what a GPU leaves undefined, and throws:
//   - some threads of a block exited, or wait at another barrier, while others wait at one;
//   - a shuffle whose mask is not full, or in a warp with fewer than 32 threads;
//   - no fiber can run (a deadlock).
// Blocks run one after the other, in order (correctness of a kernel must not depend on it: the
// emulator cannot show races between blocks).
#include "cuda/emu/cuda_emu_runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <vector>

// A fiber switch: glibc's swapcontext makes two sigprocmask system calls per switch (and
// getcontext one per fiber), which made the emulated suite spend most of its time in the kernel;
// on x86-64 a switch saves and restores only the callee-saved registers and the SSE/x87 control
// words (the System V ABI's preserved state). The default there; -DFUSEDMF_EMU_UCONTEXT (and any
// other architecture) keeps ucontext. Its one crash, in a 1024-thread block_sum self-test, was the
// test's own out-of-bounds write (block_sum holds kBlockSize / 32 warp sums), since removed.
#if defined(__x86_64__) && !defined(FUSEDMF_EMU_UCONTEXT)
#define FUSEDMF_EMU_FAST_SWITCH 1
extern "C" void fusedmf_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl fusedmf_emu_switch
  .type fusedmf_emu_switch, @function
fusedmf_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fusedmf_emu_switch, .-fusedmf_emu_switch
)");
#endif

// AddressSanitizer must be told of every stack switch (scripts/emu_sanitize.sh builds the emulator
// with it): otherwise it takes a fiber's frames for the scheduler's, and reports or misses accesses.
#if defined(__SANITIZE_ADDRESS__)
#define FUSEDMF_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUSEDMF_EMU_ASAN 1
#endif
#endif
#ifdef FUSEDMF_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace fusedmf_emu {

thread_local uint3 tl_thread_idx{0, 0, 0};
thread_local uint3 tl_block_idx{0, 0, 0};
thread_local dim3 tl_block_dim{1, 1, 1};
thread_local dim3 tl_grid_dim{1, 1, 1};

namespace {

thread_local cudaError_t tl_last_error = cudaSuccess;
std::atomic<int64_t> g_launches{0};
std::atomic<int> g_order{static_cast<int>(ThreadOrder::kForward)};
std::atomic<uint64_t> g_seed{0};
std::atomic<size_t> g_param_limit{32764};
std::atomic<int> g_driver_version{13000};

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;

enum class State { kReady, kBlocked, kDone };
enum class Wait { kNone, kBlock, kWarp };

struct Fiber {
#ifdef FUSEDMF_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  char* stack = nullptr;  // kStackBytes, from tl_stacks
#ifdef FUSEDMF_EMU_ASAN
  void* asan_fake_stack = nullptr;
#endif
  State state = State::kReady;
  Wait wait = Wait::kNone;
  const char* file = nullptr;
  int line = 0;
  int64_t block_syncs = 0;  // barriers passed: all threads at one barrier have passed as many
  int64_t warp_syncs = 0;
  int pred = 0;
  uint64_t bits = 0;     // shuffle: the value given, then the value received
  unsigned mask = 0;
  ShflKind shfl_kind = kShflIdx;
  int shfl_arg = 0;
  int result = 0;  // __syncthreads_or / _and / _count
};

struct BlockRun {
  std::vector<Fiber> fibers;
#ifdef FUSEDMF_EMU_FAST_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif
  int current = -1;
  BlockBody body = nullptr;
  void* ctx = nullptr;
  std::string error;  // set by a fiber: the scheduler throws it once the fiber is back
#ifdef FUSEDMF_EMU_ASAN
  void* asan_fake_stack = nullptr;  // the scheduler's
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
#endif
};

thread_local BlockRun* tl_run = nullptr;
thread_local std::vector<std::unique_ptr<char[]>> tl_stacks;  // reused across blocks and launches

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error("fusedmf cuda_emu: " + what); }

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const auto slash = f.rfind("csrc/");
  if (slash != std::string::npos) f = f.substr(slash);
  return f + ":" + std::to_string(line);
}

void set_coords(int tid) {
  const unsigned t = static_cast<unsigned>(tid), bx = tl_block_dim.x, by = tl_block_dim.y;
  tl_thread_idx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
}

// On fiber `f`, just switched to: tell ASan that its stack is current, and learn the scheduler's.
void entered_fiber(BlockRun& run, Fiber& f) {
#ifdef FUSEDMF_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, &run.scheduler_stack, &run.scheduler_stack_bytes);
#else
  (void)run;
  (void)f;
#endif
}

// From fiber `f` to the scheduler, and from the scheduler into fiber `f`.
void to_scheduler(BlockRun& run, Fiber& f) {
#ifdef FUSEDMF_EMU_ASAN
  // a finished fiber's frames are gone for good (nullptr: ASan drops its fake stack)
  __sanitizer_start_switch_fiber(f.state == State::kDone ? nullptr : &f.asan_fake_stack, run.scheduler_stack,
                                 run.scheduler_stack_bytes);
#endif
#ifdef FUSEDMF_EMU_FAST_SWITCH
  fusedmf_emu_switch(&f.sp, run.scheduler_sp);
#else
  swapcontext(&f.ctx, &run.scheduler);
#endif
  entered_fiber(run, f);
}
void to_fiber(BlockRun& run, Fiber& f) {
#ifdef FUSEDMF_EMU_ASAN
  __sanitizer_start_switch_fiber(&run.asan_fake_stack, f.stack, kStackBytes);
#endif
#ifdef FUSEDMF_EMU_FAST_SWITCH
  fusedmf_emu_switch(&run.scheduler_sp, f.sp);
#else
  swapcontext(&run.scheduler, &f.ctx);
#endif
#ifdef FUSEDMF_EMU_ASAN
  __sanitizer_finish_switch_fiber(run.asan_fake_stack, nullptr, nullptr);
#endif
}

[[noreturn]] void fiber_entry() {
  BlockRun* run = tl_run;
  const int tid = run->current;
  entered_fiber(*run, run->fibers[tid]);
  run->body(run->ctx);
  run->fibers[tid].state = State::kDone;
  to_scheduler(*run, run->fibers[tid]);
  __builtin_unreachable();  // a finished fiber is never resumed
}

void init_fiber(Fiber& f, char* stack, size_t bytes) {
  f.stack = stack;
#ifdef FUSEDMF_EMU_ASAN
  // the stack's previous fiber may have been abandoned mid-frame (a failed launch), its redzones
  // still poisoned
  __asan_unpoison_memory_region(stack, bytes);
#endif
#ifdef FUSEDMF_EMU_FAST_SWITCH
  // What fusedmf_emu_switch pops: the control words, six zeroed registers, then fiber_entry as
  // the return address; above it a null slot where fiber_entry's own return address would be,
  // so that fiber_entry starts with the stack alignment of a called function (rsp % 16 == 8).
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                            // fiber_entry's "return address"
  *--sp = reinterpret_cast<uint64_t>(&fiber_entry);     // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = 0;                // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = bytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_entry), 0);
#endif
}

// Called on a fiber: record an error, go back to the scheduler and never return.
[[noreturn]] void fiber_fail(const std::string& what) {
  BlockRun* run = tl_run;
  run->error = what;
  Fiber& f = run->fibers[run->current];
  f.state = State::kBlocked;
  f.wait = Wait::kNone;
  to_scheduler(*run, f);
  __builtin_unreachable();
}

void suspend(Fiber& f) {
  BlockRun* run = tl_run;
  const int tid = run->current;
  to_scheduler(*run, f);
  tl_run->current = tid;  // back on this fiber
  set_coords(tid);
}

std::vector<int> order_of(int n, uint64_t seed_mix) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  switch (static_cast<ThreadOrder>(g_order.load())) {
    case ThreadOrder::kForward:
      break;
    case ThreadOrder::kReverse:
      std::reverse(order.begin(), order.end());
      break;
    case ThreadOrder::kShuffle: {
      std::mt19937_64 rng(g_seed.load() ^ (seed_mix * 0x9E3779B97F4A7C15ull));
      std::shuffle(order.begin(), order.end(), rng);
      break;
    }
  }
  return order;
}

void deliver_shuffle(std::vector<Fiber>& fibers, int w) {
  uint64_t given[32];
  for (int l = 0; l < 32; ++l) given[l] = fibers[w * 32 + l].bits;
  for (int l = 0; l < 32; ++l) {
    Fiber& f = fibers[w * 32 + l];
    int src = l;
    switch (f.shfl_kind) {
      case kShflIdx:
        src = f.shfl_arg & 31;
        break;
      case kShflDown:
        src = l + f.shfl_arg < 32 ? l + f.shfl_arg : l;
        break;
      case kShflUp:
        src = l - f.shfl_arg >= 0 ? l - f.shfl_arg : l;
        break;
      case kShflXor:
        src = (l ^ f.shfl_arg) & 31;
        break;
    }
    f.bits = given[src];
  }
}

// Releases the groups whose members have all arrived; returns whether any fiber became ready.
bool release(BlockRun& run, uint64_t launch_id, const dim3& block_idx) {
  std::vector<Fiber>& fibers = run.fibers;
  const int n = static_cast<int>(fibers.size());
  bool progress = false;
  // the block's barrier
  int at_block = 0, done = 0;
  const Fiber* first = nullptr;
  for (const Fiber& f : fibers) {
    if (f.state == State::kDone) ++done;
    if (f.state == State::kBlocked && f.wait == Wait::kBlock) {
      ++at_block;
      if (first == nullptr) first = &f;
    }
  }
  (void)launch_id;
  if (at_block > 0 && at_block + done == n) {
    std::ostringstream msg;
    msg << "barrier divergence in block (" << block_idx.x << ", " << block_idx.y << ", " << block_idx.z << "): ";
    if (done > 0) {
      msg << done << " of " << n << " threads exited while " << at_block << " wait at __syncthreads at "
          << where(first->file, first->line) << " (undefined on a GPU: every thread of a block must reach it)";
      fail(msg.str());
    }
    for (int t = 0; t < n; ++t) {
      const Fiber& f = fibers[t];
      if (f.file != first->file || f.line != first->line || f.block_syncs != first->block_syncs) {
        msg << "thread " << t << " waits at the barrier at " << where(f.file, f.line) << " (its barrier #"
            << f.block_syncs << ") while thread " << (first - fibers.data()) << " waits at "
            << where(first->file, first->line) << " (its barrier #" << first->block_syncs << ")";
        fail(msg.str());
      }
    }
    int any = 0, all = 1, count = 0;
    for (const Fiber& f : fibers) {
      any |= f.pred;
      all &= f.pred;
      count += f.pred;
    }
    for (Fiber& f : fibers) {
      f.state = State::kReady;
      f.wait = Wait::kNone;
      f.block_syncs += 1;
      f.result = f.mask == static_cast<unsigned>(kSyncAnd) ? all : f.mask == static_cast<unsigned>(kSyncCount) ? count : any;
    }
    progress = true;
  }
  // each warp's shuffles
  for (int w = 0; w * 32 < n; ++w) {
    int waiting = 0, finished = 0;
    const int lo = w * 32, hi = std::min(n, lo + 32);
    for (int t = lo; t < hi; ++t) {
      if (fibers[t].state == State::kBlocked && fibers[t].wait == Wait::kWarp) ++waiting;
      if (fibers[t].state == State::kDone) ++finished;
    }
    if (waiting == 0 || waiting + finished < hi - lo) continue;
    const Fiber& f0 = fibers[lo];
    if (finished > 0 || hi - lo < 32) {
      fail("__shfl_*_sync with inactive lanes in warp " + std::to_string(w) + " (" + std::to_string(hi - lo - finished) +
           " of 32 lanes arrived; undefined on a GPU with a full mask)");
    }
    for (int t = lo; t < hi; ++t) {
      const Fiber& f = fibers[t];
      if (f.file != f0.file || f.line != f0.line || f.warp_syncs != f0.warp_syncs) {
        fail("warp divergence: lane " + std::to_string(t - lo) + " of warp " + std::to_string(w) + " shuffles at " +
             where(f.file, f.line) + " while lane 0 shuffles at " + where(f0.file, f0.line));
      }
    }
    deliver_shuffle(fibers, w);
    for (int t = lo; t < hi; ++t) {
      fibers[t].state = State::kReady;
      fibers[t].wait = Wait::kNone;
      fibers[t].warp_syncs += 1;
    }
    progress = true;
  }
  return progress;
}

void run_block(BlockRun& run, const dim3& block_idx, uint64_t launch_id, int n) {
  tl_block_idx = uint3{block_idx.x, block_idx.y, block_idx.z};
  run.fibers.clear();
  run.fibers.resize(n);
  run.error.clear();
  while (static_cast<int>(tl_stacks.size()) < n) tl_stacks.emplace_back(new char[kStackBytes]);
  for (int t = 0; t < n; ++t) init_fiber(run.fibers[t], tl_stacks[t].get(), kStackBytes);
  const std::vector<int> order =
      order_of(n, launch_id * 0x10001ull + block_idx.x + (uint64_t{block_idx.y} << 32) + (uint64_t{block_idx.z} << 48));
  for (;;) {
    bool ran = false;
    for (const int t : order) {
      if (run.fibers[t].state != State::kReady) continue;
      run.current = t;
      set_coords(t);
      to_fiber(run, run.fibers[t]);
      ran = true;
      if (!run.error.empty()) fail(run.error);
    }
    bool all_done = true;
    for (const Fiber& f : run.fibers) all_done = all_done && f.state == State::kDone;
    if (all_done) return;
    if (!release(run, launch_id, block_idx) && !ran) fail("deadlock: no thread of the block can run");
  }
}

}  // namespace

cudaError_t take_last_error() {
  const cudaError_t e = tl_last_error;
  tl_last_error = cudaSuccess;
  return e;
}
cudaError_t peek_last_error() { return tl_last_error; }
const char* error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
  }
  return "unknown error";
}

void set_thread_order(ThreadOrder order, uint64_t seed) {
  g_order = static_cast<int>(order);
  g_seed = seed;
}
ThreadOrder thread_order() { return static_cast<ThreadOrder>(g_order.load()); }
void set_param_limit(size_t bytes) { g_param_limit = bytes; }
size_t param_limit() { return g_param_limit.load(); }
void set_driver_version(int v) { g_driver_version = v; }
int driver_version() { return g_driver_version.load(); }
int64_t launches() { return g_launches.load(); }

void check_launch(dim3 grid, dim3 block, size_t smem, size_t param_bytes) {
  std::ostringstream msg;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    msg << "launch with grid (" << grid.x << ", " << grid.y << ", " << grid.z
        << "): each dimension must be >= 1, x <= 2^31-1, y and z <= 65535";
    fail(msg.str());
  }
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64) {
    msg << "launch with block (" << block.x << ", " << block.y << ", " << block.z << "), " << threads
        << " threads: must be 1 .. 1024 threads, x, y <= 1024, z <= 64";
    fail(msg.str());
  }
  if (smem > 48 * 1024) {
    msg << "launch with " << smem << " bytes of dynamic shared memory (over 48 KiB needs an opt-in)";
    fail(msg.str());
  }
  if (param_bytes > param_limit()) {
    msg << "kernel arguments of " << param_bytes << " bytes exceed the launch limit of " << param_limit()
        << " bytes (" << (param_limit() <= 4096 ? "drivers before CUDA 12.1" : "CUDA >= 12.1 on sm_70+") << ")";
    fail(msg.str());
  }
}

void run_grid_erased(dim3 grid, dim3 block, BlockBody body, void* ctx) {
  const uint64_t launch_id = static_cast<uint64_t>(g_launches.fetch_add(1));
  if (tl_run != nullptr) fail("a kernel launch from device code (dynamic parallelism) is not emulated");
  BlockRun run;
  run.body = body;
  run.ctx = ctx;
  tl_grid_dim = grid;
  tl_block_dim = block;
  const int n = static_cast<int>(block.x * block.y * block.z);
  tl_run = &run;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) run_block(run, dim3(x, y, z), launch_id, n);
  } catch (...) {
    tl_run = nullptr;
    throw;
  }
  tl_run = nullptr;
}

int syncthreads(const char* file, int line, int pred, SyncKind kind) {
  BlockRun* run = tl_run;
  if (run == nullptr) fail("__syncthreads outside a kernel");
  Fiber& f = run->fibers[run->current];
  f.state = State::kBlocked;
  f.wait = Wait::kBlock;
  f.file = file;
  f.line = line;
  f.pred = pred;
  f.mask = static_cast<unsigned>(kind);
  suspend(f);
  return f.result;
}

void misaligned_access(const char* file, int line, const void* p, size_t bytes) {
  std::ostringstream msg;
  msg << "misaligned " << bytes << "-byte vector access at " << p << " (" << where(file, line)
      << "): a GPU faults (misaligned address)";
  if (tl_run == nullptr) fail(msg.str());
  fiber_fail(msg.str());
}

void syncwarp(const char* file, int line) { (void)shfl_bits(file, line, 0xFFFFFFFFu, 0, kShflIdx, 0); }

uint64_t shfl_bits(const char* file, int line, unsigned mask, uint64_t bits, ShflKind kind, int arg) {
  BlockRun* run = tl_run;
  if (run == nullptr) fail("a shuffle outside a kernel");
  const int tid = run->current;
  Fiber& f = run->fibers[tid];
  if (mask != 0xFFFFFFFFu) {
    std::ostringstream msg;
    msg << "shuffle at " << where(file, line) << " with mask 0x" << std::hex << mask
        << ": only full-warp shuffles are emulated (and a partial mask is easy to get wrong on a GPU)";
    fiber_fail(msg.str());
  }
  const int n = static_cast<int>(run->fibers.size());
  if (n % 32 != 0) {
    fiber_fail("shuffle at " + where(file, line) + " in a block of " + std::to_string(n) +
               " threads, not a multiple of 32: the last warp has inactive lanes (undefined with a full mask)");
  }
  f.state = State::kBlocked;
  f.wait = Wait::kWarp;
  f.file = file;
  f.line = line;
  f.bits = bits;
  f.shfl_kind = kind;
  f.shfl_arg = arg;
  suspend(f);
  return f.bits;
}

}  // namespace fusedmf_emu
