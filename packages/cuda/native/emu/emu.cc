// The non-template part of the CUDA emulator (see cuda_emu.h): the fiber scheduler that runs a
// launch's blocks, barriers and warp exchange, the sticky error, and the runtime API subset.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <set>
#include <string_view>
#include <unordered_set>

// Context switch. On x86-64 a small assembly routine saves the callee-saved registers and swaps
// stacks (no signal-mask system call, unlike swapcontext); elsewhere, or with
// -DEMU_USE_UCONTEXT=1, ucontext's makecontext/swapcontext.
#if !defined(EMU_USE_UCONTEXT)
#if defined(__x86_64__) && defined(__linux__)
#define EMU_USE_UCONTEXT 0
#else
#define EMU_USE_UCONTEXT 1
#endif
#endif

#if !EMU_USE_UCONTEXT
// void emu_ctx_switch(void** save_sp, void* new_sp): pushes rbp, rbx and r12-r15 on the current
// stack, stores the stack pointer in *save_sp, switches to new_sp and pops the same layout from
// there. The MXCSR and x87 control words are not switched (ldmxcsr/fldcw cost more than the rest
// of the switch): fibers share the OS thread's floating-point modes, which kernels do not change.
asm(R"(
  .text
  .p2align 4
  .globl emu_ctx_switch
  .hidden emu_ctx_switch
  .type emu_ctx_switch,@function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_ctx_switch,.-emu_ctx_switch
)");
extern "C" void emu_ctx_switch(void** save_sp, void* new_sp);
#endif

namespace emu {
namespace detail {

const uint3* g_thread_idx = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

// ---- errors --------------------------------------------------------------------------------------
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_fault_message;

cudaError_t set_error(cudaError_t e) {
  if (e != cudaSuccess) t_last_error = e;
  return e;
}

// ---- fibers ----------------------------------------------------------------------------------------
enum State : int { kReady, kWaitBlock, kWaitWarp, kWaitNamed, kDone };

struct Fiber {
  char* stack = nullptr;  // lowest usable address (a guard page lies below)
  size_t stack_size = 0;  // usable bytes below the top of the stack
#if EMU_USE_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
  uint3 idx{0, 0, 0};
  int state = kDone;
  unsigned bar_id = 0;  // the named barrier a kWaitNamed fiber waits at
};

struct Warp {
  unsigned exist = 0;    // lanes that exist
  unsigned arrived = 0;  // lanes waiting at the current warp barrier
  unsigned want = 0;     // union of the arrived lanes' masks
  const char* what = "";
  uint64_t slots[32];
};

size_t stack_bytes() {
  static size_t bytes = [] {
    size_t kb = 256;
    if (const char* e = std::getenv("MEGAPATCH_CUDA_EMU_STACK_KB")) {
      long v = std::atol(e);
      if (v >= 64) kb = static_cast<size_t>(v);
    }
    return kb * 1024;
  }();
  return bytes;
}

// Launch state. Only one launch runs at a time (g_launch_mutex), on one OS thread.
std::mutex g_launch_mutex;
// grows to the largest block seen (capacity reserved once: a ucontext_t must not move); stacks are
// reused by every launch
std::vector<Fiber> g_fibers;
std::vector<Warp> g_warps;
#if EMU_USE_UCONTEXT
ucontext_t g_sched_uc;
#else
void* g_sched_sp = nullptr;
#endif
void (*g_invoke)(void*) = nullptr;
void* g_ctx = nullptr;
unsigned g_nthreads = 0;
// The launch's scheduling (MEGAPATCH_CUDA_EMU_SCHEDULE): rounds over the block's threads first to
// last (the default) or last to first (reverse), or by priority (priority[:SEED]): the block's
// warps ranked at random, the highest-ranked warp with a ready thread always runs next, so that a
// warp runs as far ahead of the lower ones as its barriers let it.
enum Schedule { kInOrder, kReverse, kPriority };
Schedule g_schedule = kInOrder;
uint64_t g_seed = 0;                // priority: the seed given
uint64_t g_rng = 0;                 // priority: the block's random stream (splitmix64)
std::vector<unsigned> g_order;      // priority: the block's threads, highest rank first
uint64_t g_schedule_launch = 0;     // priority: launches so far (each ranks its blocks anew)
unsigned g_cur = 0;
unsigned g_live = 0;
bool g_aborted = false;
bool g_in_kernel = false;         // a fiber is running
thread_local bool t_launching = false;
// block barrier
unsigned g_arrived = 0;
const char* g_bar_file = nullptr;
int g_bar_line = 0;
int g_reduce_acc = 0;
int g_reduce_result = 0;
// named barriers (bar.sync / bar.arrive id, count): the threads arrived and the count of the
// current phase (set by its first arrival); ids >= 16 are the emulator's own (wgmma)
struct NamedBar {
  unsigned arrived = 0, count = 0;
  const char* file = nullptr;
  int line = 0;
};
NamedBar g_named[kNamedBarriers];
// dynamic shared memory
unsigned char* g_smem = nullptr;
size_t g_smem_cap = 0;
size_t g_smem_bytes = 0;  // the launch's

// `index` staggers the tops of the stacks over the cache sets (stacks page-aligned alike would
// put every fiber's live frames in the same few sets, and every switch would miss the cache)
void make_stack(Fiber& f, size_t index) {
  size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_t size = stack_bytes();
  void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "emulator: cannot map a fiber stack of %zu bytes\n", size);
    std::abort();
  }
  mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
  f.stack = static_cast<char*>(p) + page;
  f.stack_size = size - (index * 7 % 64) * 64;
#if EMU_USE_UCONTEXT
  getcontext(&f.uc);
#endif
}

