// nbd::Export over a MemoryRemote, driven through ServeConnection on a socketpair by a raw
// client: negotiation replies, every command's semantics and error codes, request
// splitting at the Remote's max_transfer, the shared large buffer, injected I/O errors,
// the handshake deadline, and Stop answering the requests in flight.
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <thread>

#include "fabric/memory_remote.h"
#include "nbd/export.h"
#include "tests/integration/nbd_test_util.h"

namespace mf::nbd {
namespace {

using testing::Bytes;
using testing::RawClient;

constexpr uint64_t kSize = 8u << 20;
constexpr size_t kMaxTransfer = 64u << 10;  // small, so requests get split

class NbdExportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    region_ = std::make_shared<fabric::MemoryRegion>("disk", kSize);
    remote_ = std::make_unique<fabric::MemoryRemote>(region_, true, kMaxTransfer);
    ro_region_ = std::make_shared<fabric::MemoryRegion>("ro", 1u << 20);
    for (size_t i = 0; i < ro_region_->bytes().size(); ++i)
      ro_region_->bytes()[i] = static_cast<std::byte>(i);
    ro_remote_ = std::make_unique<fabric::MemoryRemote>(ro_region_, false);
    ExportOptions options;
    options.queue_depth = 4;
    options.slot_buffer_size = 128u << 10;
    options.max_block_size = 4u << 20;
    export_ = std::make_unique<Export>(options);
    NBD_ASSERT_OK(export_->Add({"disk", "the test disk", remote_.get(), false}));
    NBD_ASSERT_OK(export_->Add({"ro", "", ro_remote_.get(), false}));
  }
  void TearDown() override { export_->Stop(); }

  RawClient Connect() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    EXPECT_TRUE(export_->ServeConnection(UniqueFd(sv[0])).ok());
    return RawClient(UniqueFd(sv[1]));
  }

  std::shared_ptr<fabric::MemoryRegion> region_;
  std::unique_ptr<fabric::MemoryRemote> remote_;
  std::shared_ptr<fabric::MemoryRegion> ro_region_;
  std::unique_ptr<fabric::MemoryRemote> ro_remote_;
  std::unique_ptr<Export> export_;
};

TEST_F(NbdExportTest, AddRejectsBadSpecs) {
  EXPECT_EQ(export_->Add({"disk", "", remote_.get(), false}).code(), Code::kAlreadyExists);
  EXPECT_EQ(export_->Add({"x", "", nullptr, false}).code(), Code::kInvalidArgument);
  EXPECT_EQ(export_->Add({std::string(5000, 'x'), "", remote_.get(), false}).code(), Code::kInvalidArgument);
  for (uint32_t max_block : {uint32_t{1024}, kMaxMaxBlockSize + 1, uint32_t{0xffffffff}}) {
    ExportOptions options;
    options.max_block_size = max_block;
    Export e(options);
    EXPECT_EQ(e.Add({"disk", "", remote_.get(), false}).code(), Code::kInvalidArgument) << max_block;
  }
}

TEST_F(NbdExportTest, GreetingAndGoInfo) {
  RawClient c = Connect();
  auto g = c.ReadGreeting();
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->handshake_flags, kFlagFixedNewstyle | kFlagNoZeroes);
  NBD_ASSERT_OK(c.SendClientFlags(kClientFlagFixedNewstyle | kClientFlagNoZeroes));
  // INFO with NAME and DESCRIPTION requested.
  NBD_ASSERT_OK(
      c.SendOption(kOptInfo, EncodeInfoRequest({"disk", {kInfoName, kInfoDescription, kInfoBlockSize}})));
  bool saw_export = false, saw_block = false, saw_name = false, saw_description = false;
  for (;;) {
    auto r = c.ReadOptionReply();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->header.option, kOptInfo);
    if (r->header.type == kRepAck) break;
    ASSERT_EQ(r->header.type, kRepInfo);
    const uint16_t type = LoadBe16(r->data.data());
    if (type == kInfoExport) {
      auto e = DecodeInfoExport(r->data);
      ASSERT_TRUE(e.ok());
      EXPECT_EQ(e->first, kSize);
      const uint16_t want = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxSendWriteZeroes |
                            kTxSendFastZero | kTxSendCache | kTxCanMultiConn;
      EXPECT_EQ(e->second, want);
      saw_export = true;
    } else if (type == kInfoBlockSize) {
      auto b = DecodeInfoBlockSize(r->data);
      ASSERT_TRUE(b.ok());
      EXPECT_EQ(b->minimum, 1u);
      EXPECT_EQ(b->preferred, 4096u);
      EXPECT_EQ(b->maximum, 4u << 20);
      saw_block = true;
    } else if (type == kInfoName) {
      EXPECT_EQ(std::string(reinterpret_cast<const char*>(r->data.data()) + 2, r->data.size() - 2), "disk");
      saw_name = true;
    } else if (type == kInfoDescription) {
      saw_description = true;
    }
  }
  EXPECT_TRUE(saw_export && saw_block && saw_name && saw_description);
  // Read-only export: flags say so; GO enters transmission.
  uint64_t size = 0;
  uint16_t flags = 0;
  auto final_type = c.Go("ro", &size, &flags);
  ASSERT_TRUE(final_type.ok());
  EXPECT_EQ(*final_type, kRepAck);
  EXPECT_EQ(size, 1u << 20);
  EXPECT_EQ(flags, kTxHasFlags | kTxReadOnly | kTxSendFlush | kTxSendCache | kTxCanMultiConn);
  std::vector<std::byte> data;
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 1, 4096, 16}));
  auto r = c.ReadSimpleReply(&data, 16);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->error, 0u);
  EXPECT_EQ(data[1], std::byte{1});
  // Writes, trims and zeroes on a read-only export: EPERM.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 2, 0, 4}, Bytes("abcd")));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEperm);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdTrim, 3, 0, 4096}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEperm);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWriteZeroes, 4, 0, 4096}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEperm);
  EXPECT_EQ(ro_region_->bytes()[0], std::byte{0});
  EXPECT_EQ(ro_region_->bytes()[1], std::byte{1});
}

