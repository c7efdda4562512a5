// N-API bindings: the rendezvous store (NativeStore) and Gloo process groups (NativeGroup).
// Blocking work never runs on Node's main thread: store requests run on the libuv pool, group
// operations on each group's communication threads, which report completion through a
// thread-safe function. Tensor memory is passed as raw addresses; the JS side keeps the storages
// alive until an operation completes.
#include <arpa/inet.h>
#include <gloo/config.h>
#include <gloo/transport/tcp/attr.h>
#include <gloo/transport/tcp/device.h>
#include <napi.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <memory>

#include "group.h"
#include "store.h"

namespace {

using mp::DType;
using mp::Group;
using mp::RedOp;
using mp::StoreClient;
using mp::StoreError;
using mp::StoreServer;

Napi::Error errorWithCode(Napi::Env env, const std::string& code, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

// Runs `work` on the libuv pool and settles a promise with what `done` makes of its result.
class Task : public Napi::AsyncWorker {
 public:
  using Work = std::function<std::string()>;
  using Done = std::function<Napi::Value(Napi::Env, const std::string&)>;
  Task(Napi::Env env, Work work, Done done)
      : Napi::AsyncWorker(env), deferred_(Napi::Promise::Deferred::New(env)), work_(std::move(work)),
        done_(std::move(done)) {}
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override {
    try {
      result_ = work_();
    } catch (const StoreError& e) {
      code_ = e.code;
      SetError(e.what());
    } catch (const std::exception& e) {
      code_ = "STORE";
      SetError(e.what());
    }
  }
  void OnOK() override { deferred_.Resolve(done_(Env(), result_)); }
  void OnError(const Napi::Error& e) override {
    deferred_.Reject(errorWithCode(Env(), code_, e.Message()).Value());
  }

 private:
  Napi::Promise::Deferred deferred_;
  Work work_;
  Done done_;
  std::string result_;
  std::string code_;
};

std::vector<std::string> stringArray(const Napi::Value& v) {
  std::vector<std::string> out;
  auto a = v.As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) out.push_back(a.Get(i).As<Napi::String>().Utf8Value());
  return out;
}

std::string bytesOf(const Napi::Value& v) {
  if (v.IsBuffer()) {
    auto b = v.As<Napi::Buffer<char>>();
    return std::string(b.Data(), b.Length());
  }
  return v.As<Napi::String>().Utf8Value();
}

// ---------------------------------------------------------------------------------------------

class NativeStore;
std::mutex liveMu;
std::vector<void*> liveStores;  // NativeStore*, see shutdownAll

void forgetLive(std::vector<void*>& list, void* p) {
  std::lock_guard<std::mutex> lock(liveMu);
  list.erase(std::remove(list.begin(), list.end(), p), list.end());
}

class NativeStore : public Napi::ObjectWrap<NativeStore> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeStore",
                       {
                           InstanceMethod("connect", &NativeStore::Connect),
                           InstanceMethod("set", &NativeStore::Set),
                           InstanceMethod("get", &NativeStore::Get),
                           InstanceMethod("add", &NativeStore::Add),
                           InstanceMethod("check", &NativeStore::Check),
                           InstanceMethod("wait", &NativeStore::Wait),
                           InstanceMethod("numKeys", &NativeStore::NumKeys),
                           InstanceMethod("deleteKey", &NativeStore::DeleteKey),
                           InstanceMethod("compareSet", &NativeStore::CompareSet),
                           InstanceMethod("close", &NativeStore::Close),
                           InstanceAccessor("port", &NativeStore::Port, nullptr),
                       });
  }

  NativeStore(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeStore>(info) {
    Napi::Env env = info.Env();
    host_ = info[0].As<Napi::String>().Utf8Value();
    port_ = info[1].As<Napi::Number>().Int32Value();
    bool isServer = info[2].As<Napi::Boolean>().Value();
    timeoutMs_ = info[3].As<Napi::Number>().Int64Value();
    {
      std::lock_guard<std::mutex> lock(liveMu);
      liveStores.push_back(this);
    }
    if (isServer) {
      try {
        server_ = std::make_unique<StoreServer>(host_, port_);
        port_ = server_->port();
      } catch (const StoreError& e) {
        errorWithCode(env, e.code, e.what()).ThrowAsJavaScriptException();
      }
    }
  }

  ~NativeStore() override { forgetLive(liveStores, this); }

  std::string host() const { return host_; }
  int port() const { return port_; }
  void shutdown() {
    client_.reset();
    if (server_) server_->stop();
  }

 private:
  std::shared_ptr<StoreClient> client() {
    if (!client_) throw StoreError("STORE", "the store is not connected; call connect() first");
    return client_;
  }

  Napi::Value run(Napi::Env env, Task::Work work, Task::Done done) {
    auto* t = new Task(env, std::move(work), std::move(done));
    auto p = t->promise();
    t->Queue();
    return p;
  }
  static Napi::Value undef(Napi::Env env, const std::string&) { return env.Undefined(); }

  Napi::Value Connect(const Napi::CallbackInfo& info) {
    auto host = host_;
    auto port = port_;
    auto timeout = std::chrono::milliseconds(timeoutMs_);
    auto slot = std::make_shared<std::shared_ptr<StoreClient>>();
    return run(
        info.Env(),
        [host, port, timeout, slot] {
          *slot = std::make_shared<StoreClient>(host, port, timeout);
          return std::string();
        },
        [this, slot](Napi::Env env, const std::string&) {
          client_ = *slot;
          return env.Undefined();
        });
  }
  Napi::Value Set(const Napi::CallbackInfo& info) {
    auto key = info[0].As<Napi::String>().Utf8Value();
    auto value = bytesOf(info[1]);
    auto c = client_;
    return run(
        info.Env(),
        [c, key, value] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          c->set(key, value);
          return std::string();
        },
        undef);
  }
  Napi::Value Get(const Napi::CallbackInfo& info) {
    auto key = info[0].As<Napi::String>().Utf8Value();
    auto timeout = std::chrono::milliseconds(info[1].As<Napi::Number>().Int64Value());
    auto c = client_;
    return run(
        info.Env(),
        [c, key, timeout] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          return c->get(key, timeout);
        },
        [](Napi::Env env, const std::string& r) { return Napi::Buffer<char>::Copy(env, r.data(), r.size()); });
  }
  Napi::Value Add(const Napi::CallbackInfo& info) {
    auto key = info[0].As<Napi::String>().Utf8Value();
    auto delta = info[1].As<Napi::Number>().Int64Value();
    auto c = client_;
    return run(
        info.Env(),
        [c, key, delta] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          return std::to_string(c->add(key, delta));
        },
        [](Napi::Env env, const std::string& r) { return Napi::Number::New(env, std::stod(r)); });
  }
  Napi::Value Check(const Napi::CallbackInfo& info) {
    auto keys = stringArray(info[0]);
    auto c = client_;
    return run(
        info.Env(),
        [c, keys] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          return std::string(c->check(keys) ? "1" : "0");
        },
        [](Napi::Env env, const std::string& r) { return Napi::Boolean::New(env, r == "1"); });
  }
  Napi::Value Wait(const Napi::CallbackInfo& info) {
    auto keys = stringArray(info[0]);
    auto timeout = std::chrono::milliseconds(info[1].As<Napi::Number>().Int64Value());
    auto c = client_;
    return run(
        info.Env(),
        [c, keys, timeout] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          c->wait(keys, timeout);
          return std::string();
        },
        undef);
  }
  Napi::Value NumKeys(const Napi::CallbackInfo& info) {
    auto c = client_;
    return run(
        info.Env(),
        [c] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          return std::to_string(c->numKeys());
        },
        [](Napi::Env env, const std::string& r) { return Napi::Number::New(env, std::stod(r)); });
  }
  Napi::Value DeleteKey(const Napi::CallbackInfo& info) {
    auto key = info[0].As<Napi::String>().Utf8Value();
    auto c = client_;
    return run(
        info.Env(),
        [c, key] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          return std::string(c->deleteKey(key) ? "1" : "0");
        },
        [](Napi::Env env, const std::string& r) { return Napi::Boolean::New(env, r == "1"); });
  }
  Napi::Value CompareSet(const Napi::CallbackInfo& info) {
    auto key = info[0].As<Napi::String>().Utf8Value();
    auto expected = bytesOf(info[1]);
    auto desired = bytesOf(info[2]);
    auto c = client_;
    return run(
        info.Env(),
        [c, key, expected, desired] {
          if (!c) throw StoreError("STORE", "the store is not connected");
          return c->compareSet(key, expected, desired);
        },
        [](Napi::Env env, const std::string& r) { return Napi::Buffer<char>::Copy(env, r.data(), r.size()); });
  }
  Napi::Value Close(const Napi::CallbackInfo& info) {
    client_.reset();
    if (server_) server_->stop();
    return info.Env().Undefined();
  }
  Napi::Value Port(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), port_); }

  std::string host_;
  int port_ = 0;
  int64_t timeoutMs_ = 0;
  std::unique_ptr<StoreServer> server_;
  std::shared_ptr<StoreClient> client_;
};

