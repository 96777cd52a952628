// uffd::Mapping — a remote region as a range of this process's address space.
//
// The range is reserved with mmap and registered with userfaultfd. First touch of a page
// faults; a handler thread pulls the containing chunk over the Remote into a staging
// Buffer and installs it with UFFDIO_COPY (concurrent faults on one chunk wait for one
// pull). A prefetch thread pulls ahead in sequential or caller-given order, in runs of
// consecutive chunks up to kPrefetchRun bytes; faults use their own staging slots, so they
// never wait behind prefetch.
//
// Writes are tracked per chunk with userfaultfd write-protect: asynchronous WP plus
// PAGEMAP_SCAN where the kernel has them (>= 6.7), synchronous WP faults otherwise. Sync()
// pushes dirty chunks and re-protects them; a dirty chunk that is not local (pages
// dropped, or a pull given back) is pulled first, so Sync reads only present pages; an
// optional interval syncs in the background; Close() stops that first, then syncs a last
// time. A read-only Remote gives a PROT_READ mapping.
//
// Failure: a chunk that cannot be pulled (server gone past the transport's timeout), or
// whose pulled bytes cannot be installed (UFFDIO_COPY fails, e.g. ENOMEM), delivers
// SIGBUS to the faulting thread (UFFDIO_POISON, or on older kernels an empty memfd mapped
// over the chunk by a thread of its own), never a hang. An install refused with EAGAIN
// (the kernel has an unread remove/unmap/remap event) is not a failure: the chunk goes
// back to remote and its waiters fault again. Sync() returns the error and keeps the
// dirty set; a pull that Sync needs and that fails is an error of the Sync (the chunk
// stays dirty), not a SIGBUS.
//
// Kernel events: MADV_DONTNEED/REMOVE drops the local copy of the pages (the next touch
// pulls them again; writes not yet synced there are discarded, as with any mapping).
// munmap of part of the range: chunks wholly inside the hole leave the dirty set and are
// never read or pushed again (their unsynced writes are discarded, as with the pages);
// a chunk partly unmapped keeps being tracked, and Sync() pushes only its pages that are
// still mapped; Close does not unmap the hole again. mremap is refused: the chunks moved
// are treated as unmapped, and at the new address a missing page gets SIGBUS while a
// page that moved stays readable and writable but untracked. Children do not inherit the
// range (MADV_DONTFORK).
//
// Latency: a fault costs one round trip on the Remote plus the thread hand-offs around it.
// The fault thread spins briefly (MappingOptions::poll_spin) after each fault or
// completion, and meanwhile takes the transport's completions itself, so that in a burst
// of faults neither it nor the transport's receive thread has to be woken.
//
// Thread-safety: data() may be used from any thread. Sync() and stats() are thread-safe.
// Close() and the destructor must not race with other calls. The Remote must outlive the
// Mapping.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "fabric/chunk_map.h"
#include "fabric/chunk_transfer.h"
#include "fabric/remote.h"
#include "fabric/thread_annotations.h"
#include "uffd/userfaultfd.h"

