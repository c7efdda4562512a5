// The emulator's NCCL: the functions of native/src/backend/nccl_api.h with NCCL's semantics for
// ranks that are separate processes on one machine, so that the NCCL process group of
// @megapatch/parallel runs its real code paths on `cudaemu` devices (whose memory is host memory).
//
// The unique id names a file in the temporary directory that every rank maps (MAP_SHARED): a
// header with a process-shared barrier, one staging slot per rank for the collectives, and a ring
// buffer per ordered pair of ranks for sends and receives. A collective moves its data through
// the slots in chunks, each chunk between two barriers; every rank reduces the slots in rank
// order, so all ranks get the same bits. Sends and receives posted between GroupStart and
// GroupEnd progress together, as NCCL's grouped point-to-point operations do. Operations run to
// completion inside the call (the emulated stream is synchronous). A rank that does not arrive
// within MEGAPATCH_DIST_TIMEOUT_S (default 300 s) makes the operation fail with ncclRemoteError.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "../src/backend/nccl_api.h"

namespace mpc {
namespace {

constexpr int kMaxRanks = 64;
constexpr size_t kSlotBytes = size_t(1) << 20;  // staging per rank and chunk of a collective
constexpr size_t kBoxBytes = size_t(1) << 18;   // ring buffer per ordered pair
constexpr size_t kHeaderBytes = 4096;
constexpr char kMagic[] = "megapatch-nccl-emu";

struct Header {
  std::atomic<uint32_t> arrived;
  std::atomic<uint32_t> generation;
  std::atomic<uint32_t> failed;
};

struct Box {
  std::atomic<uint64_t> head;  // bytes written
  std::atomic<uint64_t> tail;  // bytes read
  char pad[48];
};

struct Comm {
  int rank = 0;
  int size = 0;
  char* base = nullptr;
  size_t bytes = 0;
  Header* header() const { return reinterpret_cast<Header*>(base); }
  char* slot(int r) const { return base + kHeaderBytes + size_t(r) * kSlotBytes; }
  Box* box(int src, int dst) const {
    char* boxes = base + kHeaderBytes + size_t(size) * kSlotBytes;
    return reinterpret_cast<Box*>(boxes + (size_t(src) * size + dst) * (sizeof(Box) + kBoxBytes));
  }
  char* box_data(int src, int dst) const { return reinterpret_cast<char*>(box(src, dst)) + sizeof(Box); }
};

size_t file_bytes(int n) { return kHeaderBytes + size_t(n) * kSlotBytes + size_t(n) * n * (sizeof(Box) + kBoxBytes); }

thread_local std::string g_last_error;

double timeout_seconds() {
  const char* v = std::getenv("MEGAPATCH_DIST_TIMEOUT_S");
  double s = v ? std::atof(v) : 0;
  return s > 0 ? s : 300;
}

// Spins (yielding) until ready() or the timeout; false on timeout or when another rank failed.
template <typename F>
bool spin_until(Comm* c, F ready) {
  auto start = std::chrono::steady_clock::now();
  double limit = timeout_seconds();
  for (uint64_t i = 0;; i++) {
    if (ready()) return true;
    if (c->header()->failed.load(std::memory_order_acquire)) {
      g_last_error = "another rank of the communicator failed";
      return false;
    }
    if ((i & 1023) == 1023) {
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (s > limit) {
        g_last_error = "a rank did not arrive within " + std::to_string(int(limit)) + " s";
        c->header()->failed.store(1, std::memory_order_release);
        return false;
      }
    }
    if (i > 64) std::this_thread::sleep_for(std::chrono::microseconds(i > 4096 ? 200 : 5));
    else sched_yield();
  }
}

bool barrier(Comm* c) {
  Header* h = c->header();
  uint32_t gen = h->generation.load(std::memory_order_acquire);
  if (h->arrived.fetch_add(1, std::memory_order_acq_rel) == uint32_t(c->size - 1)) {
    h->arrived.store(0, std::memory_order_relaxed);
    h->generation.fetch_add(1, std::memory_order_acq_rel);
    return true;
  }
  return spin_until(c, [&] { return h->generation.load(std::memory_order_acquire) != gen; });
}

size_t type_size(int t) {
  switch (t) {
    case kNcclInt8: case kNcclUint8: return 1;
    case kNcclFloat16: case kNcclBfloat16: return 2;
    case kNcclInt32: case kNcclFloat32: return 4;
    case kNcclInt64: case kNcclFloat64: return 8;
    default: return 0;
  }
}

template <typename T>
T combine(T a, T b, int op) {
  switch (op) {
    case kNcclSum: case kNcclAvg: return a + b;
    case kNcclProd: return a * b;
    case kNcclMax: return b > a || std::isnan(double(b)) ? b : a;
    default: return b < a || std::isnan(double(b)) ? b : a;
  }
}

// dst[i] = op over ranks r of slot r's element at `offset` + i (in rank order, in the type's
// compute precision: float for 16-bit floats, rounding once), avg dividing by the rank count.
template <typename T, typename C, typename Load, typename Store>
void reduce_slots(Comm* c, size_t offset, size_t n, void* dst, int op, Load ld, Store st) {
  for (size_t i = 0; i < n; i++) {
    C acc = ld(reinterpret_cast<const T*>(c->slot(0) + offset) + i);
    for (int r = 1; r < c->size; r++) acc = combine<C>(acc, ld(reinterpret_cast<const T*>(c->slot(r) + offset) + i), op);
    if (op == kNcclAvg) acc = acc / C(c->size);
    st(reinterpret_cast<T*>(dst) + i, acc);
  }
}

void reduce_into(Comm* c, size_t offset, size_t n, void* dst, int type, int op) {
  auto plain = [](auto* p) { return *p; };
  auto put = [](auto* p, auto v) { *p = v; };
  switch (type) {
    case kNcclFloat32: reduce_slots<float, float>(c, offset, n, dst, op, plain, put); break;
    case kNcclFloat64: reduce_slots<double, double>(c, offset, n, dst, op, plain, put); break;
    case kNcclInt32: reduce_slots<int32_t, int32_t>(c, offset, n, dst, op, plain, put); break;
    case kNcclInt64: reduce_slots<int64_t, int64_t>(c, offset, n, dst, op, plain, put); break;
    case kNcclUint8: reduce_slots<uint8_t, uint8_t>(c, offset, n, dst, op, plain, put); break;
    case kNcclInt8: reduce_slots<int8_t, int8_t>(c, offset, n, dst, op, plain, put); break;
    case kNcclBfloat16:
      reduce_slots<uint16_t, float>(
          c, offset, n, dst, op, [](const uint16_t* p) { return bf16_to_f32(*p); },
          [](uint16_t* p, float v) { *p = f32_to_bf16(v); });
      break;
    case kNcclFloat16:
      reduce_slots<uint16_t, float>(
          c, offset, n, dst, op, [](const uint16_t* p) { return f16_to_f32(*p); },
          [](uint16_t* p, float v) { *p = f32_to_f16(v); });
      break;
  }
}

// every operation starts here: uploads the emulator queued (see emu.cc) land before a collective
// reads the buffers, as the stream orders them on a GPU
Comm* as_comm(nccl_comm comm) {
  emu::run_deferred_copies();
  return static_cast<Comm*>(comm);
}

nccl_result fail(Comm* c, const std::string& why) {
  g_last_error = why;
  if (c) c->header()->failed.store(1, std::memory_order_release);
  return kNcclRemoteError;
}

// ---- the API ---------------------------------------------------------------------------------

nccl_result GetVersion(int* v) {
  *v = 22105;  // the NCCL version whose semantics this follows (2.21.5)
  return kNcclSuccess;
}

nccl_result GetUniqueId(NcclUniqueId* id) {
  std::memset(id->internal, 0, kNcclIdBytes);
  std::memcpy(id->internal, kMagic, sizeof(kMagic));
  unsigned char rnd[16];
  int fd = open("/dev/urandom", O_RDONLY);
  if (fd < 0 || read(fd, rnd, sizeof(rnd)) != ssize_t(sizeof(rnd))) {
    if (fd >= 0) close(fd);
    g_last_error = "cannot read /dev/urandom";
    return kNcclSystemError;
  }
  close(fd);
  char* hex = id->internal + sizeof(kMagic);
  for (int i = 0; i < 16; i++) std::snprintf(hex + 2 * i, 3, "%02x", rnd[i]);
  return kNcclSuccess;
}

std::string id_path(const NcclUniqueId& id) {
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = tmp && *tmp ? tmp : "/tmp";
  return dir + "/megapatch-nccl-emu-" + std::string(id.internal + sizeof(kMagic), 32);
}

nccl_result CommInitRank(nccl_comm* out, int nranks, NcclUniqueId id, int rank) {
  if (std::memcmp(id.internal, kMagic, sizeof(kMagic)) != 0) {
    g_last_error = "the id was not made by the emulator's ncclGetUniqueId";
    return kNcclInvalidArgument;
  }
  if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks) {
    g_last_error = "rank " + std::to_string(rank) + " of " + std::to_string(nranks) + " is out of range";
    return kNcclInvalidArgument;
  }
  std::string path = id_path(id);
  int fd = open(path.c_str(), O_RDWR | O_CREAT, 0600);
  if (fd < 0) {
    g_last_error = "cannot open " + path + ": " + std::strerror(errno);
    return kNcclSystemError;
  }
  size_t bytes = file_bytes(nranks);
  // every rank sizes the file the same way; a fresh file reads as zeros (the header's counters)
  if (ftruncate(fd, off_t(bytes)) != 0) {
    g_last_error = "cannot size " + path + ": " + std::strerror(errno);
    close(fd);
    return kNcclSystemError;
  }
  void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) {
    g_last_error = "cannot map " + path + ": " + std::strerror(errno);
    return kNcclSystemError;
  }
  auto* c = new Comm{rank, nranks, static_cast<char*>(base), bytes};
  if (!barrier(c)) {
    munmap(base, bytes);
    delete c;
    return kNcclRemoteError;
  }
  // every rank has mapped the file: it needs no name any more
  if (rank == 0) unlink(path.c_str());
  *out = c;
  return kNcclSuccess;
}

