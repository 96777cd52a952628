// fabric::Client — a control-plane session with one memfabric server: list, create,
// stat, delete and open regions. Open() returns a Remote on the data plane the session
// negotiated (TCP, TLS or RDMA). Made by transports::Connect (transports/connect.h).
//
// Thread-safety: a Client serializes its control calls internally; it may be shared.
// Remotes it opened stay valid after the Client is destroyed.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fabric/region.h"
#include "fabric/remote.h"
#include "fabric/status.h"

namespace mf::fabric {

struct OpenOptions {
  bool writable = false;  // take the region's write lease (fails with kBusy if held)
  int connections = 4;    // data-plane connections (TCP) or queue pairs (RDMA)
  int queue_depth = 64;   // requests in flight per connection
};

class Client {
 public:
  virtual ~Client() = default;
  // Where the session is and what carries it ("tcp", "tls", "rdma").
  virtual std::string_view transport() const = 0;
  virtual Result<std::vector<RegionInfo>> List() = 0;
  virtual Result<RegionInfo> Stat(std::string_view name) = 0;
  virtual Result<RegionInfo> Create(const RegionSpec& spec) = 0;
  // Fails with kBusy while a writer holds the region open.
  virtual Status Delete(std::string_view name) = 0;
  virtual Result<std::unique_ptr<Remote>> Open(std::string_view name, const OpenOptions& options) = 0;
};

}  // namespace mf::fabric
