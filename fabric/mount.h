// fabric::Mount — a managed mount: a local copy of a remote region that fills itself in
// the background and writes itself back.
//
// The local copy is anonymous memory, or a file when MountOptions::path is given (its old
// contents are overwritten by the pulls). A ChunkMap records each chunk's state. A pull
// thread fetches every chunk in priority order (hints first, then the caller's priority
// function, else sequentially), keeping `background_depth` pulls in flight. Read() or
// EnsureLocal() of a chunk that is not local yet submits its own pull at once from the
// calling thread ("jumps the queue") and waits only for the chunks it needs. A failed
// pull is retried up to `max_pull_attempts` times in all; after that the chunk is
// kFailed and every read of it returns the error, never hangs.
//
// Write() lands in the local copy and marks the chunk dirty; a partial write to a chunk
// that is not local first pulls it, a write covering the whole chunk does not. A push
// thread writes dirty chunks back every `push_interval`, and Sync() and Close() push
// everything (up to `push_depth` chunks in flight) and flush the Remote. A chunk written
// again while its push runs stays dirty. A push that fails leaves its chunk dirty and
// Sync() returns the error. A read-only mount (read_only, or a Remote without the write
// lease) refuses writes and pushes nothing.
//
// Data moves through staging Buffers of the Remote (registered memory for RDMA) and is
// copied to and from the local copy, so every transport works and the local copy may be a
// file. Pulls and pushes allocate nothing per chunk on the success path.
//
// Migration support (fabric/migration.h): write tracking records every chunk written since
// StartWriteTracking(), independently of the dirty bits that pushes clear. Detach() stops
// all I/O on the Remote (no pull or push in flight or started until Attach) so that the
// Remote can be closed, e.g. to release the write lease; Attach() moves the Mount onto
// another Remote of the same region (re-opened, or opened writable), optionally marking
// chunks stale so that they are pulled again from the new Remote. While detached, reads
// of local chunks and writes land locally; reads of other chunks wait for Attach().
//
// Thread-safety: Read, Write, EnsureLocal, MarkDirty, Prioritize, Sync, WaitAllLocal,
// stats, the write-tracking calls and the state queries may be called from any thread
// concurrently. Reads and writes of the same bytes at the same time race as they would on
// plain memory. Detach and Attach must not race with each other; Close() and the
// destructor must not race with other calls. The attached Remote must outlive the Mount
// (or its Detach).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "fabric/chunk_map.h"
#include "fabric/chunk_transfer.h"
#include "fabric/os.h"
#include "fabric/remote.h"
#include "fabric/thread_annotations.h"

