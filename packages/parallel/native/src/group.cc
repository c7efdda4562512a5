#include "group.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoall.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/types.h>
#include <string.h>

#include <algorithm>
#include <chrono>
#include <cmath>

namespace mp {

using Clock = std::chrono::steady_clock;

size_t itemSize(DType d) {
  switch (d) {
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::BF16:
    case DType::F16:
      return 2;
    case DType::I64:
    case DType::F64:
      return 8;
    case DType::U8:
      return 1;
  }
  return 1;
}

const char* dtypeName(DType d) {
  switch (d) {
    case DType::F32:
      return "float32";
    case DType::BF16:
      return "bfloat16";
    case DType::F16:
      return "float16";
    case DType::I32:
      return "int32";
    case DType::I64:
      return "int64";
    case DType::F64:
      return "float64";
    case DType::U8:
      return "uint8";
  }
  return "?";
}

static const char* redName(int64_t op) {
  static const char* names[] = {"sum", "avg", "max", "min"};
  return op >= 0 && op < 4 ? names[op] : "?";
}

namespace {

struct JobError : std::runtime_error {
  std::string code;
  JobError(std::string c, const std::string& m) : std::runtime_error(m), code(std::move(c)) {}
};

// bf16 <-> f32 with round-to-nearest-even (NaN stays NaN).
inline float bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32ToBf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// fp16 <-> fp32, written here with memcpy: gloo's inline cpu_half2float type-puns through a
// pointer cast, which GCC's strict-aliasing optimisation may turn into a read of stale stack memory.
inline float f16ToF32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {
    // subnormal: normalise
    int e = -1;
    do {
      man <<= 1;
      e++;
    } while (!(man & 0x400u));
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t f32ToF16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t u = x & 0x7fffffffu;
  if (u > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // nan
  if (u >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (u < 0x33000001u) return static_cast<uint16_t>(sign);              // rounds to zero
  uint32_t exp = u >> 23;
  uint32_t man = u & 0x7fffffu;
  uint32_t shift;
  if (exp > 112) {
    shift = 13;
    exp -= 112;
  } else {
    shift = 126 - exp;  // subnormal result
    exp = 0;
    man |= 0x800000u;
  }
  uint32_t half = 1u << (shift - 1);
  uint32_t rest = man & ((1u << shift) - 1);
  man >>= shift;
  if (rest > half || (rest == half && (man & 1u))) {
    man++;
    if (man == 0x400u) {  // carried into the exponent
      man = 0;
      exp++;
    }
  }
  return static_cast<uint16_t>(sign | (exp << 10) | man);
}

void toF32(const void* src, float* dst, size_t n, DType dt) {
  auto s = static_cast<const uint16_t*>(src);
  if (dt == DType::BF16) {
    for (size_t i = 0; i < n; i++) dst[i] = bf16ToF32(s[i]);
  } else {
    for (size_t i = 0; i < n; i++) dst[i] = f16ToF32(s[i]);
  }
}
void fromF32(const float* src, void* dst, size_t n, DType dt) {
  auto d = static_cast<uint16_t*>(dst);
  if (dt == DType::BF16) {
    for (size_t i = 0; i < n; i++) d[i] = f32ToBf16(src[i]);
  } else {
    for (size_t i = 0; i < n; i++) d[i] = f32ToF16(src[i]);
  }
}

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

template <typename T>
ReduceFn reduceFn(RedOp op) {
  switch (op) {
    case RedOp::MAX:
      return static_cast<ReduceFn>(&gloo::max<T>);
    case RedOp::MIN:
      return static_cast<ReduceFn>(&gloo::min<T>);
    default:
      return static_cast<ReduceFn>(&gloo::sum<T>);
  }
}

// Elementwise acc = op(acc, x) for the local part of a reduce-scatter.
template <typename T>
void combine(T* acc, const T* x, size_t n, RedOp op) {
  switch (op) {
    case RedOp::MAX:
      for (size_t i = 0; i < n; i++) acc[i] = x[i] > acc[i] || std::isnan(static_cast<double>(x[i])) ? x[i] : acc[i];
      break;
    case RedOp::MIN:
      for (size_t i = 0; i < n; i++) acc[i] = x[i] < acc[i] || std::isnan(static_cast<double>(x[i])) ? x[i] : acc[i];
      break;
    default:
      for (size_t i = 0; i < n; i++) acc[i] += x[i];
  }
}

template <typename T>
void divide(T* p, size_t n, int by) {
  for (size_t i = 0; i < n; i++) p[i] = static_cast<T>(p[i] / static_cast<T>(by));
}

std::string joinRanks(const std::vector<int>& r) {
  std::string s;
  for (size_t i = 0; i < r.size(); i++) s += (i ? "," : "") + std::to_string(r[i]);
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// GlooStore

void GlooStore::set(const std::string& key, const std::vector<char>& data) {
  client_->set(prefix_ + "/" + key, std::string(data.begin(), data.end()));
}

std::vector<char> GlooStore::get(const std::string& key) {
  std::string v = client_->get(prefix_ + "/" + key, timeout_);
  return std::vector<char>(v.begin(), v.end());
}

void GlooStore::wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) {
  std::vector<std::string> full;
  for (auto& k : keys) full.push_back(prefix_ + "/" + k);
  client_->wait(full, timeout);
}

// ---------------------------------------------------------------------------------------------
// Group

Group::Group(std::string storeHost, int storePort, std::string prefix, std::string name, int rank, int size,
             std::vector<int> globalRanks, int timeoutMs, bool checks, std::shared_ptr<gloo::transport::Device> device,
             std::shared_ptr<gloo::transport::Device> ctlDevice, CompletionFn onComplete)
    : storeHost_(std::move(storeHost)),
      storePort_(storePort),
      prefix_(std::move(prefix)),
      name_(std::move(name)),
      rank_(rank),
      size_(size),
      globalRanks_(std::move(globalRanks)),
      timeout_(timeoutMs),
      checks_(checks),
      device_(std::move(device)),
      ctlDevice_(std::move(ctlDevice)),
      onComplete_(std::move(onComplete)) {
  thread_[0] = std::thread([this] { loop(0); });
  thread_[1] = std::thread([this] { loop(1); });
  thread_[2] = std::thread([this] { loop(2); });
  watchdog_ = std::thread([this] { watchdog(); });
}

void Group::watchdog() {
  std::unique_lock<std::mutex> lock(wdMu_);
  uint64_t seen = 0, published = 0;
  while (!wdStop_) {
    wdCv_.wait_for(lock, std::chrono::milliseconds(500));
    if (wdStop_) break;
    uint64_t running = runningSeq_;
    if (running != 0 && running == seen && running != published && store_) {
      std::string value = std::to_string(running) + " " + runningOp_;
      lock.unlock();
      try {
        store_->set(prefix_ + "/arrived/" + std::to_string(rank_), value);
      } catch (const std::exception&) {
        // diagnostics only
      }
      lock.lock();
      published = running;
    }
    seen = running;
  }
}

Group::~Group() { shutdown(); }

void Group::abandon() {
  bool busy[3];
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    abandoned_ = true;
    for (int i = 0; i < 3; i++) {
      busy[i] = running_[i];
      queue_[i].clear();
    }
  }
  cv_.notify_all();
  for (int i = 0; i < 3; i++) {
    if (!thread_[i].joinable()) continue;
    if (busy[i])
      thread_[i].detach();
    else
      thread_[i].join();
  }
  {
    std::lock_guard<std::mutex> lock(wdMu_);
    wdStop_ = true;
  }
  wdCv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
}

void Group::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : thread_)
    if (t.joinable()) t.join();
  {
    std::lock_guard<std::mutex> lock(wdMu_);
    wdStop_ = true;
  }
  wdCv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  ctx_.reset();
  ctl_.reset();
}

uint64_t Group::enqueueOn(int lane, std::string op, std::function<void(Job&)> run,
                          std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> buffers) {
  Job job;
  job.op = std::move(op);
  job.run = std::move(run);
  job.buffers = std::move(buffers);
  job.state = std::make_shared<WorkState>();
  std::lock_guard<std::mutex> lock(mu_);
  job.id = nextId_++;
  states_[job.id] = job.state;
  uint64_t id = job.id;
  if (stopping_) {
    job.state->done = true;
    job.state->code = "NOT_INITIALIZED";
    job.state->error = job.op + " on group '" + name_ + "': the group was destroyed";
    return id;  // no completion callback: the JS side checks state() right away
  }
  queue_[lane].push_back(std::move(job));
  cv_.notify_all();
  return id;
}

std::shared_ptr<WorkState> Group::state(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = states_.find(id);
  return it == states_.end() ? nullptr : it->second;
}

void Group::forget(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  states_.erase(id);
}

void Group::loop(int lane) {
  auto& queue = queue_[lane];
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue.empty(); });
      if (queue.empty()) return;  // stopping with nothing left
      job = std::move(queue.front());
      queue.pop_front();
      running_[lane] = true;
    }
    auto t0 = Clock::now();
    std::string code, error;
    std::string broken;
    {
      std::lock_guard<std::mutex> lock(mu_);
      broken = broken_;
    }
    if (!broken.empty()) {
      code = "BACKEND";
      error = describe(job) + ": the group is unusable after an earlier failure (" + broken +
              "); destroy it and create a new one";
    } else {
      try {
        job.run(job);
      } catch (const JobError& e) {
        code = e.code;
        error = e.what();
      } catch (const std::exception& e) {
        code = "BACKEND";
        error = describe(job) + ": " + e.what();
      }
      if (!code.empty() && code != "MISMATCH" && code != "INVALID_ARGUMENT") {
        std::lock_guard<std::mutex> lock(mu_);
        if (broken_.empty()) broken_ = error;
      }
    }
    if (lane == 0) {
      std::lock_guard<std::mutex> lock(wdMu_);
      runningSeq_ = 0;
    }
    double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    {
      std::lock_guard<std::mutex> lock(job.state->mu);
      job.state->code = code;
      job.state->error = error;
      job.state->ms = ms;
      job.state->done = true;
    }
    job.state->cv.notify_all();
    job.buffers.clear();
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_[lane] = false;
      // abandoned at exit: the completion callback may no longer be called
      if (stopping_ && abandoned_) return;
    }
    onComplete_(job.id);
  }
}