TEST_F(NbdExportTest, ExportNameWithAndWithoutZeroes) {
  for (bool no_zeroes : {true, false}) {
    RawClient c = Connect();
    NBD_ASSERT_OK(c.Start(kClientFlagFixedNewstyle | (no_zeroes ? kClientFlagNoZeroes : 0)));
    NBD_ASSERT_OK(c.SendOption(kOptExportName, Bytes("disk")));
    std::vector<std::byte> reply(kExportNameReplySize + (no_zeroes ? 0 : kExportNameZeroes));
    NBD_ASSERT_OK(c.Recv(reply));
    EXPECT_EQ(LoadBe64(reply.data()), kSize);
    EXPECT_NE(LoadBe16(reply.data() + 8) & kTxHasFlags, 0);
    NBD_ASSERT_OK(c.RoundTrip(100, 1000, 10, 3));
  }
  // The empty name is the default (first) export.
  RawClient d = Connect();
  NBD_ASSERT_OK(d.Start());
  NBD_ASSERT_OK(d.SendOption(kOptExportName, {}));
  std::vector<std::byte> reply(kExportNameReplySize);
  NBD_ASSERT_OK(d.Recv(reply));
  EXPECT_EQ(LoadBe64(reply.data()), kSize);
}

TEST_F(NbdExportTest, ListAbortUnsupportedAndUnknown) {
  RawClient c = Connect();
  NBD_ASSERT_OK(c.Start());
  NBD_ASSERT_OK(c.SendOption(kOptList));
  std::vector<std::string> names;
  for (;;) {
    auto r = c.ReadOptionReply();
    ASSERT_TRUE(r.ok());
    if (r->header.type == kRepAck) break;
    ASSERT_EQ(r->header.type, kRepServer);
    const uint32_t n = LoadBe32(r->data.data());
    names.emplace_back(reinterpret_cast<const char*>(r->data.data()) + 4, n);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"disk", "ro"}));
  NBD_ASSERT_OK(c.SendOption(kOptList, Bytes("x")));
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepErrInvalid);
  for (uint32_t option : {kOptStartTls, kOptPeekExport, 11u, 0u, 0xffffu}) {
    NBD_ASSERT_OK(c.SendOption(option, Bytes("whatever")));
    auto r = c.ReadOptionReply();
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->header.option, option);
    EXPECT_EQ(r->header.type, kRepErrUnsup);
  }
  NBD_ASSERT_OK(c.SendOption(kOptStructuredReply, Bytes("x")));
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepErrInvalid);
  auto unknown = c.Go("nope");
  ASSERT_TRUE(unknown.ok());
  EXPECT_EQ(*unknown, kRepErrUnknown);
  NBD_ASSERT_OK(c.SendOption(kOptGo, Bytes(std::string_view("\xff\xff\xff\xff\x00\x00", 6))));
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepErrInvalid);
  NBD_ASSERT_OK(c.SendOption(kOptAbort));
  auto ack = c.ReadOptionReply();
  ASSERT_TRUE(ack.ok());
  EXPECT_EQ(ack->header.type, kRepAck);
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdExportTest, CommandsWithSimpleReplies) {
  RawClient c = Connect();
  NBD_ASSERT_OK(c.Negotiate("disk", false));
  // Splitting at max_transfer (64 KiB) and the large buffer (> 128 KiB slot buffers).
  NBD_ASSERT_OK(c.RoundTrip(0, 1, 1, 1));
  NBD_ASSERT_OK(c.RoundTrip(kSize - 1, 1, 3, 2));
  NBD_ASSERT_OK(c.RoundTrip(12345, 200000, 5, 3));
  NBD_ASSERT_OK(c.RoundTrip(kSize - (3u << 20), 3u << 20, 7, 4));
  // Past the end: read/trim/cache EINVAL, write/zero ENOSPC (write payload is drained).
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 10, kSize, 1}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 11, kSize - 1, 2}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 12, ~0ull - 1, 4}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 13, kSize - 2, 4}, Bytes("wxyz")));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEnospc);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdTrim, 14, kSize, 1}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWriteZeroes, 15, kSize, 1}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEnospc);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdCache, 16, kSize, 1}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  // At the end with length 0: fine, for every command that takes a range; one byte further
  // is past the end. Zero-length requests change nothing.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 17, kSize, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  region_->bytes()[100] = std::byte{0x77};
  for (uint64_t offset : {uint64_t{100}, kSize}) {
    NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 40, offset, 0}));
    EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
    NBD_ASSERT_OK(c.SendRequest({kCmdFlagFua, kCmdTrim, 41, offset, 0}));
    EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
    NBD_ASSERT_OK(c.SendRequest({0, kCmdWriteZeroes, 42, offset, 0}));
    EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
    NBD_ASSERT_OK(c.SendRequest({0, kCmdCache, 43, offset, 0}));
    EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  }
  EXPECT_EQ(region_->bytes()[100], std::byte{0x77});
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 44, kSize + 1, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEnospc);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdTrim, 45, kSize + 1, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWriteZeroes, 46, kSize + 1, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEnospc);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdCache, 47, kSize + 1, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  // Oversized read: EINVAL; oversized write: EINVAL after draining the payload.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 18, 0, (4u << 20) + 1}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 19, 0, (4u << 20) + 1}, std::vector<std::byte>((4u << 20) + 1)));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  // Unknown command, unknown flags, flags on the wrong command, flush with a range.
  NBD_ASSERT_OK(c.SendRequest({0, 42, 20, 0, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({1u << 9, kCmdRead, 21, 0, 1}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagDf, kCmdRead, 22, 0, 1}));  // DF needs structured replies
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagNoHole, kCmdWrite, 23, 0, 1}, Bytes("q")));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdFlush, 24, 1, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdBlockStatus, 25, 0, 4096}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEinval);
  // Flush, FUA write, cache.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdFlush, 26, 0, 0}));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagFua, kCmdWrite, 27, 8, 3}, Bytes("fua")));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  EXPECT_EQ(region_->bytes()[8], std::byte{'f'});
  NBD_ASSERT_OK(c.SendRequest({0, kCmdCache, 28, 0, 4096}));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  // WRITE_ZEROES zeroes the range (also beyond the zero buffer and max_transfer);
  // FAST_ZERO fails with ENOTSUP and leaves the data alone.
  for (auto& b : region_->bytes()) b = std::byte{0x5a};
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagFastZero, kCmdWriteZeroes, 29, 0, 4096}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEnotsup);
  EXPECT_EQ(region_->bytes()[0], std::byte{0x5a});
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagNoHole | kCmdFlagFua, kCmdWriteZeroes, 30, 1, (3u << 20)}));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  EXPECT_EQ(region_->bytes()[0], std::byte{0x5a});
  EXPECT_EQ(region_->bytes()[1], std::byte{0});
  EXPECT_EQ(region_->bytes()[3u << 20], std::byte{0});
  EXPECT_EQ(region_->bytes()[(3u << 20) + 1], std::byte{0x5a});
  // TRIM succeeds without any I/O: it discards nothing, so the data reads back unchanged.
  const uint64_t served = remote_->requests_served();
  NBD_ASSERT_OK(c.SendRequest({0, kCmdTrim, 31, 5u << 20, kSize - (5u << 20)}));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagFua, kCmdTrim, 33, 0, kSize}));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  EXPECT_EQ(remote_->requests_served(), served);
  EXPECT_EQ(region_->bytes()[0], std::byte{0x5a});
  EXPECT_EQ(region_->bytes()[1], std::byte{0});
  EXPECT_EQ(region_->bytes()[(5u << 20) - 1], std::byte{0x5a});
  EXPECT_EQ(region_->bytes()[5u << 20], std::byte{0x5a});
  EXPECT_EQ(region_->bytes()[kSize - 1], std::byte{0x5a});
  // DISC: the server closes after answering what was in flight.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdDisc, 32, 0, 0}));
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdExportTest, StructuredRepliesAndPipelining) {
  RawClient c = Connect();
  NBD_ASSERT_OK(c.Negotiate("disk", true));
  for (size_t i = 0; i < 300000; ++i) region_->bytes()[i] = static_cast<std::byte>(i * 13);
  // Pipeline more requests than slots; every handle gets exactly one final reply.
  constexpr int kRequests = 20;
  for (int i = 0; i < kRequests; ++i) {
    NBD_ASSERT_OK(
        c.SendRequest({kCmdFlagDf, kCmdRead, 100u + static_cast<uint64_t>(i), uint64_t(i) * 1000, 200000}));
  }
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 99, kSize, 1}));  // error chunk
  std::vector<bool> seen(kRequests, false);
  bool saw_error = false;
  for (int n = 0; n < kRequests + 1; ++n) {
    auto chunk = c.ReadChunk();
    ASSERT_TRUE(chunk.ok()) << chunk.status().ToString();
    auto& [h, payload] = *chunk;
    EXPECT_EQ(h.flags, kReplyFlagDone);
    if (h.handle == 99) {
      ASSERT_EQ(h.type, kReplyTypeError);
      auto e = DecodeErrorChunk(payload);
      ASSERT_TRUE(e.ok());
      EXPECT_EQ(e->error, kEinval);
      EXPECT_FALSE(e->message.empty());
      saw_error = true;
      continue;
    }
    ASSERT_EQ(h.type, kReplyTypeOffsetData);
    const uint64_t i = h.handle - 100;
    ASSERT_LT(i, uint64_t{kRequests});
    EXPECT_FALSE(seen[i]);
    seen[i] = true;
    EXPECT_EQ(LoadBe64(payload.data()), i * 1000);
    ASSERT_EQ(payload.size(), 8u + 200000);
    EXPECT_EQ(payload[8 + 77], static_cast<std::byte>((i * 1000 + 77) * 13));
  }
  EXPECT_TRUE(saw_error);
  // Zero-length read: a NONE chunk. Writes answer with simple replies.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 7, 0, 0}));
  auto none = c.ReadChunk();
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->first.type, kReplyTypeNone);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 8, 0, 2}, Bytes("hi")));
  EXPECT_EQ(c.ReadSimpleReply()->error, 0u);
  // Non-read errors come as error chunks.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 9, kSize, 2}, Bytes("hi")));
  auto err = c.ReadChunk();
  ASSERT_TRUE(err.ok());
  EXPECT_EQ(err->first.type, kReplyTypeError);
  EXPECT_EQ(DecodeErrorChunk(err->second)->error, kEnospc);
}

