// CUDA emulation runtime: grid launch, fibers for a block's threads, barriers, shuffles and the
// checks a real launch makes (grid and block limits, dynamic shared memory opt-in), plus some
// it cannot: shared memory starts as NaN bytes (reading what no thread wrote shows up as NaN),
// a guard zone after the dynamic shared memory is checked after every block, a barrier that
// can never complete is reported, and warp collectives are refused once a lane has exited.
#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emu/device.h"

namespace emu {
namespace {

// sm_80's opt-in limit (sm_90 allows 227 KiB): fastlm builds for both, so the lower one rules.
constexpr size_t kMaxDynamicSmem = 163 * 1024;
constexpr size_t kDefaultSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kGuard = 256;
constexpr size_t kStack = 256 * 1024;

enum class State { ready, waiting, done };

struct Thread {
  ucontext_t ctx;
  uint3 idx;
  int warp, lane;
  State state;
};

struct Runtime {
  cudaError_t error = cudaSuccess;
  std::string text;
  const char* text_ptr = nullptr;
  std::map<const void*, int> max_smem;
  // the block being run
  std::vector<Thread> threads;
  unsigned char* smem = nullptr;  // 256-byte aligned, smem_bytes + kGuard long
  size_t smem_capacity = 0;
  size_t smem_bytes = 0;
  uint3 block{0, 0, 0};
  dim3 grid, block_dim;
  Thread* current = nullptr;
  ucontext_t scheduler;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
  int block_alive = 0, block_arrived = 0;
  std::vector<int> warp_alive, warp_arrived, warp_done;
  std::vector<uint64_t> slots;  // one per thread: shuffle exchange
  std::string kernel_error;     // first error raised inside the kernel
  uint64_t block_serial = 0;    // static shared arrays are refilled when this changes
  struct Static {
    uint64_t serial = ~0ull;
    size_t bytes = 0;
    unsigned char* mem = nullptr;
  };
  std::map<std::string, Static> statics;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
};

Runtime& rt() {
  static Runtime r;
  return r;
}

void set_error(cudaError_t e, std::string text) {
  Runtime& r = rt();
  if (r.error != cudaSuccess) return;  // sticky until read, like the real last error
  r.error = e;
  r.text = "emulated CUDA: " + text;
  r.text_ptr = r.text.c_str();
}

void thread_main() {
  Runtime& r = rt();
  r.body(r.closure);
  Thread& t = *r.current;
  t.state = State::done;
  --r.block_alive;
  --r.warp_alive[t.warp];
  ++r.warp_done[t.warp];
  // Exited threads no longer hold a barrier back.
  if (r.block_arrived > 0 && r.block_arrived == r.block_alive) {
    r.block_arrived = 0;
    for (Thread& o : r.threads)
      if (o.state == State::waiting) o.state = State::ready;
  }
  // returns to uc_link: the scheduler
}

void wait_here() {
  Runtime& r = rt();
  Thread& t = *r.current;
  t.state = State::waiting;
  swapcontext(&t.ctx, &r.scheduler);
}

bool run_block(size_t n) {
  Runtime& r = rt();
  std::memset(r.smem, 0xff, r.smem_bytes + kGuard);  // NaN in every float type
  ++r.block_serial;
  for (size_t i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = r.stacks + i * kStack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &r.scheduler;
    t.state = State::ready;
    makecontext(&t.ctx, thread_main, 0);
  }
  r.block_alive = static_cast<int>(n);
  r.block_arrived = 0;
  const size_t warps = (n + 31) / 32;
  r.warp_alive.assign(warps, 0);
  r.warp_arrived.assign(warps, 0);
  r.warp_done.assign(warps, 0);
  for (size_t i = 0; i < n; ++i) ++r.warp_alive[i / 32];
  // The first ready thread (in index order, or in reverse with FASTLM_CUDA_EMU_SCHEDULE=reverse)
  // always runs next, so a warp runs as far ahead of the others as its barriers let it: a
  // missing __syncthreads lets it overwrite a tile the others still read, and a missing
  // __syncwarp lets a lane read what later lanes have not written yet. One of the two orders
  // puts the reader of a race before its writer.
  const char* schedule = std::getenv("FASTLM_CUDA_EMU_SCHEDULE");
  const bool reverse = schedule != nullptr && std::strcmp(schedule, "reverse") == 0;
  for (;;) {
    bool ran = false, all_done = true;
    for (size_t k = 0; k < n; ++k) {
      Thread& t = r.threads[reverse ? n - 1 - k : k];
      if (t.state == State::ready) {
        r.current = &t;
        swapcontext(&r.scheduler, &t.ctx);
        ran = true;
        all_done = false;
        break;  // back to the first ready thread
      }
      if (t.state != State::done) all_done = false;
    }
    if (all_done) break;
    if (!ran) {
      std::string who;
      for (size_t w = 0; w < warps; ++w)
        who += " warp " + std::to_string(w) + ": " + std::to_string(r.warp_arrived[w]) +
               " at __syncwarp/collective, " + std::to_string(r.warp_done[w]) + " exited;";
      set_error(cudaErrorLaunchFailure,
                "deadlock in block (" + std::to_string(r.block.x) + "," + std::to_string(r.block.y) +
                    "," + std::to_string(r.block.z) + "): " + std::to_string(r.block_arrived) +
                    " threads wait at __syncthreads;" + who);
      return false;
    }
  }
  for (size_t i = 0; i < kGuard; ++i)
    if (r.smem[r.smem_bytes + i] != 0xff) {
      set_error(cudaErrorLaunchFailure, "a thread wrote past the " + std::to_string(r.smem_bytes) +
                                            " bytes of dynamic shared memory it was launched with");
      return false;
    }
  if (!r.kernel_error.empty()) {
    set_error(cudaErrorLaunchFailure, r.kernel_error);
    return false;
  }
  return true;
}

}  // namespace

cudaError_t& last_error() { return rt().error; }
const char*& last_error_text() { return rt().text_ptr; }
void set_max_dynamic_smem(const void* kernel, int bytes) { rt().max_smem[kernel] = bytes; }

const uint3& thread_idx() { return rt().current->idx; }
const uint3& block_idx() { return rt().block; }
const dim3& block_dim() { return rt().block_dim; }
const dim3& grid_dim() { return rt().grid; }
unsigned char* dynamic_smem() { return rt().smem; }

void* static_smem(const char* site, size_t bytes) {
  Runtime::Static& st = rt().statics[site];
  if (st.mem == nullptr) {
    st.bytes = bytes;
    st.mem = static_cast<unsigned char*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256));
  }
  if (st.serial != rt().block_serial) {
    st.serial = rt().block_serial;
    std::memset(st.mem, 0xff, st.bytes);
  }
  return st.mem;
}