std::string Group::describe(const Job& job) const {
  int global = rank_ < static_cast<int>(globalRanks_.size()) ? globalRanks_[rank_] : rank_;
  return job.op + " on group '" + name_ + "' (rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
         ", global rank " + std::to_string(global) + ")";
}

void Group::fail(const Job& job, const std::string& code, const std::string& what) {
  throw JobError(code, describe(job) + ": " + what);
}

// One SET per collective (the store protocol does not answer it), so that a rank that times out
// can say which peers never reached this operation.
void Group::markArrived(Job& job) {
  std::lock_guard<std::mutex> lock(wdMu_);
  runningSeq_ = ++seq_;
  runningOp_ = job.op;
}

std::string Group::peersNotArrived(const Job& job) {
  std::string out;
  for (int p = 0; p < size_; p++) {
    if (p == rank_) continue;
    std::string key = prefix_ + "/arrived/" + std::to_string(p);
    std::string at = "none";
    uint64_t seq = 0;
    try {
      if (store_->check({key})) {
        at = store_->get(key, std::chrono::milliseconds(2000));
        seq = std::strtoull(at.c_str(), nullptr, 10);
      }
    } catch (const std::exception&) {
      return " (the rendezvous store is unreachable, so the missing peers are unknown)";
    }
    if (seq < seq_) {
      out += std::string(out.empty() ? "" : "; ") + "global rank " + std::to_string(globalRanks_[p]) +
             (at == "none" ? "" : " (last seen waiting in #" + at + ")");
    }
  }
  (void)job;
  return out.empty() ? "" : "; peers that did not arrive: " + out;
}

