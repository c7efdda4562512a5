// The rendezvous store: a TCP key-value server hosted by rank 0 and a blocking client, speaking the
// wire protocol of torch 1.13's TCPStore (u8 query type, u64-length-prefixed strings, little-endian
// integers). Gloo's rendezvous uses it through GlooStore (group.h).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace mp {

/** A store failure; `code` is one of the DistributedError codes (STORE, TIMEOUT, PEER_LOST). */
struct StoreError : std::runtime_error {
  std::string code;
  StoreError(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

enum class Query : uint8_t {
  SET = 0,
  COMPARE_SET = 1,
  GET = 2,
  ADD = 3,
  CHECK = 4,
  WAIT = 5,
  GETNUMKEYS = 6,
  DELETE_KEY = 8,
};

/** The server: one thread polling every client socket. */
class StoreServer {
 public:
  /** Binds host:port (port 0 picks a free one) and starts serving; throws StoreError when it cannot bind. */
  StoreServer(const std::string& host, int port);
  ~StoreServer();
  int port() const { return port_; }
  void stop();

 private:
  struct Client {
    int fd;
    std::string in;
  };
  struct Waiter {
    int fd;
    std::vector<std::string> keys;
  };
  void loop();
  bool handle(Client& c);  // false: the client must be dropped
  void notifyWaiters();
  void reply(int fd, const void* data, size_t n);

  int listenFd_ = -1;
  int wakeFd_[2] = {-1, -1};
  int port_ = 0;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::map<std::string, std::string> data_;
  std::map<int, Client> clients_;
  std::vector<Waiter> waiters_;
};

/** A blocking client. Thread-safe: one request at a time on its connection. */
class StoreClient {
 public:
  /** Connects, retrying until `timeout`; throws StoreError('STORE' or 'TIMEOUT') naming host:port. */
  StoreClient(std::string host, int port, std::chrono::milliseconds timeout);
  ~StoreClient();

  void set(const std::string& key, const std::string& value);
  /** Waits until the key exists (up to `timeout`), then returns its value. */
  std::string get(const std::string& key, std::chrono::milliseconds timeout);
  int64_t add(const std::string& key, int64_t delta);
  bool check(const std::vector<std::string>& keys);
  /** Blocks until every key exists; throws StoreError('TIMEOUT') after `timeout`. */
  void wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout);
  int64_t numKeys();
  bool deleteKey(const std::string& key);
  std::string compareSet(const std::string& key, const std::string& expected, const std::string& desired);
  std::string where() const { return host_ + ":" + std::to_string(port_); }

 private:
  void ensureConnected();
  void sendAll(const std::string& buf);
  void readExact(void* dst, size_t n, std::chrono::milliseconds timeout);
  void dropConnection();

  std::string host_;
  int port_;
  std::chrono::milliseconds connectTimeout_;
  int fd_ = -1;
  std::mutex mu_;
};

}  // namespace mp
