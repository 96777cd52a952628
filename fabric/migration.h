// fabric Migration — moves a region's ownership (its write lease) from one host to another
// with a short, measured downtime. docs/migration.md has the protocol and its invariants.
//
// The source runs a Seeder next to its workload. The workload writes through a
// SourceWriter (MountSource adapts a Mount) that records the chunks written since pre-copy
// began and can release and re-take the region's write lease. The destination runs a
// Leecher: it opens the region read-only and pulls all of it in the background through a
// read-only Mount while the source keeps running. Seeder::Finalize then:
//   1. waits until the destination reports its pre-copy complete (kReady);
//   2. suspends the workload (the caller's hook);
//   3. pushes the source's dirty chunks and flushes (the server holds the latest bytes);
//   4. sends the set of chunks written since pre-copy began (kDirtySet);
//   5. releases the write lease (closes the writable Remote) and says so (kLeaseReleased);
//   6. the destination takes the lease (opens writable), re-pulls only those chunks and
//      becomes writable (kDone). It may later be the source of the next migration.
// Any failure before the destination holds the lease aborts: the source re-takes the
// lease and the caller's resume hook runs; nothing is lost, the source's local copy is the
// latest. The lease is released before the destination asks for it, and the server grants
// it to one handle only, so no step ever has two writers.
//
// The two sides talk over a connected stream socket (a TCP connection in real use, a
// socketpair in tests) in small length-prefixed messages (namespace migration_wire below).
// AuthenticateChannel runs a mutual challenge-response over it first, when both sides
// hold a shared secret. The channel is not encrypted.
//
// Thread-safety: Seeder and Leecher are driven by one thread each (their "owning" thread);
// progress() may be called from any thread. SourceWriter implementations say their own.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "fabric/auth.h"
#include "fabric/mount.h"
#include "fabric/os.h"
#include "fabric/remote.h"
#include "fabric/status.h"

