// The NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md): named constants and pure,
// bounds-checked encoders/decoders for the fixed-newstyle handshake, option requests and
// replies, transmission requests, simple replies and structured reply chunks.
//
// Everything is big-endian on the wire. Decoders take untrusted bytes: they check the
// length first, then magic numbers and limits, and never read past `in`. A decoder fails
// with kInvalidArgument when `in` is shorter than the message and with kProtocolError when
// the bytes cannot be a valid message (bad magic, length above a limit, inconsistent
// lengths). Encoders write into caller-provided fixed-size spans and cannot fail.
//
// Both sides are here (the server's Export and the tests' raw clients use the same code).
//
// Thread-safety: pure functions on values; no shared state.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "fabric/status.h"

namespace mf::nbd {

// ---- Magic numbers ----------------------------------------------------------------------
inline constexpr uint64_t kNbdMagic = 0x4e42444d41474943ull;     // "NBDMAGIC"
inline constexpr uint64_t kOptionMagic = 0x49484156454f5054ull;  // "IHAVEOPT"
inline constexpr uint64_t kOptionReplyMagic = 0x0003e889045565a9ull;
inline constexpr uint32_t kRequestMagic = 0x25609513u;
inline constexpr uint32_t kSimpleReplyMagic = 0x67446698u;
inline constexpr uint32_t kStructuredReplyMagic = 0x668e33efu;

// ---- Handshake flags (server, 16 bits) and client flags (32 bits) --------------------------
inline constexpr uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr uint32_t kClientFlagNoZeroes = 1u << 1;
inline constexpr uint32_t kKnownClientFlags = kClientFlagFixedNewstyle | kClientFlagNoZeroes;

// ---- Transmission flags (16 bits) ------------------------------------------------------------
inline constexpr uint16_t kTxHasFlags = 1u << 0;
inline constexpr uint16_t kTxReadOnly = 1u << 1;
inline constexpr uint16_t kTxSendFlush = 1u << 2;
inline constexpr uint16_t kTxSendFua = 1u << 3;
inline constexpr uint16_t kTxRotational = 1u << 4;
inline constexpr uint16_t kTxSendTrim = 1u << 5;
inline constexpr uint16_t kTxSendWriteZeroes = 1u << 6;
inline constexpr uint16_t kTxSendDf = 1u << 7;
inline constexpr uint16_t kTxCanMultiConn = 1u << 8;
inline constexpr uint16_t kTxSendResize = 1u << 9;
inline constexpr uint16_t kTxSendCache = 1u << 10;
inline constexpr uint16_t kTxSendFastZero = 1u << 11;

// ---- Options ---------------------------------------------------------------------------------
inline constexpr uint32_t kOptExportName = 1;
inline constexpr uint32_t kOptAbort = 2;
inline constexpr uint32_t kOptList = 3;
inline constexpr uint32_t kOptPeekExport = 4;
inline constexpr uint32_t kOptStartTls = 5;
inline constexpr uint32_t kOptInfo = 6;
inline constexpr uint32_t kOptGo = 7;
inline constexpr uint32_t kOptStructuredReply = 8;
inline constexpr uint32_t kOptListMetaContext = 9;
inline constexpr uint32_t kOptSetMetaContext = 10;

// ---- Option reply types ------------------------------------------------------------------------
inline constexpr uint32_t kRepAck = 1;
inline constexpr uint32_t kRepServer = 2;
inline constexpr uint32_t kRepInfo = 3;
inline constexpr uint32_t kRepMetaContext = 4;
inline constexpr uint32_t kRepErrorBit = 1u << 31;
inline constexpr uint32_t kRepErrUnsup = kRepErrorBit + 1;
inline constexpr uint32_t kRepErrPolicy = kRepErrorBit + 2;
inline constexpr uint32_t kRepErrInvalid = kRepErrorBit + 3;
inline constexpr uint32_t kRepErrPlatform = kRepErrorBit + 4;
inline constexpr uint32_t kRepErrTlsReqd = kRepErrorBit + 5;
inline constexpr uint32_t kRepErrUnknown = kRepErrorBit + 6;
inline constexpr uint32_t kRepErrShutdown = kRepErrorBit + 7;
inline constexpr uint32_t kRepErrBlockSizeReqd = kRepErrorBit + 8;
inline constexpr uint32_t kRepErrTooBig = kRepErrorBit + 9;

// ---- NBD_INFO types (in NBD_OPT_INFO / NBD_OPT_GO) ---------------------------------------------
inline constexpr uint16_t kInfoExport = 0;
inline constexpr uint16_t kInfoName = 1;
inline constexpr uint16_t kInfoDescription = 2;
inline constexpr uint16_t kInfoBlockSize = 3;

// ---- Commands and command flags ------------------------------------------------------------
inline constexpr uint16_t kCmdRead = 0;
inline constexpr uint16_t kCmdWrite = 1;
inline constexpr uint16_t kCmdDisc = 2;
inline constexpr uint16_t kCmdFlush = 3;
inline constexpr uint16_t kCmdTrim = 4;
inline constexpr uint16_t kCmdCache = 5;
inline constexpr uint16_t kCmdWriteZeroes = 6;
inline constexpr uint16_t kCmdBlockStatus = 7;

inline constexpr uint16_t kCmdFlagFua = 1u << 0;
inline constexpr uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr uint16_t kCmdFlagDf = 1u << 2;
inline constexpr uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr uint16_t kCmdFlagFastZero = 1u << 4;

// ---- Structured replies ------------------------------------------------------------------------
inline constexpr uint16_t kReplyFlagDone = 1u << 0;
inline constexpr uint16_t kReplyTypeNone = 0;
inline constexpr uint16_t kReplyTypeOffsetData = 1;
inline constexpr uint16_t kReplyTypeOffsetHole = 2;
inline constexpr uint16_t kReplyTypeBlockStatus = 5;
inline constexpr uint16_t kReplyTypeErrorBit = 1u << 15;
inline constexpr uint16_t kReplyTypeError = kReplyTypeErrorBit + 1;
inline constexpr uint16_t kReplyTypeErrorOffset = kReplyTypeErrorBit + 2;

// ---- Metadata contexts: only base:allocation -------------------------------------------------
inline constexpr std::string_view kBaseAllocation = "base:allocation";
inline constexpr std::string_view kBaseNamespace = "base:";
inline constexpr uint32_t kStateHole = 1u << 0;
inline constexpr uint32_t kStateZero = 1u << 1;
inline constexpr size_t kBlockDescriptorSize = 4 + 4;  // extent length, status flags

// ---- Error values (the error field of replies) ---------------------------------------------------
inline constexpr uint32_t kEperm = 1;
inline constexpr uint32_t kEio = 5;
inline constexpr uint32_t kEnomem = 12;
inline constexpr uint32_t kEinval = 22;
inline constexpr uint32_t kEnospc = 28;
inline constexpr uint32_t kEoverflow = 75;
inline constexpr uint32_t kEnotsup = 95;
inline constexpr uint32_t kEshutdown = 108;

// ---- Message sizes and limits ---------------------------------------------------------------------
inline constexpr size_t kServerGreetingSize = 8 + 8 + 2;  // NBDMAGIC, IHAVEOPT, handshake flags
inline constexpr size_t kClientFlagsSize = 4;
inline constexpr size_t kOptionHeaderSize = 8 + 4 + 4;           // magic, option, length
inline constexpr size_t kOptionReplyHeaderSize = 8 + 4 + 4 + 4;  // magic, option, type, length
inline constexpr size_t kExportNameReplySize = 8 + 2;            // size, transmission flags
inline constexpr size_t kExportNameZeroes = 124;                 // unless NO_ZEROES
inline constexpr size_t kRequestSize = 4 + 2 + 2 + 8 + 8 + 4;
inline constexpr size_t kSimpleReplySize = 4 + 4 + 8;
inline constexpr size_t kStructuredReplyHeaderSize = 4 + 2 + 2 + 8 + 4;
inline constexpr size_t kInfoExportSize = 2 + 8 + 2;
inline constexpr size_t kInfoBlockSizeSize = 2 + 4 + 4 + 4;
inline constexpr size_t kOffsetDataPrefixSize = 8;      // offset before the data
inline constexpr size_t kErrorChunkPrefixSize = 4 + 2;  // error, message length

inline constexpr size_t kMaxStringLength = 4096;  // export names, messages (spec: MUST)
// Largest option payload the server buffers: a GO/INFO with a maximal name and every
// NBD_INFO request a client could sensibly send.
inline constexpr size_t kMaxOptionLength = 4 + kMaxStringLength + 2 + 2 * 64;
// NBD_OPT_GO/INFO payload without the name: name length and request count.
inline constexpr size_t kInfoRequestFixedSize = 4 + 2;
// NBD_OPT_*_META_CONTEXT payload without strings: name length and query count.
inline constexpr size_t kMetaContextFixedSize = 4 + 4;
inline constexpr size_t kMaxMetaQueries = 64;
// Largest structured reply payload this code ever sends or accepts in tests.
inline constexpr uint32_t kMaxChunkPayload = 0xffffffffu - 8;

static_assert(kServerGreetingSize == 18 && kOptionHeaderSize == 16 && kOptionReplyHeaderSize == 20);
static_assert(kRequestSize == 28 && kSimpleReplySize == 16 && kStructuredReplyHeaderSize == 20);
static_assert(kInfoExportSize == 12 && kInfoBlockSizeSize == 14);
static_assert(kMaxOptionLength > kMaxStringLength + kInfoRequestFixedSize);
static_assert((kRepErrUnsup & kRepErrorBit) != 0 && (kRepAck & kRepErrorBit) == 0);

// ---- Messages --------------------------------------------------------------------------------------
struct ServerGreeting {
  uint16_t handshake_flags = 0;
};

struct OptionHeader {
  uint32_t option = 0;
  uint32_t length = 0;  // of the data that follows
};

struct OptionReplyHeader {
  uint32_t option = 0;
  uint32_t type = 0;
  uint32_t length = 0;
};

// The data of NBD_OPT_INFO / NBD_OPT_GO.
struct InfoRequest {
  std::string name;
  std::vector<uint16_t> info_types;
};

// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
struct MetaContextRequest {
  std::string export_name;
  std::vector<std::string> queries;
};

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t handle = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

struct SimpleReply {
  uint32_t error = 0;
  uint64_t handle = 0;
};

struct StructuredReplyHeader {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t handle = 0;
  uint32_t length = 0;
};

struct BlockSizeInfo {
  uint32_t minimum = 1;
  uint32_t preferred = 4096;
  uint32_t maximum = 32u << 20;
};

// The payload of an error chunk (NBD_REPLY_TYPE_ERROR).
struct ErrorChunk {
  uint32_t error = 0;
  std::string message;
};

// ---- Big-endian helpers --------------------------------------------------------------------------
void StoreBe16(std::byte* out, uint16_t v);
void StoreBe32(std::byte* out, uint32_t v);
void StoreBe64(std::byte* out, uint64_t v);
uint16_t LoadBe16(const std::byte* in);
uint32_t LoadBe32(const std::byte* in);
uint64_t LoadBe64(const std::byte* in);

// ---- Encoders (server side) ------------------------------------------------------------------------
void EncodeServerGreeting(const ServerGreeting& g, std::span<std::byte, kServerGreetingSize> out);
void EncodeOptionReplyHeader(const OptionReplyHeader& h, std::span<std::byte, kOptionReplyHeaderSize> out);
void EncodeExportNameReply(uint64_t size, uint16_t transmission_flags,
                           std::span<std::byte, kExportNameReplySize> out);
// NBD_REP_INFO payloads.
void EncodeInfoExport(uint64_t size, uint16_t transmission_flags, std::span<std::byte, kInfoExportSize> out);
void EncodeInfoBlockSize(const BlockSizeInfo& b, std::span<std::byte, kInfoBlockSizeSize> out);
// Appends a whole option reply (header + payload) to *out.
void AppendOptionReply(uint32_t option, uint32_t type, std::span<const std::byte> payload,
                       std::vector<std::byte>* out);
// Appends NBD_REP_SERVER (name length, name, description) for NBD_OPT_LIST.
void AppendRepServer(uint32_t option, std::string_view name, std::string_view description,
                     std::vector<std::byte>* out);
// Appends NBD_REP_INFO carrying NBD_INFO_NAME or NBD_INFO_DESCRIPTION with `text`.
void AppendInfoString(uint32_t option, uint16_t info_type, std::string_view text,
                      std::vector<std::byte>* out);
void EncodeSimpleReply(const SimpleReply& r, std::span<std::byte, kSimpleReplySize> out);
void EncodeStructuredReplyHeader(const StructuredReplyHeader& h,
                                 std::span<std::byte, kStructuredReplyHeaderSize> out);
// Appends NBD_REP_META_CONTEXT (context id, name).
void AppendRepMetaContext(uint32_t option, uint32_t id, std::string_view name, std::vector<std::byte>* out);
// Appends a complete NBD_REPLY_TYPE_ERROR chunk. The message is cut to kMaxStringLength.
void AppendErrorChunk(uint64_t handle, uint16_t flags, uint32_t error, std::string_view message,
                      std::vector<std::byte>* out);

// ---- Encoders (client side: tests, tools) -----------------------------------------------------------
void EncodeClientFlags(uint32_t flags, std::span<std::byte, kClientFlagsSize> out);
void EncodeOptionHeader(const OptionHeader& h, std::span<std::byte, kOptionHeaderSize> out);
// Appends IHAVEOPT, option, length and data.
void AppendOption(uint32_t option, std::span<const std::byte> data, std::vector<std::byte>* out);
// The data of NBD_OPT_INFO / NBD_OPT_GO.
std::vector<std::byte> EncodeInfoRequest(const InfoRequest& r);
void EncodeRequest(const Request& r, std::span<std::byte, kRequestSize> out);
// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
std::vector<std::byte> EncodeMetaContextRequest(const MetaContextRequest& r);

// ---- Decoders (bytes from a client: the server uses these) ------------------------------------------
// Unknown client flags are a protocol error (the server must then drop the connection).
Result<uint32_t> DecodeClientFlags(std::span<const std::byte> in);
// Checks IHAVEOPT. The length is not limited here: the server decides whether to read,
// skip (NBD_REP_ERR_TOO_BIG) or refuse (hard disconnect) data above kMaxOptionLength.
Result<OptionHeader> DecodeOptionHeader(std::span<const std::byte> in);
// The data of NBD_OPT_INFO / NBD_OPT_GO, exactly `in` (no trailing bytes allowed): name
// length no larger than in.size() - 6, a name of at most kMaxStringLength bytes, and a
// request count matching the remaining bytes.
Result<InfoRequest> DecodeInfoRequest(std::span<const std::byte> in);
// The data of NBD_OPT_LIST/SET_META_CONTEXT, exactly `in`: every length within the data,
// strings of at most kMaxStringLength bytes without NUL, at most kMaxMetaQueries queries.
Result<MetaContextRequest> DecodeMetaContextRequest(std::span<const std::byte> in);
// Checks NBD_REQUEST_MAGIC. Command and flag values are left to the server to judge.
Result<Request> DecodeRequest(std::span<const std::byte> in);

// ---- Decoders (bytes from a server: tests and the kernel-device glue use these) ---------------------
Result<ServerGreeting> DecodeServerGreeting(std::span<const std::byte> in);
Result<OptionReplyHeader> DecodeOptionReplyHeader(std::span<const std::byte> in);
Result<SimpleReply> DecodeSimpleReply(std::span<const std::byte> in);
Result<StructuredReplyHeader> DecodeStructuredReplyHeader(std::span<const std::byte> in);
// NBD_REP_INFO payloads.
Result<std::pair<uint64_t, uint16_t>> DecodeInfoExport(std::span<const std::byte> in);
Result<BlockSizeInfo> DecodeInfoBlockSize(std::span<const std::byte> in);
// The payload of an NBD_REPLY_TYPE_ERROR chunk (exactly `in`).
Result<ErrorChunk> DecodeErrorChunk(std::span<const std::byte> in);

// Human-readable names for logs.
std::string_view OptionName(uint32_t option);
std::string_view CommandName(uint16_t type);

}  // namespace mf::nbd
