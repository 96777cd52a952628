#include "nbd/export.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <optional>

#include "nbd/protocol.h"

namespace mf::nbd {
namespace {

constexpr size_t kMaxInlineReply = 64u << 10;      // larger READ replies are sent by the writer
constexpr size_t kSubmitBatch = 16;                // IoRequests handed to Submit at once
constexpr size_t kZeroBufferSize = 1u << 20;       // source of WRITE_ZEROES writes
constexpr size_t kMaxOptionDrain = 1u << 20;       // larger option data: hard disconnect
constexpr size_t kMaxUnreadDrain = 4u << 20;       // unread input discarded before a Stop's close
constexpr uint64_t kMinDosWriteLimit = 32u << 20;  // spec: below 2^25 is never a DoS
constexpr auto kAcceptTick = std::chrono::milliseconds(100);
constexpr int kListenBacklog = 128;
constexpr uint32_t kBaseAllocationId = 1;       // the one metadata context's id
constexpr size_t kInputBufferSize = 64u << 10;  // request bytes taken per recv
constexpr size_t kMaxErrorMessage = 200;        // bytes of a structured error message
constexpr int kUnixSendBuffer = 4 << 20;        // several 1 MiB replies (see WidenUnixSendBuffer)
static_assert(kZeroBufferSize % kPageSize == 0 && kSubmitBatch > 0);
static_assert(kMaxErrorMessage < kMaxStringLength);
// A reply's header: the largest is an error chunk with its message.
constexpr size_t kReplyHeaderCapacity = kStructuredReplyHeaderSize + kErrorChunkPrefixSize + kMaxErrorMessage;
static_assert(kReplyHeaderCapacity >= kStructuredReplyHeaderSize + kOffsetDataPrefixSize);
static_assert(kReplyHeaderCapacity >= kStructuredReplyHeaderSize + 4 + kBlockDescriptorSize);
static_assert(kInputBufferSize >= kRequestSize && kInputBufferSize >= kOptionHeaderSize);

// One recv of up to buf.size() bytes (at least one). Until *spin_until it polls the
// socket instead of sleeping, and every arrival moves *spin_until to `spin` from now.
// kUnavailable on EOF, kTimeout when SO_RCVTIMEO expires.
Result<size_t> RecvSome(int fd, std::span<std::byte> buf, std::chrono::microseconds spin,
                        std::chrono::steady_clock::time_point* spin_until) {
  for (;;) {
    const bool polling = std::chrono::steady_clock::now() < *spin_until;
    const ssize_t n = ::recv(fd, buf.data(), buf.size(), polling ? MSG_DONTWAIT : 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (polling) continue;
        return Status(Code::kTimeout, "client sent nothing in time");
      }
      return Status::FromErrno(errno, "recv");
    }
    if (n == 0) return Status(Code::kUnavailable, "client closed the connection");
    *spin_until = std::chrono::steady_clock::now() + spin;
    return static_cast<size_t>(n);
  }
}

// Sends every byte of iov[0..count), without SIGPIPE. Modifies iov as it goes.
Status SendIov(int fd, iovec* iov, size_t count) {
  size_t first = 0;
  while (first < count) {
    msghdr msg{};
    msg.msg_iov = iov + first;
    msg.msg_iovlen = std::min<size_t>(count - first, IOV_MAX);
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Status(Code::kTimeout, "client takes no replies");
      return Status::FromErrno(errno, "send");
    }
    auto left = static_cast<size_t>(n);
    while (first < count && left >= iov[first].iov_len) left -= iov[first++].iov_len;
    if (first < count) {
      iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return Status::Ok();
}

Status SendAll(int fd, std::span<const std::byte> bytes) {
  iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
  return SendIov(fd, &iov, bytes.empty() ? 0 : 1);
}

// A unix socket's send buffer is fixed (no autotuning as on TCP) and by default smaller
// than one 1 MiB read reply, so the writer would block several times per reply. The
// kernel caps the size at net.core.wmem_max. TCP sockets keep their autotuning.
void WidenUnixSendBuffer(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 || addr.ss_family != AF_UNIX) return;
  int size = kUnixSendBuffer;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size)) != 0) {
    spdlog::debug("nbd: cannot widen the send buffer: {}", std::strerror(errno));
  }
}

void SetTimeout(int fd, int option, std::chrono::milliseconds t) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(t.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
  (void)::setsockopt(fd, SOL_SOCKET, option, &tv, sizeof(tv));
}

std::string PeerName(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "socket";
  char host[NI_MAXHOST] = {};
  char port[NI_MAXSERV] = {};
  if (ss.ss_family == AF_UNIX) return "unix";
  if (::getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, host, sizeof(host), port, sizeof(port),
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "tcp";
  }
  return std::string(host) + ":" + port;
}

// The NBD error for a failed Remote request.
uint32_t NbdError(const Status& s) {
  switch (s.code()) {
    case Code::kPermissionDenied: return kEperm;
    case Code::kInvalidArgument:
    case Code::kOutOfRange: return kEinval;
    case Code::kAborted: return kEshutdown;
    default: return kEio;
  }
}

// The transmission flags of an export.
uint16_t TransmissionFlags(bool read_only, bool structured) {
  uint16_t flags = kTxHasFlags | kTxSendFlush | kTxSendCache | kTxCanMultiConn;
  if (read_only) {
    flags |= kTxReadOnly;
  } else {
    flags |= kTxSendFua | kTxSendTrim | kTxSendWriteZeroes | kTxSendFastZero;
  }
  if (structured) flags |= kTxSendDf;
  return flags;
}

bool IsReadOnly(const ExportSpec& spec) {
  return spec.read_only || !spec.remote->writable();
}

std::span<const std::byte> AsBytes(std::string_view s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

}  // namespace

// ---- Connection -------------------------------------------------------------------------------------

