// Helpers for the TCP transport's integration tests: an in-process fabric::Server behind a
// TcpServer on an ephemeral loopback port, clients connected to it, a raw authenticated
// socket for speaking malformed protocol, and a throwaway CA + server certificate made
// with the openssl CLI.
#pragma once

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "fabric/auth.h"
#include "fabric/server.h"
#include "fabric/url.h"
#include "transports/connect.h"
#include "transports/tcp/stream.h"
#include "transports/tcp/tcp_server.h"
#include "transports/tcp/wire.h"

namespace mf::tcp::testing {

inline const std::string kTestSecret = "correct horse battery staple";

#define MF_ASSERT_OK(expr)                         \
  do {                                             \
    ::mf::Status mf_st_ = (expr);                  \
    ASSERT_TRUE(mf_st_.ok()) << mf_st_.ToString(); \
  } while (0)

// Unwraps a Result in a test, failing it (fatally) when not OK.
#define MF_ASSERT_OK_AND_ASSIGN(lhs, expr)                                                        \
  auto MF_CONCAT(mf_r_, __LINE__) = (expr);                                                       \
  ASSERT_TRUE(MF_CONCAT(mf_r_, __LINE__).ok()) << MF_CONCAT(mf_r_, __LINE__).status().ToString(); \
  lhs = std::move(MF_CONCAT(mf_r_, __LINE__)).value()

inline fabric::ServerOptions SecureOptions() {
  fabric::ServerOptions o;
  o.secret = fabric::Secret(kTestSecret);
  return o;
}

// A fabric::Server plus a TcpServer serving it on 127.0.0.1:<ephemeral>.
struct TestServer {
  std::unique_ptr<fabric::Server> server;
  std::unique_ptr<TcpServer> tcp;

  static std::unique_ptr<TestServer> Start(ListenOptions listen = {},
                                           fabric::ServerOptions options = SecureOptions()) {
    auto s = std::make_unique<TestServer>();
    s->server = std::make_unique<fabric::Server>(std::move(options));
    listen.port = 0;
    auto started = TcpServer::Start(*s->server, listen);
    EXPECT_TRUE(started.ok()) << started.status().ToString();
    if (!started.ok()) return nullptr;
    s->tcp = std::move(started).value();
    return s;
  }
  uint16_t port() const { return tcp->port(); }
  fabric::Url url(fabric::Scheme scheme = fabric::Scheme::kTcp) const {
    fabric::Url u;
    u.scheme = scheme;
    u.host = "127.0.0.1";
    u.port = port();
    return u;
  }
  void Stop() {
    if (tcp) tcp->Stop();
    tcp.reset();
    server.reset();
  }
};

inline transports::ClientOptions ClientOpts(std::string secret = kTestSecret) {
  transports::ClientOptions o;
  if (!secret.empty()) o.secret = fabric::Secret(std::move(secret));
  o.connect_timeout = std::chrono::milliseconds(3000);
  o.io_timeout = std::chrono::milliseconds(3000);
  return o;
}

inline fabric::OpenOptions OpenOpts(bool writable, int connections = 4, int queue_depth = 64) {
  fabric::OpenOptions o;
  o.writable = writable;
  o.connections = connections;
  o.queue_depth = queue_depth;
  return o;
}

// Fills with a deterministic pattern depending on seed and position.
inline void FillPattern(std::span<std::byte> out, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (auto& b : out) b = static_cast<std::byte>(rng());
}

// A raw connection for speaking (mal)formed protocol at the server.
class RawConn {
 public:
  explicit RawConn(uint16_t port) {
    auto fd = ConnectTcp("127.0.0.1", port, Clock::now() + std::chrono::seconds(3));
    EXPECT_TRUE(fd.ok()) << fd.status().ToString();
    if (fd.ok()) stream_ = std::make_unique<Stream>(std::move(fd).value());
  }
  Stream& stream() { return *stream_; }
  int fd() const { return stream_->fd(); }