void switch_to_fiber(Fiber& f) {
#if EMU_USE_UCONTEXT
  swapcontext(&g_sched_uc, &f.uc);
#else
  emu_ctx_switch(&g_sched_sp, f.sp);
#endif
}

void switch_to_scheduler() {
  Fiber& f = g_fibers[g_cur];
#if EMU_USE_UCONTEXT
  swapcontext(&f.uc, &g_sched_uc);
#else
  emu_ctx_switch(&f.sp, g_sched_sp);
#endif
}

std::string fmt3(const uint3& v);
std::string block_str();
void record_fault(const std::string& msg);

void fiber_main() {
  try {
    g_invoke(g_ctx);
  } catch (const std::exception& e) {  // an exception must not unwind past the fiber's first frame
    record_fault("C++ exception thrown by a kernel in " + block_str() + ", thread " + fmt3(g_fibers[g_cur].idx) +
                 ": " + e.what());
    switch_to_scheduler();
  } catch (...) {
    record_fault("C++ exception thrown by a kernel in " + block_str() + ", thread " + fmt3(g_fibers[g_cur].idx));
    switch_to_scheduler();
  }
  g_fibers[g_cur].state = kDone;
  g_live--;
  switch_to_scheduler();
  std::abort();  // never resumed
}

#if !EMU_USE_UCONTEXT
void emu_fiber_entry() { fiber_main(); }
#endif

void init_fiber(Fiber& f) {
#if EMU_USE_UCONTEXT
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = f.stack_size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main, 0);
#else
  // the frame emu_ctx_switch pops: r15, r14, r13, r12, rbx, rbp and the return address (the
  // entry); above it a null fake return address of the entry, which therefore starts with
  // rsp % 16 == 8, as after a call
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top) - 8;
  for (int i = 0; i < 6; i++) s[i] = 0;
  s[6] = reinterpret_cast<uint64_t>(&emu_fiber_entry);
  s[7] = 0;
  f.sp = s;
#endif
}

