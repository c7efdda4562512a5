// NCCL entries of the backend: the library, communicators, and the collectives and point-to-point
// operations the NCCL process group of @megapatch/parallel issues on the device's stream.
//
// A GPU build loads libnccl.so.2 on first use (MEGAPATCH_NCCL_LIBRARY names another file), so the
// addon builds and runs without NCCL and says why a group could not use it. Operations are queued
// on the same stream as the compute kernels: a collective is ordered after the kernels that wrote
// its input and before those that read its output, so no events are needed.
#include <dlfcn.h>

#include <chrono>
#include <functional>
#include <thread>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "glue.h"
#include "nccl_api.h"

namespace mpc {
namespace {

struct Loaded {
  NcclApi api{};
  std::string error;  // why NCCL is unavailable (empty when api is usable)
  std::string version;
};

#ifdef MEGAPATCH_CUDA_EMULATOR
Loaded load_nccl() {
  Loaded l;
  l.api = emulated_nccl();
  int v = 0;
  l.api.GetVersion(&v);
  l.version = "emulated " + std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." +
              std::to_string(v % 100);
  return l;
}
#else
template <typename F>
bool bind(void* lib, const char* name, F& fn, bool required, std::string& missing) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn && required) missing += (missing.empty() ? "" : ", ") + std::string(name);
  return fn != nullptr;
}

Loaded load_nccl() {
  Loaded l;
  const char* env = std::getenv("MEGAPATCH_NCCL_LIBRARY");
  std::vector<std::string> names;
  if (env && *env) names.push_back(env);
  names.push_back("libnccl.so.2");
  names.push_back("libnccl.so");
  void* lib = nullptr;
  std::string tried;
  for (const auto& n : names) {
    lib = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib) break;
    const char* e = dlerror();
    tried += (tried.empty() ? "" : "; ") + n + ": " + (e ? e : "not loadable");
  }
  if (!lib) {
    l.error = "NCCL could not be loaded (" + tried +
              "); install NCCL (libnccl2, or the nvidia-nccl-cu12 wheel) and put its lib directory on "
              "LD_LIBRARY_PATH, or set MEGAPATCH_NCCL_LIBRARY to libnccl.so.2";
    return l;
  }
  std::string missing;
  NcclApi& a = l.api;
  bind(lib, "ncclGetVersion", a.GetVersion, true, missing);
  bind(lib, "ncclGetUniqueId", a.GetUniqueId, true, missing);
  bind(lib, "ncclCommInitRank", a.CommInitRank, true, missing);
  bind(lib, "ncclCommDestroy", a.CommDestroy, true, missing);
  bind(lib, "ncclCommAbort", a.CommAbort, true, missing);
  bind(lib, "ncclCommGetAsyncError", a.CommGetAsyncError, true, missing);
  bind(lib, "ncclGetErrorString", a.GetErrorString, true, missing);
  bind(lib, "ncclGetLastError", a.GetLastError, false, missing);
  bind(lib, "ncclAllReduce", a.AllReduce, true, missing);
  bind(lib, "ncclBroadcast", a.Broadcast, true, missing);
  bind(lib, "ncclReduceScatter", a.ReduceScatter, true, missing);
  bind(lib, "ncclAllGather", a.AllGather, true, missing);
  bind(lib, "ncclSend", a.Send, true, missing);
  bind(lib, "ncclRecv", a.Recv, true, missing);
  bind(lib, "ncclGroupStart", a.GroupStart, true, missing);
  bind(lib, "ncclGroupEnd", a.GroupEnd, true, missing);
  if (!missing.empty()) {
    l.error = "the loaded NCCL lacks " + missing + " (megapatch needs NCCL 2.10 or later)";
    l.api = NcclApi{};
    return l;
  }
  int v = 0;
  a.GetVersion(&v);
  if (v < 21000) {
    l.error = "NCCL " + std::to_string(v) + " is too old: bfloat16 and the average reduction need NCCL 2.10 or later";
    l.api = NcclApi{};
    return l;
  }
  l.version = std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
  return l;
}
#endif