namespace mf::uffd {

constexpr size_t kMinChunkSize = 4u << 10;
constexpr size_t kMaxChunkSize = 2u << 20;
constexpr size_t kDefaultChunkSize = 64u << 10;
constexpr size_t kDefaultFaultDepth = 16;
constexpr size_t kDefaultPrefetchDepth = 8;
constexpr size_t kDefaultPushDepth = 16;
constexpr size_t kLockStripes = 64;
// A pull of a chunk larger than this moves in pieces of this size, and each piece is
// installed as soon as it arrives: installing one overlaps the transfer of the next, and
// a thread waiting on a page of an arrived piece runs on at once.
constexpr size_t kInstallPiece = 256u << 10;
static_assert(kInstallPiece % kPageSize == 0);
// Prefetch pulls chunks that follow each other in its order together, up to this many
// bytes per pull: with small chunks one request per chunk would cap prefetch at the
// transport's request rate.
constexpr size_t kPrefetchRun = 64u << 10;
static_assert(kPrefetchRun <= kInstallPiece);
// How long the fault thread keeps polling after a fault or a completion before it sleeps.
constexpr std::chrono::microseconds kDefaultPollSpin{50};
static_assert(IsPowerOfTwo(kMinChunkSize) && IsPowerOfTwo(kMaxChunkSize) && kMinChunkSize <= kMaxChunkSize);
static_assert(kMinChunkSize % kPageSize == 0);

enum class WriteTracking : uint8_t {
  kAuto,   // async if the kernel has it, else sync
  kAsync,  // UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN
  kSync,   // a WP fault on the first write to each chunk after a sync
  kOff,    // read-only mapping
};
std::string_view WriteTrackingName(WriteTracking t);

struct MappingOptions {
  size_t chunk_size = kDefaultChunkSize;  // power of two, 4 KiB .. 2 MiB
  bool prefetch = true;
  size_t prefetch_depth = kDefaultPrefetchDepth;  // prefetch pulls in flight
  size_t fault_depth = kDefaultFaultDepth;        // fault pulls in flight
  size_t push_depth = kDefaultPushDepth;          // pushes in flight during Sync
  // Chunk indices in the order to prefetch them; chunks not listed follow in sequence.
  // Empty: sequential.
  std::vector<uint64_t> prefetch_order;
  WriteTracking tracking = WriteTracking::kAuto;
  std::chrono::milliseconds sync_interval{0};  // 0: only on Sync() and Close()
  // After each fault or pull completion the fault thread polls the userfaultfd, and the
  // transport's completions on its own thread where it can (Remote::can_poll), for this
  // long before it sleeps. A fault that arrives meanwhile, and the reply to it, then cost
  // no thread wake-up. 0: always sleep (least CPU). Ignored on a machine with one CPU.
  std::chrono::microseconds poll_spin = kDefaultPollSpin;
};

struct MappingStats {
  uint64_t faults = 0;      // missing-page faults handled
  uint64_t wp_faults = 0;   // first-write faults (sync tracking)
  uint64_t pulls = 0;       // chunks pulled for a fault
  uint64_t prefetches = 0;  // chunks pulled by prefetch
  uint64_t bytes_pulled = 0;
  uint64_t pushes = 0;  // chunks pushed
  uint64_t bytes_pushed = 0;
  uint64_t failed_pulls = 0;
  // Sync's write-protects the kernel refused (EAGAIN) while an event waited unread, retried.
  uint64_t protect_retries = 0;
  uint64_t chunks = 0;
  uint64_t local_chunks = 0;
  uint64_t dirty_chunks = 0;
};

class Mapping {
 public:
  // Maps `remote` (which must outlive the Mapping). kInvalidArgument for a bad chunk
  // size, kUnsupported when userfaultfd (or write-protect, for a writable remote) is
  // missing.
  static Result<std::unique_ptr<Mapping>> Create(fabric::Remote& remote, const MappingOptions& options);
  ~Mapping();
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;

  std::byte* data() const { return base_; }
  size_t size() const { return size_; }
  size_t chunk_size() const { return chunk_size_; }
  WriteTracking tracking() const { return tracking_; }

  // Pushes every chunk written since the last sync, then flushes the Remote. On success
  // the server holds (durably) every write made before the call. A written chunk that is
  // not wholly local is pulled first (its present pages, which hold the writes, are kept).
  // On failure (a push, or such a pull, failed; or the Mapping is closing: kAborted) the
  // chunks not pushed stay dirty, and a later Sync() retries them. Never faults on a page
  // of a chunk that is not local, so a server gone is an error here, not a SIGBUS.
  Status Sync() MF_EXCLUDES(sync_mu_);
  // Blocks until the prefetch pass is over: every chunk is local except those the program
  // dropped (MADV_DONTNEED) or unmapped, which stay remote until touched. Returns kTimeout
  // when the timeout passes first, prefetch's error when it stopped on one, kUnavailable
  // when a chunk failed to pull, kInvalidArgument when prefetch is off and chunks are remote.
  Status WaitPrefetched(std::chrono::milliseconds timeout) MF_EXCLUDES(mu_);
  // Stops the periodic sync, syncs (when writable), stops the other threads, unregisters
  // and unmaps. Idempotent; returns the final sync's status.
  Status Close() MF_EXCLUDES(mu_, sync_mu_);
  MappingStats stats() const;

 private:
  class PullDone;
  class PushDone;
  // A chunk larger than the transport's max_transfer() (or, for pulls, kInstallPiece)
  // moves in several requests of `piece` bytes; the last one to complete finishes the slot.
  // A prefetch slot may carry a run of `count` consecutive chunks.
  struct Slot {
    uint64_t chunk = 0;
    uint32_t count = 1;
    bool prefetch = false;
    bool for_sync = false;  // a fault slot pulling a dirty chunk for Sync (PullForSync)
    size_t piece = 0;
    fabric::ChunkTransfer transfer;
    // How a pull's UFFDIO_COPY of its pieces failed: InstallError bits, and the errno of
    // the first real failure.
    std::atomic<uint8_t> install_errors{0};
    std::atomic<int> install_errno{0};
  };
  // Bits of Slot::install_errors.
  enum InstallError : uint8_t {
    kInstallRetry = 1,   // EAGAIN: an event was pending; the waiters fault again
    kInstallGone = 2,    // ENOENT/ESRCH: the range or the process is going away
    kInstallFailed = 4,  // anything else: the chunk fails (SIGBUS)
  };

