// The bytes memfabric puts in rdma_cm private data (docs/rdma.md): the client's connect
// request names an open by its token; the server's accept carries what the client needs
// for one-sided access (address, rkey, size) and its reject carries a Status.
//
// All three start with the magic "MFRD" and a version. The connection manager may pad
// private data with zeros up to a transport's fixed size, so the decoders accept trailing
// zero bytes and reject anything else after the fields. Every decoder is bounds-checked
// and fuzzed (tests/fuzz/fuzz_rdma_wire.cc).
//
// Thread-safety: pure functions.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "fabric/status.h"

namespace mf::rdma::wire {

inline constexpr std::array<uint8_t, 4> kMagic = {'M', 'F', 'R', 'D'};
inline constexpr uint16_t kVersion = 1;
inline constexpr size_t kTokenSize = 32;
using Token = std::array<uint8_t, kTokenSize>;

inline constexpr size_t kConnectRequestSize = 40;  // magic, version, flags, token
inline constexpr size_t kAcceptSize = 40;          // magic, version, flags, addr, rkey, pad, size, gen
inline constexpr size_t kRejectFixedSize = 8;      // magic, version, code, message length
inline constexpr size_t kMaxRejectMessage = 96;
// The smallest private data the connection manager carries (an IB CM REQ through
// rdma_cm leaves 56 bytes); every encoding fits in it.
inline constexpr size_t kMinPrivateData = 56;
static_assert(kConnectRequestSize <= kMinPrivateData && kAcceptSize <= kMinPrivateData);
static_assert(kRejectFixedSize + kMaxRejectMessage <= 148);  // IB CM REJ private data

inline constexpr uint16_t kAcceptWritable = 0x1;

struct ConnectRequest {
  uint16_t version = kVersion;
  Token token{};
};

struct Accept {
  bool writable = false;
  uint64_t addr = 0;  // the region's first byte in the server's registration
  uint32_t rkey = 0;
  uint64_t size = 0;
  uint64_t generation = 0;
};

std::vector<std::byte> EncodeConnectRequest(const ConnectRequest& request);
// A foreign version decodes (so the server can answer kUnsupported naming it); the
// caller checks request.version.
Result<ConnectRequest> DecodeConnectRequest(std::span<const std::byte> in);

std::vector<std::byte> EncodeAccept(const Accept& accept);
// Also rejects a zero size, an rkey of 0 and an address range that wraps.
Result<Accept> DecodeAccept(std::span<const std::byte> in);

// A reject's Status: its code and (truncated) message. An OK status encodes as kInternal.
std::vector<std::byte> EncodeReject(const Status& status);
// The Status the server sent; a ProtocolError when the bytes are not a memfabric reject.
Status DecodeReject(std::span<const std::byte> in);

}  // namespace mf::rdma::wire