class Export::Connection final : public fabric::IoCallback {
 public:
  // With `entered`, the connection skips the handshake and serves that export at once.
  Connection(Export& owner, UniqueFd fd, uint64_t id, std::optional<ExportSpec> entered)
      : owner_(owner), fd_(std::move(fd)), id_(id), entered_(std::move(entered)) {}
  ~Connection() {
    if (thread_.joinable()) thread_.join();
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  bool finished() const { return finished_.load(std::memory_order_acquire); }
  // Wakes both threads: their socket calls fail and the connection winds down.
  void Shutdown() MF_EXCLUDES(fd_mu_) {
    MutexLock lock(fd_mu_);
    if (fd_.valid()) ::shutdown(fd_.get(), SHUT_RDWR);
  }
  // Export::Stop: the reader sees EOF (and checks stopping_ before each request), so no new
  // request is read; replies to the requests in flight are still sent, then Run closes.
  void StopReading() MF_EXCLUDES(fd_mu_) {
    MutexLock lock(fd_mu_);
    if (fd_.valid()) ::shutdown(fd_.get(), SHUT_RD);
  }

  void OnIoComplete(uint64_t cookie, const Status& status) override;

 private:
  // One request in flight. The reader owns it from AcquireSlot until it queues it as
  // completed; the Remote's callbacks touch only the atomics; the writer owns it from
  // then until it has sent the reply and put the slot back on free_.
  struct Slot {
    Request request;
    fabric::Buffer buffer;      // slot_buffer_size bytes, for requests that fit
    std::span<std::byte> data;  // READ/WRITE bytes, in `buffer` or in large_buffer_
    const fabric::Buffer* io_buffer = nullptr;
    bool uses_large = false;
    bool flush_after = false;                             // FLUSH, or FUA on a write
    uint64_t fence_ticket = 0;                            // a write admitted by owner_.write_fence_
    std::atomic<uint32_t> pending{0};                     // Remote requests outstanding + 1 while submitting
    std::atomic<uint32_t> error{0};                       // NBD error of the reply; the first one wins
    const char* message = "";                             // static text for a structured error chunk
    std::array<std::byte, kReplyHeaderCapacity> reply{};  // built by the writer
  };

  // The connection's thread: Serve, log how it ended, wind down.
  void Run();
  // The handshake and transmission; how the connection ended.
  Status Serve();
  // Option haggling. True when the client entered transmission, false when it left.
  Result<bool> Handshake();
  Status HandleInfoOrGo(uint32_t option, std::span<const std::byte> data, bool* go);
  Status HandleMetaContext(uint32_t option, std::span<const std::byte> data);
  Status ReplyOption(uint32_t option, uint32_t type, std::string_view message = {});
  // Handshake sends and receives: bounded by the handshake's deadline, if any. kTimeout
  // once it has passed.
  Status ArmHandshakeDeadline();
  Status SendHandshake(std::span<const std::byte> bytes);
  // Takes the export for transmission and allocates the slots.
  Status Enter(const ExportSpec& spec);
  Status Transmission();
  // Reader thread: validates a request; 0 when it may proceed.
  uint32_t Validate(const Request& r, const char** message) const;
  void SubmitSplit(uint32_t index, fabric::IoKind kind, uint64_t offset, uint64_t length, bool zeroes);
  void FailOrFinish(uint32_t index, uint32_t error, const char* message);
  void WriterLoop() MF_EXCLUDES(mu_);
  // Sends the replies of `batch` (completed slots) in one sendmsg, after one Flush when a
  // FLUSH or FUA asks for it, and frees the slots. Reader or writer thread.
  void SendReplies(std::span<const uint32_t> batch, std::span<iovec> iov) MF_EXCLUDES(mu_, send_mu_);
  // Moves every completed slot from the ring to `out` (capacity depth_); returns how many.
  size_t TakeCompleted(std::span<uint32_t> out) MF_REQUIRES(mu_);
  // Reader thread, before it blocks: sends the replies of requests it completed itself.
  void DrainInline() MF_EXCLUDES(mu_, send_mu_);
  // Writer thread: encodes the reply of `slot` into slot.reply and appends its iovecs
  // (header, then read data) to iov; returns how many it appended (1 or 2).
  size_t BuildReply(Slot& slot, uint32_t error, iovec* iov);
  // Reader thread: exactly out.size() bytes from the socket, through input_.
  Status ReadInput(std::span<std::byte> out);
  // Reader thread: one RecvSome, within the handshake's deadline while there is one.
  Result<size_t> Receive(std::span<std::byte> buf, std::chrono::microseconds spin,
                         std::chrono::steady_clock::time_point* spin_until);
  Status DiscardInput(uint64_t length, std::span<std::byte> scratch);

  uint32_t AcquireSlot() MF_EXCLUDES(mu_);
  // Points slot.data at `length` bytes: its own buffer or (waiting for it) the large one.
  Status PrepareData(Slot& slot, uint32_t length) MF_EXCLUDES(mu_);
  // Admits the WRITE or WRITE_ZEROES in slot `index` in the export-wide WriteFence (waiting
  // for an overlapping write in flight). True when it may go to the Remote; false when it
  // has answered the request instead: ESHUTDOWN once the Export stops, EIO when the kernel
  // abandoned the connection (AbandonedByKernel).
  bool AdmitWrite(uint32_t index) MF_EXCLUDES(mu_);
  // Once admitted, on a connection of the kernel's NBD driver (ServeTransmission):
  // whether the kernel shut it down. It does so when it gives up on the connection, and
  // fails its unanswered requests upward or re-sends them on another one; a write still
  // read from the socket afterwards must not land after its re-sent copy and the writes
  // made since. Then the write leaves the fence. Other clients may send DISC and close
  // without waiting: their writes are still owed.
  bool AbandonedByKernel(Slot& s);
  void PushCompleted(uint32_t index) MF_EXCLUDES(mu_);

  // For the connection's own threads, which run before Run() closes fd_ under fd_mu_.
  int fd() const MF_NO_THREAD_SAFETY_ANALYSIS { return fd_.get(); }

  Export& owner_;
  Mutex fd_mu_;  // fd_ is closed under it, so Shutdown never hits a reused number
  UniqueFd fd_ MF_GUARDED_BY(fd_mu_);
  const uint64_t id_;
  const std::optional<ExportSpec> entered_;  // set: no handshake (ServeTransmission)
  std::string peer_;
  std::atomic<bool> finished_{false};

  // Reader thread, set while the handshake runs: it must end (transmission or abort) by
  // then, however slowly the client trickles its bytes (SO_RCVTIMEO restarts on every byte).
  std::optional<std::chrono::steady_clock::time_point> handshake_deadline_;
  // Negotiated in the handshake (reader thread), read-only in transmission.
  bool no_zeroes_ = false;
  bool structured_ = false;
  std::string export_name_;
  fabric::Remote* remote_ = nullptr;
  uint64_t size_ = 0;
  bool read_only_ = false;
  uint16_t tx_flags_ = 0;
  bool meta_selected_ = false;  // base:allocation chosen by SET_META_CONTEXT ...
  std::string meta_export_;     // ... for this export
  bool block_status_ = false;   // NBD_CMD_BLOCK_STATUS is allowed in transmission

  // Transmission. slots_ and the buffers are set up by Enter before the writer starts.
  std::unique_ptr<Slot[]> slots_;
  size_t depth_ = 0;
  fabric::Buffer large_buffer_;  // lazily allocated and grown, at most max_block_size bytes
  fabric::Buffer zero_buffer_;   // lazily allocated, never written
  Mutex mu_;
  std::condition_variable_any free_cv_;
  std::condition_variable_any completed_cv_;
  std::vector<uint32_t> free_ MF_GUARDED_BY(mu_);       // capacity depth_: no allocation
  std::vector<uint32_t> completed_ MF_GUARDED_BY(mu_);  // ring of depth_ entries
  // The reader queued completions without waking the writer: it sends them itself before
  // it blocks (a Remote that completes inline costs no thread hand-off per request).
  bool inline_pending_ MF_GUARDED_BY(mu_) = false;
  std::thread::id reader_id_;           // Transmission's thread; set before the first Submit
  std::vector<uint32_t> inline_batch_;  // reader thread: sized depth_ by Enter
  std::vector<iovec> inline_iov_;       // reader thread: 2 * depth_
  Mutex send_mu_;                       // one batch of replies on the socket at a time
  size_t completed_head_ MF_GUARDED_BY(mu_) = 0;
  size_t completed_count_ MF_GUARDED_BY(mu_) = 0;
  bool large_busy_ MF_GUARDED_BY(mu_) = false;
  bool writer_exit_ MF_GUARDED_BY(mu_) = false;
  std::atomic<bool> broken_{false};  // a send failed: replies are dropped from now on
  // Reader thread: bytes received but not yet parsed (clients send requests in bursts).
  std::vector<std::byte> input_ = std::vector<std::byte>(kInputBufferSize);
  size_t input_begin_ = 0;
  size_t input_end_ = 0;
  std::thread writer_;
  std::thread thread_;  // last: runs Run(), which uses everything above
};

void Export::Connection::Run() {
  // Serve's Status is gone before the connection counts as finished, as is all it
  // allocated (the fuzz target checks each input for leaks once it is).
  if (const Status result = Serve(); result.ok()) {
    spdlog::info("nbd: connection {} ({}) closed", id_, peer_);
  } else if (result.code() == Code::kUnavailable) {
    spdlog::info("nbd: connection {} ({}) closed by the client: {}", id_, peer_, result.message());
  } else {
    spdlog::warn("nbd: connection {} ({}) dropped: {}", id_, peer_, result.ToString());
  }
  if (owner_.stopping_.load()) {
    // A TCP socket closed with unread input sends a reset, which can discard replies still in
    // its send queue: take what the client already sent (requests Stop will not answer).
    for (size_t taken = 0; taken < kMaxUnreadDrain;) {
      const ssize_t n = ::recv(fd(), input_.data(), input_.size(), MSG_DONTWAIT);
      if (n <= 0) break;  // nothing queued (EOF after SHUT_RD, or EAGAIN) or an error
      taken += static_cast<size_t>(n);
    }
  }
  {
    MutexLock lock(fd_mu_);
    fd_.Reset();
  }
  // Nothing is in flight any more. A finished Connection is freed only by the next
  // connection's start or by Stop: until then it holds no buffers (they may be large, and
  // registered with the NIC or locked in memory).
  slots_.reset();
  large_buffer_ = fabric::Buffer();
  zero_buffer_ = fabric::Buffer();
  owner_.active_.fetch_sub(1);
  finished_.store(true, std::memory_order_release);
}

Status Export::Connection::Serve() {
  {
    MutexLock lock(fd_mu_);
    peer_ = PeerName(fd_.get());
  }
  spdlog::info("nbd: connection {} from {}", id_, peer_);
  SetTimeout(fd(), SO_SNDTIMEO, owner_.options_.send_timeout);
  int one = 1;
  (void)::setsockopt(fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // fails harmlessly on unix
  WidenUnixSendBuffer(fd());

  Result<bool> entered = true;
  if (!entered_) {
    if (owner_.options_.handshake_timeout.count() > 0) {
      handshake_deadline_ = std::chrono::steady_clock::now() + owner_.options_.handshake_timeout;
    }
    entered = Handshake();
    handshake_deadline_.reset();
  } else if (Status taken = Enter(*entered_); !taken.ok()) {
    entered = std::move(taken);
  }
  Status result;
  if (!entered.ok()) {
    result = entered.status();
    if (result.code() == Code::kProtocolError) owner_.protocol_errors_.fetch_add(1);
  } else if (*entered) {
    SetTimeout(fd(), SO_RCVTIMEO, std::chrono::milliseconds(0));  // clients may idle in transmission
    SetTimeout(fd(), SO_SNDTIMEO, owner_.options_.send_timeout);  // the handshake may have shortened it
    writer_ = std::thread([this] { WriterLoop(); });
    result = Transmission();
    if (result.code() == Code::kProtocolError) owner_.protocol_errors_.fetch_add(1);
    completed_cv_.notify_one();  // the writer answers what the reader completed last
    // In-flight requests still refer to the slots: wait for every one to come back.
    {
      MutexLock lock(mu_);
      free_cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return free_.size() == depth_; });
      writer_exit_ = true;
    }
    completed_cv_.notify_all();
    writer_.join();
  }
  return result;
}

