#include "uffd/mapping.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>

namespace mf::uffd {
namespace {

constexpr size_t kMessageBatch = 64;
constexpr size_t kScanRegions = 512;
// While a fault's pull is in flight the fault thread spins at least this long for its
// reply (a large chunk takes longer than poll_spin), but never longer: a slow server
// costs a sleeping thread, not a busy core.
constexpr std::chrono::microseconds kMaxSpinForReply{2000};
// Sync's write-protect of a chunk is refused with EAGAIN while an event waits unread in the
// userfaultfd; the fault thread reads it soon, so Sync retries this often, this far apart.
constexpr int kMaxProtectRetries = 1000;
constexpr std::chrono::microseconds kProtectRetryDelay{200};
// Sync's PAGEMAP_SCAN refused (EPERM) because the program mapped over part of the range is
// tried again this many times, kProtectRetryDelay apart, once the hole is known.
constexpr int kMaxScanRetries = 100;
// Sync's pull of a dirty chunk that is not local is started again when it ends without
// making the chunk local (pages dropped meanwhile, or an install given back), at most this
// many times.
constexpr int kMaxSyncPulls = 100;
// Sync copies dirty chunks into their push slots this many to a call at most.
constexpr size_t kCopyBatch = 16;
// The fault thread waits this long before it polls again after poll(2) ran out of memory
// (the only failure left to it): the faults keep waiting, they are not lost.
constexpr std::chrono::milliseconds kPollRetryDelay{1};
// /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
constexpr uint64_t kPagemapPresent = uint64_t{1} << 63;
constexpr uint64_t kPagemapSwapped = uint64_t{1} << 62;

// Runs `attempt`, a write-protect returning a Status, again while the kernel refuses it with
// EAGAIN (an event waits unread): at most kMaxProtectRetries more times, kProtectRetryDelay
// apart, each retry counted in `retries`. Returns the last attempt's status.
template <typename Attempt>
Status RetryProtectWhileEventUnread(std::atomic<uint64_t>& retries, Attempt attempt) {
  for (int tries = 0;; ++tries) {
    Status s = attempt();
    if (s.err() != EAGAIN || tries == kMaxProtectRetries) return s;
    retries.fetch_add(1, std::memory_order_relaxed);
    std::this_thread::sleep_for(kProtectRetryDelay);
  }
}

void* PageOf(uint64_t address) {
  return reinterpret_cast<void*>(address & ~uint64_t{kPageSize - 1});
}

// Copies `len` bytes at `from` in the mapped range to `to` for a push. Through the kernel
// (process_vm_readv on this process) rather than memcpy: a page the program drops or
// unmaps under the copy is faulted in as for any access, and one that cannot be (the server
// is gone, the range is unmapped) makes this return an error where a memcpy would raise
// SIGBUS or SIGSEGV in the syncing thread. Falls back to memcpy where the call is refused.
std::atomic<bool> g_copy_refused{false};

Status CopyFromMapping(std::byte* to, const std::byte* from, size_t len) {
  size_t done = 0;
  while (done < len && !g_copy_refused.load(std::memory_order_relaxed)) {
    iovec local{to + done, len - done};
    iovec remote{const_cast<std::byte*>(from + done), len - done};
    const ssize_t n = ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n < 0 && (errno == ENOSYS || errno == EPERM)) {
      spdlog::warn("uffd mapping: process_vm_readv refused ({}); syncs copy with memcpy",
                   std::strerror(errno));
      g_copy_refused.store(true, std::memory_order_relaxed);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      return Status::FromErrno(
          n < 0 ? errno : EFAULT,
          fmt::format("copy of {} bytes at {} to push", len - done, static_cast<const void*>(from + done)));
    }
  }
  if (done < len) std::memcpy(to + done, from + done, len - done);
  return Status::Ok();
}

// Several copies in one call (a call costs about as much as copying a few pages). Returns
// how many of them completed whole; the caller copies the rest one by one to find the one
// that fails.
size_t CopyManyFromMapping(std::span<const iovec> to, std::span<const iovec> from) {
  if (to.size() <= 1 || g_copy_refused.load(std::memory_order_relaxed)) return 0;
  ssize_t n = 0;
  do {
    n = ::process_vm_readv(::getpid(), to.data(), to.size(), from.data(), from.size(), 0);
  } while (n < 0 && errno == EINTR);
  size_t left = n > 0 ? static_cast<size_t>(n) : 0;
  size_t whole = 0;
  while (whole < to.size() && left >= to[whole].iov_len) left -= to[whole++].iov_len;
  return whole;
}

}  // namespace

std::string_view WriteTrackingName(WriteTracking t) {
  switch (t) {
    case WriteTracking::kAuto: return "auto";
    case WriteTracking::kAsync: return "async-wp";
    case WriteTracking::kSync: return "sync-wp";
    case WriteTracking::kOff: return "off";
  }
  return "?";
}

class Mapping::PullDone final : public fabric::IoCallback {
 public:
  explicit PullDone(Mapping* m) : m_(m) {}
  void OnIoComplete(uint64_t cookie, const Status& status) override { m_->OnPullDone(cookie, status); }

 private:
  Mapping* m_;
};

class Mapping::PushDone final : public fabric::IoCallback {
 public:
  explicit PushDone(Mapping* m) : m_(m) {}
  void OnIoComplete(uint64_t cookie, const Status& status) override {
    m_->OnPushDone(fabric::ChunkTransfer::SlotOf(cookie), status);
  }

 private:
  Mapping* m_;
};

Mapping::Mapping(fabric::Remote& remote, const MappingOptions& options)
    : remote_(remote),
      options_(options),
      size_(remote.size()),
      chunk_size_(options.chunk_size),
      chunks_((remote.size() + options.chunk_size - 1) / options.chunk_size),
      cut_chunks_(new std::atomic<bool>[chunks_.size()]) {
  for (uint64_t c = 0; c < chunks_.size(); ++c) cut_chunks_[c].store(false, std::memory_order_relaxed);
}

Result<std::unique_ptr<Mapping>> Mapping::Create(fabric::Remote& remote, const MappingOptions& options) {
  if (!IsPowerOfTwo(options.chunk_size) || options.chunk_size < kMinChunkSize ||
      options.chunk_size > kMaxChunkSize) {
    return InvalidArgument("chunk size " + std::to_string(options.chunk_size) +
                           " must be a power of two from 4 KiB to 2 MiB");
  }
  if (remote.size() == 0 || remote.size() % kPageSize != 0) {
    return InvalidArgument("region size must be a non-zero multiple of 4 KiB");
  }
  if (remote.max_transfer() < kPageSize) {
    return Unsupported("the transport moves at most " + std::to_string(remote.max_transfer()) +
                       " bytes a request; a mapping needs at least a page (4 KiB)");
  }
  if (options.fault_depth == 0 || options.push_depth == 0 ||
      (options.prefetch && options.prefetch_depth == 0)) {
    return InvalidArgument("fault, push and prefetch depths must be at least 1");
  }
  std::unique_ptr<Mapping> m(new Mapping(remote, options));
  MF_RETURN_IF_ERROR(m->Init());
  return m;
}

