#include "fabric/memory_remote.h"

#include <cstring>

namespace mf::fabric {

MemoryRegion::MemoryRegion(std::string name, uint64_t size) : bytes_(size) {
  info_.name = std::move(name);
  info_.size = size;
  info_.generation = 1;
}

MemoryRemote::MemoryRemote(std::shared_ptr<MemoryRegion> region, bool writable, size_t max_transfer)
    : region_(std::move(region)),
      writable_(writable),
      max_transfer_(max_transfer),
      worker_([this] { Worker(); }) {}

MemoryRemote::~MemoryRemote() {
  (void)Close();
}

Result<Buffer> MemoryRemote::AllocateBuffer(size_t size) {
  MF_ASSIGN_OR_RETURN(MappedMemory memory, MappedMemory::Anonymous(size));
  return Buffer(std::move(memory), nullptr);
}

void MemoryRemote::Submit(std::span<const IoRequest> requests) {
  for (const IoRequest& r : requests) {
    Status invalid = ValidateRequest(r, *this);
    if (!invalid.ok()) {
      r.callback->OnIoComplete(r.cookie, invalid);
      continue;
    }
    MutexLock lock(mu_);
    if (closed_) {
      r.callback->OnIoComplete(r.cookie, Status(Code::kAborted, "remote is closed"));
      continue;
    }
    queue_.push_back(r);
  }
  cv_.notify_one();
}

void MemoryRemote::Worker() {
  for (;;) {
    IoRequest r;
    Status injected;
    {
      MutexLock lock(mu_);
      cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return closed_ || !queue_.empty(); });
      if (queue_.empty()) return;  // closed and drained
      r = queue_.front();
      queue_.pop_front();
      if (fail_count_ > 0) {
        --fail_count_;
        injected = fail_status_;
      } else if (r.offset < fail_range_end_ && r.offset + r.data.size() > fail_range_begin_) {
        injected = fail_range_status_;
      }
    }
    if (int64_t delay = delay_us_.load(); delay > 0)
      std::this_thread::sleep_for(std::chrono::microseconds(delay));
    if (injected.ok()) {
      std::byte* remote_bytes = region_->data() + r.offset;
      if (r.kind == IoKind::kRead) {
        std::memcpy(r.data.data(), remote_bytes, r.data.size());
      } else {
        std::memcpy(remote_bytes, r.data.data(), r.data.size());
      }
      served_.fetch_add(1);
    }
    r.callback->OnIoComplete(r.cookie, injected);
  }
}

Status MemoryRemote::Flush() {
  return Status::Ok();
}

Status MemoryRemote::Close() {
  std::deque<IoRequest> aborted;
  {
    MutexLock lock(mu_);
    if (closed_) return Status::Ok();
    closed_ = true;
    aborted.swap(queue_);
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  for (const IoRequest& r : aborted)
    r.callback->OnIoComplete(r.cookie, Status(Code::kAborted, "remote closed"));
  return Status::Ok();
}

void MemoryRemote::FailNext(size_t count, Status status) {
  MutexLock lock(mu_);
  fail_count_ = count;
  fail_status_ = std::move(status);
}

void MemoryRemote::FailRange(uint64_t offset, uint64_t length, Status status) {
  MutexLock lock(mu_);
  fail_range_begin_ = offset;
  fail_range_end_ = offset + length;
  fail_range_status_ = std::move(status);
}

}  // namespace mf::fabric