const Loaded& nccl() {
  static Loaded l = load_nccl();
  return l;
}

const NcclApi& api() {
  const Loaded& l = nccl();
  if (!l.error.empty()) throw_error(l.error);
  return l.api;
}

// Communicators by handle (the number JavaScript holds); a destroyed slot stays null.
std::mutex g_comms_mu;
std::vector<nccl_comm> g_comms;

nccl_comm comm_of(double handle) {
  std::lock_guard<std::mutex> lock(g_comms_mu);
  auto h = static_cast<size_t>(handle);
  if (h >= g_comms.size() || !g_comms[h]) throw_error("NCCL communicator " + std::to_string(h) + " was destroyed");
  return g_comms[h];
}

void check_nccl(nccl_result r, const char* what, nccl_comm comm = nullptr) {
  if (r == kNcclSuccess) return;
  const NcclApi& a = nccl().api;
  std::string msg = std::string(what) + " failed: " + (a.GetErrorString ? a.GetErrorString(r) : "error");
  if (a.GetLastError) {
    const char* last = a.GetLastError(comm);
    if (last && *last) msg += " (" + std::string(last) + ")";
  }
  throw_error(msg);
}

int nccl_type(DType d) {
  switch (d) {
    case DType::F32: return kNcclFloat32;
    case DType::F64: return kNcclFloat64;
    case DType::BF16: return kNcclBfloat16;
    case DType::F16: return kNcclFloat16;
    case DType::I32: return kNcclInt32;
    case DType::I64: return kNcclInt64;
    case DType::U8: case DType::Bool: return kNcclUint8;
  }
  throw_error("NCCL: unsupported dtype");
}

// A buffer argument: (address, element count, dtype code).
struct Buf {
  void* ptr;
  size_t count;
  int type;
};
Buf buf(Args& a) {
  Buf b;
  b.ptr = a.ptr();
  b.count = static_cast<size_t>(a.i64());
  b.type = nccl_type(static_cast<DType>(a.i32()));
  return b;
}

double dist_timeout_s() {
  const char* v = std::getenv("MEGAPATCH_DIST_TIMEOUT_S");
  double s = v ? std::atof(v) : 0;
  return s > 0 ? s : 600;
}

}  // namespace

// Calls `block` without live communicators; with them polls `query` under the watchdog that
// wait_stream describes (an NCCL error or MEGAPATCH_DIST_TIMEOUT_S aborts every communicator).
static void wait_for(const std::function<cudaError_t()>& query, const std::function<cudaError_t()>& block,
              const char* what) {
  std::vector<nccl_comm> comms;
  {
    std::lock_guard<std::mutex> lock(g_comms_mu);
    for (nccl_comm c : g_comms)
      if (c) comms.push_back(c);
  }
  if (comms.empty()) {
    check(block(), what);
    return;
  }
  const NcclApi& nc = nccl().api;
  auto start = std::chrono::steady_clock::now();
  double limit = dist_timeout_s();
  auto abort_all = [&](const std::string& why) {
    std::lock_guard<std::mutex> lock(g_comms_mu);
    for (nccl_comm& c : g_comms) {
      if (c) nc.CommAbort(c);
      c = nullptr;
    }
    throw_error(std::string(what) + ": " + why + "; the NCCL communicators were aborted (the process group cannot be used any more)");
  };
  for (int i = 0;; i++) {
    cudaError_t r = query();
    if (r == cudaSuccess) return;
    if (r != cudaErrorNotReady) check(r, what);
    (void)cudaGetLastError();  // "not ready" is no error: leave none behind for the next check
    if (i % 64 == 63) {
      for (nccl_comm c : comms) {
        nccl_result err = kNcclSuccess;
        if (nc.CommGetAsyncError(c, &err) == kNcclSuccess && err != kNcclSuccess)
          abort_all(std::string("an NCCL operation failed (") + nc.GetErrorString(err) + ")");
      }
      double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (s > limit)
        abort_all("the device did not finish within " + std::to_string(int(limit)) +
                  " s (MEGAPATCH_DIST_TIMEOUT_S) while NCCL operations were queued: a peer died or did not "
                  "call the same collective");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(i < 256 ? 20 : 1000));
  }
}

