#include "transports/tcp/tcp_client.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <thread>

#include "fabric/auth.h"
#include "fabric/os.h"
#include "fabric/remote.h"
#include "transports/tcp/stream.h"
#include "transports/tcp/wire.h"

namespace mf::tcp {
namespace {

constexpr auto kReaderTick = std::chrono::milliseconds(50);  // deadline checks of a reader
constexpr uint64_t kSlotIndexMask = 0xffffffffu;
static_assert(kMaxQueueDepth <= kSlotIndexMask);
// A reader's receive buffer: one recv takes in many small replies at once. The payload of a
// READ reply beyond what this buffer caught is received straight into the caller's Buffer,
// so at most this much of a large reply is copied.
constexpr size_t kReceiveBufferSize = 64u << 10;
static_assert(kReceiveBufferSize >= wire::kFrameHeaderSize + wire::kMaxMessageSize);
// Requests gathered into one write of a data connection: a header and a payload each.
constexpr size_t kMaxGather = kMaxGatherPieces / 2;
static_assert(kMaxGather >= 1);

// Reads one whole frame (header, then a payload of at most `max_payload` bytes).
Status ReadFrame(Stream& stream, Clock::time_point deadline, wire::FrameHeader* header,
                 std::vector<std::byte>* payload, size_t max_payload = wire::kMaxPayload) {
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  MF_RETURN_IF_ERROR(ReadExact(stream, raw, deadline));
  MF_ASSIGN_OR_RETURN(size_t used, wire::DecodeFrameHeader(raw, header));
  if (used != wire::kFrameHeaderSize) return Internal("frame header decode");
  if (header->payload_length > max_payload) return ProtocolError("reply payload too large");
  payload->resize(header->payload_length);
  return ReadExact(stream, *payload, deadline);
}

Status SendFrame(Stream& stream, const wire::FrameHeader& header, std::span<const std::byte> payload,
                 Clock::time_point deadline) {
  std::array<std::byte, wire::kFrameHeaderSize> raw{};
  wire::EncodeFrameHeader(header, raw);
  return WriteExactV(stream, raw, payload, deadline);
}

// Connects, says hello on `channel` and authenticates: a ready connection or why not.
Result<std::unique_ptr<Stream>> OpenSession(const Endpoint& ep, wire::Channel channel) {
  const auto& opt = ep.options;
  const auto deadline = Clock::now() + opt.connect_timeout;
  MF_ASSIGN_OR_RETURN(UniqueFd fd, ConnectTcp(ep.host, ep.port, deadline));
  auto stream = std::make_unique<Stream>(std::move(fd));
  if (ep.tls) {
    MF_RETURN_IF_ERROR(stream->StartTls(*ep.tls, /*server=*/false, ep.server_name));
    MF_RETURN_IF_ERROR(HandshakeBlocking(*stream, deadline));
  }

  wire::ClientHello hello;
  hello.channel = channel;
  MF_ASSIGN_OR_RETURN(hello.nonce, fabric::MakeNonce());
  std::array<std::byte, wire::kClientHelloSize> raw_hello{};
  wire::EncodeClientHello(hello, raw_hello);
  MF_RETURN_IF_ERROR(WriteExact(*stream, raw_hello, deadline).WithContext("sending hello"));

  // The server hello: its frozen prefix first, then the rest once the version matches.
  std::vector<std::byte> buf(wire::kHelloPrefixSize);
  MF_RETURN_IF_ERROR(ReadExact(*stream, buf, deadline).WithContext("waiting for the server hello"));
  wire::ServerHello server;
  size_t used = 0;
  while (true) {
    MF_ASSIGN_OR_RETURN(used, wire::DecodeServerHello(buf, &server));
    if (used != 0) break;
    size_t want = wire::kServerHelloFixedSize;
    if (buf.size() >= wire::kServerHelloFixedSize) {
      want += static_cast<size_t>(buf[40]) | (static_cast<size_t>(buf[41]) << 8);
    }
    if (want <= buf.size()) return Internal("server hello decode made no progress");
    size_t have = buf.size();
    buf.resize(want);
    MF_RETURN_IF_ERROR(ReadExact(*stream, std::span(buf).subspan(have), deadline)
                           .WithContext("waiting for the server hello"));
  }
  if (server.version != wire::kVersion) {
    return Status(Code::kUnsupported,
                  fmt::format("protocol version mismatch: server speaks version {}, this client "
                              "speaks version {}",
                              server.version, wire::kVersion));
  }
  if (server.status != Code::kOk) return Status(server.status, "server: " + server.message);

  if (server.auth == wire::AuthMode::kNone) {
    if (!opt.secret.empty()) {
      return Status(
          Code::kUnauthenticated,
          "server does not authenticate (insecure) although a secret was given; refusing to connect");
    }
    return stream;
  }
  if (opt.secret.empty())
    return Status(Code::kUnauthenticated, "server requires a secret and none was given");
  fabric::Proof proof = fabric::ComputeProof(opt.secret, fabric::Role::kClient, server.nonce, hello.nonce);
  std::vector<std::byte> payload;
  wire::EncodeProof(proof, &payload);
  wire::FrameHeader auth;
  auth.opcode = static_cast<uint8_t>(wire::Opcode::kAuth);
  auth.payload_length = static_cast<uint32_t>(payload.size());
  MF_RETURN_IF_ERROR(SendFrame(*stream, auth, payload, deadline).WithContext("authenticating"));
  wire::FrameHeader reply;
  std::vector<std::byte> reply_payload;
  MF_RETURN_IF_ERROR(ReadFrame(*stream, deadline, &reply, &reply_payload).WithContext("authenticating"));
  if (!reply.reply || reply.opcode != auth.opcode) return ProtocolError("unexpected reply to AUTH");
  MF_RETURN_IF_ERROR(wire::ReplyStatus(reply, reply_payload));
  auto server_proof = wire::DecodeProof(reply_payload);
  if (!server_proof.ok() ||
      !fabric::VerifyProof(opt.secret, fabric::Role::kServer, server.nonce, hello.nonce, *server_proof)) {
    return Status(Code::kUnauthenticated, "server failed to prove it knows the secret");
  }
  return stream;
}

// ---- One data connection ------------------------------------------------------------------

// A request in flight. Written by the submitter that took the slot, then read by the reader
// thread; `in_use`, `sending` and `generation` change only under the connection's mutex.
struct Slot {
  fabric::IoRequest request;
  uint8_t opcode = 0;
  bool in_use = false;
  bool sending = false;  // a submitter is still writing the request out
  uint32_t generation = 0;
  Clock::time_point deadline;
};

// A request on its way to a data connection, with the opcode that carries it.
struct Outgoing {
  const fabric::IoRequest* request = nullptr;
  uint8_t opcode = 0;
};

class DataConnection {
 public:
  DataConnection(std::unique_ptr<Stream> stream, int queue_depth, std::chrono::milliseconds io_timeout,
                 const std::atomic<bool>* closing, const std::atomic<int>* caller_pollers)
      : stream_(std::move(stream)),
        io_timeout_(io_timeout),
        closing_(closing),
        caller_pollers_(caller_pollers),
        slots_(static_cast<size_t>(queue_depth)) {
    MutexLock lock(mu_);
    for (size_t i = slots_.size(); i > 0; --i) free_.push_back(static_cast<uint32_t>(i - 1));
  }
  ~DataConnection() {
    Shutdown();
    Join();
  }

