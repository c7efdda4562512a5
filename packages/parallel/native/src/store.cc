#include "store.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace mp {

namespace {

using Clock = std::chrono::steady_clock;

void putU64(std::string& b, uint64_t v) { b.append(reinterpret_cast<const char*>(&v), 8); }
void putStr(std::string& b, const std::string& s) {
  putU64(b, s.size());
  b.append(s);
}

// Reads a u64-prefixed string at `pos` of `in`; false when the bytes are not all there yet.
bool takeStr(const std::string& in, size_t& pos, std::string& out) {
  if (in.size() < pos + 8) return false;
  uint64_t n;
  memcpy(&n, in.data() + pos, 8);
  if (in.size() < pos + 8 + n) return false;
  out.assign(in.data() + pos + 8, n);
  pos += 8 + n;
  return true;
}
bool takeU64(const std::string& in, size_t& pos, uint64_t& out) {
  if (in.size() < pos + 8) return false;
  memcpy(&out, in.data() + pos, 8);
  pos += 8;
  return true;
}

std::string errnoText(int e) { return std::string(strerror(e)); }

// "2 s", "2.5 s"
std::string seconds(std::chrono::milliseconds ms) {
  char buf[32];
  snprintf(buf, sizeof(buf), "%g s", static_cast<double>(ms.count()) / 1000.0);
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Server

StoreServer::StoreServer(const std::string& host, int port) {
  listenFd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listenFd_ < 0) throw StoreError("STORE", "cannot create the store socket: " + errnoText(errno));
  int one = 1;
  setsockopt(listenFd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  // Every interface, so that other nodes reach it whatever MASTER_ADDR names; `host` is only for messages.
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  if (bind(listenFd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    close(listenFd_);
    if (e == EADDRINUSE) {
      throw StoreError("STORE", "MASTER_PORT " + std::to_string(port) + " on " + host +
                                    " is already in use (another job or a leftover process?); choose a free port "
                                    "with --master-port or MASTER_PORT");
    }
    throw StoreError("STORE", "cannot bind the rendezvous store to port " + std::to_string(port) + ": " + errnoText(e));
  }
  if (listen(listenFd_, 1024) != 0) {
    int e = errno;
    close(listenFd_);
    throw StoreError("STORE", "cannot listen on port " + std::to_string(port) + ": " + errnoText(e));
  }
  socklen_t len = sizeof(addr);
  getsockname(listenFd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  if (pipe2(wakeFd_, O_CLOEXEC) != 0) {
    close(listenFd_);
    throw StoreError("STORE", "cannot create the store's wake-up pipe: " + errnoText(errno));
  }
  thread_ = std::thread([this] { loop(); });
}

StoreServer::~StoreServer() { stop(); }

void StoreServer::stop() {
  if (stopping_.exchange(true)) return;
  char c = 0;
  if (write(wakeFd_[1], &c, 1) < 0) {
    // the loop also stops on its next poll timeout
  }
  if (thread_.joinable()) thread_.join();
  for (auto& kv : clients_) close(kv.first);
  clients_.clear();
  close(listenFd_);
  close(wakeFd_[0]);
  close(wakeFd_[1]);
}

void StoreServer::reply(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) {
        pollfd pfd{fd, POLLOUT, 0};
        poll(&pfd, 1, 1000);
        continue;
      }
      return;  // the client is gone; its socket is dropped on the next read
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void StoreServer::notifyWaiters() {
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    auto& keys = it->keys;
    keys.erase(std::remove_if(keys.begin(), keys.end(), [&](const std::string& k) { return data_.count(k) > 0; }),
               keys.end());
    if (keys.empty()) {
      uint8_t done = 0;
      reply(it->fd, &done, 1);
      it = waiters_.erase(it);
    } else {
      ++it;
    }
  }
}

// Parses and serves every complete request in the client's buffer.
bool StoreServer::handle(Client& c) {
  for (;;) {
    const std::string& in = c.in;
    if (in.empty()) return true;
    size_t pos = 1;
    auto q = static_cast<Query>(static_cast<uint8_t>(in[0]));
    std::string key, a, b;
    uint64_t n = 0;
    switch (q) {
      case Query::SET:
        if (!takeStr(in, pos, key) || !takeStr(in, pos, a)) return true;
        data_[key] = a;
        notifyWaiters();
        break;
      case Query::COMPARE_SET: {
        if (!takeStr(in, pos, key) || !takeStr(in, pos, a) || !takeStr(in, pos, b)) return true;
        auto it = data_.find(key);
        std::string out;
        if (it == data_.end()) {
          if (a.empty()) {
            data_[key] = b;
            out = b;
            notifyWaiters();
          } else {
            out = a;
          }
        } else {
          if (it->second == a) it->second = b;
          out = it->second;
        }
        std::string r;
        putStr(r, out);
        reply(c.fd, r.data(), r.size());
        break;
      }
      case Query::GET: {
        if (!takeStr(in, pos, key)) return true;
        auto it = data_.find(key);
        std::string r;
        if (it == data_.end()) {
          putU64(r, UINT64_MAX);  // missing: clients always WAIT first, so this is a protocol misuse
        } else {
          putStr(r, it->second);
        }
        reply(c.fd, r.data(), r.size());
        break;
      }
      case Query::ADD: {
        uint64_t raw;
        if (!takeStr(in, pos, key) || !takeU64(in, pos, raw)) return true;
        int64_t delta;
        memcpy(&delta, &raw, 8);
        auto it = data_.find(key);
        int64_t v = delta;
        if (it != data_.end()) v += std::strtoll(it->second.c_str(), nullptr, 10);
        data_[key] = std::to_string(v);
        notifyWaiters();
        reply(c.fd, &v, 8);
        break;
      }
      case Query::CHECK:
      case Query::WAIT: {
        if (!takeU64(in, pos, n)) return true;
        std::vector<std::string> keys;
        for (uint64_t i = 0; i < n; i++) {
          if (!takeStr(in, pos, key)) return true;
          keys.push_back(key);
        }
        std::vector<std::string> missing;
        for (auto& k : keys)
          if (!data_.count(k)) missing.push_back(k);
        if (q == Query::CHECK) {
          uint8_t r = missing.empty() ? 0 : 1;
          reply(c.fd, &r, 1);
        } else if (missing.empty()) {
          uint8_t r = 0;
          reply(c.fd, &r, 1);
        } else {
          waiters_.push_back({c.fd, std::move(missing)});
        }
        break;
      }
      case Query::GETNUMKEYS: {
        int64_t v = static_cast<int64_t>(data_.size());
        reply(c.fd, &v, 8);
        break;
      }
      case Query::DELETE_KEY: {
        if (!takeStr(in, pos, key)) return true;
        int64_t v = static_cast<int64_t>(data_.erase(key));
        reply(c.fd, &v, 8);
        break;
      }
      default:
        return false;  // not our protocol: drop the connection
    }
    c.in.erase(0, pos);
  }
}

void StoreServer::loop() {
  std::vector<pollfd> fds;
  char buf[65536];
  while (!stopping_) {
    fds.clear();
    fds.push_back({listenFd_, POLLIN, 0});
    fds.push_back({wakeFd_[0], POLLIN, 0});
    for (auto& kv : clients_) fds.push_back({kv.first, POLLIN, 0});
    int r = poll(fds.data(), fds.size(), 1000);
    if (r < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (stopping_) break;
    if (fds[0].revents & POLLIN) {
      int fd = accept4(listenFd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        clients_[fd] = Client{fd, {}};
      }
    }
    for (size_t i = 2; i < fds.size(); i++) {
      if (!fds[i].revents) continue;
      int fd = fds[i].fd;
      auto it = clients_.find(fd);
      if (it == clients_.end()) continue;
      ssize_t n = recv(fd, buf, sizeof(buf), MSG_DONTWAIT);
      bool keep = n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR));
      if (n > 0) {
        it->second.in.append(buf, static_cast<size_t>(n));
        keep = handle(it->second);
      }
      if (!keep) {
        close(fd);
        clients_.erase(fd);
        waiters_.erase(std::remove_if(waiters_.begin(), waiters_.end(), [&](const Waiter& w) { return w.fd == fd; }),
                       waiters_.end());
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Client

StoreClient::StoreClient(std::string host, int port, std::chrono::milliseconds timeout)
    : host_(std::move(host)), port_(port), connectTimeout_(timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
}

StoreClient::~StoreClient() { dropConnection(); }

void StoreClient::dropConnection() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

void StoreClient::ensureConnected() {
  if (fd_ >= 0) return;
  auto deadline = Clock::now() + connectTimeout_;
  std::string last = "no attempt";
  int delayMs = 10;
  for (;;) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    int gai = getaddrinfo(host_.c_str(), std::to_string(port_).c_str(), &hints, &res);
    if (gai != 0) {
      last = std::string("cannot resolve host '") + host_ + "': " + gai_strerror(gai);
    } else {
      int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
      if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        freeaddrinfo(res);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        fd_ = fd;
        return;
      }
      last = errnoText(errno);
      if (fd >= 0) close(fd);
      freeaddrinfo(res);
    }
    if (Clock::now() >= deadline) {
      throw StoreError("TIMEOUT", "could not reach the rendezvous store at " + where() + " within " +
                                      seconds(connectTimeout_) + " (" + last +
                                      "); is rank 0 running, and are MASTER_ADDR and MASTER_PORT right?");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(delayMs));
    delayMs = std::min(delayMs * 2, 500);
  }
}

void StoreClient::sendAll(const std::string& buf) {
  const char* p = buf.data();
  size_t n = buf.size();
  while (n > 0) {
    ssize_t w = send(fd_, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      dropConnection();
      throw StoreError("PEER_LOST", "lost the connection to the rendezvous store at " + where() + " (" + errnoText(e) +
                                        "); did rank 0 exit?");
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

void StoreClient::readExact(void* dst, size_t n, std::chrono::milliseconds timeout) {
  char* p = static_cast<char*>(dst);
  auto deadline = Clock::now() + timeout;
  while (n > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left < 0) left = 0;
    pollfd pfd{fd_, POLLIN, 0};
    int r = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left, INT32_MAX)));
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) {
      // the server may still answer later, which would desynchronise this connection
      dropConnection();
      throw StoreError("TIMEOUT", "timed out after " + std::to_string(timeout.count()) + " ms waiting for the store");
    }
    ssize_t got = recv(fd_, p, n, 0);
    if (got <= 0) {
      if (got < 0 && errno == EINTR) continue;
      dropConnection();
      throw StoreError("PEER_LOST", "the rendezvous store at " + where() + " closed the connection; did rank 0 exit?");
    }
    p += got;
    n -= static_cast<size_t>(got);
  }
}

static const std::chrono::milliseconds kReplyTimeout{120000};

void StoreClient::set(const std::string& key, const std::string& value) {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::SET));
  putStr(b, key);
  putStr(b, value);
  sendAll(b);
}