std::string fmt3(const uint3& v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

std::string block_str() { return "block " + fmt3(g_block_idx); }

// records a launch fault (sticky error + message) and stops the launch
void record_fault(const std::string& msg) {
  t_fault_message = "emulator: " + msg;
  set_error(cudaErrorLaunchFailure);
  g_aborted = true;
}

void check_in_kernel(const char* what) {
  if (!g_in_kernel) {
    std::fprintf(stderr, "emulator: %s called outside a kernel\n", what);
    std::abort();
  }
}

// the reason a block cannot make progress (every live thread waits at a barrier)
std::string deadlock_message() {
  if (g_arrived > 0) {
    std::string msg = "divergent __syncthreads in " + block_str() + ": " + std::to_string(g_arrived) +
                      " of " + std::to_string(g_nthreads) + " threads wait at " +
                      (g_bar_file ? g_bar_file : "?") + ":" + std::to_string(g_bar_line);
    for (unsigned i = 0; i < g_nthreads; i++) {
      const Fiber& f = g_fibers[i];
      if (f.state == kDone) return msg + ", thread " + fmt3(f.idx) + " has exited";
      if (f.state == kWaitWarp)
        return msg + ", thread " + fmt3(f.idx) + " waits at " + g_warps[i / 32].what;
    }
    return msg;
  }
  for (unsigned id = 0; id < kNamedBarriers; id++) {
    const NamedBar& nb = g_named[id];
    if (nb.arrived == 0) continue;
    return "named barrier " + std::to_string(id) + " in " + block_str() + ": " + std::to_string(nb.arrived) +
           " of " + std::to_string(nb.count) + " threads arrived (last at " + (nb.file ? nb.file : "?") + ":" +
           std::to_string(nb.line) + "), the others wait elsewhere or have exited";
  }
  for (unsigned w = 0; w < g_warps.size(); w++) {
    const Warp& wp = g_warps[w];
    if (!wp.arrived) continue;
    unsigned missing = wp.want & ~wp.arrived;
    char buf[160];
    std::snprintf(buf, sizeof buf, "warp %u: lanes 0x%08x wait for lanes 0x%08x", w, wp.arrived, missing);
    return std::string("divergent ") + wp.what + " in " + block_str() + ", " + buf;
  }
  return "deadlock in " + block_str();
}

uint64_t next_random() {
  uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// runs fiber i until it waits, exits or yields
void resume(unsigned i) {
  Fiber& f = g_fibers[i];
  g_cur = i;
  g_thread_idx = &f.idx;
  g_in_kernel = true;
  switch_to_fiber(f);
  g_in_kernel = false;
}

// priority scheduling of one block: the warps in a random order, each warp's threads first to last;
// the first ready thread in that order runs. After about one switch in 4096 the warp that ran drops
// to the lowest rank (a change point: the others then run ahead of it from where it stopped).
void run_block_by_priority() {
  const unsigned nwarps = (g_nthreads + 31) / 32;
  g_rng = g_seed * 0x2545f4914f6cdd1dull + g_schedule_launch * 0x9e3779b97f4a7c15ull +
          ((uint64_t(g_block_idx.z) * g_grid_dim.y + g_block_idx.y) * g_grid_dim.x + g_block_idx.x);
  std::vector<unsigned> warps(nwarps);
  for (unsigned w = 0; w < nwarps; w++) warps[w] = w;
  for (unsigned w = nwarps; w > 1; w--) std::swap(warps[w - 1], warps[next_random() % w]);
  g_order.clear();
  for (unsigned w : warps)
    for (unsigned t = w * 32; t < g_nthreads && t < w * 32 + 32; t++) g_order.push_back(t);
  // Threads become ready only when a barrier releases them, and the releasing thread then yields
  // (after_release) still ready: after a thread that stopped otherwise (waits or has exited), none
  // before it in the order is ready, and the search goes on from the next one.
  size_t pos = 0;
  while (g_live > 0) {
    while (pos < g_order.size() && g_fibers[g_order[pos]].state != kReady) pos++;
    if (pos == g_order.size()) {
      record_fault(deadlock_message());
      return;
    }
    const unsigned i = g_order[pos];
    resume(i);
    if (g_aborted) return;
    if ((next_random() & 4095) == 0) {
      const unsigned w = i / 32;
      std::stable_partition(g_order.begin(), g_order.end(), [w](unsigned t) { return t / 32 != w; });
      pos = 0;
    } else if (g_fibers[i].state == kReady) {
      pos = 0;
    }
  }
}

// sets the launch's schedule from MEGAPATCH_CUDA_EMU_SCHEDULE's value (null: in order); false when
// the value names none
bool parse_schedule(const char* e) {
  g_schedule = kInOrder;
  if (e == nullptr || *e == 0 || std::strcmp(e, "in-order") == 0) return true;
  if (std::strcmp(e, "reverse") == 0) {
    g_schedule = kReverse;
    return true;
  }
  if (std::strncmp(e, "priority", 8) != 0 || (e[8] != 0 && e[8] != ':')) return false;
  g_seed = 0;
  if (e[8] == ':') {
    char* end = nullptr;
    g_seed = std::strtoull(e + 9, &end, 10);
    if (end == e + 9 || *end != 0) return false;
  }
  g_schedule = kPriority;
  g_schedule_launch++;
  return true;
}

// In priority scheduling, a thread that has just released others from a barrier steps back to the
// scheduler, so that the highest-ranked ready thread runs next (the released ones may outrank it).
void after_release() {
  if (g_schedule != kPriority) return;
  g_fibers[g_cur].state = kReady;
  switch_to_scheduler();
}

unsigned long long g_block_serial = 0;  // blocks run so far (emu::block_serial)

// setmaxnreg, per warpgroup of the running block: the count its threads asked for (0: none yet),
// and how many of them have asked in the current call
struct WgRegs {
  unsigned regs = 0, asked = 0, pending = 0;
  const char* file = nullptr;
  int line = 0;
};
WgRegs g_wg_regs[kMaxThreadsPerBlock / 128];

// The registers a thread of the block has at entry, as the emulator takes them: the most the block
// size allows (64 K a block, multiples of 8, at most 255), what ptxas gives a kernel with
// __launch_bounds__(threads, 1) that uses setmaxnreg.
unsigned entry_registers() {
  const unsigned r = (65536u / g_nthreads) / 8 * 8;
  return r > 248 ? 248 : r;
}

// at the end of a block: every warpgroup's setmaxnreg complete, and what they hold at most the block's
// registers (else a GPU's setmaxnreg.inc waits for registers no one releases)
void check_block_registers() {
  unsigned total = 0;
  bool any = false;
  for (unsigned wg = 0; wg * 128 < g_nthreads; wg++) {
    const WgRegs& w = g_wg_regs[wg];
    if (w.pending != 0) {
      record_fault("setmaxnreg in " + block_str() + ": " + std::to_string(w.pending) + " of warpgroup " +
                   std::to_string(wg) + "'s 128 threads asked for " + std::to_string(w.asked) + " registers (at " +
                   w.file + ":" + std::to_string(w.line) + "), the others never did");
      return;
    }
    any = any || w.regs != 0;
    total += 128 * (w.regs ? w.regs : entry_registers());
  }
  if (any && total > entry_registers() * g_nthreads)
    record_fault("setmaxnreg in " + block_str() + ": the warpgroups hold " + std::to_string(total) +
                 " registers, the block has " + std::to_string(entry_registers() * g_nthreads) + " (" +
                 std::to_string(entry_registers()) + " a thread at entry); a GPU waits forever in setmaxnreg.inc");
}

void run_block_threads() {
  for (unsigned i = 0; i < g_nthreads; i++) {
    init_fiber(g_fibers[i]);
    g_fibers[i].state = kReady;
  }
  for (Warp& w : g_warps) w.arrived = w.want = 0;
  g_live = g_nthreads;
  g_arrived = 0;
  g_reduce_acc = 0;
  for (NamedBar& nb : g_named) nb = NamedBar{};
  if (g_schedule == kPriority) return run_block_by_priority();
  while (g_live > 0) {
    bool ran = false;
    for (unsigned k = 0; k < g_nthreads; k++) {
      const unsigned i = g_schedule == kReverse ? g_nthreads - 1 - k : k;
      Fiber& f = g_fibers[i];
      if (f.state != kReady) continue;
      resume(i);
      ran = true;
      if (g_aborted) return;
    }
    if (!ran) {
      record_fault(deadlock_message());
      return;
    }
  }
}

void run_block() {
  g_block_serial++;
  for (WgRegs& w : g_wg_regs) w = WgRegs{};
  run_block_threads();
  if (!g_aborted) check_block_registers();
}

}  // namespace

// ---- warp support ------------------------------------------------------------------------------
unsigned lane_id() { return g_cur & 31u; }
unsigned warp_lanes() {
  unsigned base = g_cur & ~31u;
  unsigned n = g_nthreads - base;
  return n < 32 ? n : 32;
}
uint64_t* warp_slots() { return g_warps[g_cur / 32].slots; }

void warp_barrier(unsigned mask, const char* what) {
  check_in_kernel(what);
  Warp& w = g_warps[g_cur / 32];
  unsigned bit = 1u << (g_cur & 31u);
  w.want |= (mask & w.exist) | bit;
  w.arrived |= bit;
  if (w.arrived == w.want) {  // last to arrive: release the others and go on
    unsigned base = g_cur & ~31u;
    for (unsigned m = w.arrived & ~bit; m; m &= m - 1) g_fibers[base + __builtin_ctz(m)].state = kReady;
    w.arrived = w.want = 0;
    after_release();
    return;
  }
  w.what = what;
  g_fibers[g_cur].state = kWaitWarp;
  switch_to_scheduler();
}

unsigned active_mask() {
  check_in_kernel("__activemask");
  unsigned base = g_cur & ~31u, n = warp_lanes(), m = 0;
  for (unsigned i = 0; i < n; i++)
    if (g_fibers[base + i].state != kDone) m |= 1u << i;
  return m;
}

void fault(const char* what) {
  check_in_kernel(what);
  const Fiber& f = g_fibers[g_cur];
  record_fault(std::string(what) + " in " + block_str() + ", thread " + fmt3(f.idx));
  switch_to_scheduler();
  std::abort();  // never resumed
}

// ---- launch --------------------------------------------------------------------------------------
void launch_erased(void (*invoke)(void*), void* ctx, dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream);

}  // namespace detail