Status Export::Connection::ReplyOption(uint32_t option, uint32_t type, std::string_view message) {
  std::vector<std::byte> out;
  AppendOptionReply(option, type, AsBytes(message.substr(0, kMaxStringLength)), &out);
  return SendHandshake(out);
}

Status Export::Connection::ArmHandshakeDeadline() {
  if (!handshake_deadline_) return Status::Ok();
  const auto left =
      std::chrono::ceil<std::chrono::milliseconds>(*handshake_deadline_ - std::chrono::steady_clock::now());
  if (left.count() <= 0) return Status(Code::kTimeout, "handshake not finished in time");
  SetTimeout(fd(), SO_RCVTIMEO, left);
  SetTimeout(fd(), SO_SNDTIMEO, std::min(left, owner_.options_.send_timeout));
  return Status::Ok();
}

Status Export::Connection::SendHandshake(std::span<const std::byte> bytes) {
  MF_RETURN_IF_ERROR(ArmHandshakeDeadline());
  return SendAll(fd(), bytes);
}

Result<bool> Export::Connection::Handshake() {
  std::array<std::byte, kServerGreetingSize> greeting{};
  EncodeServerGreeting({kFlagFixedNewstyle | kFlagNoZeroes}, greeting);
  MF_RETURN_IF_ERROR(SendHandshake(greeting));
  std::array<std::byte, kClientFlagsSize> raw_flags{};
  MF_RETURN_IF_ERROR(ReadInput(raw_flags));
  MF_ASSIGN_OR_RETURN(uint32_t client_flags, DecodeClientFlags(raw_flags));
  no_zeroes_ = (client_flags & kClientFlagNoZeroes) != 0;

  std::vector<std::byte> data;
  for (size_t count = 0;; ++count) {
    if (count >= owner_.options_.max_options) return ProtocolError("too many options");
    std::array<std::byte, kOptionHeaderSize> raw{};
    MF_RETURN_IF_ERROR(ReadInput(raw));
    MF_ASSIGN_OR_RETURN(OptionHeader h, DecodeOptionHeader(raw));
    spdlog::debug("nbd: connection {} option {} ({} bytes)", id_, OptionName(h.option), h.length);
    if (h.length > kMaxOptionLength) {
      if (h.option == kOptExportName || h.length > kMaxOptionDrain) {
        return ProtocolError("option " + std::string(OptionName(h.option)) + " with " +
                             std::to_string(h.length) + " bytes of data");
      }
      std::array<std::byte, 4096> scratch{};
      MF_RETURN_IF_ERROR(DiscardInput(h.length, scratch));
      MF_RETURN_IF_ERROR(ReplyOption(h.option, kRepErrTooBig, "option data too long"));
      continue;
    }
    data.resize(h.length);
    MF_RETURN_IF_ERROR(ReadInput(data));
    if (owner_.stopping_.load() && h.option != kOptAbort) {
      // EXPORT_NAME has no error reply (the client would read one as size and flags): as for
      // any failed EXPORT_NAME, the spec says to close the session.
      if (h.option == kOptExportName) return Status(Code::kAborted, "server is shutting down");
      MF_RETURN_IF_ERROR(ReplyOption(h.option, kRepErrShutdown, "server is shutting down"));
      continue;
    }
    switch (h.option) {
      case kOptExportName: {
        std::string_view name(reinterpret_cast<const char*>(data.data()), data.size());
        Lookup found = owner_.Find(name);
        // This option cannot fail politely: the spec says to terminate the session.
        if (!found.found) return NotFound("client asked for unknown export '" + std::string(name) + "'");
        MF_RETURN_IF_ERROR(Enter(found.spec));
        std::array<std::byte, kExportNameReplySize + kExportNameZeroes> reply{};
        EncodeExportNameReply(size_, tx_flags_, std::span(reply).first<kExportNameReplySize>());
        MF_RETURN_IF_ERROR(SendHandshake(
            std::span(reply).first(kExportNameReplySize + (no_zeroes_ ? 0 : kExportNameZeroes))));
        return true;
      }
      case kOptAbort:
        (void)ReplyOption(h.option, kRepAck);  // the client may already be gone
        return false;
      case kOptList: {
        if (!data.empty()) {
          MF_RETURN_IF_ERROR(ReplyOption(h.option, kRepErrInvalid, "NBD_OPT_LIST takes no data"));
          break;
        }
        std::vector<std::byte> out;
        for (const ExportSpec& e : owner_.List()) AppendRepServer(h.option, e.name, e.description, &out);
        AppendOptionReply(h.option, kRepAck, {}, &out);
        MF_RETURN_IF_ERROR(SendHandshake(out));
        break;
      }
      case kOptInfo:
      case kOptGo: {
        bool go = false;
        MF_RETURN_IF_ERROR(HandleInfoOrGo(h.option, data, &go));
        if (go) return true;
        break;
      }
      case kOptListMetaContext:
      case kOptSetMetaContext: MF_RETURN_IF_ERROR(HandleMetaContext(h.option, data)); break;
      case kOptStructuredReply:
        if (!data.empty()) {
          MF_RETURN_IF_ERROR(ReplyOption(h.option, kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data"));
          break;
        }
        structured_ = true;
        MF_RETURN_IF_ERROR(ReplyOption(h.option, kRepAck));
        break;
      default:
        MF_RETURN_IF_ERROR(ReplyOption(h.option, kRepErrUnsup,
                                       "option " + std::string(OptionName(h.option)) + " (" +
                                           std::to_string(h.option) + ") is not supported"));
        break;
    }
  }
}

Status Export::Connection::HandleInfoOrGo(uint32_t option, std::span<const std::byte> data, bool* go) {
  auto request = DecodeInfoRequest(data);
  if (!request.ok()) return ReplyOption(option, kRepErrInvalid, request.status().message());
  Lookup found = owner_.Find(request->name);
  if (!found.found) return ReplyOption(option, kRepErrUnknown, "no export named '" + request->name + "'");
  const ExportSpec& spec = found.spec;
  const uint64_t size = spec.remote->size();
  // What transmission flags would be (GO recomputes them in Enter with the same inputs).
  const uint16_t flags = TransmissionFlags(IsReadOnly(spec), structured_);

  std::vector<std::byte> out;
  std::array<std::byte, kInfoExportSize> info_export{};
  EncodeInfoExport(size, flags, info_export);
  AppendOptionReply(option, kRepInfo, info_export, &out);
  // Sent whether asked or not: our maximum differs from the spec's default.
  std::array<std::byte, kInfoBlockSizeSize> block{};
  EncodeInfoBlockSize({1, kPreferredBlockSize, owner_.options_.max_block_size}, block);
  AppendOptionReply(option, kRepInfo, block, &out);
  for (uint16_t type : request->info_types) {
    if (type == kInfoName) AppendInfoString(option, kInfoName, spec.name, &out);
    if (type == kInfoDescription && !spec.description.empty()) {
      AppendInfoString(option, kInfoDescription, spec.description, &out);
    }
  }
  if (option == kOptGo) {
    Status entered = Enter(spec);
    if (!entered.ok()) {
      spdlog::warn("nbd: connection {} cannot serve '{}': {}", id_, spec.name, entered.ToString());
      return ReplyOption(option, kRepErrPolicy, "the server cannot serve this export now");
    }
    *go = true;
  }
  AppendOptionReply(option, kRepAck, {}, &out);
  return SendHandshake(out);
}

Status Export::Connection::HandleMetaContext(uint32_t option, std::span<const std::byte> data) {
  const bool set = option == kOptSetMetaContext;
  if (set) meta_selected_ = false;  // replaced even when this request fails
  if (!structured_) return ReplyOption(option, kRepErrInvalid, "negotiate structured replies first");
  auto request = DecodeMetaContextRequest(data);
  if (!request.ok()) return ReplyOption(option, kRepErrInvalid, request.status().message());
  Lookup found = owner_.Find(request->export_name);
  if (!found.found)
    return ReplyOption(option, kRepErrUnknown, "no export named '" + request->export_name + "'");
  // base:allocation is the only context. LIST matches it with no query, "base:" or its
  // name; SET only with its name ("base:" must be ignored there). Other namespaces are
  // ignored, as the spec requires.
  bool match = !set && request->queries.empty();
  for (const std::string& q : request->queries) {
    if (q == kBaseAllocation || (!set && q == kBaseNamespace)) match = true;
  }
  std::vector<std::byte> out;
  if (match) AppendRepMetaContext(option, set ? kBaseAllocationId : 0, kBaseAllocation, &out);
  AppendOptionReply(option, kRepAck, {}, &out);
  if (set) {
    meta_selected_ = match;
    meta_export_ = found.spec.name;
  }
  return SendHandshake(out);
}

Status Export::Connection::Enter(const ExportSpec& spec) {
  export_name_ = spec.name;
  remote_ = spec.remote;
  size_ = remote_->size();
  read_only_ = IsReadOnly(spec);
  tx_flags_ = TransmissionFlags(read_only_, structured_);
  block_status_ = structured_ && meta_selected_ && meta_export_ == spec.name;

  const ExportOptions& o = owner_.options_;
  depth_ = std::max<size_t>(1, o.queue_depth);
  const size_t slot_bytes =
      AlignUp(std::max<size_t>(kPageSize, std::min<size_t>(o.slot_buffer_size, o.max_block_size)), kPageSize);
  slots_ = std::make_unique<Slot[]>(depth_);
  MutexLock lock(mu_);
  free_.clear();  // a failed earlier GO may have left some
  free_.reserve(depth_);
  completed_.assign(depth_, 0);
  inline_batch_.assign(depth_, 0);
  inline_iov_.assign(2 * depth_, iovec{});
  for (size_t i = 0; i < depth_; ++i) {
    MF_ASSIGN_OR_RETURN(slots_[i].buffer, remote_->AllocateBuffer(slot_bytes));
    free_.push_back(static_cast<uint32_t>(depth_ - 1 - i));
  }
  spdlog::info("nbd: connection {} ({}) serves '{}' ({} bytes, {}{}{})", id_, peer_, export_name_, size_,
               read_only_ ? "read-only" : "read-write", structured_ ? ", structured replies" : "",
               remote_->transport().empty() ? "" : ", via " + std::string(remote_->transport()));
  return Status::Ok();
}

// ---- Transmission: reader side ---------------------------------------------------------------------

uint32_t Export::Connection::AcquireSlot() {
  DrainInline();  // the free slots may all be waiting for their replies
  MutexLock lock(mu_);
  free_cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return !free_.empty(); });
  uint32_t index = free_.back();
  free_.pop_back();
  return index;
}