  void Start() {
    reader_ = std::thread([this] { ReadLoop(); });
  }
  void Shutdown() {
    stream_->Shutdown();
    Unpark();
  }
  // Wakes the reader thread if it is parked while callers poll.
  void Unpark() MF_EXCLUDES(park_mu_) {
    MutexLock lock(park_mu_);
    park_cv_.notify_all();
  }
  // A caller's poll (Remote::Poll): completes the replies that have arrived, on the
  // calling thread, unless the reader thread is receiving right now. Returns how many.
  size_t PollReplies() MF_EXCLUDES(rx_mu_, mu_);
  void Join() {
    if (reader_.joinable()) reader_.join();
  }
  bool dead() MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return dead_;
  }

  // Sends requests from the front of `requests` (READ, WRITE, FLUSH or CLOSE) in one
  // gathered write, as many as there are free slots (at most kMaxGather); each completes
  // through its callback. Blocks while every slot is taken. Returns how many were taken:
  // 0, with why, when the connection is dead.
  size_t Send(std::span<const Outgoing> requests, Status* why) MF_EXCLUDES(mu_, send_mu_);
  // Send of one request: false, with why, when it was not taken.
  bool Send(const fabric::IoRequest& request, uint8_t opcode, Status* why) MF_EXCLUDES(mu_, send_mu_) {
    const Outgoing one{&request, opcode};
    return Send(std::span(&one, 1), why) == 1;
  }