  Mapping(fabric::Remote& remote, const MappingOptions& options);
  Status Init();
  // Bytes of the run of `count` chunks from `chunk` (the region's last chunk may be short).
  size_t RunLength(uint64_t chunk, uint32_t count) const;
  size_t ChunkLength(uint64_t chunk) const { return RunLength(chunk, 1); }
  std::byte* ChunkAddress(uint64_t chunk) const { return base_ + chunk * chunk_size_; }
  // A pull slot's staging bytes: fault slots hold one chunk, prefetch slots a run.
  std::byte* PullStaging(size_t slot) const;

  void FaultLoop();
  // The fault thread's poll or read of the userfaultfd failed for good: logs and aborts.
  [[noreturn]] void FaultThreadCannotGoOn(const std::string& why);
  // `thread`: the faulting thread's id (UFFD_FEATURE_THREAD_ID), 0 if unknown.
  void HandleMissing(uint64_t address, uint32_t thread) MF_EXCLUDES(mu_);
  // A fault on a failed chunk (or a page moved away) in a range FailLoop could not map
  // over: sends SIGBUS to `thread` itself and returns true; the thread's fault ends with
  // the signal. Only ever true without POISON.
  bool SignalIfUnfailable(uint64_t address, uint32_t thread) MF_EXCLUDES(fail_mu_);
  void HandleWriteProtect(uint64_t address) MF_EXCLUDES(mu_);
  void HandleRemove(uint64_t start, uint64_t end);
  void HandleUnmap(uint64_t start, uint64_t end) MF_EXCLUDES(mu_, fail_mu_);
  // Unmapped pages [start, end) covering the whole chunk took its unsynced writes with
  // them: it leaves the dirty set (nothing to push).
  void ForgetWritesIfWhollyIn(uint64_t chunk, uint64_t start, uint64_t end);
  void PrefetchLoop() MF_EXCLUDES(mu_);
  void SyncLoop() MF_EXCLUDES(mu_);
  // Pulls `count` consecutive chunks from `chunk` (claimed by the caller) into `slot`.
  // `for_sync`: a pull PullForSync waits for (one chunk, on a fault slot).
  void StartPull(uint64_t chunk, uint32_t count, size_t slot, bool prefetch, bool for_sync = false);
  void StartPush(uint64_t chunk, size_t slot);
  // Sync's chunks that hold a push slot and are protected, waiting to be copied into it.
  struct PendingCopy {
    uint64_t chunk;
    size_t slot;
  };
  // Copies them (in one call where it can), then pushes each; one unmapped meanwhile pushes
  // only its pages still mapped. Empties `copies`.
  void CopyAndPush(std::vector<PendingCopy>& copies) MF_EXCLUDES(mu_, push_mu_, events_mu_);
  // Returns once the events the fault thread has read are handled: the holes of every
  // munmap or mmap that returned before the call are then known.
  void WaitForReadEvents() MF_EXCLUDES(events_mu_);
  // After Sync copied [start, end): OK when it is still all the program's mapping of the
  // region, registered with us; ENOENT or EPERM when the program mapped something else over
  // part of it (maybe before the event of that is even queued); other errors as they come.
  Status StillRegistered(uint64_t start, uint64_t end);
  // Whether `chunk` was unmapped, whole or in part, by a munmap or mmap that has returned.
  bool UnmappedMeanwhile(uint64_t chunk) MF_EXCLUDES(events_mu_);
  // A chunk found unmapped (whole or in part) after it took push slot `slot`: gives the
  // slot back and pushes the chunk's pages still mapped on their own.
  void PushCutChunkInstead(size_t slot, uint64_t chunk) MF_EXCLUDES(mu_, push_mu_);
  // Ends the push in `slot` before it started: Sync returns `why`, the chunk stays dirty.
  void FailPush(size_t slot, const Status& why) MF_EXCLUDES(push_mu_);
  // PushCutChunk for Sync: its error becomes Sync's.
  void PushCutChunkForSync(uint64_t chunk) MF_EXCLUDES(mu_, push_mu_);
  // Submits the transfer of the slot's chunks from/to `staged` in requests of s.piece bytes.
  void SubmitChunk(fabric::IoKind kind, Slot& s, size_t slot, std::byte* staged, const fabric::Buffer& buffer,
                   fabric::IoCallback* done);
  // One piece of a pull arrived (cookie from SubmitChunk): installs it, and after the last
  // finishes the chunk.
  void OnPullDone(uint64_t cookie, const Status& status) MF_EXCLUDES(mu_);
  void OnPushDone(size_t slot, const Status& status) MF_EXCLUDES(push_mu_);
  // Makes later accesses to the chunk raise SIGBUS and wakes its waiters.
  void FailChunk(uint64_t chunk);
  // Makes later accesses to the pages of [addr, addr+len) not present raise SIGBUS and
  // wakes the waiters: UFFDIO_POISON, else queued for FailLoop (an mmap on the fault
  // thread would wait for its own unmap event). Any thread.
  void FailPages(std::byte* addr, size_t len) MF_EXCLUDES(fail_mu_);
  // Kernels without POISON: maps an empty memfd over each range FailPages queued, then
  // wakes its waiters. Its own thread: the mmap waits until the fault thread has read the
  // unmap event it raises.
  void FailLoop() MF_EXCLUDES(fail_mu_);
  // An unmap event for a range FailLoop mapped over (ours, not the program's): consumed.
  bool OwnUnmap(uint64_t start, uint64_t end) MF_EXCLUDES(fail_mu_);
  // UFFDIO_COPY of a pulled piece, only over the pages the program left mapped.
  Status Install(std::byte* dst, const std::byte* src, size_t len) MF_EXCLUDES(mu_);
  // The parts of [start, end) (addresses) the program has not unmapped, in order.
  std::vector<std::pair<uint64_t, uint64_t>> MappedSegments(uint64_t start, uint64_t end) const
      MF_EXCLUDES(mu_);
  // A fault at `page`, of a cut chunk, in a range the program unmapped: the chunk's install
  // skips it. Returns whether it was handled here (page in a hole).
  bool HandleFaultInHole(uint64_t chunk, uint64_t page, bool write_protect) MF_EXCLUDES(mu_);
  // Sync tracking: clears the chunk's dirty bit and write-protects `segments` of it;
  // retries while the kernel answers EAGAIN (an event pending, read by the fault thread).
  // On failure the chunk stays dirty.
  Status ProtectForPush(uint64_t chunk, const std::vector<std::pair<uint64_t, uint64_t>>& segments);
  // Called by Sync for a dirty chunk: waits for a pull in flight to end and, when the chunk
  // is then remote (some pages missing), claims it and pulls it on a fault slot (pages
  // present are kept), and waits for that. Ok when the chunk is local or failed (the
  // caller checks which); the pull's error, naming the chunk, when it failed (the chunk is
  // remote again, its waiters fault again); kAborted once the Mapping is stopping.
  Status PullForSync(uint64_t chunk) MF_EXCLUDES(mu_);
  // Sync, for a dirty chunk that is not local (its pages dropped, maybe not all, or a pull
  // failed): whether any page of it is left to hold writes (present, or swapped out). If
  // none is, it leaves the dirty set: the writes went with the pages.
  bool KeepIfPagesLeft(uint64_t chunk) MF_EXCLUDES(mu_);
  // Pushes, synchronously, the still-mapped pages of a chunk partly unmapped.
  Status PushCutChunk(uint64_t chunk) MF_EXCLUDES(mu_);
  // Asks the kernel which pages were written (and re-protects them): of the whole range,
  // skipping unmapped holes, or of [start, end).
  Status ScanWritten() MF_EXCLUDES(mu_);
  Status ScanWritten(uint64_t start, uint64_t end);
  void Notify();