Status Export::Connection::PrepareData(Slot& slot, uint32_t length) {
  if (length <= slot.buffer.size()) {
    slot.data = slot.buffer.span().first(length);
    slot.io_buffer = &slot.buffer;
    return Status::Ok();
  }
  DrainInline();  // the large buffer's request may be waiting for its reply
  {
    MutexLock lock(mu_);
    free_cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return !large_busy_; });
    large_busy_ = true;
  }
  slot.uses_large = true;  // from here on the writer gives the large buffer back
  if (large_buffer_.size() < length) {
    // Grown in powers of two as larger requests come, never past max_block_size: the
    // kernel's requests are at most 1.25 MiB by default, and under `memfabric swap`'s
    // mlockall every byte allocated here is locked in memory.
    const size_t size = std::min<size_t>(std::bit_ceil(size_t{length}), owner_.options_.max_block_size);
    large_buffer_ = {};  // the old one goes first
    MF_ASSIGN_OR_RETURN(large_buffer_, remote_->AllocateBuffer(AlignUp(size, kPageSize)));
  }
  slot.data = large_buffer_.span().first(length);
  slot.io_buffer = &large_buffer_;
  return Status::Ok();
}

uint32_t Export::Connection::Validate(const Request& r, const char** message) const {
  const uint32_t max_block = owner_.options_.max_block_size;
  const bool in_range = r.offset <= size_ && r.length <= size_ - r.offset;
  // FUA is valid on every command where SEND_FUA is advertised (writable exports), NO_HOLE
  // and FAST_ZERO where SEND_WRITE_ZEROES and SEND_FAST_ZERO are, DF where SEND_DF is.
  uint16_t allowed_flags = read_only_ ? 0 : kCmdFlagFua;
  if (r.type == kCmdRead && structured_) allowed_flags |= kCmdFlagDf;
  if (r.type == kCmdWriteZeroes && !read_only_) allowed_flags |= kCmdFlagNoHole | kCmdFlagFastZero;
  if (r.type == kCmdBlockStatus) allowed_flags |= kCmdFlagReqOne;
  if ((r.flags & ~allowed_flags) != 0) {
    *message = "command flags not valid for this command";
    return kEinval;
  }
  switch (r.type) {
    case kCmdRead:
    case kCmdCache:
      if (r.length > max_block) {
        *message = "request longer than the maximum block size";
        return kEinval;
      }
      if (!in_range) {
        *message = "request beyond the end of the export";
        return kEinval;
      }
      return 0;
    case kCmdWrite:
      if (read_only_) {
        *message = "the export is read-only";
        return kEperm;
      }
      if (r.length > max_block) {
        *message = "write longer than the maximum block size";
        return kEinval;
      }
      if (!in_range) {
        *message = "write beyond the end of the export";
        return kEnospc;
      }
      return 0;
    case kCmdFlush:
      if (r.offset != 0 || r.length != 0) {
        *message = "flush with a nonzero offset or length";
        return kEinval;
      }
      return 0;
    case kCmdTrim:
      if (read_only_) {
        *message = "the export is read-only";
        return kEperm;
      }
      if (!in_range) {
        *message = "trim beyond the end of the export";
        return kEinval;
      }
      return 0;
    case kCmdWriteZeroes:
      if (read_only_) {
        *message = "the export is read-only";
        return kEperm;
      }
      if (!in_range) {
        *message = "write zeroes beyond the end of the export";
        return kEnospc;
      }
      if ((r.flags & kCmdFlagFastZero) != 0) {
        // Zeroing a Remote costs as much as writing it: fail fast, change nothing.
        *message = "zeroing is not faster than writing on this export";
        return kEnotsup;
      }
      return 0;
    case kCmdBlockStatus:
      if (!block_status_) {
        *message = "no metadata context was negotiated";
        return kEinval;
      }
      if (r.length == 0 || !in_range) {
        *message = "block status of nothing or beyond the end of the export";
        return kEinval;
      }
      return 0;
    default: *message = "unknown command"; return kEinval;
  }
}