namespace mf::fabric {

constexpr size_t kMountMinChunkSize = 4u << 10;
constexpr size_t kMountMaxChunkSize = 2u << 20;
constexpr size_t kMountDefaultChunkSize = 64u << 10;  // as uffd::Mapping
constexpr size_t kMountDefaultBackgroundDepth = 8;
constexpr size_t kMountDefaultDemandDepth = 8;
constexpr size_t kMountDefaultPushDepth = 16;
constexpr uint32_t kMountDefaultPullAttempts = 3;
// Background pulls and pushes in flight cover at least this many bytes: at 64 KiB chunks
// 256 of each, which keeps a link with a 20 ms round trip near 0.5 GB/s (bench/README.md).
constexpr size_t kMountDefaultInFlightBytes = 16u << 20;
constexpr size_t kMountLockStripes = 64;
static_assert(IsPowerOfTwo(kMountMinChunkSize) && IsPowerOfTwo(kMountMaxChunkSize));
static_assert(kMountMinChunkSize <= kMountDefaultChunkSize && kMountDefaultChunkSize <= kMountMaxChunkSize);
static_assert(kMountMinChunkSize % kPageSize == 0);
static_assert(kMountDefaultPullAttempts >= 1);

struct MountOptions {
  size_t chunk_size = kMountDefaultChunkSize;  // power of two, 4 KiB .. 2 MiB
  // A file to hold the local copy (created or truncated to the region's size); empty:
  // anonymous memory.
  std::string path;
  // Refuse writes and push nothing even when the Remote holds the write lease.
  bool read_only = false;
  // Pull every chunk in the background. Off: chunks are pulled only when read.
  bool background_pull = true;
  size_t background_depth = kMountDefaultBackgroundDepth;  // background pulls in flight
  size_t demand_depth = kMountDefaultDemandDepth;          // pulls for readers in flight
  size_t push_depth = kMountDefaultPushDepth;              // pushes in flight
  // Raises background_depth and push_depth to this many bytes' worth of chunks (never
  // beyond the region's chunk count). A deep pipe keeps a high-latency link busy; each
  // in-flight chunk costs a staging slot. 0: the depths alone.
  size_t in_flight_bytes = kMountDefaultInFlightBytes;
  uint32_t max_pull_attempts = kMountDefaultPullAttempts;  // per chunk, first try included
  // Byte offsets whose chunks the background pull fetches first, in this order.
  std::vector<uint64_t> priority_offsets;
  // Rank of the chunk starting at a byte offset: lower ranks are pulled first (ties in
  // offset order). Empty: sequential. Applies to the chunks not in priority_offsets.
  std::function<uint64_t(uint64_t offset)> priority;
  // Push dirty chunks this often in the background; 0: only on Sync() and Close().
  std::chrono::milliseconds push_interval{0};
};

struct MountStats {
  uint64_t size = 0;
  uint64_t chunk_size = 0;
  uint64_t chunks = 0;
  uint64_t local_chunks = 0;
  uint64_t dirty_chunks = 0;
  uint64_t failed_chunks = 0;  // pulls that failed for good
  uint64_t bytes_local = 0;
  uint64_t bytes_dirty = 0;
  uint64_t demand_pulls = 0;      // chunks pulled for a reader or writer
  uint64_t background_pulls = 0;  // chunks pulled by the background pull
  uint64_t pull_retries = 0;
  uint64_t bytes_pulled = 0;
  uint64_t pushes = 0;  // chunks pushed
  uint64_t failed_pushes = 0;
  uint64_t bytes_pushed = 0;
  // Bytes pulled per second from Create() to the last completed pull.
  double pull_bytes_per_second = 0;
  // Bytes pushed per second while pushes were running.
  double push_bytes_per_second = 0;
};

class Mount {
 public:
  // Starts a mount of `remote` (which must outlive it) and returns at once; the pulls run
  // in the background. kInvalidArgument for a bad chunk size or depth or an empty region;
  // an OS error when the local copy cannot be made.
  static Result<std::unique_ptr<Mount>> Create(Remote& remote, MountOptions options);
  ~Mount();
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;

  uint64_t size() const { return size_; }
  size_t chunk_size() const { return chunk_size_; }
  bool read_only() const { return read_only_.load(std::memory_order_acquire); }

  // Copies [offset, offset + out.size()) into out, pulling the chunks not local yet.
  // kOutOfRange outside the region; the pull's error for a chunk that cannot be pulled;
  // kAborted after Close().
  Status Read(uint64_t offset, std::span<std::byte> out);
  // Copies in to [offset, offset + in.size()) of the local copy and marks the chunks
  // dirty. kPermissionDenied on a read-only mount; the pull's error when a partly written
  // chunk cannot be pulled (nothing of that chunk is written then); kOutOfRange, kAborted.
  Status Write(uint64_t offset, std::span<const std::byte> in);
  // Blocks until every chunk of the range is local; errors as Read(). On success
  // data() + offset may be read directly for the length.
  Status EnsureLocal(uint64_t offset, uint64_t length);
  // The local copy. Bytes of a chunk are valid once it is local (EnsureLocal, IsLocal).
  // A caller writing through it must call MarkDirty afterwards, and must not race those
  // writes with Sync() (a view that tracks writes itself, like uffd::Mapping).
  std::byte* data() const { return base_; }
  // Marks the chunks of the range dirty (they must be local). kPermissionDenied on a
  // read-only mount.
  Status MarkDirty(uint64_t offset, uint64_t length);
  // Moves the chunks of the range to the front of the background pull (no-op without one).
  void Prioritize(uint64_t offset, uint64_t length) MF_EXCLUDES(mu_);