// Waits for `stream` (see glue.h). Without live communicators this is cudaStreamSynchronize; with
// them, a collective whose peer died would block the stream forever, so the wait polls the
// stream, asks every communicator for an asynchronous error, and after MEGAPATCH_DIST_TIMEOUT_S
// (default 600 s, torch's NCCL timeout) aborts them all: the error names why instead of a hang.
void wait_stream(cudaStream_t stream, const char* what) {
  note_host_wait();
  wait_for([stream] { return cudaStreamQuery(stream); }, [stream] { return cudaStreamSynchronize(stream); }, what);
}

// The same for an event (an upload waiting for its staging bytes, glue.h): behind a collective
// whose peer died the event would never complete either.
void wait_event(cudaEvent_t event, const char* what) {
  wait_for([event] { return cudaEventQuery(event); }, [event] { return cudaEventSynchronize(event); }, what);
}

// ncclLibrary(): { version } or { error }: whether the process group can use NCCL here.
static Napi::Value NcclLibrary(const Napi::CallbackInfo& info) {
  auto out = Napi::Object::New(info.Env());
  const Loaded& l = nccl();
  if (l.error.empty()) out.Set("version", l.version);
  else out.Set("error", l.error);
  return out;
}

// ncclUniqueId(): a fresh communicator id (Buffer of 128 bytes), made on one rank and sent to the others.
MPC_ENTRY(NcclUniqueIdEntry) {
  NcclUniqueId id{};
  check_nccl(api().GetUniqueId(&id), "ncclGetUniqueId");
  return Napi::Buffer<char>::Copy(info.Env(), id.internal, kNcclIdBytes);
}

// ncclCommInit(id, size, rank): joins the communicator on the current device; blocks until every
// rank has joined. Returns its handle.
MPC_ENTRY(NcclCommInit) {
  auto idbuf = info[0].As<Napi::Buffer<char>>();
  if (idbuf.Length() != kNcclIdBytes) throw_error("ncclCommInit: the id must have 128 bytes");
  NcclUniqueId id{};
  std::memcpy(id.internal, idbuf.Data(), kNcclIdBytes);
  int size = info[1].As<Napi::Number>().Int32Value();
  int rank = info[2].As<Napi::Number>().Int32Value();
  current_device();  // the communicator belongs to the device made current by setDevice
  nccl_comm comm = nullptr;
  check_nccl(api().CommInitRank(&comm, size, id, rank), "ncclCommInitRank");
  std::lock_guard<std::mutex> lock(g_comms_mu);
  g_comms.push_back(comm);
  return Napi::Number::New(info.Env(), static_cast<double>(g_comms.size() - 1));
}

// ncclCommDestroy(handle, abort): frees the communicator (abort: without waiting for its operations).
MPC_ENTRY(NcclCommDestroy) {
  auto h = static_cast<size_t>(info[0].As<Napi::Number>().Int64Value());
  bool abort = info[1].As<Napi::Boolean>().Value();
  nccl_comm comm = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_comms_mu);
    if (h < g_comms.size()) std::swap(comm, g_comms[h]);
  }
  if (comm) check_nccl(abort ? api().CommAbort(comm) : api().CommDestroy(comm), "ncclCommDestroy");
  return info.Env().Undefined();
}

// ncclAsyncError(handle): '' or the error an earlier operation of the communicator ran into.
MPC_ENTRY(NcclAsyncError) {
  nccl_comm comm = comm_of(info[0].As<Napi::Number>().DoubleValue());
  nccl_result r = kNcclSuccess;
  check_nccl(api().CommGetAsyncError(comm, &r), "ncclCommGetAsyncError");
  std::string msg = r == kNcclSuccess ? "" : api().GetErrorString(r);
  return Napi::String::New(info.Env(), msg);
}

// The operations read (comm handle, ...) from the argument buffer.

