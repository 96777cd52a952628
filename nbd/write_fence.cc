#include "nbd/write_fence.h"

#include <algorithm>

namespace mf::nbd {

WriteFence::WriteFence(size_t capacity) {
  MutexLock lock(mu_);
  entries_.reserve(capacity);
}

bool WriteFence::OverlapsLocked(const void* target, uint64_t offset, uint64_t end) const {
  return std::any_of(entries_.begin(), entries_.end(),
                     [&](const Entry& e) { return e.target == target && e.offset < end && offset < e.end; });
}

uint64_t WriteFence::Admit(const void* target, uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;  // the Export checked it against the export's size
  MutexLock lock(mu_);
  if (!shutdown_ && OverlapsLocked(target, offset, end)) {
    ++waits_;
    cv_.wait(mu_, [&]() MF_NO_THREAD_SAFETY_ANALYSIS {
      return shutdown_ || !OverlapsLocked(target, offset, end);
    });
  }
  if (shutdown_) return 0;
  const uint64_t ticket = next_ticket_++;
  entries_.push_back({target, offset, end, ticket});
  return ticket;
}

void WriteFence::Leave(uint64_t ticket) {
  MutexLock lock(mu_);
  auto it =
      std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.ticket == ticket; });
  if (it == entries_.end()) return;
  *it = entries_.back();
  entries_.pop_back();
  cv_.notify_all();
}

void WriteFence::Shutdown() {
  MutexLock lock(mu_);
  shutdown_ = true;
  cv_.notify_all();
}

size_t WriteFence::in_flight() const {
  MutexLock lock(mu_);
  return entries_.size();
}

uint64_t WriteFence::waits() const {
  MutexLock lock(mu_);
  return waits_;
}

}  // namespace mf::nbd
