// Unit tests of the TCP wire codec (transports/tcp/wire.h): round trips, every truncation,
// bad magic and versions, oversized lengths, reserved bits, trailing bytes.
#include <gtest/gtest.h>

#include <cstring>

#include "transports/tcp/wire.h"

namespace mf::tcp::wire {
namespace {

std::vector<std::byte> Bytes(std::initializer_list<int> v) {
  std::vector<std::byte> out;
  for (int x : v) out.push_back(static_cast<std::byte>(x));
  return out;
}

fabric::Nonce TestNonce(uint8_t seed) {
  fabric::Nonce n{};
  for (size_t i = 0; i < n.size(); ++i) n[i] = static_cast<uint8_t>(seed + i);
  return n;
}

TEST(TcpWire, ClientHelloRoundTripAndTruncations) {
  ClientHello hello;
  hello.channel = Channel::kData;
  hello.nonce = TestNonce(3);
  std::array<std::byte, kClientHelloSize> raw{};
  EncodeClientHello(hello, raw);
  EXPECT_EQ(std::memcmp(raw.data(), "MFAB", 4), 0);

  ClientHello out;
  auto r = DecodeClientHello(raw, &out);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, kClientHelloSize);
  EXPECT_EQ(out.version, kVersion);
  EXPECT_EQ(out.channel, Channel::kData);
  EXPECT_EQ(out.nonce, hello.nonce);

  for (size_t n = 0; n < kClientHelloSize; ++n) {
    auto t = DecodeClientHello(std::span(raw).first(n), &out);
    ASSERT_TRUE(t.ok()) << n;
    EXPECT_EQ(*t, 0u) << "truncated at " << n;
  }
}

TEST(TcpWire, ClientHelloBadMagicVersionChannel) {
  ClientHello hello;
  std::array<std::byte, kClientHelloSize> raw{};
  EncodeClientHello(hello, raw);
  ClientHello out;

  auto bad_magic = raw;
  bad_magic[0] = std::byte{'G'};
  EXPECT_EQ(DecodeClientHello(bad_magic, &out).status().code(), Code::kProtocolError);
  // Detected from the first 8 bytes, before the rest arrives.
  EXPECT_EQ(DecodeClientHello(std::span(bad_magic).first(kHelloPrefixSize), &out).status().code(),
            Code::kProtocolError);

  hello.version = 7;
  EncodeClientHello(hello, raw);
  auto r = DecodeClientHello(std::span(raw).first(kHelloPrefixSize), &out);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, kHelloPrefixSize);  // only the frozen prefix is parsed
  EXPECT_EQ(out.version, 7);

  hello.version = kVersion;
  EncodeClientHello(hello, raw);
  auto bad_channel = raw;
  bad_channel[6] = std::byte{9};
  EXPECT_EQ(DecodeClientHello(bad_channel, &out).status().code(), Code::kProtocolError);
  auto reserved = raw;
  reserved[7] = std::byte{1};
  EXPECT_EQ(DecodeClientHello(reserved, &out).status().code(), Code::kProtocolError);
}

TEST(TcpWire, ServerHelloRoundTripAndTruncations) {
  ServerHello hello;
  hello.status = Code::kUnsupported;
  hello.auth = AuthMode::kNone;
  hello.nonce = TestNonce(9);
  hello.message = "client speaks version 2";
  std::vector<std::byte> raw;
  EncodeServerHello(hello, &raw);
  ASSERT_EQ(raw.size(), kServerHelloFixedSize + hello.message.size());

  ServerHello out;
  auto r = DecodeServerHello(raw, &out);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, raw.size());
  EXPECT_EQ(out.status, Code::kUnsupported);
  EXPECT_EQ(out.auth, AuthMode::kNone);
  EXPECT_EQ(out.nonce, hello.nonce);
  EXPECT_EQ(out.message, hello.message);
  for (size_t n = 0; n < raw.size(); ++n) {
    auto t = DecodeServerHello(std::span(raw).first(n), &out);
    ASSERT_TRUE(t.ok()) << n;
    EXPECT_EQ(*t, 0u) << "truncated at " << n;
  }

  // Long messages are cut by the encoder; a claimed oversize message is rejected.
  hello.message.assign(1000, 'x');
  raw.clear();
  EncodeServerHello(hello, &raw);
  EXPECT_EQ(raw.size(), kServerHelloFixedSize + kMaxHelloMessage);
  raw[40] = std::byte{0xff};
  raw[41] = std::byte{0xff};
  EXPECT_EQ(DecodeServerHello(raw, &out).status().code(), Code::kProtocolError);

  // A foreign version: only the prefix is consumed.
  hello.version = 3;
  hello.message.clear();
  raw.clear();
  EncodeServerHello(hello, &raw);
  auto v = DecodeServerHello(raw, &out);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, kHelloPrefixSize);
  EXPECT_EQ(out.version, 3);
}

