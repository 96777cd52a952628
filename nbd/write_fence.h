// Orders writes to the same bytes: a write that overlaps one still in flight waits for it.
//
// The NBD protocol lets a server apply concurrent overlapping writes in any order, and a
// client that cares waits for one reply before sending the next. But the kernel's NBD
// driver re-sends a request it timed out on another connection while the first copy may
// still be in flight at the Remote, and acknowledges the re-sent copy: without ordering,
// the stale copy could land after it, and after writes the program made once it was
// acknowledged, silently undoing them. Export admits every WRITE and WRITE_ZEROES here.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <vector>

#include "fabric/thread_annotations.h"

namespace mf::nbd {

class WriteFence {
 public:
  // `capacity`: writes in flight at once that need no allocation (more may be).
  explicit WriteFence(size_t capacity);
  WriteFence(const WriteFence&) = delete;
  WriteFence& operator=(const WriteFence&) = delete;

  // Admits a write of [offset, offset + length) to `target` (the Remote), waiting while it
  // overlaps a write admitted earlier that has not left. Returns its ticket (never 0), or 0
  // once Shutdown() was called: the write must not go ahead.
  uint64_t Admit(const void* target, uint64_t offset, uint64_t length) MF_EXCLUDES(mu_);
  // The write with `ticket` completed (or failed) at the Remote.
  void Leave(uint64_t ticket) MF_EXCLUDES(mu_);
  // Wakes every waiting Admit, which returns 0, as do later ones.
  void Shutdown() MF_EXCLUDES(mu_);

  size_t in_flight() const MF_EXCLUDES(mu_);
  uint64_t waits() const MF_EXCLUDES(mu_);  // Admits that had to wait

 private:
  struct Entry {
    const void* target;
    uint64_t offset;
    uint64_t end;
    uint64_t ticket;
  };
  bool OverlapsLocked(const void* target, uint64_t offset, uint64_t end) const MF_REQUIRES(mu_);

  mutable Mutex mu_;
  std::condition_variable_any cv_;
  std::vector<Entry> entries_ MF_GUARDED_BY(mu_);
  uint64_t next_ticket_ MF_GUARDED_BY(mu_) = 1;
  uint64_t waits_ MF_GUARDED_BY(mu_) = 0;
  bool shutdown_ MF_GUARDED_BY(mu_) = false;
};

}  // namespace mf::nbd