Status Mapping::Init() {
  const bool writable = remote_.writable();
  MF_ASSIGN_OR_RETURN(uint64_t available, Userfaultfd::AvailableFeatures());
  tracking_ = options_.tracking;
  if (!writable) {
    tracking_ = WriteTracking::kOff;
  } else if (tracking_ == WriteTracking::kOff) {
    return InvalidArgument("write tracking may only be off for a read-only remote");
  } else if (tracking_ == WriteTracking::kAuto) {
    tracking_ = (available & UFFD_FEATURE_WP_ASYNC) != 0 ? WriteTracking::kAsync : WriteTracking::kSync;
  }
  if (tracking_ == WriteTracking::kAsync && (available & UFFD_FEATURE_WP_ASYNC) == 0) {
    return Unsupported(
        "this kernel has no asynchronous userfaultfd write-protect (needs Linux 6.7+); use sync tracking");
  }
  if (tracking_ != WriteTracking::kOff && (available & UFFD_FEATURE_PAGEFAULT_FLAG_WP) == 0) {
    return Unsupported(
        "this kernel has no userfaultfd write-protect (needs Linux 5.7+); map the region read-only");
  }
  // Without POISON, failing a chunk maps over it, which raises an unmap event of our own:
  // FailLoop does that on a thread of its own, and HandleUnmap knows its ranges.
  // THREAD_ID: a fault FailLoop cannot map over gets SIGBUS sent to its thread.
  uint64_t wanted = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_UNMAP |
                    UFFD_FEATURE_POISON | UFFD_FEATURE_THREAD_ID;
  if (tracking_ != WriteTracking::kOff) wanted |= UFFD_FEATURE_PAGEFAULT_FLAG_WP;
  if (tracking_ == WriteTracking::kAsync) wanted |= UFFD_FEATURE_WP_ASYNC;
  MF_ASSIGN_OR_RETURN(Userfaultfd uffd, Userfaultfd::Open(wanted));
  uffd_.emplace(std::move(uffd));

  if (tracking_ != WriteTracking::kOff) {
    pagemap_fd_.Reset(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    // Async tracking scans it; sync tracking only asks it which dropped chunks have pages
    // left (KeepIfPagesLeft), and without it pushes them all.
    if (!pagemap_fd_ && tracking_ == WriteTracking::kAsync) {
      return Status::FromErrno(errno, "open /proc/self/pagemap");
    }
    if (!pagemap_fd_)
      spdlog::info("uffd mapping: no /proc/self/pagemap ({}); dropped chunks are synced whole",
                   std::strerror(errno));
  }
  wake_fd_.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_fd_) return Status::FromErrno(errno, "eventfd");
  if (!uffd_->has(UFFD_FEATURE_POISON)) {
    // Made now, not when a chunk fails: a program out of file descriptors then would have
    // its faulting thread wait for a memfd_create that keeps failing.
    failed_chunk_fd_.Reset(::memfd_create("memfabric-failed-chunk", MFD_CLOEXEC));
    if (!failed_chunk_fd_) {
      return Status::FromErrno(
          errno, "memfd_create (without UFFDIO_POISON a failed chunk is mapped from an empty memfd)");
    }
  }

  const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  void* addr = ::mmap(nullptr, size_, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (addr == MAP_FAILED)
    return Status::FromErrno(errno, "mmap " + std::to_string(size_) + " bytes for the mapping");
  memory_ = MappedMemory(addr, size_);
  base_ = memory_.data();
  // Children must not inherit a range whose faults only this process can serve; huge
  // pages would defeat per-chunk installs.
  (void)::madvise(base_, size_, MADV_DONTFORK);
  (void)::madvise(base_, size_, MADV_NOHUGEPAGE);
  uint64_t modes = UFFDIO_REGISTER_MODE_MISSING;
  if (tracking_ != WriteTracking::kOff) modes |= UFFDIO_REGISTER_MODE_WP;
  MF_RETURN_IF_ERROR(uffd_->Register(base_, size_, modes));

  const size_t prefetch_slots = options_.prefetch ? options_.prefetch_depth : 0;
  const size_t pull_slots = options_.fault_depth + prefetch_slots;
  run_chunks_ = static_cast<uint32_t>(std::max<size_t>(1, kPrefetchRun / chunk_size_));
  MF_ASSIGN_OR_RETURN(pull_buffer_, remote_.AllocateBuffer(
                                        (options_.fault_depth + prefetch_slots * run_chunks_) * chunk_size_));
  pull_slots_ = std::make_unique<Slot[]>(pull_slots);
  pull_slot_count_ = pull_slots;
  pull_done_ = std::make_unique<PullDone>(this);
  push_done_ = std::make_unique<PushDone>(this);
  {
    MutexLock lock(mu_);
    for (size_t i = 0; i < options_.fault_depth; ++i) free_fault_slots_.push_back(i);
    for (size_t i = options_.fault_depth; i < pull_slots; ++i) free_prefetch_slots_.push_back(i);
  }
  if (writable) {
    MF_ASSIGN_OR_RETURN(push_buffer_, remote_.AllocateBuffer(options_.push_depth * chunk_size_));
    push_slots_ = std::make_unique<Slot[]>(options_.push_depth);
    MutexLock lock(push_mu_);
    for (size_t i = 0; i < options_.push_depth; ++i) free_push_slots_.push_back(i);
  }
  initialized_ = true;

  fault_thread_ = std::thread([this] { FaultLoop(); });
  if (!uffd_->has(UFFD_FEATURE_POISON)) {
    fail_loop_running_.store(true, std::memory_order_release);
    fail_thread_ = std::thread([this] { FailLoop(); });
  }
  if (options_.prefetch) prefetch_thread_ = std::thread([this] { PrefetchLoop(); });
  if (writable && options_.sync_interval.count() > 0) sync_thread_ = std::thread([this] { SyncLoop(); });
  spdlog::debug("uffd mapping of '{}': {} bytes at {}, chunk {}, tracking {}, prefetch {}",
                remote_.info().name, size_, static_cast<void*>(base_), chunk_size_,
                WriteTrackingName(tracking_), options_.prefetch);
  return Status::Ok();
}

Mapping::~Mapping() {
  (void)Close();
}

size_t Mapping::RunLength(uint64_t chunk, uint32_t count) const {
  const uint64_t offset = chunk * chunk_size_;
  return static_cast<size_t>(std::min<uint64_t>(uint64_t{count} * chunk_size_, size_ - offset));
}

std::byte* Mapping::PullStaging(size_t slot) const {
  const size_t faults = options_.fault_depth;
  const size_t chunks = slot < faults ? slot : faults + (slot - faults) * run_chunks_;
  return pull_buffer_.data() + chunks * chunk_size_;
}

void Mapping::Notify() {
  uint64_t one = 1;
  (void)!::write(wake_fd_.get(), &one, sizeof(one));
}

void Mapping::FaultThreadCannotGoOn(const std::string& why) {
  // Returning would leave every thread that touches the range, and Close, waiting forever.
  spdlog::critical(
      "uffd mapping of '{}': the fault thread cannot go on ({}); faults on the range can no "
      "longer be served; aborting",
      remote_.info().name, why);
  spdlog::default_logger()->flush();  // not shutdown(): other threads may be logging
  std::abort();
}

void Mapping::FaultLoop() {
  uffd_msg messages[kMessageBatch];
  pollfd fds[2] = {{uffd_->fd(), POLLIN, 0}, {wake_fd_.get(), POLLIN, 0}};
  using Clock = std::chrono::steady_clock;
  const bool spin = options_.poll_spin.count() > 0 && CanSpin();
  // While spinning, this thread takes the transport's completions (its own thread sleeps).
  const bool poll_remote = spin && remote_.can_poll();
  struct CallerPolling {
    fabric::Remote& remote;
    bool on = false;
    void Set(bool want) {
      if (want != on) remote.SetCallerPolling(want);
      on = want;
    }
    ~CallerPolling() { Set(false); }
  } caller_polling{remote_};
  Clock::time_point last_activity{};
  bool poll_out_of_memory = false;  // warned once per stretch of failures
  for (;;) {
    const auto now = Clock::now();
    const bool waiting = fault_pulls_.load(std::memory_order_relaxed) > 0;
    const bool spinning = spin && now - last_activity < (waiting ? std::max<std::chrono::microseconds>(
                                                                       options_.poll_spin, kMaxSpinForReply)
                                                                 : options_.poll_spin);
    if (poll_remote) {
      caller_polling.Set(spinning);
      if (spinning && remote_.Poll() > 0) last_activity = Clock::now();
    }
    const int ready = ::poll(fds, 2, spinning ? 0 : -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      if (errno == ENOMEM) {
        // Stopping here would leave every faulting thread waiting forever.
        if (!poll_out_of_memory) spdlog::warn("uffd mapping: poll: out of memory; polling again");
        poll_out_of_memory = true;
        std::this_thread::sleep_for(kPollRetryDelay);
        continue;
      }
      const int err = errno;
      // EINVAL: more descriptors than RLIMIT_NOFILE (the program lowered it below 2).
      FaultThreadCannotGoOn(std::string("poll: ") + std::strerror(err) +
                            (err == EINVAL ? " (RLIMIT_NOFILE is below the 2 descriptors it waits on)" : ""));
    }
    poll_out_of_memory = false;
    if (ready == 0) continue;  // spinning, nothing new
    if (((fds[0].revents | fds[1].revents) & POLLNVAL) != 0) {
      FaultThreadCannotGoOn("the program closed the userfaultfd or the Mapping's eventfd");
    }
    if (spin) last_activity = Clock::now();
    if ((fds[1].revents & POLLIN) != 0) {
      uint64_t count = 0;
      (void)!::read(wake_fd_.get(), &count, sizeof(count));
    }
    // Faults that waited for a slot go first.
    for (;;) {
      uint64_t chunk = 0;
      size_t slot = 0;
      {
        MutexLock lock(mu_);
        if (stopping_) return;
        if (pending_faults_.empty() || free_fault_slots_.empty()) break;
        chunk = pending_faults_.front();
        pending_faults_.pop_front();
        slot = free_fault_slots_.back();
        free_fault_slots_.pop_back();
      }
      StartPull(chunk, 1, slot, false);
    }
    if ((fds[0].revents & (POLLIN | POLLERR)) == 0) continue;
    // Held from the read to the end of the handling (see events_mu_).
    MutexLock events_lock(events_mu_);
    auto n = uffd_->ReadMessages(messages);
    if (!n.ok()) FaultThreadCannotGoOn(n.status().ToString());
    for (size_t i = 0; i < *n; ++i) {
      const uffd_msg& msg = messages[i];
      switch (msg.event) {
        case UFFD_EVENT_PAGEFAULT:
          if ((msg.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0) {
            HandleWriteProtect(msg.arg.pagefault.address);
          } else {
            HandleMissing(msg.arg.pagefault.address, msg.arg.pagefault.feat.ptid);
          }
          break;
        case UFFD_EVENT_REMOVE: HandleRemove(msg.arg.remove.start, msg.arg.remove.end); break;
        case UFFD_EVENT_UNMAP: HandleUnmap(msg.arg.remove.start, msg.arg.remove.end); break;
        case UFFD_EVENT_REMAP:
          spdlog::error(
              "uffd mapping of '{}' was moved with mremap, which is not supported; accesses at the new "
              "address will get SIGBUS",
              remote_.info().name);
          HandleUnmap(msg.arg.remap.from, msg.arg.remap.from + msg.arg.remap.len);
          break;
        default: break;
      }
    }
  }
}

void Mapping::HandleMissing(uint64_t address, uint32_t thread) {
  counters_.faults.fetch_add(1, std::memory_order_relaxed);
  const auto base = reinterpret_cast<uint64_t>(base_);
  if (address < base || address >= base + size_) {
    // A fault on a range moved away by mremap: it cannot be served.
    if (!SignalIfUnfailable(address, thread)) FailPages(static_cast<std::byte*>(PageOf(address)), kPageSize);
    return;
  }
  const uint64_t chunk = (address - base) / chunk_size_;
  if (HandleFaultInHole(chunk, reinterpret_cast<uint64_t>(PageOf(address)), false)) return;
  switch (chunks_.state(chunk)) {
    case fabric::ChunkState::kRemote: {
      if (!chunks_.TryClaim(chunk)) return;  // prefetch claimed it: its install wakes us
      size_t slot = 0;
      {
        MutexLock lock(mu_);
        if (free_fault_slots_.empty()) {
          pending_faults_.push_back(chunk);
          return;
        }
        slot = free_fault_slots_.back();
        free_fault_slots_.pop_back();
      }
      StartPull(chunk, 1, slot, false);
      return;
    }
    case fabric::ChunkState::kInFlight:
    case fabric::ChunkState::kInFlightDropped: return;  // the pull's end wakes every waiter
    case fabric::ChunkState::kLocal: {
      // Either the chunk was installed between the fault and now (wake the waiter), or
      // its pages went away under a pull that was still in flight (pull it again).
      void* page = PageOf(address);
      unsigned char resident = 0;
      if (::mincore(page, kPageSize, &resident) == 0 && (resident & 1) == 0) {
        chunks_.Drop(chunk);
        HandleMissing(address, thread);
        return;
      }
      (void)uffd_->Wake(ChunkAddress(chunk), ChunkLength(chunk));
      return;
    }
    case fabric::ChunkState::kFailed:
      if (!SignalIfUnfailable(address, thread)) FailChunk(chunk);
      return;
  }
}

void Mapping::HandleWriteProtect(uint64_t address) {
  counters_.wp_faults.fetch_add(1, std::memory_order_relaxed);
  const auto base = reinterpret_cast<uint64_t>(base_);
  void* page = PageOf(address);
  if (address < base || address >= base + size_) {
    // A write at the address mremap moved part of the range to: its pages are no longer
    // tracked; let the write through.
    if (!uffd_->WriteProtect(page, kPageSize, false).ok()) (void)uffd_->Wake(page, kPageSize);
    return;
  }
  const uint64_t chunk = (address - base) / chunk_size_;
  if (HandleFaultInHole(chunk, reinterpret_cast<uint64_t>(page), true)) return;
  MutexLock lock(stripes_[chunk % kLockStripes]);
  chunks_.SetDirty(chunk, true);
  Status s;
  if (!cut_chunks_[chunk].load(std::memory_order_acquire)) {
    s = uffd_->WriteProtect(ChunkAddress(chunk), ChunkLength(chunk), false);
  } else {
    const auto start = reinterpret_cast<uint64_t>(ChunkAddress(chunk));
    for (const auto& [from, to] : MappedSegments(start, start + ChunkLength(chunk))) {
      s = uffd_->WriteProtect(reinterpret_cast<void*>(from), to - from, false);
      if (!s.ok()) break;
    }
  }
  if (!s.ok()) {
    // EAGAIN: an event waits unread; ENOENT: part of the chunk was unmapped and the event
    // is not read yet. The chunk is dirty either way; the woken write faults again and is
    // served once the event is handled.
    spdlog::debug("uffd mapping: unprotect chunk {}: {}; the write retries", chunk, s.ToString());
    (void)uffd_->Wake(page, kPageSize);
  }
}

void Mapping::HandleRemove(uint64_t start, uint64_t end) {
  const auto base = reinterpret_cast<uint64_t>(base_);
  start = std::max(start, base);
  end = std::min(end, base + size_);
  if (start >= end) return;
  for (uint64_t c = (start - base) / chunk_size_; c <= (end - 1 - base) / chunk_size_; ++c) {
    // The pages are gone: the next touch pulls them again. Pages of the chunk outside the
    // range stay, and the re-pull skips them (Sync pulls a dirty chunk so left too).
    // A written chunk stays dirty: MADV_FREE leaves its pages in place, and madvise returns
    // once this event is read, not handled, so a write in between may already be in a
    // page (unprotected since its chunk's first write, or seen and protected again by a
    // Sync's scan meanwhile). Sync skips a dirty chunk none of whose pages are left
    // (KeepIfPagesLeft).
    chunks_.Drop(c);
  }
}

void Mapping::ForgetWritesIfWhollyIn(uint64_t chunk, uint64_t start, uint64_t end) {
  const auto chunk_start = reinterpret_cast<uint64_t>(ChunkAddress(chunk));
  if (start <= chunk_start && chunk_start + ChunkLength(chunk) <= end) {
    MutexLock lock(stripes_[chunk % kLockStripes]);
    chunks_.SetDirty(chunk, false);
  }
}

void Mapping::HandleUnmap(uint64_t start, uint64_t end) {
  if (OwnUnmap(start, end)) return;  // FailLoop's memfd over a failed chunk
  {
    // Whatever is mapped there later is not a failed chunk's (mremap may move registered
    // memory onto it).
    MutexLock lock(fail_mu_);
    std::erase_if(unfailable_, [&](const auto& r) { return r.first < end && start < r.second; });
  }
  const auto base = reinterpret_cast<uint64_t>(base_);
  start = std::max(start, base);
  end = std::min(end, base + size_);
  if (start >= end) return;
  spdlog::warn("uffd mapping of '{}': [{:#x}, {:#x}) was unmapped by the program", remote_.info().name, start,
               end);
  {
    MutexLock lock(mu_);
    unmapped_.emplace_back(start, end);
  }
  for (uint64_t c = (start - base) / chunk_size_; c <= (end - 1 - base) / chunk_size_; ++c) {
    cut_chunks_[c].store(true, std::memory_order_release);
    ForgetWritesIfWhollyIn(c, start, end);  // and Sync never reads it again
  }
  // A thread that faulted in the range before it went away waits for its chunk's install,
  // which now skips the range: wake it, to fault on whatever is mapped there now (or get
  // SIGSEGV where nothing is). UFFDIO_WAKE needs no registered mapping.
  (void)uffd_->Wake(reinterpret_cast<void*>(start), end - start);
}

bool Mapping::HandleFaultInHole(uint64_t chunk, uint64_t page, bool write_protect) {
  if (!cut_chunks_[chunk].load(std::memory_order_acquire)) return false;
  if (!MappedSegments(page, page + kPageSize).empty()) return false;  // not in a hole
  // The fault came to this userfaultfd, yet the page is in a range the program unmapped
  // (a fault queued before the unmap would have been read and handled before its event).
  // The range is still registered with us: mremap with MREMAP_DONTUNMAP left it so, or
  // mremap moved part of the range onto it. It is the program's memory now, not the
  // region's: empty (zero) where nothing is present, written untracked. Both ioctls act
  // only where the range is still ours; otherwise the thread is woken to fault on
  // whatever is mapped there now.
  void* at = reinterpret_cast<void*>(page);
  const Status s = write_protect ? uffd_->WriteProtect(at, kPageSize, false) : uffd_->ZeroPage(at, kPageSize);
  if (!s.ok()) (void)uffd_->Wake(at, kPageSize);
  return true;
}

std::vector<std::pair<uint64_t, uint64_t>> Mapping::MappedSegments(uint64_t start, uint64_t end) const {
  std::vector<std::pair<uint64_t, uint64_t>> holes;
  {
    MutexLock lock(mu_);
    holes = unmapped_;
  }
  std::sort(holes.begin(), holes.end());
  std::vector<std::pair<uint64_t, uint64_t>> segments;
  uint64_t cursor = start;
  for (const auto& [from, to] : holes) {
    if (from >= end) break;
    if (to <= cursor) continue;
    if (from > cursor) segments.emplace_back(cursor, from);
    cursor = std::max(cursor, to);
  }
  if (cursor < end) segments.emplace_back(cursor, end);
  return segments;
}

void Mapping::PrefetchLoop() {
  std::vector<bool> listed;
  std::vector<uint64_t> order = options_.prefetch_order;
  listed.resize(chunks_.size());
  for (uint64_t c : order) {
    if (c < listed.size()) listed[c] = true;
  }
  order.erase(std::remove_if(order.begin(), order.end(), [&](uint64_t c) { return c >= listed.size(); }),
              order.end());
  for (uint64_t c = 0; c < chunks_.size(); ++c) {
    if (!listed[c]) order.push_back(c);
  }
  for (size_t next = 0; next < order.size();) {
    const uint64_t chunk = order[next++];
    if (chunks_.state(chunk) != fabric::ChunkState::kRemote) continue;
    if (cut_chunks_[chunk].load(std::memory_order_acquire)) {
      const auto start = reinterpret_cast<uint64_t>(ChunkAddress(chunk));
      if (MappedSegments(start, start + ChunkLength(chunk)).empty()) continue;  // unmapped
    }
    size_t slot = 0;
    {
      MutexLock lock(mu_);
      cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS {
        return stopping_ || !prefetch_error_.ok() || !free_prefetch_slots_.empty();
      });
      if (stopping_ || !prefetch_error_.ok()) return;
      slot = free_prefetch_slots_.back();
      free_prefetch_slots_.pop_back();
    }
    if (!chunks_.TryClaim(chunk)) {
      MutexLock lock(mu_);
      free_prefetch_slots_.push_back(slot);
      continue;
    }
    // The chunks that follow in the order and in the region join the pull while they are
    // still remote.
    uint32_t count = 1;
    while (count < run_chunks_ && next < order.size() && order[next] == chunk + count &&
           chunks_.TryClaim(order[next])) {
      ++count;
      ++next;
    }
    StartPull(chunk, count, slot, true);
  }
  // The pass is over once its last pulls are: WaitPrefetched then stops waiting for chunks
  // the program dropped or unmapped, which no pass brings back.
  MutexLock lock(mu_);
  cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS {
    return stopping_ || free_prefetch_slots_.size() == options_.prefetch_depth;
  });
  prefetch_pass_done_ = true;
  cv_.notify_all();
}

