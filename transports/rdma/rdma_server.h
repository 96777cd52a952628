// RdmaServer — the RDMA data plane of a memfabric server (docs/rdma.md).
//
// Listens with rdma_cm beside the TCP control plane. A client that OPENed a region on the
// control connection (authenticated) connects a queue pair per data connection, naming the
// open by its token in the connect request's private data. The first such connection of an
// open gives the open its own protection domain and a memory registration of the region
// (remote read, plus remote write for a writable open) on the device the client came in
// on; the accept's private data carries the address, rkey and size. Nothing about a region
// is revealed to a connect request without a live token.
//
// Each open has its own protection domain, so an rkey works only on that open's queue
// pairs: a reader cannot write through a writer's rkey. When the open ends (CLOSE, its
// control-side data connection lost, server stop) or its region is deleted, the
// registration is deregistered and the queue pairs disconnected before the write lease is
// released: no rkey outlives the open. The server's CPU never touches the data.
//
// Thread-safety: Start, port and Stop may be called from any thread; Stop is idempotent.
// The fabric::Server and the OpenTable must outlive the RdmaServer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "fabric/server.h"
#include "fabric/status.h"
#include "transports/open_table.h"

namespace mf::rdma {

struct RdmaListenOptions {
  std::string host = "0.0.0.0";  // an address of an RDMA-capable interface, or any
  uint16_t port = 0;             // rdma_cm port; 0 picks one
};

class RdmaServer {
 public:
  // kUnsupported when the system has no RDMA device or connection manager; the errno-
  // mapped code when binding fails.
  static Result<std::unique_ptr<RdmaServer>> Start(std::shared_ptr<transports::OpenTable> opens,
                                                   const RdmaListenOptions& options);
  ~RdmaServer();  // calls Stop()
  RdmaServer(const RdmaServer&) = delete;
  RdmaServer& operator=(const RdmaServer&) = delete;

  uint16_t port() const;
  // Disconnects every queue pair, deregisters every registration and joins the event
  // thread. Idempotent.
  void Stop();

  class Impl;

 private:
  explicit RdmaServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mf::rdma
