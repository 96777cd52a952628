// TcpClient — the TCP (and TLS) implementation of fabric::Client, and through Open() of
// fabric::Remote, speaking the protocol of docs/protocol.md.
//
// The control session is one connection, authenticated at Connect(); its calls are
// serialized and each waits at most io_timeout for its reply (a timeout breaks the session:
// later calls fail with kUnavailable). Open() sets up OpenOptions.connections data
// connections, each authenticated on its own and bound to the open by a random token the
// server issued. On each data connection requests are pipelined with tags from a fixed
// table of queue_depth slots (no per-request allocation); one reader thread per connection
// receives replies in any order, copies read data straight into the caller's buffer and
// runs the callback. A request unanswered for io_timeout fails with kTimeout and tears its
// connection down; a server that goes away surfaces as kUnavailable at once.
//
// Thread-safety: TcpClient and the Remotes it opens are thread-safe (see fabric/client.h,
// fabric/remote.h). Remotes stay valid after their TcpClient is destroyed.
#pragma once

#include <array>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fabric/client.h"
#include "fabric/status.h"
#include "fabric/thread_annotations.h"
#include "fabric/url.h"
#include "transports/connect.h"

namespace mf::tcp {

inline constexpr int kMaxDataConnections = 64;
inline constexpr int kMaxQueueDepth = 4096;

class Stream;
class TlsContext;

// Everything needed to open one more authenticated connection to the same server.
struct Endpoint {
  std::string host;
  uint16_t port = 0;
  std::shared_ptr<TlsContext> tls;  // null: plain TCP
  std::string server_name;          // TLS: name or address checked against the certificate
  transports::ClientOptions options;
};

class TcpClient final : public fabric::Client {
 public:
  // Connects to url.host:url.port (TLS when tls is set or url.scheme is kTls), says hello
  // and authenticates. kUnavailable/kTimeout when unreachable, kUnauthenticated on a wrong
  // secret or certificate, kUnsupported on a protocol version mismatch (naming both).
  static Result<std::unique_ptr<TcpClient>> Connect(const fabric::Url& url,
                                                    const transports::ClientOptions& options, bool tls);
  ~TcpClient() override;

  std::string_view transport() const override { return endpoint_.tls ? "tls" : "tcp"; }
  Result<std::vector<fabric::RegionInfo>> List() override MF_EXCLUDES(mu_);
  Result<fabric::RegionInfo> Stat(std::string_view name) override MF_EXCLUDES(mu_);
  Result<fabric::RegionInfo> Create(const fabric::RegionSpec& spec) override MF_EXCLUDES(mu_);
  Status Delete(std::string_view name) override MF_EXCLUDES(mu_);
  // Also kInvalidArgument when connections is not 1..kMaxDataConnections or queue_depth
  // not 1..kMaxQueueDepth.
  Result<std::unique_ptr<fabric::Remote>> Open(std::string_view name,
                                               const fabric::OpenOptions& options) override MF_EXCLUDES(mu_);

  // Open, also returning what another data plane needs to join the open: its token and
  // the server's rdma_cm port (0: the server has no RDMA data plane).
  struct OpenedRegion {
    std::unique_ptr<fabric::Remote> remote;
    std::array<uint8_t, 32> token{};
    uint16_t rdma_port = 0;
  };
  Result<OpenedRegion> OpenRegion(std::string_view name, const fabric::OpenOptions& options) MF_EXCLUDES(mu_);

 private:
  TcpClient(Endpoint endpoint, std::unique_ptr<Stream> control);
  // Sends one control request and returns the payload of its OK reply.
  Result<std::vector<std::byte>> Call(uint8_t opcode, std::span<const std::byte> payload) MF_EXCLUDES(mu_);

  const Endpoint endpoint_;
  Mutex mu_;
  std::unique_ptr<Stream> control_ MF_GUARDED_BY(mu_);
  Status broken_ MF_GUARDED_BY(mu_);  // set once the session failed
  uint64_t next_tag_ MF_GUARDED_BY(mu_) = 1;
};

}  // namespace mf::tcp