void Mapping::SubmitChunk(fabric::IoKind kind, Slot& s, size_t slot, std::byte* staged,
                          const fabric::Buffer& buffer, fabric::IoCallback* done) {
  s.transfer.Submit(remote_, kind, s.chunk * chunk_size_, {staged, RunLength(s.chunk, s.count)}, s.piece,
                    buffer, done, slot);
}

void Mapping::StartPull(uint64_t chunk, uint32_t count, size_t slot, bool prefetch, bool for_sync) {
  Slot& s = pull_slots_[slot];
  s.chunk = chunk;
  s.count = count;
  s.prefetch = prefetch;
  s.for_sync = for_sync;
  // Whole pages: each piece is installed on its own, at its offset.
  s.piece = std::min(remote_.max_transfer(), kInstallPiece) / kPageSize * kPageSize;
  s.install_errors.store(0, std::memory_order_relaxed);
  s.install_errno.store(0, std::memory_order_relaxed);
  if (!prefetch) fault_pulls_.fetch_add(1, std::memory_order_relaxed);
  SubmitChunk(fabric::IoKind::kRead, s, slot, PullStaging(slot), pull_buffer_, pull_done_.get());
}

void Mapping::StartPush(uint64_t chunk, size_t slot) {
  Slot& s = push_slots_[slot];
  s.chunk = chunk;
  s.piece = remote_.max_transfer();
  SubmitChunk(fabric::IoKind::kWrite, s, slot, push_buffer_.data() + slot * chunk_size_, push_buffer_,
              push_done_.get());
}