namespace mf::fabric {

// ---- The hand-over channel's messages ---------------------------------------------------
namespace migration_wire {

// Every message: a header of kHeaderSize bytes, then `length` bytes of payload.
//   u8 type · u8 version (kVersion) · u16 reserved (0) · u32 payload length (<= kMaxPayload)
// All integers little-endian. Payloads, by type:
//   kHello         u64 region size · u64 chunk size · u64 generation · u16 n · n bytes name
//   kReady         u64 bytes pulled by the destination
//   kDirtySet      u64 chunk size · u64 chunk count · u32 n · n × (u64 first · u64 count)
//                  ranges ascending, disjoint, non-empty, inside [0, chunk count)
//   kLeaseReleased (empty)
//   kDone          u64 lease ns · u64 re-pull ns · u64 bytes re-pulled
//   kAbort         u8 code · u16 n · n bytes message
//   kChallenge     32 bytes nonce       (AuthenticateChannel, before kHello)
//   kProof         32 bytes HMAC-SHA256 proof
//   kProgress      u64 bytes local at the destination (during pre-copy, every second)
constexpr uint8_t kVersion = 1;
constexpr size_t kHeaderSize = 8;
constexpr size_t kMaxPayload = 16u << 20;
constexpr size_t kMaxName = 1024;
constexpr size_t kMaxAbortMessage = 1024;
constexpr size_t kDirtySetFixed = 20;  // before the ranges
constexpr size_t kRangeSize = 16;
constexpr size_t kMaxRanges = (kMaxPayload - kDirtySetFixed) / kRangeSize;
constexpr size_t kAuthSize = 32;  // a nonce or a proof
static_assert(kAuthSize == kNonceSize && kAuthSize == kProofSize);
static_assert(kMaxName + 26 <= kMaxPayload && kMaxAbortMessage + 3 <= kMaxPayload);

enum class Type : uint8_t {
  kHello = 1,
  kReady = 2,
  kDirtySet = 3,
  kLeaseReleased = 4,
  kDone = 5,
  kAbort = 6,
  kChallenge = 7,
  kProof = 8,
  kProgress = 9,
};
std::string_view TypeName(Type type);

struct ChunkRange {
  uint64_t first = 0;
  uint64_t count = 0;
  bool operator==(const ChunkRange&) const = default;
};

struct Hello {
  uint64_t size = 0;
  uint64_t chunk_size = 0;
  uint64_t generation = 0;
  std::string name;
  bool operator==(const Hello&) const = default;
};

struct DirtySet {
  uint64_t chunk_size = 0;
  uint64_t chunk_count = 0;
  std::vector<ChunkRange> ranges;
  bool operator==(const DirtySet&) const = default;
  // The ranges of an ascending list of chunk indices.
  static DirtySet FromChunks(uint64_t chunk_size, uint64_t chunk_count, std::span<const uint64_t> chunks);
  uint64_t chunks() const;  // how many chunks the ranges cover
};

struct Done {
  uint64_t lease_ns = 0;
  uint64_t repull_ns = 0;
  uint64_t repull_bytes = 0;
  bool operator==(const Done&) const = default;
};

// One decoded message; only the member of its type is meaningful.
struct Message {
  Type type = Type::kAbort;
  Hello hello;
  uint64_t ready_bytes = 0;
  DirtySet dirty;
  Done done;
  Status abort;                           // kAbort: never OK
  std::array<uint8_t, kAuthSize> auth{};  // kChallenge: the nonce; kProof: the proof
  uint64_t progress_bytes = 0;            // kProgress
};

// The header's payload length, after checking type, version and bounds. kProtocolError
// for anything else; kOutOfRange when fewer than kHeaderSize bytes are given.
Result<uint32_t> DecodeHeader(std::span<const std::byte> header, Type* type);
// Decodes a payload of the given type, exactly (trailing bytes are an error).
Result<Message> DecodePayload(Type type, std::span<const std::byte> payload);
// Decodes one whole message at the start of `in` (header and payload); *used gets its
// length. kOutOfRange when `in` ends early, kProtocolError when it is malformed.
Result<Message> Decode(std::span<const std::byte> in, size_t* used);
// Header and payload. The caller keeps the bounds (name, message, range count).
std::vector<std::byte> Encode(const Message& message);

Message MakeHello(Hello hello);
Message MakeReady(uint64_t bytes);
Message MakeDirtySet(DirtySet dirty);
Message MakeLeaseReleased();
Message MakeDone(Done done);
Message MakeAbort(const Status& why);
Message MakeChallenge(const Nonce& nonce);
Message MakeProof(const Proof& proof);
Message MakeProgress(uint64_t bytes_local);

}  // namespace migration_wire

// A connected stream socket carrying migration_wire messages; owns the fd. One sender and
// one receiver thread at most.
class MigrationChannel final {
 public:
  explicit MigrationChannel(UniqueFd fd) : fd_(std::move(fd)) {}  // takes ownership
  Status Send(const migration_wire::Message& message, std::chrono::milliseconds timeout);
  // kUnavailable when the peer closed, kTimeout, kProtocolError on a malformed message
  // (the channel is useless afterwards: close it).
  Result<migration_wire::Message> Receive(std::chrono::milliseconds timeout);
  // Shuts both directions down: the peer's reads see the end.
  void Shutdown();
  int fd() const { return fd_.get(); }
  // Hands the socket back (the channel is closed afterwards).
  UniqueFd Release() { return std::move(fd_); }