// ---------------------------------------------------------------------------------------------

std::mutex devicesMu;
std::map<std::string, std::weak_ptr<gloo::transport::Device>> devices;

// `role` keeps the control connections on their own device (its own I/O thread), away from the
// data connections' large transfers.
std::shared_ptr<gloo::transport::Device> deviceFor(const std::string& hostname, const std::string& iface,
                                                   const std::string& role) {
  std::lock_guard<std::mutex> lock(devicesMu);
  std::string key = hostname + "|" + iface + "|" + role;
  if (auto d = devices[key].lock()) return d;
  gloo::transport::tcp::attr attr;
  if (!iface.empty()) {
    attr.iface = iface;
  } else {
    attr.hostname = hostname;
  }
  attr.ai_family = AF_INET;
  auto d = gloo::transport::tcp::CreateDevice(attr);
  devices[key] = d;
  return d;
}

using Tsfn = Napi::ThreadSafeFunction;

// Live groups, so that a process that exits without destroyProcessGroup() still stops their
// threads and closes their connections before the runtime is torn down.
std::vector<void*> liveGroups;  // NativeGroup*

class NativeGroup : public Napi::ObjectWrap<NativeGroup> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeGroup",
                       {
                           InstanceMethod("connect", &NativeGroup::Connect),
                           InstanceMethod("allReduce", &NativeGroup::AllReduce),
                           InstanceMethod("allGather", &NativeGroup::AllGather),
                           InstanceMethod("reduceScatter", &NativeGroup::ReduceScatter),
                           InstanceMethod("broadcast", &NativeGroup::Broadcast),
                           InstanceMethod("allToAll", &NativeGroup::AllToAll),
                           InstanceMethod("barrier", &NativeGroup::Barrier),
                           InstanceMethod("send", &NativeGroup::Send),
                           InstanceMethod("recv", &NativeGroup::Recv),
                           InstanceMethod("waitSync", &NativeGroup::WaitSync),
                           InstanceMethod("result", &NativeGroup::Result),
                           InstanceMethod("ref", &NativeGroup::Ref),
                           InstanceMethod("unref", &NativeGroup::Unref),
                           InstanceMethod("destroy", &NativeGroup::Destroy),
                       });
  }

  // (storeHost, storePort, prefix, name, rank, size, globalRanks, timeoutMs, checks, hostname, iface, onComplete)
  NativeGroup(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeGroup>(info) {
    Napi::Env env = info.Env();
    std::vector<int> globalRanks;
    auto arr = info[6].As<Napi::Array>();
    for (uint32_t i = 0; i < arr.Length(); i++) globalRanks.push_back(arr.Get(i).As<Napi::Number>().Int32Value());
    std::shared_ptr<gloo::transport::Device> device, ctlDevice;
    try {
      device = deviceFor(info[9].As<Napi::String>().Utf8Value(), info[10].As<Napi::String>().Utf8Value(), "data");
      ctlDevice = deviceFor(info[9].As<Napi::String>().Utf8Value(), info[10].As<Napi::String>().Utf8Value(), "ctl");
    } catch (const std::exception& e) {
      errorWithCode(env, "BACKEND", std::string("cannot open a Gloo TCP device: ") + e.what())
          .ThrowAsJavaScriptException();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(liveMu);
      liveGroups.push_back(this);
    }
    tsfn_ = Tsfn::New(env, info[11].As<Napi::Function>(), "megapatch-gloo-completion", 0, 1);
    tsfn_.Unref(env);
    Tsfn tsfn = tsfn_;
    group_ = std::make_unique<Group>(
        info[0].As<Napi::String>().Utf8Value(), info[1].As<Napi::Number>().Int32Value(),
        info[2].As<Napi::String>().Utf8Value(), info[3].As<Napi::String>().Utf8Value(),
        info[4].As<Napi::Number>().Int32Value(), info[5].As<Napi::Number>().Int32Value(), globalRanks,
        info[7].As<Napi::Number>().Int32Value(), info[8].As<Napi::Boolean>().Value(), device, ctlDevice, [tsfn](uint64_t id) mutable {
          auto* data = new uint64_t(id);
          napi_status s = tsfn.NonBlockingCall(data, [](Napi::Env env, Napi::Function fn, uint64_t* d) {
            uint64_t v = *d;
            delete d;
            if (env == nullptr || fn == nullptr) return;
            // raw call: during environment teardown JS can no longer run, and that is not an error
            napi_value arg, result, undefined;
            if (napi_create_double(env, static_cast<double>(v), &arg) != napi_ok) return;
            if (napi_get_undefined(env, &undefined) != napi_ok) return;
            if (napi_call_function(env, undefined, fn, 1, &arg, &result) != napi_ok) {
              bool pending = false;
              if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
                napi_value ex;
                napi_get_and_clear_last_exception(env, &ex);
              }
            }
          });
          if (s != napi_ok) delete data;
        });
  }

  ~NativeGroup() override {
    forgetLive(liveGroups, this);
    shutdown();
  }

  void shutdown() {
    if (group_) {
      group_->shutdown();
      group_.reset();
      tsfn_.Release();
    }
  }

  /** At process exit: a thread blocked in an operation is left behind rather than waited for. */
  void abandon() {
    if (group_) {
      group_->abandon();
      // the Group is leaked on purpose when a detached thread may still use it
      group_.release();
      tsfn_.Release();
    }
  }

 private:
  Group* group(Napi::Env env) {
    if (!group_) errorWithCode(env, "NOT_INITIALIZED", "the process group was destroyed").ThrowAsJavaScriptException();
    return group_.get();
  }
  static void* addr(const Napi::Value& v) {
    return reinterpret_cast<void*>(static_cast<uintptr_t>(v.As<Napi::Number>().Int64Value()));
  }
  static size_t num(const Napi::Value& v) { return static_cast<size_t>(v.As<Napi::Number>().Int64Value()); }
  static DType dt(const Napi::Value& v) { return static_cast<DType>(v.As<Napi::Number>().Int32Value()); }
  static Napi::Value id(Napi::Env env, uint64_t id) { return Napi::Number::New(env, static_cast<double>(id)); }

  Napi::Value Connect(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    return id(info.Env(), g->enqueue("rendezvous", [g](mp::Job& job) { g->connect(job); }));
  }
  // (address, count, dtype, op)
  Napi::Value AllReduce(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    void* p = addr(info[0]);
    size_t n = num(info[1]);
    DType d = dt(info[2]);
    auto op = static_cast<RedOp>(info[3].As<Napi::Number>().Int32Value());
    return id(info.Env(), g->enqueue("allReduce", [=](mp::Job& job) { g->allReduce(job, p, n, d, op); }));
  }
  // (inAddress, outAddresses[], countPerRank, dtype)
  Napi::Value AllGather(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    const void* in = addr(info[0]);
    std::vector<void*> outs;
    auto a = info[1].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) outs.push_back(addr(a.Get(i)));
    size_t n = num(info[2]);
    DType d = dt(info[3]);
    return id(info.Env(), g->enqueue("allGather", [=](mp::Job& job) { g->allGather(job, in, outs, n, d); }));
  }
  // (inAddresses[], outAddress, countPerRank, dtype, op)
  Napi::Value ReduceScatter(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    std::vector<const void*> ins;
    auto a = info[0].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) ins.push_back(addr(a.Get(i)));
    void* out = addr(info[1]);
    size_t n = num(info[2]);
    DType d = dt(info[3]);
    auto op = static_cast<RedOp>(info[4].As<Napi::Number>().Int32Value());
    return id(info.Env(),
              g->enqueue("reduceScatter", [=](mp::Job& job) { g->reduceScatter(job, ins, out, n, d, op); }));
  }
  // (address, count, dtype, root)
  Napi::Value Broadcast(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    void* p = addr(info[0]);
    size_t n = num(info[1]);
    DType d = dt(info[2]);
    int root = info[3].As<Napi::Number>().Int32Value();
    return id(info.Env(), g->enqueue("broadcast", [=](mp::Job& job) { g->broadcast(job, p, n, d, root); }));
  }
  // (inAddress, outAddress, inRows[], outRows[], rowElems, dtype)
  Napi::Value AllToAll(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    const void* in = addr(info[0]);
    void* out = addr(info[1]);
    std::vector<int64_t> ic, oc;
    auto a = info[2].As<Napi::Array>();
    auto b = info[3].As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) ic.push_back(a.Get(i).As<Napi::Number>().Int64Value());
    for (uint32_t i = 0; i < b.Length(); i++) oc.push_back(b.Get(i).As<Napi::Number>().Int64Value());
    size_t row = num(info[4]);
    DType d = dt(info[5]);
    return id(info.Env(), g->enqueue("allToAll", [=](mp::Job& job) { g->allToAll(job, in, out, ic, oc, row, d); }));
  }
  Napi::Value Barrier(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    return id(info.Env(), g->enqueue("barrier", [=](mp::Job& job) { g->barrier(job); }));
  }
  // (address, count, dtype, peer, tag)
  Napi::Value Send(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    return id(info.Env(), g->postSend(addr(info[0]), num(info[1]), dt(info[2]), info[3].As<Napi::Number>().Int32Value(),
                                      info[4].As<Napi::Number>().Int32Value()));
  }
  Napi::Value Recv(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    void* p = addr(info[0]);
    size_t n = num(info[1]);
    DType d = dt(info[2]);
    int src = info[3].As<Napi::Number>().Int32Value();
    int tag = info[4].As<Napi::Number>().Int32Value();
    return id(info.Env(), g->enqueueOn(1, "recv", [=](mp::Job& job) { g->recv(job, p, n, d, src, tag); }, {}));
  }

  static Napi::Value describe(Napi::Env env, const std::shared_ptr<mp::WorkState>& s) {
    auto o = Napi::Object::New(env);
    o.Set("done", Napi::Boolean::New(env, s->done));
    o.Set("code", Napi::String::New(env, s->code));
    o.Set("message", Napi::String::New(env, s->error));
    o.Set("ms", Napi::Number::New(env, s->ms));
    return o;
  }
  // Blocks the JS thread until the operation completes; returns its result object.
  Napi::Value WaitSync(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    auto s = g->state(static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value()));
    if (!s) return info.Env().Null();
    std::unique_lock<std::mutex> lock(s->mu);
    s->cv.wait(lock, [&] { return s->done; });
    return describe(info.Env(), s);
  }
  // The result of a finished operation, forgetting it; null when unknown.
  Napi::Value Result(const Napi::CallbackInfo& info) {
    Group* g = group(info.Env());
    if (!g) return info.Env().Undefined();
    auto wid = static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value());
    auto s = g->state(wid);
    if (!s) return info.Env().Null();
    std::lock_guard<std::mutex> lock(s->mu);
    auto r = describe(info.Env(), s);
    if (s->done) g->forget(wid);
    return r;
  }
  Napi::Value Ref(const Napi::CallbackInfo& info) {
    if (group_) tsfn_.Ref(info.Env());
    return info.Env().Undefined();
  }
  Napi::Value Unref(const Napi::CallbackInfo& info) {
    if (group_) tsfn_.Unref(info.Env());
    return info.Env().Undefined();
  }
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    shutdown();
    return info.Env().Undefined();
  }

  std::unique_ptr<Group> group_;
  Tsfn tsfn_;
};