void Group::rethrowGloo(const Job& job, const std::exception& e) {
  std::string msg = e.what();
  // gloo's messages carry a source location prefix "[file:line] "; keep the text after it
  auto pos = msg.find("] ");
  if (msg.rfind("[", 0) == 0 && pos != std::string::npos) msg = msg.substr(pos + 2);
  if (msg.find("Timed out") != std::string::npos || msg.find("timed out") != std::string::npos) {
    fail(job, "TIMEOUT",
         "timed out after " + std::to_string(timeout_.count()) + " ms (op #" + std::to_string(seq_) + ")" +
             peersNotArrived(job));
  }
  if (msg.find("closed") != std::string::npos || msg.find("reset") != std::string::npos ||
      msg.find("Broken pipe") != std::string::npos || msg.find("Connection refused") != std::string::npos) {
    fail(job, "PEER_LOST", "a peer process died or closed its connection (" + msg + ")");
  }
  fail(job, "BACKEND", msg);
}

#define MP_GLOO_CALL(job, expr)                 \
  try {                                         \
    expr;                                       \
  } catch (const JobError&) {                   \
    throw;                                      \
  } catch (const gloo::Exception& e) {          \
    rethrowGloo(job, e);                        \
  } catch (const gloo::EnforceNotMet& e) {      \
    rethrowGloo(job, e);                        \
  } catch (const StoreError& e) {               \
    fail(job, e.code, e.what());                \
  }

