// A Gloo process group: one rendezvous context and one communication thread that runs the group's
// operations in issue order, as PyTorch's ProcessGroupGloo does with its worker threads.
#pragma once

#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/device.h>
#include <gloo/transport/unbound_buffer.h>

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "store.h"

namespace mp {

/** Element types, numbered as the JS side sends them. */
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, I32 = 3, I64 = 4, F64 = 5, U8 = 6 };
enum class RedOp : int { SUM = 0, AVG = 1, MAX = 2, MIN = 3 };

size_t itemSize(DType d);
const char* dtypeName(DType d);

/** Gloo's Store interface over our TCP store client, under a key prefix. */
class GlooStore : public gloo::rendezvous::Store {
 public:
  GlooStore(std::shared_ptr<StoreClient> client, std::string prefix, std::chrono::milliseconds timeout)
      : client_(std::move(client)), prefix_(std::move(prefix)), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override;

 private:
  std::shared_ptr<StoreClient> client_;
  std::string prefix_;
  std::chrono::milliseconds timeout_;
};

/** One operation's completion, shared by the communication thread and the JS side. */
struct WorkState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  std::string code;   // empty on success, else a DistributedError code
  std::string error;  // the one-line message
  double ms = 0;      // time the operation ran on the communication thread
};

/** An operation: what to run, and what it touches (for messages). */
struct Job {
  uint64_t id = 0;
  std::string op;
  std::function<void(Job&)> run;
  std::shared_ptr<WorkState> state;
  // p2p buffers that must outlive the operation
  std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> buffers;
};

using CompletionFn = std::function<void(uint64_t id)>;

class Group {
 public:
  /** Bytes of payload in the check record: all-reduces up to this size travel inside it. */
  static constexpr size_t kRecordPayload = 4096;
  Group(std::string storeHost, int storePort, std::string prefix, std::string name, int rank, int size,
        std::vector<int> globalRanks, int timeoutMs, bool checks, std::shared_ptr<gloo::transport::Device> device,
        std::shared_ptr<gloo::transport::Device> ctlDevice, CompletionFn onComplete);
  ~Group();

  /** Queues an operation; returns its id. Completion calls onComplete(id) from the comm thread. */
  uint64_t enqueue(std::string op, std::function<void(Job&)> run) { return enqueueOn(0, std::move(op), std::move(run), {}); }
  /**
   * Lane 0 runs collectives, lane 1 receives, lane 2 waits for posted sends, each in issue order:
   * as in PyTorch's Gloo group, a pending recv never holds up a collective issued after it, and a
   * send waiting for its receiver never holds up a recv (so exchanges in a ring cannot deadlock).
   */
  uint64_t enqueueOn(int lane, std::string op, std::function<void(Job&)> run,
                     std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> buffers);
  /** Posts a send right away (so that exchanges in both directions cannot deadlock) and queues its wait. */
  uint64_t postSend(const void* ptr, size_t count, DType dt, int dst, int tag);
  std::shared_ptr<WorkState> state(uint64_t id);
  void forget(uint64_t id);
  void shutdown();
  /**
   * At process exit: stops the idle threads, and detaches those still blocked in an operation
   * (a peer that never comes would otherwise hold the exit until the timeout).
   */
  void abandon();

  // Operation bodies (run on the communication thread).
  void connect(Job& job);
  void allReduce(Job& job, void* ptr, size_t count, DType dt, RedOp op);
  void allGather(Job& job, const void* in, std::vector<void*> outs, size_t count, DType dt);
  void reduceScatter(Job& job, std::vector<const void*> ins, void* out, size_t count, DType dt, RedOp op);
  void broadcast(Job& job, void* ptr, size_t count, DType dt, int root);
  void allToAll(Job& job, const void* in, void* out, std::vector<int64_t> inCounts, std::vector<int64_t> outCounts,
                size_t rowElems, DType dt);
  void barrier(Job& job);
  void recv(Job& job, void* ptr, size_t count, DType dt, int src, int tag);

  const std::string& name() const { return name_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

 private:
  void loop(int lane);
  uint32_t nextTag() { return tagCounter_++; }
  /** Every rank exchanges (op, dtype, count, extra) and fails with a message naming the ranks that differ. */
  void checkAgreement(Job& job, int64_t opCode, DType dt, int64_t count, int64_t extra, const char* extraName,
                      void* payload = nullptr, size_t payloadCount = 0, RedOp payloadOp = RedOp::SUM);
  void watchdog();
  void markArrived(Job& job);
  std::string describe(const Job& job) const;
  std::string peersNotArrived(const Job& job);
  [[noreturn]] void fail(const Job& job, const std::string& code, const std::string& what);
  void rethrowGloo(const Job& job, const std::exception& e);

  std::string storeHost_;
  int storePort_;
  std::shared_ptr<StoreClient> store_;  // this group's own connection, made by connect()
  std::string prefix_;
  std::string name_;
  int rank_;
  int size_;
  std::vector<int> globalRanks_;
  std::chrono::milliseconds timeout_;
  bool checks_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::transport::Device> ctlDevice_;
  // Two contexts (two sets of connections): ctx_ carries the data of collectives and p2p; ctl_
  // the small messages (agreement checks, small all-reduces, barriers, p2p headers). Gloo sizes a
  // socket's send buffer to the last message sent on it, so small messages on the data
  // connections would slow the large transfers after them (reference/distributed.md §1.6).
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  std::shared_ptr<gloo::rendezvous::Context> ctl_;
  CompletionFn onComplete_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_[3];
  std::map<uint64_t, std::shared_ptr<WorkState>> states_;
  bool stopping_ = false;
  bool running_[3] = {false, false, false};
  bool abandoned_ = false;
  std::string broken_;  // set after a failure: the context cannot be reused
  uint64_t nextId_ = 1;
  uint64_t seq_ = 0;    // collectives run on this rank (for "did not arrive" messages)
  // The watchdog publishes the collective this rank is stuck in (running for over half a second)
  // to the store, so that a peer that times out can name the ranks that never arrived, without a
  // store message per collective.
  std::mutex wdMu_;
  std::condition_variable wdCv_;
  uint64_t runningSeq_ = 0;
  std::string runningOp_;
  bool wdStop_ = false;
  std::thread watchdog_;
  uint32_t tagCounter_ = 1;
  std::thread thread_[3];
};

}  // namespace mp
