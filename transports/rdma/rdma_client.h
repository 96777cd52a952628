// RdmaClient — fabric::Client whose Remotes move data with one-sided RDMA READ and WRITE
// (docs/rdma.md). The control plane is the TCP protocol (transports/tcp): the client
// authenticates there, OPENs the region and keeps one TCP data connection attached to the
// open (its lifeline: FLUSH and CLOSE go there, and the open ends when it drops). Then it
// connects OpenOptions.connections RC queue pairs with rdma_cm, presenting the open's
// token; the server's accept carries the region's address and rkey.
//
// The Remote posts requests in batches on one queue pair each (only the last of a batch
// signaled; a completion retires every request posted before it on that queue pair),
// with a fixed slot table of queue_depth per queue pair (no allocation per request). One
// completion thread per Remote polls a shared completion queue: by busy-polling, by
// sleeping on the completion channel, or by spinning for a while first (PollMode).
// A request unanswered for io_timeout, a failed completion or a disconnect fails every
// outstanding request and tears the queue pairs down; the completion thread then
// reconnects (control session, OPEN, queue pairs) once a second until it succeeds or the
// Remote is closed. Requests submitted meanwhile fail at once with kUnavailable.
//
// Thread-safety: RdmaClient and its Remotes are thread-safe (fabric/client.h,
// fabric/remote.h). Remotes stay valid after the RdmaClient is destroyed.
#pragma once

#include <memory>
#include <string_view>
#include <vector>

#include "fabric/client.h"
#include "fabric/status.h"
#include "fabric/url.h"
#include "transports/connect.h"

namespace mf::tcp {
class TcpClient;
}

namespace mf::rdma {

inline constexpr size_t kMaxRdmaTransfer = 1u << 20;  // per request; callers split larger
inline constexpr int kMaxQueuePairs = 64;
inline constexpr int kMaxRdmaQueueDepth = 1024;

class RdmaClient final : public fabric::Client {
 public:
  // Connects the control session to url.host:url.port. kUnsupported when this system has
  // no RDMA device. With fallback_to_tcp (auto://), Open falls back to TCP data
  // connections when the RDMA connection cannot be made, and logs why.
  static Result<std::unique_ptr<RdmaClient>> Connect(const fabric::Url& url,
                                                     const transports::ClientOptions& options,
                                                     bool fallback_to_tcp);
  ~RdmaClient() override;

  std::string_view transport() const override { return "rdma"; }
  Result<std::vector<fabric::RegionInfo>> List() override;
  Result<fabric::RegionInfo> Stat(std::string_view name) override;
  Result<fabric::RegionInfo> Create(const fabric::RegionSpec& spec) override;
  Status Delete(std::string_view name) override;
  // Also kInvalidArgument when connections is not 1..kMaxQueuePairs or queue_depth not
  // 1..kMaxRdmaQueueDepth; kUnsupported when the server has no RDMA data plane.
  Result<std::unique_ptr<fabric::Remote>> Open(std::string_view name,
                                               const fabric::OpenOptions& options) override;

 private:
  RdmaClient(fabric::Url url, transports::ClientOptions options, std::shared_ptr<tcp::TcpClient> control,
             bool fallback_to_tcp);

  const fabric::Url url_;
  const transports::ClientOptions options_;
  const std::shared_ptr<tcp::TcpClient> control_;
  const bool fallback_to_tcp_;
};

}  // namespace mf::rdma