 private:
  void ReadLoop() MF_EXCLUDES(mu_, rx_mu_);
  // Completes every reply that has arrived (reading a started one to its end); *idle when
  // the socket had nothing more. Adds the replies completed to *completed.
  Status ReceiveReady(size_t* completed, bool* idle) MF_REQUIRES(rx_mu_) MF_EXCLUDES(mu_);
  // Completes the reply whose header is at the front of the receive buffer, taking its
  // payload from the buffer and then from the socket.
  Status ReadOne() MF_REQUIRES(rx_mu_) MF_EXCLUDES(mu_);
  // Reader thread, once, as it stops: marks the connection dead and completes every
  // request not being sent (their senders complete those).
  void FailAll(const Status& status) MF_EXCLUDES(mu_);
  // Marks a slot free; it returns to the free list while the connection lives.
  void Release(uint32_t index) MF_REQUIRES(mu_);
  Status Expired() MF_EXCLUDES(mu_);

  const std::unique_ptr<Stream> stream_;
  const std::chrono::milliseconds io_timeout_;
  const std::atomic<bool>* closing_;        // the owning remote's Close() started
  const std::atomic<int>* caller_pollers_;  // threads polling the owning remote themselves
  Mutex send_mu_;                           // one request on the wire at a time
  Mutex mu_;
  std::condition_variable_any slot_cv_;
  std::vector<Slot> slots_ MF_GUARDED_BY(mu_);
  std::vector<uint32_t> free_ MF_GUARDED_BY(mu_);
  bool dead_ MF_GUARDED_BY(mu_) = false;
  bool reader_done_ MF_GUARDED_BY(mu_) = false;  // FailAll ran; the reader has stopped
  Status dead_status_ MF_GUARDED_BY(mu_);
  // The receive side: the reader thread, or a caller polling, holds rx_mu_ to receive.
  Mutex rx_mu_;
  std::array<std::byte, wire::kMaxMessageSize> message_ MF_GUARDED_BY(rx_mu_){};
  // Received bytes not yet taken are [rx_begin_, rx_end_).
  std::unique_ptr<std::byte[]> rx_ MF_GUARDED_BY(rx_mu_){new std::byte[kReceiveBufferSize]};
  size_t rx_begin_ MF_GUARDED_BY(rx_mu_) = 0;
  size_t rx_end_ MF_GUARDED_BY(rx_mu_) = 0;
  Status rx_error_ MF_GUARDED_BY(rx_mu_);  // a polling caller's receive failed
  Mutex park_mu_;
  std::condition_variable_any park_cv_;
  std::thread reader_;  // last: uses everything above
};

size_t DataConnection::Send(std::span<const Outgoing> requests, Status* why) {
  std::array<uint32_t, kMaxGather> index{};
  std::array<uint64_t, kMaxGather> tag{};
  size_t count = 0;
  if (requests.empty()) return 0;
  for (;;) {
    {
      MutexLock lock(mu_);
      // While callers poll, the reader is parked: the wait below could last until the
      // requests time out if this thread is the one that would poll.
      if (caller_pollers_->load() == 0) {
        // The analysis cannot see through the predicate; mu_ is held when it runs.
        slot_cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return dead_ || !free_.empty(); });
      }
      if (dead_) {
        *why = dead_status_;
        return 0;
      }
      count = std::min({requests.size(), free_.size(), kMaxGather});
      const auto deadline = Clock::now() + io_timeout_;
      for (size_t i = 0; i < count; ++i) {
        index[i] = free_.back();
        free_.pop_back();
        Slot& s = slots_[index[i]];
        s.request = *requests[i].request;
        s.opcode = requests[i].opcode;
        s.in_use = true;
        s.sending = true;
        s.deadline = deadline;
        tag[i] = (static_cast<uint64_t>(s.generation) << 32) | index[i];
      }
      if (count > 0) break;
    }
    // Every slot is taken and callers poll: take replies here to free one.
    if (PollReplies() == 0) GiveWayWhileSpinning();
  }
  // Headers and payloads, straight from the callers' Buffers.
  std::array<std::array<std::byte, wire::kFrameHeaderSize>, kMaxGather> headers{};
  std::array<std::span<const std::byte>, 2 * kMaxGather> pieces{};
  size_t piece_count = 0;
  for (size_t i = 0; i < count; ++i) {
    const fabric::IoRequest& request = *requests[i].request;
    wire::FrameHeader h;
    h.opcode = requests[i].opcode;
    h.tag = tag[i];
    h.offset = request.offset;
    if (h.opcode == static_cast<uint8_t>(wire::Opcode::kWrite)) {
      h.payload_length = static_cast<uint32_t>(request.data.size());
    } else if (h.opcode == static_cast<uint8_t>(wire::Opcode::kRead)) {
      h.length = static_cast<uint32_t>(request.data.size());
    }
    wire::EncodeFrameHeader(h, headers[i]);
    pieces[piece_count++] = headers[i];
    if (h.payload_length != 0) pieces[piece_count++] = request.data;
  }
  Status sent;
  {
    MutexLock lock(send_mu_);
    sent = WriteExactV(*stream_, std::span(pieces).first(piece_count), Clock::now() + io_timeout_);
  }
  struct Orphan {
    fabric::IoCallback* callback;
    uint64_t cookie;
  };
  std::array<Orphan, kMaxGather> orphans{};
  size_t orphan_count = 0;
  Status orphan_status;
  {
    MutexLock lock(mu_);
    if (!sent.ok() && !dead_) {
      dead_ = true;
      dead_status_ = sent.code() == Code::kTimeout ? Status(Code::kTimeout, "server stopped reading requests")
                                                   : Status(Code::kUnavailable, sent.ToString());
      stream_->Shutdown();  // wakes the reader, which fails the rest
      slot_cv_.notify_all();
    }
    orphan_status = *closing_ ? Status(Code::kAborted, "remote closed") : dead_status_;
    for (size_t i = 0; i < count; ++i) {
      Slot& s = slots_[index[i]];
      // Its reply may have come while later requests of the group were still being sent:
      // then the reader completed it and the slot may already carry another request.
      if (s.generation != static_cast<uint32_t>(tag[i] >> 32)) continue;
      s.sending = false;
      // Once the reader has failed everything and exited it completes nothing more; it
      // skipped this request while it was being sent, so it is ours. Until then the reader
      // remains the only one completing requests.
      if (reader_done_ && s.in_use) {
        orphans[orphan_count++] = {s.request.callback, s.request.cookie};
        s.in_use = false;
        ++s.generation;
      }
    }
  }
  for (size_t i = 0; i < orphan_count; ++i)
    orphans[i].callback->OnIoComplete(orphans[i].cookie, orphan_status);
  return count;
}

