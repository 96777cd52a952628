#include "fabric/mount.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <numeric>

namespace mf::fabric {

// Routes a Remote's completions to OnPullDone or OnPushDone, by the cookie's slot.
class Mount::Done final : public IoCallback {
 public:
  Done(Mount* m, IoKind kind) : m_(m), kind_(kind) {}
  void OnIoComplete(uint64_t cookie, const Status& status) override {
    if (kind_ == IoKind::kRead) {
      m_->OnPullDone(ChunkTransfer::SlotOf(cookie), status);
    } else {
      m_->OnPushDone(ChunkTransfer::SlotOf(cookie), status);
    }
  }

 private:
  Mount* m_;
  IoKind kind_;
};

Mount::Mount(Remote& remote, MountOptions options)
    : remote_(&remote),
      options_(std::move(options)),
      size_(remote.size()),
      chunk_size_(options_.chunk_size),
      read_only_(options_.read_only || !remote.writable()),
      chunks_((remote.size() + options_.chunk_size - 1) / options_.chunk_size),
      attempts_(new std::atomic<uint32_t>[chunks_.size()]),
      written_(new std::atomic<bool>[chunks_.size()]) {
  for (uint64_t i = 0; i < chunks_.size(); ++i) {
    attempts_[i].store(0, std::memory_order_relaxed);
    written_[i].store(false, std::memory_order_relaxed);
  }
}

Result<std::unique_ptr<Mount>> Mount::Create(Remote& remote, MountOptions options) {
  if (!IsPowerOfTwo(options.chunk_size) || options.chunk_size < kMountMinChunkSize ||
      options.chunk_size > kMountMaxChunkSize) {
    return InvalidArgument("chunk size " + std::to_string(options.chunk_size) +
                           " must be a power of two from 4 KiB to 2 MiB");
  }
  if (remote.size() == 0) return InvalidArgument("cannot mount an empty region");
  if (options.demand_depth == 0 || options.push_depth == 0 ||
      (options.background_pull && options.background_depth == 0)) {
    return InvalidArgument("demand, background and push depths must be at least 1");
  }
  if (options.max_pull_attempts == 0) return InvalidArgument("max_pull_attempts must be at least 1");
  const uint64_t chunks = (remote.size() + options.chunk_size - 1) / options.chunk_size;
  const size_t budget_depth =
      static_cast<size_t>(std::min<uint64_t>(options.in_flight_bytes / options.chunk_size, chunks));
  if (options.background_pull) options.background_depth = std::max(options.background_depth, budget_depth);
  options.push_depth = std::max(options.push_depth, budget_depth);
  std::unique_ptr<Mount> m(new Mount(remote, std::move(options)));
  MF_RETURN_IF_ERROR(m->Init());
  return m;
}

Status Mount::Init() {
  if (options_.path.empty()) {
    MF_ASSIGN_OR_RETURN(memory_, MappedMemory::Anonymous(size_));
    // Huge pages where the kernel allows: filling fresh memory a 4 KiB page at a time costs
    // several times the copy itself. Advice only; refused is fine.
    (void)::madvise(memory_.data(), size_, MADV_HUGEPAGE);
  } else {
    file_.Reset(::open(options_.path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!file_) return Status::FromErrno(errno, "open " + options_.path);
    if (::ftruncate(file_.get(), static_cast<off_t>(size_)) != 0)
      return Status::FromErrno(errno, "truncate " + options_.path);
    void* addr = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, file_.get(), 0);
    if (addr == MAP_FAILED) return Status::FromErrno(errno, "mmap " + options_.path);
    memory_ = MappedMemory(addr, size_);
  }
  base_ = memory_.data();

  const size_t background_slots = options_.background_pull ? options_.background_depth : 0;
  pull_slot_count_ = options_.demand_depth + background_slots;
  MF_ASSIGN_OR_RETURN(pull_buffer_, remote().AllocateBuffer(pull_slot_count_ * chunk_size_));
  pull_slots_ = std::make_unique<Slot[]>(pull_slot_count_);
  pull_done_ = std::make_unique<Done>(this, IoKind::kRead);
  push_done_ = std::make_unique<Done>(this, IoKind::kWrite);
  {
    MutexLock lock(mu_);
    for (size_t i = 0; i < options_.demand_depth; ++i) free_demand_slots_.push_back(i);
    for (size_t i = options_.demand_depth; i < pull_slot_count_; ++i) free_background_slots_.push_back(i);
  }
  if (!read_only_) {
    MF_ASSIGN_OR_RETURN(push_buffer_, remote().AllocateBuffer(options_.push_depth * chunk_size_));
    push_slots_ = std::make_unique<Slot[]>(options_.push_depth);
    MutexLock lock(push_mu_);
    for (size_t i = 0; i < options_.push_depth; ++i) free_push_slots_.push_back(i);
  }

  if (options_.background_pull) pull_thread_ = std::thread([this] { PullLoop(); });
  if (!read_only_ && options_.push_interval.count() > 0) push_thread_ = std::thread([this] { PushLoop(); });
  spdlog::debug("mount of '{}' over {}: {} bytes, chunk {}, {}{}", remote().info().name, remote().transport(),
                size_, chunk_size_, read_only_ ? "read-only" : "read-write",
                options_.path.empty() ? "" : ", local copy in " + options_.path);
  return Status::Ok();
}

Mount::~Mount() {
  (void)Close();
}

size_t Mount::ChunkLength(uint64_t chunk) const {
  return static_cast<size_t>(std::min<uint64_t>(chunk_size_, size_ - chunk * chunk_size_));
}

Status Mount::CheckOpen(uint64_t offset, uint64_t length) const {
  if (!open_.load(std::memory_order_acquire)) return Status(Code::kAborted, "mount is closed");
  return CheckRange(offset, length, size_);
}

// --- Reads -------------------------------------------------------------------------------

bool Mount::TryStartDemandPull(uint64_t chunk) {
  size_t slot = 0;
  {
    MutexLock lock(mu_);
    if (free_demand_slots_.empty() || detached_.load(std::memory_order_acquire)) return false;
    slot = free_demand_slots_.back();
    free_demand_slots_.pop_back();
  }
  if (!chunks_.TryClaim(chunk)) {
    {
      MutexLock lock(mu_);
      free_demand_slots_.push_back(slot);
    }
    cv_.notify_all();
    return false;
  }
  Slot& s = pull_slots_[slot];
  s.chunk = chunk;
  s.demand = true;
  SubmitChunk(IoKind::kRead, s, slot, pull_buffer_.data() + slot * chunk_size_, pull_buffer_,
              pull_done_.get());
  return true;
}

Status Mount::WaitLocal(uint64_t chunk) {
  for (;;) {
    switch (chunks_.state(chunk)) {
      case ChunkState::kLocal: return Status::Ok();
      case ChunkState::kFailed: {
        MutexLock lock(mu_);
        return Status(pull_error_.code(),
                      "cannot pull chunk " + std::to_string(chunk) + " (offset " +
                          std::to_string(chunk * chunk_size_) + ") of '" + remote().info().name + "' after " +
                          std::to_string(options_.max_pull_attempts) +
                          " attempts; last failure: " + std::string(pull_error_.message()));
      }
      case ChunkState::kRemote:
        if (TryStartDemandPull(chunk)) continue;
        break;
      case ChunkState::kInFlight:
      case ChunkState::kInFlightDropped: break;
    }
    MutexLock lock(mu_);
    cv_.wait(mu_, [&]() MF_NO_THREAD_SAFETY_ANALYSIS {
      const ChunkState s = chunks_.state(chunk);
      return s == ChunkState::kLocal || s == ChunkState::kFailed ||
             (s == ChunkState::kRemote && !free_demand_slots_.empty() && !detached_.load());
    });
  }
}

Status Mount::EnsureLocal(uint64_t offset, uint64_t length) {
  MF_RETURN_IF_ERROR(CheckOpen(offset, length));
  if (length == 0) return Status::Ok();
  const uint64_t first = offset / chunk_size_;
  const uint64_t last = (offset + length - 1) / chunk_size_;
  // Start every missing chunk's pull first, then wait: the pulls overlap.
  for (uint64_t c = first; c <= last; ++c) {
    if (chunks_.state(c) == ChunkState::kRemote) (void)TryStartDemandPull(c);
  }
  for (uint64_t c = first; c <= last; ++c) MF_RETURN_IF_ERROR(WaitLocal(c));
  return Status::Ok();
}

Status Mount::Read(uint64_t offset, std::span<std::byte> out) {
  MF_RETURN_IF_ERROR(EnsureLocal(offset, out.size()));
  if (!out.empty()) std::memcpy(out.data(), base_ + offset, out.size());
  return Status::Ok();
}

// --- Writes ------------------------------------------------------------------------------

void Mount::WriteLocal(uint64_t chunk, size_t at, std::span<const std::byte> in) {
  MutexLock lock(stripes_[chunk % kMountLockStripes]);
  std::memcpy(ChunkAddress(chunk) + at, in.data(), in.size());
  // After the copy: a push that copied the chunk before this point sees the bit again.
  chunks_.SetDirty(chunk, true);
  MarkWritten(chunk);
}

void Mount::MarkWritten(uint64_t chunk) {
  if (tracking_.load(std::memory_order_acquire) && !written_[chunk].exchange(true, std::memory_order_acq_rel))
    written_count_.fetch_add(1, std::memory_order_relaxed);
}

bool Mount::TryWriteWholeChunk(uint64_t chunk, const std::byte* in) {
  if (!chunks_.TryClaim(chunk)) {
    if (!chunks_.Transition(chunk, ChunkState::kFailed, ChunkState::kInFlight)) return false;
    counters_.failed_chunks.fetch_sub(1, std::memory_order_relaxed);
  }
  WriteLocal(chunk, 0, {in, ChunkLength(chunk)});
  (void)chunks_.FinishPull(chunk);
  { MutexLock lock(mu_); }  // a waiter is either before its check or inside wait()
  cv_.notify_all();
  return true;
}

Status Mount::Write(uint64_t offset, std::span<const std::byte> in) {
  if (read_only_)
    return Status(Code::kPermissionDenied, "mount of '" + remote().info().name + "' is read-only");
  MF_RETURN_IF_ERROR(CheckOpen(offset, in.size()));
  if (in.empty()) return Status::Ok();
  const uint64_t end = offset + in.size();
  const uint64_t first = offset / chunk_size_;
  const uint64_t last = (end - 1) / chunk_size_;
  // Only the first and last chunk can be partly written: start their pulls together.
  for (uint64_t c : {first, last}) {
    const uint64_t start = c * chunk_size_;
    const bool whole = offset <= start && end >= start + ChunkLength(c);
    if (!whole && chunks_.state(c) == ChunkState::kRemote) (void)TryStartDemandPull(c);
  }
  for (uint64_t c = first; c <= last; ++c) {
    const uint64_t start = c * chunk_size_;
    const uint64_t from = std::max(offset, start);
    const uint64_t to = std::min(end, start + ChunkLength(c));
    const std::span<const std::byte> piece = in.subspan(from - offset, to - from);
    if (piece.size() < ChunkLength(c)) {
      MF_RETURN_IF_ERROR(WaitLocal(c));
      WriteLocal(c, from - start, piece);
      continue;
    }
    for (;;) {
      const ChunkState s = chunks_.state(c);
      if (s == ChunkState::kLocal) {
        WriteLocal(c, 0, piece);
        break;
      }
      if ((s == ChunkState::kRemote || s == ChunkState::kFailed) && TryWriteWholeChunk(c, piece.data()))
        break;
      MutexLock lock(mu_);
      cv_.wait(mu_, [&]() MF_NO_THREAD_SAFETY_ANALYSIS {
        const ChunkState now = chunks_.state(c);
        return now != ChunkState::kInFlight && now != ChunkState::kInFlightDropped;
      });
    }
  }
  return Status::Ok();
}

Status Mount::MarkDirty(uint64_t offset, uint64_t length) {
  if (read_only_)
    return Status(Code::kPermissionDenied, "mount of '" + remote().info().name + "' is read-only");
  MF_RETURN_IF_ERROR(CheckOpen(offset, length));
  if (length == 0) return Status::Ok();
  for (uint64_t c = offset / chunk_size_; c <= (offset + length - 1) / chunk_size_; ++c) {
    if (chunks_.state(c) != ChunkState::kLocal)
      return InvalidArgument("MarkDirty of chunk " + std::to_string(c) + ", which is not local");
    MutexLock lock(stripes_[c % kMountLockStripes]);
    chunks_.SetDirty(c, true);
    MarkWritten(c);
  }
  return Status::Ok();
}

// --- Background pull ---------------------------------------------------------------------

void Mount::Prioritize(uint64_t offset, uint64_t length) {
  if (!options_.background_pull || length == 0 || !CheckRange(offset, length, size_).ok()) return;
  const uint64_t first = offset / chunk_size_;
  const uint64_t last = (offset + length - 1) / chunk_size_;
  {
    MutexLock lock(mu_);
    for (uint64_t c = last + 1; c-- > first;) urgent_.push_front(c);
  }
  cv_.notify_all();
}

std::vector<uint64_t> Mount::BackgroundOrder() const {
  std::vector<uint64_t> order;
  if (!options_.priority) return order;  // sequential: no table needed
  order.resize(chunks_.size());
  std::iota(order.begin(), order.end(), uint64_t{0});
  std::vector<uint64_t> rank(chunks_.size());
  for (uint64_t c = 0; c < chunks_.size(); ++c) rank[c] = options_.priority(c * chunk_size_);
  std::stable_sort(order.begin(), order.end(), [&](uint64_t a, uint64_t b) { return rank[a] < rank[b]; });
  return order;
}

void Mount::PullLoop() {
  std::vector<uint64_t> hinted;
  for (uint64_t offset : options_.priority_offsets) {
    if (offset < size_) hinted.push_back(offset / chunk_size_);
  }
  const std::vector<uint64_t> ranked = BackgroundOrder();
  size_t next_hint = 0;
  uint64_t next = 0;  // position in `ranked`, or the chunk index when sequential
  // The next chunk of the planned order that is still remote, or chunks_.size().
  auto next_planned = [&]() -> uint64_t {
    while (next_hint < hinted.size()) {
      const uint64_t c = hinted[next_hint++];
      if (chunks_.state(c) == ChunkState::kRemote) return c;
    }
    while (next < chunks_.size()) {
      const uint64_t c = ranked.empty() ? next : ranked[next];
      ++next;
      if (chunks_.state(c) == ChunkState::kRemote) return c;
    }
    return chunks_.size();
  };
  bool planned_done = false;
  for (;;) {
    uint64_t chunk = 0;
    size_t slot = 0;
    {
      MutexLock lock(mu_);
      cv_.wait(mu_, [&]() MF_NO_THREAD_SAFETY_ANALYSIS {
        return stopping_ ||
               (!detached_.load() && !free_background_slots_.empty() && (!urgent_.empty() || !planned_done));
      });
      if (stopping_) return;
      if (!urgent_.empty()) {
        chunk = urgent_.front();
        urgent_.pop_front();
      } else {
        chunk = next_planned();
        if (chunk == chunks_.size()) {
          planned_done = true;
          continue;
        }
      }
      if (!chunks_.TryClaim(chunk)) continue;
      slot = free_background_slots_.back();
      free_background_slots_.pop_back();
    }
    Slot& s = pull_slots_[slot];
    s.chunk = chunk;
    s.demand = false;
    SubmitChunk(IoKind::kRead, s, slot, pull_buffer_.data() + slot * chunk_size_, pull_buffer_,
                pull_done_.get());
  }
}

// --- Transfers ---------------------------------------------------------------------------

void Mount::SubmitChunk(IoKind kind, Slot& s, size_t slot, std::byte* staged, const Buffer& buffer,
                        IoCallback* done) {
  s.transfer.Submit(remote(), kind, s.chunk * chunk_size_, {staged, ChunkLength(s.chunk)},
                    remote().max_transfer(), buffer, done, slot);
}

void Mount::OnPullDone(size_t slot, const Status& piece_status) {
  Status status;
  Slot& s = pull_slots_[slot];
  if (!s.transfer.CompleteOne(piece_status, &status)) return;
  const uint64_t chunk = s.chunk;
  const bool demand = s.demand;
  const size_t len = ChunkLength(chunk);
  bool retry = false;
  if (status.ok()) {
    std::memcpy(ChunkAddress(chunk), pull_buffer_.data() + slot * chunk_size_, len);
    (demand ? counters_.demand_pulls : counters_.background_pulls).fetch_add(1, std::memory_order_relaxed);
    counters_.bytes_pulled.fetch_add(len, std::memory_order_relaxed);
    counters_.last_pull_ns.store(
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start_).count(),
        std::memory_order_relaxed);
    (void)chunks_.FinishPull(chunk);
  } else if (attempts_[chunk].fetch_add(1, std::memory_order_relaxed) + 1 < options_.max_pull_attempts) {
    counters_.pull_retries.fetch_add(1, std::memory_order_relaxed);
    spdlog::debug("mount of '{}': pull of chunk {} failed, retrying: {}", remote().info().name, chunk,
                  status.ToString());
    chunks_.Set(chunk, ChunkState::kRemote);
    retry = true;
  } else {
    spdlog::error("mount of '{}': cannot pull chunk {} (offset {}): {}", remote().info().name, chunk,
                  chunk * chunk_size_, status.ToString());
  }
  {
    MutexLock lock(mu_);
    if (!status.ok() && !retry) {
      // Under mu_, so that a reader who sees kFailed finds this error.
      pull_error_ = status;
      counters_.failed_chunks.fetch_add(1, std::memory_order_relaxed);
      chunks_.Set(chunk, ChunkState::kFailed);
    }
    if (retry && options_.background_pull && !stopping_) urgent_.push_back(chunk);
    (demand ? free_demand_slots_ : free_background_slots_).push_back(slot);
    // Notify before unlocking: once every slot is free, Close() may destroy the Mount.
    cv_.notify_all();
  }
}

