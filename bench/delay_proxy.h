// DelayProxy — a TCP forwarder on 127.0.0.1 that adds a round-trip latency, for the
// benchmarks on hosts without netem (bench/mount_bench.cc, bench/migration_bench.cc).
//
// Every accepted connection gets its own connection to the upstream server; one thread
// (epoll, edge-triggered, a timerfd for the deadlines) forwards both directions. Bytes are
// held from the moment the proxy receives them until that time plus half the round trip,
// then written on in order. Bytes that arrive within kCoalesceWindow of the previous bytes
// of the same direction share their deadline (at most that much less delay). Each
// direction holds at most `buffer_bytes`; beyond that the proxy stops reading and TCP's
// own flow control pushes back on the sender.
//
// The proxy terminates TCP on both sides, so the senders' congestion windows see a
// loopback round trip, not the added one: the in-flight limit is the proxy's buffer (a
// path whose window is large enough), not TCP's window. The delay applies per direction to
// the bytes received after set_rtt().
//
// Thread-safety: set_rtt, port and the counters may be called from any thread; the
// destructor stops the thread and closes every connection.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "fabric/os.h"
#include "fabric/status.h"

namespace mf::bench {

constexpr size_t kProxyBlockSize = 256u << 10;  // the unit the proxy reads into
constexpr size_t kProxyDefaultBuffer = 32u << 20;
constexpr auto kCoalesceWindow = std::chrono::microseconds(50);
static_assert(kProxyDefaultBuffer % kProxyBlockSize == 0);

struct DelayProxyOptions {
  std::string upstream_host = "127.0.0.1";
  uint16_t upstream_port = 0;
  std::chrono::microseconds rtt{0};
  size_t buffer_bytes = kProxyDefaultBuffer;  // per direction of each connection
};

class DelayProxy final {
 public:
  // Listens on 127.0.0.1 (an ephemeral port) and starts the forwarding thread.
  // kInvalidArgument for a buffer smaller than one block; an OS error otherwise.
  static Result<std::unique_ptr<DelayProxy>> Start(DelayProxyOptions options);
  ~DelayProxy();
  DelayProxy(const DelayProxy&) = delete;
  DelayProxy& operator=(const DelayProxy&) = delete;

  uint16_t port() const { return port_; }
  void set_rtt(std::chrono::microseconds rtt) {
    one_way_ns_.store(rtt.count() * 500, std::memory_order_relaxed);
  }
  std::chrono::microseconds rtt() const {
    return std::chrono::microseconds(one_way_ns_.load(std::memory_order_relaxed) / 500);
  }
  uint64_t bytes_forwarded() const { return bytes_forwarded_.load(std::memory_order_relaxed); }
  uint64_t connections() const { return connections_.load(std::memory_order_relaxed); }

 private:
  struct Pair;
  explicit DelayProxy(DelayProxyOptions options) : options_(std::move(options)) {}
  Status Init();
  void Loop();

  const DelayProxyOptions options_;
  std::atomic<int64_t> one_way_ns_{0};
  std::atomic<uint64_t> bytes_forwarded_{0};
  std::atomic<uint64_t> connections_{0};
  uint16_t port_ = 0;
  UniqueFd listener_;
  UniqueFd epoll_;
  UniqueFd timer_;
  UniqueFd stop_;       // an eventfd: the destructor's wake-up
  std::thread thread_;  // last: started after everything above exists
};

}  // namespace mf::bench