void Mapping::OnPullDone(uint64_t cookie, const Status& piece_status) {
  const size_t slot = fabric::ChunkTransfer::SlotOf(cookie);
  Slot& ps = pull_slots_[slot];
  const size_t len = RunLength(ps.chunk, ps.count);
  std::byte* addr = ChunkAddress(ps.chunk);
  if (piece_status.ok()) {
    // Install this piece now; the pieces of a chunk are disjoint, so their installs may
    // run at once on the transport's threads.
    const size_t at = fabric::ChunkTransfer::PieceOf(cookie) * ps.piece;
    Status copied = Install(addr + at, PullStaging(slot) + at, std::min(ps.piece, len - at));
    if (!copied.ok()) {
      const int err = copied.err();
      InstallError kind = kInstallFailed;
      if (err == EAGAIN) {
        kind = kInstallRetry;
      } else if (err == ENOENT || err == ESRCH) {
        kind = kInstallGone;
      } else {
        int none = 0;
        ps.install_errno.compare_exchange_strong(none, err == 0 ? EIO : err, std::memory_order_acq_rel);
      }
      ps.install_errors.fetch_or(kind, std::memory_order_acq_rel);
      spdlog::debug("uffd mapping: install chunk {}: {}", ps.chunk, copied.ToString());
    }
  }
  Status status;
  if (!ps.transfer.CompleteOne(piece_status, &status)) return;
  const uint8_t install_errors = ps.install_errors.load(std::memory_order_acquire);
  if (status.ok() && (install_errors & kInstallFailed) != 0) {
    // The bytes arrived but cannot be installed: the chunk fails as if the pull had.
    status = Status::FromErrno(ps.install_errno.load(std::memory_order_acquire), "UFFDIO_COPY");
  }
  if (status.ok()) {
    if (install_errors == 0) {
      (ps.prefetch ? counters_.prefetches : counters_.pulls).fetch_add(ps.count, std::memory_order_relaxed);
      counters_.bytes_pulled.fetch_add(len, std::memory_order_relaxed);
      for (uint64_t c = ps.chunk; c < ps.chunk + ps.count; ++c) {
        // Pages dropped while the pull ran: the chunk is remote again, and a thread that
        // faulted on them after the install is woken to fault (and pull) once more.
        if (!chunks_.FinishPull(c)) (void)uffd_->Wake(ChunkAddress(c), ChunkLength(c));
      }
    } else {
      // EAGAIN (an event was pending) or the range going away: give the chunks back and
      // wake their waiters, who fault again and get a fresh pull.
      for (uint64_t c = ps.chunk; c < ps.chunk + ps.count; ++c) chunks_.Set(c, fabric::ChunkState::kRemote);
      (void)uffd_->Wake(addr, len);
    }
  } else if (ps.prefetch) {
    // Give the chunks back; anyone who faulted on them meanwhile retries as a fault pull.
    for (uint64_t c = ps.chunk; c < ps.chunk + ps.count; ++c) chunks_.Set(c, fabric::ChunkState::kRemote);
    (void)uffd_->Wake(addr, len);
    MutexLock lock(mu_);
    if (prefetch_error_.ok() && !stopping_) {
      spdlog::warn("uffd mapping of '{}': prefetch stopped: {}", remote_.info().name, status.ToString());
      prefetch_error_ = status;
    }
  } else if (ps.for_sync) {
    // Sync reports it; the chunk stays dirty and remote, and a thread that faulted on it
    // meanwhile faults again and pulls it itself.
    counters_.failed_pulls.fetch_add(1, std::memory_order_relaxed);
    spdlog::warn("uffd mapping of '{}': cannot pull chunk {} to sync it: {}", remote_.info().name, ps.chunk,
                 status.ToString());
    chunks_.Set(ps.chunk, fabric::ChunkState::kRemote);
    (void)uffd_->Wake(addr, len);
  } else {
    counters_.failed_pulls.fetch_add(1, std::memory_order_relaxed);
    spdlog::error(
        "uffd mapping of '{}': cannot pull chunk {} (offset {}): {}; the faulting thread gets SIGBUS",
        remote_.info().name, ps.chunk, ps.chunk * chunk_size_, status.ToString());
    chunks_.Set(ps.chunk, fabric::ChunkState::kFailed);
    FailChunk(ps.chunk);
  }
  if (!ps.prefetch) fault_pulls_.fetch_sub(1, std::memory_order_relaxed);
  {
    MutexLock lock(mu_);
    bool wake_fault_thread = false;
    if (ps.prefetch) {
      free_prefetch_slots_.push_back(slot);
    } else {
      if (ps.for_sync) {
        sync_pull_done_ = true;
        sync_pull_status_ = status;
      }
      free_fault_slots_.push_back(slot);
      wake_fault_thread = !pending_faults_.empty();
    }
    // Inside the lock: once a slot is free, Close may return and free this Mapping.
    cv_.notify_all();
    if (wake_fault_thread) Notify();
  }
}