TEST(TcpWire, ServerHelloRejectsUnknownFields) {
  ServerHello hello;
  std::vector<std::byte> raw;
  EncodeServerHello(hello, &raw);
  ServerHello out;
  auto bad_status = raw;
  bad_status[6] = std::byte{200};
  EXPECT_EQ(DecodeServerHello(bad_status, &out).status().code(), Code::kProtocolError);
  auto bad_auth = raw;
  bad_auth[7] = std::byte{5};
  EXPECT_EQ(DecodeServerHello(bad_auth, &out).status().code(), Code::kProtocolError);
  auto bad_reserved = raw;
  bad_reserved[42] = std::byte{1};
  EXPECT_EQ(DecodeServerHello(bad_reserved, &out).status().code(), Code::kProtocolError);
}

TEST(TcpWire, FrameHeaderRoundTripAndTruncations) {
  FrameHeader h;
  h.opcode = static_cast<uint8_t>(Opcode::kRead);
  h.reply = true;
  h.status = Code::kOutOfRange;
  h.payload_length = 12345;
  h.tag = 0x0102030405060708ull;
  h.offset = 0xfffffffffffff000ull;
  h.length = 4096;
  std::array<std::byte, kFrameHeaderSize> raw{};
  EncodeFrameHeader(h, raw);
  EXPECT_EQ(raw[0], std::byte{0x21});
  EXPECT_EQ(raw[8], std::byte{0x08});  // little-endian tag

  FrameHeader out;
  auto r = DecodeFrameHeader(raw, &out);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, kFrameHeaderSize);
  EXPECT_EQ(out.opcode, h.opcode);
  EXPECT_TRUE(out.reply);
  EXPECT_EQ(out.status, Code::kOutOfRange);
  EXPECT_EQ(out.payload_length, h.payload_length);
  EXPECT_EQ(out.tag, h.tag);
  EXPECT_EQ(out.offset, h.offset);
  EXPECT_EQ(out.length, h.length);
  for (size_t n = 0; n < kFrameHeaderSize; ++n) {
    auto t = DecodeFrameHeader(std::span(raw).first(n), &out);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(*t, 0u);
  }
}

TEST(TcpWire, FrameHeaderRejectsBadFields) {
  FrameHeader h;
  h.opcode = static_cast<uint8_t>(Opcode::kWrite);
  std::array<std::byte, kFrameHeaderSize> raw{};
  FrameHeader out;

  h.payload_length = kMaxPayload;
  EncodeFrameHeader(h, raw);
  EXPECT_TRUE(DecodeFrameHeader(raw, &out).ok());
  h.payload_length = kMaxPayload + 1;
  EncodeFrameHeader(h, raw);
  EXPECT_EQ(DecodeFrameHeader(raw, &out).status().code(), Code::kProtocolError);
  h.payload_length = UINT32_MAX;
  EncodeFrameHeader(h, raw);
  EXPECT_EQ(DecodeFrameHeader(raw, &out).status().code(), Code::kProtocolError);

  h.payload_length = 0;
  EncodeFrameHeader(h, raw);
  auto flags = raw;
  flags[1] = std::byte{0x80};
  EXPECT_EQ(DecodeFrameHeader(flags, &out).status().code(), Code::kProtocolError);
  auto status_in_request = raw;
  status_in_request[2] = std::byte{3};
  EXPECT_EQ(DecodeFrameHeader(status_in_request, &out).status().code(), Code::kProtocolError);
  auto unknown_status = raw;
  unknown_status[1] = std::byte{kFlagReply};
  unknown_status[2] = std::byte{kMaxWireCode + 1};
  EXPECT_EQ(DecodeFrameHeader(unknown_status, &out).status().code(), Code::kProtocolError);
  auto reserved3 = raw;
  reserved3[3] = std::byte{1};
  EXPECT_EQ(DecodeFrameHeader(reserved3, &out).status().code(), Code::kProtocolError);
  auto reserved28 = raw;
  reserved28[31] = std::byte{1};
  EXPECT_EQ(DecodeFrameHeader(reserved28, &out).status().code(), Code::kProtocolError);

  // Unknown opcodes decode (the server answers them with UNSUPPORTED).
  auto unknown_op = raw;
  unknown_op[0] = std::byte{0x7f};
  ASSERT_TRUE(DecodeFrameHeader(unknown_op, &out).ok());
  EXPECT_FALSE(IsKnownOpcode(out.opcode));
  EXPECT_EQ(OpcodeName(0x7f), "0x7f");
  EXPECT_EQ(OpcodeName(0x22), "WRITE");
}