void DataConnection::Release(uint32_t index) {
  Slot& s = slots_[index];
  s.in_use = false;
  ++s.generation;
  if (!dead_) {
    free_.push_back(index);
    slot_cv_.notify_one();
  }
}

void DataConnection::FailAll(const Status& status) {
  struct Done {
    fabric::IoCallback* callback;
    uint64_t cookie;
  };
  std::vector<Done> done;
  Status final_status;
  {
    MutexLock lock(mu_);
    if (!dead_) {
      dead_ = true;
      dead_status_ = status;
    }
    reader_done_ = true;
    final_status = *closing_ ? Status(Code::kAborted, "remote closed") : dead_status_;
    done.reserve(slots_.size());
    for (uint32_t i = 0; i < slots_.size(); ++i) {
      Slot& s = slots_[i];
      if (!s.in_use || s.sending) continue;  // a sending request is completed by its sender
      done.push_back({s.request.callback, s.request.cookie});
      Release(i);
    }
    slot_cv_.notify_all();
  }
  stream_->Shutdown();
  for (const auto& d : done) d.callback->OnIoComplete(d.cookie, final_status);
}

Status DataConnection::Expired() {
  auto now = Clock::now();
  MutexLock lock(mu_);
  for (const Slot& s : slots_) {
    if (s.in_use && !s.sending && now > s.deadline) {
      return Status(Code::kTimeout,
                    fmt::format("no reply from the server within {} ms", io_timeout_.count()));
    }
  }
  return Status::Ok();
}

size_t DataConnection::PollReplies() {
  if (!rx_mu_.TryLock()) return 0;
  size_t completed = 0;
  bool idle = false;
  Status st = rx_error_;
  if (st.ok()) st = ReceiveReady(&completed, &idle);
  if (!st.ok() && rx_error_.ok()) rx_error_ = st;  // the reader thread fails the connection
  rx_mu_.Unlock();
  if (!st.ok()) Unpark();
  return completed;
}

Status DataConnection::ReceiveReady(size_t* completed, bool* idle) {
  *idle = false;
  while (true) {
    if (rx_end_ - rx_begin_ >= wire::kFrameHeaderSize) {
      // A reply has started: it is read to its end against a deadline.
      MF_RETURN_IF_ERROR(ReadOne());
      ++*completed;
      continue;
    }
    // Take in what has arrived. TLS may have records that carry no data (session
    // tickets, key updates).
    if (rx_begin_ > 0) {
      std::memmove(rx_.get(), rx_.get() + rx_begin_, rx_end_ - rx_begin_);
      rx_end_ -= rx_begin_;
      rx_begin_ = 0;
    }
    MF_ASSIGN_OR_RETURN(size_t n,
                        stream_->ReadSome(std::span(rx_.get() + rx_end_, kReceiveBufferSize - rx_end_)));
    if (n == 0) {
      *idle = true;
      return Status::Ok();
    }
    rx_end_ += n;
  }
}