namespace {
using namespace detail;

// a thread at another __syncthreads than the threads already waiting
[[noreturn]] __attribute__((noinline, cold)) void barrier_site_fault(const char* file, int line) {
  const Fiber& f = g_fibers[g_cur];
  record_fault("divergent __syncthreads in " + block_str() + ": thread " + fmt3(f.idx) + " at " + file +
               ":" + std::to_string(line) + " while " + std::to_string(g_arrived) + " threads wait at " +
               g_bar_file + ":" + std::to_string(g_bar_line));
  switch_to_scheduler();
  std::abort();
}

// block barrier; op -1 plain, 0 count, 1 and, 2 or
int block_barrier(int op, int pred, const char* file, int line) {
  check_in_kernel("__syncthreads");
  if (g_arrived == 0) {
    g_bar_file = file;
    g_bar_line = line;
    g_reduce_acc = op == 1 ? 1 : 0;
  } else if (line != g_bar_line || (file != g_bar_file && std::strcmp(file, g_bar_file) != 0)) {
    barrier_site_fault(file, line);
  }
  if (op == 0) g_reduce_acc += pred ? 1 : 0;
  if (op == 1) g_reduce_acc &= pred ? 1 : 0;
  if (op == 2) g_reduce_acc |= pred ? 1 : 0;
  g_arrived++;
  if (g_arrived == g_nthreads) {
    for (unsigned i = 0; i < g_nthreads; i++)
      if (g_fibers[i].state == kWaitBlock) g_fibers[i].state = kReady;
    g_arrived = 0;
    g_reduce_result = g_reduce_acc;  // stable until the next barrier completes (needs everyone)
    after_release();
    return g_reduce_result;
  }
  g_fibers[g_cur].state = kWaitBlock;
  switch_to_scheduler();
  return g_reduce_result;
}
}  // namespace

void syncthreads(const char* file, int line) { block_barrier(-1, 0, file, line); }

namespace {
[[noreturn]] __attribute__((noinline, cold)) void named_fault(const std::string& msg) {
  record_fault(msg + " in " + block_str() + ", thread " + fmt3(g_fibers[g_cur].idx));
  switch_to_scheduler();
  std::abort();  // never resumed
}
// one arrival at named barrier `id`; true when it completed the phase (the waiters are released)
bool named_arrival(unsigned id, unsigned count, const char* file, int line, const char* what) {
  check_in_kernel(what);
  if (id >= kNamedBarriers)
    named_fault(std::string(what) + ": barrier id " + std::to_string(id) + " (at most " +
                std::to_string(kNamedBarriers - 1) + ")");
  if (count == 0 || count % 32 != 0 || count > g_nthreads)
    named_fault(std::string(what) + ": thread count " + std::to_string(count) +
                " (a multiple of 32, at most the block's " + std::to_string(g_nthreads) + ")");
  NamedBar& nb = g_named[id];
  if (nb.arrived == 0) nb.count = count;
  else if (nb.count != count)
    named_fault(std::string(what) + " " + std::to_string(id) + ": count " + std::to_string(count) + " while " +
                std::to_string(nb.arrived) + " threads arrived with count " + std::to_string(nb.count));
  nb.file = file;
  nb.line = line;
  if (++nb.arrived < nb.count) return false;
  for (unsigned i = 0; i < g_nthreads; i++)
    if (g_fibers[i].state == kWaitNamed && g_fibers[i].bar_id == id) g_fibers[i].state = kReady;
  nb.arrived = 0;
  return true;
}
}  // namespace

