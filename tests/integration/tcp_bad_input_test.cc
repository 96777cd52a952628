// Misbehaving peers against the TCP server: each case must be answered with an error reply
// or a disconnect while a well-behaved client, connected throughout, keeps being served.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "fabric/remote.h"
#include "tests/integration/tcp_test_util.h"

namespace mf::tcp::testing {
namespace {

constexpr uint64_t kRegionSize = 4u << 20;

class TcpBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    ListenOptions lo;
    lo.threads = 2;
    lo.handshake_timeout = std::chrono::milliseconds(1000);
    lo.frame_timeout = std::chrono::milliseconds(500);
    lo.stall_timeout = std::chrono::milliseconds(1000);
    lo.max_output_bytes = 2 * wire::kMaxFrameSize;
    server_ = TestServer::Start(lo);
    ASSERT_NE(server_, nullptr);
    auto client = transports::Connect(server_->url(), ClientOpts());
    ASSERT_TRUE(client.ok()) << client.status().ToString();
    client_ = std::move(client).value();
    fabric::RegionSpec spec;
    spec.name = "good";
    spec.size = kRegionSize;
    ASSERT_TRUE(client_->Create(spec).ok());
    spec.name = "target";
    ASSERT_TRUE(client_->Create(spec).ok());
    fabric::OpenOptions oo;
    oo.writable = true;
    oo.connections = 2;
    auto remote = client_->Open("good", oo);
    ASSERT_TRUE(remote.ok()) << remote.status().ToString();
    good_ = std::move(remote).value();
    ExpectHealthy();
  }

  // The well-behaved client still lists, writes and reads back.
  void ExpectHealthy() {
    std::vector<std::byte> data(64 * 1024);
    FillPattern(data, ++round_);
    uint64_t offset = (round_ * 12345) % (kRegionSize - data.size());
    Status st = fabric::WriteAt(*good_, offset, data);
    ASSERT_TRUE(st.ok()) << st.ToString();
    std::vector<std::byte> back(data.size());
    st = fabric::ReadAt(*good_, offset, back);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_TRUE(back == data);
    auto list = client_->List();
    ASSERT_TRUE(list.ok()) << list.status().ToString();
  }

  // An authenticated raw control connection.
  std::unique_ptr<RawConn> Control() {
    auto c = std::make_unique<RawConn>(server_->port());
    Status st = c->Handshake(wire::Channel::kControl);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return c;
  }

  // Reply to a request sent on c.
  Status Call(RawConn& c, wire::FrameHeader h, std::span<const std::byte> payload = {},
              std::vector<std::byte>* reply_payload = nullptr, wire::FrameHeader* reply = nullptr) {
    h.payload_length = static_cast<uint32_t>(payload.size());
    MF_RETURN_IF_ERROR(c.SendFrame(h, payload));
    wire::FrameHeader r;
    std::vector<std::byte> p;
    MF_RETURN_IF_ERROR(c.RecvFrame(&r, &p));
    if (!r.reply || r.tag != h.tag || r.opcode != h.opcode) return ProtocolError("mismatched reply");
    if (reply) *reply = r;
    if (reply_payload) *reply_payload = p;
    return wire::ReplyStatus(r, p);
  }

  // An authenticated raw data connection attached to an open of "target".
  std::unique_ptr<RawConn> AttachedData(bool writable = false) {
    auto control = Control();
    wire::OpenRequest request{"target", writable};
    std::vector<std::byte> payload;
    wire::EncodeOpenRequest(request, &payload);
    wire::FrameHeader h;
    h.opcode = static_cast<uint8_t>(wire::Opcode::kOpen);
    h.tag = 1;
    std::vector<std::byte> reply;
    Status st = Call(*control, h, payload, &reply);
    EXPECT_TRUE(st.ok()) << st.ToString();
    auto open = wire::DecodeOpenReply(reply);
    EXPECT_TRUE(open.ok());
    auto data = std::make_unique<RawConn>(server_->port());
    st = data->Handshake(wire::Channel::kData);
    EXPECT_TRUE(st.ok()) << st.ToString();
    std::vector<std::byte> token;
    wire::EncodeToken(open->token, &token);
    h.opcode = static_cast<uint8_t>(wire::Opcode::kAttach);
    st = Call(*data, h, token);
    EXPECT_TRUE(st.ok()) << st.ToString();
    return data;
  }