TEST_F(NbdExportTest, RemoteErrorsBecomeEio) {
  RawClient c = Connect();
  NBD_ASSERT_OK(c.Negotiate("disk", false));
  remote_->FailNext(1, Status(Code::kIoError, "injected"));
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 1, 0, 4096}));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEio);
  remote_->FailNext(2, Status(Code::kUnavailable, "injected"));
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 2, 0, 200000}, std::vector<std::byte>(200000)));
  EXPECT_EQ(c.ReadSimpleReply()->error, kEio);
  NBD_ASSERT_OK(c.RoundTrip(0, 4096, 3, 9));
  EXPECT_EQ(export_->stats().request_errors, 2u);
}

TEST_F(NbdExportTest, BaseAllocationBlockStatus) {
  RawClient c = Connect();
  NBD_ASSERT_OK(c.Start());
  // Before structured replies: refused.
  NBD_ASSERT_OK(c.SendOption(kOptSetMetaContext, EncodeMetaContextRequest({"disk", {"base:allocation"}})));
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepErrInvalid);
  NBD_ASSERT_OK(c.SendOption(kOptStructuredReply));
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepAck);
  // LIST with no query, "base:" and an unknown namespace; SET ignores "base:".
  struct Case {
    uint32_t option;
    std::vector<std::string> queries;
    bool listed;
  };
  for (const Case& k :
       {Case{kOptListMetaContext, {}, true}, Case{kOptListMetaContext, {"base:"}, true},
        Case{kOptListMetaContext, {"x-foo:bar"}, false}, Case{kOptSetMetaContext, {"base:"}, false},
        Case{kOptSetMetaContext, {"x-foo:bar", "base:allocation"}, true}}) {
    NBD_ASSERT_OK(c.SendOption(k.option, EncodeMetaContextRequest({"disk", k.queries})));
    auto r = c.ReadOptionReply();
    ASSERT_TRUE(r.ok());
    if (k.listed) {
      ASSERT_EQ(r->header.type, kRepMetaContext);
      EXPECT_EQ(std::string(reinterpret_cast<const char*>(r->data.data()) + 4, r->data.size() - 4),
                "base:allocation");
      r = c.ReadOptionReply();
      ASSERT_TRUE(r.ok());
    }
    EXPECT_EQ(r->header.type, kRepAck);
  }
  // Malformed data and unknown exports.
  NBD_ASSERT_OK(c.SendOption(kOptSetMetaContext, Bytes(std::string_view("\x00\x00\x00\x09disk", 8))));
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepErrInvalid);
  NBD_ASSERT_OK(c.SendOption(kOptListMetaContext, EncodeMetaContextRequest({"nope", {}})));
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepErrUnknown);
  // The failed SET above cleared the selection: select again, then GO.
  NBD_ASSERT_OK(c.SendOption(kOptSetMetaContext, EncodeMetaContextRequest({"disk", {"base:allocation"}})));
  auto selected = c.ReadOptionReply();
  ASSERT_TRUE(selected.ok());
  ASSERT_EQ(selected->header.type, kRepMetaContext);
  const uint32_t id = LoadBe32(selected->data.data());
  EXPECT_EQ(c.ReadOptionReply()->header.type, kRepAck);
  ASSERT_EQ(*c.Go("disk"), kRepAck);
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagReqOne, kCmdBlockStatus, 5, 4096, 65536}));
  auto chunk = c.ReadChunk();
  ASSERT_TRUE(chunk.ok());
  EXPECT_EQ(chunk->first.type, kReplyTypeBlockStatus);
  EXPECT_EQ(chunk->first.flags, kReplyFlagDone);
  ASSERT_EQ(chunk->second.size(), 12u);
  EXPECT_EQ(LoadBe32(chunk->second.data()), id);
  EXPECT_EQ(LoadBe32(chunk->second.data() + 4), 65536u);
  EXPECT_EQ(LoadBe32(chunk->second.data() + 8), 0u);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdBlockStatus, 6, kSize, 1}));
  auto err = c.ReadChunk();
  ASSERT_TRUE(err.ok());
  EXPECT_EQ(err->first.type, kReplyTypeError);
}