void Export::Connection::FailOrFinish(uint32_t index, uint32_t error, const char* message) {
  Slot& s = slots_[index];
  if (error != 0) {
    s.error.store(error, std::memory_order_relaxed);
    s.message = message;
  }
  PushCompleted(index);
}

void Export::Connection::SubmitSplit(uint32_t index, fabric::IoKind kind, uint64_t offset, uint64_t length,
                                     bool zeroes) {
  Slot& s = slots_[index];
  const size_t piece =
      zeroes ? std::min(zero_buffer_.size(), remote_->max_transfer()) : remote_->max_transfer();
  const uint64_t count = (length + piece - 1) / piece;
  s.pending.store(static_cast<uint32_t>(count + 1), std::memory_order_relaxed);
  std::array<fabric::IoRequest, kSubmitBatch> batch{};
  size_t n = 0;
  for (uint64_t done = 0; done < length;) {
    const size_t len = static_cast<size_t>(std::min<uint64_t>(piece, length - done));
    fabric::IoRequest& r = batch[n++];
    r.kind = kind;
    r.offset = offset + done;
    r.data = zeroes ? zero_buffer_.span().first(len) : s.data.subspan(static_cast<size_t>(done), len);
    r.buffer = zeroes ? &zero_buffer_ : s.io_buffer;
    r.callback = this;
    r.cookie = index;
    done += len;
    if (n == batch.size()) {
      remote_->Submit(std::span(batch).first(n));
      n = 0;
    }
  }
  if (n > 0) remote_->Submit(std::span(batch).first(n));
  if (s.pending.fetch_sub(1, std::memory_order_acq_rel) == 1) PushCompleted(index);
}