void Mapping::FailChunk(uint64_t chunk) {
  if (!cut_chunks_[chunk].load(std::memory_order_acquire))
    return FailPages(ChunkAddress(chunk), ChunkLength(chunk));
  // Partly unmapped or moved away: only its pages still mapped are ours. A poison over the
  // hole fails (ENOENT) every time, so the waiter would fault again forever, and FailLoop's
  // mmap would replace what the program mapped there.
  const auto start = reinterpret_cast<uint64_t>(ChunkAddress(chunk));
  for (const auto& [from, to] : MappedSegments(start, start + ChunkLength(chunk))) {
    FailPages(reinterpret_cast<std::byte*>(from), to - from);
  }
  // A waiter in the hole too (FailLoop, without POISON, wakes once it has mapped over).
  if (uffd_->has(UFFD_FEATURE_POISON)) (void)uffd_->Wake(ChunkAddress(chunk), ChunkLength(chunk));
}

void Mapping::FailPages(std::byte* addr, size_t len) {
  if (uffd_->has(UFFD_FEATURE_POISON)) {
    Status s = uffd_->Poison(addr, len);
    if (s.ok()) return;
    // EAGAIN: an event is pending; the woken thread faults again and this runs again.
    spdlog::debug("uffd mapping: poison {}: {}", static_cast<void*>(addr), s.ToString());
  }
  if (fail_loop_running_.load(std::memory_order_acquire)) {
    // Older kernels: FailLoop maps an empty file over the pages (every access SIGBUS),
    // then wakes the waiters.
    {
      MutexLock lock(fail_mu_);
      if (!fail_exit_) {
        fail_queue_.emplace_back(reinterpret_cast<uint64_t>(addr), reinterpret_cast<uint64_t>(addr) + len);
        fail_cv_.notify_one();
        return;
      }
    }
  }
  (void)uffd_->Wake(addr, len);
}

void Mapping::FailLoop() {
  for (;;) {
    std::pair<uint64_t, uint64_t> range;  // [start, end)
    {
      MutexLock lock(fail_mu_);
      fail_cv_.wait(fail_mu_,
                    [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return fail_exit_ || !fail_queue_.empty(); });
      if (fail_queue_.empty()) return;  // exiting, nothing left
      range = fail_queue_.front();
      fail_queue_.pop_front();
    }
    // A hole the program made since the range was queued is the program's (it may have
    // mapped memory of its own there): only the rest is mapped over, piece by piece.
    // HandleUnmap has woken the hole's waiters. Every unmap that has returned to the
    // program has had its event read; once those are handled, its hole is known.
    WaitForReadEvents();
    const std::vector<std::pair<uint64_t, uint64_t>> segments = MappedSegments(range.first, range.second);
    if (segments.size() != 1 || segments.front() != range) {
      MutexLock lock(fail_mu_);
      fail_queue_.insert(fail_queue_.begin(), segments.begin(), segments.end());
      continue;
    }
    auto* addr = reinterpret_cast<std::byte*>(range.first);
    const size_t len = range.second - range.first;
    bool done_before = false;
    {
      MutexLock lock(fail_mu_);
      // Queued again by a fault that came before the first try ended.
      done_before = std::find(replaced_.begin(), replaced_.end(), range) != replaced_.end() ||
                    std::find(unfailable_.begin(), unfailable_.end(), range) != unfailable_.end();
      // Before the mmap: its unmap event may be handled after the mmap has returned.
      if (!done_before) own_unmaps_.push_back(range);
    }
    if (!done_before) {
      // The mmap returns once the fault thread has read the unmap event it raises.
      const bool mapped = ::mmap(addr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
                                 failed_chunk_fd_.get(), 0) != MAP_FAILED;
      const int err = errno;
      // The unmap event the mmap raised, if any (none where nothing of the range was ours
      // any more), has been read: once it is handled, an entry still pending is stale.
      WaitForReadEvents();
      {
        MutexLock lock(fail_mu_);
        auto pending = std::find(own_unmaps_.begin(), own_unmaps_.end(), range);
        if (pending != own_unmaps_.end()) own_unmaps_.erase(pending);
        // Unmappable: woken below, the waiters fault again and SignalIfUnfailable sends
        // them SIGBUS.
        (mapped ? replaced_ : unfailable_).push_back(range);
      }
      if (!mapped) {  // outside fail_mu_: a stderr that blocks must not stall the fault thread
        spdlog::error(
            "uffd mapping: cannot map an empty file over {} bytes at {} to make their accesses raise "
            "SIGBUS: {}; threads that touch them are sent SIGBUS instead",
            len, static_cast<void*>(addr), std::strerror(err));
      }
    }
    (void)uffd_->Wake(addr, len);
  }
}

bool Mapping::SignalIfUnfailable(uint64_t address, uint32_t thread) {
  {
    MutexLock lock(fail_mu_);
    if (std::none_of(unfailable_.begin(), unfailable_.end(),
                     [address](const auto& r) { return address >= r.first && address < r.second; })) {
      return false;
    }
  }
  // Without the thread's id (kernels before 4.14) the thread is only woken, to fault again.
  if (thread == 0) return false;
  // The signal ends the thread's wait in the fault. Unlike a SIGBUS the kernel raises for
  // the access, it carries no address (si_code SI_TKILL) and waits while the thread blocks it.
  if (::tgkill(::getpid(), static_cast<pid_t>(thread), SIGBUS) != 0) {
    // ESRCH: not a thread of this process (a debugger's or /proc/PID/mem reader's access).
    spdlog::error(
        "uffd mapping: cannot send SIGBUS to thread {}, which touched an unservable page: {}; it "
        "keeps waiting",
        thread, std::strerror(errno));
  }
  return true;
}

