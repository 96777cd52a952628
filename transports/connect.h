// transports::Connect — opens a control-plane session to a memfabric server named by a
// URL and returns it as a fabric::Client. The scheme picks the data plane:
//   tcp://, tls://  TCP (tls adds TLS to the control and data connections)
//   rdma://         RDMA verbs (fails when no device or route; see transports/rdma)
//   auto://         RDMA when it connects, else TCP; the choice is logged and visible in
//                   Client::transport()
//
// Thread-safety: Connect is thread-safe.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "fabric/auth.h"
#include "fabric/client.h"
#include "fabric/status.h"
#include "fabric/url.h"

namespace mf::transports {

constexpr std::chrono::milliseconds kDefaultConnectTimeout{5000};
// A request that gets no answer in this long fails its connection with kTimeout.
constexpr std::chrono::milliseconds kDefaultIoTimeout{10000};

struct TlsOptions {
  std::string ca_file;    // PEM bundle used to verify the peer; empty = system default
  std::string cert_file;  // PEM certificate of this side (required on the server)
  std::string key_file;   // PEM private key of this side
  // Expected server name for certificate verification; empty = the URL's host.
  std::string server_name;
};

// How an RDMA client learns of completions (transports/rdma, docs/rdma.md).
enum class PollMode : uint8_t {
  kHybrid,  // busy-poll the completion queue for `poll_spin` after the last completion,
            // then sleep on the completion channel (the default: low latency while busy,
            // no CPU burnt while idle)
  kBusy,    // busy-poll always (lowest latency; one core per open Remote)
  kEvent,   // sleep on the completion channel after every batch (least CPU)
};
constexpr std::chrono::microseconds kDefaultPollSpin{50};

struct RdmaOptions {
  PollMode poll_mode = PollMode::kHybrid;
  std::chrono::microseconds poll_spin = kDefaultPollSpin;
  // ACK timeout exponent of the queue pairs (4.096 us * 2^n) and their retry count: a
  // server that stops answering fails requests after about timeout * (retries + 1).
  uint8_t ack_timeout_exponent = 16;  // ~268 ms
  uint8_t retry_count = 5;
};

struct ClientOptions {
  fabric::Secret secret;  // empty: connect without authenticating (server must be --insecure)
  TlsOptions tls;
  std::chrono::milliseconds connect_timeout = kDefaultConnectTimeout;
  std::chrono::milliseconds io_timeout = kDefaultIoTimeout;
  RdmaOptions rdma;
};

Result<std::unique_ptr<fabric::Client>> Connect(const fabric::Url& url, const ClientOptions& options);

}  // namespace mf::transports