void DataConnection::ReadLoop() {
  auto next_check = Clock::now() + kReaderTick;
  while (true) {
    // Deadlines are checked on every tick, also while other replies keep arriving.
    if (Clock::now() >= next_check) {
      next_check = Clock::now() + kReaderTick;
      Status expired = Expired();
      if (!expired.ok()) {
        spdlog::warn("tcp client: {}; dropping the connection", expired.message());
        FailAll(expired);
        return;
      }
    }
    Status st;
    bool idle = false;
    {
      MutexLock lock(rx_mu_);
      st = rx_error_;
      if (st.ok() && (caller_pollers_->load() == 0 || *closing_)) {
        size_t completed = 0;
        st = ReceiveReady(&completed, &idle);
      }
    }
    if (st.ok() && caller_pollers_->load() > 0 && !*closing_) {
      // Callers poll the socket themselves: stay out of their way until they stop, the
      // connection closes, a caller's receive fails or the next deadline check.
      MutexLock lock(park_mu_);
      park_cv_.wait_for(park_mu_, kReaderTick);
      continue;
    }
    if (st.ok() && idle) {
      pollfd p{stream_->fd(), static_cast<short>(stream_->read_wait() == IoWait::kWrite ? POLLOUT : POLLIN),
               0};
      int ready = ::poll(&p, 1, static_cast<int>(kReaderTick.count()));
      if (ready < 0 && errno != EINTR) st = Status::FromErrno(errno, "poll");
    }
    if (!st.ok()) {
      if (!*closing_) spdlog::warn("tcp client: data connection failed: {}", st.ToString());
      FailAll(
          st.code() == Code::kProtocolError || st.code() == Code::kTimeout
              ? st
              : Status(Code::kUnavailable, "connection to the server lost: " + std::string(st.message())));
      return;
    }
  }
}

Status DataConnection::ReadOne() {
  const auto deadline = Clock::now() + io_timeout_;
  wire::FrameHeader h;
  MF_RETURN_IF_ERROR(
      wire::DecodeFrameHeader(std::span(rx_.get() + rx_begin_, wire::kFrameHeaderSize), &h).status());
  rx_begin_ += wire::kFrameHeaderSize;
  if (!h.reply) return ProtocolError("server sent a request on a data connection");
  const uint32_t index = static_cast<uint32_t>(h.tag & kSlotIndexMask);
  const uint32_t generation = static_cast<uint32_t>(h.tag >> 32);
  fabric::IoRequest request;
  {
    MutexLock lock(mu_);
    if (index >= slots_.size() || !slots_[index].in_use || slots_[index].generation != generation ||
        slots_[index].opcode != h.opcode) {
      return ProtocolError(fmt::format("reply with unknown tag {:#x}", h.tag));
    }
    request = slots_[index].request;
  }
  std::span<std::byte> payload;
  if (h.status != Code::kOk) {
    if (h.payload_length > message_.size()) return ProtocolError("error reply too long");
    payload = std::span(message_).first(h.payload_length);
  } else if (h.opcode == static_cast<uint8_t>(wire::Opcode::kRead)) {
    if (h.payload_length != request.data.size()) {
      return ProtocolError(
          fmt::format("READ reply of {} bytes for {} asked", h.payload_length, request.data.size()));
    }
    payload = request.data;  // the slot stays ours until released below
  } else if (h.payload_length != 0) {
    return ProtocolError(fmt::format("unexpected payload in a {} reply", wire::OpcodeName(h.opcode)));
  }
  // What the receive buffer holds of the payload, then the rest straight from the socket.
  const size_t buffered = std::min(payload.size(), rx_end_ - rx_begin_);
  if (buffered > 0) std::memcpy(payload.data(), rx_.get() + rx_begin_, buffered);
  rx_begin_ += buffered;
  if (rx_begin_ == rx_end_) rx_begin_ = rx_end_ = 0;
  if (buffered < payload.size()) MF_RETURN_IF_ERROR(ReadExact(*stream_, payload.subspan(buffered), deadline));
  Status status;
  if (h.status != Code::kOk) status = wire::ReplyStatus(h, payload);
  {
    MutexLock lock(mu_);
    if (!slots_[index].in_use || slots_[index].generation != generation)
      return Internal("slot completed twice");
    Release(index);
  }
  request.callback->OnIoComplete(request.cookie, status);
  return Status::Ok();
}

// ---- The Remote -----------------------------------------------------------------------------

class TcpRemote final : public fabric::Remote {
 public:
  TcpRemote(fabric::RegionInfo info, bool writable, size_t max_transfer, std::string_view transport,
            std::chrono::milliseconds io_timeout)
      : info_(std::move(info)),
        writable_(writable),
        max_transfer_(max_transfer),
        transport_(transport),
        io_timeout_(io_timeout) {}
  ~TcpRemote() override { [[maybe_unused]] Status st = Close(); }

