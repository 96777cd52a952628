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
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "fabric/os.h"
#include "fabric/server.h"
#include "transports/tcp/stream.h"
#include "transports/tcp/tcp_server.h"
#include "transports/tcp/wire.h"

namespace {

using namespace mf;
namespace wire = mf::tcp::wire;

constexpr uint64_t kRegionSize = 1u << 20;
constexpr char kRegionName[] = "r";
constexpr auto kInputDeadline = std::chrono::seconds(20);
// How long the server may stay silent once a stream is sent before the connection ends.
constexpr auto kQuietTime = std::chrono::milliseconds(2);

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

// A client socket that closes with a reset (no TIME_WAIT: inputs come by the thousand).
UniqueFd Connect(uint16_t port, tcp::Clock::time_point deadline) {
  auto fd = tcp::ConnectTcp("127.0.0.1", port, deadline);
  if (!fd.ok()) std::abort();
  linger abortive{1, 0};
  (void)::setsockopt(fd->get(), SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive));
  return std::move(fd).value();
}

bool SendAll(int fd, std::span<const std::byte> bytes) {
  while (!bytes.empty()) {
    const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (n <= 0) return false;
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
  return true;
}

bool RecvExact(int fd, std::span<std::byte> out, tcp::Clock::time_point deadline) {
  while (!out.empty()) {
    if (!tcp::WaitFd(fd, POLLIN, deadline).ok()) return false;
    const ssize_t n = ::recv(fd, out.data(), out.size(), MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return false;
    if (n > 0) out = out.subspan(static_cast<size_t>(n));
  }
  return true;
}

// Sends a valid hello for `channel` and reads the server's; false if it refused.
bool Hello(int fd, wire::Channel channel, tcp::Clock::time_point deadline) {
  wire::ClientHello hello;
  hello.channel = channel;
  std::array<std::byte, wire::kClientHelloSize> raw{};
  wire::EncodeClientHello(hello, raw);
  if (!SendAll(fd, raw)) return false;
  std::array<std::byte, wire::kServerHelloFixedSize> reply{};
  if (!RecvExact(fd, reply, deadline)) return false;
  wire::ServerHello server;
  auto used = wire::DecodeServerHello(reply, &server);
  return used.ok() && *used == reply.size() && server.status == Code::kOk;
}

// Sends one request frame and reads its reply's payload; false unless the reply is OK.
bool Call(int fd, wire::Opcode opcode, std::span<const std::byte> payload,
          std::vector<std::byte>* reply_payload, tcp::Clock::time_point deadline) {
  wire::FrameHeader h;
  h.opcode = static_cast<uint8_t>(opcode);
  h.payload_length = static_cast<uint32_t>(payload.size());
  std::vector<std::byte> out;
  wire::AppendFrame(h, payload, &out);
  if (!SendAll(fd, out)) return false;
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  if (!RecvExact(fd, raw, deadline)) return false;
  wire::FrameHeader r;
  if (!wire::DecodeFrameHeader(raw, &r).ok() || !r.reply || r.opcode != h.opcode) return false;
  reply_payload->resize(r.payload_length);
  return RecvExact(fd, *reply_payload, deadline) && r.status == Code::kOk;
}

// Opens region "r" on `control` and attaches `data` to that open, each after its hello.
// False where the server refused (the last input's open may still hold the lease).
bool AttachToRegion(int control, int data, bool writable, tcp::Clock::time_point deadline) {
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

// Sends `stream` and reads whatever comes back, until the server closes or has sent
// nothing for kQuietTime after the last byte went out. (No EOF: a server drops the replies
// of a connection whose peer has closed its side, and they would go untested.)
void Feed(int fd, std::span<const std::byte> stream, tcp::Clock::time_point deadline) {
  size_t sent = 0;
  std::array<char, 65536> sink{};
  for (;;) {
    if (tcp::Clock::now() > deadline) std::abort();  // the server hung
    const bool sending = sent < stream.size();
    pollfd p{fd, static_cast<short>(POLLIN | (sending ? POLLOUT : 0)), 0};
    const int ready = ::poll(&p, 1, sending ? 100 : static_cast<int>(kQuietTime.count()));
    if (ready == 0 && !sending) return;  // quiet: the server answered all it will
    if (ready <= 0) continue;
    if ((p.revents & POLLOUT) != 0 && sending) {
      const ssize_t n = ::send(fd, stream.data() + sent, stream.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) sent += static_cast<size_t>(n);
      if (n < 0 && errno != EAGAIN) sent = stream.size();  // the server closed: read the rest
    }
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      const ssize_t n = ::recv(fd, sink.data(), sink.size(), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;  // server closed
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness* harness = new Harness();  // lives for the process
  if (size == 0) return 0;
  const auto deadline = tcp::Clock::now() + kInputDeadline;
  const uint8_t mode = data[0] & 3;
  const std::span<const std::byte> stream(reinterpret_cast<const std::byte*>(data) + 1, size - 1);
  const uint16_t port = harness->tcp->port();
  {
    UniqueFd control;  // modes 2 and 3: the connection that opened the region
    UniqueFd conn = Connect(port, deadline);
    bool ready = true;
    if (mode == 1) {
      ready = Hello(conn.get(), wire::Channel::kControl, deadline);
    } else if (mode >= 2) {
      control = Connect(port, deadline);
      ready = AttachToRegion(control.get(), conn.get(), mode == 3, deadline);
    }
    if (ready) Feed(conn.get(), stream, deadline);
  }
  // The server frees a connection after it has seen it close: wait for all of them, so that
  // this input's allocations are freed when libFuzzer compares them with its frees.
  while (harness->tcp->connections() != 0) {
    if (tcp::Clock::now() > deadline) std::abort();  // the server hung
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  for (const fabric::RegionInfo& info : harness->server->List()) {
    if (info.name != kRegionName) (void)harness->server->Delete(info.name);
  }
  return 0;
}