  static wire::FrameHeader Read(uint64_t offset, uint32_t length, uint64_t tag = 7) {
    wire::FrameHeader h;
    h.opcode = static_cast<uint8_t>(wire::Opcode::kRead);
    h.offset = offset;
    h.length = length;
    h.tag = tag;
    return h;
  }

  std::unique_ptr<TestServer> server_;
  std::unique_ptr<fabric::Client> client_;
  std::unique_ptr<fabric::Remote> good_;
  uint64_t round_ = 0;
};

TEST_F(TcpBadInput, GarbageBeforeHandshake) {
  RawConn raw(server_->port());
  std::string http = "GET / HTTP/1.1\r\nHost: memfabric\r\n\r\n";
  MF_ASSERT_OK(raw.Send(std::as_bytes(std::span(http))));
  EXPECT_TRUE(raw.ClosedByServer());
  ExpectHealthy();
}

TEST_F(TcpBadInput, WrongVersionNamesBoth) {
  RawConn raw(server_->port());
  wire::ClientHello hello;
  hello.version = 99;
  std::array<std::byte, wire::kClientHelloSize> bytes{};
  wire::EncodeClientHello(hello, bytes);
  MF_ASSERT_OK(raw.Send(bytes));
  std::vector<std::byte> reply(wire::kServerHelloFixedSize);
  MF_ASSERT_OK(raw.Recv(reply));
  size_t len = static_cast<size_t>(reply[40]) | (static_cast<size_t>(reply[41]) << 8);
  reply.resize(wire::kServerHelloFixedSize + len);
  MF_ASSERT_OK(raw.Recv(std::span(reply).subspan(wire::kServerHelloFixedSize)));
  wire::ServerHello server;
  auto r = wire::DecodeServerHello(reply, &server);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(server.status, Code::kUnsupported);
  EXPECT_NE(server.message.find("version 99"), std::string::npos) << server.message;
  EXPECT_NE(server.message.find(fmt::format("version {}", wire::kVersion)), std::string::npos)
      << server.message;
  EXPECT_TRUE(raw.ClosedByServer());
  ExpectHealthy();
}

TEST_F(TcpBadInput, WrongSecret) {
  RawConn raw(server_->port());
  Status st = raw.Handshake(wire::Channel::kControl, "this is not the secret");
  EXPECT_EQ(st.code(), Code::kUnauthenticated) << st.ToString();
  EXPECT_TRUE(raw.ClosedByServer());
  ExpectHealthy();
}

TEST_F(TcpBadInput, RequestBeforeAuthRevealsNothing) {
  RawConn raw(server_->port());
  wire::ClientHello hello;
  std::array<std::byte, wire::kClientHelloSize> bytes{};
  wire::EncodeClientHello(hello, bytes);
  MF_ASSERT_OK(raw.Send(bytes));
  std::vector<std::byte> sh(wire::kServerHelloFixedSize);
  MF_ASSERT_OK(raw.Recv(sh));
  wire::FrameHeader h;
  h.opcode = static_cast<uint8_t>(wire::Opcode::kList);
  MF_ASSERT_OK(raw.SendFrame(h));
  wire::FrameHeader reply;
  std::vector<std::byte> payload;
  MF_ASSERT_OK(raw.RecvFrame(&reply, &payload));
  EXPECT_EQ(reply.status, Code::kUnauthenticated);
  EXPECT_TRUE(raw.ClosedByServer());
  ExpectHealthy();
}

TEST_F(TcpBadInput, HandshakeTimeout) {
  RawConn raw(server_->port());
  EXPECT_TRUE(raw.ClosedByServer(std::chrono::seconds(5)));
  ExpectHealthy();
}

TEST_F(TcpBadInput, TruncatedFrameTimesOut) {
  auto c = Control();
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  wire::FrameHeader h;
  h.opcode = static_cast<uint8_t>(wire::Opcode::kList);
  wire::EncodeFrameHeader(h, raw);
  MF_ASSERT_OK(c->Send(std::span(raw).first(10)));
  ExpectHealthy();
  auto start = Clock::now();
  EXPECT_TRUE(c->ClosedByServer(std::chrono::seconds(5)));
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));
  ExpectHealthy();
}