void Group::connect(Job& job) {
  try {
    store_ = std::make_shared<StoreClient>(storeHost_, storePort_, timeout_);
    ctx_ = std::make_shared<gloo::rendezvous::Context>(rank_, size_);
    ctx_->setTimeout(timeout_);
    ctl_ = std::make_shared<gloo::rendezvous::Context>(rank_, size_);
    ctl_->setTimeout(timeout_);
    GlooStore store(store_, prefix_, timeout_);
    ctx_->connectFullMesh(store, device_);
    GlooStore ctlStore(store_, prefix_ + "/ctl", timeout_);
    ctl_->connectFullMesh(ctlStore, ctlDevice_);
  } catch (const StoreError& e) {
    std::string missing;
    for (int p = 0; p < size_ && store_; p++) {
      try {
        if (!store_->check({prefix_ + "/rank_" + std::to_string(p)})) {
          missing += (missing.empty() ? "" : ",") + std::to_string(globalRanks_[p]);
        }
      } catch (const std::exception&) {
        break;
      }
    }
    fail(job, e.code,
         std::string("rendezvous failed: ") + e.what() +
             (missing.empty() ? "" : "; global ranks that never joined: " + missing));
  } catch (const std::exception& e) {
    rethrowGloo(job, e);
  }
}

// The check record every collective exchanges first, with one all-reduce: the maximum of each
// metadata word and of its negation (so every rank learns whether all ranks agree), and, for
// small all-reduces, the payload itself, reduced in fp32 for 16-bit floats. Its size is fixed, so
// ranks that called different operations still exchange the same number of bytes.
namespace {
struct CheckHead {
  int64_t hi[4];
  int64_t negLo[4];
};
constexpr size_t kHead = sizeof(CheckHead);
// The record as one gloo element, so that no algorithm ever cuts it.
struct CheckRecord {
  uint8_t bytes[kHead + Group::kRecordPayload];
};

template <typename T>
void foldPayload(T* acc, const T* x, size_t n, RedOp op) {
  combine(acc, x, n, op);
}
}  // namespace