  // Set-up, before the Remote is shared.
  void AddConnection(std::unique_ptr<Stream> stream, int queue_depth) {
    conns_.push_back(std::make_unique<DataConnection>(std::move(stream), queue_depth, io_timeout_, &closing_,
                                                      &caller_pollers_));
  }
  void StartReaders() {
    for (auto& c : conns_) c->Start();
  }
  void set_writable(bool writable) { writable_ = writable; }

  const fabric::RegionInfo& info() const override { return info_; }
  bool writable() const override { return writable_; }
  std::string_view transport() const override { return transport_; }
  size_t max_transfer() const override { return max_transfer_; }

  Result<fabric::Buffer> AllocateBuffer(size_t size) override {
    MF_ASSIGN_OR_RETURN(MappedMemory memory, MappedMemory::Anonymous(size));
    return fabric::Buffer(std::move(memory), nullptr);
  }

  // Valid requests go out in groups: each connection's share of a group is one write.
  void Submit(std::span<const fabric::IoRequest> requests) override {
    std::array<Outgoing, kMaxGather> group{};
    size_t count = 0;
    for (const auto& r : requests) {
      if (r.callback == nullptr) continue;  // cannot be completed; a caller bug
      Status invalid = Validate(r);
      if (!invalid.ok()) {
        r.callback->OnIoComplete(r.cookie, invalid);
        continue;
      }
      group[count++] = {&r, static_cast<uint8_t>(r.kind == fabric::IoKind::kRead ? wire::Opcode::kRead
                                                                                 : wire::Opcode::kWrite)};
      if (count == group.size()) {
        SendAnywhere(group);
        count = 0;
      }
    }
    if (count > 0) SendAnywhere(std::span(group).first(count));
  }

  bool can_poll() const override { return true; }
  size_t Poll() override {
    size_t n = 0;
    for (auto& c : conns_) n += c->PollReplies();
    return n;
  }
  void SetCallerPolling(bool active) override {
    if (active) {
      caller_pollers_.fetch_add(1);
    } else if (caller_pollers_.fetch_sub(1) == 1) {
      for (auto& c : conns_) c->Unpark();  // the readers take over again
    }
  }

  Status Flush() override {
    if (closing_) return Status(Code::kAborted, "remote closed");
    fabric::IoBatch batch(conns_.size());
    for (auto& c : conns_) {
      fabric::IoRequest r;
      r.callback = &batch;
      Status why;
      if (!c->Send(r, static_cast<uint8_t>(wire::Opcode::kFlush), &why)) batch.OnIoComplete(0, Status::Ok());
    }
    Status st = batch.Wait();
    if (!st.ok()) return st;
    if (AllDead()) return Status(Code::kUnavailable, "no connection to the server left");
    return Status::Ok();
  }

  Status Close() override MF_EXCLUDES(close_mu_) {
    MutexLock lock(close_mu_);
    if (closed_) return Status::Ok();
    closed_ = true;
    closing_ = true;
    // Keep one live connection to hand the lease back; drop the others first so none of
    // their requests can land after CLOSE.
    DataConnection* keeper = nullptr;
    for (auto& c : conns_) {
      if (keeper == nullptr && !c->dead()) {
        keeper = c.get();
        continue;
      }
      c->Shutdown();
    }
    for (auto& c : conns_) {
      if (c.get() != keeper) c->Join();
    }
    Status result;
    if (keeper != nullptr) {
      fabric::IoBatch batch(1);
      fabric::IoRequest r;
      r.callback = &batch;
      Status why;
      if (keeper->Send(r, static_cast<uint8_t>(wire::Opcode::kClose), &why)) {
        result = batch.Wait();
        if (result.code() == Code::kAborted) result = Status::Ok();  // the reader stopped first
      }
      keeper->Shutdown();
      keeper->Join();
    }
    return result;
  }

 private:
  Status Validate(const fabric::IoRequest& r) const {
    if (closing_) return Status(Code::kAborted, "remote closed");
    const size_t len = r.data.size();
    if (len == 0) return InvalidArgument("request of 0 bytes");
    if (len > max_transfer_) {
      return InvalidArgument(fmt::format("request of {} bytes exceeds max_transfer {}", len, max_transfer_));
    }
    if (r.buffer == nullptr || r.data.data() < r.buffer->data() ||
        r.data.data() + len > r.buffer->data() + r.buffer->size()) {
      return InvalidArgument("request data does not lie inside its buffer");
    }
    MF_RETURN_IF_ERROR(fabric::CheckRange(r.offset, len, info_.size));
    if (r.kind == fabric::IoKind::kWrite && !writable_) {
      return Status(Code::kPermissionDenied, "write without the write lease (opened read-only)");
    }
    return Status::Ok();
  }

