// The memfabric TCP wire protocol, version 1 (documented byte by byte in docs/protocol.md).
//
// A connection starts with a fixed-size ClientHello / ServerHello exchange (magic, version,
// channel, nonces), then an optional AUTH frame, then tagged frames: a 32-byte little-endian
// FrameHeader followed by payload_length bytes. This header holds pure, bounds-checked
// encoders and decoders over byte spans: no sockets, no allocation beyond the decoded
// values, and every length is checked against a named limit before anything is reserved,
// so each decoder can be fed arbitrary bytes (see tests/fuzz/fuzz_tcp_wire.cc).
//
// Decoders of stream prefixes (hellos, frame headers) return the number of bytes consumed,
// 0 when more bytes are needed, or kProtocolError. Decoders of whole payloads return the
// value or kProtocolError; they reject trailing bytes.
//
// Thread-safety: free functions over caller-owned memory; no shared state.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fabric/auth.h"
#include "fabric/os.h"
#include "fabric/region.h"
#include "fabric/remote.h"
#include "fabric/status.h"

namespace mf::tcp::wire {

// ---- Constants -------------------------------------------------------------------------

inline constexpr std::array<uint8_t, 4> kMagic = {0x4D, 0x46, 0x41, 0x42};  // "MFAB"
inline constexpr uint16_t kVersion = 2;                                     // 2: OPEN reply carries rdma_port

// The first kHelloPrefixSize bytes of either hello (magic, version, two bytes) are frozen
// for every future version, so peers of different versions can still tell each other so.
inline constexpr size_t kHelloPrefixSize = 8;
inline constexpr size_t kClientHelloSize = 40;       // prefix + nonce
inline constexpr size_t kServerHelloFixedSize = 44;  // prefix + nonce + msg len + reserved
inline constexpr size_t kMaxHelloMessage = 256;      // human-readable text in a ServerHello
inline constexpr size_t kFrameHeaderSize = 32;
inline constexpr uint32_t kMaxPayload = 1u << 20;  // largest payload of any frame
inline constexpr size_t kMaxFrameSize = kFrameHeaderSize + kMaxPayload;
inline constexpr size_t kTokenSize = 32;         // open token binding data connections
inline constexpr size_t kMaxMessageSize = 1024;  // error message carried by a reply
inline constexpr size_t kMaxPathLength = 4096;   // file path of a kFile region
// Smallest encoded RegionInfo (empty name): bounds a LIST reply's count before reserving.
inline constexpr size_t kMinRegionInfoSize = 2 + 8 + 8 + 1 + 1;
inline constexpr uint32_t kMaxListEntries = kMaxPayload / kMinRegionInfoSize;

static_assert(kClientHelloSize == kHelloPrefixSize + fabric::kNonceSize);
static_assert(kServerHelloFixedSize == kHelloPrefixSize + fabric::kNonceSize + 4);
static_assert(kMaxPayload % kPageSize == 0, "transfers split at whole pages");
static_assert(kMaxFrameSize <= UINT32_MAX);
static_assert(kMaxMessageSize < kMaxPayload && kMaxHelloMessage <= UINT16_MAX);
static_assert(kMaxPathLength <= UINT16_MAX && fabric::kMaxRegionNameLength <= UINT16_MAX);

// ---- Hellos ----------------------------------------------------------------------------

enum class Channel : uint8_t { kControl = 1, kData = 2 };
enum class AuthMode : uint8_t { kNone = 0, kHmacSha256 = 1 };

struct ClientHello {
  uint16_t version = kVersion;
  Channel channel = Channel::kControl;
  fabric::Nonce nonce{};
};

struct ServerHello {
  uint16_t version = kVersion;
  Code status = Code::kOk;
  AuthMode auth = AuthMode::kHmacSha256;
  fabric::Nonce nonce{};
  std::string message;  // at most kMaxHelloMessage bytes; set when status is not OK
};

void EncodeClientHello(const ClientHello& hello, std::span<std::byte, kClientHelloSize> out);
// Consumes the prefix only (kHelloPrefixSize) when the version differs from kVersion:
// out->version then names the peer's version and the rest of the hello is not parsed.
Result<size_t> DecodeClientHello(std::span<const std::byte> in, ClientHello* out);

// Appends the encoded hello; a message longer than kMaxHelloMessage is truncated.
void EncodeServerHello(const ServerHello& hello, std::vector<std::byte>* out);
// As DecodeClientHello: a foreign version consumes only the prefix and sets out->version
// and out->status.
Result<size_t> DecodeServerHello(std::span<const std::byte> in, ServerHello* out);

// ---- Frames ----------------------------------------------------------------------------

enum class Opcode : uint8_t {
  kAuth = 0x01,
  // control channel
  kList = 0x10,
  kStat = 0x11,
  kCreate = 0x12,
  kDelete = 0x13,
  kOpen = 0x14,
  // data channel
  kAttach = 0x20,
  kRead = 0x21,
  kWrite = 0x22,
  kFlush = 0x23,
  kClose = 0x24,
};
bool IsKnownOpcode(uint8_t opcode);
// "READ", "LIST"... or "0x7f" for an unknown opcode.
std::string OpcodeName(uint8_t opcode);

inline constexpr uint8_t kFlagReply = 0x01;
inline constexpr uint8_t kKnownFlags = kFlagReply;
inline constexpr uint8_t kMaxWireCode = static_cast<uint8_t>(Code::kInternal);

struct FrameHeader {
  uint8_t opcode = 0;  // an Opcode, kept raw so unknown opcodes can be answered
  bool reply = false;
  Code status = Code::kOk;  // replies only
  uint32_t payload_length = 0;
  uint64_t tag = 0;     // echoed in the reply
  uint64_t offset = 0;  // READ / WRITE: byte offset in the region
  uint32_t length = 0;  // READ: bytes asked for; 0 otherwise
};

void EncodeFrameHeader(const FrameHeader& header, std::span<std::byte, kFrameHeaderSize> out);
// Rejects unknown flags, non-zero reserved bytes, a status above kMaxWireCode or set in a
// request, and payload_length > kMaxPayload — before the caller allocates anything.
Result<size_t> DecodeFrameHeader(std::span<const std::byte> in, FrameHeader* out);

// Appends header + payload.
void AppendFrame(const FrameHeader& header, std::span<const std::byte> payload, std::vector<std::byte>* out);

// ---- Payloads --------------------------------------------------------------------------

// AUTH request: the client's proof. AUTH reply (OK): the server's proof.
void EncodeProof(const fabric::Proof& proof, std::vector<std::byte>* out);
Result<fabric::Proof> DecodeProof(std::span<const std::byte> in);

// STAT / DELETE request: a region name (u16 length + bytes, at most kMaxRegionNameLength).
void EncodeName(std::string_view name, std::vector<std::byte>* out);
Result<std::string> DecodeName(std::span<const std::byte> in);

// STAT / CREATE reply, and inside LIST and OPEN replies.
void EncodeRegionInfo(const fabric::RegionInfo& info, std::vector<std::byte>* out);
Result<fabric::RegionInfo> DecodeRegionInfo(std::span<const std::byte> in);

// LIST reply: u32 count + RegionInfo each.
void EncodeRegionList(std::span<const fabric::RegionInfo> regions, std::vector<std::byte>* out);
Result<std::vector<fabric::RegionInfo>> DecodeRegionList(std::span<const std::byte> in);

// CREATE request.
void EncodeRegionSpec(const fabric::RegionSpec& spec, std::vector<std::byte>* out);
Result<fabric::RegionSpec> DecodeRegionSpec(std::span<const std::byte> in);

using Token = std::array<uint8_t, kTokenSize>;

struct OpenRequest {
  std::string name;
  bool writable = false;
};
void EncodeOpenRequest(const OpenRequest& request, std::vector<std::byte>* out);
Result<OpenRequest> DecodeOpenRequest(std::span<const std::byte> in);

struct OpenReply {
  fabric::RegionInfo info;
  Token token{};
  uint32_t max_transfer = kMaxPayload;  // 1 .. kMaxPayload
  // The rdma_cm port of the server's RDMA data plane for this open (transports/rdma,
  // docs/rdma.md); 0 when the server has none.
  uint16_t rdma_port = 0;
};
void EncodeOpenReply(const OpenReply& reply, std::vector<std::byte>* out);
Result<OpenReply> DecodeOpenReply(std::span<const std::byte> in);

// ATTACH request: the token of an OPEN reply. ATTACH reply: the region's size,
// generation and whether this open holds the write lease.
void EncodeToken(const Token& token, std::vector<std::byte>* out);
Result<Token> DecodeToken(std::span<const std::byte> in);

struct AttachReply {
  uint64_t size = 0;
  uint64_t generation = 0;
  bool writable = false;
};
void EncodeAttachReply(const AttachReply& reply, std::vector<std::byte>* out);
Result<AttachReply> DecodeAttachReply(std::span<const std::byte> in);

// Error replies carry a UTF-8 message of at most kMaxMessageSize bytes (longer ones are
// truncated by the encoder and rejected by the decoder).
void EncodeMessage(std::string_view message, std::vector<std::byte>* out);
Result<std::string> DecodeMessage(std::span<const std::byte> in);

// The Status a non-OK reply stands for: its code and message.
Status ReplyStatus(const FrameHeader& header, std::span<const std::byte> payload);

}  // namespace mf::tcp::wire