void Group::checkAgreement(Job& job, int64_t opCode, DType dt, int64_t count, int64_t extra, const char* extraName,
                           void* payload, size_t payloadCount, RedOp payloadOp) {
  markArrived(job);
  if (!checks_ || size_ == 1) return;
  const size_t rec = kHead + kRecordPayload;
  std::vector<uint8_t> buf(rec, 0);
  int64_t meta[4] = {opCode, static_cast<int64_t>(dt), count, extra};
  auto* head = reinterpret_cast<CheckHead*>(buf.data());
  for (int k = 0; k < 4; k++) {
    head->hi[k] = meta[k];
    head->negLo[k] = -meta[k];
  }
  // the payload kind: 16-bit floats travel as fp32
  DType wire = (dt == DType::BF16 || dt == DType::F16) ? DType::F32 : dt;
  if (payload) {
    if (wire != dt)
      toF32(payload, reinterpret_cast<float*>(buf.data() + kHead), payloadCount, dt);
    else
      memcpy(buf.data() + kHead, payload, payloadCount * itemSize(dt));
  }
  size_t n = payload ? payloadCount : 0;
  auto fn = [n, wire, payloadOp](void* out, const void* a, const void* b, size_t records) {
    for (size_t r = 0; r < records; r++) {
      auto* o = static_cast<uint8_t*>(out) + r * sizeof(CheckRecord);
      auto* x = static_cast<const uint8_t*>(a) + r * sizeof(CheckRecord);
      auto* y = static_cast<const uint8_t*>(b) + r * sizeof(CheckRecord);
      if (o == y) std::swap(x, y);  // every reduction here is commutative
      auto* oh = reinterpret_cast<CheckHead*>(o);
      auto* xh = reinterpret_cast<const CheckHead*>(x);
      auto* yh = reinterpret_cast<const CheckHead*>(y);
      for (int k = 0; k < 4; k++) {
        oh->hi[k] = std::max(xh->hi[k], yh->hi[k]);
        oh->negLo[k] = std::max(xh->negLo[k], yh->negLo[k]);
      }
      if (n == 0) continue;
      if (o != x) memcpy(o + kHead, x + kHead, Group::kRecordPayload);
      switch (wire) {
        case DType::F32:
          foldPayload(reinterpret_cast<float*>(o + kHead), reinterpret_cast<const float*>(y + kHead), n, payloadOp);
          break;
        case DType::F64:
          foldPayload(reinterpret_cast<double*>(o + kHead), reinterpret_cast<const double*>(y + kHead), n, payloadOp);
          break;
        case DType::I32:
          foldPayload(reinterpret_cast<int32_t*>(o + kHead), reinterpret_cast<const int32_t*>(y + kHead), n,
                      payloadOp);
          break;
        case DType::I64:
          foldPayload(reinterpret_cast<int64_t*>(o + kHead), reinterpret_cast<const int64_t*>(y + kHead), n,
                      payloadOp);
          break;
        default:
          break;
      }
    }
  };
  gloo::AllreduceOptions o(ctl_);
  o.setOutput<CheckRecord>(reinterpret_cast<CheckRecord*>(buf.data()), 1);
  o.setReduceFunction(fn);
  o.setTag(nextTag());
  o.setTimeout(timeout_);
  MP_GLOO_CALL(job, gloo::allreduce(o));
  bool same = true;
  for (int k = 0; k < 4; k++)
    if (head->hi[k] != -head->negLo[k]) same = false;
  if (same) {
    if (payload) {
      if (payloadOp == RedOp::AVG) {
        if (wire == DType::F32) divide(reinterpret_cast<float*>(buf.data() + kHead), n, size_);
        if (wire == DType::F64) divide(reinterpret_cast<double*>(buf.data() + kHead), n, size_);
      }
      if (wire != dt)
        fromF32(reinterpret_cast<float*>(buf.data() + kHead), payload, n, dt);
      else
        memcpy(payload, buf.data() + kHead, n * itemSize(dt));
    }
    return;
  }
  // The ranks disagree (every rank knows it now): gather each rank's call for the message.
  std::vector<int64_t> all(4 * size_);
  gloo::AllgatherOptions g(ctl_);
  g.setInput<int64_t>(meta, 4);
  g.setOutput<int64_t>(all.data(), all.size());
  g.setTag(nextTag());
  g.setTimeout(timeout_);
  MP_GLOO_CALL(job, gloo::allgather(g));
  static const char* ops[] = {"allReduce", "allGather", "reduceScatter", "broadcast",
                              "allToAll",  "barrier",   "?",             "?"};
  std::string detail;
  for (int r = 0; r < size_; r++) {
    const int64_t* m = &all[r * 4];
    detail += std::string(r ? "; " : "") + "global rank " + std::to_string(globalRanks_[r]) + ": " +
              (m[0] >= 0 && m[0] < 8 ? ops[m[0]] : "?") + " of " + std::to_string(m[2]) + " x " +
              dtypeName(static_cast<DType>(m[1]));
    if (extraName) {
      detail += std::string(", ") + extraName + " " +
                (strcmp(extraName, "op") == 0 ? std::string(redName(m[3])) : std::to_string(m[3]));
    }
  }
  fail(job, "MISMATCH", "ranks called it with different arguments: " + detail);
}