bool Mapping::OwnUnmap(uint64_t start, uint64_t end) {
  MutexLock lock(fail_mu_);
  auto own = std::find(own_unmaps_.begin(), own_unmaps_.end(), std::pair<uint64_t, uint64_t>{start, end});
  if (own == own_unmaps_.end()) return false;
  own_unmaps_.erase(own);
  return true;
}

Status Mapping::Install(std::byte* dst, const std::byte* src, size_t len) {
  const bool protect = tracking_ != WriteTracking::kOff;
  const uint64_t first = static_cast<uint64_t>(dst - base_) / chunk_size_;
  const uint64_t last = static_cast<uint64_t>(dst + len - 1 - base_) / chunk_size_;
  bool cut = false;
  for (uint64_t c = first; c <= last && !cut; ++c) cut = cut_chunks_[c].load(std::memory_order_acquire);
  if (!cut) return uffd_->Copy(dst, src, len, protect);
  const auto start = reinterpret_cast<uint64_t>(dst);
  for (const auto& [from, to] : MappedSegments(start, start + len)) {
    MF_RETURN_IF_ERROR(uffd_->Copy(reinterpret_cast<void*>(from), src + (from - start), to - from, protect));
  }
  return Status::Ok();
}

void Mapping::OnPushDone(size_t slot, const Status& piece_status) {
  Status status;
  if (!push_slots_[slot].transfer.CompleteOne(piece_status, &status)) return;
  MutexLock lock(push_mu_);
  const uint64_t chunk = push_slots_[slot].chunk;
  if (status.ok()) {
    counters_.pushes.fetch_add(1, std::memory_order_relaxed);
    counters_.bytes_pushed.fetch_add(ChunkLength(chunk), std::memory_order_relaxed);
  } else {
    chunks_.SetDirty(chunk, true);  // keep it for the next Sync
    if (push_error_.ok()) push_error_ = status;
  }
  free_push_slots_.push_back(slot);
  push_cv_.notify_all();
}

Status Mapping::ScanWritten() {
  const auto base = reinterpret_cast<uint64_t>(base_);
  for (int attempt = 0;; ++attempt) {
    // Holes the program unmapped are skipped: whatever it maps there later is not ours, and
    // PM_SCAN_CHECK_WPASYNC would refuse the scan.
    Status s;
    for (const auto& [from, to] : MappedSegments(base, base + size_)) {
      s = ScanWritten(from, to);
      if (!s.ok()) break;
    }
    // EPERM: the program mapped something over the range since; the hole is known once
    // the fault thread has handled that event, which may not even be queued yet.
    if (s.err() != EPERM || attempt == kMaxScanRetries) return s;
    WaitForReadEvents();
    std::this_thread::sleep_for(kProtectRetryDelay);
  }
}

Status Mapping::ScanWritten(uint64_t start, uint64_t end) {
  pm_scan_arg arg{};
  page_region regions[kScanRegions];
  const auto base = reinterpret_cast<uint64_t>(base_);
  while (start < end) {
    arg = pm_scan_arg{};
    arg.size = sizeof(arg);
    arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    arg.start = start;
    arg.end = end;
    arg.vec = reinterpret_cast<uint64_t>(regions);
    arg.vec_len = kScanRegions;
    // Unpopulated pages carry no WP bit and so count as "written": only present or
    // swapped pages can hold writes.
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    arg.return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT;
    // A scan that fails part way (EPERM: the program mapped over part of the range) has
    // protected the pages it found again, and still copied their regions out before it
    // returned the error: those are marked as for a scan that succeeds.
    std::fill(std::begin(regions), std::end(regions), page_region{});
    int n = ::ioctl(pagemap_fd_.get(), PAGEMAP_SCAN, &arg);
    Status failed;
    if (n < 0) {
      if (errno == EINTR) continue;
      failed = Status::FromErrno(errno, "PAGEMAP_SCAN");
      n = static_cast<int>(std::count_if(std::begin(regions), std::end(regions),
                                         [](const page_region& r) { return r.end > r.start; }));
    }
    for (int i = 0; i < n; ++i) {
      const bool present = (regions[i].categories & PAGE_IS_PRESENT) != 0;
      for (uint64_t c = (regions[i].start - base) / chunk_size_;
           c <= (regions[i].end - 1 - base) / chunk_size_; ++c) {
        // A failed chunk's poisoned pages look swapped and written (a poison marker has no
        // WP bit): only its present pages, pieces that arrived and were written, count.
        if (!present && chunks_.state(c) == fabric::ChunkState::kFailed) continue;
        chunks_.SetDirty(c, true);
      }
    }
    MF_RETURN_IF_ERROR(failed);
    if (arg.walk_end <= start) break;
    start = arg.walk_end;
  }
  return Status::Ok();
}

Status Mapping::Sync() {
  if (tracking_ == WriteTracking::kOff) return Status::Ok();
  MutexLock sync_lock(sync_mu_);
  {
    // Once stopping, the fault thread may be gone: nothing would serve a page touched.
    MutexLock lock(mu_);
    if (stopping_)
      return Status(Code::kAborted, "sync of '" + remote_.info().name + "': the mapping is closed");
  }
  WaitForReadEvents();  // a hole made before this call is known
  if (tracking_ == WriteTracking::kAsync) MF_RETURN_IF_ERROR(ScanWritten());
  {
    MutexLock lock(push_mu_);
    push_error_ = Status::Ok();
  }
  std::vector<PendingCopy> copies;  // protected, with a push slot, not yet copied
  copies.reserve(kCopyBatch);
  for (uint64_t chunk = 0; chunk < chunks_.size(); ++chunk) {
    if (!chunks_.dirty(chunk)) continue;
    if (chunks_.state(chunk) != fabric::ChunkState::kLocal && !KeepIfPagesLeft(chunk)) continue;
    // A chunk still being pulled (written in pieces that arrived, or re-pulled after a
    // MADV_DONTNEED) is read only once its pull has ended: its last pieces may fail. One
    // with pages missing (dropped, or a pull given back) is pulled first: reading a missing
    // page would fault, and with the server gone raise SIGBUS here.
    Status pulled = PullForSync(chunk);
    if (!pulled.ok()) {
      MutexLock lock(push_mu_);
      if (push_error_.ok()) push_error_ = pulled;
      if (pulled.code() == Code::kAborted) break;
      continue;
    }
    if (cut_chunks_[chunk].load(std::memory_order_acquire)) {
      // Partly unmapped: its mapped pages are pushed on their own (a wholly unmapped chunk
      // left the dirty set when it went, and has none).
      PushCutChunkForSync(chunk);
      continue;
    }
    if (chunks_.state(chunk) == fabric::ChunkState::kFailed) {
      // Written in its pieces that arrived before the rest of its pull failed; the rest is
      // poisoned, so the chunk cannot be read back to push. It stays dirty.
      MutexLock lock(push_mu_);
      if (push_error_.ok()) {
        push_error_ = Status(Code::kUnavailable, "chunk " + std::to_string(chunk) +
                                                     " was written but could not be pulled whole; its "
                                                     "writes cannot be pushed");
      }
      continue;
    }
    bool no_free_slot = false;
    {
      MutexLock lock(push_mu_);
      no_free_slot = free_push_slots_.empty();
    }
    // The slots taken wait for their copy: make it before waiting for one to free.
    if (no_free_slot && !copies.empty()) CopyAndPush(copies);
    size_t slot = 0;
    {
      MutexLock lock(push_mu_);
      push_cv_.wait(push_mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return !free_push_slots_.empty(); });
      slot = free_push_slots_.back();
      free_push_slots_.pop_back();
    }
    push_slots_[slot].chunk = chunk;
    std::byte* addr = ChunkAddress(chunk);
    const size_t len = ChunkLength(chunk);
    if (tracking_ == WriteTracking::kSync) {
      const auto start = reinterpret_cast<uint64_t>(addr);
      if (Status s = ProtectForPush(chunk, {{start, start + len}}); !s.ok()) {
        // ENOENT: unmapped while Sync waited for the slot.
        if (UnmappedMeanwhile(chunk)) {
          PushCutChunkInstead(slot, chunk);
        } else {
          FailPush(slot, s);
        }
        continue;
      }
    } else {
      chunks_.SetDirty(chunk, false);  // ScanWritten protected it again
    }
    copies.push_back({chunk, slot});
    if (copies.size() == kCopyBatch) CopyAndPush(copies);
  }
  CopyAndPush(copies);
  Status result;
  {
    MutexLock lock(push_mu_);
    push_cv_.wait(push_mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS {
      return free_push_slots_.size() == options_.push_depth;
    });
    result = push_error_;
  }
  if (!result.ok()) return result.WithContext("sync of '" + remote_.info().name + "'");
  return remote_.Flush();
}

