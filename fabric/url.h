// memfabric URLs: SCHEME://HOST[:PORT][/REGION]
//   tcp://   control and data plane on TCP
//   tls://   the same inside TLS
//   rdma://  control plane on TCP, data plane on RDMA verbs
//   auto://  RDMA when a device and route exist and connecting succeeds, else TCP
// HOST may be a name, an IPv4 address or a bracketed IPv6 address ([::1]).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "fabric/status.h"

namespace mf::fabric {

constexpr uint16_t kDefaultPort = 7411;

enum class Scheme : uint8_t { kTcp, kTls, kRdma, kAuto };
std::string_view SchemeName(Scheme scheme);

struct Url {
  Scheme scheme = Scheme::kTcp;
  std::string host;
  uint16_t port = kDefaultPort;
  std::string region;  // empty when the URL names only the server
  // "scheme://host:port[/region]", host bracketed if IPv6.
  std::string ToString() const;
};

// kInvalidArgument with a message that says which part is wrong.
Result<Url> ParseUrl(std::string_view text);
// Parses "HOST:PORT" or "[V6]:PORT" (as for --listen); port 0 allowed (ephemeral).
Status ParseHostPort(std::string_view text, std::string* host, uint16_t* port);

}  // namespace mf::fabric