  Status Send(std::span<const std::byte> bytes) {
    return WriteExact(*stream_, bytes, Clock::now() + std::chrono::seconds(3));
  }
  Status SendFrame(const wire::FrameHeader& h, std::span<const std::byte> payload = {}) {
    std::vector<std::byte> out;
    wire::AppendFrame(h, payload, &out);
    return Send(out);
  }
  Status Recv(std::span<std::byte> bytes, std::chrono::milliseconds timeout = std::chrono::seconds(3)) {
    return ReadExact(*stream_, bytes, Clock::now() + timeout);
  }
  // Reads one frame; the payload into *payload.
  Status RecvFrame(wire::FrameHeader* h, std::vector<std::byte>* payload,
                   std::chrono::milliseconds timeout = std::chrono::seconds(3)) {
    std::array<std::byte, wire::kFrameHeaderSize> raw{};
    MF_RETURN_IF_ERROR(Recv(raw, timeout));
    auto r = wire::DecodeFrameHeader(raw, h);
    if (!r.ok()) return r.status();
    payload->resize(h->payload_length);
    return Recv(*payload, timeout);
  }
  // True when the server closed the connection within timeout (EOF or reset).
  bool ClosedByServer(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    auto deadline = Clock::now() + timeout;
    std::array<std::byte, 4096> sink{};
    while (Clock::now() < deadline) {
      auto n = stream_->ReadSome(sink);
      if (!n.ok()) return n.status().code() != Code::kTimeout;
      if (*n == 0 && !WaitFd(fd(), POLLIN, deadline).ok()) return false;
    }
    return false;
  }
  // Hello + HMAC auth on `channel`. Returns the server hello.
  Status Handshake(wire::Channel channel, const std::string& secret = kTestSecret) {
    wire::ClientHello hello;
    hello.channel = channel;
    hello.nonce = *fabric::MakeNonce();
    std::array<std::byte, wire::kClientHelloSize> raw{};
    wire::EncodeClientHello(hello, raw);
    MF_RETURN_IF_ERROR(Send(raw));
    std::vector<std::byte> sh(wire::kServerHelloFixedSize);
    MF_RETURN_IF_ERROR(Recv(sh));
    wire::ServerHello server;
    auto r = wire::DecodeServerHello(sh, &server);
    if (!r.ok()) return r.status();
    if (server.status != Code::kOk) return Status(server.status, server.message);
    fabric::Proof proof =
        fabric::ComputeProof(fabric::Secret(secret), fabric::Role::kClient, server.nonce, hello.nonce);
    std::vector<std::byte> payload;
    wire::EncodeProof(proof, &payload);
    wire::FrameHeader h;
    h.opcode = static_cast<uint8_t>(wire::Opcode::kAuth);
    h.payload_length = static_cast<uint32_t>(payload.size());
    MF_RETURN_IF_ERROR(SendFrame(h, payload));
    wire::FrameHeader reply;
    std::vector<std::byte> reply_payload;
    MF_RETURN_IF_ERROR(RecvFrame(&reply, &reply_payload));
    return wire::ReplyStatus(reply, reply_payload);
  }

 private:
  std::unique_ptr<Stream> stream_;
};

// A temporary directory removed at destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "mf_tcp_test.XXXXXX").string();
    char* made = ::mkdtemp(tmpl.data());
    EXPECT_NE(made, nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Makes ca.pem, server.pem + server.key (CN/SAN localhost + 127.0.0.1), client.pem +
// client.key (signed by the same CA) and an unrelated other_ca.pem in dir with the openssl
// CLI. False when openssl fails.
inline bool MakeTestCertificates(const std::filesystem::path& dir) {
  const std::string d = dir.string();
  const std::string script =
      "set -e; cd '" + d +
      "'; "
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=mf-test-ca "
      ">/dev/null 2>&1; "
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout other_ca.key -out other_ca.pem -days 1 "
      "-subj /CN=mf-other-ca >/dev/null 2>&1; "
      "openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost >/dev/null "
      "2>&1; "
      "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > ext.cnf; "
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 "
      "-extfile ext.cnf >/dev/null 2>&1; "
      "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=mf-client >/dev/null "
      "2>&1; "
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 "
      ">/dev/null 2>&1";
  return std::system(script.c_str()) == 0;
}

}  // namespace mf::tcp::testing