Status Export::Connection::Transmission() {
  const uint64_t dos_limit = std::max<uint64_t>(owner_.options_.max_block_size, kMinDosWriteLimit);
  reader_id_ = std::this_thread::get_id();
  std::array<std::byte, kRequestSize> raw{};
  for (;;) {
    // Export::Stop: read no new request; Run answers those in flight, then closes.
    if (owner_.stopping_.load()) return Status::Ok();
    Status received = ReadInput(raw);
    if (!received.ok()) return owner_.stopping_.load() ? Status::Ok() : received;
    MF_ASSIGN_OR_RETURN(Request r, DecodeRequest(raw));
    spdlog::trace("nbd: connection {} {} flags {:#x} offset {} length {}", id_, CommandName(r.type), r.flags,
                  r.offset, r.length);
    if (r.type == kCmdDisc) return Status::Ok();  // soft disconnect: Run waits for in-flight
    if (r.type == kCmdWrite && r.length > dos_limit) {
      return ProtocolError("write of " + std::to_string(r.length) + " bytes is too large to accept");
    }
    owner_.requests_.fetch_add(1, std::memory_order_relaxed);
    const uint32_t index = AcquireSlot();
    Slot& s = slots_[index];
    s.request = r;
    s.data = {};
    s.io_buffer = nullptr;
    s.uses_large = false;
    s.flush_after = false;
    s.fence_ticket = 0;
    s.pending.store(0, std::memory_order_relaxed);
    s.error.store(0, std::memory_order_relaxed);
    s.message = "";

    const char* message = "";
    if (const uint32_t error = Validate(r, &message); error != 0) {
      if (r.type == kCmdWrite) {  // the payload follows the header regardless
        Status drained = DiscardInput(r.length, s.buffer.span());
        FailOrFinish(index, error, message);
        MF_RETURN_IF_ERROR(drained);
      } else {
        FailOrFinish(index, error, message);
      }
      continue;
    }
    const bool fua = (r.flags & kCmdFlagFua) != 0;
    switch (r.type) {
      case kCmdRead:
      case kCmdWrite: {
        if (r.length == 0) {
          FailOrFinish(index, 0, "");
          break;
        }
        Status prepared = PrepareData(s, r.length);
        if (!prepared.ok()) {
          spdlog::warn("nbd: connection {} has no buffer: {}", id_, prepared.ToString());
          if (r.type == kCmdWrite) {
            Status drained = DiscardInput(r.length, s.buffer.span());
            FailOrFinish(index, kEio, "the server has no buffer for the request");
            MF_RETURN_IF_ERROR(drained);
          } else {
            FailOrFinish(index, kEio, "the server has no buffer for the request");
          }
          break;
        }
        if (r.type == kCmdWrite) {
          Status payload = ReadInput(s.data);
          if (!payload.ok()) {
            FailOrFinish(index, kEio, "client vanished mid-write");
            return payload;
          }
          s.flush_after = fua;
          if (!AdmitWrite(index)) break;
        }
        SubmitSplit(index, r.type == kCmdRead ? fabric::IoKind::kRead : fabric::IoKind::kWrite, r.offset,
                    r.length, false);
        break;
      }
      case kCmdFlush:
        s.flush_after = true;
        FailOrFinish(index, 0, "");
        break;
      case kCmdTrim:
        // Discards nothing, which the spec allows: no I/O at all, so the multi-GiB discards of
        // the kernel (mkfs, fstrim) are answered at once. FUA flushes first, as for a write.
        s.flush_after = fua;
        FailOrFinish(index, 0, "");
        break;
      case kCmdWriteZeroes: {
        if (r.length == 0) {
          FailOrFinish(index, 0, "");
          break;
        }
        if (!zero_buffer_.data()) {
          auto zeroes = remote_->AllocateBuffer(kZeroBufferSize);
          if (!zeroes.ok()) {
            FailOrFinish(index, kEio, "the server has no buffer for zeroes");
            break;
          }
          zero_buffer_ = std::move(zeroes).value();
        }
        s.flush_after = fua;
        if (!AdmitWrite(index)) break;
        SubmitSplit(index, fabric::IoKind::kWrite, r.offset, r.length, true);
        break;
      }
      case kCmdBlockStatus:  // answered by the writer from the request alone
      case kCmdCache:        // a hint; the Remote has no cache to warm
      default: FailOrFinish(index, 0, ""); break;
    }
  }
}

void Export::Connection::OnIoComplete(uint64_t cookie, const Status& status) {
  Slot& s = slots_[cookie];
  if (!status.ok()) {
    uint32_t expected = 0;
    if (s.error.compare_exchange_strong(expected, NbdError(status), std::memory_order_acq_rel)) {
      s.message = "the fabric failed the request";
      spdlog::warn("nbd: connection {} {} at {} failed: {}", id_, CommandName(s.request.type),
                   s.request.offset, status.ToString());
    }
  }
  if (s.pending.fetch_sub(1, std::memory_order_acq_rel) == 1) PushCompleted(static_cast<uint32_t>(cookie));
}

bool Export::Connection::AdmitWrite(uint32_t index) {
  Slot& s = slots_[index];
  s.fence_ticket = owner_.write_fence_.Admit(remote_, s.request.offset, s.request.length);
  if (s.fence_ticket == 0) {
    FailOrFinish(index, kEshutdown, "the server is shutting down");
    return false;
  }
  if (AbandonedByKernel(s)) {
    FailOrFinish(index, kEio, "the client hung up");
    return false;
  }
  return true;
}

bool Export::Connection::AbandonedByKernel(Slot& s) {
  if (!entered_) return false;
  bool hung_up = broken_.load(std::memory_order_relaxed);
  if (!hung_up) {
    pollfd p{fd(), 0, 0};
    hung_up = ::poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR)) != 0;
  }
  if (!hung_up) return false;
  owner_.write_fence_.Leave(s.fence_ticket);
  s.fence_ticket = 0;
  return true;
}

void Export::Connection::PushCompleted(uint32_t index) {
  Slot& s = slots_[index];
  if (s.fence_ticket != 0) {
    owner_.write_fence_.Leave(s.fence_ticket);  // it is at the Remote (or failed)
    s.fence_ticket = 0;
  }
  // Large read replies go to the writer, so that sending one overlaps reading the next.
  const bool large_reply = s.request.type == kCmdRead && s.data.size() > kMaxInlineReply;
  const bool on_reader = !large_reply && std::this_thread::get_id() == reader_id_;
  MutexLock lock(mu_);
  completed_[(completed_head_ + completed_count_) % depth_] = index;
  ++completed_count_;
  if (on_reader) {
    inline_pending_ = true;
    return;
  }
  // Under the lock: once it is released the writer may answer this slot, the connection
  // finish and be freed while a Remote's thread would still be about to notify.
  completed_cv_.notify_one();
}

size_t Export::Connection::TakeCompleted(std::span<uint32_t> out) {
  size_t count = 0;
  for (; completed_count_ > 0; --completed_count_) {
    out[count++] = completed_[completed_head_];
    completed_head_ = (completed_head_ + 1) % depth_;
  }
  inline_pending_ = false;  // none is left for the reader to send
  return count;
}

void Export::Connection::DrainInline() {
  size_t count = 0;
  {
    MutexLock lock(mu_);
    if (!inline_pending_) return;
    count = TakeCompleted(inline_batch_);
  }
  if (count > 0) SendReplies(std::span(inline_batch_).first(count), inline_iov_);
}

// ---- Transmission: writer side ---------------------------------------------------------------------

void Export::Connection::WriterLoop() {
  // Sized once: every completed slot is answered in one batch of at most depth_ replies.
  std::vector<uint32_t> batch(depth_);
  std::vector<iovec> iov(2 * depth_);
  for (;;) {
    size_t count = 0;
    {
      MutexLock lock(mu_);
      completed_cv_.wait(
          mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return completed_count_ > 0 || writer_exit_; });
      if (completed_count_ == 0) return;
      count = TakeCompleted(batch);  // the reader's inline replies too
    }
    SendReplies(std::span(batch).first(count), iov);
  }
}

void Export::Connection::SendReplies(std::span<const uint32_t> batch, std::span<iovec> iov) {
  {
    MutexLock send_lock(send_mu_);
    // One Flush covers every FLUSH and FUA of the batch: all their writes completed before it.
    bool flush = false;
    for (uint32_t index : batch) {
      const Slot& s = slots_[index];
      flush |= s.flush_after && s.error.load(std::memory_order_acquire) == 0;
    }
    Status flushed = flush ? remote_->Flush() : Status::Ok();
    if (!flushed.ok()) spdlog::warn("nbd: connection {} flush failed: {}", id_, flushed.ToString());
    size_t pieces = 0;
    for (uint32_t index : batch) {
      Slot& s = slots_[index];
      uint32_t error = s.error.load(std::memory_order_acquire);
      if (error == 0 && s.flush_after && !flushed.ok()) {
        error = kEio;
        s.message = "flush failed";
      }
      if (error != 0) owner_.request_errors_.fetch_add(1, std::memory_order_relaxed);
      pieces += BuildReply(s, error, iov.data() + pieces);
    }
    if (!broken_.load(std::memory_order_relaxed)) {
      Status sent = SendIov(fd(), iov.data(), pieces);
      if (!sent.ok()) {
        spdlog::info("nbd: connection {} ({}) cannot send replies: {}", id_, peer_, sent.ToString());
        broken_.store(true);
        Shutdown();  // wakes the reader
      }
    }
  }
  {
    MutexLock lock(mu_);
    for (uint32_t index : batch) {
      if (slots_[index].uses_large) large_busy_ = false;
      free_.push_back(index);
    }
  }
  free_cv_.notify_all();
}