TEST_F(NbdExportTest, ClientVanishingMidRequestLeavesOthersServed) {
  RawClient witness = Connect();
  NBD_ASSERT_OK(witness.Negotiate("disk", false));
  remote_->SetDelay(std::chrono::microseconds(2000));
  {
    RawClient c = Connect();
    NBD_ASSERT_OK(c.Negotiate("disk", false));
    for (int i = 0; i < 8; ++i) NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, uint64_t(i), 0, 1u << 20}));
    NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 9, 0, 1u << 20}, std::vector<std::byte>(1000)));
  }  // closed with reads in flight and a write half sent
  remote_->SetDelay(std::chrono::microseconds(0));
  NBD_ASSERT_OK(witness.RoundTrip(4096, 4096, 1, 5));
  for (int i = 0; i < 100 && export_->stats().connections_active != 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(export_->stats().connections_active, 1u);
}

TEST_F(NbdExportTest, StopDisconnectsClients) {
  RawClient c = Connect();
  NBD_ASSERT_OK(c.Negotiate("disk", false));
  RawClient h = Connect();  // still in the handshake
  export_->Stop();
  EXPECT_TRUE(c.ClosedByServer());
  EXPECT_TRUE(h.ClosedByServer());
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  ::close(sv[1]);
  EXPECT_EQ(export_->ServeConnection(UniqueFd(sv[0])).code(), Code::kAborted);
}

