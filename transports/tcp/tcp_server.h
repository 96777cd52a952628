// TcpServer — serves a fabric::Server over the memfabric TCP protocol (docs/protocol.md):
// control connections (handshake, mutual HMAC auth, LIST/STAT/CREATE/DELETE/OPEN) and data
// connections (ATTACH to an open, then pipelined READ/WRITE/FLUSH/CLOSE), optionally in TLS.
//
// `threads` epoll workers share the listening socket (EPOLLEXCLUSIVE); a connection lives
// on the worker that accepted it. Sockets are non-blocking and every per-connection buffer
// is bounded: a frame's length is checked before its bytes are buffered, a connection whose
// unsent replies reach max_output_bytes is no longer read, and is dropped when its peer
// makes no progress reading them for stall_timeout. A frame left half-sent for
// frame_timeout and a handshake not finished in handshake_timeout also drop the
// connection. FLUSH (msync) runs on a separate thread so it never blocks a worker. See
// docs/tcp.md for why epoll rather than io_uring.
//
// Thread-safety: Start, port and Stop may be called from any thread; Stop is idempotent.
// The fabric::Server must outlive the TcpServer.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "fabric/server.h"
#include "fabric/status.h"
#include "fabric/url.h"
#include "transports/connect.h"
#include "transports/open_table.h"

namespace mf::tcp {

inline constexpr size_t kDefaultMaxOutputBytes = 8u << 20;
inline constexpr std::chrono::microseconds kDefaultServerPollSpin{50};
inline constexpr int kMaxServerThreads = 64;

struct ListenOptions {
  std::string host = "127.0.0.1";
  uint16_t port = fabric::kDefaultPort;
  int threads = 2;
  bool tls = false;
  transports::TlsOptions tls_options;

  // Robustness limits. The defaults suit production; tests shorten them.
  std::chrono::milliseconds handshake_timeout{10000};  // hello + TLS + auth
  std::chrono::milliseconds frame_timeout{10000};      // a started frame must complete
  std::chrono::milliseconds stall_timeout{10000};      // unsent replies with no progress
  std::chrono::milliseconds attach_timeout{30000};     // an OPEN whose token is never attached
  size_t max_output_bytes = kDefaultMaxOutputBytes;    // unsent replies per connection
  int max_connections = 4096;
  // After serving events a worker polls its connections this long before it sleeps, so a
  // client sending its next request soon after a reply (a page fault after a page fault)
  // costs no thread wake-up. A spinning worker yields its CPU to any thread waiting for it.
  // 0: always sleep. Ignored on a machine with one CPU.
  std::chrono::microseconds poll_spin = kDefaultServerPollSpin;

  // The table of OPENs, shared with the server's other data planes (transports/rdma);
  // null: the TcpServer keeps its own.
  std::shared_ptr<transports::OpenTable> opens;
  // Advertised in OPEN replies: the rdma_cm port of the RDMA data plane serving `opens`;
  // 0 when there is none.
  uint16_t rdma_port = 0;
};

class TcpServer {
 public:
  // Binds host:port and starts serving `server`. Fails with kInvalidArgument when the
  // server is insecure and host is not a loopback address, when it has no secret and is
  // not insecure, or when the TLS files cannot be loaded; with the errno-mapped code when
  // binding fails.
  static Result<std::unique_ptr<TcpServer>> Start(fabric::Server& server, const ListenOptions& options);
  ~TcpServer();  // calls Stop()
  TcpServer(const TcpServer&) = delete;
  TcpServer& operator=(const TcpServer&) = delete;

  // The bound port (useful with port 0).
  uint16_t port() const;
  // Connections being served. One leaves the count once all it held is freed (the fuzz
  // target waits for 0 between inputs).
  int connections() const;
  // Stops accepting, closes every connection (releasing their opens and write leases) and
  // joins the workers. Idempotent.
  void Stop();

  class Impl;

 private:
  explicit TcpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mf::tcp
