#include "nbd/protocol.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

namespace mf::nbd {
namespace {

Status Truncated(std::string_view what, size_t need, size_t have) {
  return InvalidArgument(std::string(what) + " needs " + std::to_string(need) + " bytes, got " +
                         std::to_string(have));
}

void AppendBytes(std::span<const std::byte> bytes, std::vector<std::byte>* out) {
  out->insert(out->end(), bytes.begin(), bytes.end());
}

std::span<const std::byte> AsBytes(std::string_view s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

}  // namespace

void StoreBe16(std::byte* out, uint16_t v) {
  out[0] = static_cast<std::byte>(v >> 8);
  out[1] = static_cast<std::byte>(v);
}
void StoreBe32(std::byte* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<std::byte>(v >> (24 - 8 * i));
}
void StoreBe64(std::byte* out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>(v >> (56 - 8 * i));
}
uint16_t LoadBe16(const std::byte* in) {
  return static_cast<uint16_t>((std::to_integer<uint32_t>(in[0]) << 8) | std::to_integer<uint32_t>(in[1]));
}
uint32_t LoadBe32(const std::byte* in) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | std::to_integer<uint32_t>(in[i]);
  return v;
}
uint64_t LoadBe64(const std::byte* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | std::to_integer<uint64_t>(in[i]);
  return v;
}

// ---- Encoders ---------------------------------------------------------------------------------------

void EncodeServerGreeting(const ServerGreeting& g, std::span<std::byte, kServerGreetingSize> out) {
  StoreBe64(out.data(), kNbdMagic);
  StoreBe64(out.data() + 8, kOptionMagic);
  StoreBe16(out.data() + 16, g.handshake_flags);
}

void EncodeOptionReplyHeader(const OptionReplyHeader& h, std::span<std::byte, kOptionReplyHeaderSize> out) {
  StoreBe64(out.data(), kOptionReplyMagic);
  StoreBe32(out.data() + 8, h.option);
  StoreBe32(out.data() + 12, h.type);
  StoreBe32(out.data() + 16, h.length);
}

void EncodeExportNameReply(uint64_t size, uint16_t transmission_flags,
                           std::span<std::byte, kExportNameReplySize> out) {
  StoreBe64(out.data(), size);
  StoreBe16(out.data() + 8, transmission_flags);
}

void EncodeInfoExport(uint64_t size, uint16_t transmission_flags, std::span<std::byte, kInfoExportSize> out) {
  StoreBe16(out.data(), kInfoExport);
  StoreBe64(out.data() + 2, size);
  StoreBe16(out.data() + 10, transmission_flags);
}

void EncodeInfoBlockSize(const BlockSizeInfo& b, std::span<std::byte, kInfoBlockSizeSize> out) {
  StoreBe16(out.data(), kInfoBlockSize);
  StoreBe32(out.data() + 2, b.minimum);
  StoreBe32(out.data() + 6, b.preferred);
  StoreBe32(out.data() + 10, b.maximum);
}

void AppendOptionReply(uint32_t option, uint32_t type, std::span<const std::byte> payload,
                       std::vector<std::byte>* out) {
  std::array<std::byte, kOptionReplyHeaderSize> h{};
  EncodeOptionReplyHeader({option, type, static_cast<uint32_t>(payload.size())}, h);
  AppendBytes(h, out);
  AppendBytes(payload, out);
}

void AppendRepServer(uint32_t option, std::string_view name, std::string_view description,
                     std::vector<std::byte>* out) {
  name = name.substr(0, kMaxStringLength);
  description = description.substr(0, kMaxStringLength);
  std::vector<std::byte> payload(4);
  StoreBe32(payload.data(), static_cast<uint32_t>(name.size()));
  AppendBytes(AsBytes(name), &payload);
  AppendBytes(AsBytes(description), &payload);
  AppendOptionReply(option, kRepServer, payload, out);
}

void AppendInfoString(uint32_t option, uint16_t info_type, std::string_view text,
                      std::vector<std::byte>* out) {
  text = text.substr(0, kMaxStringLength);
  std::vector<std::byte> payload(2);
  StoreBe16(payload.data(), info_type);
  AppendBytes(AsBytes(text), &payload);
  AppendOptionReply(option, kRepInfo, payload, out);
}

void EncodeSimpleReply(const SimpleReply& r, std::span<std::byte, kSimpleReplySize> out) {
  StoreBe32(out.data(), kSimpleReplyMagic);
  StoreBe32(out.data() + 4, r.error);
  StoreBe64(out.data() + 8, r.handle);
}

void EncodeStructuredReplyHeader(const StructuredReplyHeader& h,
                                 std::span<std::byte, kStructuredReplyHeaderSize> out) {
  StoreBe32(out.data(), kStructuredReplyMagic);
  StoreBe16(out.data() + 4, h.flags);
  StoreBe16(out.data() + 6, h.type);
  StoreBe64(out.data() + 8, h.handle);
  StoreBe32(out.data() + 16, h.length);
}

void AppendErrorChunk(uint64_t handle, uint16_t flags, uint32_t error, std::string_view message,
                      std::vector<std::byte>* out) {
  message = message.substr(0, kMaxStringLength);
  std::array<std::byte, kStructuredReplyHeaderSize> h{};
  EncodeStructuredReplyHeader(
      {flags, kReplyTypeError, handle, static_cast<uint32_t>(kErrorChunkPrefixSize + message.size())}, h);
  AppendBytes(h, out);
  std::array<std::byte, kErrorChunkPrefixSize> prefix{};
  StoreBe32(prefix.data(), error);
  StoreBe16(prefix.data() + 4, static_cast<uint16_t>(message.size()));
  AppendBytes(prefix, out);
  AppendBytes(AsBytes(message), out);
}

void EncodeClientFlags(uint32_t flags, std::span<std::byte, kClientFlagsSize> out) {
  StoreBe32(out.data(), flags);
}

void EncodeOptionHeader(const OptionHeader& h, std::span<std::byte, kOptionHeaderSize> out) {
  StoreBe64(out.data(), kOptionMagic);
  StoreBe32(out.data() + 8, h.option);
  StoreBe32(out.data() + 12, h.length);
}

void AppendOption(uint32_t option, std::span<const std::byte> data, std::vector<std::byte>* out) {
  std::array<std::byte, kOptionHeaderSize> h{};
  EncodeOptionHeader({option, static_cast<uint32_t>(data.size())}, h);
  AppendBytes(h, out);
  AppendBytes(data, out);
}

std::vector<std::byte> EncodeInfoRequest(const InfoRequest& r) {
  std::vector<std::byte> out(4);
  StoreBe32(out.data(), static_cast<uint32_t>(r.name.size()));
  AppendBytes(AsBytes(r.name), &out);
  std::array<std::byte, 2> n{};
  StoreBe16(n.data(), static_cast<uint16_t>(r.info_types.size()));
  AppendBytes(n, &out);
  for (uint16_t t : r.info_types) {
    StoreBe16(n.data(), t);
    AppendBytes(n, &out);
  }
  return out;
}

void EncodeRequest(const Request& r, std::span<std::byte, kRequestSize> out) {
  StoreBe32(out.data(), kRequestMagic);
  StoreBe16(out.data() + 4, r.flags);
  StoreBe16(out.data() + 6, r.type);
  StoreBe64(out.data() + 8, r.handle);
  StoreBe64(out.data() + 16, r.offset);
  StoreBe32(out.data() + 24, r.length);
}

std::vector<std::byte> EncodeMetaContextRequest(const MetaContextRequest& r) {
  std::vector<std::byte> out(4);
  StoreBe32(out.data(), static_cast<uint32_t>(r.export_name.size()));
  AppendBytes(AsBytes(r.export_name), &out);
  std::array<std::byte, 4> n{};
  StoreBe32(n.data(), static_cast<uint32_t>(r.queries.size()));
  AppendBytes(n, &out);
  for (const std::string& q : r.queries) {
    StoreBe32(n.data(), static_cast<uint32_t>(q.size()));
    AppendBytes(n, &out);
    AppendBytes(AsBytes(q), &out);
  }
  return out;
}

void AppendRepMetaContext(uint32_t option, uint32_t id, std::string_view name, std::vector<std::byte>* out) {
  name = name.substr(0, kMaxStringLength);
  std::vector<std::byte> payload(4);
  StoreBe32(payload.data(), id);
  AppendBytes(AsBytes(name), &payload);
  AppendOptionReply(option, kRepMetaContext, payload, out);
}

// ---- Decoders: client bytes -----------------------------------------------------------------------

Result<uint32_t> DecodeClientFlags(std::span<const std::byte> in) {
  if (in.size() < kClientFlagsSize) return Truncated("client flags", kClientFlagsSize, in.size());
  uint32_t flags = LoadBe32(in.data());
  if ((flags & ~kKnownClientFlags) != 0) {
    return ProtocolError(fmt::format("unknown client flags {:#x}", flags));
  }
  return flags;
}

Result<OptionHeader> DecodeOptionHeader(std::span<const std::byte> in) {
  if (in.size() < kOptionHeaderSize) return Truncated("option header", kOptionHeaderSize, in.size());
  if (LoadBe64(in.data()) != kOptionMagic) return ProtocolError("option without the IHAVEOPT magic");
  return OptionHeader{LoadBe32(in.data() + 8), LoadBe32(in.data() + 12)};
}

Result<InfoRequest> DecodeInfoRequest(std::span<const std::byte> in) {
  if (in.size() < kInfoRequestFixedSize)
    return Truncated("NBD_OPT_INFO/GO data", kInfoRequestFixedSize, in.size());
  const uint32_t name_length = LoadBe32(in.data());
  if (name_length > in.size() - kInfoRequestFixedSize) {
    return ProtocolError("export name of " + std::to_string(name_length) + " bytes overruns the option data");
  }
  if (name_length > kMaxStringLength) return ProtocolError("export name longer than 4096 bytes");
  InfoRequest r;
  r.name.assign(reinterpret_cast<const char*>(in.data() + 4), name_length);
  const size_t at = 4 + size_t{name_length};
  const uint16_t count = LoadBe16(in.data() + at);
  if (in.size() - at - 2 != size_t{count} * 2) {
    return ProtocolError(std::to_string(count) + " information requests do not match the option length");
  }
  if (r.name.find('\0') != std::string::npos) return ProtocolError("export name contains NUL");
  r.info_types.reserve(count);
  for (size_t i = 0; i < count; ++i) r.info_types.push_back(LoadBe16(in.data() + at + 2 + 2 * i));
  return r;
}

Result<MetaContextRequest> DecodeMetaContextRequest(std::span<const std::byte> in) {
  if (in.size() < kMetaContextFixedSize) {
    return Truncated("NBD_OPT_*_META_CONTEXT data", kMetaContextFixedSize, in.size());
  }
  size_t at = 0;
  // A length-prefixed string at `at`, checked against what is left.
  auto take_string = [&](std::string* out) -> Status {
    if (in.size() - at < 4) return ProtocolError("meta context data ends inside a length");
    const uint32_t length = LoadBe32(in.data() + at);
    at += 4;
    if (length > in.size() - at) return ProtocolError("meta context string overruns the option data");
    if (length > kMaxStringLength) return ProtocolError("meta context string longer than 4096 bytes");
    out->assign(reinterpret_cast<const char*>(in.data() + at), length);
    at += length;
    if (out->find('\0') != std::string::npos) return ProtocolError("meta context string contains NUL");
    return Status::Ok();
  };
  MetaContextRequest r;
  MF_RETURN_IF_ERROR(take_string(&r.export_name));
  if (in.size() - at < 4) return ProtocolError("meta context data ends before the query count");
  const uint32_t count = LoadBe32(in.data() + at);
  at += 4;
  if (count > kMaxMetaQueries) return ProtocolError(std::to_string(count) + " meta context queries");
  r.queries.resize(count);
  for (std::string& q : r.queries) MF_RETURN_IF_ERROR(take_string(&q));
  if (at != in.size()) return ProtocolError("trailing bytes after the meta context queries");
  return r;
}

Result<Request> DecodeRequest(std::span<const std::byte> in) {
  if (in.size() < kRequestSize) return Truncated("request", kRequestSize, in.size());
  if (LoadBe32(in.data()) != kRequestMagic) return ProtocolError("request without NBD_REQUEST_MAGIC");
  Request r;
  r.flags = LoadBe16(in.data() + 4);
  r.type = LoadBe16(in.data() + 6);
  r.handle = LoadBe64(in.data() + 8);
  r.offset = LoadBe64(in.data() + 16);
  r.length = LoadBe32(in.data() + 24);
  return r;
}

// ---- Decoders: server bytes -----------------------------------------------------------------------

Result<ServerGreeting> DecodeServerGreeting(std::span<const std::byte> in) {
  if (in.size() < kServerGreetingSize) return Truncated("server greeting", kServerGreetingSize, in.size());
  if (LoadBe64(in.data()) != kNbdMagic) return ProtocolError("greeting without NBDMAGIC");
  if (LoadBe64(in.data() + 8) != kOptionMagic)
    return ProtocolError("greeting without IHAVEOPT (not newstyle)");
  return ServerGreeting{LoadBe16(in.data() + 16)};
}

Result<OptionReplyHeader> DecodeOptionReplyHeader(std::span<const std::byte> in) {
  if (in.size() < kOptionReplyHeaderSize) return Truncated("option reply", kOptionReplyHeaderSize, in.size());
  if (LoadBe64(in.data()) != kOptionReplyMagic) return ProtocolError("option reply with a bad magic");
  OptionReplyHeader h{LoadBe32(in.data() + 8), LoadBe32(in.data() + 12), LoadBe32(in.data() + 16)};
  if (h.length > kMaxOptionLength + kMaxStringLength) {
    return ProtocolError("option reply of " + std::to_string(h.length) + " bytes is too long");
  }
  return h;
}

Result<SimpleReply> DecodeSimpleReply(std::span<const std::byte> in) {
  if (in.size() < kSimpleReplySize) return Truncated("simple reply", kSimpleReplySize, in.size());
  if (LoadBe32(in.data()) != kSimpleReplyMagic) return ProtocolError("simple reply with a bad magic");
  return SimpleReply{LoadBe32(in.data() + 4), LoadBe64(in.data() + 8)};
}

Result<StructuredReplyHeader> DecodeStructuredReplyHeader(std::span<const std::byte> in) {
  if (in.size() < kStructuredReplyHeaderSize) {
    return Truncated("structured reply", kStructuredReplyHeaderSize, in.size());
  }
  if (LoadBe32(in.data()) != kStructuredReplyMagic) return ProtocolError("structured reply with a bad magic");
  StructuredReplyHeader h{LoadBe16(in.data() + 4), LoadBe16(in.data() + 6), LoadBe64(in.data() + 8),
                          LoadBe32(in.data() + 16)};
  if (h.length > kMaxChunkPayload) return ProtocolError("structured reply chunk too long");
  return h;
}

Result<std::pair<uint64_t, uint16_t>> DecodeInfoExport(std::span<const std::byte> in) {
  if (in.size() != kInfoExportSize) return Truncated("NBD_INFO_EXPORT", kInfoExportSize, in.size());
  if (LoadBe16(in.data()) != kInfoExport) return ProtocolError("not NBD_INFO_EXPORT");
  return std::pair<uint64_t, uint16_t>(LoadBe64(in.data() + 2), LoadBe16(in.data() + 10));
}

Result<BlockSizeInfo> DecodeInfoBlockSize(std::span<const std::byte> in) {
  if (in.size() != kInfoBlockSizeSize) return Truncated("NBD_INFO_BLOCK_SIZE", kInfoBlockSizeSize, in.size());
  if (LoadBe16(in.data()) != kInfoBlockSize) return ProtocolError("not NBD_INFO_BLOCK_SIZE");
  return BlockSizeInfo{LoadBe32(in.data() + 2), LoadBe32(in.data() + 6), LoadBe32(in.data() + 10)};
}

Result<ErrorChunk> DecodeErrorChunk(std::span<const std::byte> in) {
  if (in.size() < kErrorChunkPrefixSize) return Truncated("error chunk", kErrorChunkPrefixSize, in.size());
  ErrorChunk c;
  c.error = LoadBe32(in.data());
  const uint16_t length = LoadBe16(in.data() + 4);
  if (c.error == 0) return ProtocolError("error chunk with error 0");
  if (length != in.size() - kErrorChunkPrefixSize)
    return ProtocolError("error chunk message length mismatch");
  if (length > kMaxStringLength) return ProtocolError("error message longer than 4096 bytes");
  c.message.assign(reinterpret_cast<const char*>(in.data() + kErrorChunkPrefixSize), length);
  return c;
}

std::string_view OptionName(uint32_t option) {
  switch (option) {
    case kOptExportName: return "EXPORT_NAME";
    case kOptAbort: return "ABORT";
    case kOptList: return "LIST";
    case kOptPeekExport: return "PEEK_EXPORT";
    case kOptStartTls: return "STARTTLS";
    case kOptInfo: return "INFO";
    case kOptGo: return "GO";
    case kOptStructuredReply: return "STRUCTURED_REPLY";
    case kOptListMetaContext: return "LIST_META_CONTEXT";
    case kOptSetMetaContext: return "SET_META_CONTEXT";
    default: return "unknown";
  }
}

std::string_view CommandName(uint16_t type) {
  switch (type) {
    case kCmdRead: return "READ";
    case kCmdWrite: return "WRITE";
    case kCmdDisc: return "DISC";
    case kCmdFlush: return "FLUSH";
    case kCmdTrim: return "TRIM";
    case kCmdCache: return "CACHE";
    case kCmdWriteZeroes: return "WRITE_ZEROES";
    case kCmdBlockStatus: return "BLOCK_STATUS";
    default: return "unknown";
  }
}

}  // namespace mf::nbd
