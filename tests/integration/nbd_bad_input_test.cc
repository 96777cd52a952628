// nbd::Export facing malformed clients on a unix socket: bad handshake bytes, bad magic,
// oversized option lengths, malformed GO data, unknown exports and commands, requests past
// the end, oversized writes, clients that vanish mid-request or stall. After every case the
// server must have answered or dropped as the spec says, and a witness client connected
// before the case (and a fresh one after it) must still be served.
#include <gtest/gtest.h>

#include <memory>
#include <thread>

#include "fabric/memory_remote.h"
#include "nbd/export.h"
#include "tests/integration/nbd_test_util.h"

namespace mf::nbd {
namespace {

using testing::Bytes;
using testing::RawClient;
using testing::TempDir;

constexpr uint64_t kSize = 16u << 20;

class NbdBadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    region_ = std::make_shared<fabric::MemoryRegion>("disk", kSize);
    remote_ = std::make_unique<fabric::MemoryRemote>(region_, true);
    ExportOptions options;
    options.handshake_timeout = std::chrono::milliseconds(500);
    options.send_timeout = std::chrono::milliseconds(1000);
    options.queue_depth = 8;
    export_ = std::make_unique<Export>(options);
    NBD_ASSERT_OK(export_->Add({"disk", "", remote_.get(), false}));
    socket_ = (dir_.path() / "nbd.sock").string();
    NBD_ASSERT_OK(export_->ListenUnix(socket_));
    witness_ = RawClient::ConnectUnix(socket_);
    NBD_ASSERT_OK(witness_.Negotiate("disk", false));
  }
  void TearDown() override {
    // The witness, connected before the case, is still served ...
    EXPECT_TRUE(witness_.RoundTrip(8192, 4096, 1000, 42).ok());
    // ... and so is a new client.
    RawClient fresh = RawClient::ConnectUnix(socket_);
    EXPECT_TRUE(fresh.Negotiate("disk", true).ok());
    export_->Stop();
  }

  RawClient Client() {
    RawClient c = RawClient::ConnectUnix(socket_);
    EXPECT_TRUE(c.connected());
    return c;
  }
  RawClient Transmitting(bool structured = false) {
    RawClient c = Client();
    EXPECT_TRUE(c.Negotiate("disk", structured).ok());
    return c;
  }

  TempDir dir_;
  std::shared_ptr<fabric::MemoryRegion> region_;
  std::unique_ptr<fabric::MemoryRemote> remote_;
  std::unique_ptr<Export> export_;
  std::string socket_;
  RawClient witness_;
};

TEST_F(NbdBadInputTest, UnknownClientFlagsDrop) {
  RawClient c = Client();
  ASSERT_TRUE(c.ReadGreeting().ok());
  NBD_ASSERT_OK(c.SendClientFlags(kClientFlagFixedNewstyle | (1u << 5)));
  EXPECT_TRUE(c.ClosedByServer());
  EXPECT_GE(export_->stats().protocol_errors, 1u);
}

TEST_F(NbdBadInputTest, GarbageInsteadOfTheHandshake) {
  RawClient c = Client();
  NBD_ASSERT_OK(c.Send(Bytes("GET / HTTP/1.1\r\nHost: x\r\n\r\n")));
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, BadOptionMagicDrops) {
  RawClient c = Client();
  NBD_ASSERT_OK(c.Start());
  std::vector<std::byte> option;
  AppendOption(kOptList, {}, &option);
  option[0] = std::byte{'J'};
  NBD_ASSERT_OK(c.Send(option));
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, OversizedOptionLengths) {
  // Somewhat too long: skipped and answered NBD_REP_ERR_TOO_BIG; the session goes on.
  RawClient c = Client();
  NBD_ASSERT_OK(c.Start());
  NBD_ASSERT_OK(c.SendOption(kOptInfo, std::vector<std::byte>(64u << 10, std::byte{1})));
  auto r = c.ReadOptionReply();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->header.type, kRepErrTooBig);
  auto go = c.Go("disk");
  ASSERT_TRUE(go.ok());
  EXPECT_EQ(*go, kRepAck);
  NBD_ASSERT_OK(c.RoundTrip(0, 512, 1, 1));
  // Absurdly long (4 GiB - 1): a hard disconnect without reading it.
  RawClient d = Client();
  NBD_ASSERT_OK(d.Start());
  std::array<std::byte, kOptionHeaderSize> h{};
  EncodeOptionHeader({kOptGo, 0xffffffffu}, h);
  NBD_ASSERT_OK(d.Send(h));
  EXPECT_TRUE(d.ClosedByServer());
  // EXPORT_NAME longer than any name: it cannot be answered with an error, so a drop.
  RawClient e = Client();
  NBD_ASSERT_OK(e.Start());
  NBD_ASSERT_OK(e.SendOption(kOptExportName, std::vector<std::byte>(kMaxOptionLength + 1, std::byte{'a'})));
  EXPECT_TRUE(e.ClosedByServer());
}