// --- Push --------------------------------------------------------------------------------

void Mount::OnPushDone(size_t slot, const Status& piece_status) {
  Status status;
  if (!push_slots_[slot].transfer.CompleteOne(piece_status, &status)) return;
  const uint64_t chunk = push_slots_[slot].chunk;
  if (status.ok()) {
    counters_.pushes.fetch_add(1, std::memory_order_relaxed);
    counters_.bytes_pushed.fetch_add(ChunkLength(chunk), std::memory_order_relaxed);
  } else {
    counters_.failed_pushes.fetch_add(1, std::memory_order_relaxed);
    chunks_.SetDirty(chunk, true);  // keep it for the next round
  }
  {
    MutexLock lock(push_mu_);
    if (!status.ok() && push_error_.ok()) push_error_ = status;
    free_push_slots_.push_back(slot);
    // Notify before unlocking: once every slot is free, Close() may destroy the Mount.
    push_cv_.notify_all();
  }
}

Status Mount::PushDirty() {
  {
    MutexLock lock(push_mu_);
    push_error_ = Status::Ok();
  }
  const Clock::time_point began = Clock::now();
  bool pushed_any = false;
  for (uint64_t chunk = 0; chunk < chunks_.size(); ++chunk) {
    if (!chunks_.dirty(chunk)) continue;
    pushed_any = true;
    size_t slot = 0;
    {
      MutexLock lock(push_mu_);
      push_cv_.wait(push_mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return !free_push_slots_.empty(); });
      slot = free_push_slots_.back();
      free_push_slots_.pop_back();
    }
    std::byte* staged = push_buffer_.data() + slot * chunk_size_;
    {
      // Clear, then copy, under the chunk's stripe: a write after this is dirty again.
      MutexLock lock(stripes_[chunk % kMountLockStripes]);
      chunks_.SetDirty(chunk, false);
      std::memcpy(staged, ChunkAddress(chunk), ChunkLength(chunk));
    }
    Slot& s = push_slots_[slot];
    s.chunk = chunk;
    SubmitChunk(IoKind::kWrite, s, slot, staged, push_buffer_, push_done_.get());
  }
  Status result;
  {
    MutexLock lock(push_mu_);
    push_cv_.wait(push_mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS {
      return free_push_slots_.size() == options_.push_depth;
    });
    result = push_error_;
  }
  if (pushed_any) {
    counters_.push_busy_ns.fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - began).count(),
        std::memory_order_relaxed);
  }
  return result;
}