  // Spreads `group` over the live connections, round-robin, in contiguous shares; fails
  // what no connection took. Allocates only on failure.
  void SendAnywhere(std::span<const Outgoing> group) {
    Status why;
    const size_t n = conns_.size();
    const size_t share = (group.size() + n - 1) / n;
    size_t next = next_.fetch_add(1, std::memory_order_relaxed);
    size_t dead_in_a_row = 0;  // a dead connection stays dead: n in a row means all are
    while (!group.empty() && dead_in_a_row < n) {
      const size_t taken = conns_[next++ % n]->Send(group.first(std::min(share, group.size())), &why);
      dead_in_a_row = taken == 0 ? dead_in_a_row + 1 : 0;
      group = group.subspan(taken);
    }
    if (group.empty()) return;
    if (closing_) {
      why = Status(Code::kAborted, "remote closed");
    } else if (why.ok()) {
      why = Status(Code::kUnavailable, "no connection to the server left");
    }
    for (const Outgoing& o : group) o.request->callback->OnIoComplete(o.request->cookie, why);
  }

  bool AllDead() {
    for (auto& c : conns_) {
      if (!c->dead()) return false;
    }
    return true;
  }

  const fabric::RegionInfo info_;
  bool writable_;  // set before the Remote is shared
  const size_t max_transfer_;
  const std::string transport_;
  const std::chrono::milliseconds io_timeout_;
  std::atomic<bool> closing_{false};
  std::atomic<int> caller_pollers_{0};  // threads inside SetCallerPolling(true)
  std::atomic<size_t> next_{0};
  Mutex close_mu_;
  bool closed_ MF_GUARDED_BY(close_mu_) = false;
  // Fixed after set-up; Close() stops the connections but keeps them, so a Submit racing
  // with Close() finds dead connections, never freed ones.
  std::vector<std::unique_ptr<DataConnection>> conns_;
};

}  // namespace

// ---- TcpClient ------------------------------------------------------------------------------

TcpClient::TcpClient(Endpoint endpoint, std::unique_ptr<Stream> control)
    : endpoint_(std::move(endpoint)), control_(std::move(control)) {}

TcpClient::~TcpClient() = default;

Result<std::unique_ptr<TcpClient>> TcpClient::Connect(const fabric::Url& url,
                                                      const transports::ClientOptions& options, bool tls) {
  Endpoint ep;
  ep.host = url.host;
  ep.port = url.port;
  ep.options = options;
  if (tls || url.scheme == fabric::Scheme::kTls) {
    MF_ASSIGN_OR_RETURN(ep.tls, TlsContext::ForClient(options.tls));
    ep.server_name = options.tls.server_name.empty() ? url.host : options.tls.server_name;
  }
  auto stream = OpenSession(ep, wire::Channel::kControl);
  if (!stream.ok()) return stream.status().WithContext(fmt::format("connecting to {}", url.ToString()));
  return std::unique_ptr<TcpClient>(new TcpClient(std::move(ep), std::move(stream).value()));
}

Result<std::vector<std::byte>> TcpClient::Call(uint8_t opcode, std::span<const std::byte> payload) {
  MutexLock lock(mu_);
  if (!broken_.ok()) return broken_;
  wire::FrameHeader h;
  h.opcode = opcode;
  h.tag = next_tag_++;
  h.payload_length = static_cast<uint32_t>(payload.size());
  const auto deadline = Clock::now() + endpoint_.options.io_timeout;
  wire::FrameHeader reply;
  std::vector<std::byte> reply_payload;
  Status st = SendFrame(*control_, h, payload, deadline);
  if (st.ok()) st = ReadFrame(*control_, deadline, &reply, &reply_payload);
  if (st.ok() && (!reply.reply || reply.tag != h.tag || reply.opcode != h.opcode)) {
    st = ProtocolError("reply does not match the request");
  }
  if (!st.ok()) {
    broken_ = Status(
        st.code() == Code::kTimeout || st.code() == Code::kProtocolError ? st.code() : Code::kUnavailable,
        "control connection lost: " + std::string(st.message()));
    control_->Shutdown();
    return broken_;
  }
  MF_RETURN_IF_ERROR(wire::ReplyStatus(reply, reply_payload));
  return reply_payload;
}

Result<std::vector<fabric::RegionInfo>> TcpClient::List() {
  MF_ASSIGN_OR_RETURN(auto payload, Call(static_cast<uint8_t>(wire::Opcode::kList), {}));
  return wire::DecodeRegionList(payload);
}