nccl_result CommDestroy(nccl_comm comm) {
  Comm* c = as_comm(comm);
  munmap(c->base, c->bytes);
  delete c;
  return kNcclSuccess;
}

nccl_result CommAbort(nccl_comm comm) {
  as_comm(comm)->header()->failed.store(1, std::memory_order_release);
  return CommDestroy(comm);
}

nccl_result CommGetAsyncError(nccl_comm comm, nccl_result* err) {
  *err = as_comm(comm)->header()->failed.load(std::memory_order_acquire) ? kNcclRemoteError : kNcclSuccess;
  return kNcclSuccess;
}

const char* GetErrorString(nccl_result r) {
  switch (r) {
    case kNcclSuccess: return "no error";
    case kNcclSystemError: return "unhandled system error";
    case kNcclInvalidArgument: return "invalid argument";
    case kNcclInvalidUsage: return "invalid usage";
    case kNcclRemoteError: return "remote process exited or there was a network error";
    default: return "unknown result code";
  }
}

const char* GetLastError(nccl_comm) { return g_last_error.c_str(); }

nccl_result check_type(Comm* c, int type) {
  if (type_size(type) == 0) {
    g_last_error = "unsupported data type " + std::to_string(type);
    return kNcclInvalidArgument;
  }
  (void)c;
  return kNcclSuccess;
}