size_t Export::Connection::BuildReply(Slot& s, uint32_t error, iovec* iov) {
  const Request& r = s.request;
  std::byte* h = s.reply.data();
  auto piece = [](const void* data, size_t size) { return iovec{const_cast<void*>(data), size}; };
  if (structured_ && error == 0 && r.type == kCmdBlockStatus) {
    // A Remote knows no holes: one extent covering the request, allocated data (status 0,
    // which the spec allows for any block).
    EncodeStructuredReplyHeader(
        {kReplyFlagDone, kReplyTypeBlockStatus, r.handle, static_cast<uint32_t>(4 + kBlockDescriptorSize)},
        std::span(s.reply).first<kStructuredReplyHeaderSize>());
    StoreBe32(h + kStructuredReplyHeaderSize, kBaseAllocationId);
    StoreBe32(h + kStructuredReplyHeaderSize + 4, r.length);
    StoreBe32(h + kStructuredReplyHeaderSize + 8, 0);
    iov[0] = piece(h, kStructuredReplyHeaderSize + 4 + kBlockDescriptorSize);
    return 1;
  }
  if (!structured_ || (error == 0 && r.type != kCmdRead)) {
    // Simple replies: always without structured replies; with them, for payload-free success.
    EncodeSimpleReply({error, r.handle}, std::span(s.reply).first<kSimpleReplySize>());
    iov[0] = piece(h, kSimpleReplySize);
    if (r.type != kCmdRead || error != 0 || s.data.empty()) return 1;
    iov[1] = piece(s.data.data(), s.data.size());
    return 2;
  }
  if (error != 0) {
    // One final error chunk with a static message of bounded length.
    std::string_view message = std::string_view(s.message).substr(0, kMaxErrorMessage);
    EncodeStructuredReplyHeader({kReplyFlagDone, kReplyTypeError, r.handle,
                                 static_cast<uint32_t>(kErrorChunkPrefixSize + message.size())},
                                std::span(s.reply).first<kStructuredReplyHeaderSize>());
    StoreBe32(h + kStructuredReplyHeaderSize, error);
    StoreBe16(h + kStructuredReplyHeaderSize + 4, static_cast<uint16_t>(message.size()));
    std::memcpy(h + kStructuredReplyHeaderSize + kErrorChunkPrefixSize, message.data(), message.size());
    iov[0] = piece(h, kStructuredReplyHeaderSize + kErrorChunkPrefixSize + message.size());
    return 1;
  }
  if (r.length == 0) {  // a read of nothing: nothing to describe
    EncodeStructuredReplyHeader({kReplyFlagDone, kReplyTypeNone, r.handle, 0},
                                std::span(s.reply).first<kStructuredReplyHeaderSize>());
    iov[0] = piece(h, kStructuredReplyHeaderSize);
    return 1;
  }
  // The whole read is in memory before the reply starts, so one final data chunk is honest
  // (no error can show up while it is sent) and satisfies NBD_CMD_FLAG_DF.
  EncodeStructuredReplyHeader({kReplyFlagDone, kReplyTypeOffsetData, r.handle,
                               static_cast<uint32_t>(kOffsetDataPrefixSize + s.data.size())},
                              std::span(s.reply).first<kStructuredReplyHeaderSize>());
  StoreBe64(h + kStructuredReplyHeaderSize, r.offset);
  iov[0] = piece(h, kStructuredReplyHeaderSize + kOffsetDataPrefixSize);
  iov[1] = piece(s.data.data(), s.data.size());
  return 2;
}

Status Export::Connection::ReadInput(std::span<std::byte> out) {
  if (out.empty()) return Status::Ok();
  const size_t buffered = std::min(out.size(), input_end_ - input_begin_);
  if (buffered > 0) std::memcpy(out.data(), input_.data() + input_begin_, buffered);
  input_begin_ += buffered;
  out = out.subspan(buffered);
  if (out.empty()) return Status::Ok();
  input_begin_ = input_end_ = 0;
  DrainInline();  // about to block on the socket: answer what is done first
  const std::chrono::microseconds spin = owner_.recv_spin_;
  auto spin_until = std::chrono::steady_clock::now() + spin;
  if (out.size() >= input_.size()) {  // big payloads go straight in
    while (!out.empty()) {
      MF_ASSIGN_OR_RETURN(size_t n, Receive(out, spin, &spin_until));
      out = out.subspan(n);
    }
    return Status::Ok();
  }
  while (input_end_ < out.size()) {
    MF_ASSIGN_OR_RETURN(size_t n, Receive(std::span(input_).subspan(input_end_), spin, &spin_until));
    input_end_ += n;
  }
  std::memcpy(out.data(), input_.data(), out.size());
  input_begin_ = out.size();
  return Status::Ok();
}

Result<size_t> Export::Connection::Receive(std::span<std::byte> buf, std::chrono::microseconds spin,
                                           std::chrono::steady_clock::time_point* spin_until) {
  if (!handshake_deadline_) return RecvSome(fd(), buf, spin, spin_until);
  MF_RETURN_IF_ERROR(ArmHandshakeDeadline());
  Result<size_t> n = RecvSome(fd(), buf, spin, spin_until);
  if (!n.ok() && n.status().code() == Code::kTimeout) {
    return Status(Code::kTimeout, "handshake not finished in time");
  }
  return n;
}

Status Export::Connection::DiscardInput(uint64_t length, std::span<std::byte> scratch) {
  while (length > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(length, scratch.size()));
    MF_RETURN_IF_ERROR(ReadInput(scratch.first(n)));
    length -= n;
  }
  return Status::Ok();
}

// ---- Export -----------------------------------------------------------------------------------------

Export::Export(ExportOptions options)
    : options_(std::move(options)),
      recv_spin_(CanSpin() ? options_.recv_spin : std::chrono::microseconds(0)),
      write_fence_(static_cast<size_t>(std::max(options_.max_connections, 1)) * options_.queue_depth) {}

Export::~Export() {
  Stop();
}

Status Export::Add(ExportSpec spec) {
  if (spec.remote == nullptr) return InvalidArgument("export '" + spec.name + "' has no Remote");
  if (spec.name.size() > kMaxStringLength || spec.name.find('\0') != std::string::npos) {
    return InvalidArgument("export names are at most 4096 bytes without NUL");
  }
  if (options_.max_block_size < kPreferredBlockSize || options_.max_block_size > kMaxMaxBlockSize) {
    // Above the cap one READ would need more than one structured chunk (the spec's limit is
    // 2^32 - 8 bytes a chunk) and a connection a buffer as large.
    return InvalidArgument("max_block_size must be from the preferred block size (4096) to " +
                           std::to_string(kMaxMaxBlockSize >> 20) + " MiB");
  }
  MutexLock lock(mu_);
  for (const ExportSpec& e : exports_) {
    if (e.name == spec.name) return Status(Code::kAlreadyExists, "export '" + spec.name + "' exists");
  }
  spdlog::info("nbd: export '{}' ({} bytes, {}, {})", spec.name, spec.remote->size(),
               spec.read_only || !spec.remote->writable() ? "read-only" : "read-write",
               spec.remote->transport());
  exports_.push_back(std::move(spec));
  return Status::Ok();
}

