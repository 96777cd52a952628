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

struct ClientOptions {
  fabric::Secret secret;  // empty: connect without authenticating (server must be --insecure)
  TlsOptions tls;
  std::chrono::milliseconds connect_timeout = kDefaultConnectTimeout;
  std::chrono::milliseconds io_timeout = kDefaultIoTimeout;
};

Result<std::unique_ptr<fabric::Client>> Connect(const fabric::Url& url, const ClientOptions& options);

}  // namespace mf::transports