nccl_result AllReduce(const void* send, void* recv, size_t count, int type, int op, nccl_comm comm, cudaStream_t) {
  Comm* c = as_comm(comm);
  if (nccl_result r = check_type(c, type)) return r;
  size_t es = type_size(type), per = kSlotBytes / es;
  for (size_t done = 0; done < count; done += per) {
    size_t n = std::min(per, count - done);
    std::memcpy(c->slot(c->rank), static_cast<const char*>(send) + done * es, n * es);
    if (!barrier(c)) return kNcclRemoteError;
    reduce_into(c, 0, n, static_cast<char*>(recv) + done * es, type, op);
    if (!barrier(c)) return kNcclRemoteError;
  }
  return kNcclSuccess;
}

nccl_result Broadcast(const void* send, void* recv, size_t count, int type, int root, nccl_comm comm, cudaStream_t) {
  Comm* c = as_comm(comm);
  if (nccl_result r = check_type(c, type)) return r;
  if (root < 0 || root >= c->size) return fail(nullptr, "root " + std::to_string(root) + " is out of range");
  size_t bytes = count * type_size(type);
  for (size_t done = 0; done < bytes; done += kSlotBytes) {
    size_t n = std::min(kSlotBytes, bytes - done);
    if (c->rank == root) std::memcpy(c->slot(root), static_cast<const char*>(send) + done, n);
    if (!barrier(c)) return kNcclRemoteError;
    if (c->rank != root || recv != send) std::memcpy(static_cast<char*>(recv) + done, c->slot(root), n);
    if (!barrier(c)) return kNcclRemoteError;
  }
  return kNcclSuccess;
}