Status Mount::Sync() {
  if (read_only_) return Status::Ok();
  if (!open_.load(std::memory_order_acquire)) return Status(Code::kAborted, "mount is closed");
  MutexLock lock(sync_mu_);
  if (detached_.load(std::memory_order_acquire))
    return Unavailable("sync of '" + remote().info().name + "': the mount is detached from its remote");
  Status pushed = PushDirty();
  if (!pushed.ok()) return pushed.WithContext("sync of '" + remote().info().name + "'");
  return remote().Flush();
}

void Mount::PushLoop() {
  for (;;) {
    {
      MutexLock lock(mu_);
      cv_.wait_for(mu_, options_.push_interval, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return stopping_; });
      if (stopping_) return;
    }
    if (detached_.load(std::memory_order_acquire)) continue;
    Status s = Sync();
    if (!s.ok()) spdlog::warn("periodic {}", s.ToString());
  }
}

// --- Lifetime and progress ---------------------------------------------------------------

Status Mount::WaitAllLocal(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  MutexLock lock(mu_);
  for (;;) {
    if (chunks_.local_count() == chunks_.size()) return Status::Ok();
    if (counters_.failed_chunks.load() > 0) return pull_error_;
    if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout) {
      if (chunks_.local_count() == chunks_.size()) return Status::Ok();
      return Status(Code::kTimeout, "mount of '" + remote().info().name + "' is not fully local yet");
    }
  }
}