void Group::allReduce(Job& job, void* ptr, size_t count, DType dt, RedOp op) {
  size_t wireBytes = count * ((dt == DType::BF16 || dt == DType::F16) ? 4 : itemSize(dt));
  if (checks_ && size_ > 1 && wireBytes <= kRecordPayload && dt != DType::U8) {
    // small: the values travel in the check record, so the whole all-reduce is one round
    checkAgreement(job, 0, dt, static_cast<int64_t>(count), static_cast<int64_t>(op), "op", ptr, count, op);
    return;
  }
  checkAgreement(job, 0, dt, static_cast<int64_t>(count), static_cast<int64_t>(op), "op");
  if (size_ == 1 || count == 0) return;
  auto run = [&](auto* typed, ReduceFn fn) {
    using T = std::remove_pointer_t<decltype(typed)>;
    gloo::AllreduceOptions o(ctx_);
    o.setOutput<T>(typed, count);
    o.setReduceFunction(fn);
    o.setTag(nextTag());
    o.setTimeout(timeout_);
    MP_GLOO_CALL(job, gloo::allreduce(o));
  };
  switch (dt) {
    case DType::F32:
      run(static_cast<float*>(ptr), reduceFn<float>(op));
      if (op == RedOp::AVG) divide(static_cast<float*>(ptr), count, size_);
      break;
    case DType::F64:
      run(static_cast<double*>(ptr), reduceFn<double>(op));
      if (op == RedOp::AVG) divide(static_cast<double*>(ptr), count, size_);
      break;
    case DType::I32:
      run(static_cast<int32_t*>(ptr), reduceFn<int32_t>(op));
      break;
    case DType::I64:
      run(static_cast<int64_t*>(ptr), reduceFn<int64_t>(op));
      break;
    case DType::BF16:
    case DType::F16: {
      // 16-bit floats are reduced in fp32: one rounding at the end, the same on every rank
      std::vector<float> tmp(count);
      toF32(ptr, tmp.data(), count, dt);
      run(tmp.data(), reduceFn<float>(op));
      if (op == RedOp::AVG) divide(tmp.data(), count, size_);
      fromF32(tmp.data(), ptr, count, dt);
      break;
    }
    case DType::U8:
      fail(job, "INVALID_ARGUMENT", "uint8 tensors cannot be reduced");
  }
}

void Group::allGather(Job& job, const void* in, std::vector<void*> outs, size_t count, DType dt) {
  checkAgreement(job, 1, dt, static_cast<int64_t>(count), 0, nullptr);
  size_t bytes = count * itemSize(dt);
  if (bytes == 0) return;
  bool flat = outs.size() == 1 && size_ > 1;
  std::vector<uint8_t> scratch;
  uint8_t* out;
  if (flat) {
    out = static_cast<uint8_t*>(outs[0]);
  } else {
    scratch.resize(bytes * size_);
    out = scratch.data();
  }
  if (size_ == 1) {
    memmove(outs[0], in, bytes);
    return;
  }
  gloo::AllgatherOptions o(ctx_);
  if (in != out + bytes * rank_) o.setInput<uint8_t>(const_cast<uint8_t*>(static_cast<const uint8_t*>(in)), bytes);
  o.setOutput<uint8_t>(out, bytes * size_);
  o.setTag(nextTag());
  o.setTimeout(timeout_);
  MP_GLOO_CALL(job, gloo::allgather(o));
  if (!flat)
    for (int r = 0; r < size_; r++) memcpy(outs[r], out + bytes * r, bytes);
}