Export::Lookup Export::Find(std::string_view name) const {
  MutexLock lock(mu_);
  for (const ExportSpec& e : exports_) {
    if (e.name == name) return Lookup{e, true};
  }
  if (name.empty() && !exports_.empty()) return Lookup{exports_.front(), true};
  return Lookup{};
}

std::vector<ExportSpec> Export::List() const {
  MutexLock lock(mu_);
  return exports_;
}

Status Export::ListenUnix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return InvalidArgument("unix socket path '" + path + "' is empty or too long");
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::FromErrno(errno, "socket(AF_UNIX)");
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
    return Status::FromErrno(errno, "bind " + path);
  }
  if (::listen(fd.get(), kListenBacklog) != 0) {
    Status s = Status::FromErrno(errno, "listen " + path);
    ::unlink(path.c_str());
    return s;
  }
  spdlog::info("nbd: listening on unix socket {}", path);
  return StartListener(std::move(fd), path);
}

Result<uint16_t> Export::ListenTcp(const std::string& host, uint16_t port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &found);
      rc != 0) {
    return NotFound("cannot resolve '" + host + "': " + ::gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> list(found, &::freeaddrinfo);
  Status last = Status(Code::kUnavailable, "no address for '" + host + "'");
  for (addrinfo* a = list.get(); a != nullptr; a = a->ai_next) {
    UniqueFd fd(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
    if (!fd.valid()) {
      last = Status::FromErrno(errno, "socket");
      continue;
    }
    int one = 1;
    (void)::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd.get(), a->ai_addr, a->ai_addrlen) != 0 || ::listen(fd.get(), kListenBacklog) != 0) {
      last = Status::FromErrno(errno, "bind/listen " + host + ":" + service);
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&ss), &len) != 0) {
      return Status::FromErrno(errno, "getsockname");
    }
    const uint16_t bound = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                                          : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    spdlog::info("nbd: listening on {}:{}", host, bound);
    MF_RETURN_IF_ERROR(StartListener(std::move(fd), ""));
    return bound;
  }
  return last;
}

Status Export::StartListener(UniqueFd fd, std::string unix_path) {
  MutexLock lock(mu_);
  if (stopping_.load()) {
    if (!unix_path.empty()) ::unlink(unix_path.c_str());
    return Status(Code::kAborted, "the export is stopped");
  }
  auto listener = std::make_unique<Listener>();
  listener->fd = std::move(fd);
  listener->unix_path = std::move(unix_path);
  const int listen_fd = listener->fd.get();
  listener->thread = std::thread([this, listen_fd] { AcceptLoop(listen_fd); });
  listeners_.push_back(std::move(listener));
  return Status::Ok();
}

void Export::AcceptLoop(int listen_fd) {
  while (!stopping_.load()) {
    pollfd p{listen_fd, POLLIN, 0};
    int ready = ::poll(&p, 1, static_cast<int>(kAcceptTick.count()));
    ReapFinished();
    if (ready <= 0) continue;
    UniqueFd client(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC));
    if (!client.valid()) {
      if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
        spdlog::warn("nbd: accept failed: {}", std::strerror(errno));
      }
      continue;
    }
    Status served = ServeConnection(std::move(client));
    if (!served.ok()) spdlog::warn("nbd: refused a connection: {}", served.ToString());
  }
}

Status Export::ServeConnection(UniqueFd fd) {
  return StartConnection(std::move(fd), nullptr);
}

Status Export::ServeTransmission(UniqueFd fd, std::string_view name) {
  Lookup found = Find(name);
  if (!found.found) return NotFound("no export named '" + std::string(name) + "'");
  return StartConnection(std::move(fd), &found.spec);
}

Result<ExportInfo> Export::Info(std::string_view name) const {
  Lookup found = Find(name);
  if (!found.found) return NotFound("no export named '" + std::string(name) + "'");
  const bool read_only = IsReadOnly(found.spec);
  return ExportInfo{found.spec.name, found.spec.remote->size(), TransmissionFlags(read_only, false),
                    read_only};
}

Status Export::StartConnection(UniqueFd fd, const ExportSpec* entered) {
  if (!fd.valid()) return InvalidArgument("invalid file descriptor");
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags >= 0 && (flags & O_NONBLOCK) != 0) (void)::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK);
  ReapFinished();
  MutexLock lock(mu_);
  if (stopping_.load()) return Status(Code::kAborted, "the export is stopped");
  if (active_.load() >= static_cast<uint64_t>(std::max(0, options_.max_connections))) {
    return Status(Code::kResourceExhausted,
                  "already serving " + std::to_string(options_.max_connections) + " connections");
  }
  accepted_.fetch_add(1);
  active_.fetch_add(1);
  auto connection =
      std::make_unique<Connection>(*this, std::move(fd), next_connection_id_.fetch_add(1),
                                   entered != nullptr ? std::optional<ExportSpec>(*entered) : std::nullopt);
  connection->Start();
  connections_.push_back(std::move(connection));
  return Status::Ok();
}

void Export::ReapFinished() {
  std::list<std::unique_ptr<Connection>> done;
  {
    MutexLock lock(mu_);
    for (auto it = connections_.begin(); it != connections_.end();) {
      if ((*it)->finished()) {
        auto next = std::next(it);
        done.splice(done.end(), connections_, it);
        it = next;
      } else {
        ++it;
      }
    }
    if (done.empty()) return;
    ++reaping_;
  }
  done.clear();  // joins their threads outside the lock
  MutexLock lock(mu_);
  --reaping_;
  reaped_cv_.notify_all();
}

void Export::Stop() {
  MutexLock stopping(stop_mu_);  // a second Stop returns once the first is done
  std::list<std::unique_ptr<Listener>> listeners;
  std::list<std::unique_ptr<Connection>> connections;
  {
    MutexLock lock(mu_);
    stopping_.store(true);
    listeners.swap(listeners_);
  }
  write_fence_.Shutdown();  // a write waiting for an overlapping one is answered ESHUTDOWN
  for (auto& l : listeners) {
    if (l->thread.joinable()) l->thread.join();
    if (!l->unix_path.empty()) ::unlink(l->unix_path.c_str());
  }
  listeners.clear();
  {
    MutexLock lock(mu_);
    connections.swap(connections_);
  }
  // Reading stops; requests in flight complete and are answered (a client that takes no
  // replies is dropped after send_timeout), then each connection closes.
  for (auto& c : connections) c->StopReading();
  connections.clear();  // joins
  // Connections another thread took to free (ReapFinished) still hold the Remotes' buffers.
  MutexLock lock(mu_);
  reaped_cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return reaping_ == 0; });
}

ExportStats Export::stats() const {
  ExportStats s;
  s.connections_accepted = accepted_.load();
  s.connections_active = active_.load();
  s.requests = requests_.load();
  s.request_errors = request_errors_.load();
  s.protocol_errors = protocol_errors_.load();
  return s;
}

}  // namespace mf::nbd
