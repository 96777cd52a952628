// libFuzzer target for the TCP client (transports/tcp) against a hostile server: each input is
// what a fake server on loopback sends back to a real TcpClient. The first byte selects where
// the input starts, so that the fuzzer need not discover a handshake:
//   0: on the control connection, from its first byte (the ServerHello); the client connects
//      and calls LIST, STAT and OPEN (its data connections are closed at once);
//   1: on a data connection: the fake server answers the control hello, OPEN, the data hello
//      and ATTACH properly, then sends the input as the replies to the client's reads, writes
//      and flush.
// After the input the fake server closes its side. The client must neither crash, nor hang,
// nor leak, nor write outside the buffers it was given; every request completes once.
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "fabric/os.h"
#include "fabric/remote.h"
#include "tests/fuzz/fuzz_session.h"
#include "transports/tcp/stream.h"
#include "transports/tcp/tcp_client.h"
#include "transports/tcp/wire.h"

namespace {

using namespace mf;
namespace wire = mf::tcp::wire;

constexpr uint64_t kRegionSize = 1u << 20;
constexpr char kRegionName[] = "r";
// The client's timeouts: short, as the fake server may fall silent.
constexpr auto kClientTimeout = std::chrono::milliseconds(300);
constexpr int kQueueDepth = 4;
constexpr int kAcceptPollMs = 1;
constexpr int kBacklog = 16;

// Reads one frame (header and payload) the client sent; false when it did not.
bool ReadRequest(tcp::Stream& conn, wire::FrameHeader* h, std::vector<std::byte>* payload,
                 tcp::Clock::time_point deadline) {
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  if (!tcp::ReadExact(conn, raw, deadline).ok() || !wire::DecodeFrameHeader(raw, h).ok()) return false;
  payload->resize(h->payload_length);
  return tcp::ReadExact(conn, *payload, deadline).ok();
}

// Answers the client's hello on `conn` with a valid one that asks for no authentication.
bool AnswerHello(tcp::Stream& conn, tcp::Clock::time_point deadline) {
  std::array<std::byte, wire::kClientHelloSize> hello{};
  if (!tcp::ReadExact(conn, hello, deadline).ok()) return false;
  wire::ServerHello reply;
  reply.auth = wire::AuthMode::kNone;
  std::vector<std::byte> out;
  wire::EncodeServerHello(reply, &out);
  return tcp::WriteExact(conn, out, deadline).ok();
}

// Reads one request of `opcode` and answers it OK with `payload`.
bool Answer(tcp::Stream& conn, wire::Opcode opcode, std::span<const std::byte> payload,
            tcp::Clock::time_point deadline) {
  wire::FrameHeader h;
  std::vector<std::byte> request;
  if (!ReadRequest(conn, &h, &request, deadline) || h.opcode != static_cast<uint8_t>(opcode)) return false;
  wire::FrameHeader reply = h;
  reply.reply = true;
  reply.status = Code::kOk;
  reply.payload_length = static_cast<uint32_t>(payload.size());
  reply.offset = 0;
  reply.length = 0;
  std::vector<std::byte> out;
  wire::AppendFrame(reply, payload, &out);
  return tcp::WriteExact(conn, out, deadline).ok();
}

// The fake server: serves one input on its own thread, then closes every connection.
class FakeServer {
 public:
  FakeServer() {
    auto listener = tcp::ListenTcp("127.0.0.1", 0, kBacklog);
    if (!listener.ok()) std::abort();
    listener_ = std::move(listener).value();
    auto port = tcp::LocalPort(listener_.get());
    if (!port.ok()) std::abort();
    port_ = *port;
  }
  uint16_t port() const { return port_; }

  // Starts serving `input` in `mode`; Stop() ends it.
  void Start(uint8_t mode, std::span<const std::byte> input, tcp::Clock::time_point deadline) {
    stop_ = false;
    thread_ = std::thread([this, mode, input, deadline] { Serve(mode, input, deadline); });
  }
  void Stop() {
    stop_ = true;
    thread_.join();
    conns_.clear();
  }

 private:
  // The next connection the client makes, or null once stopped.
  std::unique_ptr<tcp::Stream> Accept(tcp::Clock::time_point deadline) {
    while (!stop_.load()) {
      if (tcp::Clock::now() > deadline) std::abort();  // the client hung
      pollfd p{listener_.get(), POLLIN, 0};
      if (::poll(&p, 1, kAcceptPollMs) <= 0) continue;
      UniqueFd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (fd) return std::make_unique<tcp::Stream>(std::move(fd));
    }
    return nullptr;
  }

