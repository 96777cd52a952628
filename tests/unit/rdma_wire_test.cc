// The rdma_cm private-data codec: round trips, padding, truncation, foreign bytes.
#include "transports/rdma/rdma_wire.h"

#include <gtest/gtest.h>

namespace mf::rdma::wire {
namespace {

TEST(RdmaWire, ConnectRequestRoundTripAndPadding) {
  ConnectRequest request;
  for (size_t i = 0; i < request.token.size(); ++i) request.token[i] = static_cast<uint8_t>(i * 3 + 1);
  auto raw = EncodeConnectRequest(request);
  ASSERT_EQ(raw.size(), kConnectRequestSize);
  auto got = DecodeConnectRequest(raw);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(got->token, request.token);
  EXPECT_EQ(got->version, kVersion);
  for (size_t n = 0; n < raw.size(); ++n)
    EXPECT_FALSE(DecodeConnectRequest(std::span(raw).first(n)).ok()) << n;
  raw.resize(kMinPrivateData);  // the connection manager pads with zeros
  EXPECT_TRUE(DecodeConnectRequest(raw).ok());
  raw.back() = std::byte{1};
  EXPECT_FALSE(DecodeConnectRequest(raw).ok());
  raw = EncodeConnectRequest(request);
  raw[0] = std::byte{'X'};
  EXPECT_EQ(DecodeConnectRequest(raw).status().code(), Code::kProtocolError);
  raw = EncodeConnectRequest(request);
  raw[6] = std::byte{1};  // flags
  EXPECT_FALSE(DecodeConnectRequest(raw).ok());
  // A foreign version decodes so the server can name it.
  request.version = kVersion + 1;
  auto foreign = DecodeConnectRequest(EncodeConnectRequest(request));
  ASSERT_TRUE(foreign.ok());
  EXPECT_EQ(foreign->version, kVersion + 1);
}

TEST(RdmaWire, AcceptRoundTripAndChecks) {
  Accept a{true, 0x7f0000001000, 0x1234, 1u << 30, 9};
  auto raw = EncodeAccept(a);
  ASSERT_EQ(raw.size(), kAcceptSize);
  auto got = DecodeAccept(raw);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_TRUE(got->writable);
  EXPECT_EQ(got->addr, a.addr);
  EXPECT_EQ(got->rkey, a.rkey);
  EXPECT_EQ(got->size, a.size);
  EXPECT_EQ(got->generation, 9u);
  for (size_t n = 0; n < raw.size(); ++n) EXPECT_FALSE(DecodeAccept(std::span(raw).first(n)).ok()) << n;
  raw.resize(kMinPrivateData);
  EXPECT_TRUE(DecodeAccept(raw).ok());
  EXPECT_FALSE(DecodeAccept(EncodeAccept({false, 1, 0x1, 0, 1})).ok());            // size 0
  EXPECT_FALSE(DecodeAccept(EncodeAccept({false, 1, 0, 4096, 1})).ok());           // rkey 0
  EXPECT_FALSE(DecodeAccept(EncodeAccept({false, UINT64_MAX, 1, 4096, 1})).ok());  // wraps
  raw = EncodeAccept(a);
  raw[4] = std::byte{9};  // version
  EXPECT_EQ(DecodeAccept(raw).status().code(), Code::kUnsupported);
}

TEST(RdmaWire, RejectCarriesTheStatus) {
  Status st = DecodeReject(EncodeReject(NotFound("unknown or expired open token")));
  EXPECT_EQ(st.code(), Code::kNotFound);
  EXPECT_EQ(st.message(), "unknown or expired open token");
  auto raw = EncodeReject(Status(Code::kBusy, std::string(500, 'x')));
  EXPECT_LE(raw.size(), kRejectFixedSize + kMaxRejectMessage);
  EXPECT_EQ(DecodeReject(raw).code(), Code::kBusy);
  EXPECT_EQ(DecodeReject(EncodeReject(Status::Ok())).code(), Code::kInternal);
  raw = EncodeReject(NotFound("x"));
  for (size_t n = 0; n < raw.size(); ++n)
    EXPECT_EQ(DecodeReject(std::span(raw).first(n)).code(), Code::kProtocolError);
  raw[6] = std::byte{0};  // code OK is not a reject
  EXPECT_EQ(DecodeReject(raw).code(), Code::kProtocolError);
  raw[6] = std::byte{200};
  EXPECT_EQ(DecodeReject(raw).code(), Code::kProtocolError);
}

}  // namespace
}  // namespace mf::rdma::wire