nccl_result AllGather(const void* send, void* recv, size_t sendcount, int type, nccl_comm comm, cudaStream_t) {
  Comm* c = as_comm(comm);
  if (nccl_result r = check_type(c, type)) return r;
  size_t part = sendcount * type_size(type);
  for (size_t done = 0; done < part; done += kSlotBytes) {
    size_t n = std::min(kSlotBytes, part - done);
    std::memcpy(c->slot(c->rank), static_cast<const char*>(send) + done, n);
    if (!barrier(c)) return kNcclRemoteError;
    for (int r = 0; r < c->size; r++) std::memcpy(static_cast<char*>(recv) + r * part + done, c->slot(r), n);
    if (!barrier(c)) return kNcclRemoteError;
  }
  return kNcclSuccess;
}

nccl_result ReduceScatter(const void* send, void* recv, size_t recvcount, int type, int op, nccl_comm comm,
                          cudaStream_t) {
  Comm* c = as_comm(comm);
  if (nccl_result r = check_type(c, type)) return r;
  size_t es = type_size(type);
  // a slot holds one chunk for every destination rank
  size_t per = kSlotBytes / es / size_t(c->size);
  for (size_t done = 0; done < recvcount; done += per) {
    size_t n = std::min(per, recvcount - done);
    for (int r = 0; r < c->size; r++)
      std::memcpy(c->slot(c->rank) + r * per * es, static_cast<const char*>(send) + (r * recvcount + done) * es, n * es);
    if (!barrier(c)) return kNcclRemoteError;
    reduce_into(c, size_t(c->rank) * per * es, n, static_cast<char*>(recv) + done * es, type, op);
    if (!barrier(c)) return kNcclRemoteError;
  }
  return kNcclSuccess;
}

// ---- point to point --------------------------------------------------------------------------

struct P2P {
  bool send;
  int peer;
  char* data;
  size_t bytes;
  size_t done = 0;
};

thread_local int g_group_depth = 0;
thread_local std::vector<P2P> g_pending;
thread_local Comm* g_pending_comm = nullptr;