void Mapping::CopyAndPush(std::vector<PendingCopy>& copies) {
  iovec to[kCopyBatch];
  iovec from[kCopyBatch];
  for (size_t i = 0; i < copies.size(); ++i) {
    const auto [chunk, slot] = copies[i];
    to[i] = {push_buffer_.data() + slot * chunk_size_, ChunkLength(chunk)};
    from[i] = {ChunkAddress(chunk), ChunkLength(chunk)};
  }
  const size_t whole = CopyManyFromMapping({to, copies.size()}, {from, copies.size()});
  std::vector<Status> copied(copies.size());
  for (size_t i = whole; i < copies.size(); ++i) {
    copied[i] = CopyFromMapping(static_cast<std::byte*>(to[i].iov_base),
                                static_cast<const std::byte*>(from[i].iov_base), to[i].iov_len);
  }
  // A chunk the program unmapped (or mapped over) during the copy holds bytes that are not
  // the region's, or failed to copy.
  WaitForReadEvents();
  for (size_t i = 0; i < copies.size(); ++i) {
    const auto [chunk, slot] = copies[i];
    if (cut_chunks_[chunk].load(std::memory_order_acquire)) {
      PushCutChunkInstead(slot, chunk);
      continue;
    }
    if (!copied[i].ok()) {
      // Pages dropped under the copy that could not be pulled back (the server is gone).
      // The chunk stays dirty; the next Sync pulls it first.
      FailPush(slot, copied[i].WithContext("chunk " + std::to_string(chunk)));
      continue;
    }
    // mmap(MAP_FIXED) over part of the chunk during the copy: its event may not even be
    // queued yet, but the kernel sees the new mapping.
    const auto start = reinterpret_cast<uint64_t>(ChunkAddress(chunk));
    Status ours = StillRegistered(start, start + ChunkLength(chunk));
    bool cut = false;
    // The kernel queues the unmap event only after the new mapping is in place: wait a
    // little for the hole to be known.
    for (int attempt = 0; (ours.err() == ENOENT || ours.err() == EPERM) && attempt < kMaxScanRetries;
         ++attempt) {
      if ((cut = UnmappedMeanwhile(chunk))) break;
      std::this_thread::sleep_for(kProtectRetryDelay);
    }
    if (cut) {
      PushCutChunkInstead(slot, chunk);
      continue;
    }
    if (!ours.ok()) {
      FailPush(slot, ours.WithContext("chunk " + std::to_string(chunk) + " changed while Sync copied it"));
      continue;
    }
    StartPush(chunk, slot);
  }
  copies.clear();
}

Status Mapping::StillRegistered(uint64_t start, uint64_t end) {
  if (tracking_ == WriteTracking::kAsync) {
    // A scan that matches no page (none is without WPALLOWED) walks the whole range, and
    // PM_SCAN_CHECK_WPASYNC fails it (EPERM) on a mapping that is not ours.
    page_region region{};
    pm_scan_arg arg{};
    arg.size = sizeof(arg);
    arg.flags = PM_SCAN_CHECK_WPASYNC;
    arg.start = start;
    arg.end = end;
    arg.vec = reinterpret_cast<uint64_t>(&region);
    arg.vec_len = 1;
    arg.category_inverted = PAGE_IS_WPALLOWED;
    arg.category_mask = PAGE_IS_WPALLOWED;
    arg.return_mask = PAGE_IS_WPALLOWED;
    for (;;) {
      if (::ioctl(pagemap_fd_.get(), PAGEMAP_SCAN, &arg) >= 0) return Status::Ok();
      if (errno != EINTR) return Status::FromErrno(errno, "PAGEMAP_SCAN");
    }
  }
  // Protecting again what ProtectForPush protected changes nothing of ours (a write since
  // has marked its chunk dirty, and faults again) and fails (ENOENT) on a mapping that is
  // not registered, or (EAGAIN) while an event waits unread: once it is read, try again.
  return RetryProtectWhileEventUnread(counters_.protect_retries, [&] {
    return uffd_->WriteProtect(reinterpret_cast<void*>(start), end - start, true);
  });
}

void Mapping::WaitForReadEvents() {
  // munmap and mmap return once the fault thread has read their event, maybe before it
  // handled it; it handles a batch it read with events_mu_ held.
  MutexLock events_lock(events_mu_);
}

bool Mapping::UnmappedMeanwhile(uint64_t chunk) {
  WaitForReadEvents();
  return cut_chunks_[chunk].load(std::memory_order_acquire);
}

void Mapping::PushCutChunkInstead(size_t slot, uint64_t chunk) {
  {
    MutexLock lock(push_mu_);
    free_push_slots_.push_back(slot);
    push_cv_.notify_all();
  }
  PushCutChunkForSync(chunk);
}

void Mapping::FailPush(size_t slot, const Status& why) {
  push_slots_[slot].transfer.Expect(1);
  OnPushDone(slot, why);
}

void Mapping::PushCutChunkForSync(uint64_t chunk) {
  // Its pages still mapped go on their own (none when it went whole).
  if (Status s = PushCutChunk(chunk); !s.ok()) {
    MutexLock lock(push_mu_);
    if (push_error_.ok()) push_error_ = s;
  }
}

Status Mapping::ProtectForPush(uint64_t chunk, const std::vector<std::pair<uint64_t, uint64_t>>& segments) {
  // Each attempt releases the stripe lock before the retry waits: the fault thread, which
  // reads the pending event, may need it.
  return RetryProtectWhileEventUnread(counters_.protect_retries, [&] {
    // Clear, then protect, then copy: a write after the protect faults and re-dirties;
    // a write before it is in the copy.
    MutexLock lock(stripes_[chunk % kLockStripes]);
    chunks_.SetDirty(chunk, false);
    Status s;
    for (const auto& [from, to] : segments) {
      s = uffd_->WriteProtect(reinterpret_cast<void*>(from), to - from, true);
      if (!s.ok()) break;
    }
    if (!s.ok()) chunks_.SetDirty(chunk, true);
    return s;
  });
}

bool Mapping::KeepIfPagesLeft(uint64_t chunk) {
  if (!pagemap_fd_) return true;  // cannot tell
  const bool failed = chunks_.state(chunk) == fabric::ChunkState::kFailed;
  MutexLock lock(stripes_[chunk % kLockStripes]);  // a write fault marks it dirty again after this
  chunks_.SetDirty(chunk, false);
  const auto start = reinterpret_cast<uint64_t>(ChunkAddress(chunk));
  uint64_t entries[kMaxChunkSize / kPageSize];
  for (const auto& [from, to] : MappedSegments(start, start + ChunkLength(chunk))) {
    const size_t pages = (to - from) / kPageSize;
    const ssize_t n = ::pread(pagemap_fd_.get(), entries, pages * sizeof(uint64_t),
                              static_cast<off_t>(from / kPageSize * sizeof(uint64_t)));
    bool left = n != static_cast<ssize_t>(pages * sizeof(uint64_t));  // cannot tell: keep it
    for (size_t i = 0; i < pages && !left; ++i) {
      // A page swapped out still holds its writes. A failed chunk's poisoned pages look
      // swapped too, so there only present ones count (a written page of it swapped out
      // is missed: it could not be pushed either way).
      left = (entries[i] & kPagemapPresent) != 0 || (!failed && (entries[i] & kPagemapSwapped) != 0);
    }
    if (left) {
      chunks_.SetDirty(chunk, true);
      return true;
    }
  }
  return false;
}