// ncclAllReduce: comm, send buf, recv address, op
MPC_ENTRY(NcclAllReduce) {
  Args a;
  nccl_comm comm = comm_of(a.num());
  Buf s = buf(a);
  void* recv = a.ptr();
  int op = a.i32();
  check_nccl(api().AllReduce(s.ptr, recv, s.count, s.type, op, comm, current_stream()), "ncclAllReduce", comm);
  return info.Env().Undefined();
}

// ncclBroadcast: comm, send buf, recv address, root
MPC_ENTRY(NcclBroadcast) {
  Args a;
  nccl_comm comm = comm_of(a.num());
  Buf s = buf(a);
  void* recv = a.ptr();
  int root = a.i32();
  check_nccl(api().Broadcast(s.ptr, recv, s.count, s.type, root, comm, current_stream()), "ncclBroadcast", comm);
  return info.Env().Undefined();
}

// ncclReduceScatter: comm, recv buf (count = this rank's part), send address, op
MPC_ENTRY(NcclReduceScatter) {
  Args a;
  nccl_comm comm = comm_of(a.num());
  Buf r = buf(a);
  void* send = a.ptr();
  int op = a.i32();
  check_nccl(api().ReduceScatter(send, r.ptr, r.count, r.type, op, comm, current_stream()), "ncclReduceScatter",
             comm);
  return info.Env().Undefined();
}

// ncclAllGather: comm, send buf (count = each rank's part), recv address
MPC_ENTRY(NcclAllGather) {
  Args a;
  nccl_comm comm = comm_of(a.num());
  Buf s = buf(a);
  void* recv = a.ptr();
  check_nccl(api().AllGather(s.ptr, recv, s.count, s.type, comm, current_stream()), "ncclAllGather", comm);
  return info.Env().Undefined();
}

// ncclSendRecv: comm, n, then n × (kind 0 = send / 1 = recv, peer, buf): one NCCL group, so the
// sends and receives of an exchange progress together (no pairwise ordering deadlock).
MPC_ENTRY(NcclSendRecv) {
  Args a;
  nccl_comm comm = comm_of(a.num());
  int n = a.i32();
  const NcclApi& nc = api();
  cudaStream_t stream = current_stream();
  check_nccl(nc.GroupStart(), "ncclGroupStart", comm);
  nccl_result first = kNcclSuccess;
  for (int i = 0; i < n; i++) {
    int kind = a.i32();
    int peer = a.i32();
    Buf b = buf(a);
    if (b.count == 0) continue;
    nccl_result r = kind == 0 ? nc.Send(b.ptr, b.count, b.type, peer, comm, stream)
                              : nc.Recv(b.ptr, b.count, b.type, peer, comm, stream);
    if (r != kNcclSuccess && first == kNcclSuccess) first = r;
  }
  nccl_result end = nc.GroupEnd();
  check_nccl(first, "ncclSend/ncclRecv", comm);
  check_nccl(end, "ncclGroupEnd", comm);
  return info.Env().Undefined();
}

void register_nccl(Napi::Env env, Napi::Object exports) {
  exports.Set("ncclLibrary", Napi::Function::New(env, NcclLibrary));
  exports.Set("ncclUniqueId", Napi::Function::New(env, NcclUniqueIdEntry));
  exports.Set("ncclCommInit", Napi::Function::New(env, NcclCommInit));
  exports.Set("ncclCommDestroy", Napi::Function::New(env, NcclCommDestroy));
  exports.Set("ncclAsyncError", Napi::Function::New(env, NcclAsyncError));
  exports.Set("ncclAllReduce", Napi::Function::New(env, NcclAllReduce));
  exports.Set("ncclBroadcast", Napi::Function::New(env, NcclBroadcast));
  exports.Set("ncclReduceScatter", Napi::Function::New(env, NcclReduceScatter));
  exports.Set("ncclAllGather", Napi::Function::New(env, NcclAllGather));
  exports.Set("ncclSendRecv", Napi::Function::New(env, NcclSendRecv));
}

}  // namespace mpc