void Group::reduceScatter(Job& job, std::vector<const void*> ins, void* out, size_t count, DType dt, RedOp op) {
  checkAgreement(job, 2, dt, static_cast<int64_t>(count), static_cast<int64_t>(op), "op");
  if (count == 0) return;
  if (dt == DType::U8) fail(job, "INVALID_ARGUMENT", "uint8 tensors cannot be reduced");
  // reduce-scatter = all-to-all of the chunks, then a local reduction (gloo 0.5 has no new-style
  // reduce-scatter, and its old halving-doubling one slows the context down: distributed.md §1.6)
  bool wide = dt == DType::BF16 || dt == DType::F16;
  size_t isz = wide ? 4 : itemSize(dt);
  size_t chunk = count * isz;
  std::vector<uint8_t> send, recv(chunk * size_);
  const uint8_t* src;
  bool flat = ins.size() == 1 && size_ > 1;
  if (!wide && flat) {
    src = static_cast<const uint8_t*>(ins[0]);
  } else {
    send.resize(chunk * size_);
    for (int r = 0; r < size_; r++) {
      const void* part = flat ? static_cast<const uint8_t*>(ins[0]) + count * itemSize(dt) * r : ins[r];
      if (wide)
        toF32(part, reinterpret_cast<float*>(send.data() + chunk * r), count, dt);
      else
        memcpy(send.data() + chunk * r, part, chunk);
    }
    src = send.data();
  }
  if (size_ == 1) {
    memcpy(recv.data(), src, chunk);
  } else {
    gloo::AlltoallOptions o(ctx_);
    o.setInput<uint8_t>(const_cast<uint8_t*>(src), chunk * size_);
    o.setOutput<uint8_t>(recv.data(), chunk * size_);
    o.setTag(nextTag());
    o.setTimeout(timeout_);
    MP_GLOO_CALL(job, gloo::alltoall(o));
  }
  auto reduce = [&](auto* acc) {
    using T = std::remove_pointer_t<decltype(acc)>;
    for (int r = 1; r < size_; r++) combine(acc, reinterpret_cast<const T*>(recv.data() + chunk * r), count, op);
    if (op == RedOp::AVG) divide(acc, count, size_);
  };
  switch (dt) {
    case DType::F32:
      reduce(reinterpret_cast<float*>(recv.data()));
      break;
    case DType::F64:
      reduce(reinterpret_cast<double*>(recv.data()));
      break;
    case DType::I32:
      reduce(reinterpret_cast<int32_t*>(recv.data()));
      break;
    case DType::I64:
      reduce(reinterpret_cast<int64_t*>(recv.data()));
      break;
    default:
      reduce(reinterpret_cast<float*>(recv.data()));
  }
  if (wide)
    fromF32(reinterpret_cast<float*>(recv.data()), out, count, dt);
  else
    memcpy(out, recv.data(), chunk);
}

void Group::broadcast(Job& job, void* ptr, size_t count, DType dt, int root) {
  checkAgreement(job, 3, dt, static_cast<int64_t>(count), root, "root");
  if (size_ == 1 || count == 0) return;
  gloo::BroadcastOptions o(ctx_);
  o.setOutput<uint8_t>(static_cast<uint8_t*>(ptr), count * itemSize(dt));
  o.setRoot(root);
  o.setTag(nextTag());
  o.setTimeout(timeout_);
  MP_GLOO_CALL(job, gloo::broadcast(o));
}

void Group::allToAll(Job& job, const void* in, void* out, std::vector<int64_t> inCounts, std::vector<int64_t> outCounts,
                     size_t rowElems, DType dt) {
  checkAgreement(job, 4, dt, static_cast<int64_t>(rowElems), 0, nullptr);
  if (checks_ && size_ > 1) {
    // every rank's send and receive counts, so that all ranks see the same disagreement and fail together
    std::vector<int64_t> mine(inCounts);
    mine.insert(mine.end(), outCounts.begin(), outCounts.end());
    std::vector<int64_t> all(static_cast<size_t>(size_) * 2 * size_);
    gloo::AllgatherOptions o(ctl_);
    o.setInput<int64_t>(mine.data(), mine.size());
    o.setOutput<int64_t>(all.data(), all.size());
    o.setTag(nextTag());
    o.setTimeout(timeout_);
    MP_GLOO_CALL(job, gloo::allgather(o));
    auto sends = [&](int src, int dst) { return all[static_cast<size_t>(src) * 2 * size_ + dst]; };
    auto expects = [&](int dst, int src) { return all[static_cast<size_t>(dst) * 2 * size_ + size_ + src]; };
    for (int src = 0; src < size_; src++) {
      for (int dst = 0; dst < size_; dst++) {
        if (sends(src, dst) != expects(dst, src)) {
          fail(job, "MISMATCH",
               "global rank " + std::to_string(globalRanks_[src]) + " sends " + std::to_string(sends(src, dst)) +
                   " rows to global rank " + std::to_string(globalRanks_[dst]) + ", whose outputSplitSizes[" +
                   std::to_string(src) + "] is " + std::to_string(expects(dst, src)));
        }
      }
    }
  }
  size_t rowBytes = rowElems * itemSize(dt);
  if (size_ == 1) {
    memmove(out, in, static_cast<size_t>(inCounts[0]) * rowBytes);
    return;
  }
  std::vector<int64_t> inB(size_), outB(size_);
  for (int r = 0; r < size_; r++) {
    inB[r] = inCounts[r] * static_cast<int64_t>(rowBytes);
    outB[r] = outCounts[r] * static_cast<int64_t>(rowBytes);
  }
  gloo::AlltoallvOptions o(ctx_);
  o.setInput<uint8_t>(const_cast<uint8_t*>(static_cast<const uint8_t*>(in)), inB);
  o.setOutput<uint8_t>(static_cast<uint8_t*>(out), outB);
  o.setTag(nextTag());
  o.setTimeout(timeout_);
  MP_GLOO_CALL(job, gloo::alltoallv(o));
}