  // Mode 1's scripted part: the control hello and OPEN, the data hello and ATTACH.
  // Returns the data connection, or null where the client did not do its part.
  tcp::Stream* OpenScripted(tcp::Clock::time_point deadline) {
    conns_.push_back(Accept(deadline));
    tcp::Stream* control = conns_.back().get();
    wire::OpenReply open;
    open.info.name = kRegionName;
    open.info.size = kRegionSize;
    open.info.generation = 1;
    open.token.fill(0x5a);
    std::vector<std::byte> open_reply;
    wire::EncodeOpenReply(open, &open_reply);
    if (control == nullptr || !AnswerHello(*control, deadline) ||
        !Answer(*control, wire::Opcode::kOpen, open_reply, deadline)) {
      return nullptr;
    }
    conns_.push_back(Accept(deadline));
    tcp::Stream* data = conns_.back().get();
    wire::AttachReply attach{kRegionSize, 1, true};
    std::vector<std::byte> attach_reply;
    wire::EncodeAttachReply(attach, &attach_reply);
    if (data == nullptr || !AnswerHello(*data, deadline) ||
        !Answer(*data, wire::Opcode::kAttach, attach_reply, deadline)) {
      return nullptr;
    }
    return data;
  }

  void Serve(uint8_t mode, std::span<const std::byte> input, tcp::Clock::time_point deadline) {
    tcp::Stream* target = nullptr;
    if (mode == 0) {
      conns_.push_back(Accept(deadline));
      target = conns_.back().get();
      std::array<std::byte, wire::kClientHelloSize> hello{};
      if (target != nullptr && !tcp::ReadExact(*target, hello, deadline).ok()) target = nullptr;
    } else {
      target = OpenScripted(deadline);
    }
    if (target != nullptr) {
      // The input, then EOF; what the client sends meanwhile is read and dropped.
      fuzz::Feed(target->fd(), input, fuzz::StreamEnd::kHalfClose, deadline);
    }
    // Later connections (mode 0's data connections) are closed at once.
    while (auto extra = Accept(deadline)) {
    }
  }

  UniqueFd listener_;
  uint16_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::vector<std::unique_ptr<tcp::Stream>> conns_;  // the serving thread's, until Stop
};

// The client's side of an input: reads, writes and a flush through the opened region.
void DriveData(fabric::Remote& remote, tcp::Clock::time_point deadline) {
  auto buffer = remote.AllocateBuffer(256u << 10);
  if (!buffer.ok()) std::abort();
  std::span<std::byte> mem = buffer->span();
  const std::array<fabric::IoRequest, 6> requests = {{
      {fabric::IoKind::kRead, 0, mem.subspan(0, 4096), &*buffer, nullptr, 0},
      {fabric::IoKind::kRead, 4096, mem.subspan(4096, 64u << 10), &*buffer, nullptr, 1},
      {fabric::IoKind::kRead, kRegionSize - 1, mem.subspan(80u << 10, 1), &*buffer, nullptr, 2},
      {fabric::IoKind::kRead, 512u << 10, mem.subspan(128u << 10, 128u << 10), &*buffer, nullptr, 3},
      {fabric::IoKind::kWrite, 8192, mem.subspan(96u << 10, 4096), &*buffer, nullptr, 4},
      {fabric::IoKind::kWrite, kRegionSize - 4096, mem.subspan(100u << 10, 4096), &*buffer, nullptr, 5},
  }};
  fabric::IoBatch batch(requests.size());
  std::array<fabric::IoRequest, 6> submitted = requests;
  for (fabric::IoRequest& r : submitted) r.callback = &batch;
  remote.Submit(submitted);
  fuzz::WaitUntil([&] { return batch.done(); }, deadline);
  (void)batch.Wait();
  (void)remote.Flush();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static FakeServer* server = [] {
    spdlog::set_level(spdlog::level::off);
    return new FakeServer();  // lives for the process
  }();
  if (size == 0) return 0;
  const auto deadline = fuzz::InputDeadline();
  const uint8_t mode = data[0] & 1;
  server->Start(mode, std::span(reinterpret_cast<const std::byte*>(data) + 1, size - 1), deadline);
  {
    fabric::Url url;
    url.scheme = fabric::Scheme::kTcp;
    url.host = "127.0.0.1";
    url.port = server->port();
    transports::ClientOptions options;  // no secret: the fake server asks for none
    options.connect_timeout = kClientTimeout;
    options.io_timeout = kClientTimeout;
    auto client = tcp::TcpClient::Connect(url, options, false);
    if (client.ok()) {
      if (mode == 0) {
        (void)(*client)->List();
        (void)(*client)->Stat(kRegionName);
      }
      fabric::OpenOptions open;
      open.writable = true;
      open.connections = 1;
      open.queue_depth = kQueueDepth;
      auto remote = (*client)->Open(kRegionName, open);
      if (remote.ok()) {
        DriveData(**remote, deadline);
        (void)(*remote)->Close();
      }
    }
  }
  server->Stop();
  return 0;
}