TEST_F(TcpBadInput, OversizedLengthRejected) {
  auto c = Control();
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  wire::FrameHeader h;
  h.opcode = static_cast<uint8_t>(wire::Opcode::kCreate);
  wire::EncodeFrameHeader(h, raw);
  raw[4] = raw[5] = raw[6] = std::byte{0xff};
  raw[7] = std::byte{0x7f};  // payload_length 2 GiB
  MF_ASSERT_OK(c->Send(raw));
  EXPECT_TRUE(c->ClosedByServer(std::chrono::seconds(2)));
  ExpectHealthy();
}

TEST_F(TcpBadInput, UnknownOpcodeAnsweredAndConnectionKept) {
  auto c = Control();
  wire::FrameHeader h;
  h.opcode = 0x7f;
  h.tag = 3;
  std::array<std::byte, 5> junk{};
  EXPECT_EQ(Call(*c, h, junk).code(), Code::kUnsupported);
  // Data opcodes are not valid on a control connection either.
  EXPECT_EQ(Call(*c, Read(0, 10)).code(), Code::kInvalidArgument);
  // The connection still works.
  h.opcode = static_cast<uint8_t>(wire::Opcode::kList);
  std::vector<std::byte> reply;
  MF_ASSERT_OK(Call(*c, h, {}, &reply));
  auto list = wire::DecodeRegionList(reply);
  ASSERT_TRUE(list.ok());
  EXPECT_EQ(list->size(), 2u);
  // Malformed payloads of known opcodes are errors, not crashes.
  h.opcode = static_cast<uint8_t>(wire::Opcode::kStat);
  EXPECT_EQ(Call(*c, h, junk).code(), Code::kProtocolError);
  ExpectHealthy();
}

TEST_F(TcpBadInput, ReplyFrameFromClientDropsConnection) {
  auto c = Control();
  wire::FrameHeader h;
  h.opcode = static_cast<uint8_t>(wire::Opcode::kList);
  h.reply = true;
  MF_ASSERT_OK(c->SendFrame(h));
  EXPECT_TRUE(c->ClosedByServer(std::chrono::seconds(2)));
  ExpectHealthy();
}

TEST_F(TcpBadInput, BadOffsetsAndLengths) {
  auto d = AttachedData(/*writable=*/false);
  EXPECT_EQ(Call(*d, Read(kRegionSize, 1)).code(), Code::kOutOfRange);
  EXPECT_EQ(Call(*d, Read(kRegionSize - 10, 11)).code(), Code::kOutOfRange);
  EXPECT_EQ(Call(*d, Read(UINT64_MAX - 10, 100)).code(), Code::kOutOfRange);
  EXPECT_EQ(Call(*d, Read(0, 0)).code(), Code::kInvalidArgument);
  EXPECT_EQ(Call(*d, Read(0, wire::kMaxPayload + 1)).code(), Code::kInvalidArgument);
  wire::FrameHeader w;
  w.opcode = static_cast<uint8_t>(wire::Opcode::kWrite);
  w.offset = UINT64_MAX - 2;
  std::array<std::byte, 16> bytes{};
  EXPECT_EQ(Call(*d, w, bytes).code(), Code::kOutOfRange);
  w.offset = 0;
  EXPECT_EQ(Call(*d, w, bytes).code(), Code::kPermissionDenied);  // read-only open
  w.offset = 0;
  EXPECT_EQ(Call(*d, w).code(), Code::kInvalidArgument);  // WRITE of 0 bytes
  // Still serving valid requests on the same connection.
  std::vector<std::byte> data;
  MF_ASSERT_OK(Call(*d, Read(kRegionSize - 4096, 4096), {}, &data));
  EXPECT_EQ(data.size(), 4096u);
  ExpectHealthy();
}

