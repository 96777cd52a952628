// nbd/protocol.h: every message round-trips, and every decoder rejects truncation, bad
// magic numbers and oversized or inconsistent lengths.
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <vector>

#include "nbd/protocol.h"

namespace mf::nbd {
namespace {

template <size_t N>
std::span<const std::byte> Prefix(const std::array<std::byte, N>& a, size_t n) {
  return std::span<const std::byte>(a).first(n);
}

TEST(NbdProtocolTest, ConstantsFollowTheSpec) {
  // "NBDMAGIC" and "IHAVEOPT" in ASCII.
  std::array<std::byte, 8> raw{};
  StoreBe64(raw.data(), kNbdMagic);
  EXPECT_EQ(std::memcmp(raw.data(), "NBDMAGIC", 8), 0);
  StoreBe64(raw.data(), kOptionMagic);
  EXPECT_EQ(std::memcmp(raw.data(), "IHAVEOPT", 8), 0);
  EXPECT_EQ(kRepErrUnsup, 0x80000001u);
  EXPECT_EQ(kRepErrTooBig, 0x80000009u);
  EXPECT_EQ(kReplyTypeError, 32769);
  EXPECT_EQ(kTxSendFastZero, 1u << 11);
}

TEST(NbdProtocolTest, BigEndianHelpers) {
  std::array<std::byte, 8> raw{};
  StoreBe16(raw.data(), 0x1234);
  EXPECT_EQ(raw[0], std::byte{0x12});
  EXPECT_EQ(LoadBe16(raw.data()), 0x1234);
  StoreBe32(raw.data(), 0xdeadbeef);
  EXPECT_EQ(raw[0], std::byte{0xde});
  EXPECT_EQ(LoadBe32(raw.data()), 0xdeadbeefu);
  StoreBe64(raw.data(), 0x0102030405060708ull);
  EXPECT_EQ(raw[7], std::byte{0x08});
  EXPECT_EQ(LoadBe64(raw.data()), 0x0102030405060708ull);
}

TEST(NbdProtocolTest, GreetingRoundTripAndErrors) {
  std::array<std::byte, kServerGreetingSize> raw{};
  EncodeServerGreeting({kFlagFixedNewstyle | kFlagNoZeroes}, raw);
  auto g = DecodeServerGreeting(raw);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->handshake_flags, kFlagFixedNewstyle | kFlagNoZeroes);
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_EQ(DecodeServerGreeting(Prefix(raw, n)).status().code(), Code::kInvalidArgument) << n;
  }
  auto bad = raw;
  bad[0] = std::byte{'X'};
  EXPECT_EQ(DecodeServerGreeting(bad).status().code(), Code::kProtocolError);
  bad = raw;
  bad[15] = std::byte{'X'};  // oldstyle magic would be here
  EXPECT_EQ(DecodeServerGreeting(bad).status().code(), Code::kProtocolError);
}

TEST(NbdProtocolTest, ClientFlags) {
  std::array<std::byte, kClientFlagsSize> raw{};
  EncodeClientFlags(kClientFlagFixedNewstyle | kClientFlagNoZeroes, raw);
  auto f = DecodeClientFlags(raw);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f, kClientFlagFixedNewstyle | kClientFlagNoZeroes);
  EncodeClientFlags(1u << 2, raw);
  EXPECT_EQ(DecodeClientFlags(raw).status().code(), Code::kProtocolError);
  EncodeClientFlags(0x80000000u, raw);
  EXPECT_EQ(DecodeClientFlags(raw).status().code(), Code::kProtocolError);
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_EQ(DecodeClientFlags(Prefix(raw, n)).status().code(), Code::kInvalidArgument);
  }
}

