// libFuzzer target for every decoder of nbd/protocol.h. The first byte picks the decoder
// (so each one is explored with the whole corpus); the rest is its input. Whatever decodes
// must re-encode to bytes that decode to the same value, and no decoder may read out of
// bounds or accept what its contract forbids.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "nbd/protocol.h"

namespace {

using namespace mf::nbd;

void Check(bool ok) {
  if (!ok) std::abort();
}

void FuzzClientFlags(std::span<const std::byte> in) {
  auto f = DecodeClientFlags(in);
  if (!f.ok()) return;
  Check((*f & ~kKnownClientFlags) == 0);
  std::array<std::byte, kClientFlagsSize> raw{};
  EncodeClientFlags(*f, raw);
  Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
}

void FuzzOptionHeader(std::span<const std::byte> in) {
  auto h = DecodeOptionHeader(in);
  if (!h.ok()) return;
  std::array<std::byte, kOptionHeaderSize> raw{};
  EncodeOptionHeader(*h, raw);
  Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
}

void FuzzInfoRequest(std::span<const std::byte> in) {
  auto r = DecodeInfoRequest(in);
  if (!r.ok()) return;
  Check(r->name.size() <= kMaxStringLength);
  std::vector<std::byte> raw = EncodeInfoRequest(*r);
  Check(raw.size() == in.size() && std::memcmp(raw.data(), in.data(), raw.size()) == 0);
}

void FuzzMetaContext(std::span<const std::byte> in) {
  auto r = DecodeMetaContextRequest(in);
  if (!r.ok()) return;
  Check(r->queries.size() <= kMaxMetaQueries);
  std::vector<std::byte> raw = EncodeMetaContextRequest(*r);
  Check(raw.size() == in.size() && std::memcmp(raw.data(), in.data(), raw.size()) == 0);
}

void FuzzRequest(std::span<const std::byte> in) {
  auto r = DecodeRequest(in);
  if (!r.ok()) return;
  std::array<std::byte, kRequestSize> raw{};
  EncodeRequest(*r, raw);
  Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
}

void FuzzServerSide(std::span<const std::byte> in) {
  if (auto g = DecodeServerGreeting(in); g.ok()) {
    std::array<std::byte, kServerGreetingSize> raw{};
    EncodeServerGreeting(*g, raw);
    Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
  }
  if (auto h = DecodeOptionReplyHeader(in); h.ok()) {
    std::array<std::byte, kOptionReplyHeaderSize> raw{};
    EncodeOptionReplyHeader(*h, raw);
    Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
  }
  if (auto s = DecodeSimpleReply(in); s.ok()) {
    std::array<std::byte, kSimpleReplySize> raw{};
    EncodeSimpleReply(*s, raw);
    Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
  }
  if (auto h = DecodeStructuredReplyHeader(in); h.ok()) {
    std::array<std::byte, kStructuredReplyHeaderSize> raw{};
    EncodeStructuredReplyHeader(*h, raw);
    Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
  }
}

void FuzzPayloads(std::span<const std::byte> in) {
  if (auto e = DecodeInfoExport(in); e.ok()) {
    std::array<std::byte, kInfoExportSize> raw{};
    EncodeInfoExport(e->first, e->second, raw);
    Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
  }
  if (auto b = DecodeInfoBlockSize(in); b.ok()) {
    std::array<std::byte, kInfoBlockSizeSize> raw{};
    EncodeInfoBlockSize(*b, raw);
    Check(std::memcmp(raw.data(), in.data(), raw.size()) == 0);
  }
  if (auto c = DecodeErrorChunk(in); c.ok()) {
    Check(c->error != 0 && c->message.size() == in.size() - kErrorChunkPrefixSize);
    std::vector<std::byte> raw;
    AppendErrorChunk(0, 0, c->error, c->message, &raw);
    Check(raw.size() == kStructuredReplyHeaderSize + in.size());
    Check(std::memcmp(raw.data() + kStructuredReplyHeaderSize, in.data(), in.size()) == 0);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // A copy of exactly the input, so ASan catches any read past its end.
  std::vector<std::byte> bytes(size - 1);
  if (size > 1) std::memcpy(bytes.data(), data + 1, size - 1);
  std::span<const std::byte> in(bytes);
  switch (data[0] % 7) {
    case 0: FuzzClientFlags(in); break;
    case 1: FuzzOptionHeader(in); break;
    case 2: FuzzInfoRequest(in); break;
    case 3: FuzzRequest(in); break;
    case 4: FuzzServerSide(in); break;
    case 5: FuzzMetaContext(in); break;
    default: FuzzPayloads(in); break;
  }
  return 0;
}
