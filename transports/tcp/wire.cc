#include "transports/tcp/wire.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "fabric/le_codec.h"

namespace mf::tcp::wire {
namespace {

using fabric::Reader;
using fabric::Writer;

void StoreLe(std::byte* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}

Status Malformed(std::string_view what) {
  return ProtocolError(fmt::format("malformed {}", what));
}

// Requires the whole payload to have been consumed.
Status Done(const Reader& r, std::string_view what) {
  if (r.remaining() != 0) return ProtocolError(fmt::format("{}: {} trailing bytes", what, r.remaining()));
  return Status::Ok();
}

bool ValidBacking(uint8_t b) {
  return b <= static_cast<uint8_t>(fabric::BackingKind::kFile);
}

void PutPrefix(uint16_t version, uint8_t b6, uint8_t b7, Writer& w) {
  w.Bytes(kMagic);
  w.U16(version);
  w.U8(b6);
  w.U8(b7);
}

bool GetPrefix(Reader& r, uint16_t* version, uint8_t* b6, uint8_t* b7, Status* error) {
  std::array<uint8_t, 4> magic{};
  if (!r.Bytes(magic) || !r.U16(version) || !r.U8(b6) || !r.U8(b7)) {
    *error = Internal("short hello prefix");
    return false;
  }
  if (magic != kMagic) {
    *error = ProtocolError("bad magic: not a memfabric peer");
    return false;
  }
  return true;
}

}  // namespace

// ---- Hellos ----------------------------------------------------------------------------

void EncodeClientHello(const ClientHello& hello, std::span<std::byte, kClientHelloSize> out) {
  std::byte* p = out.data();
  std::memcpy(p, kMagic.data(), kMagic.size());
  StoreLe(p + 4, hello.version, 2);
  p[6] = static_cast<std::byte>(hello.channel);
  p[7] = std::byte{0};
  std::memcpy(p + kHelloPrefixSize, hello.nonce.data(), hello.nonce.size());
}

Result<size_t> DecodeClientHello(std::span<const std::byte> in, ClientHello* out) {
  if (in.size() < kHelloPrefixSize) return size_t{0};
  Reader r(in);
  uint16_t version = 0;
  uint8_t channel = 0;
  uint8_t reserved = 0;
  Status error;
  if (!GetPrefix(r, &version, &channel, &reserved, &error)) return error;
  out->version = version;
  if (version != kVersion) return kHelloPrefixSize;
  if (in.size() < kClientHelloSize) return size_t{0};
  if (channel != static_cast<uint8_t>(Channel::kControl) && channel != static_cast<uint8_t>(Channel::kData)) {
    return ProtocolError(fmt::format("unknown channel {}", channel));
  }
  if (reserved != 0) return Malformed("client hello (reserved byte set)");
  out->channel = static_cast<Channel>(channel);
  if (!r.Bytes(out->nonce)) return Malformed("client hello");
  return kClientHelloSize;
}

void EncodeServerHello(const ServerHello& hello, std::vector<std::byte>* out) {
  Writer w(out);
  PutPrefix(hello.version, static_cast<uint8_t>(hello.status), static_cast<uint8_t>(hello.auth), w);
  w.Bytes(hello.nonce);
  std::string_view msg = hello.message;
  if (msg.size() > kMaxHelloMessage) msg = msg.substr(0, kMaxHelloMessage);
  w.U16(static_cast<uint16_t>(msg.size()));
  w.U16(0);
  w.Text(msg);
}

Result<size_t> DecodeServerHello(std::span<const std::byte> in, ServerHello* out) {
  if (in.size() < kHelloPrefixSize) return size_t{0};
  Reader r(in);
  uint16_t version = 0;
  uint8_t status = 0;
  uint8_t auth = 0;
  Status error;
  if (!GetPrefix(r, &version, &status, &auth, &error)) return error;
  out->version = version;
  out->status = status <= kMaxWireCode ? static_cast<Code>(status) : Code::kProtocolError;
  if (version != kVersion) return kHelloPrefixSize;
  if (status > kMaxWireCode) return ProtocolError(fmt::format("server hello: unknown status {}", status));
  if (auth > static_cast<uint8_t>(AuthMode::kHmacSha256)) {
    return ProtocolError(fmt::format("server hello: unknown auth mode {}", auth));
  }
  if (in.size() < kServerHelloFixedSize) return size_t{0};
  uint16_t msg_len = 0;
  uint16_t reserved = 0;
  if (!r.Bytes(out->nonce) || !r.U16(&msg_len) || !r.U16(&reserved)) return Malformed("server hello");
  if (reserved != 0) return Malformed("server hello (reserved bytes set)");
  if (msg_len > kMaxHelloMessage)
    return ProtocolError(fmt::format("server hello: message of {} bytes", msg_len));
  if (in.size() < kServerHelloFixedSize + msg_len) return size_t{0};
  out->auth = static_cast<AuthMode>(auth);
  out->message.assign(reinterpret_cast<const char*>(in.data() + kServerHelloFixedSize), msg_len);
  return kServerHelloFixedSize + msg_len;
}

// ---- Frames ----------------------------------------------------------------------------

bool IsKnownOpcode(uint8_t opcode) {
  switch (static_cast<Opcode>(opcode)) {
    case Opcode::kAuth:
    case Opcode::kList:
    case Opcode::kStat:
    case Opcode::kCreate:
    case Opcode::kDelete:
    case Opcode::kOpen:
    case Opcode::kAttach:
    case Opcode::kRead:
    case Opcode::kWrite:
    case Opcode::kFlush:
    case Opcode::kClose: return true;
  }
  return false;
}

std::string OpcodeName(uint8_t opcode) {
  switch (static_cast<Opcode>(opcode)) {
    case Opcode::kAuth: return "AUTH";
    case Opcode::kList: return "LIST";
    case Opcode::kStat: return "STAT";
    case Opcode::kCreate: return "CREATE";
    case Opcode::kDelete: return "DELETE";
    case Opcode::kOpen: return "OPEN";
    case Opcode::kAttach: return "ATTACH";
    case Opcode::kRead: return "READ";
    case Opcode::kWrite: return "WRITE";
    case Opcode::kFlush: return "FLUSH";
    case Opcode::kClose: return "CLOSE";
  }
  return fmt::format("0x{:02x}", opcode);
}

void EncodeFrameHeader(const FrameHeader& header, std::span<std::byte, kFrameHeaderSize> out) {
  // Written in place: this runs once per request on the data path and must not allocate.
  std::byte* p = out.data();
  p[0] = static_cast<std::byte>(header.opcode);
  p[1] = static_cast<std::byte>(header.reply ? kFlagReply : 0);
  p[2] = static_cast<std::byte>(header.status);
  p[3] = std::byte{0};
  StoreLe(p + 4, header.payload_length, 4);
  StoreLe(p + 8, header.tag, 8);
  StoreLe(p + 16, header.offset, 8);
  StoreLe(p + 24, header.length, 4);
  StoreLe(p + 28, 0, 4);
}

Result<size_t> DecodeFrameHeader(std::span<const std::byte> in, FrameHeader* out) {
  if (in.size() < kFrameHeaderSize) return size_t{0};
  Reader r(in.first(kFrameHeaderSize));
  uint8_t opcode = 0, flags = 0, status = 0, reserved8 = 0;
  uint32_t payload_length = 0, length = 0, reserved32 = 0;
  uint64_t tag = 0, offset = 0;
  if (!r.U8(&opcode) || !r.U8(&flags) || !r.U8(&status) || !r.U8(&reserved8) || !r.U32(&payload_length) ||
      !r.U64(&tag) || !r.U64(&offset) || !r.U32(&length) || !r.U32(&reserved32)) {
    return Malformed("frame header");
  }
  if ((flags & ~kKnownFlags) != 0)
    return ProtocolError(fmt::format("frame header: unknown flags 0x{:02x}", flags));
  if (reserved8 != 0 || reserved32 != 0) return Malformed("frame header (reserved bytes set)");
  const bool reply = (flags & kFlagReply) != 0;
  if (status > kMaxWireCode) return ProtocolError(fmt::format("frame header: unknown status {}", status));
  if (!reply && status != 0) return ProtocolError("frame header: status set in a request");
  if (payload_length > kMaxPayload) {
    return ProtocolError(
        fmt::format("frame payload of {} bytes exceeds the maximum of {}", payload_length, kMaxPayload));
  }
  out->opcode = opcode;
  out->reply = reply;
  out->status = static_cast<Code>(status);
  out->payload_length = payload_length;
  out->tag = tag;
  out->offset = offset;
  out->length = length;
  return kFrameHeaderSize;
}

void AppendFrame(const FrameHeader& header, std::span<const std::byte> payload, std::vector<std::byte>* out) {
  std::array<std::byte, kFrameHeaderSize> h{};
  EncodeFrameHeader(header, h);
  out->insert(out->end(), h.begin(), h.end());
  out->insert(out->end(), payload.begin(), payload.end());
}

// ---- Payloads --------------------------------------------------------------------------

void EncodeProof(const fabric::Proof& proof, std::vector<std::byte>* out) {
  Writer(out).Bytes(proof);
}

Result<fabric::Proof> DecodeProof(std::span<const std::byte> in) {
  fabric::Proof proof{};
  Reader r(in);
  if (!r.Bytes(proof)) return Malformed("proof");
  MF_RETURN_IF_ERROR(Done(r, "proof"));
  return proof;
}

void EncodeName(std::string_view name, std::vector<std::byte>* out) {
  Writer(out).String16(name.substr(0, fabric::kMaxRegionNameLength));
}

Result<std::string> DecodeName(std::span<const std::byte> in) {
  Reader r(in);
  std::string name;
  if (!r.String16(fabric::kMaxRegionNameLength, &name)) return Malformed("region name");
  MF_RETURN_IF_ERROR(Done(r, "region name"));
  return name;
}

namespace {

bool GetRegionInfo(Reader& r, fabric::RegionInfo* info) {
  uint8_t backing = 0, flags = 0;
  if (!r.String16(fabric::kMaxRegionNameLength, &info->name) || !r.U64(&info->size) ||
      !r.U64(&info->generation) || !r.U8(&backing) || !r.U8(&flags)) {
    return false;
  }
  if (!ValidBacking(backing) || (flags & ~1u) != 0) return false;
  info->backing = static_cast<fabric::BackingKind>(backing);
  info->has_writer = (flags & 1u) != 0;
  return true;
}

}  // namespace

void EncodeRegionInfo(const fabric::RegionInfo& info, std::vector<std::byte>* out) {
  Writer w(out);
  w.String16(std::string_view(info.name).substr(0, fabric::kMaxRegionNameLength));
  w.U64(info.size);
  w.U64(info.generation);
  w.U8(static_cast<uint8_t>(info.backing));
  w.U8(info.has_writer ? 1 : 0);
}

Result<fabric::RegionInfo> DecodeRegionInfo(std::span<const std::byte> in) {
  Reader r(in);
  fabric::RegionInfo info;
  if (!GetRegionInfo(r, &info)) return Malformed("region info");
  MF_RETURN_IF_ERROR(Done(r, "region info"));
  return info;
}

void EncodeRegionList(std::span<const fabric::RegionInfo> regions, std::vector<std::byte>* out) {
  Writer(out).U32(static_cast<uint32_t>(regions.size()));
  for (const auto& info : regions) EncodeRegionInfo(info, out);
}

Result<std::vector<fabric::RegionInfo>> DecodeRegionList(std::span<const std::byte> in) {
  Reader r(in);
  uint32_t count = 0;
  if (!r.U32(&count)) return Malformed("region list");
  // Bound the count by what the bytes could hold before reserving anything.
  if (count > kMaxListEntries || count > r.remaining() / kMinRegionInfoSize) {
    return ProtocolError(fmt::format("region list: count {} does not fit in {} bytes", count, in.size()));
  }
  std::vector<fabric::RegionInfo> regions(count);
  for (auto& info : regions) {
    if (!GetRegionInfo(r, &info)) return Malformed("region list entry");
  }
  MF_RETURN_IF_ERROR(Done(r, "region list"));
  return regions;
}

void EncodeRegionSpec(const fabric::RegionSpec& spec, std::vector<std::byte>* out) {
  Writer w(out);
  w.String16(std::string_view(spec.name).substr(0, fabric::kMaxRegionNameLength));
  w.U64(spec.size);
  w.U8(static_cast<uint8_t>(spec.backing));
  w.String16(std::string_view(spec.path).substr(0, kMaxPathLength));
}

Result<fabric::RegionSpec> DecodeRegionSpec(std::span<const std::byte> in) {
  Reader r(in);
  fabric::RegionSpec spec;
  uint8_t backing = 0;
  if (!r.String16(fabric::kMaxRegionNameLength, &spec.name) || !r.U64(&spec.size) || !r.U8(&backing) ||
      !r.String16(kMaxPathLength, &spec.path)) {
    return Malformed("region spec");
  }
  if (!ValidBacking(backing)) return ProtocolError(fmt::format("region spec: unknown backing {}", backing));
  spec.backing = static_cast<fabric::BackingKind>(backing);
  MF_RETURN_IF_ERROR(Done(r, "region spec"));
  return spec;
}

void EncodeOpenRequest(const OpenRequest& request, std::vector<std::byte>* out) {
  Writer w(out);
  w.U8(request.writable ? 1 : 0);
  w.String16(std::string_view(request.name).substr(0, fabric::kMaxRegionNameLength));
}

Result<OpenRequest> DecodeOpenRequest(std::span<const std::byte> in) {
  Reader r(in);
  OpenRequest request;
  uint8_t flags = 0;
  if (!r.U8(&flags) || (flags & ~1u) != 0 || !r.String16(fabric::kMaxRegionNameLength, &request.name)) {
    return Malformed("open request");
  }
  request.writable = (flags & 1u) != 0;
  MF_RETURN_IF_ERROR(Done(r, "open request"));
  return request;
}

void EncodeOpenReply(const OpenReply& reply, std::vector<std::byte>* out) {
  EncodeRegionInfo(reply.info, out);
  Writer w(out);
  w.Bytes(reply.token);
  w.U32(reply.max_transfer);
  w.U16(reply.rdma_port);
}

Result<OpenReply> DecodeOpenReply(std::span<const std::byte> in) {
  Reader r(in);
  OpenReply reply;
  if (!GetRegionInfo(r, &reply.info) || !r.Bytes(reply.token) || !r.U32(&reply.max_transfer) ||
      !r.U16(&reply.rdma_port)) {
    return Malformed("open reply");
  }
  if (reply.max_transfer == 0 || reply.max_transfer > kMaxPayload) {
    return ProtocolError(fmt::format("open reply: max transfer {} out of range", reply.max_transfer));
  }
  MF_RETURN_IF_ERROR(Done(r, "open reply"));
  return reply;
}

void EncodeToken(const Token& token, std::vector<std::byte>* out) {
  Writer(out).Bytes(token);
}

Result<Token> DecodeToken(std::span<const std::byte> in) {
  Reader r(in);
  Token token{};
  if (!r.Bytes(token)) return Malformed("token");
  MF_RETURN_IF_ERROR(Done(r, "token"));
  return token;
}

void EncodeAttachReply(const AttachReply& reply, std::vector<std::byte>* out) {
  Writer w(out);
  w.U64(reply.size);
  w.U64(reply.generation);
  w.U8(reply.writable ? 1 : 0);
}

Result<AttachReply> DecodeAttachReply(std::span<const std::byte> in) {
  Reader r(in);
  AttachReply reply;
  uint8_t flags = 0;
  if (!r.U64(&reply.size) || !r.U64(&reply.generation) || !r.U8(&flags) || (flags & ~1u) != 0) {
    return Malformed("attach reply");
  }
  reply.writable = (flags & 1u) != 0;
  MF_RETURN_IF_ERROR(Done(r, "attach reply"));
  return reply;
}

void EncodeMessage(std::string_view message, std::vector<std::byte>* out) {
  Writer(out).Text(message.substr(0, kMaxMessageSize));
}

Result<std::string> DecodeMessage(std::span<const std::byte> in) {
  if (in.size() > kMaxMessageSize) return ProtocolError(fmt::format("error message of {} bytes", in.size()));
  return std::string(reinterpret_cast<const char*>(in.data()), in.size());
}

Status ReplyStatus(const FrameHeader& header, std::span<const std::byte> payload) {
  if (header.status == Code::kOk) return Status::Ok();
  auto message = DecodeMessage(payload);
  if (!message.ok()) return message.status();
  return Status(header.status, fmt::format("server: {}", *message));
}

}  // namespace mf::tcp::wire