TEST(NbdProtocolTest, OptionHeaderRoundTripAndErrors) {
  std::array<std::byte, kOptionHeaderSize> raw{};
  EncodeOptionHeader({kOptGo, 0xffffffffu}, raw);
  auto h = DecodeOptionHeader(raw);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->option, kOptGo);
  EXPECT_EQ(h->length, 0xffffffffu);  // limits are the server's call
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_EQ(DecodeOptionHeader(Prefix(raw, n)).status().code(), Code::kInvalidArgument);
  }
  raw[3] ^= std::byte{1};
  EXPECT_EQ(DecodeOptionHeader(raw).status().code(), Code::kProtocolError);

  std::vector<std::byte> appended;
  AppendOption(kOptList, std::vector<std::byte>(3, std::byte{7}), &appended);
  ASSERT_EQ(appended.size(), kOptionHeaderSize + 3);
  auto a = DecodeOptionHeader(appended);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->option, kOptList);
  EXPECT_EQ(a->length, 3u);
}

TEST(NbdProtocolTest, OptionReplyRoundTripAndErrors) {
  std::vector<std::byte> out;
  AppendOptionReply(kOptInfo, kRepErrUnknown, std::vector<std::byte>(5, std::byte{1}), &out);
  ASSERT_EQ(out.size(), kOptionReplyHeaderSize + 5);
  auto h = DecodeOptionReplyHeader(out);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->option, kOptInfo);
  EXPECT_EQ(h->type, kRepErrUnknown);
  EXPECT_EQ(h->length, 5u);
  for (size_t n = 0; n < kOptionReplyHeaderSize; ++n) {
    EXPECT_EQ(DecodeOptionReplyHeader(std::span(out).first(n)).status().code(), Code::kInvalidArgument);
  }
  std::array<std::byte, kOptionReplyHeaderSize> big{};
  EncodeOptionReplyHeader({kOptList, kRepServer, 1u << 30}, big);
  EXPECT_EQ(DecodeOptionReplyHeader(big).status().code(), Code::kProtocolError);
  out[0] = std::byte{0xff};
  EXPECT_EQ(DecodeOptionReplyHeader(out).status().code(), Code::kProtocolError);
}

TEST(NbdProtocolTest, RepServerAndInfoStrings) {
  std::vector<std::byte> out;
  AppendRepServer(kOptList, "disk", "a description", &out);
  auto h = DecodeOptionReplyHeader(out);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->type, kRepServer);
  ASSERT_EQ(h->length, 4u + 4 + 13);
  EXPECT_EQ(LoadBe32(out.data() + kOptionReplyHeaderSize), 4u);
  EXPECT_EQ(std::memcmp(out.data() + kOptionReplyHeaderSize + 4, "disk", 4), 0);

  out.clear();
  AppendInfoString(kOptGo, kInfoName, std::string(5000, 'n'), &out);  // cut to 4096
  auto i = DecodeOptionReplyHeader(out);
  ASSERT_TRUE(i.ok());
  EXPECT_EQ(i->length, 2u + kMaxStringLength);
}

TEST(NbdProtocolTest, InfoRequestRoundTrip) {
  InfoRequest in{"export-1", {kInfoExport, kInfoBlockSize, kInfoName}};
  std::vector<std::byte> raw = EncodeInfoRequest(in);
  ASSERT_EQ(raw.size(), 4 + 8 + 2 + 6u);
  auto out = DecodeInfoRequest(raw);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->name, "export-1");
  EXPECT_EQ(out->info_types, in.info_types);

  auto empty = DecodeInfoRequest(EncodeInfoRequest({"", {}}));
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->name.empty());
}

