// A memfabric server with every data plane this system can offer, for integration tests
// that run on the host and inside the test VM: fabric::Server + TcpServer + RdmaServer
// (when an RDMA device exists) sharing one open table, listening on $MF_VM_ADDR in the VM
// (where rxe0 lives) and on 127.0.0.1 on the host. TestScheme() is the data plane a test
// binary was asked to use ($MF_TEST_SCHEME: tcp (default), rdma or auto).
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>

#include "fabric/server.h"
#include "fabric/url.h"
#include "tests/integration/tcp_test_util.h"
#include "transports/open_table.h"
#include "transports/rdma/rdma_server.h"
#include "transports/rdma/verbs.h"
#include "transports/tcp/tcp_server.h"

namespace mf::testing {

using tcp::testing::SecureOptions;

inline bool InVm() {
  return std::getenv("MF_VM_ADDR") != nullptr;
}
inline std::string Host() {
  return InVm() ? std::getenv("MF_VM_ADDR") : "127.0.0.1";
}

// A server with both data planes (RDMA only where the system has a device).
struct TestServers {
  std::unique_ptr<fabric::Server> server;
  std::shared_ptr<transports::OpenTable> opens = std::make_shared<transports::OpenTable>();
  std::unique_ptr<rdma::RdmaServer> rdma;
  std::unique_ptr<tcp::TcpServer> tcp;

  static std::unique_ptr<TestServers> Start(uint16_t port = 0) {
    auto s = std::make_unique<TestServers>();
    s->server = std::make_unique<fabric::Server>(SecureOptions());
    tcp::ListenOptions listen;
    listen.host = Host();
    listen.port = port;
    listen.opens = s->opens;
    if (rdma::HasRdmaDevice()) {
      auto r = rdma::RdmaServer::Start(s->opens, {Host(), port});
      EXPECT_TRUE(r.ok()) << r.status().ToString();
      if (!r.ok()) return nullptr;
      s->rdma = std::move(r).value();
      listen.rdma_port = s->rdma->port();
    }
    auto t = tcp::TcpServer::Start(*s->server, listen);
    EXPECT_TRUE(t.ok()) << t.status().ToString();
    if (!t.ok()) return nullptr;
    s->tcp = std::move(t).value();
    return s;
  }
  fabric::Url url(fabric::Scheme scheme) const {
    fabric::Url u;
    u.scheme = scheme;
    u.host = Host();
    u.port = tcp->port();
    return u;
  }
  ~TestServers() {
    if (tcp) tcp->Stop();
    if (rdma) rdma->Stop();
  }
};

inline fabric::Scheme TestScheme() {
  const char* s = std::getenv("MF_TEST_SCHEME");
  if (s == nullptr) return fabric::Scheme::kTcp;
  const std::string v = s;
  if (v == "rdma") return fabric::Scheme::kRdma;
  if (v == "auto") return fabric::Scheme::kAuto;
  return fabric::Scheme::kTcp;
}

// Creates region `name` (memfd) filled with a pattern from `seed`; returns a handle on
// it through which a test reads what the server holds.
inline fabric::RegionHandle CreateSeededRegion(TestServers& s, const std::string& name, size_t size,
                                               uint64_t seed) {
  EXPECT_TRUE(s.server->Create({name, size, fabric::BackingKind::kMemfd, ""}).ok());
  auto h = s.server->Open(name, false);
  EXPECT_TRUE(h.ok()) << h.status().ToString();
  if (!h.ok()) return {};
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i + 8 <= size; i += 8) {
    const uint64_t v = rng();
    std::memcpy(h->region()->data() + i, &v, 8);
  }
  return std::move(h).value();
}

// Region `name` opened by a new client of the server on TestScheme(); null (and a test
// failure) on error.
inline std::unique_ptr<fabric::Remote> OpenRegion(const TestServers& s, const std::string& name,
                                                  bool writable) {
  auto client = transports::Connect(s.url(TestScheme()), tcp::testing::ClientOpts());
  EXPECT_TRUE(client.ok()) << client.status().ToString();
  if (!client.ok()) return nullptr;
  fabric::OpenOptions o;
  o.writable = writable;
  auto remote = (*client)->Open(name, o);
  EXPECT_TRUE(remote.ok()) << remote.status().ToString();
  return remote.ok() ? std::move(remote).value() : nullptr;
}

}  // namespace mf::testing
