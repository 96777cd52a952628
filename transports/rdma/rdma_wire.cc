#include "transports/rdma/rdma_wire.h"

#include <fmt/format.h>

#include <algorithm>

#include "fabric/le_codec.h"

namespace mf::rdma::wire {
namespace {

using fabric::Reader;
using fabric::Writer;

constexpr uint8_t kMaxCode = static_cast<uint8_t>(Code::kInternal);

void PutHeader(Writer& w, uint16_t version) {
  w.Bytes(kMagic);
  w.U16(version);
}

Status GetHeader(Reader& r, std::string_view what, uint16_t* version) {
  std::array<uint8_t, 4> magic{};
  if (!r.Bytes(magic) || !r.U16(version)) return ProtocolError(fmt::format("{}: too short", what));
  if (magic != kMagic) return ProtocolError(fmt::format("{}: bad magic: not a memfabric peer", what));
  return Status::Ok();
}

// Whatever follows the fields must be padding.
Status OnlyPadding(std::span<const std::byte> rest, std::string_view what) {
  if (std::any_of(rest.begin(), rest.end(), [](std::byte b) { return b != std::byte{0}; })) {
    return ProtocolError(fmt::format("{}: non-zero bytes after the fields", what));
  }
  return Status::Ok();
}

}  // namespace

std::vector<std::byte> EncodeConnectRequest(const ConnectRequest& request) {
  std::vector<std::byte> out;
  Writer w(&out);
  PutHeader(w, request.version);
  w.U16(0);  // flags
  w.Bytes(request.token);
  return out;
}

Result<ConnectRequest> DecodeConnectRequest(std::span<const std::byte> in) {
  constexpr std::string_view kWhat = "rdma connect request";
  Reader r(in);
  ConnectRequest request;
  MF_RETURN_IF_ERROR(GetHeader(r, kWhat, &request.version));
  if (request.version != kVersion) return request;  // the rest is the other version's
  uint16_t flags = 0;
  if (!r.U16(&flags) || !r.Bytes(request.token)) return ProtocolError(fmt::format("{}: too short", kWhat));
  if (flags != 0) return ProtocolError(fmt::format("{}: unknown flags {:#x}", kWhat, flags));
  MF_RETURN_IF_ERROR(OnlyPadding(in.subspan(kConnectRequestSize), kWhat));
  return request;
}

std::vector<std::byte> EncodeAccept(const Accept& accept) {
  std::vector<std::byte> out;
  Writer w(&out);
  PutHeader(w, kVersion);
  w.U16(accept.writable ? kAcceptWritable : 0);
  w.U64(accept.addr);
  w.U32(accept.rkey);
  w.U32(0);
  w.U64(accept.size);
  w.U64(accept.generation);
  return out;
}

Result<Accept> DecodeAccept(std::span<const std::byte> in) {
  constexpr std::string_view kWhat = "rdma accept";
  Reader r(in);
  uint16_t version = 0;
  MF_RETURN_IF_ERROR(GetHeader(r, kWhat, &version));
  if (version != kVersion) {
    return Unsupported(
        fmt::format("{}: server speaks RDMA version {}, this client {}", kWhat, version, kVersion));
  }
  Accept a;
  uint16_t flags = 0;
  uint32_t pad = 0;
  if (!r.U16(&flags) || !r.U64(&a.addr) || !r.U32(&a.rkey) || !r.U32(&pad) || !r.U64(&a.size) ||
      !r.U64(&a.generation)) {
    return ProtocolError(fmt::format("{}: too short", kWhat));
  }
  if ((flags & ~kAcceptWritable) != 0 || pad != 0) {
    return ProtocolError(fmt::format("{}: unknown flags or reserved bits set", kWhat));
  }
  if (a.size == 0 || a.rkey == 0 || a.addr + a.size < a.addr) {
    return ProtocolError(fmt::format("{}: invalid region (size {}, rkey {:#x})", kWhat, a.size, a.rkey));
  }
  a.writable = (flags & kAcceptWritable) != 0;
  MF_RETURN_IF_ERROR(OnlyPadding(in.subspan(kAcceptSize), kWhat));
  return a;
}

std::vector<std::byte> EncodeReject(const Status& status) {
  std::vector<std::byte> out;
  Writer w(&out);
  PutHeader(w, kVersion);
  const Code code = status.ok() ? Code::kInternal : status.code();
  std::string_view message = status.message();
  if (message.size() > kMaxRejectMessage) message = message.substr(0, kMaxRejectMessage);
  w.U8(static_cast<uint8_t>(code));
  w.U8(static_cast<uint8_t>(message.size()));
  w.Text(message);
  return out;
}

Status DecodeReject(std::span<const std::byte> in) {
  constexpr std::string_view kWhat = "rdma reject";
  Reader r(in);
  uint16_t version = 0;
  MF_RETURN_IF_ERROR(GetHeader(r, kWhat, &version));
  uint8_t code = 0;
  uint8_t length = 0;
  if (!r.U8(&code) || !r.U8(&length)) return ProtocolError(fmt::format("{}: too short", kWhat));
  if (code == 0 || code > kMaxCode || length > kMaxRejectMessage || r.remaining() < length) {
    return ProtocolError(fmt::format("{}: malformed", kWhat));
  }
  std::string message(length, '\0');
  std::span<uint8_t> bytes(reinterpret_cast<uint8_t*>(message.data()), message.size());
  if (!r.Bytes(bytes)) return ProtocolError(fmt::format("{}: malformed", kWhat));
  MF_RETURN_IF_ERROR(OnlyPadding(in.subspan(kRejectFixedSize + length), kWhat));
  return Status(static_cast<Code>(code), std::move(message));
}

}  // namespace mf::rdma::wire