void named_barrier_sync(unsigned id, unsigned count, const char* file, int line) {
  if (named_arrival(id, count, file, line, "bar.sync")) return after_release();
  g_fibers[g_cur].state = kWaitNamed;
  g_fibers[g_cur].bar_id = id;
  switch_to_scheduler();
}
void named_barrier_arrive(unsigned id, unsigned count, const char* file, int line) {
  if (named_arrival(id, count, file, line, "bar.arrive")) after_release();
}
void setmaxnreg(unsigned n, bool inc, const char* file, int line) {
  const std::string_view what = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
  check_in_kernel(what.data());
  if (g_nthreads % 128 != 0)
    named_fault(std::string(what) + ": the block is not whole warpgroups (" + std::to_string(g_nthreads) + " threads)");
  if (n < 24 || n > 256 || n % 8 != 0) named_fault(std::string(what) + " " + std::to_string(n) + ": a multiple of 8 in 24 .. 256");
  WgRegs& w = g_wg_regs[g_cur / 128];
  const unsigned cur = w.regs ? w.regs : entry_registers();
  if (w.pending == 0) {
    w.asked = n;
    w.file = file;
    w.line = line;
  } else if (w.asked != n) {
    named_fault(std::string(what) + " " + std::to_string(n) + " while the warpgroup's other threads asked for " +
                std::to_string(w.asked));
  }
  if (inc ? n < cur : n > cur)
    named_fault(std::string(what) + " " + std::to_string(n) + ": the warpgroup holds " + std::to_string(cur) +
                " registers (.inc takes more, .dec gives some back)");
  if (++w.pending == 128) {
    w.regs = n;
    w.pending = 0;
  }
}
int syncthreads_reduce(int op, int pred, const char* file, int line) {
  return block_barrier(op, pred, file, line);
}

void* dynamic_smem() {
  check_in_kernel("dynamic shared memory");
  return g_smem;
}
size_t dynamic_smem_bytes() {
  check_in_kernel("dynamic shared memory");
  return g_smem_bytes;
}

const char* last_fault_message() { return t_fault_message.c_str(); }

}  // namespace emu

// ---- devices, memory, streams, events -------------------------------------------------------------
struct CUstream_st {
  int device;
  unsigned flags;
};
struct CUevent_st {
  int device;
  unsigned flags;
  bool recorded;
  std::chrono::steady_clock::time_point time;
  // deferred copies queued when it was recorded: it completes once that many have run
  unsigned long long after;
};

namespace {
using emu::detail::set_error;

// MEGAPATCH_CUDA_EMU_DRY_RUN=1: launches are checked and counted but not run, and a device has 1
// TiB: the host side of a workload at full size (JS, the addon, allocation) without its
// arithmetic, for profiling; the results are meaningless. Memory is touched only in small amounts
// (kDryTouch at a time): small allocations start as all-ones bytes (a kernel's unwritten check
// buffer then reads as NaN / -1, "nothing wrong"), small memsets and copies into device memory
// happen (input batches survive a round trip), larger ones do not; reads from the device are real.
bool dry_run() {
  static const bool on = [] {
    const char* e = std::getenv("MEGAPATCH_CUDA_EMU_DRY_RUN");
    return e && *e && std::strcmp(e, "0") != 0;
  }();
  return on;
}
std::atomic<unsigned long long> g_launches{0};
std::atomic<unsigned long long> g_stream_waits{0};  // cudaStreamWaitEvent calls (emuStats)

const size_t kNominalMemory = dry_run() ? size_t(1) << 40 : size_t(16) << 30;
constexpr size_t kDryTouch = size_t(1) << 20;

int device_count() {
  static int n = [] {
    int v = 2;
    if (const char* e = std::getenv("MEGAPATCH_CUDA_EMU_DEVICES")) {
      char* end = nullptr;
      long x = std::strtol(e, &end, 10);
      if (end != e && x >= 0 && x <= 64) v = static_cast<int>(x);
    }
    return v;
  }();
  return n;
}

thread_local int t_device = 0;

struct Allocation {
  size_t size;
  int device;
};
std::mutex g_mem_mutex;
std::map<uintptr_t, Allocation> g_allocs;  // device allocations by address
std::map<uintptr_t, size_t> g_host_allocs;  // page-locked host allocations by address, with sizes
size_t g_used[64];
std::unordered_set<CUstream_st*> g_streams;
std::unordered_set<CUevent_st*> g_events;

size_t size_of(const Allocation& a) { return a.size; }
size_t size_of(size_t size) { return size; }

// whether [p, p + n) lies inside one allocation of `allocs` (by address)
template <typename Map>
bool in_allocation(const Map& allocs, const void* p, size_t n) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  auto it = allocs.upper_bound(a);
  if (it == allocs.begin()) return false;
  --it;
  return a >= it->first && a + n <= it->first + size_of(it->second);
}

// whether [p, p + n) lies inside one device allocation
bool in_device_allocation(const void* p, size_t n) { return in_allocation(g_allocs, p, n); }

// Asynchronous uploads. A kernel runs when it is launched, so the emulated stream is always idle,
// but on a GPU a copy from page-locked host memory (cudaMemcpyAsync host-to-device from
// cudaMallocHost / cudaHostAlloc memory) is read by the copy engine later, and the host must not
// write that memory again before the copy's event completes. To let tests see a broken reuse, such
// copies are queued here and run at the next operation that could observe them: a launch, another
// copy or memset, a synchronisation, an event wait, a collective, a free. An event recorded after
// them stays not ready (cudaEventQuery) until they ran; cudaEventSynchronize runs them.
struct DeferredCopy {
  void* dst;
  const void* src;
  size_t count;
};
std::mutex g_deferred_mutex;
std::vector<DeferredCopy> g_deferred;
std::atomic<unsigned long long> g_deferred_queued{0};  // copies queued since the process started
std::atomic<unsigned long long> g_deferred_done{0};    // ... and run

// whether [p, p + n) lies inside one page-locked host allocation
bool in_host_allocation(const void* p, size_t n) { return in_allocation(g_host_allocs, p, n); }