// A client trickling its handshake (each byte well within handshake_timeout of the last)
// is dropped once the whole handshake has taken handshake_timeout; others are served.
TEST_F(NbdExportTest, HandshakeTimeoutIsADeadline) {
  constexpr auto kTimeout = std::chrono::milliseconds(600);
  constexpr auto kByteInterval = kTimeout * 2 / 5;
  ExportOptions options;
  options.handshake_timeout = kTimeout;
  Export exporter(options);
  NBD_ASSERT_OK(exporter.Add({"disk", "", remote_.get(), false}));
  auto connect = [&exporter] {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    EXPECT_TRUE(exporter.ServeConnection(UniqueFd(sv[0])).ok());
    return RawClient(UniqueFd(sv[1]));
  };
  const auto start = std::chrono::steady_clock::now();
  RawClient slow = connect();
  NBD_ASSERT_OK(slow.Start());
  std::vector<std::byte> option;  // 26 bytes: > 10 s at this pace
  AppendOption(kOptInfo, EncodeInfoRequest({"disk", {}}), &option);
  bool closed = false;
  bool other_served = false;
  for (size_t i = 0; i < option.size() && !closed; ++i) {
    closed = !slow.Send(std::span(option).subspan(i, 1)).ok() || slow.ClosedByServer(kByteInterval);
    if (!other_served) {
      RawClient other = connect();
      NBD_ASSERT_OK(other.Negotiate("disk", false));
      NBD_ASSERT_OK(other.RoundTrip(0, 4096, 1, 3));
      other_served = true;
    }
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_TRUE(closed);
  EXPECT_GE(elapsed, kTimeout);
  EXPECT_LT(elapsed, kTimeout + std::chrono::seconds(1));
}

// Stop answers the requests in flight (a FUA write's too) before it closes the connection.
// A Remote over MemoryRemote that holds the first write at `offset` for `delay` on a thread
// of its own, completing it after writes that came later, as a Remote with several
// connections or workers can.
class DelayOneWriteRemote final : public fabric::Remote {
 public:
  DelayOneWriteRemote(std::shared_ptr<fabric::MemoryRegion> region, uint64_t offset,
                      std::chrono::milliseconds delay)
      : inner_(std::move(region), true), offset_(offset), delay_(delay) {}
  ~DelayOneWriteRemote() override {
    if (held_.joinable()) held_.join();
  }
  const fabric::RegionInfo& info() const override { return inner_.info(); }
  bool writable() const override { return true; }
  std::string_view transport() const override { return "delay-one-write"; }
  size_t max_transfer() const override { return inner_.max_transfer(); }
  Result<fabric::Buffer> AllocateBuffer(size_t size) override { return inner_.AllocateBuffer(size); }
  void Submit(std::span<const fabric::IoRequest> requests) override {
    for (const fabric::IoRequest& r : requests) {
      if (r.kind == fabric::IoKind::kWrite && r.offset == offset_ && !held_.joinable()) {
        held_ = std::thread([this, r] {
          std::this_thread::sleep_for(delay_);
          inner_.Submit({&r, 1});
        });
        continue;
      }
      inner_.Submit({&r, 1});
    }
  }
  Status Flush() override { return inner_.Flush(); }
  Status Close() override { return inner_.Close(); }

 private:
  fabric::MemoryRemote inner_;
  const uint64_t offset_;
  const std::chrono::milliseconds delay_;
  std::thread held_;  // Submit runs on one connection's reader at a time for this offset
};

// The kernel re-sends a request it timed out on another connection, while the first copy
// may still be in flight at the Remote, and acknowledges the re-sent copy. That first copy
// must not land after it, nor after a write the program made once it was acknowledged.
TEST_F(NbdExportTest, WriteResentOnAnotherConnectionNeverLandsAfterIt) {
  DelayOneWriteRemote slow(region_, 4096, std::chrono::milliseconds(400));
  Export exporter;
  NBD_ASSERT_OK(exporter.Add({"disk", "", &slow, false}));
  auto connect = [&exporter] {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    EXPECT_TRUE(exporter.ServeConnection(UniqueFd(sv[0])).ok());
    return RawClient(UniqueFd(sv[1]));
  };
  RawClient timed_out = connect();
  RawClient retry = connect();
  NBD_ASSERT_OK(timed_out.Negotiate("disk", false));
  NBD_ASSERT_OK(retry.Negotiate("disk", false));
  NBD_ASSERT_OK(timed_out.SendRequest({0, kCmdWrite, 1, 4096, 4}, Bytes("AAAA")));  // held at the Remote
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  NBD_ASSERT_OK(retry.SendRequest({0, kCmdWrite, 2, 4096, 4}, Bytes("AAAA")));  // the re-sent copy
  auto resent = retry.ReadSimpleReply();
  ASSERT_TRUE(resent.ok()) << resent.status().ToString();
  EXPECT_EQ(resent->error, 0u);
  NBD_ASSERT_OK(retry.SendRequest({kCmdFlagFua, kCmdWrite, 3, 4096, 4}, Bytes("BBBB")));
  auto newer = retry.ReadSimpleReply();
  ASSERT_TRUE(newer.ok()) << newer.status().ToString();
  EXPECT_EQ(newer->error, 0u);
  auto stale = timed_out.ReadSimpleReply();
  ASSERT_TRUE(stale.ok()) << stale.status().ToString();
  EXPECT_EQ(std::memcmp(region_->data() + 4096, "BBBB", 4), 0);
  exporter.Stop();
}

// The kernel's NBD driver gives up on a connection (its I/O timeout) by shutting it down,
// and re-sends what was unanswered on another one. A write it had sent that the Export
// reads from the socket only afterwards (the reader was waiting for a slot) must not land:
// the re-sent copy, and writes made since, may already have.
TEST_F(NbdExportTest, WriteReadAfterTheKernelHungUpIsNotApplied) {
  DelayOneWriteRemote slow(region_, 0, std::chrono::milliseconds(300));
  ExportOptions options;
  options.queue_depth = 1;  // the second write waits, unread, for the first one's slot
  Export exporter(options);
  NBD_ASSERT_OK(exporter.Add({"disk", "", &slow, false}));
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  NBD_ASSERT_OK(exporter.ServeTransmission(UniqueFd(sv[0]), "disk"));
  RawClient kernel{UniqueFd(sv[1])};
  NBD_ASSERT_OK(kernel.SendRequest({0, kCmdWrite, 1, 0, 4}, Bytes("AAAA")));  // held at the Remote
  NBD_ASSERT_OK(kernel.SendRequest({0, kCmdWrite, 2, 8192, 4}, Bytes("SSSS")));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_EQ(::shutdown(kernel.fd(), SHUT_RDWR), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the first write completes
  exporter.Stop();
  EXPECT_EQ(std::memcmp(region_->data(), "AAAA", 4), 0);
  EXPECT_NE(std::memcmp(region_->data() + 8192, "SSSS", 4), 0) << "a write read after the hang-up landed";
}

TEST_F(NbdExportTest, StopAnswersRequestsInFlight) {
  RawClient c = Connect();
  NBD_ASSERT_OK(c.Negotiate("disk", false));
  for (size_t i = 0; i < 4096; ++i) region_->bytes()[i] = std::byte{0x33};
  remote_->SetDelay(std::chrono::milliseconds(150));  // each Remote request
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagFua, kCmdWrite, 1, 8192, 4}, Bytes("late")));
  NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, 2, 0, 4096}));
  NBD_ASSERT_OK(c.SendRequest({kCmdFlagFua, kCmdWrite, 3, 12288, 4}, Bytes("last")));
  NBD_ASSERT_OK(c.SendRequest({0, kCmdFlush, 4, 0, 0}));
  for (int i = 0; i < 400 && export_->stats().requests < 4; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(export_->stats().requests, 4u);  // all read, the Remote requests still queued
  std::thread stopper([this] { export_->Stop(); });
  std::vector<bool> answered(5, false);
  for (int n = 0; n < 4; ++n) {
    std::array<std::byte, kSimpleReplySize> raw{};
    Status received = c.Recv(raw);
    ASSERT_TRUE(received.ok()) << "reply " << n << ": " << received.ToString();
    auto reply = DecodeSimpleReply(raw);
    ASSERT_TRUE(reply.ok());
    EXPECT_EQ(reply->error, 0u) << reply->handle;
    ASSERT_TRUE(reply->handle >= 1 && reply->handle <= 4);
    EXPECT_FALSE(answered[reply->handle]);
    answered[reply->handle] = true;
    if (reply->handle == 2) {
      std::vector<std::byte> data(4096);
      NBD_ASSERT_OK(c.Recv(data));
      EXPECT_EQ(data[4095], std::byte{0x33});
    }
  }
  EXPECT_TRUE(c.ClosedByServer());
  stopper.join();
  remote_->SetDelay(std::chrono::microseconds(0));
  EXPECT_EQ(std::memcmp(region_->data() + 8192, "late", 4), 0);
  EXPECT_EQ(std::memcmp(region_->data() + 12288, "last", 4), 0);
}