void Group::barrier(Job& job) {
  checkAgreement(job, 5, DType::U8, 0, 0, nullptr);
  if (size_ == 1) return;
  gloo::BarrierOptions o(ctl_);
  o.setTag(nextTag());
  o.setTimeout(timeout_);
  MP_GLOO_CALL(job, gloo::barrier(o));
}

// Point-to-point: a 16-byte header (bytes, dtype) on slot 2·tag+1, then the data on slot 2·tag,
// so that a receiver checks the size before any byte lands in its buffer.
uint64_t Group::postSend(const void* ptr, size_t count, DType dt, int dst, int tag) {
  std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> buffers;
  auto header = std::make_shared<std::vector<int64_t>>(
      std::vector<int64_t>{static_cast<int64_t>(count), static_cast<int64_t>(dt)});
  std::string posted;
  bool usable;
  {
    std::lock_guard<std::mutex> lock(mu_);
    usable = broken_.empty();
  }
  if (usable && ctx_) {
    try {
      buffers.push_back(ctl_->createUnboundBuffer(header->data(), 16));
      buffers[0]->send(dst, 2 * static_cast<uint64_t>(tag) + 1);
      if (count) {
        buffers.push_back(ctx_->createUnboundBuffer(const_cast<void*>(ptr), count * itemSize(dt)));
        buffers[1]->send(dst, 2 * static_cast<uint64_t>(tag));
      }
    } catch (const std::exception& e) {
      posted = e.what();
    }
  }
  return enqueueOn(
      2, "send", [this, header, count, posted](Job& job) {
        if (!posted.empty()) fail(job, "BACKEND", posted);
        if (job.buffers.empty()) fail(job, "NOT_INITIALIZED", "the group is not connected");
        MP_GLOO_CALL(job, {
          for (auto& b : job.buffers) b->waitSend(timeout_);
        });
        (void)count;
      },
      std::move(buffers));
}

void Group::recv(Job& job, void* ptr, size_t count, DType dt, int src, int tag) {
  int64_t header[2] = {0, 0};
  auto hb = ctl_->createUnboundBuffer(header, 16);
  MP_GLOO_CALL(job, {
    hb->recv(src, 2 * static_cast<uint64_t>(tag) + 1);
    hb->waitRecv(timeout_);
  });
  if (header[0] != static_cast<int64_t>(count) || header[1] != static_cast<int64_t>(dt)) {
    fail(job, "MISMATCH",
         "global rank " + std::to_string(globalRanks_[src]) + " sent " + std::to_string(header[0]) + " x " +
             dtypeName(static_cast<DType>(header[1])) + " but this rank expects " + std::to_string(count) + " x " +
             dtypeName(dt));
  }
  if (!count) return;
  auto db = ctx_->createUnboundBuffer(ptr, count * itemSize(dt));
  MP_GLOO_CALL(job, {
    db->recv(src, 2 * static_cast<uint64_t>(tag));
    db->waitRecv(timeout_);
  });
}

}  // namespace mp