// The address of this host on the interface that routes to `host` (no packet is sent).
Napi::Value LocalAddressToward(const Napi::CallbackInfo& info) {
  std::string host = info[0].As<Napi::String>().Utf8Value();
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), "9", &hints, &res) != 0 || !res) return info.Env().Null();
  int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  std::string out;
  if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
    sockaddr_in local{};
    socklen_t len = sizeof(local);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
      char buf[INET_ADDRSTRLEN];
      if (inet_ntop(AF_INET, &local.sin_addr, buf, sizeof(buf))) out = buf;
    }
  }
  if (fd >= 0) close(fd);
  freeaddrinfo(res);
  if (out.empty()) return info.Env().Null();
  return Napi::String::New(info.Env(), out);
}

void shutdownAll() {
  std::vector<void*> groups, stores;
  {
    std::lock_guard<std::mutex> lock(liveMu);
    groups.swap(liveGroups);
    stores.swap(liveStores);
  }
  for (void* g : groups) static_cast<NativeGroup*>(g)->abandon();
  for (void* s : stores) static_cast<NativeStore*>(s)->shutdown();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.AddCleanupHook(shutdownAll);
  exports.Set("NativeStore", NativeStore::Init(env));
  exports.Set("NativeGroup", NativeGroup::Init(env));
  exports.Set("localAddressToward", Napi::Function::New(env, LocalAddressToward));
  auto info = Napi::Object::New(env);
  info.Set("gloo", Napi::String::New(env, "gloo (Debian libgloo 0.5.0)"));
  info.Set("transport", Napi::String::New(env, "tcp"));
  exports.Set("buildInfo", info);
  return exports;
}

}  // namespace

NODE_API_MODULE(megapatch_parallel, Init)