// During Stop, options still get NBD_REP_ERR_SHUTDOWN, but EXPORT_NAME (which has no error
// reply) closes the connection without a byte.
TEST_F(NbdExportTest, ExportNameWhileStoppingClosesSilently) {
  // Each INFO's replies (one 4 KiB description per requested type) are larger than any
  // socket buffer (SO_SNDBUF is at most 2 x 4 MiB), so the server blocks sending them while
  // the later options wait unread until Stop has begun.
  ExportOptions options;
  Export exporter(options);
  NBD_ASSERT_OK(exporter.Add({"big", std::string(kMaxStringLength, 'd'), remote_.get(), false}));
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  NBD_ASSERT_OK(exporter.ServeConnection(UniqueFd(sv[0])));
  RawClient c{UniqueFd(sv[1])};
  NBD_ASSERT_OK(c.Start());
  const std::vector<uint16_t> types((kMaxOptionLength - 4 - 3 - 2) / 2, kInfoDescription);
  constexpr int kInfos = 3;
  for (int i = 0; i < kInfos; ++i) NBD_ASSERT_OK(c.SendOption(kOptInfo, EncodeInfoRequest({"big", types})));
  NBD_ASSERT_OK(c.SendOption(kOptExportName, Bytes("big")));
  std::thread stopper([&exporter] { exporter.Stop(); });
  for (;;) {  // Stop has begun once new connections are refused
    int probe[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, probe), 0);
    ::close(probe[1]);
    if (exporter.ServeConnection(UniqueFd(probe[0])).code() == Code::kAborted) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  uint32_t last_final = 0;
  for (int i = 0; i < kInfos; ++i) {
    for (;;) {
      auto r = c.ReadOptionReply();
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      ASSERT_EQ(r->header.option, kOptInfo);
      if (r->header.type != kRepInfo) {
        last_final = r->header.type;
        break;
      }
    }
  }
  EXPECT_EQ(last_final, kRepErrShutdown);  // read after Stop began
  std::array<std::byte, 1> extra{};
  EXPECT_EQ(c.Recv(extra).code(), Code::kUnavailable);  // EOF, no reply to EXPORT_NAME
  stopper.join();
}