std::string StoreClient::get(const std::string& key, std::chrono::milliseconds timeout) {
  wait({key}, timeout);
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::GET));
  putStr(b, key);
  sendAll(b);
  uint64_t n;
  readExact(&n, 8, kReplyTimeout);
  if (n == UINT64_MAX) throw StoreError("STORE", "store key '" + key + "' was deleted while it was read");
  std::string out(n, '\0');
  if (n) readExact(&out[0], n, kReplyTimeout);
  return out;
}

int64_t StoreClient::add(const std::string& key, int64_t delta) {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::ADD));
  putStr(b, key);
  putU64(b, static_cast<uint64_t>(delta));
  sendAll(b);
  int64_t v;
  readExact(&v, 8, kReplyTimeout);
  return v;
}

bool StoreClient::check(const std::vector<std::string>& keys) {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::CHECK));
  putU64(b, keys.size());
  for (auto& k : keys) putStr(b, k);
  sendAll(b);
  uint8_t r;
  readExact(&r, 1, kReplyTimeout);
  return r == 0;
}

void StoreClient::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::WAIT));
  putU64(b, keys.size());
  for (auto& k : keys) putStr(b, k);
  sendAll(b);
  uint8_t r;
  try {
    readExact(&r, 1, timeout);
  } catch (const StoreError& e) {
    if (e.code != "TIMEOUT") throw;
    std::string list;
    for (size_t i = 0; i < keys.size() && i < 8; i++) list += (i ? ", " : "") + keys[i];
    throw StoreError("TIMEOUT", "timed out after " + std::to_string(timeout.count()) + " ms waiting for store keys [" +
                                    list + (keys.size() > 8 ? ", ..." : "") + "]");
  }
}

int64_t StoreClient::numKeys() {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::GETNUMKEYS));
  sendAll(b);
  int64_t v;
  readExact(&v, 8, kReplyTimeout);
  return v;
}

bool StoreClient::deleteKey(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::DELETE_KEY));
  putStr(b, key);
  sendAll(b);
  int64_t v;
  readExact(&v, 8, kReplyTimeout);
  return v > 0;
}

std::string StoreClient::compareSet(const std::string& key, const std::string& expected, const std::string& desired) {
  std::lock_guard<std::mutex> lock(mu_);
  ensureConnected();
  std::string b(1, static_cast<char>(Query::COMPARE_SET));
  putStr(b, key);
  putStr(b, expected);
  putStr(b, desired);
  sendAll(b);
  uint64_t n;
  readExact(&n, 8, kReplyTimeout);
  std::string out(n, '\0');
  if (n) readExact(&out[0], n, kReplyTimeout);
  return out;
}

}  // namespace mp