TEST(NbdProtocolTest, InfoRequestErrors) {
  std::vector<std::byte> raw = EncodeInfoRequest({"disk", {kInfoBlockSize}});
  // Every truncation: either too short for the fixed part or inconsistent.
  for (size_t n = 0; n < raw.size(); ++n) {
    auto r = DecodeInfoRequest(std::span(raw).first(n));
    EXPECT_FALSE(r.ok()) << n;
    if (n < kInfoRequestFixedSize) EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  }
  // Trailing garbage.
  std::vector<std::byte> longer = raw;
  longer.push_back(std::byte{0});
  EXPECT_EQ(DecodeInfoRequest(longer).status().code(), Code::kProtocolError);
  // Name length overrunning the data.
  std::vector<std::byte> overrun = raw;
  StoreBe32(overrun.data(), 0xfffffff0u);
  EXPECT_EQ(DecodeInfoRequest(overrun).status().code(), Code::kProtocolError);
  // A name longer than 4096 bytes.
  auto too_long = EncodeInfoRequest({std::string(kMaxStringLength + 1, 'a'), {}});
  EXPECT_EQ(DecodeInfoRequest(too_long).status().code(), Code::kProtocolError);
  // A name with NUL.
  auto nul = EncodeInfoRequest({std::string("a\0b", 3), {}});
  EXPECT_EQ(DecodeInfoRequest(nul).status().code(), Code::kProtocolError);
  // A count larger than the data.
  std::vector<std::byte> count = raw;
  StoreBe16(count.data() + 4 + 4, 9);
  EXPECT_EQ(DecodeInfoRequest(count).status().code(), Code::kProtocolError);
}

TEST(NbdProtocolTest, MetaContextRequest) {
  MetaContextRequest in{"disk", {"base:allocation", "x-a:b"}};
  std::vector<std::byte> raw = EncodeMetaContextRequest(in);
  auto out = DecodeMetaContextRequest(raw);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->export_name, "disk");
  EXPECT_EQ(out->queries, in.queries);
  for (size_t n = 0; n < raw.size(); ++n) {
    auto r = DecodeMetaContextRequest(std::span(raw).first(n));
    EXPECT_FALSE(r.ok()) << n;
    if (n < kMetaContextFixedSize) EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  }
  std::vector<std::byte> longer = raw;
  longer.push_back(std::byte{0});
  EXPECT_EQ(DecodeMetaContextRequest(longer).status().code(), Code::kProtocolError);
  std::vector<std::byte> overrun = raw;
  StoreBe32(overrun.data() + 4 + 4 + 4, 0xffffffffu);  // first query's length
  EXPECT_EQ(DecodeMetaContextRequest(overrun).status().code(), Code::kProtocolError);
  std::vector<std::byte> many = EncodeMetaContextRequest({"", {}});
  StoreBe32(many.data() + 4, 1000000);
  EXPECT_EQ(DecodeMetaContextRequest(many).status().code(), Code::kProtocolError);
  std::vector<std::byte> reply;
  AppendRepMetaContext(kOptSetMetaContext, 7, kBaseAllocation, &reply);
  auto h = DecodeOptionReplyHeader(reply);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->type, kRepMetaContext);
  EXPECT_EQ(h->length, 4u + kBaseAllocation.size());
  EXPECT_EQ(LoadBe32(reply.data() + kOptionReplyHeaderSize), 7u);
}

TEST(NbdProtocolTest, RequestRoundTripAndErrors) {
  Request in{kCmdFlagFua | kCmdFlagNoHole, kCmdWriteZeroes, 0x1122334455667788ull, 0xfffffffffffff000ull,
             0xffffffffu};
  std::array<std::byte, kRequestSize> raw{};
  EncodeRequest(in, raw);
  auto out = DecodeRequest(raw);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->flags, in.flags);
  EXPECT_EQ(out->type, in.type);
  EXPECT_EQ(out->handle, in.handle);
  EXPECT_EQ(out->offset, in.offset);
  EXPECT_EQ(out->length, in.length);
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_EQ(DecodeRequest(Prefix(raw, n)).status().code(), Code::kInvalidArgument);
  }
  raw[0] = std::byte{0x12};  // the historic 0x12560953
  EXPECT_EQ(DecodeRequest(raw).status().code(), Code::kProtocolError);
}

TEST(NbdProtocolTest, SimpleReplyRoundTripAndErrors) {
  std::array<std::byte, kSimpleReplySize> raw{};
  EncodeSimpleReply({kEnospc, 42}, raw);
  auto r = DecodeSimpleReply(raw);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->error, kEnospc);
  EXPECT_EQ(r->handle, 42u);
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_EQ(DecodeSimpleReply(Prefix(raw, n)).status().code(), Code::kInvalidArgument);
  }
  raw[1] ^= std::byte{0x40};
  EXPECT_EQ(DecodeSimpleReply(raw).status().code(), Code::kProtocolError);
}