Status Mount::Close() {
  {
    MutexLock lock(mu_);
    if (closed_) return Status::Ok();
    closed_ = true;
    stopping_ = true;
  }
  cv_.notify_all();
  if (pull_thread_.joinable()) pull_thread_.join();
  if (push_thread_.joinable()) push_thread_.join();
  {
    // Pulls in flight complete into our buffers and the local copy: wait for them.
    MutexLock lock(mu_);
    cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS {
      return free_demand_slots_.size() + free_background_slots_.size() == pull_slot_count_;
    });
  }
  Status result;
  if (detached_.load(std::memory_order_acquire)) {
    if (!read_only_ && chunks_.dirty_count() > 0) {
      result = Status(Code::kAborted, "mount of '" + remote().info().name + "' closed while detached with " +
                                          std::to_string(chunks_.dirty_count()) + " dirty chunks");
    }
  } else if (!read_only_ && base_ != nullptr) {
    result = Sync();
  }
  open_.store(false, std::memory_order_release);
  memory_.Reset();
  file_.Reset();
  base_ = nullptr;
  return result;
}

// --- Migration support -------------------------------------------------------------------

void Mount::StartWriteTracking() {
  // No push round while we look: a chunk that is dirty (or being pushed) now is not on the
  // server yet, so a reader of the server may miss it; it counts as written too.
  MutexLock lock(sync_mu_);
  tracking_.store(false, std::memory_order_release);
  for (uint64_t c = 0; c < chunks_.size(); ++c) written_[c].store(false, std::memory_order_relaxed);
  written_count_.store(0, std::memory_order_relaxed);
  tracking_.store(true, std::memory_order_seq_cst);
  // After tracking is on: a write before it left its dirty bit set (pushes wait for us), a
  // write after it marks itself.
  for (uint64_t c = 0; c < chunks_.size(); ++c) {
    if (chunks_.dirty(c) && !written_[c].exchange(true, std::memory_order_acq_rel))
      written_count_.fetch_add(1, std::memory_order_relaxed);
  }
}