  // Whether the chunk holding `offset` is local / dirty; false past the end.
  bool IsLocal(uint64_t offset) const {
    return offset < size_ && chunks_.state(offset / chunk_size_) == ChunkState::kLocal;
  }
  bool IsDirty(uint64_t offset) const { return offset < size_ && chunks_.dirty(offset / chunk_size_); }

  // Pushes every dirty chunk and flushes the Remote. On success the server durably holds
  // every write made before the call. On failure the chunks not pushed stay dirty (a later
  // Sync retries them) and the first error is returned. OK at once on a read-only mount;
  // kAborted after Close().
  Status Sync() MF_EXCLUDES(sync_mu_, push_mu_);
  // Blocks until every chunk is local (OK), some chunk failed for good (its error), or the
  // timeout passed (kTimeout).
  Status WaitAllLocal(std::chrono::milliseconds timeout) MF_EXCLUDES(mu_);
  // Stops the background threads, waits for pulls in flight, syncs a last time (when
  // writable) and releases the local copy. Idempotent; returns the final sync's status.
  Status Close() MF_EXCLUDES(mu_, sync_mu_, push_mu_);
  MountStats stats() const;

  // --- Migration support ---------------------------------------------------------------
  // Forgets what was recorded and records, from now on, every chunk written (Write,
  // MarkDirty) until StopWriteTracking(). Chunks dirty at the call (written before it but
  // not on the server yet) count as written. Waits for a push round in progress.
  void StartWriteTracking() MF_EXCLUDES(sync_mu_);
  void StopWriteTracking() { tracking_.store(false, std::memory_order_release); }
  // The chunks written since StartWriteTracking(), ascending.
  std::vector<uint64_t> WrittenChunks() const;
  uint64_t written_count() const { return written_count_.load(std::memory_order_relaxed); }

  // Stops every transfer on the Remote: waits for a push round and the pulls in flight to
  // end; until Attach() no pull or push starts (Sync returns kUnavailable, readers of
  // chunks that are not local wait). Afterwards the Remote may be closed. kAborted after
  // Close(); OK when already detached.
  Status Detach() MF_EXCLUDES(mu_, sync_mu_, push_mu_);
  // Resumes transfers on `remote` (the same region, same size; may be the Remote it had).
  // Chunks in `stale` become remote again (local writes to them are dropped) and are
  // pulled anew (by the background pull, or by a reader). The mount becomes writable when
  // `remote` holds the write lease and the options do not say read_only, read-only
  // otherwise. kInvalidArgument when not detached or for a Remote of another size; an
  // error when buffers cannot be allocated (the mount stays detached then).
  Status Attach(Remote& remote, std::span<const uint64_t> stale = {}) MF_EXCLUDES(mu_, sync_mu_, push_mu_);
  bool detached() const { return detached_.load(std::memory_order_acquire); }

 private:
  class Done;
  // One chunk's transfer through a staging slot, in requests of at most max_transfer().
  struct Slot {
    uint64_t chunk = 0;
    bool demand = false;
    ChunkTransfer transfer;
  };
  using Clock = std::chrono::steady_clock;

  Mount(Remote& remote, MountOptions options);
  Status Init() MF_EXCLUDES(mu_, push_mu_);
  Status CheckOpen(uint64_t offset, uint64_t length) const;
  size_t ChunkLength(uint64_t chunk) const;
  std::byte* ChunkAddress(uint64_t chunk) const { return base_ + chunk * chunk_size_; }
  std::vector<uint64_t> BackgroundOrder() const;