// Stop while clients pipeline writes and reads (each round after more replies than the
// last), some of them vanishing mid-request and some still negotiating: every connection
// is answered or closed within the clients' timeout, no reply names a request that was not
// sent (or was answered before), every write acknowledged is in the region, and no thread
// of the Export outlives Stop (under ASan this is where a use after free between a
// connection and Stop would show).
TEST(NbdExportStopTest, StopUnderLoadAnswersOrClosesEveryConnection) {
  constexpr int kRounds = 8;
  constexpr int kClients = 6;
  constexpr int kDepth = 4;
  constexpr uint64_t kSlice = 1u << 20;  // each client writes its own slice
  constexpr uint32_t kBlock = 4096;
  auto region = std::make_shared<fabric::MemoryRegion>("disk", kClients * kSlice);
  const auto Base = [](int round, int id) { return static_cast<unsigned>(0x10 * round + id + 1) & 0x7fu; };
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    fabric::MemoryRemote remote(region, true, kMaxTransfer);
    remote.SetDelay(std::chrono::microseconds(100 * (round % 4)));
    ExportOptions options;
    options.queue_depth = kDepth;
    Export exporter(options);
    NBD_ASSERT_OK(exporter.Add({"disk", "", &remote, false}));
    struct Outcome {
      std::string error;                          // empty: nothing wrong seen
      std::vector<uint64_t> acknowledged_writes;  // offsets
      int replies = 0;
      bool vanished = false;
    };
    std::vector<Outcome> outcomes(kClients);
    std::atomic<int> replies_so_far{0};
    std::vector<std::thread> clients;
    for (int id = 0; id < kClients; ++id) {
      clients.emplace_back([&, id] {
        Outcome& out = outcomes[static_cast<size_t>(id)];
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
          out.error = "socketpair failed";
          return;
        }
        UniqueFd ours(sv[1]);
        if (!exporter.ServeConnection(UniqueFd(sv[0])).ok()) return;  // Stop came first
        RawClient c(std::move(ours));
        if (!c.Negotiate("disk", false).ok()) return;  // Stop came during the handshake
        const bool vanishes = id % 3 == 2;
        for (uint64_t batch = 0;; ++batch) {
          // Each client's own byte, its top bit telling the batches apart.
          const auto fill = static_cast<std::byte>(Base(round, id) | (batch % 2 == 0 ? 0u : 0x80u));
          std::vector<Request> sent;
          bool closed = false;  // a send failed: Stop closed the connection
          for (int i = 0; i < kDepth && !closed; ++i) {
            const uint64_t seq = batch * kDepth + static_cast<uint64_t>(i);
            const uint64_t offset = static_cast<uint64_t>(id) * kSlice + (seq * kBlock) % kSlice;
            const bool write = i % 2 == 0;
            Request r{0, write ? kCmdWrite : kCmdRead, seq, offset, kBlock};
            if (vanishes && batch == 3 && i == 2) {
              // Half a write, then gone.
              std::vector<std::byte> part(kRequestSize + kBlock / 2, fill);
              EncodeRequest(r, std::span(part).first<kRequestSize>());
              (void)c.Send(part);
              out.vanished = true;
              return;
            }
            // A request whose send failed may still have been read whole: its reply
            // counts like the others'.
            closed =
                !(write ? c.SendRequest(r, std::vector<std::byte>(kBlock, fill)) : c.SendRequest(r)).ok();
            sent.push_back(r);
          }
          for (size_t n = 0; n < sent.size(); ++n) {
            std::array<std::byte, kSimpleReplySize> raw{};
            Status received = c.Recv(raw);
            if (received.code() == Code::kUnavailable) return;  // closed: the rest were not read
            if (!received.ok()) {
              out.error = "waiting for a reply: " + received.ToString();
              return;
            }
            auto reply = DecodeSimpleReply(raw);
            if (!reply.ok()) {
              out.error = "bad reply: " + reply.status().ToString();
              return;
            }
            auto it = std::find_if(sent.begin(), sent.end(), [&](const Request& r) {
              return r.handle == reply->handle && r.length != 0;
            });
            if (it == sent.end()) {
              out.error = "reply for handle " + std::to_string(reply->handle) + ", not in flight";
              return;
            }
            ++out.replies;
            replies_so_far.fetch_add(1, std::memory_order_relaxed);
            if (reply->error != 0 && reply->error != kEshutdown) {
              out.error =
                  "error " + std::to_string(reply->error) + " for handle " + std::to_string(reply->handle);
              return;
            }
            if (it->type == kCmdRead && reply->error == 0) {
              std::vector<std::byte> data(kBlock);
              if (!c.Recv(data).ok()) return;
            }
            if (it->type == kCmdWrite && reply->error == 0) out.acknowledged_writes.push_back(it->offset);
            it->length = 0;  // answered
          }
          if (closed) return;
        }
      });
    }
    // Round r stops once the clients have had 8r replies, however slow the machine.
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (replies_so_far.load(std::memory_order_relaxed) < 8 * round &&
           std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    const auto started = std::chrono::steady_clock::now();
    exporter.Stop();
    const auto took = std::chrono::steady_clock::now() - started;
    EXPECT_LT(took, std::chrono::seconds(10));
    for (std::thread& t : clients) t.join();
    const ExportStats stats = exporter.stats();
    EXPECT_EQ(stats.connections_active, 0u);
    EXPECT_EQ(stats.protocol_errors, 0u);
    int replies = 0;
    int vanished = 0;
    for (int id = 0; id < kClients; ++id) {
      const Outcome& out = outcomes[static_cast<size_t>(id)];
      EXPECT_EQ(out.error, "") << "client " << id;
      replies += out.replies;
      vanished += out.vanished ? 1 : 0;
      for (uint64_t offset : out.acknowledged_writes) {
        // Every block a client writes holds one byte value; which one depends on the batch.
        const std::byte* at = region->data() + offset;
        EXPECT_TRUE(std::all_of(at, at + kBlock, [&](std::byte b) { return b == at[0]; }))
            << "client " << id << " offset " << offset;
        EXPECT_EQ(static_cast<unsigned>(at[0]) & 0x7fu, Base(round, id))
            << "client " << id << " offset " << offset;
      }
    }
    if (round > 0) EXPECT_GT(replies, 0) << "the clients were stopped before any request";
    // Every request the Export read was answered, but for the last ones of a client that
    // vanished (at most the two whole requests and the half write it sent last).
    EXPECT_GE(stats.requests, static_cast<uint64_t>(replies));
    EXPECT_LE(stats.requests, static_cast<uint64_t>(replies + 3 * vanished));
  }
}

}  // namespace
}  // namespace mf::nbd
