#include "fabric/migration.h"

#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <thread>

#include "fabric/le_codec.h"

namespace mf::fabric {
namespace migration_wire {
namespace {

bool KnownType(uint8_t t) {
  return t >= static_cast<uint8_t>(Type::kHello) && t <= static_cast<uint8_t>(Type::kProgress);
}

bool KnownCode(uint8_t c) {
  return c > static_cast<uint8_t>(Code::kOk) && c <= static_cast<uint8_t>(Code::kInternal);
}

}  // namespace

std::string_view TypeName(Type type) {
  switch (type) {
    case Type::kHello: return "HELLO";
    case Type::kReady: return "READY";
    case Type::kDirtySet: return "DIRTY_SET";
    case Type::kLeaseReleased: return "LEASE_RELEASED";
    case Type::kDone: return "DONE";
    case Type::kAbort: return "ABORT";
    case Type::kChallenge: return "CHALLENGE";
    case Type::kProof: return "PROOF";
    case Type::kProgress: return "PROGRESS";
  }
  return "UNKNOWN";
}

DirtySet DirtySet::FromChunks(uint64_t chunk_size, uint64_t chunk_count, std::span<const uint64_t> chunks) {
  DirtySet d{chunk_size, chunk_count, {}};
  for (uint64_t c : chunks) {
    if (!d.ranges.empty() && d.ranges.back().first + d.ranges.back().count == c) {
      ++d.ranges.back().count;
    } else {
      d.ranges.push_back({c, 1});
    }
  }
  return d;
}

uint64_t DirtySet::chunks() const {
  uint64_t n = 0;
  for (const auto& r : ranges) n += r.count;
  return n;
}

Result<uint32_t> DecodeHeader(std::span<const std::byte> header, Type* type) {
  if (header.size() < kHeaderSize) return OutOfRange("migration message header truncated");
  Reader r(header.first(kHeaderSize));
  uint8_t t = 0, version = 0;
  uint16_t reserved = 0;
  uint32_t length = 0;
  (void)(r.U8(&t) && r.U8(&version) && r.U16(&reserved) && r.U32(&length));
  if (version != kVersion)
    return ProtocolError("migration message of version " + std::to_string(version) + ", expected 1");
  if (!KnownType(t)) return ProtocolError("unknown migration message type " + std::to_string(t));
  if (reserved != 0) return ProtocolError("migration message with reserved bits set");
  if (length > kMaxPayload) return ProtocolError("migration message of " + std::to_string(length) + " bytes");
  *type = static_cast<Type>(t);
  return length;
}

Result<Message> DecodePayload(Type type, std::span<const std::byte> payload) {
  Reader r(payload);
  Message m;
  m.type = type;
  const std::string what(TypeName(type));
  auto malformed = [&] { return ProtocolError("malformed " + what + " message"); };
  switch (type) {
    case Type::kHello: {
      if (!r.U64(&m.hello.size) || !r.U64(&m.hello.chunk_size) || !r.U64(&m.hello.generation) ||
          !r.String16(kMaxName, &m.hello.name))
        return malformed();
      if (m.hello.chunk_size == 0 || m.hello.size == 0) return malformed();
      break;
    }
    case Type::kReady:
      if (!r.U64(&m.ready_bytes)) return malformed();
      break;
    case Type::kDirtySet: {
      uint32_t n = 0;
      if (!r.U64(&m.dirty.chunk_size) || !r.U64(&m.dirty.chunk_count) || !r.U32(&n)) return malformed();
      if (m.dirty.chunk_size == 0 || n > kMaxRanges || r.remaining() != size_t{n} * kRangeSize)
        return malformed();
      m.dirty.ranges.resize(n);
      uint64_t end = 0;  // of the previous range
      for (uint32_t i = 0; i < n; ++i) {
        ChunkRange& c = m.dirty.ranges[i];
        (void)(r.U64(&c.first) && r.U64(&c.count));
        if (c.count == 0 || c.first < end || c.first > m.dirty.chunk_count ||
            c.count > m.dirty.chunk_count - c.first)
          return ProtocolError("DIRTY_SET range " + std::to_string(i) +
                               " is empty, unordered or out of range");
        end = c.first + c.count;
      }
      break;
    }
    case Type::kLeaseReleased: break;
    case Type::kDone:
      if (!r.U64(&m.done.lease_ns) || !r.U64(&m.done.repull_ns) || !r.U64(&m.done.repull_bytes))
        return malformed();
      break;
    case Type::kAbort: {
      uint8_t code = 0;
      std::string message;
      if (!r.U8(&code) || !r.String16(kMaxAbortMessage, &message) || !KnownCode(code)) return malformed();
      m.abort = Status(static_cast<Code>(code), std::move(message));
      break;
    }
    case Type::kChallenge:
    case Type::kProof:
      if (!r.Bytes(m.auth)) return malformed();
      break;
    case Type::kProgress:
      if (!r.U64(&m.progress_bytes)) return malformed();
      break;
  }
  if (r.remaining() != 0) return ProtocolError(what + " message has trailing bytes");
  return m;
}

Result<Message> Decode(std::span<const std::byte> in, size_t* used) {
  Type type{};
  MF_ASSIGN_OR_RETURN(const uint32_t length, DecodeHeader(in, &type));
  if (in.size() - kHeaderSize < length) return OutOfRange("migration message truncated");
  MF_ASSIGN_OR_RETURN(Message m, DecodePayload(type, in.subspan(kHeaderSize, length)));
  *used = kHeaderSize + length;
  return m;
}

std::vector<std::byte> Encode(const Message& m) {
  std::vector<std::byte> out(kHeaderSize);
  Writer w(&out);
  switch (m.type) {
    case Type::kHello:
      w.U64(m.hello.size);
      w.U64(m.hello.chunk_size);
      w.U64(m.hello.generation);
      w.String16(m.hello.name);
      break;
    case Type::kReady: w.U64(m.ready_bytes); break;
    case Type::kDirtySet:
      w.U64(m.dirty.chunk_size);
      w.U64(m.dirty.chunk_count);
      w.U32(static_cast<uint32_t>(m.dirty.ranges.size()));
      for (const auto& r : m.dirty.ranges) {
        w.U64(r.first);
        w.U64(r.count);
      }
      break;
    case Type::kLeaseReleased: break;
    case Type::kDone:
      w.U64(m.done.lease_ns);
      w.U64(m.done.repull_ns);
      w.U64(m.done.repull_bytes);
      break;
    case Type::kAbort:
      w.U8(static_cast<uint8_t>(m.abort.code()));
      w.String16(m.abort.message());
      break;
    case Type::kChallenge:
    case Type::kProof: w.Bytes(m.auth); break;
    case Type::kProgress: w.U64(m.progress_bytes); break;
  }
  const size_t length = out.size() - kHeaderSize;
  std::vector<std::byte> header;
  Writer h(&header);
  h.U8(static_cast<uint8_t>(m.type));
  h.U8(kVersion);
  h.U16(0);
  h.U32(static_cast<uint32_t>(length));
  std::copy(header.begin(), header.end(), out.begin());
  return out;
}

Message MakeHello(Hello hello) {
  Message m;
  m.type = Type::kHello;
  m.hello = std::move(hello);
  if (m.hello.name.size() > kMaxName) m.hello.name.resize(kMaxName);
  return m;
}
Message MakeReady(uint64_t bytes) {
  Message m;
  m.type = Type::kReady;
  m.ready_bytes = bytes;
  return m;
}
Message MakeDirtySet(DirtySet dirty) {
  Message m;
  m.type = Type::kDirtySet;
  m.dirty = std::move(dirty);
  return m;
}
Message MakeLeaseReleased() {
  Message m;
  m.type = Type::kLeaseReleased;
  return m;
}
Message MakeDone(Done done) {
  Message m;
  m.type = Type::kDone;
  m.done = done;
  return m;
}
Message MakeAbort(const Status& why) {
  Message m;
  m.type = Type::kAbort;
  std::string text(why.message());
  if (text.size() > kMaxAbortMessage) text.resize(kMaxAbortMessage);
  m.abort = Status(why.ok() ? Code::kAborted : why.code(), std::move(text));
  return m;
}

Message MakeChallenge(const Nonce& nonce) {
  Message m;
  m.type = Type::kChallenge;
  m.auth = nonce;
  return m;
}
Message MakeProof(const Proof& proof) {
  Message m;
  m.type = Type::kProof;
  m.auth = proof;
  return m;
}
Message MakeProgress(uint64_t bytes_local) {
  Message m;
  m.type = Type::kProgress;
  m.progress_bytes = bytes_local;
  return m;
}

}  // namespace migration_wire

namespace wire = migration_wire;
using Clock = std::chrono::steady_clock;

namespace {

uint64_t NanosSince(Clock::time_point t) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
}

// Waits until fd is ready for `events` or the deadline passes.
Status WaitFd(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return Status(Code::kTimeout, "migration channel: peer did not answer in time");
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (n < 0 && errno != EINTR) return Status::FromErrno(errno, "poll on the migration channel");
    if (n > 0) return Status::Ok();
  }
}

}  // namespace