TEST(NbdProtocolTest, StructuredReplyRoundTripAndErrors) {
  std::array<std::byte, kStructuredReplyHeaderSize> raw{};
  EncodeStructuredReplyHeader({kReplyFlagDone, kReplyTypeOffsetData, 7, 8 + 4096}, raw);
  auto h = DecodeStructuredReplyHeader(raw);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->flags, kReplyFlagDone);
  EXPECT_EQ(h->type, kReplyTypeOffsetData);
  EXPECT_EQ(h->handle, 7u);
  EXPECT_EQ(h->length, 8u + 4096);
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_EQ(DecodeStructuredReplyHeader(Prefix(raw, n)).status().code(), Code::kInvalidArgument);
  }
  EncodeStructuredReplyHeader({0, kReplyTypeOffsetData, 7, 0xffffffffu}, raw);
  EXPECT_EQ(DecodeStructuredReplyHeader(raw).status().code(), Code::kProtocolError);
  raw[0] = std::byte{0};
  EXPECT_EQ(DecodeStructuredReplyHeader(raw).status().code(), Code::kProtocolError);
}

TEST(NbdProtocolTest, ErrorChunkRoundTripAndErrors) {
  std::vector<std::byte> out;
  AppendErrorChunk(9, kReplyFlagDone, kEinval, "past the end", &out);
  auto h = DecodeStructuredReplyHeader(out);
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->type, kReplyTypeError);
  ASSERT_EQ(h->length, out.size() - kStructuredReplyHeaderSize);
  auto payload = std::span<const std::byte>(out).subspan(kStructuredReplyHeaderSize);
  auto c = DecodeErrorChunk(payload);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->error, kEinval);
  EXPECT_EQ(c->message, "past the end");
  for (size_t n = 0; n < kErrorChunkPrefixSize; ++n) {
    EXPECT_EQ(DecodeErrorChunk(payload.first(n)).status().code(), Code::kInvalidArgument);
  }
  EXPECT_EQ(DecodeErrorChunk(payload.first(payload.size() - 1)).status().code(), Code::kProtocolError);
  std::vector<std::byte> zero(payload.begin(), payload.end());
  StoreBe32(zero.data(), 0);
  EXPECT_EQ(DecodeErrorChunk(zero).status().code(), Code::kProtocolError);
}

TEST(NbdProtocolTest, InfoPayloads) {
  std::array<std::byte, kInfoExportSize> e{};
  EncodeInfoExport(1ull << 40, kTxHasFlags | kTxReadOnly, e);
  auto de = DecodeInfoExport(e);
  ASSERT_TRUE(de.ok());
  EXPECT_EQ(de->first, 1ull << 40);
  EXPECT_EQ(de->second, kTxHasFlags | kTxReadOnly);
  EXPECT_FALSE(DecodeInfoExport(std::span<const std::byte>(e).first(11)).ok());
  e[1] = std::byte{kInfoName};
  EXPECT_EQ(DecodeInfoExport(e).status().code(), Code::kProtocolError);

  std::array<std::byte, kInfoBlockSizeSize> b{};
  EncodeInfoBlockSize({1, 4096, 32u << 20}, b);
  auto db = DecodeInfoBlockSize(b);
  ASSERT_TRUE(db.ok());
  EXPECT_EQ(db->minimum, 1u);
  EXPECT_EQ(db->preferred, 4096u);
  EXPECT_EQ(db->maximum, 32u << 20);
  EXPECT_FALSE(DecodeInfoBlockSize(std::span<const std::byte>(b).first(13)).ok());
}

TEST(NbdProtocolTest, Names) {
  EXPECT_EQ(OptionName(kOptGo), "GO");
  EXPECT_EQ(OptionName(999), "unknown");
  EXPECT_EQ(CommandName(kCmdWriteZeroes), "WRITE_ZEROES");
  EXPECT_EQ(CommandName(99), "unknown");
}

}  // namespace
}  // namespace mf::nbd
