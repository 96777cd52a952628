// libFuzzer target for every decoder of network bytes in transports/tcp/wire.h. Each input
// is fed to all decoders; whatever decodes must re-encode to bytes that decode to the
// same value, and no decoder may read out of bounds or allocate beyond the frame limits.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "transports/tcp/wire.h"

namespace {

using mf::tcp::wire::FrameHeader;

void Check(bool ok) {
  if (!ok) std::abort();
}

void FuzzHellos(std::span<const std::byte> in) {
  namespace wire = mf::tcp::wire;
  wire::ClientHello ch;
  auto c = wire::DecodeClientHello(in, &ch);
  if (c.ok() && *c == wire::kClientHelloSize) {
    std::array<std::byte, wire::kClientHelloSize> raw{};
    wire::EncodeClientHello(ch, raw);
    Check(std::equal(raw.begin(), raw.end(), in.begin()));
  }
  wire::ServerHello sh;
  auto s = wire::DecodeServerHello(in, &sh);
  if (s.ok() && *s > wire::kHelloPrefixSize) {
    std::vector<std::byte> raw;
    wire::EncodeServerHello(sh, &raw);
    Check(raw.size() == *s && std::equal(raw.begin(), raw.end(), in.begin()));
  }
}

void FuzzFrame(std::span<const std::byte> in) {
  namespace wire = mf::tcp::wire;
  FrameHeader h;
  auto r = wire::DecodeFrameHeader(in, &h);
  if (!r.ok() || *r == 0) return;
  Check(h.payload_length <= wire::kMaxPayload);
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  wire::EncodeFrameHeader(h, raw);
  Check(std::equal(raw.begin(), raw.end(), in.begin()));
  auto rest = in.subspan(wire::kFrameHeaderSize);
  if (rest.size() >= h.payload_length) {
    (void)wire::ReplyStatus(h, rest.first(h.payload_length));
  }
}

template <typename T, typename Decode, typename Encode>
void RoundTrip(std::span<const std::byte> in, Decode decode, Encode encode) {
  auto first = decode(in);
  if (!first.ok()) return;
  std::vector<std::byte> raw;
  encode(*first, &raw);
  auto second = decode(std::span<const std::byte>(raw));
  Check(second.ok());
  std::vector<std::byte> again;
  encode(*second, &again);
  Check(raw == again);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace wire = mf::tcp::wire;
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  FuzzHellos(in);
  FuzzFrame(in);
  RoundTrip<mf::fabric::Proof>(in, wire::DecodeProof, wire::EncodeProof);
  RoundTrip<std::string>(in, wire::DecodeName,
                         [](const std::string& s, std::vector<std::byte>* o) { wire::EncodeName(s, o); });
  RoundTrip<mf::fabric::RegionInfo>(in, wire::DecodeRegionInfo, wire::EncodeRegionInfo);
  RoundTrip<std::vector<mf::fabric::RegionInfo>>(
      in, wire::DecodeRegionList,
      [](const std::vector<mf::fabric::RegionInfo>& v, std::vector<std::byte>* o) {
        wire::EncodeRegionList(v, o);
      });
  RoundTrip<mf::fabric::RegionSpec>(in, wire::DecodeRegionSpec, wire::EncodeRegionSpec);
  RoundTrip<wire::OpenRequest>(in, wire::DecodeOpenRequest, wire::EncodeOpenRequest);
  RoundTrip<wire::OpenReply>(in, wire::DecodeOpenReply, wire::EncodeOpenReply);
  RoundTrip<wire::Token>(in, wire::DecodeToken, wire::EncodeToken);
  RoundTrip<wire::AttachReply>(in, wire::DecodeAttachReply, wire::EncodeAttachReply);
  RoundTrip<std::string>(in, wire::DecodeMessage,
                         [](const std::string& s, std::vector<std::byte>* o) { wire::EncodeMessage(s, o); });
  return 0;
}