TEST(TcpWire, RegionInfoAndListRoundTrip) {
  fabric::RegionInfo a{"alpha", 1ull << 40, 7, fabric::BackingKind::kFile, true};
  fabric::RegionInfo b{"b", 4096, 8, fabric::BackingKind::kMemfd, false};
  std::vector<std::byte> raw;
  EncodeRegionInfo(a, &raw);
  auto info = DecodeRegionInfo(raw);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->name, "alpha");
  EXPECT_EQ(info->size, a.size);
  EXPECT_EQ(info->generation, 7u);
  EXPECT_EQ(info->backing, fabric::BackingKind::kFile);
  EXPECT_TRUE(info->has_writer);
  for (size_t n = 0; n < raw.size(); ++n) {
    EXPECT_FALSE(DecodeRegionInfo(std::span(raw).first(n)).ok()) << n;
  }
  raw.push_back(std::byte{0});
  EXPECT_FALSE(DecodeRegionInfo(raw).ok());  // trailing byte

  std::vector<fabric::RegionInfo> regions = {a, b};
  raw.clear();
  EncodeRegionList(regions, &raw);
  auto list = DecodeRegionList(raw);
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[1].name, "b");
  for (size_t n = 0; n < raw.size(); ++n) EXPECT_FALSE(DecodeRegionList(std::span(raw).first(n)).ok()) << n;

  // A huge count is refused before anything is reserved.
  auto huge = Bytes({0xff, 0xff, 0xff, 0xff});
  EXPECT_EQ(DecodeRegionList(huge).status().code(), Code::kProtocolError);
  auto empty = Bytes({0, 0, 0, 0});
  ASSERT_TRUE(DecodeRegionList(empty).ok());
  EXPECT_TRUE(DecodeRegionList(empty)->empty());
}

TEST(TcpWire, RegionInfoRejectsBadFields) {
  fabric::RegionInfo a{"alpha", 1, 1, fabric::BackingKind::kAnonymous, false};
  std::vector<std::byte> raw;
  EncodeRegionInfo(a, &raw);
  auto bad_backing = raw;
  bad_backing[raw.size() - 2] = std::byte{9};
  EXPECT_FALSE(DecodeRegionInfo(bad_backing).ok());
  auto bad_flags = raw;
  bad_flags[raw.size() - 1] = std::byte{2};
  EXPECT_FALSE(DecodeRegionInfo(bad_flags).ok());
  auto long_name = Bytes({200, 0});  // name length 200 > 64
  long_name.resize(2 + 200 + 18);
  EXPECT_FALSE(DecodeRegionInfo(long_name).ok());
}

TEST(TcpWire, RegionSpecRoundTrip) {
  fabric::RegionSpec spec;
  spec.name = "disk";
  spec.size = 1ull << 30;
  spec.backing = fabric::BackingKind::kFile;
  spec.path = "/var/lib/memfabric/disk.img";
  std::vector<std::byte> raw;
  EncodeRegionSpec(spec, &raw);
  auto out = DecodeRegionSpec(raw);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->name, spec.name);
  EXPECT_EQ(out->size, spec.size);
  EXPECT_EQ(out->backing, spec.backing);
  EXPECT_EQ(out->path, spec.path);
  for (size_t n = 0; n < raw.size(); ++n) EXPECT_FALSE(DecodeRegionSpec(std::span(raw).first(n)).ok()) << n;
  auto bad = raw;
  bad[2 + spec.name.size() + 8] = std::byte{42};  // backing
  EXPECT_FALSE(DecodeRegionSpec(bad).ok());
}