TEST_F(NbdBadInputTest, MalformedGoAndUnknownExports) {
  RawClient c = Client();
  NBD_ASSERT_OK(c.Start());
  // Name length past the data; count past the data; trailing bytes; too short.
  for (std::string_view bad : {std::string_view("\x00\x00\x10\x00disk\x00\x00", 10),
                               std::string_view("\x00\x00\x00\x04"
                                                "disk\x00\x05\x00\x03",
                                                12),
                               std::string_view("\x00\x00\x00\x04"
                                                "disk\x00\x00\x00",
                                                11),
                               std::string_view("\x00\x00", 2)}) {
    NBD_ASSERT_OK(c.SendOption(kOptGo, Bytes(bad)));
    auto r = c.ReadOptionReply();
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->header.type, kRepErrInvalid);
  }
  auto unknown = c.Go("nope");
  ASSERT_TRUE(unknown.ok());
  EXPECT_EQ(*unknown, kRepErrUnknown);
  auto info = c.Go("nope", nullptr, nullptr, kOptInfo);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(*info, kRepErrUnknown);
  // EXPORT_NAME of an unknown export: the spec says to terminate the session.
  NBD_ASSERT_OK(c.SendOption(kOptExportName, Bytes("nope")));
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, TooManyOptionsDrop) {
  RawClient c = Client();
  NBD_ASSERT_OK(c.Start());
  for (int i = 0; i < 200; ++i) {
    if (!c.SendOption(kOptStructuredReply).ok()) break;
    if (!c.ReadOptionReply().ok()) break;
  }
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, SilentClientTimesOutInHandshake) {
  RawClient c = Client();
  EXPECT_TRUE(c.ClosedByServer(std::chrono::seconds(5)));
}

TEST_F(NbdBadInputTest, BadRequestMagicDrops) {
  RawClient c = Transmitting();
  std::array<std::byte, kRequestSize> raw{};
  EncodeRequest({0, kCmdRead, 1, 0, 512}, raw);
  raw[3] = std::byte{0};
  NBD_ASSERT_OK(c.Send(raw));
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, RequestsPastTheEndAndUnknownCommandsAreAnswered) {
  RawClient c = Transmitting();
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 1, kSize - 511, 512}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 2, kSize, 512}, std::vector<std::byte>(512)));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEnospc);
  NBD_ASSERT_OK(c.SendRequest({0, 200, 3, 0, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0xffff, kCmdRead, 4, 0, 512}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.RoundTrip(kSize - 512, 512, 5, 9));  // still in sync after all that
  // Structured: the same errors arrive as error chunks.
  RawClient s = Transmitting(true);
  NBD_ASSERT_OK(s.SendRequest({0, kCmdRead, 6, kSize, 1}));
  auto chunk = s.ReadChunk();
  ASSERT_TRUE(chunk.ok());
  EXPECT_EQ(chunk->first.type, kReplyTypeError);
  EXPECT_EQ(DecodeErrorChunk(chunk->second)->error, kEinval);
}

TEST_F(NbdBadInputTest, HugeWriteDrops) {
  RawClient c = Transmitting();
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 1, 0, 0xfffffff0u}));
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, ClientVanishesMidRequest) {
  remote_->SetDelay(std::chrono::microseconds(1000));
  for (int round = 0; round < 3; ++round) {
    RawClient c = Transmitting(round % 2 == 1);
    for (int i = 0; i < 16; ++i) {
      NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, uint64_t(i), uint64_t(i) << 16, 1u << 20}));
    }
    NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 99, 0, 4096}, std::vector<std::byte>(100)));
    c.Close();  // reads in flight, a write half sent
  }
  remote_->SetDelay(std::chrono::microseconds(0));
  // Mid-handshake too.
  RawClient h = Client();
  NBD_ASSERT_OK(h.Start());
  NBD_ASSERT_OK(h.Send(Bytes("IHAVE")));
  h.Close();
  for (int i = 0; i < 200 && export_->stats().connections_active > 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(export_->stats().connections_active, 1u);  // the witness
}

TEST_F(NbdBadInputTest, ClientThatNeverReadsRepliesIsDropped) {
  RawClient c = Transmitting();
  int buffer = 4096;
  ::setsockopt(c.fd(), SOL_SOCKET, SO_RCVBUF, &buffer, sizeof(buffer));
  // Far more reply bytes than the socket buffers hold; the client reads none of them.
  for (int i = 0; i < 64; ++i) {
    if (!c.SendRequest({0, kCmdRead, uint64_t(i), 0, 4u << 20}).ok()) break;
  }
  // send_timeout (1 s) drops it; meanwhile the witness is served (checked in TearDown).
  for (int i = 0; i < 300 && export_->stats().connections_active > 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(export_->stats().connections_active, 1u);
}

TEST_F(NbdBadInputTest, DiscAnswersInFlightThenCloses) {
  RawClient c = Transmitting();
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 1, 0, 4096}));
  NBD_ASSERT_OK(c.SendRequest({0, kCmdDisc, 2, 0, 0}));
  std::vector<std::byte> data;
  auto r = c.ReadSimpleReply(&data, 4096);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->handle, 1u);
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, AbortIsAcknowledged) {
  RawClient c = Client();
  NBD_ASSERT_OK(c.Start());
  NBD_ASSERT_OK(c.SendOption(kOptAbort, Bytes("ignored")));
  auto r = c.ReadOptionReply();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->header.type, kRepAck);
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdBadInputTest, ConnectionLimit) {
  // The witness and this fixture's clients stay far below the default limit; a separate
  // Export with a limit of one refuses the second client.
  ExportOptions options;
  options.max_connections = 1;
  Export limited(options);
  NBD_ASSERT_OK(limited.Add({"disk", "", remote_.get(), false}));
  const std::string path = (dir_.path() / "limited.sock").string();
  NBD_ASSERT_OK(limited.ListenUnix(path));
  RawClient first = RawClient::ConnectUnix(path);
  NBD_ASSERT_OK(first.Negotiate("disk", false));
  RawClient second = RawClient::ConnectUnix(path);
  EXPECT_TRUE(second.ClosedByServer());
  NBD_ASSERT_OK(first.RoundTrip(0, 512, 1, 2));
  limited.Stop();
}

}  // namespace
}  // namespace mf::nbd