void flush_deferred_copies() {
  if (g_deferred_done.load(std::memory_order_acquire) == g_deferred_queued.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(g_deferred_mutex);
  for (const DeferredCopy& c : g_deferred) {
    if (!(dry_run() && c.count > kDryTouch)) std::memmove(c.dst, c.src, c.count);
  }
  g_deferred_done.fetch_add(g_deferred.size(), std::memory_order_release);
  g_deferred.clear();
}

// for a launch: the default stream or a live stream of the current device (as CUDA requires)
cudaError_t check_stream(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  if (!g_streams.count(s)) return cudaErrorInvalidResourceHandle;
  if (s->device != t_device) return cudaErrorInvalidResourceHandle;
  return cudaSuccess;
}

// a handle that names the default stream or any live stream (of any device: copies and events)
cudaError_t check_stream_any(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  return g_streams.count(s) ? cudaSuccess : cudaErrorInvalidResourceHandle;
}

bool live_event(cudaEvent_t e) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  return e != nullptr && g_events.count(e) > 0;
}

cudaError_t check_copy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return cudaErrorInvalidValue;
  bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return cudaErrorInvalidMemcpyDirection;
  if (dst_dev && !in_device_allocation(dst, count)) return cudaErrorInvalidValue;
  if (src_dev && !in_device_allocation(src, count)) return cudaErrorInvalidValue;
  return cudaSuccess;
}
}  // namespace

void emu::detail::launch_erased(void (*invoke)(void*), void* ctx, dim3 grid, dim3 block, size_t smem,
                                cudaStream_t stream) {
  if (t_launching) {
    std::fprintf(stderr, "emulator: a kernel launched another kernel (not supported)\n");
    std::abort();
  }
  if (device_count() == 0) {
    set_error(cudaErrorNoDevice);
    return;
  }
  if (cudaError_t e = check_stream(stream)) {
    set_error(e);
    return;
  }
  unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > kMaxThreadsPerBlock || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 || smem > kMaxSharedBytes) {
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  g_launches.fetch_add(1, std::memory_order_relaxed);
  flush_deferred_copies();  // the stream's earlier uploads land before the kernel runs
  if (dry_run()) return;
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  t_launching = true;
  unsigned n = static_cast<unsigned>(threads);
  if (g_fibers.size() < n) {
    g_fibers.reserve(kMaxThreadsPerBlock);
    size_t old = g_fibers.size();
    g_fibers.resize(n);
    for (size_t i = old; i < n; i++) make_stack(g_fibers[i], i);
  }
  unsigned nwarps = (n + 31) / 32;
  if (g_warps.size() < nwarps) g_warps.resize(nwarps);
  for (unsigned w = 0; w < nwarps; w++) {
    unsigned lanes = n - w * 32 < 32 ? n - w * 32 : 32;
    g_warps[w].exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  }
  for (unsigned t = 0; t < n; t++) {
    g_fibers[t].idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
  }
  size_t cap = smem < 16 ? 16 : (smem + 15) & ~size_t(15);
  if (cap > g_smem_cap) {
    std::free(g_smem);
    g_smem = static_cast<unsigned char*>(std::aligned_alloc(64, (cap + 63) & ~size_t(63)));
    g_smem_cap = cap;
  }
  g_smem_bytes = smem;
  g_invoke = invoke;
  g_ctx = ctx;
  g_nthreads = n;
  // MEGAPATCH_CUDA_EMU_SCHEDULE (read at each launch): reverse runs each round's threads from the
  // last to the first, priority[:SEED] by random warp ranks (run_block_by_priority), so that races
  // the usual order hides (a consumer warpgroup reading what a producer has not written yet) show
  if (const char* e = std::getenv("MEGAPATCH_CUDA_EMU_SCHEDULE"); !parse_schedule(e)) {
    t_fault_message = std::string("emulator: MEGAPATCH_CUDA_EMU_SCHEDULE=") + e +
                      " is not a schedule (in-order, reverse, priority or priority:SEED)";
    set_error(cudaErrorLaunchFailure);
    t_launching = false;
    return;
  }
  g_block_dim = block;
  g_grid_dim = grid;
  g_aborted = false;
  for (unsigned z = 0; z < grid.z && !g_aborted; z++)
    for (unsigned y = 0; y < grid.y && !g_aborted; y++)
      for (unsigned x = 0; x < grid.x && !g_aborted; x++) {
        g_block_idx = uint3{x, y, z};
        if (smem) std::memset(g_smem, 0xCD, smem);
        run_block();
      }
  g_thread_idx = nullptr;
  t_launching = false;
}

// ---- errors --------------------------------------------------------------------------------------
cudaError_t cudaGetLastError() {
  cudaError_t e = emu::detail::t_last_error;
  emu::detail::t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return emu::detail::t_last_error; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorPeerAccessAlreadyEnabled: return "cudaErrorPeerAccessAlreadyEnabled";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorPeerAccessAlreadyEnabled: return "peer access is already enabled";
    case cudaErrorLaunchFailure:
      if (!emu::detail::t_fault_message.empty()) return emu::detail::t_fault_message.c_str();
      return "unspecified launch failure";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "unknown error";
  }
}