// Moves what the ring buffers allow; true when the operation has finished.
bool progress(Comm* c, P2P& op) {
  Box* b = op.send ? c->box(c->rank, op.peer) : c->box(op.peer, c->rank);
  char* ring = op.send ? c->box_data(c->rank, op.peer) : c->box_data(op.peer, c->rank);
  uint64_t head = b->head.load(std::memory_order_acquire);
  uint64_t tail = b->tail.load(std::memory_order_acquire);
  size_t room = op.send ? kBoxBytes - size_t(head - tail) : size_t(head - tail);
  size_t n = std::min(room, op.bytes - op.done);
  uint64_t pos = op.send ? head : tail;
  for (size_t moved = 0; moved < n;) {
    size_t at = size_t((pos + moved) % kBoxBytes);
    size_t run = std::min(n - moved, kBoxBytes - at);
    if (op.send) std::memcpy(ring + at, op.data + op.done + moved, run);
    else std::memcpy(op.data + op.done + moved, ring + at, run);
    moved += run;
  }
  if (op.send) b->head.store(head + n, std::memory_order_release);
  else b->tail.store(tail + n, std::memory_order_release);
  op.done += n;
  return op.done == op.bytes;
}

nccl_result run_p2p(Comm* c, std::vector<P2P>& ops) {
  bool ok = spin_until(c, [&] {
    bool all = true;
    for (size_t i = 0; i < ops.size(); i++) {
      P2P& op = ops[i];
      if (op.done == op.bytes) continue;
      // operations through one ring buffer (same direction and peer) go in the order posted
      bool blocked = false;
      for (size_t j = 0; j < i && !blocked; j++)
        blocked = ops[j].send == op.send && ops[j].peer == op.peer && ops[j].done < ops[j].bytes;
      if (blocked || !progress(c, op)) all = false;
    }
    return all;
  });
  ops.clear();
  return ok ? kNcclSuccess : kNcclRemoteError;
}

nccl_result post(nccl_comm comm, P2P op, int type) {
  Comm* c = as_comm(comm);
  if (nccl_result r = check_type(c, type)) return r;
  if (op.peer < 0 || op.peer >= c->size) {
    g_last_error = "peer " + std::to_string(op.peer) + " is out of range";
    return kNcclInvalidArgument;
  }
  if (g_group_depth == 0) {
    std::vector<P2P> one{op};
    return run_p2p(c, one);
  }
  if (g_pending_comm && g_pending_comm != c) {
    g_last_error = "one group of point-to-point operations spans two communicators";
    return kNcclInvalidUsage;
  }
  g_pending_comm = c;
  g_pending.push_back(op);
  return kNcclSuccess;
}

nccl_result Send(const void* send, size_t count, int type, int peer, nccl_comm comm, cudaStream_t) {
  return post(comm, P2P{true, peer, static_cast<char*>(const_cast<void*>(send)), count * type_size(type)}, type);
}

nccl_result Recv(void* recv, size_t count, int type, int peer, nccl_comm comm, cudaStream_t) {
  return post(comm, P2P{false, peer, static_cast<char*>(recv), count * type_size(type)}, type);
}

nccl_result GroupStart() {
  g_group_depth++;
  return kNcclSuccess;
}

nccl_result GroupEnd() {
  if (g_group_depth == 0) {
    g_last_error = "ncclGroupEnd without ncclGroupStart";
    return kNcclInvalidUsage;
  }
  if (--g_group_depth > 0 || g_pending.empty()) return kNcclSuccess;
  Comm* c = g_pending_comm;
  g_pending_comm = nullptr;
  return run_p2p(c, g_pending);
}

}  // namespace

const NcclApi& emulated_nccl() {
  static const NcclApi api = {GetVersion, GetUniqueId, CommInitRank,  CommDestroy, CommAbort,  CommGetAsyncError,
                              GetErrorString, GetLastError, AllReduce, Broadcast,   ReduceScatter, AllGather,
                              Send,       Recv,        GroupStart,    GroupEnd};
  return api;
}

}  // namespace mpc