std::vector<uint64_t> Mount::WrittenChunks() const {
  std::vector<uint64_t> out;
  for (uint64_t c = 0; c < chunks_.size(); ++c) {
    if (written_[c].load(std::memory_order_acquire)) out.push_back(c);
  }
  return out;
}

Status Mount::Detach() {
  if (!open_.load(std::memory_order_acquire)) return Status(Code::kAborted, "mount is closed");
  {
    MutexLock sync_lock(sync_mu_);  // waits for a push round in progress
    MutexLock lock(mu_);
    if (detached_.load()) return Status::Ok();
    detached_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
  MutexLock lock(mu_);
  cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS {
    return free_demand_slots_.size() + free_background_slots_.size() == pull_slot_count_;
  });
  return Status::Ok();
}

Status Mount::Attach(Remote& remote, std::span<const uint64_t> stale) {
  if (!detached_.load(std::memory_order_acquire))
    return InvalidArgument("Attach of a mount that is not detached");
  if (remote.size() != size_) {
    return InvalidArgument("Attach to a remote of " + std::to_string(remote.size()) +
                           " bytes; the mount has " + std::to_string(size_));
  }
  const bool read_only = options_.read_only || !remote.writable();
  // Buffers belong to the Remote that made them (RDMA registers them with its device).
  const bool new_remote = &remote != remote_.load();
  const bool new_push = !read_only && (new_remote || push_buffer_.size() == 0);
  Buffer pull_buffer;
  Buffer push_buffer;
  if (new_remote) {
    MF_ASSIGN_OR_RETURN(pull_buffer, remote.AllocateBuffer(pull_slot_count_ * chunk_size_));
  }
  if (new_push) {
    MF_ASSIGN_OR_RETURN(push_buffer, remote.AllocateBuffer(options_.push_depth * chunk_size_));
  }
  // Nothing is in flight while detached: stale chunks simply become remote again.
  for (uint64_t c : stale) {
    if (c >= chunks_.size()) continue;
    if (chunks_.state(c) == ChunkState::kFailed) {
      chunks_.Set(c, ChunkState::kRemote);
      counters_.failed_chunks.fetch_sub(1, std::memory_order_relaxed);
    }
    chunks_.Drop(c);
    chunks_.SetDirty(c, false);
    attempts_[c].store(0, std::memory_order_relaxed);
  }
  {
    MutexLock sync_lock(sync_mu_);
    if (!read_only && !push_slots_) {
      push_slots_ = std::make_unique<Slot[]>(options_.push_depth);
      MutexLock lock(push_mu_);
      for (size_t i = 0; i < options_.push_depth; ++i) free_push_slots_.push_back(i);
    }
    MutexLock lock(mu_);
    if (new_remote) pull_buffer_ = std::move(pull_buffer);
    if (new_push || new_remote) push_buffer_ = std::move(push_buffer);
    remote_.store(&remote, std::memory_order_release);
    read_only_.store(read_only, std::memory_order_release);
    if (!stale.empty() && options_.background_pull) {
      for (uint64_t c : stale) {
        if (c < chunks_.size()) urgent_.push_back(c);
      }
    }
    detached_.store(false, std::memory_order_release);
  }
  cv_.notify_all();
  if (!read_only && options_.push_interval.count() > 0 && !push_thread_.joinable())
    push_thread_ = std::thread([this] { PushLoop(); });
  return Status::Ok();
}