// ---- devices -------------------------------------------------------------------------------------
cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return set_error(cudaErrorInvalidValue);
  *count = device_count();
  return *count == 0 ? set_error(cudaErrorNoDevice) : cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device_count() == 0) return set_error(cudaErrorNoDevice);
  if (device < 0 || device >= device_count()) return set_error(cudaErrorInvalidDevice);
  t_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (!device) return set_error(cudaErrorInvalidValue);
  if (device_count() == 0) return set_error(cudaErrorNoDevice);
  *device = t_device;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (!prop) return set_error(cudaErrorInvalidValue);
  if (device < 0 || device >= device_count()) return set_error(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof *prop);
  std::snprintf(prop->name, sizeof prop->name, "megapatch CUDA emulator");
  prop->totalGlobalMem = kNominalMemory;
  prop->sharedMemPerBlock = 48 * 1024;
  prop->sharedMemPerBlockOptin = emu::kMaxSharedBytes;
  prop->regsPerBlock = 65536;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 4;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->pciBusID = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value) return set_error(cudaErrorInvalidValue);
  cudaDeviceProp p;
  if (cudaError_t e = cudaGetDeviceProperties(&p, device)) return e;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
    case cudaDevAttrMaxBlockDimX: *value = p.maxThreadsDim[0]; break;
    case cudaDevAttrMaxGridDimX: *value = p.maxGridSize[0]; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(p.sharedMemPerBlock); break;
    case cudaDevAttrWarpSize: *value = p.warpSize; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(p.sharedMemPerBlockOptin); break;
    default: return set_error(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize() {
  flush_deferred_copies();
  return device_count() == 0 ? set_error(cudaErrorNoDevice) : cudaSuccess;
}

cudaError_t cudaDeviceReset() {
  flush_deferred_copies();
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  for (auto it = g_allocs.begin(); it != g_allocs.end();) {
    if (it->second.device == t_device) {
      g_used[t_device] -= it->second.size;
      std::free(reinterpret_cast<void*>(it->first));
      it = g_allocs.erase(it);
    } else {
      ++it;
    }
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceCanAccessPeer(int* canAccess, int device, int peer) {
  if (!canAccess) return set_error(cudaErrorInvalidValue);
  if (device < 0 || device >= device_count() || peer < 0 || peer >= device_count())
    return set_error(cudaErrorInvalidDevice);
  *canAccess = device != peer ? 1 : 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned) {
  if (peer < 0 || peer >= device_count() || peer == t_device) return set_error(cudaErrorInvalidDevice);
  return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
  if (!version) return set_error(cudaErrorInvalidValue);
  *version = 13000;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  if (!version) return set_error(cudaErrorInvalidValue);
  *version = 13000;
  return cudaSuccess;
}

cudaError_t cudaMemGetInfo(size_t* free, size_t* total) {
  if (!free || !total) return set_error(cudaErrorInvalidValue);
  if (device_count() == 0) return set_error(cudaErrorNoDevice);
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  size_t used = g_used[t_device];
  *total = kNominalMemory;
  *free = used >= kNominalMemory ? 0 : kNominalMemory - used;
  return cudaSuccess;
}

// ---- memory --------------------------------------------------------------------------------------
cudaError_t cudaMalloc(void** ptr, size_t size) {
  if (!ptr) return set_error(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (device_count() == 0) return set_error(cudaErrorNoDevice);
  if (size == 0) return cudaSuccess;
  size_t rounded = (size + 255) & ~size_t(255);
  if (rounded < size) return set_error(cudaErrorMemoryAllocation);
  {
    std::lock_guard<std::mutex> lock(g_mem_mutex);
    if (g_used[t_device] + rounded > kNominalMemory) return set_error(cudaErrorMemoryAllocation);
  }
  void* p = std::aligned_alloc(256, rounded);
  if (!p) return set_error(cudaErrorMemoryAllocation);
  if (!dry_run()) std::memset(p, 0xCD, rounded);  // uninitialised reads show
  else if (rounded <= kDryTouch) std::memset(p, 0xFF, rounded);
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  g_allocs[reinterpret_cast<uintptr_t>(p)] = Allocation{size, t_device};
  g_used[t_device] += size;
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (!ptr) return cudaSuccess;
  flush_deferred_copies();
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  auto it = g_allocs.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == g_allocs.end()) return set_error(cudaErrorInvalidValue);
  g_used[it->second.device] -= it->second.size;
  g_allocs.erase(it);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMallocHost(void** ptr, size_t size) {
  if (!ptr) return set_error(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (size == 0) return cudaSuccess;
  // MEGAPATCH_CUDA_EMU_NO_PINNED=1: page-locked memory refused, as under a locked-memory limit
  static const bool refused = [] {
    const char* e = std::getenv("MEGAPATCH_CUDA_EMU_NO_PINNED");
    return e && *e && std::strcmp(e, "0") != 0;
  }();
  if (refused) return set_error(cudaErrorMemoryAllocation);
  size_t rounded = (size + 255) & ~size_t(255);
  void* p = std::aligned_alloc(256, rounded);
  if (!p) return set_error(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  g_host_allocs[reinterpret_cast<uintptr_t>(p)] = rounded;
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned) { return cudaMallocHost(ptr, size); }

cudaError_t cudaFreeHost(void* ptr) {
  if (!ptr) return cudaSuccess;
  flush_deferred_copies();  // a copy still reading it runs first
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  if (!g_host_allocs.erase(reinterpret_cast<uintptr_t>(ptr))) return set_error(cudaErrorInvalidValue);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  if (cudaError_t e = check_copy(dst, src, count, kind)) return set_error(e);
  flush_deferred_copies();
  if (dry_run() && count > kDryTouch && in_device_allocation(dst, count)) return cudaSuccess;
  if (count) std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream) {
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  // from page-locked memory to the device: queued, as a GPU's copy engine reads it later
  if (count > 0 && kind == cudaMemcpyHostToDevice && in_host_allocation(src, count)) {
    if (cudaError_t e = check_copy(dst, src, count, cudaMemcpyHostToDevice)) return set_error(e);
    std::lock_guard<std::mutex> lock(g_deferred_mutex);
    g_deferred.push_back({dst, src, count});
    g_deferred_queued.fetch_add(1, std::memory_order_release);
    return cudaSuccess;
  }
  return cudaMemcpy(dst, src, count, kind);
}

cudaError_t cudaMemcpyPeer(void* dst, int dstDevice, const void* src, int srcDevice, size_t count) {
  if (dstDevice < 0 || dstDevice >= device_count() || srcDevice < 0 || srcDevice >= device_count())
    return set_error(cudaErrorInvalidDevice);
  return cudaMemcpy(dst, src, count, cudaMemcpyDeviceToDevice);
}

cudaError_t cudaMemcpyPeerAsync(void* dst, int dstDevice, const void* src, int srcDevice, size_t count,
                                cudaStream_t stream) {
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  return cudaMemcpyPeer(dst, dstDevice, src, srcDevice, count);
}

cudaError_t cudaMemcpy2D(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                         size_t height, cudaMemcpyKind kind) {
  if (width == 0 || height == 0) return cudaSuccess;
  if (width > dpitch || width > spitch) return set_error(cudaErrorInvalidValue);
  size_t dspan = dpitch * (height - 1) + width, sspan = spitch * (height - 1) + width;
  bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if (cudaError_t e = check_copy(dst, src, 1, kind)) return set_error(e);
  flush_deferred_copies();
  if ((dst_dev && !in_device_allocation(dst, dspan)) || (src_dev && !in_device_allocation(src, sspan)))
    return set_error(cudaErrorInvalidValue);
  if (dry_run() && dst_dev && dspan > kDryTouch) return cudaSuccess;  // as cudaMemcpy's large copies
  for (size_t r = 0; r < height; r++)
    std::memmove(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  return cudaSuccess;
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width,
                              size_t height, cudaMemcpyKind kind, cudaStream_t stream) {
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  return cudaMemcpy2D(dst, dpitch, src, spitch, width, height, kind);
}

cudaError_t cudaMallocAsync(void** ptr, size_t size, cudaStream_t stream) {
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  return cudaMalloc(ptr, size);
}

cudaError_t cudaFreeAsync(void* ptr, cudaStream_t stream) {
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  return cudaFree(ptr);
}

cudaError_t cudaMemset(void* dst, int value, size_t count) {
  if (count == 0) return cudaSuccess;
  if (!dst || !in_device_allocation(dst, count)) return set_error(cudaErrorInvalidValue);
  flush_deferred_copies();
  if (dry_run() && count > kDryTouch) return cudaSuccess;
  std::memset(dst, value & 0xff, count);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t stream) {
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  return cudaMemset(dst, value, count);
}

// ---- streams -------------------------------------------------------------------------------------
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags) {
  if (!stream) return set_error(cudaErrorInvalidValue);
  if (device_count() == 0) return set_error(cudaErrorNoDevice);
  CUstream_st* s = new CUstream_st{t_device, flags};
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  g_streams.insert(s);
  *stream = s;
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithFlags(stream, 0); }

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  if (!g_streams.erase(stream)) return set_error(cudaErrorInvalidResourceHandle);
  delete stream;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  flush_deferred_copies();
  return set_error(check_stream_any(stream));
}
cudaError_t cudaStreamQuery(cudaStream_t stream) {
  flush_deferred_copies();  // (the emulated stream finishes when asked)
  return set_error(check_stream_any(stream));
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned) {
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  if (!live_event(event)) return set_error(cudaErrorInvalidResourceHandle);
  g_stream_waits.fetch_add(1, std::memory_order_relaxed);
  return cudaSuccess;
}

cudaError_t cudaLaunchHostFunc(cudaStream_t stream, cudaHostFn_t fn, void* userData) {
  if (!fn) return set_error(cudaErrorInvalidValue);
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  flush_deferred_copies();
  fn(userData);
  return cudaSuccess;
}

// ---- events --------------------------------------------------------------------------------------
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned flags) {
  if (!event) return set_error(cudaErrorInvalidValue);
  CUevent_st* e = new CUevent_st{t_device, flags, false, {}, 0};
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  g_events.insert(e);
  *event = e;
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, 0); }

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (!live_event(event)) return set_error(cudaErrorInvalidResourceHandle);
  if (cudaError_t e = check_stream_any(stream)) return set_error(e);
  event->recorded = true;
  event->time = std::chrono::steady_clock::now();
  event->after = g_deferred_queued.load(std::memory_order_acquire);
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (!live_event(event)) return set_error(cudaErrorInvalidResourceHandle);
  flush_deferred_copies();
  return cudaSuccess;
}
// not ready while copies queued before its record have not run (not an error: nothing is recorded)
cudaError_t cudaEventQuery(cudaEvent_t event) {
  if (!live_event(event)) return set_error(cudaErrorInvalidResourceHandle);
  return event->after > g_deferred_done.load(std::memory_order_acquire) ? cudaErrorNotReady : cudaSuccess;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (!ms) return set_error(cudaErrorInvalidValue);
  if (!live_event(start) || !live_event(end)) return set_error(cudaErrorInvalidResourceHandle);
  if ((start->flags | end->flags) & cudaEventDisableTiming) return set_error(cudaErrorInvalidResourceHandle);
  if (!start->recorded || !end->recorded) return set_error(cudaErrorInvalidResourceHandle);
  *ms = std::chrono::duration<float, std::milli>(end->time - start->time).count();
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::mutex> lock(g_mem_mutex);
  if (!g_events.erase(event)) return set_error(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

unsigned long long emu::launch_count() { return g_launches.load(std::memory_order_relaxed); }
void emu::run_deferred_copies() { flush_deferred_copies(); }
unsigned long long emu::deferred_copy_count() { return g_deferred_queued.load(std::memory_order_relaxed); }
unsigned long long emu::stream_wait_count() { return g_stream_waits.load(std::memory_order_relaxed); }
unsigned long long emu::block_serial() { return g_block_serial; }
bool emu::is_dry_run() { return dry_run(); }