void fail(const char* what) {
  Runtime& r = rt();
  if (r.kernel_error.empty()) r.kernel_error = what;
}

void sync_block() {
  Runtime& r = rt();
  if (++r.block_arrived == r.block_alive) {
    r.block_arrived = 0;
    for (Thread& t : r.threads)
      if (t.state == State::waiting) t.state = State::ready;
    return;
  }
  wait_here();
}

void sync_warp() {
  Runtime& r = rt();
  const int w = r.current->warp;
  if (r.warp_done[w] > 0) fail("a warp-synchronous operation ran after a lane of its warp exited");
  if (++r.warp_arrived[w] == r.warp_alive[w]) {
    r.warp_arrived[w] = 0;
    for (Thread& t : r.threads)
      if (t.warp == w && t.state == State::waiting) t.state = State::ready;
    return;
  }
  wait_here();
}

uint64_t exchange(uint64_t value, int src_lane) {
  Runtime& r = rt();
  const Thread& t = *r.current;
  sync_warp();  // every lane has consumed the previous exchange
  r.slots[t.warp * 32 + t.lane] = value;
  sync_warp();  // every lane has published
  const int w = t.warp;
  if (src_lane < 0 || src_lane >= 32 || static_cast<size_t>(w * 32 + src_lane) >= r.threads.size()) {
    fail("shuffle from a lane outside the warp");
    return value;
  }
  return r.slots[w * 32 + (src_lane & 31)];
}

cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
                     void* closure) {
  static std::mutex one_grid_at_a_time;  // the runtime's state is global
  const std::lock_guard<std::mutex> lock(one_grid_at_a_time);
  Runtime& r = rt();
  const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || n == 0) {
    set_error(cudaErrorInvalidConfiguration, "a launch with an empty grid or block");
    return r.error;
  }
  if (n > 1024 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u) {
    set_error(cudaErrorInvalidConfiguration,
              "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                  std::to_string(grid.z) + ") x block of " + std::to_string(n) +
                  " threads exceeds the limits (1024 threads, grid y/z <= 65535)");
    return r.error;
  }
  auto opt = r.max_smem.find(kernel);
  const size_t allowed = opt == r.max_smem.end() ? kDefaultSmem : static_cast<size_t>(opt->second);
  if (smem > allowed || smem > kMaxDynamicSmem) {
    set_error(cudaErrorInvalidValue,
              std::to_string(smem) + " bytes of dynamic shared memory requested; allowed " +
                  std::to_string(allowed < kMaxDynamicSmem ? allowed : kMaxDynamicSmem) +
                  " (48 KiB without cudaFuncSetAttribute, at most 163 KiB on sm_80)");
    return r.error;
  }
  if (r.stacks_bytes < n * kStack) {
    if (r.stacks != nullptr) munmap(r.stacks, r.stacks_bytes);
    r.stacks_bytes = n * kStack;
    r.stacks = static_cast<char*>(mmap(nullptr, r.stacks_bytes, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    // A guard page under each stack: an overflow faults instead of corrupting a neighbour.
    for (size_t i = 0; i < n; ++i) mprotect(r.stacks + i * kStack, 4096, PROT_NONE);
  }
  r.threads.assign(n, Thread{});
  for (size_t i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.idx = {static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
             static_cast<unsigned>(i / (static_cast<size_t>(block.x) * block.y))};
    t.warp = static_cast<int>(i / 32);
    t.lane = static_cast<int>(i % 32);
  }
  r.slots.assign(((n + 31) / 32) * 32, 0);
  r.smem_bytes = smem;
  if (r.smem_capacity < smem + kGuard) {
    std::free(r.smem);
    r.smem_capacity = smem + kGuard;
    // __align__(128) on the kernels' declarations; WMMA needs 32
    r.smem = static_cast<unsigned char*>(std::aligned_alloc(256, (r.smem_capacity + 255) / 256 * 256));
  }
  r.grid = grid;
  r.block_dim = block;
  r.body = body;
  r.closure = closure;
  r.kernel_error.clear();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.block = {x, y, z};
        if (!run_block(n)) return r.error;
      }
  return cudaSuccess;
}

}  // namespace emu
