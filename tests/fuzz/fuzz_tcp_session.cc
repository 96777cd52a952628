// libFuzzer target for the TCP server's connection state machine (transports/tcp): each
// input is the byte stream of one client connection to a real TcpServer on loopback,
// whose replies are drained until the server closes. The first byte selects where the
// stream starts, so that the fuzzer need not discover a handshake:
//   0: at the very first byte (the ClientHello);
//   1: on a control connection, after a valid hello (LIST, STAT, CREATE, DELETE, OPEN...);
//   2, 3: on a data connection attached to an OPEN of region "r" (3: with the write
//      lease), after a valid hello and ATTACH (READ, WRITE, FLUSH, CLOSE...).
// The server runs insecure (no authentication), so that the streams stay deterministic.
// It must neither crash, nor hang, nor leak; once a connection is gone from its count, all
// it held must be freed. Regions an input created are deleted before the next one.
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <vector>

#include "fabric/os.h"
#include "fabric/server.h"
#include "tests/fuzz/fuzz_session.h"
#include "transports/tcp/stream.h"
#include "transports/tcp/tcp_server.h"
#include "transports/tcp/wire.h"

namespace {

using namespace mf;
namespace wire = mf::tcp::wire;

constexpr uint64_t kRegionSize = 1u << 20;
constexpr char kRegionName[] = "r";

struct Harness {
  Harness() {
    spdlog::set_level(spdlog::level::off);
    fabric::ServerOptions options;
    options.insecure = true;
    server = std::make_unique<fabric::Server>(std::move(options));
    fabric::RegionSpec spec;
    spec.name = kRegionName;
    spec.size = kRegionSize;
    if (!server->Create(spec).ok()) std::abort();
    tcp::ListenOptions listen;
    listen.port = 0;
    listen.threads = 1;
    listen.handshake_timeout = std::chrono::milliseconds(500);
    listen.frame_timeout = std::chrono::milliseconds(500);
    listen.stall_timeout = std::chrono::milliseconds(500);
    listen.attach_timeout = std::chrono::milliseconds(100);
    listen.max_output_bytes = 2 * wire::kMaxFrameSize;
    listen.poll_spin = std::chrono::microseconds(0);
    auto started = tcp::TcpServer::Start(*server, listen);
    if (!started.ok()) std::abort();
    tcp = std::move(started).value();
  }
  std::unique_ptr<fabric::Server> server;
  std::unique_ptr<tcp::TcpServer> tcp;
};

// A client connection that closes with a reset (no TIME_WAIT: inputs come by the thousand).
std::unique_ptr<tcp::Stream> Connect(uint16_t port, tcp::Clock::time_point deadline) {
  auto fd = tcp::ConnectTcp("127.0.0.1", port, deadline);
  if (!fd.ok()) std::abort();
  linger abortive{1, 0};
  (void)::setsockopt(fd->get(), SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
  return std::make_unique<tcp::Stream>(std::move(fd).value());
}

// Sends a valid hello for `channel` and reads the server's; false if it refused.
bool Hello(tcp::Stream& conn, wire::Channel channel, tcp::Clock::time_point deadline) {
  wire::ClientHello hello;
  hello.channel = channel;
  std::array<std::byte, wire::kClientHelloSize> raw{};
  wire::EncodeClientHello(hello, raw);
  if (!tcp::WriteExact(conn, raw, deadline).ok()) return false;
  std::array<std::byte, wire::kServerHelloFixedSize> reply{};
  if (!tcp::ReadExact(conn, reply, deadline).ok()) return false;
  wire::ServerHello server;
  auto used = wire::DecodeServerHello(reply, &server);
  return used.ok() && *used == reply.size() && server.status == Code::kOk;
}

// Sends one request frame and reads its reply's payload; false unless the reply is OK.
bool Call(tcp::Stream& conn, wire::Opcode opcode, std::span<const std::byte> payload,
          std::vector<std::byte>* reply_payload, tcp::Clock::time_point deadline) {
  wire::FrameHeader h;
  h.opcode = static_cast<uint8_t>(opcode);
  h.payload_length = static_cast<uint32_t>(payload.size());
  std::vector<std::byte> out;
  wire::AppendFrame(h, payload, &out);
  if (!tcp::WriteExact(conn, out, deadline).ok()) return false;
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  if (!tcp::ReadExact(conn, raw, deadline).ok()) return false;
  wire::FrameHeader r;
  if (!wire::DecodeFrameHeader(raw, &r).ok() || !r.reply || r.opcode != h.opcode) return false;
  reply_payload->resize(r.payload_length);
  return tcp::ReadExact(conn, *reply_payload, deadline).ok() && r.status == Code::kOk;
}

// Opens region "r" on `control` and attaches `data` to that open, each after its hello.
// False where the server refused (the last input's open may still hold the lease).
bool AttachToRegion(tcp::Stream& control, tcp::Stream& data, bool writable, tcp::Clock::time_point deadline) {
  std::vector<std::byte> request;
  wire::EncodeOpenRequest({kRegionName, writable}, &request);
  std::vector<std::byte> reply;
  if (!Hello(control, wire::Channel::kControl, deadline) ||
      !Call(control, wire::Opcode::kOpen, request, &reply, deadline)) {
    return false;
  }
  auto open = wire::DecodeOpenReply(reply);
  if (!open.ok() || !Hello(data, wire::Channel::kData, deadline)) return false;
  std::vector<std::byte> token;
  wire::EncodeToken(open->token, &token);
  return Call(data, wire::Opcode::kAttach, token, &reply, deadline);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness* harness = new Harness();  // lives for the process
  if (size == 0) return 0;
  const auto deadline = fuzz::InputDeadline();
  const uint8_t mode = data[0] & 3;
  const std::span<const std::byte> stream(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  const uint16_t port = harness->tcp->port();
  {
    std::unique_ptr<tcp::Stream> control;  // modes 2 and 3: the connection that opened the region
    std::unique_ptr<tcp::Stream> conn = Connect(port, deadline);
    bool ready = true;
    if (mode == 1) {
      ready = Hello(*conn, wire::Channel::kControl, deadline);
    } else if (mode >= 2) {
      control = Connect(port, deadline);
      ready = AttachToRegion(*control, *conn, mode == 3, deadline);
    }
    if (ready) fuzz::Feed(conn->fd(), stream, fuzz::StreamEnd::kQuiet, deadline);
  }
  // The server frees a connection after it has seen it close.
  fuzz::WaitUntil([&] { return harness->tcp->connections() == 0; }, deadline);
  for (const fabric::RegionInfo& info : harness->server->List()) {
    if (info.name != kRegionName) (void)harness->server->Delete(info.name);
  }
  return 0;
}