  fabric::Remote& remote_;
  const MappingOptions options_;
  const size_t size_;
  const size_t chunk_size_;
  WriteTracking tracking_ = WriteTracking::kOff;
  fabric::ChunkMap chunks_;
  // Per chunk: some of its pages were unmapped by the program (munmap, mremap). Set by the
  // fault thread after the hole is in unmapped_; never cleared.
  std::unique_ptr<std::atomic<bool>[]> cut_chunks_;

  std::optional<Userfaultfd> uffd_;
  UniqueFd wake_fd_;     // eventfd: wakes the fault thread (pending faults, shutdown)
  UniqueFd pagemap_fd_;  // /proc/self/pagemap: PAGEMAP_SCAN, and KeepIfPagesLeft's reads
  // Kernels without UFFDIO_POISON: an empty memfd (size 0: every access raises SIGBUS) that
  // FailLoop maps over failed ranges. Set before the threads start, then only read.
  UniqueFd failed_chunk_fd_;
  MappedMemory memory_;
  std::byte* base_ = nullptr;
  fabric::Buffer pull_buffer_;  // fault_depth slots of chunk_size, prefetch_depth of run_chunks_
  uint32_t run_chunks_ = 1;     // chunks per prefetch pull at most (kPrefetchRun)
  fabric::Buffer push_buffer_;  // push_depth slots of chunk_size
  std::unique_ptr<PullDone> pull_done_;
  std::unique_ptr<PushDone> push_done_;
  std::unique_ptr<Slot[]> pull_slots_;
  std::unique_ptr<Slot[]> push_slots_;
  size_t pull_slot_count_ = 0;
  bool initialized_ = false;     // Init() completed: slots exist, threads run (Close syncs)
  Mutex stripes_[kLockStripes];  // serialize a chunk's WP transitions (sync tracking)
  // Held by the fault thread while it reads and handles a batch of userfaultfd events.
  // Sync takes it once on entry: a munmap that returned before (its event read) is then
  // handled too. Taken before mu_ and the stripes, never while holding them.
  Mutex events_mu_;
  Mutex fail_mu_;
  std::condition_variable_any fail_cv_;
  // Address ranges [start, end): queued for FailLoop, those it is mapping or has mapped
  // over whose unmap event is not handled yet (ours, not the program's), and those it
  // mapped over.
  std::deque<std::pair<uint64_t, uint64_t>> fail_queue_ MF_GUARDED_BY(fail_mu_);
  std::vector<std::pair<uint64_t, uint64_t>> own_unmaps_ MF_GUARDED_BY(fail_mu_);
  std::vector<std::pair<uint64_t, uint64_t>> replaced_ MF_GUARDED_BY(fail_mu_);
  // Ranges whose mmap failed (e.g. the process is at vm.max_map_count): their faults get
  // SIGBUS by tgkill instead (SignalIfUnfailable). Forgotten where the program unmaps.
  std::vector<std::pair<uint64_t, uint64_t>> unfailable_ MF_GUARDED_BY(fail_mu_);
  bool fail_exit_ MF_GUARDED_BY(fail_mu_) = false;