  // Claims the chunk (kRemote -> kInFlight) and submits a demand pull when a demand slot
  // is free; false when someone else holds it or no slot is free.
  bool TryStartDemandPull(uint64_t chunk) MF_EXCLUDES(mu_);
  // Blocks until the chunk is local (OK) or failed for good (its error).
  Status WaitLocal(uint64_t chunk) MF_EXCLUDES(mu_);
  // Writes a whole chunk that is not local without pulling it. False when the chunk could
  // not be claimed (someone is pulling it).
  bool TryWriteWholeChunk(uint64_t chunk, const std::byte* in) MF_EXCLUDES(mu_);
  void WriteLocal(uint64_t chunk, size_t at, std::span<const std::byte> in);

  void PullLoop() MF_EXCLUDES(mu_);
  void PushLoop() MF_EXCLUDES(mu_);
  void SubmitChunk(IoKind kind, Slot& s, size_t slot, std::byte* staged, const Buffer& buffer,
                   IoCallback* done);
  void OnPullDone(size_t slot, const Status& status) MF_EXCLUDES(mu_);
  void OnPushDone(size_t slot, const Status& status) MF_EXCLUDES(push_mu_);
  // Pushes every dirty chunk and waits for the pushes; the first error or OK.
  Status PushDirty() MF_REQUIRES(sync_mu_) MF_EXCLUDES(push_mu_);

  Remote& remote() const { return *remote_.load(std::memory_order_acquire); }
  void MarkWritten(uint64_t chunk);

  std::atomic<Remote*> remote_;  // changed only while detached
  const MountOptions options_;
  const uint64_t size_;
  const size_t chunk_size_;
  std::atomic<bool> read_only_;  // changed only while detached
  const Clock::time_point start_ = Clock::now();
  ChunkMap chunks_;
  std::unique_ptr<std::atomic<uint32_t>[]> attempts_;  // pull attempts per chunk
  std::unique_ptr<std::atomic<bool>[]> written_;       // write tracking, per chunk
  std::atomic<uint64_t> written_count_{0};
  std::atomic<bool> tracking_{false};
  std::atomic<bool> detached_{false};

  UniqueFd file_;  // the local copy's file, when options_.path is set
  MappedMemory memory_;
  std::byte* base_ = nullptr;
  Buffer pull_buffer_;  // demand_depth + background_depth slots of chunk_size
  Buffer push_buffer_;  // push_depth slots of chunk_size
  std::unique_ptr<Done> pull_done_;
  std::unique_ptr<Done> push_done_;
  std::unique_ptr<Slot[]> pull_slots_;
  std::unique_ptr<Slot[]> push_slots_;
  size_t pull_slot_count_ = 0;
  // Serialize a chunk's writes with the copy of it a push takes.
  Mutex stripes_[kMountLockStripes];

  mutable Mutex mu_;
  std::condition_variable_any cv_;  // chunk states, free pull slots, retries, stopping_
  std::vector<size_t> free_demand_slots_ MF_GUARDED_BY(mu_);
  std::vector<size_t> free_background_slots_ MF_GUARDED_BY(mu_);
  std::deque<uint64_t> urgent_ MF_GUARDED_BY(mu_);  // retries and Prioritize(), first
  Status pull_error_ MF_GUARDED_BY(mu_);            // the last pull that failed for good
  bool stopping_ MF_GUARDED_BY(mu_) = false;
  bool closed_ MF_GUARDED_BY(mu_) = false;
  std::atomic<bool> open_{true};

  Mutex sync_mu_;  // one push round at a time
  Mutex push_mu_;
  std::condition_variable_any push_cv_;
  std::vector<size_t> free_push_slots_ MF_GUARDED_BY(push_mu_);
  Status push_error_ MF_GUARDED_BY(push_mu_);

  struct Counters {
    std::atomic<uint64_t> demand_pulls{0}, background_pulls{0}, pull_retries{0}, failed_chunks{0},
        bytes_pulled{0}, pushes{0}, failed_pushes{0}, bytes_pushed{0};
    std::atomic<int64_t> last_pull_ns{0};  // since start_
    std::atomic<int64_t> push_busy_ns{0};
  } counters_;

  // Threads last: started after everything above exists, joined by Close().
  std::thread pull_thread_;
  std::thread push_thread_;
};

}  // namespace mf::fabric