TEST(TcpWire, OpenAttachTokenProofRoundTrip) {
  OpenRequest request{"region", true};
  std::vector<std::byte> raw;
  EncodeOpenRequest(request, &raw);
  auto req = DecodeOpenRequest(raw);
  ASSERT_TRUE(req.ok());
  EXPECT_EQ(req->name, "region");
  EXPECT_TRUE(req->writable);
  raw[0] = std::byte{2};
  EXPECT_FALSE(DecodeOpenRequest(raw).ok());

  OpenReply reply;
  reply.info = {"region", 8192, 3, fabric::BackingKind::kHugetlb, true};
  for (size_t i = 0; i < reply.token.size(); ++i) reply.token[i] = static_cast<uint8_t>(i * 7);
  reply.max_transfer = 65536;
  raw.clear();
  EncodeOpenReply(reply, &raw);
  auto rep = DecodeOpenReply(raw);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->info.size, 8192u);
  EXPECT_EQ(rep->token, reply.token);
  EXPECT_EQ(rep->max_transfer, 65536u);
  for (size_t n = 0; n < raw.size(); ++n) EXPECT_FALSE(DecodeOpenReply(std::span(raw).first(n)).ok()) << n;
  reply.max_transfer = kMaxPayload + 1;
  raw.clear();
  EncodeOpenReply(reply, &raw);
  EXPECT_FALSE(DecodeOpenReply(raw).ok());
  reply.max_transfer = 0;
  raw.clear();
  EncodeOpenReply(reply, &raw);
  EXPECT_FALSE(DecodeOpenReply(raw).ok());

  raw.clear();
  EncodeToken(reply.token, &raw);
  auto token = DecodeToken(raw);
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(*token, reply.token);
  EXPECT_FALSE(DecodeToken(std::span(raw).first(kTokenSize - 1)).ok());

  AttachReply attach{1ull << 33, 99, true};
  raw.clear();
  EncodeAttachReply(attach, &raw);
  auto att = DecodeAttachReply(raw);
  ASSERT_TRUE(att.ok());
  EXPECT_EQ(att->size, attach.size);
  EXPECT_EQ(att->generation, 99u);
  EXPECT_TRUE(att->writable);
  for (size_t n = 0; n < raw.size(); ++n) EXPECT_FALSE(DecodeAttachReply(std::span(raw).first(n)).ok()) << n;

  fabric::Proof proof{};
  proof[0] = 1;
  proof[31] = 2;
  raw.clear();
  EncodeProof(proof, &raw);
  auto p = DecodeProof(raw);
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(*p, proof);
  raw.push_back(std::byte{0});
  EXPECT_FALSE(DecodeProof(raw).ok());
}

TEST(TcpWire, NamesAndMessages) {
  std::vector<std::byte> raw;
  EncodeName("abc", &raw);
  auto name = DecodeName(raw);
  ASSERT_TRUE(name.ok());
  EXPECT_EQ(*name, "abc");
  for (size_t n = 0; n < raw.size(); ++n) EXPECT_FALSE(DecodeName(std::span(raw).first(n)).ok());
  auto too_long = Bytes({65, 0});
  too_long.resize(2 + 65, std::byte{'a'});
  EXPECT_FALSE(DecodeName(too_long).ok());

  raw.clear();
  EncodeMessage(std::string(5000, 'm'), &raw);
  EXPECT_EQ(raw.size(), kMaxMessageSize);
  EXPECT_TRUE(DecodeMessage(raw).ok());
  raw.push_back(std::byte{'m'});
  EXPECT_FALSE(DecodeMessage(raw).ok());

  FrameHeader h;
  h.reply = true;
  h.status = Code::kBusy;
  auto msg = Bytes({'h', 'e', 'l', 'd'});
  Status st = ReplyStatus(h, msg);
  EXPECT_EQ(st.code(), Code::kBusy);
  EXPECT_NE(st.message().find("held"), std::string_view::npos);
  h.status = Code::kOk;
  EXPECT_TRUE(ReplyStatus(h, {}).ok());
}

TEST(TcpWire, AppendFrame) {
  FrameHeader h;
  h.opcode = static_cast<uint8_t>(Opcode::kWrite);
  h.offset = 4096;
  auto payload = Bytes({1, 2, 3});
  h.payload_length = 3;
  std::vector<std::byte> out;
  AppendFrame(h, payload, &out);
  ASSERT_EQ(out.size(), kFrameHeaderSize + 3);
  FrameHeader back;
  ASSERT_TRUE(DecodeFrameHeader(out, &back).ok());
  EXPECT_EQ(back.offset, 4096u);
  EXPECT_EQ(out.back(), std::byte{3});
}

}  // namespace
}  // namespace mf::tcp::wire