Status Mapping::PullForSync(uint64_t chunk) {
  for (int attempt = 0;; ++attempt) {
    {
      MutexLock lock(mu_);
      cv_.wait(mu_, [&]() MF_NO_THREAD_SAFETY_ANALYSIS {
        const fabric::ChunkState state = chunks_.state(chunk);
        return stopping_ ||
               (state != fabric::ChunkState::kInFlight && state != fabric::ChunkState::kInFlightDropped);
      });
      if (stopping_) return Status(Code::kAborted, "the mapping is closing");
    }
    if (chunks_.state(chunk) != fabric::ChunkState::kRemote) return Status::Ok();  // local or failed
    const std::string what = "chunk " + std::to_string(chunk) + " (offset " +
                             std::to_string(chunk * chunk_size_) +
                             ") was written but some of its pages are not local";
    if (attempt == kMaxSyncPulls)
      return Status(Code::kUnavailable, what + ", and pulling them kept being undone");
    if (!chunks_.TryClaim(chunk)) continue;  // a fault or prefetch claimed it: wait for that pull
    size_t slot = 0;
    {
      MutexLock lock(mu_);
      cv_.wait(mu_,
               [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return stopping_ || !free_fault_slots_.empty(); });
      if (stopping_) {
        chunks_.Set(chunk, fabric::ChunkState::kRemote);
        (void)uffd_->Wake(ChunkAddress(chunk), ChunkLength(chunk));
        return Status(Code::kAborted, "the mapping is closing");
      }
      slot = free_fault_slots_.back();
      free_fault_slots_.pop_back();
      sync_pull_done_ = false;
    }
    StartPull(chunk, 1, slot, false, true);
    Status status;
    {
      MutexLock lock(mu_);
      // Not ended by stopping_: the pull completes into our slot whatever happens.
      cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return sync_pull_done_; });
      status = sync_pull_status_;
    }
    if (!status.ok()) return status.WithContext(what + ", and pulling them failed");
  }
}

Status Mapping::PushCutChunk(uint64_t chunk) {
  const auto start = reinterpret_cast<uint64_t>(ChunkAddress(chunk));
  const auto segments = MappedSegments(start, start + ChunkLength(chunk));
  if (tracking_ == WriteTracking::kSync) {
    MF_RETURN_IF_ERROR(ProtectForPush(chunk, segments));
  } else {
    chunks_.SetDirty(chunk, false);  // ScanWritten protected it again
  }
  std::vector<std::byte> bytes;
  for (const auto& [from, to] : segments) {
    bytes.resize(to - from);
    Status s = CopyFromMapping(bytes.data(), reinterpret_cast<const std::byte*>(from), bytes.size());
    // Mapped over during the copy (see CopyAndPush): not pushed, and the chunk stays dirty
    // for the next Sync, which knows the new hole.
    if (s.ok()) s = StillRegistered(from, to);
    if (s.ok()) s = fabric::WriteAt(remote_, chunk * chunk_size_ + (from - start), bytes);
    if (!s.ok()) {
      chunks_.SetDirty(chunk, true);
      return s;
    }
    counters_.bytes_pushed.fetch_add(to - from, std::memory_order_relaxed);
  }
  if (!segments.empty()) counters_.pushes.fetch_add(1, std::memory_order_relaxed);
  return Status::Ok();
}

void Mapping::SyncLoop() {
  for (;;) {
    {
      MutexLock lock(mu_);
      cv_.wait_for(mu_, options_.sync_interval,
                   [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return stopping_ || stop_sync_loop_; });
      if (stopping_ || stop_sync_loop_) return;
    }
    Status s = Sync();
    if (!s.ok()) spdlog::warn("periodic {}", s.ToString());
  }
}

Status Mapping::WaitPrefetched(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  MutexLock lock(mu_);
  for (;;) {
    if (chunks_.local_count() == chunks_.size()) return Status::Ok();
    if (!prefetch_error_.ok()) return prefetch_error_;
    if (!options_.prefetch) return Status(Code::kInvalidArgument, "prefetch is off");
    if (prefetch_pass_done_) {
      // Every chunk the pass found remote was pulled; what is not local now was dropped or
      // unmapped by the program, is being pulled for a fault, or failed.
      bool in_flight = false;
      for (uint64_t c = 0; c < chunks_.size(); ++c) {
        const fabric::ChunkState state = chunks_.state(c);
        if (state == fabric::ChunkState::kFailed) {
          return Status(Code::kUnavailable,
                        fmt::format("chunk {} (offset {}) failed to pull", c, c * chunk_size_));
        }
        in_flight = in_flight || state == fabric::ChunkState::kInFlight ||
                    state == fabric::ChunkState::kInFlightDropped;
      }
      if (!in_flight) return Status::Ok();
    }
    if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout) {
      if (chunks_.local_count() == chunks_.size()) return Status::Ok();
      return Status(Code::kTimeout, fmt::format("prefetch did not finish in {} ms ({} of {} chunks local)",
                                                timeout.count(), chunks_.local_count(), chunks_.size()));
    }
  }
}

Status Mapping::Close() {
  {
    MutexLock lock(mu_);
    if (closed_) return Status::Ok();
    closed_ = true;
    stop_sync_loop_ = true;
  }
  // The periodic sync ends first, while the fault thread still serves what a pass of it
  // touches: a pass queued behind the final Sync would otherwise run after that thread.
  cv_.notify_all();
  if (sync_thread_.joinable()) sync_thread_.join();
  Status result;
  // After a failed Init there is nothing to sync (no push slots, no writes seen).
  if (initialized_ && tracking_ != WriteTracking::kOff) result = Sync();
  if (fail_thread_.joinable()) {
    // Before the fault thread stops: FailLoop's mmaps wait for it to read their events.
    {
      MutexLock lock(fail_mu_);
      fail_exit_ = true;
    }
    fail_cv_.notify_all();
    fail_thread_.join();
  }
  {
    MutexLock lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (wake_fd_) Notify();
  if (prefetch_thread_.joinable()) prefetch_thread_.join();
  if (fault_thread_.joinable()) fault_thread_.join();
  // Pulls still in flight complete into our buffers: wait for their slots.
  {
    MutexLock lock(mu_);
    const size_t all = pull_slot_count_;
    cv_.wait(mu_, [&]() MF_NO_THREAD_SAFETY_ANALYSIS {
      return free_fault_slots_.size() + free_prefetch_slots_.size() == all;
    });
  }
  if (base_ != nullptr) {
    const auto start = reinterpret_cast<uint64_t>(base_);
    const std::vector<std::pair<uint64_t, uint64_t>> segments = MappedSegments(start, start + size_);
    // Segment by segment: what the program mapped into a hole (a regular file, say) cannot
    // be registered, and would fail one unregister of the whole range.
    for (const auto& [from, to] : segments) (void)uffd_->Unregister(reinterpret_cast<void*>(from), to - from);
    // Closed before the munmaps, as no thread reads its events any more: an unmap of a range
    // still registered (moved away by mremap, or missed above) would wait for its event to
    // be read forever. Closing it unregisters whatever is left.
    uffd_.reset();
    if (segments.size() == 1 && segments.front() == std::pair(start, start + size_)) {
      memory_.Reset();
    } else {
      // Unmap only what the program left mapped: something else may live in the holes.
      for (const auto& [from, to] : segments) ::munmap(reinterpret_cast<void*>(from), to - from);
      (void)memory_.Release();
    }
    base_ = nullptr;
  }
  return result;
}

MappingStats Mapping::stats() const {
  MappingStats s;
  s.faults = counters_.faults.load();
  s.wp_faults = counters_.wp_faults.load();
  s.pulls = counters_.pulls.load();
  s.prefetches = counters_.prefetches.load();
  s.bytes_pulled = counters_.bytes_pulled.load();
  s.pushes = counters_.pushes.load();
  s.bytes_pushed = counters_.bytes_pushed.load();
  s.failed_pulls = counters_.failed_pulls.load();
  s.protect_retries = counters_.protect_retries.load();
  s.chunks = chunks_.size();
  s.local_chunks = chunks_.local_count();
  s.dirty_chunks = chunks_.dirty_count();
  return s;
}

}  // namespace mf::uffd