// ---- MigrationChannel -------------------------------------------------------------------

Status MigrationChannel::Send(const wire::Message& message, std::chrono::milliseconds timeout) {
  if (!fd_) return Unavailable("migration channel is closed");
  const std::vector<std::byte> bytes = wire::Encode(message);
  const auto deadline = Clock::now() + timeout;
  size_t sent = 0;
  while (sent < bytes.size()) {
    MF_RETURN_IF_ERROR(WaitFd(fd_.get(), POLLOUT, deadline));
    const ssize_t n =
        ::send(fd_.get(), bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return Status(Code::kUnavailable, "migration channel: peer gone while sending", errno);
    }
    sent += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Result<wire::Message> MigrationChannel::Receive(std::chrono::milliseconds timeout) {
  if (!fd_) return Unavailable("migration channel is closed");
  const auto deadline = Clock::now() + timeout;
  auto read_exact = [&](std::span<std::byte> out) -> Status {
    size_t got = 0;
    while (got < out.size()) {
      MF_RETURN_IF_ERROR(WaitFd(fd_.get(), POLLIN, deadline));
      const ssize_t n = ::recv(fd_.get(), out.data() + got, out.size() - got, MSG_DONTWAIT);
      if (n == 0) return Unavailable("migration channel: the peer closed it");
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        return Status(Code::kUnavailable, "migration channel: receive failed", errno);
      }
      got += static_cast<size_t>(n);
    }
    return Status::Ok();
  };
  std::byte header[wire::kHeaderSize];
  MF_RETURN_IF_ERROR(read_exact(header));
  wire::Type type{};
  MF_ASSIGN_OR_RETURN(const uint32_t length, wire::DecodeHeader(header, &type));
  std::vector<std::byte> payload(length);
  MF_RETURN_IF_ERROR(read_exact(payload));
  return wire::DecodePayload(type, payload);
}

void MigrationChannel::Shutdown() {
  if (fd_) ::shutdown(fd_.get(), SHUT_RDWR);
}

// ---- AuthenticateChannel ----------------------------------------------------------------

namespace {

// The next message, which must be of type `want`; an ABORT is returned as its status.
Result<wire::Message> Expect(MigrationChannel& channel, wire::Type want, std::chrono::milliseconds timeout) {
  MF_ASSIGN_OR_RETURN(wire::Message m, channel.Receive(timeout));
  if (m.type == wire::Type::kAbort) return m.abort.WithContext("the peer refused the migration channel");
  if (m.type != want) {
    return ProtocolError("migration channel: expected " + std::string(wire::TypeName(want)) + ", got " +
                         std::string(wire::TypeName(m.type)) +
                         " (is the other side run without a secret? Both sides need the same secret)");
  }
  return m;
}

}  // namespace

Result<UniqueFd> AuthenticateChannel(UniqueFd fd, const Secret& secret, MigrationSide side,
                                     std::chrono::milliseconds timeout) {
  if (secret.empty()) return InvalidArgument("authenticating the migration channel needs a secret");
  MigrationChannel channel(std::move(fd));
  MF_ASSIGN_OR_RETURN(const Nonce mine, MakeNonce());
  Nonce theirs{};
  auto reject = [&](std::string why) {
    Status st(Code::kUnauthenticated, std::move(why));
    (void)channel.Send(wire::MakeAbort(Status(Code::kUnauthenticated,
                                              "the other side rejected this side's proof: the "
                                              "two sides hold different secrets")),
                       timeout);
    channel.Shutdown();
    return st;
  };
  if (side == MigrationSide::kSource) {
    // The source's nonce is the "client" nonce of fabric/auth.h, the destination's the
    // "server" nonce.
    MF_RETURN_IF_ERROR(channel.Send(wire::MakeChallenge(mine), timeout));
    MF_ASSIGN_OR_RETURN(wire::Message challenge, Expect(channel, wire::Type::kChallenge, timeout));
    theirs = challenge.auth;
    MF_RETURN_IF_ERROR(
        channel.Send(wire::MakeProof(ComputeProof(secret, Role::kMigrationSource, theirs, mine)), timeout));
    MF_ASSIGN_OR_RETURN(wire::Message proof, Expect(channel, wire::Type::kProof, timeout));
    if (!VerifyProof(secret, Role::kMigrationDestination, theirs, mine, proof.auth))
      return reject("the destination's proof is wrong: the two sides hold different secrets");
  } else {
    MF_ASSIGN_OR_RETURN(wire::Message challenge, Expect(channel, wire::Type::kChallenge, timeout));
    theirs = challenge.auth;
    MF_RETURN_IF_ERROR(channel.Send(wire::MakeChallenge(mine), timeout));
    MF_ASSIGN_OR_RETURN(wire::Message proof, Expect(channel, wire::Type::kProof, timeout));
    if (!VerifyProof(secret, Role::kMigrationSource, mine, theirs, proof.auth))
      return reject("the source's proof is wrong: the two sides hold different secrets");
    MF_RETURN_IF_ERROR(channel.Send(
        wire::MakeProof(ComputeProof(secret, Role::kMigrationDestination, mine, theirs)), timeout));
  }
  return channel.Release();
}

// ---- MountSource ------------------------------------------------------------------------

Result<std::unique_ptr<MountSource>> MountSource::Create(std::unique_ptr<Remote> writable,
                                                         MountOptions options, WritableOpener reopen) {
  if (writable == nullptr || !writable->writable())
    return InvalidArgument("a migration source needs a Remote holding the write lease");
  if (options.read_only) return InvalidArgument("a migration source cannot be a read-only mount");
  std::unique_ptr<MountSource> s(new MountSource(std::move(writable), std::move(reopen)));
  MF_ASSIGN_OR_RETURN(s->mount_, Mount::Create(*s->remote_, std::move(options)));
  return s;
}

Result<std::unique_ptr<MountSource>> MountSource::Adopt(std::unique_ptr<Remote> writable,
                                                        std::unique_ptr<Mount> mount, WritableOpener reopen) {
  if (writable == nullptr || !writable->writable())
    return InvalidArgument("a migration source needs a Remote holding the write lease");
  if (mount == nullptr || mount->read_only() || mount->detached() || mount->size() != writable->size())
    return InvalidArgument("a migration source needs a writable Mount attached to its Remote");
  std::unique_ptr<MountSource> s(new MountSource(std::move(writable), std::move(reopen)));
  s->mount_ = std::move(mount);
  return s;
}

MountSource::~MountSource() {
  if (mount_) (void)mount_->Close();
}

Status MountSource::ReleaseLease() {
  MF_RETURN_IF_ERROR(mount_->Detach());
  // A write after the last Sync (a suspend hook that did not stop the writer) would be
  // lost to the destination: refuse, and keep going as before.
  if (const uint64_t dirty = mount_->stats().dirty_chunks; dirty > 0) {
    MF_RETURN_IF_ERROR(mount_->Attach(*remote_));
    return Status(Code::kAborted, std::to_string(dirty) + " chunks were written after the final sync");
  }
  Status closed = remote_->Close();
  if (!closed.ok()) spdlog::warn("migration: closing the writable remote: {}", closed.ToString());
  // The Remote object stays until RetakeLease replaces it: the mount still points at it.
  return Status::Ok();
}

Status MountSource::RetakeLease() {
  if (!reopen_) return Unsupported("no way to re-open the region writable");
  MF_ASSIGN_OR_RETURN(std::unique_ptr<Remote> fresh, reopen_());
  if (!fresh->writable()) return Status(Code::kBusy, "re-opened region without the write lease");
  MF_RETURN_IF_ERROR(mount_->Attach(*fresh));
  remote_ = std::move(fresh);  // the old one is closed; the mount no longer uses it
  return Status::Ok();
}

// ---- Seeder -----------------------------------------------------------------------------

Result<std::unique_ptr<Seeder>> Seeder::Start(SourceWriter& writer, UniqueFd channel, SeederOptions options) {
  std::unique_ptr<Seeder> s(new Seeder(writer, std::move(channel), std::move(options)));
  writer.StartTracking();
  const RegionInfo& info = writer.region();
  MF_RETURN_IF_ERROR(s->channel_.Send(
      wire::MakeHello({info.size, writer.chunk_size(), info.generation, info.name}), s->options_.io_timeout));
  return s;
}

SeederProgress Seeder::progress() const {
  return {writer_.tracked_count(), ready_bytes_.load(), local_bytes_.load(), finalizing_.load()};
}

Status Seeder::Abort(Status why, bool suspended, bool released) {
  spdlog::warn("migration of '{}' aborted: {}", writer_.region().name, why.ToString());
  if (!released) (void)channel_.Send(wire::MakeAbort(why), options_.io_timeout);
  channel_.Shutdown();
  if (released) {
    // The destination may still be opening or holding the lease: retry while it is busy.
    const auto deadline = Clock::now() + options_.retake_timeout;
    Status retaken;
    for (;;) {
      retaken = writer_.RetakeLease();
      if (retaken.ok() || retaken.code() != Code::kBusy || Clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (!retaken.ok()) {
      // Never resume without the lease: if the destination holds it, it is the writer now.
      return Status(retaken.code() == Code::kBusy ? Code::kBusy : retaken.code(),
                    "migration aborted (" + why.ToString() +
                        ") but the write lease could not be re-taken; the source stays suspended: " +
                        retaken.ToString());
    }
  }
  if (suspended && options_.resume) options_.resume();
  return why.WithContext("migration aborted, source resumed");
}

Result<MigrationStats> Seeder::Finalize() {
  finalizing_.store(true);
  MigrationStats stats;
  // 1. Pre-copy: the destination says when it holds the whole region (and how far it got
  // meanwhile).
  const auto ready_deadline = Clock::now() + options_.ready_timeout;
  auto ready = channel_.Receive(options_.ready_timeout);
  bool reported = false;  // the destination sent PROGRESS
  while (ready.ok() && ready->type == wire::Type::kProgress) {
    reported = true;
    local_bytes_.store(ready->progress_bytes);
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(ready_deadline - Clock::now());
    if (left.count() <= 0) {  // a stream of PROGRESS does not stretch the deadline
      ready = Status(Code::kTimeout, "");
      break;
    }
    ready = channel_.Receive(left);
  }
  if (!ready.ok() && ready.status().code() == Code::kTimeout && reported) {
    ready = Status(Code::kTimeout, "no READY within " + std::to_string(options_.ready_timeout.count()) +
                                       " ms; the destination reported progress up to " +
                                       std::to_string(local_bytes_.load()) + " bytes");
  }
  if (!ready.ok())
    return Abort(ready.status().WithContext("waiting for the destination's pre-copy"), false, false);
  if (ready->type == wire::Type::kAbort)
    return Abort(ready->abort.WithContext("destination aborted"), false, false);
  if (ready->type != wire::Type::kReady)
    return Abort(ProtocolError("expected READY, got " + std::string(wire::TypeName(ready->type))), false,
                 false);
  ready_bytes_.store(ready->ready_bytes);
  local_bytes_.store(writer_.region().size);
  stats.precopy_bytes = ready->ready_bytes;
  stats.precopy_ns = NanosSince(start_);

  // 2. Downtime starts: stop the writer.
  const auto down = Clock::now();
  if (options_.suspend) {
    Status suspended = options_.suspend();
    if (!suspended.ok()) return Abort(suspended.WithContext("suspend hook"), true, false);
  }
  stats.suspend_ns = NanosSince(down);

  // 3. The server gets the latest bytes.
  auto t = Clock::now();
  Status synced = writer_.Sync();
  if (!synced.ok()) return Abort(synced.WithContext("pushing the dirty chunks"), true, false);
  stats.push_ns = NanosSince(t);

  // 4. Dirty set, 5. lease released, announced.
  t = Clock::now();
  const std::vector<uint64_t> dirty = writer_.TrackedChunks();
  const RegionInfo& info = writer_.region();
  const uint64_t chunk_size = writer_.chunk_size();
  const uint64_t chunk_count = (info.size + chunk_size - 1) / chunk_size;
  wire::DirtySet set = wire::DirtySet::FromChunks(chunk_size, chunk_count, dirty);
  if (set.ranges.size() > wire::kMaxRanges) set = wire::DirtySet{chunk_size, chunk_count, {{0, chunk_count}}};
  stats.dirty_chunks = set.chunks();
  for (const auto& r : set.ranges) {
    const uint64_t end = std::min(info.size, (r.first + r.count) * chunk_size);
    stats.dirty_bytes += end - r.first * chunk_size;
  }
  Status sent = channel_.Send(wire::MakeDirtySet(std::move(set)), options_.io_timeout);
  if (!sent.ok()) return Abort(sent.WithContext("sending the dirty set"), true, false);
  Status released = writer_.ReleaseLease();
  if (!released.ok()) return Abort(released.WithContext("releasing the write lease"), true, false);
  sent = channel_.Send(wire::MakeLeaseReleased(), options_.io_timeout);
  if (!sent.ok()) return Abort(sent.WithContext("announcing the lease release"), true, true);
  stats.handover_ns = NanosSince(t);

  // 6. The destination holds the lease and is writable.
  auto done = channel_.Receive(options_.done_timeout);
  if (!done.ok())
    return Abort(done.status().WithContext("waiting for the destination to take over"), true, true);
  if (done->type == wire::Type::kAbort)
    return Abort(done->abort.WithContext("destination aborted"), true, true);
  if (done->type != wire::Type::kDone)
    return Abort(ProtocolError("expected DONE, got " + std::string(wire::TypeName(done->type))), true, true);
  stats.downtime_ns = NanosSince(down);
  stats.lease_ns = done->done.lease_ns;
  stats.repull_ns = done->done.repull_ns;
  stats.repull_bytes = done->done.repull_bytes;
  spdlog::info("migration of '{}' done: downtime {:.3f} ms ({} dirty chunks, {} bytes)", info.name,
               static_cast<double>(stats.downtime_ns) / 1e6, stats.dirty_chunks, stats.dirty_bytes);
  return stats;
}

// ---- Leecher ----------------------------------------------------------------------------

Result<std::unique_ptr<Leecher>> Leecher::Start(std::unique_ptr<Remote> read_only, UniqueFd channel,
                                                LeecherOptions options) {
  if (read_only == nullptr) return InvalidArgument("Leecher needs a Remote");
  std::unique_ptr<Leecher> l(new Leecher(std::move(read_only), std::move(channel), std::move(options)));
  MF_ASSIGN_OR_RETURN(wire::Message hello, l->channel_.Receive(l->options_.hello_timeout));
  if (hello.type == wire::Type::kAbort) return l->Fail(hello.abort.WithContext("source aborted"), false);
  if (hello.type != wire::Type::kHello) {
    return l->Fail(ProtocolError("expected HELLO, got " + std::string(wire::TypeName(hello.type))), true);
  }
  const RegionInfo& info = l->read_only_->info();
  if (hello.hello.name != info.name || hello.hello.size != info.size ||
      (hello.hello.generation != 0 && info.generation != 0 && hello.hello.generation != info.generation)) {
    return l->Fail(InvalidArgument("the source migrates region '" + hello.hello.name + "' of " +
                                   std::to_string(hello.hello.size) + " bytes; this side opened '" +
                                   info.name + "' of " + std::to_string(info.size)),
                   true);
  }
  l->hello_ = std::move(hello.hello);
  MountOptions mo = l->options_.mount;
  mo.read_only = false;  // read-only follows from the Remote until the lease comes
  mo.background_pull = true;
  MF_ASSIGN_OR_RETURN(l->mount_, Mount::Create(*l->read_only_, std::move(mo)));
  return l;
}

Leecher::~Leecher() {
  if (mount_) (void)mount_->Close();
}

Result<Leecher::Takeover> Leecher::TakeOver() {
  if (writable_ == nullptr || mount_ == nullptr)
    return InvalidArgument("no completed migration to take over");
  Takeover t{std::move(writable_), std::move(mount_)};
  return t;
}

void Leecher::Kill() {
  channel_.Shutdown();
  if (mount_) (void)mount_->Close();
  if (writable_) (void)writable_->Close();
  (void)read_only_->Close();
}

Status Leecher::Fail(Status why, bool tell_source) {
  spdlog::warn("migration of '{}' (destination) aborted: {}", read_only_->info().name, why.ToString());
  if (tell_source) (void)channel_.Send(wire::MakeAbort(why), options_.io_timeout);
  channel_.Shutdown();
  return why;
}

Result<std::unique_ptr<Remote>> Leecher::OpenWritable() {
  if (!options_.open_writable) return Unsupported("no way to open the region writable");
  const auto deadline = Clock::now() + options_.lease_timeout;
  for (;;) {
    auto opened = options_.open_writable();
    if (opened.ok() && !(*opened)->writable()) return Status(Code::kBusy, "opened without the write lease");
    if (opened.ok() || opened.status().code() != Code::kBusy || Clock::now() >= deadline) return opened;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

Status Leecher::Run() {
  // Pre-copy (with PROGRESS now and then), then READY.
  const auto precopy_deadline = Clock::now() + options_.precopy_timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(precopy_deadline - Clock::now());
    const auto step = std::clamp(left, std::chrono::milliseconds(0), options_.progress_interval);
    Status local = mount_->WaitAllLocal(step);
    if (local.ok()) break;
    if (local.code() != Code::kTimeout || Clock::now() >= precopy_deadline)
      return Fail(local.WithContext("pre-copy"), true);
    Status sent = channel_.Send(wire::MakeProgress(mount_->stats().bytes_local), options_.io_timeout);
    if (!sent.ok()) return Fail(sent.WithContext("sending pre-copy progress"), false);
  }
  Status ready = channel_.Send(wire::MakeReady(mount_->stats().bytes_pulled), options_.io_timeout);
  if (!ready.ok()) return Fail(ready.WithContext("sending READY"), false);

  auto dirty = channel_.Receive(options_.finalize_timeout);
  if (!dirty.ok()) return Fail(dirty.status().WithContext("waiting for the dirty set"), false);
  if (dirty->type == wire::Type::kAbort) return Fail(dirty->abort.WithContext("source aborted"), false);
  if (dirty->type != wire::Type::kDirtySet)
    return Fail(ProtocolError("expected DIRTY_SET, got " + std::string(wire::TypeName(dirty->type))), true);
  const wire::DirtySet& set = dirty->dirty;
  if (set.chunk_size != hello_.chunk_size ||
      set.chunk_count != (hello_.size + set.chunk_size - 1) / set.chunk_size)
    return Fail(ProtocolError("DIRTY_SET does not match the region's chunking"), true);
  stats_.dirty_chunks = set.chunks();
  // The source's chunks, as this mount's chunks (the chunk sizes may differ).
  std::vector<uint64_t> stale;
  const uint64_t mine = mount_->chunk_size();
  for (const auto& r : set.ranges) {
    const uint64_t begin = r.first * set.chunk_size;
    const uint64_t end = std::min(hello_.size, (r.first + r.count) * set.chunk_size);
    for (uint64_t c = begin / mine; c * mine < end; ++c) {
      if (stale.empty() || stale.back() < c) stale.push_back(c);
    }
  }

  auto released = channel_.Receive(options_.io_timeout);
  if (!released.ok()) return Fail(released.status().WithContext("waiting for the lease release"), false);
  if (released->type == wire::Type::kAbort) return Fail(released->abort.WithContext("source aborted"), false);
  if (released->type != wire::Type::kLeaseReleased)
    return Fail(ProtocolError("expected LEASE_RELEASED, got " + std::string(wire::TypeName(released->type))),
                true);

  // The lease: from here on the source waits for DONE or ABORT.
  auto t = Clock::now();
  Status detached = mount_->Detach();
  if (!detached.ok()) return Fail(detached, true);
  auto writable = OpenWritable();
  if (!writable.ok()) {
    (void)mount_->Attach(*read_only_);
    return Fail(writable.status().WithContext("taking the write lease"), true);
  }
  writable_ = std::move(writable).value();
  stats_.lease_ns = NanosSince(t);

  // Re-pull what the source wrote since pre-copy began.
  t = Clock::now();
  const uint64_t pulled_before = mount_->stats().bytes_pulled;
  Status repulled = mount_->Attach(*writable_, stale);
  for (size_t i = 0; repulled.ok() && i < stale.size(); ++i) {
    const uint64_t off = stale[i] * mine;
    repulled = mount_->EnsureLocal(off, std::min<uint64_t>(mine, hello_.size - off));
  }
  if (!repulled.ok()) {
    // Give the lease back so that the source can go on; the server has the latest bytes.
    (void)mount_->Detach();
    (void)writable_->Close();
    (void)mount_->Attach(*read_only_);
    writable_.reset();
    return Fail(repulled.WithContext("re-pulling the dirty chunks"), true);
  }
  stats_.repull_ns = NanosSince(t);
  stats_.repull_bytes = mount_->stats().bytes_pulled - pulled_before;
  Status sent = channel_.Send(wire::MakeDone({stats_.lease_ns, stats_.repull_ns, stats_.repull_bytes}),
                              options_.io_timeout);
  (void)read_only_->Close();  // after DONE: its round trip is not part of the downtime
  // This side holds the lease: it is the writer now even if the source missed DONE (the
  // source cannot re-take the lease and stays suspended).
  if (!sent.ok()) spdlog::warn("migration: DONE not delivered: {}", sent.ToString());
  channel_.Shutdown();
  return Status::Ok();
}

}  // namespace mf::fabric
