// fabric::MemoryRemote — an in-memory Remote for unit tests of the layers above the seam
// (mounts, migration, views). Never a replacement for the end-to-end test of a transport.
//
// It serves a byte array shared between every MemoryRemote made from the same
// MemoryRegion, so a test can open a writer and a reader on one region. Completions run
// on a worker thread (asynchronous like a real transport). Faults can be injected: fail
// the next N requests with a given Status, or delay each request.
//
// Thread-safety: all methods are thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#include "fabric/remote.h"
#include "fabric/thread_annotations.h"

namespace mf::fabric {

// The server side of MemoryRemote: zero-filled bytes with a name.
class MemoryRegion {
 public:
  MemoryRegion(std::string name, uint64_t size);
  const RegionInfo& info() const { return info_; }
  std::byte* data() { return bytes_.data(); }
  std::span<std::byte> bytes() { return bytes_; }

 private:
  RegionInfo info_;
  std::vector<std::byte> bytes_;
};

class MemoryRemote final : public Remote {
 public:
  static constexpr size_t kMaxTransfer = 4u << 20;

  // max_transfer: the largest request accepted, to exercise callers' splitting.
  MemoryRemote(std::shared_ptr<MemoryRegion> region, bool writable, size_t max_transfer = kMaxTransfer);
  ~MemoryRemote() override;

  const RegionInfo& info() const override { return region_->info(); }
  bool writable() const override { return writable_; }
  std::string_view transport() const override { return "memory"; }
  size_t max_transfer() const override { return max_transfer_; }
  Result<Buffer> AllocateBuffer(size_t size) override;
  void Submit(std::span<const IoRequest> requests) override MF_EXCLUDES(mu_);
  Status Flush() override;
  Status Close() override MF_EXCLUDES(mu_);

  // Fault injection: the next `count` requests fail with `status`.
  void FailNext(size_t count, Status status) MF_EXCLUDES(mu_);
  // Fault injection: from now on every request overlapping [offset, offset + length)
  // fails with `status` (length 0: none does).
  void FailRange(uint64_t offset, uint64_t length, Status status) MF_EXCLUDES(mu_);
  // Every request waits this long before it is served.
  void SetDelay(std::chrono::microseconds delay) { delay_us_ = delay.count(); }
  uint64_t requests_served() const { return served_.load(); }

 private:
  void Worker() MF_EXCLUDES(mu_);
  Status Validate(const IoRequest& r) const;

  std::shared_ptr<MemoryRegion> region_;
  const bool writable_;
  const size_t max_transfer_;
  std::atomic<int64_t> delay_us_{0};
  std::atomic<uint64_t> served_{0};
  Mutex mu_;
  std::condition_variable_any cv_;
  std::deque<IoRequest> queue_ MF_GUARDED_BY(mu_);
  size_t fail_count_ MF_GUARDED_BY(mu_) = 0;
  Status fail_status_ MF_GUARDED_BY(mu_);
  uint64_t fail_range_begin_ MF_GUARDED_BY(mu_) = 0;
  uint64_t fail_range_end_ MF_GUARDED_BY(mu_) = 0;
  Status fail_range_status_ MF_GUARDED_BY(mu_);
  bool closed_ MF_GUARDED_BY(mu_) = false;
  std::thread worker_;  // last: started after everything it uses exists
};

}  // namespace mf::fabric