// FLUSH runs off the worker, yet a connection's requests stay in order.
TEST_F(TcpBadInput, FlushKeepsRequestOrder) {
  auto d = AttachedData(/*writable=*/true);
  std::vector<std::byte> frames;
  wire::FrameHeader flush;
  flush.opcode = static_cast<uint8_t>(wire::Opcode::kFlush);
  flush.tag = 1;
  wire::AppendFrame(flush, {}, &frames);
  wire::AppendFrame(Read(0, 100, 2), {}, &frames);
  wire::AppendFrame(flush, {}, &frames);
  wire::AppendFrame(Read(100, 100, 3), {}, &frames);
  MF_ASSERT_OK(d->Send(frames));
  for (uint64_t want : {1u, 2u, 1u, 3u}) {
    wire::FrameHeader reply;
    std::vector<std::byte> payload;
    MF_ASSERT_OK(d->RecvFrame(&reply, &payload));
    EXPECT_EQ(reply.tag, want);
    EXPECT_EQ(reply.status, Code::kOk);
  }
  ExpectHealthy();
}

TEST_F(TcpBadInput, AttachWithUnknownToken) {
  RawConn raw(server_->port());
  MF_ASSERT_OK(raw.Handshake(wire::Channel::kData));
  wire::Token token{};
  std::vector<std::byte> payload;
  wire::EncodeToken(token, &payload);
  wire::FrameHeader h;
  h.opcode = static_cast<uint8_t>(wire::Opcode::kAttach);
  EXPECT_EQ(Call(raw, h, payload).code(), Code::kNotFound);
  EXPECT_TRUE(raw.ClosedByServer(std::chrono::seconds(2)));
  // A data connection that never attached cannot read.
  RawConn unattached(server_->port());
  MF_ASSERT_OK(unattached.Handshake(wire::Channel::kData));
  EXPECT_EQ(Call(unattached, Read(0, 10)).code(), Code::kInvalidArgument);
  ExpectHealthy();
}

TEST_F(TcpBadInput, ClientThatStopsReadingIsDropped) {
  auto d = AttachedData();
  // Pipeline 1 MiB reads and never read a reply, until the socket stops taking requests.
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  size_t sent = 0;
  auto quiet_since = Clock::now();
  uint64_t tag = 0;
  size_t offset_in_frame = 0;
  while (Clock::now() - quiet_since < std::chrono::milliseconds(300) && sent < 100000) {
    if (offset_in_frame == 0) wire::EncodeFrameHeader(Read(0, wire::kMaxPayload, ++tag), raw);
    auto n = d->stream().WriteSome(std::span(raw).subspan(offset_in_frame));
    if (!n.ok()) break;  // already dropped
    if (*n == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
      continue;
    }
    quiet_since = Clock::now();
    offset_in_frame = (offset_in_frame + *n) % raw.size();
    if (offset_in_frame == 0) ++sent;
  }
  EXPECT_GT(sent, 8u);
  // The server keeps serving others while this one is stuck...
  ExpectHealthy();
  // ...and drops it once it made no progress for the stall timeout.
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_TRUE(d->ClosedByServer(std::chrono::seconds(10)));
  ExpectHealthy();
}

TEST_F(TcpBadInput, DisconnectMidFrame) {
  {
    auto d = AttachedData(/*writable=*/true);
    std::array<std::byte, wire::kFrameHeaderSize> raw{};
    wire::FrameHeader w;
    w.opcode = static_cast<uint8_t>(wire::Opcode::kWrite);
    w.payload_length = wire::kMaxPayload;
    wire::EncodeFrameHeader(w, raw);
    MF_ASSERT_OK(d->Send(raw));
    std::vector<std::byte> part(1000, std::byte{0x5a});
    MF_ASSERT_OK(d->Send(part));
  }  // closed mid-frame
  {
    auto c = Control();
    std::array<std::byte, 7> half{};
    MF_ASSERT_OK(c->Send(half));
  }  // closed mid-header
  ExpectHealthy();
  // The lease of the abandoned writable open was handed back.
  auto deadline = Clock::now() + std::chrono::seconds(3);
  Result<std::unique_ptr<fabric::Remote>> writer = Status(Code::kBusy, "not tried");
  while (Clock::now() < deadline) {
    writer = client_->Open("target", OpenOpts(true, 1));
    if (writer.ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_TRUE(writer.ok()) << writer.status().ToString();
}

}  // namespace
}  // namespace mf::tcp::testing