  mutable Mutex mu_;
  std::condition_variable_any cv_;
  std::vector<size_t> free_fault_slots_ MF_GUARDED_BY(mu_);
  std::vector<size_t> free_prefetch_slots_ MF_GUARDED_BY(mu_);
  std::deque<uint64_t> pending_faults_ MF_GUARDED_BY(mu_);  // chunks waiting for a slot
  std::vector<std::pair<uint64_t, uint64_t>> unmapped_ MF_GUARDED_BY(mu_);
  Status prefetch_error_ MF_GUARDED_BY(mu_);
  bool prefetch_pass_done_ MF_GUARDED_BY(mu_) = false;  // and its pulls have ended
  bool stopping_ MF_GUARDED_BY(mu_) = false;
  bool stop_sync_loop_ MF_GUARDED_BY(mu_) = false;  // set by Close before its own Sync
  // The end of PullForSync's pull (at most one: Syncs are serialized by sync_mu_).
  bool sync_pull_done_ MF_GUARDED_BY(mu_) = false;
  Status sync_pull_status_ MF_GUARDED_BY(mu_);
  bool closed_ MF_GUARDED_BY(mu_) = false;
  std::atomic<uint32_t> fault_pulls_{0};  // pulls for faults in flight (the fault thread spins)

  Mutex sync_mu_;  // one Sync at a time
  Mutex push_mu_;
  std::condition_variable_any push_cv_;
  std::vector<size_t> free_push_slots_ MF_GUARDED_BY(push_mu_);
  Status push_error_ MF_GUARDED_BY(push_mu_);

  struct Counters {
    std::atomic<uint64_t> faults{0}, wp_faults{0}, pulls{0}, prefetches{0}, bytes_pulled{0}, pushes{0},
        bytes_pushed{0}, failed_pulls{0}, protect_retries{0};
  } counters_;

  // Threads last: started after everything above exists, joined by Close().
  std::thread fault_thread_;
  std::thread prefetch_thread_;
  std::thread sync_thread_;
  std::thread fail_thread_;  // FailLoop, on kernels without UFFDIO_POISON
  // Set before fail_thread_ starts; read by FailPages on any thread while Close may be
  // joining fail_thread_ (whose own state is not for other threads to read).
  std::atomic<bool> fail_loop_running_{false};
};

}  // namespace mf::uffd