 private:
  UniqueFd fd_;
};

// Which end of the channel a side is: the source connects, the destination listens.
enum class MigrationSide : uint8_t { kSource, kDestination };

// Proves to each other that both ends hold `secret`, on a fresh channel before anything
// else (Seeder::Start, Leecher::Start) is sent. HMAC-SHA256 challenge-response of
// fabric/auth.h with the migration's own labels; the secret never crosses the wire, and the
// destination (the listening side) proves nothing before the source has:
//   source → CHALLENGE(source nonce)        destination → CHALLENGE(destination nonce)
//   source → PROOF(source's proof)          destination checks it → PROOF(its proof)
//   source checks it.
// A side that rejects the other's proof sends ABORT(kUnauthenticated) and returns
// kUnauthenticated; a side that receives ABORT returns it. kProtocolError when the peer
// sends something else (e.g. a peer run without a secret, which starts with HELLO).
// Returns the socket on success; it is closed on failure.
Result<UniqueFd> AuthenticateChannel(UniqueFd fd, const Secret& secret, MigrationSide side,
                                     std::chrono::milliseconds timeout);

// ---- Source side ------------------------------------------------------------------------

// What the Seeder needs of the writer running on the region.
class SourceWriter {
 public:
  virtual ~SourceWriter() = default;
  virtual const RegionInfo& region() const = 0;
  virtual uint64_t chunk_size() const = 0;
  // Forgets what was recorded; records every chunk written from now on.
  virtual void StartTracking() = 0;
  // The chunks written since StartTracking, ascending; and how many there are.
  virtual std::vector<uint64_t> TrackedChunks() const = 0;
  virtual uint64_t tracked_count() const = 0;
  // Pushes every write made so far and flushes: the server then holds the latest bytes.
  virtual Status Sync() = 0;
  // Stops all I/O and releases the write lease. OK only when nothing unpushed is left
  // (a failure leaves the lease held and the writer usable).
  virtual Status ReleaseLease() = 0;
  // Takes the write lease again and resumes I/O. kBusy while someone else holds it.
  virtual Status RetakeLease() = 0;
};

// Opens the region with the write lease (e.g. Client::Open(name, {.writable = true})).
using WritableOpener = std::function<Result<std::unique_ptr<Remote>>()>;

// A SourceWriter for a workload on a Mount: owns the writable Remote and the Mount on it.
// The workload uses mount(); after a completed migration the mount is detached (it can
// still be read, and Close()d); after an abort it is attached to a re-opened Remote.
// Thread-safety: as Mount for mount(); the SourceWriter calls come from the Seeder.
class MountSource final : public SourceWriter {
 public:
  // kInvalidArgument when `writable` lacks the write lease; Mount::Create's errors.
  static Result<std::unique_ptr<MountSource>> Create(std::unique_ptr<Remote> writable, MountOptions options,
                                                     WritableOpener reopen);
  // Takes over a writable Mount and the Remote under it (e.g. Leecher::TakeOver after a
  // migration, so that this host can be the source of the next one). kInvalidArgument
  // when the Mount is not writable or not attached to `writable`'s region.
  static Result<std::unique_ptr<MountSource>> Adopt(std::unique_ptr<Remote> writable,
                                                    std::unique_ptr<Mount> mount, WritableOpener reopen);
  ~MountSource() override;
  Mount& mount() { return *mount_; }

  const RegionInfo& region() const override { return info_; }
  uint64_t chunk_size() const override { return mount_->chunk_size(); }
  void StartTracking() override { mount_->StartWriteTracking(); }
  std::vector<uint64_t> TrackedChunks() const override { return mount_->WrittenChunks(); }
  uint64_t tracked_count() const override { return mount_->written_count(); }
  Status Sync() override { return mount_->Sync(); }
  Status ReleaseLease() override;
  Status RetakeLease() override;

 private:
  MountSource(std::unique_ptr<Remote> remote, WritableOpener reopen)
      : info_(remote->info()), remote_(std::move(remote)), reopen_(std::move(reopen)) {}
  RegionInfo info_;
  std::unique_ptr<Remote> remote_;  // null while the lease is released
  WritableOpener reopen_;
  std::unique_ptr<Mount> mount_;  // after remote_: destroyed first
};

// Downtime (suspend hook called → destination writable) and its parts, in nanoseconds.
struct MigrationStats {
  uint64_t precopy_ns = 0;  // Seeder created → destination ready
  uint64_t downtime_ns = 0;
  uint64_t suspend_ns = 0;   // the suspend hook
  uint64_t push_ns = 0;      // pushing the dirty chunks + flush
  uint64_t handover_ns = 0;  // dirty set sent, lease released, release announced
  uint64_t lease_ns = 0;     // destination: opening writable (measured there)
  uint64_t repull_ns = 0;    // destination: re-pulling the dirty set (measured there)
  uint64_t dirty_chunks = 0;
  uint64_t dirty_bytes = 0;
  uint64_t repull_bytes = 0;
  uint64_t precopy_bytes = 0;  // what the destination reported pulled at kReady
};

struct SeederOptions {
  // Stops the writer (stop the process, freeze the VM). An error aborts the migration
  // (resume runs).
  std::function<Status()> suspend;
  // Lets the writer go on after an abort.
  std::function<void()> resume;
  std::chrono::milliseconds io_timeout{10000};      // one message
  std::chrono::milliseconds ready_timeout{600000};  // the destination's pre-copy
  std::chrono::milliseconds done_timeout{60000};    // lease + re-pull at the destination
  std::chrono::milliseconds retake_timeout{5000};   // re-taking the lease after an abort
};

struct SeederProgress {
  uint64_t tracked_chunks = 0;  // chunks written since pre-copy began
  uint64_t destination_ready_bytes = 0;
  // What the destination last reported local (PROGRESS, READY). The channel is read by
  // Finalize only: before it runs, this stays 0.
  uint64_t destination_local_bytes = 0;
  bool finalizing = false;
};

class Seeder final {
 public:
  // Starts tracking writes and greets the destination. `writer` must outlive the Seeder.
  static Result<std::unique_ptr<Seeder>> Start(SourceWriter& writer, UniqueFd channel, SeederOptions options);
  // Runs the finalize (see the top of this header). OK with the stats when the destination
  // holds the lease and is writable; the source's writer is then detached and must not
  // be resumed. On any failure before that, the migration is aborted: the source holds
  // the lease again, resume ran, and the error says why. kBusy when the lease could not
  // be re-taken because the destination holds it (it is the writer now; the source stays
  // suspended). One call per Seeder.
  Result<MigrationStats> Finalize();
  SeederProgress progress() const;

