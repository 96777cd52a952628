// TLS (tls://) end to end: a throwaway CA and server certificate are made with the openssl
// CLI into a temporary directory; a client trusting that CA reads and writes; clients with
// the wrong CA, the wrong server name or no TLS at all are refused with an error.
#include <gtest/gtest.h>

#include "fabric/remote.h"
#include "tests/integration/tcp_test_util.h"

namespace mf::tcp::testing {
namespace {

class TcpTls : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(MakeTestCertificates(dir_.path())) << "openssl CLI failed";
    ListenOptions lo;
    lo.tls = true;
    lo.tls_options.cert_file = (dir_.path() / "server.pem").string();
    lo.tls_options.key_file = (dir_.path() / "server.key").string();
    lo.handshake_timeout = std::chrono::milliseconds(2000);
    server_ = TestServer::Start(lo);
    ASSERT_NE(server_, nullptr);
  }

  transports::ClientOptions Opts(const std::string& ca, const std::string& name = "") {
    auto o = ClientOpts();
    o.tls.ca_file = (dir_.path() / ca).string();
    o.tls.server_name = name;
    return o;
  }

  TempDir dir_;
  std::unique_ptr<TestServer> server_;
};

TEST_F(TcpTls, RoundTrip) {
  for (const std::string name : {"", "localhost"}) {  // by IP SAN (URL host), by DNS SAN
    auto client = transports::Connect(server_->url(fabric::Scheme::kTls), Opts("ca.pem", name));
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    EXPECT_EQ((*client)->transport(), "tls");
    fabric::RegionSpec spec;
    spec.name = "secret" + name;
    spec.size = 3u << 20;
    MF_ASSERT_OK((*client)->Create(spec).status());
    MF_ASSERT_OK_AND_ASSIGN(auto remote, (*client)->Open(spec.name, OpenOpts(true, 3)));
    EXPECT_EQ(remote->transport(), "tls");
    std::vector<std::byte> data(spec.size - 100);
    FillPattern(data, 5);
    MF_ASSERT_OK(fabric::WriteAt(*remote, 50, data));
    std::vector<std::byte> back(data.size());
    MF_ASSERT_OK(fabric::ReadAt(*remote, 50, back));
    EXPECT_TRUE(back == data);
    MF_ASSERT_OK(remote->Flush());
    MF_ASSERT_OK(remote->Close());
  }
}

TEST_F(TcpTls, WrongCaRejected) {
  auto client = transports::Connect(server_->url(fabric::Scheme::kTls), Opts("other_ca.pem"));
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), Code::kUnauthenticated) << client.status().ToString();
}

TEST_F(TcpTls, WrongServerNameRejected) {
  auto client = transports::Connect(server_->url(fabric::Scheme::kTls), Opts("ca.pem", "example.com"));
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), Code::kUnauthenticated) << client.status().ToString();
}

TEST_F(TcpTls, PlainClientRefused) {
  auto opts = ClientOpts();
  opts.connect_timeout = std::chrono::milliseconds(3000);
  auto start = Clock::now();
  auto client = transports::Connect(server_->url(fabric::Scheme::kTcp), opts);
  EXPECT_FALSE(client.ok());
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(5));
  // And a TLS client still gets served afterwards.
  auto good = transports::Connect(server_->url(fabric::Scheme::kTls), Opts("ca.pem"));
  EXPECT_TRUE(good.ok()) << good.status().ToString();
}

// A server given a CA requires client certificates signed by it (mutual TLS).
TEST_F(TcpTls, MutualTls) {
  fabric::Server server(SecureOptions());
  ListenOptions lo;
  lo.port = 0;
  lo.tls = true;
  lo.tls_options.cert_file = (dir_.path() / "server.pem").string();
  lo.tls_options.key_file = (dir_.path() / "server.key").string();
  lo.tls_options.ca_file = (dir_.path() / "ca.pem").string();
  auto tcp = TcpServer::Start(server, lo);
  ASSERT_TRUE(tcp.ok()) << tcp.status().ToString();
  fabric::Url url;
  url.scheme = fabric::Scheme::kTls;
  url.host = "127.0.0.1";
  url.port = (*tcp)->port();

  auto anonymous = transports::Connect(url, Opts("ca.pem"));
  EXPECT_FALSE(anonymous.ok());

  auto opts = Opts("ca.pem");
  opts.tls.cert_file = (dir_.path() / "client.pem").string();
  opts.tls.key_file = (dir_.path() / "client.key").string();
  auto client = transports::Connect(url, opts);
  ASSERT_TRUE(client.ok()) << client.status().ToString();
  fabric::RegionSpec spec;
  spec.name = "mtls";
  spec.size = 4096;
  MF_ASSERT_OK((*client)->Create(spec).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, (*client)->Open("mtls", OpenOpts(true, 2)));
  std::vector<std::byte> data(4096, std::byte{0x42});
  MF_ASSERT_OK(fabric::WriteAt(*remote, 0, data));
  std::vector<std::byte> back(4096);
  MF_ASSERT_OK(fabric::ReadAt(*remote, 0, back));
  EXPECT_TRUE(back == data);
}

TEST_F(TcpTls, ServerNeedsCertificate) {
  fabric::Server server(SecureOptions());
  ListenOptions lo;
  lo.port = 0;
  lo.tls = true;
  EXPECT_EQ(TcpServer::Start(server, lo).status().code(), Code::kInvalidArgument);
  lo.tls_options.cert_file = (dir_.path() / "missing.pem").string();
  lo.tls_options.key_file = (dir_.path() / "server.key").string();
  EXPECT_EQ(TcpServer::Start(server, lo).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace mf::tcp::testing