Result<fabric::RegionInfo> TcpClient::Stat(std::string_view name) {
  if (name.size() > fabric::kMaxRegionNameLength) return InvalidArgument("region name too long");
  std::vector<std::byte> request;
  wire::EncodeName(name, &request);
  MF_ASSIGN_OR_RETURN(auto payload, Call(static_cast<uint8_t>(wire::Opcode::kStat), request));
  return wire::DecodeRegionInfo(payload);
}

Result<fabric::RegionInfo> TcpClient::Create(const fabric::RegionSpec& spec) {
  if (spec.name.size() > fabric::kMaxRegionNameLength) return InvalidArgument("region name too long");
  if (spec.path.size() > wire::kMaxPathLength) return InvalidArgument("region path too long");
  std::vector<std::byte> request;
  wire::EncodeRegionSpec(spec, &request);
  MF_ASSIGN_OR_RETURN(auto payload, Call(static_cast<uint8_t>(wire::Opcode::kCreate), request));
  return wire::DecodeRegionInfo(payload);
}

Status TcpClient::Delete(std::string_view name) {
  if (name.size() > fabric::kMaxRegionNameLength) return InvalidArgument("region name too long");
  std::vector<std::byte> request;
  wire::EncodeName(name, &request);
  return Call(static_cast<uint8_t>(wire::Opcode::kDelete), request).status();
}

Result<std::unique_ptr<fabric::Remote>> TcpClient::Open(std::string_view name,
                                                        const fabric::OpenOptions& options) {
  MF_ASSIGN_OR_RETURN(OpenedRegion opened, OpenRegion(name, options));
  return std::move(opened.remote);
}

Result<TcpClient::OpenedRegion> TcpClient::OpenRegion(std::string_view name,
                                                      const fabric::OpenOptions& options) {
  if (options.connections < 1 || options.connections > kMaxDataConnections) {
    return InvalidArgument(fmt::format("connections must be 1..{}", kMaxDataConnections));
  }
  if (options.queue_depth < 1 || options.queue_depth > kMaxQueueDepth) {
    return InvalidArgument(fmt::format("queue_depth must be 1..{}", kMaxQueueDepth));
  }
  if (name.size() > fabric::kMaxRegionNameLength) return InvalidArgument("region name too long");
  wire::OpenRequest request{std::string(name), options.writable};
  std::vector<std::byte> payload;
  wire::EncodeOpenRequest(request, &payload);
  MF_ASSIGN_OR_RETURN(auto reply_payload, Call(static_cast<uint8_t>(wire::Opcode::kOpen), payload));
  MF_ASSIGN_OR_RETURN(wire::OpenReply open, wire::DecodeOpenReply(reply_payload));

  auto remote = std::make_unique<TcpRemote>(open.info, options.writable, open.max_transfer, transport(),
                                            endpoint_.options.io_timeout);
  std::vector<std::byte> token;
  wire::EncodeToken(open.token, &token);
  bool writable = options.writable;
  for (int i = 0; i < options.connections; ++i) {
    auto stream = OpenSession(endpoint_, wire::Channel::kData);
    Status st = stream.status();
    if (st.ok()) {
      const auto deadline = Clock::now() + endpoint_.options.io_timeout;
      wire::FrameHeader h;
      h.opcode = static_cast<uint8_t>(wire::Opcode::kAttach);
      h.payload_length = static_cast<uint32_t>(token.size());
      wire::FrameHeader reply;
      std::vector<std::byte> attach_payload;
      st = SendFrame(**stream, h, token, deadline);
      if (st.ok()) st = ReadFrame(**stream, deadline, &reply, &attach_payload);
      if (st.ok() && (!reply.reply || reply.opcode != h.opcode))
        st = ProtocolError("unexpected reply to ATTACH");
      if (st.ok()) st = wire::ReplyStatus(reply, attach_payload);
      if (st.ok()) {
        auto attached = wire::DecodeAttachReply(attach_payload);
        st = attached.status();
        if (st.ok() && (attached->size != open.info.size || attached->generation != open.info.generation)) {
          st = ProtocolError("ATTACH names another region than OPEN");
        }
        if (st.ok()) writable = attached->writable;
      }
    }
    if (!st.ok()) {
      remote->StartReaders();
      [[maybe_unused]] Status closed = remote->Close();  // hands the lease back when one attached
      return st.WithContext(fmt::format("opening data connection {} of {}", i + 1, options.connections));
    }
    remote->AddConnection(std::move(stream).value(), options.queue_depth);
  }
  remote->set_writable(writable);
  remote->StartReaders();
  return OpenedRegion{std::unique_ptr<fabric::Remote>(std::move(remote)), open.token, open.rdma_port};
}

}  // namespace mf::tcp