 private:
  Seeder(SourceWriter& writer, UniqueFd channel, SeederOptions options)
      : writer_(writer), channel_(std::move(channel)), options_(std::move(options)) {}
  // Re-takes the lease when released, resumes when suspended; returns `why`.
  Status Abort(Status why, bool suspended, bool released);

  SourceWriter& writer_;
  MigrationChannel channel_;
  const SeederOptions options_;
  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  std::atomic<uint64_t> ready_bytes_{0};
  std::atomic<uint64_t> local_bytes_{0};
  std::atomic<bool> finalizing_{false};
};

// ---- Destination side -------------------------------------------------------------------

struct LeecherOptions {
  MountOptions mount;  // for the local copy; read_only is ignored (writable at the end)
  WritableOpener open_writable;
  std::chrono::milliseconds io_timeout{10000};
  std::chrono::milliseconds hello_timeout{10000};
  std::chrono::milliseconds precopy_timeout{600000};   // the background pull
  std::chrono::milliseconds finalize_timeout{600000};  // kReady → the dirty set
  std::chrono::milliseconds lease_timeout{5000};       // kBusy retries on open
  std::chrono::milliseconds progress_interval{1000};   // PROGRESS during pre-copy
};

struct LeecherStats {
  uint64_t lease_ns = 0;
  uint64_t repull_ns = 0;
  uint64_t dirty_chunks = 0;  // in the source's chunks
  uint64_t repull_bytes = 0;
};

class Leecher final {
 public:
  // Waits for the source's hello, checks it against `read_only` (same region), and starts
  // the pre-copy: a Mount pulling the whole region. `read_only` is kept until Run ends.
  static Result<std::unique_ptr<Leecher>> Start(std::unique_ptr<Remote> read_only, UniqueFd channel,
                                                LeecherOptions options);
  ~Leecher();
  // Runs the destination's side to the end. OK: this side holds the write lease and
  // mount() is writable. An error: the migration aborted; this side does not hold the
  // lease and told the source (when the channel still works); mount() is read-only.
  Status Run();
  Mount& mount() { return *mount_; }  // until TakeOver()
  // The writable Remote under mount() after a successful Run (null before).
  Remote* writable_remote() const { return writable_.get(); }
  // After a successful Run: hands the writable Remote and the Mount on it to the caller
  // (MountSource::Adopt makes them the source of the next migration). kInvalidArgument
  // before a successful Run or when already taken.
  struct Takeover {
    std::unique_ptr<Remote> remote;
    std::unique_ptr<Mount> mount;  // attached to remote
  };
  Result<Takeover> TakeOver();
  LeecherStats stats() const { return stats_; }
  // Closes the channel, the mount and the Remotes without finishing (what a dying process
  // does); the source sees a broken channel and aborts. Not concurrently with Run().
  void Kill();

 private:
  Leecher(std::unique_ptr<Remote> read_only, UniqueFd channel, LeecherOptions options)
      : read_only_(std::move(read_only)), channel_(std::move(channel)), options_(std::move(options)) {}
  Status Fail(Status why, bool tell_source);
  Result<std::unique_ptr<Remote>> OpenWritable();

  std::unique_ptr<Remote> read_only_;
  std::unique_ptr<Remote> writable_;
  MigrationChannel channel_;
  const LeecherOptions options_;
  migration_wire::Hello hello_;
  LeecherStats stats_;
  std::unique_ptr<Mount> mount_;  // last: destroyed before the Remotes under it
};

}  // namespace mf::fabric