MountStats Mount::stats() const {
  MountStats s;
  s.size = size_;
  s.chunk_size = chunk_size_;
  s.chunks = chunks_.size();
  s.local_chunks = chunks_.local_count();
  s.dirty_chunks = chunks_.dirty_count();
  s.failed_chunks = counters_.failed_chunks.load();
  // Every chunk is chunk_size_ long but the last, which may be shorter.
  const uint64_t last = chunks_.size() - 1;
  const uint64_t short_by = chunk_size_ - ChunkLength(last);
  s.bytes_local = s.local_chunks * chunk_size_ - (chunks_.state(last) == ChunkState::kLocal ? short_by : 0);
  s.bytes_dirty = s.dirty_chunks * chunk_size_ - (chunks_.dirty(last) ? short_by : 0);
  s.demand_pulls = counters_.demand_pulls.load();
  s.background_pulls = counters_.background_pulls.load();
  s.pull_retries = counters_.pull_retries.load();
  s.bytes_pulled = counters_.bytes_pulled.load();
  s.pushes = counters_.pushes.load();
  s.failed_pushes = counters_.failed_pushes.load();
  s.bytes_pushed = counters_.bytes_pushed.load();
  if (const int64_t ns = counters_.last_pull_ns.load(); ns > 0)
    s.pull_bytes_per_second = static_cast<double>(s.bytes_pulled) * 1e9 / static_cast<double>(ns);
  if (const int64_t ns = counters_.push_busy_ns.load(); ns > 0)
    s.push_bytes_per_second = static_cast<double>(s.bytes_pushed) * 1e9 / static_cast<double>(ns);
  return s;
}

}  // namespace mf::fabric
