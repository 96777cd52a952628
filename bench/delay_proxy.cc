#include "bench/delay_proxy.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <list>
#include <vector>

#include "fabric/log.h"

namespace mf::bench {
namespace {

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC, as the timerfd

constexpr int kMaxEvents = 64;
// Bytes read from one socket per pass of the loop, so that every connection gets a turn.
constexpr size_t kReadBudget = 1u << 20;

Status SetNonBlocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) return Status::FromErrno(errno, "fcntl");
  return Status::Ok();
}

void SetNoDelay(int fd) {
  int one = 1;
  (void)::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

Result<UniqueFd> ConnectUpstream(const std::string& host, uint16_t port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Status::FromErrno(errno, "socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) return InvalidArgument("bad upstream " + host);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return Status::FromErrno(errno, "connecting to the upstream");
  MF_RETURN_IF_ERROR(SetNonBlocking(fd.get()));
  SetNoDelay(fd.get());
  return fd;
}

// Bytes received together, held until `due`.
struct Block {
  std::unique_ptr<std::byte[]> bytes;
  size_t filled = 0;
  size_t sent = 0;
  Clock::time_point received;
  Clock::time_point due;
};

// Blocks come from and go back to one free list (the loop's thread only).
class BlockPool {
 public:
  std::unique_ptr<std::byte[]> Take() {
    if (free_.empty()) return std::make_unique<std::byte[]>(kProxyBlockSize);
    auto b = std::move(free_.back());
    free_.pop_back();
    return b;
  }
  void Give(std::unique_ptr<std::byte[]> b) { free_.push_back(std::move(b)); }

 private:
  std::vector<std::unique_ptr<std::byte[]>> free_;
};

// One socket and what epoll last said about it (edge-triggered: a flag stays set until
// a call returns EAGAIN).
struct Socket {
  UniqueFd fd;
  bool readable = false;
  bool writable = false;
};

// One direction of a connection: from one Socket's reads to the other's writes.
struct Direction {
  std::deque<Block> queue;
  size_t reserved = 0;  // kProxyBlockSize per queued block
  bool eof = false;     // the sender shut its side
  bool shut = false;    // and that reached the receiver
};

}  // namespace

struct DelayProxy::Pair {
  Socket client;
  Socket upstream;
  Direction to_upstream;
  Direction to_client;
  bool failed = false;
  bool done() const { return failed || (to_upstream.shut && to_client.shut); }
};

namespace {

// Reads what `from` has (within the buffer and the budget) into `d`. False on an error.
bool ReadInto(Direction& d, Socket& from, size_t limit, Clock::time_point now, int64_t one_way_ns,
              BlockPool& pool) {
  size_t budget = kReadBudget;
  while (from.readable && !d.eof && budget > 0) {
    Block* tail = d.queue.empty() ? nullptr : &d.queue.back();
    if (tail == nullptr || tail->filled == kProxyBlockSize || now - tail->received > kCoalesceWindow) {
      if (d.reserved + kProxyBlockSize > limit) break;  // full: TCP pushes back
      d.queue.push_back(Block{pool.Take(), 0, 0, now, now + std::chrono::nanoseconds(one_way_ns)});
      d.reserved += kProxyBlockSize;
      tail = &d.queue.back();
    }
    const ssize_t n =
        ::recv(from.fd.get(), tail->bytes.get() + tail->filled, kProxyBlockSize - tail->filled, 0);
    if (n > 0) {
      tail->filled += static_cast<size_t>(n);
      budget -= std::min(budget, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) {
      d.eof = true;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      from.readable = false;
    } else if (errno != EINTR) {
      return false;
    }
  }
  if (!d.queue.empty() && d.queue.back().filled == 0) {  // made for a read that found nothing
    pool.Give(std::move(d.queue.back().bytes));
    d.queue.pop_back();
    d.reserved -= kProxyBlockSize;
  }
  return true;
}

// Writes the blocks that are due to `to`, in order. Returns false on an error; *moved gets
// the bytes written.
bool WriteDue(Direction& d, Socket& to, Clock::time_point now, BlockPool& pool, uint64_t* moved) {
  while (!d.queue.empty() && to.writable) {
    Block& b = d.queue.front();
    if (b.due > now) break;
    if (b.sent < b.filled) {
      const ssize_t n = ::send(to.fd.get(), b.bytes.get() + b.sent, b.filled - b.sent, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          to.writable = false;
          break;
        }
        if (errno == EINTR) continue;
        return false;
      }
      b.sent += static_cast<size_t>(n);
      *moved += static_cast<uint64_t>(n);
    }
    if (b.sent == b.filled) {
      pool.Give(std::move(b.bytes));
      d.queue.pop_front();
      d.reserved -= kProxyBlockSize;
    }
  }
  if (d.eof && d.queue.empty() && !d.shut) {
    (void)::shutdown(to.fd.get(), SHUT_WR);
    d.shut = true;
  }
  return true;
}

// Whether another pass could move bytes of `d` without waiting for epoll or the timer.
bool CanProgress(const Direction& d, const Socket& from, const Socket& to, size_t limit,
                 Clock::time_point now) {
  const bool room =
      d.reserved + kProxyBlockSize <= limit || (!d.queue.empty() && d.queue.back().filled < kProxyBlockSize &&
                                                now - d.queue.back().received <= kCoalesceWindow);
  if (from.readable && !d.eof && room) return true;
  return to.writable && !d.queue.empty() && d.queue.front().due <= now;
}

}  // namespace

Result<std::unique_ptr<DelayProxy>> DelayProxy::Start(DelayProxyOptions options) {
  if (options.buffer_bytes < kProxyBlockSize)
    return InvalidArgument("proxy buffer must hold at least one block of " + std::to_string(kProxyBlockSize));
  const auto rtt = options.rtt;
  std::unique_ptr<DelayProxy> proxy(new DelayProxy(std::move(options)));
  proxy->set_rtt(rtt);
  MF_RETURN_IF_ERROR(proxy->Init());
  return proxy;
}

Status DelayProxy::Init() {
  listener_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!listener_) return Status::FromErrno(errno, "socket");
  int one = 1;
  (void)::setsockopt(listener_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (::bind(listener_.get(), reinterpret_cast<sockaddr*>(&addr), len) != 0)
    return Status::FromErrno(errno, "bind");
  if (::listen(listener_.get(), 64) != 0) return Status::FromErrno(errno, "listen");
  if (::getsockname(listener_.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0)
    return Status::FromErrno(errno, "getsockname");
  port_ = ntohs(addr.sin_port);

  epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  timer_ = UniqueFd(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  stop_ = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!epoll_ || !timer_ || !stop_) return Status::FromErrno(errno, "epoll/timerfd/eventfd");
  for (int fd : {listener_.get(), timer_.get(), stop_.get()}) {
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLET;
    ev.data.ptr = fd == listener_.get() ? static_cast<void*>(&listener_)
                  : fd == timer_.get()  ? static_cast<void*>(&timer_)
                                        : static_cast<void*>(&stop_);
    if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return Status::FromErrno(errno, "epoll_ctl");
  }
  thread_ = std::thread([this] { Loop(); });
  return Status::Ok();
}

DelayProxy::~DelayProxy() {
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!::write(stop_.get(), &one, sizeof(one));
    thread_.join();
  }
}

void DelayProxy::Loop() {
  // epoll's data: the address of listener_, timer_ or stop_, or of a Pair's Socket.
  std::list<Pair> pairs;
  BlockPool pool;
  epoll_event events[kMaxEvents];
  const size_t limit = options_.buffer_bytes;
  bool busy = false;  // some pass can move bytes now: poll without sleeping
  Clock::time_point armed = Clock::time_point::max();
  for (;;) {
    const int n = ::epoll_wait(epoll_.get(), events, kMaxEvents, busy ? 0 : -1);
    if (n < 0 && errno != EINTR) {
      spdlog::error("delay proxy: epoll_wait: {}", std::strerror(errno));
      return;
    }
    for (int i = 0; i < n; ++i) {
      const epoll_event& ev = events[i];
      if (ev.data.ptr == &stop_) return;
      if (ev.data.ptr == &timer_) {
        uint64_t expirations = 0;
        (void)!::read(timer_.get(), &expirations, sizeof(expirations));
        armed = Clock::time_point::max();
        continue;
      }
      if (ev.data.ptr == &listener_) {
        for (;;) {
          UniqueFd client(::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
          if (!client) break;
          auto upstream = ConnectUpstream(options_.upstream_host, options_.upstream_port);
          if (!upstream.ok()) {
            spdlog::warn("delay proxy: {}", upstream.status().ToString());
            continue;  // the client sees its connection closed
          }
          SetNoDelay(client.get());
          Pair& p = pairs.emplace_back();
          p.client.fd = std::move(client);
          p.upstream.fd = std::move(upstream).value();
          for (Socket* s : {&p.client, &p.upstream}) {
            epoll_event add{};
            add.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
            add.data.ptr = s;
            if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, s->fd.get(), &add) != 0) p.failed = true;
          }
          connections_.fetch_add(1, std::memory_order_relaxed);
        }
        continue;
      }
      auto* s = static_cast<Socket*>(ev.data.ptr);
      if ((ev.events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0) s->readable = true;
      if ((ev.events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) != 0) s->writable = true;
    }

    // One pass over every connection: read what is there, write what is due.
    const auto now = Clock::now();
    const int64_t one_way = one_way_ns_.load(std::memory_order_relaxed);
    uint64_t moved = 0;
    busy = false;
    Clock::time_point next_due = Clock::time_point::max();
    for (auto it = pairs.begin(); it != pairs.end();) {
      Pair& p = *it;
      if (!p.failed) {
        p.failed = !ReadInto(p.to_upstream, p.client, limit, now, one_way, pool) ||
                   !ReadInto(p.to_client, p.upstream, limit, now, one_way, pool) ||
                   !WriteDue(p.to_upstream, p.upstream, now, pool, &moved) ||
                   !WriteDue(p.to_client, p.client, now, pool, &moved);
      }
      if (p.done()) {
        for (Direction* d : {&p.to_upstream, &p.to_client}) {
          for (Block& b : d->queue) pool.Give(std::move(b.bytes));
        }
        it = pairs.erase(it);  // closes both sockets, which leaves epoll
        continue;
      }
      busy = busy || CanProgress(p.to_upstream, p.client, p.upstream, limit, now) ||
             CanProgress(p.to_client, p.upstream, p.client, limit, now);
      for (const Direction* d : {&p.to_upstream, &p.to_client}) {
        if (!d->queue.empty() && d->queue.front().due > now)
          next_due = std::min(next_due, d->queue.front().due);
      }
      ++it;
    }
    bytes_forwarded_.fetch_add(moved, std::memory_order_relaxed);
    if (!busy && next_due != Clock::time_point::max() && next_due != armed) {
      itimerspec when{};
      const auto ns =
          std::chrono::duration_cast<std::chrono::nanoseconds>(next_due.time_since_epoch()).count();
      when.it_value.tv_sec = ns / 1000000000;
      when.it_value.tv_nsec = ns % 1000000000;
      (void)::timerfd_settime(timer_.get(), TFD_TIMER_ABSTIME, &when, nullptr);
      armed = next_due;
    }
  }
}

}  // namespace mf::bench
