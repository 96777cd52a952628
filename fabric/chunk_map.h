// fabric::ChunkMap — per-chunk state of a locally mapped or cached region, lock-free.
//
// Each chunk is in one of: kRemote (only the server has it), kInFlight (a pull is
// running), kInFlightDropped (a pull is running but the local pages were dropped
// meanwhile, so its result must not count), kLocal (the local copy is valid) or kFailed
// (a pull failed for good). A
// separate dirty bit says the local copy has writes the server does not hold yet.
// Transitions are compare-and-swap, so exactly one caller wins a claim.
//
// Thread-safety: every method is thread-safe and lock-free.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

namespace mf::fabric {

enum class ChunkState : uint8_t { kRemote = 0, kInFlight = 1, kLocal = 2, kFailed = 3, kInFlightDropped = 4 };

class ChunkMap {
 public:
  explicit ChunkMap(uint64_t chunks)
      : chunks_(chunks), state_(new std::atomic<uint8_t>[chunks]), dirty_(new std::atomic<bool>[chunks]) {
    for (uint64_t i = 0; i < chunks; ++i) {
      state_[i].store(static_cast<uint8_t>(ChunkState::kRemote), std::memory_order_relaxed);
      dirty_[i].store(false, std::memory_order_relaxed);
    }
  }

  uint64_t size() const { return chunks_; }
  ChunkState state(uint64_t i) const {
    return static_cast<ChunkState>(state_[i].load(std::memory_order_acquire));
  }
  // kRemote -> kInFlight; true for exactly one caller.
  bool TryClaim(uint64_t i) { return Transition(i, ChunkState::kRemote, ChunkState::kInFlight); }
  bool Transition(uint64_t i, ChunkState from, ChunkState to) {
    auto expected = static_cast<uint8_t>(from);
    return state_[i].compare_exchange_strong(expected, static_cast<uint8_t>(to), std::memory_order_acq_rel);
  }
  // The pull of chunk i finished and installed it: kInFlight -> kLocal. False when the
  // local pages were dropped meanwhile (kInFlightDropped); the chunk is then kRemote again.
  bool FinishPull(uint64_t i) {
    if (Transition(i, ChunkState::kInFlight, ChunkState::kLocal)) {
      local_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    Transition(i, ChunkState::kInFlightDropped, ChunkState::kRemote);
    return false;
  }
  // The local pages of chunk i went away: kLocal -> kRemote, or a running pull is marked
  // so that its result does not count. A pull that finishes between the two attempts
  // (kInFlight -> kLocal) is caught by the next round: the chunk ends kRemote either way.
  void Drop(uint64_t i) {
    for (;;) {
      if (Transition(i, ChunkState::kLocal, ChunkState::kRemote)) {
        local_.fetch_sub(1, std::memory_order_relaxed);
        return;
      }
      if (Transition(i, ChunkState::kInFlight, ChunkState::kInFlightDropped)) return;
      const ChunkState now = state(i);
      if (now != ChunkState::kLocal && now != ChunkState::kInFlight) return;  // remote, failed, dropped
    }
  }
  void Set(uint64_t i, ChunkState s) {
    if (s == ChunkState::kLocal && state(i) != ChunkState::kLocal)
      local_.fetch_add(1, std::memory_order_relaxed);
    if (s != ChunkState::kLocal && state(i) == ChunkState::kLocal)
      local_.fetch_sub(1, std::memory_order_relaxed);
    state_[i].store(static_cast<uint8_t>(s), std::memory_order_release);
  }

  bool dirty(uint64_t i) const { return dirty_[i].load(std::memory_order_acquire); }
  // Returns the previous value.
  bool SetDirty(uint64_t i, bool d) {
    bool was = dirty_[i].exchange(d, std::memory_order_acq_rel);
    if (d && !was) dirty_count_.fetch_add(1, std::memory_order_relaxed);
    if (!d && was) dirty_count_.fetch_sub(1, std::memory_order_relaxed);
    return was;
  }

  uint64_t local_count() const { return local_.load(std::memory_order_relaxed); }
  uint64_t dirty_count() const { return dirty_count_.load(std::memory_order_relaxed); }

 private:
  const uint64_t chunks_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
  std::unique_ptr<std::atomic<bool>[]> dirty_;
  std::atomic<uint64_t> local_{0};
  std::atomic<uint64_t> dirty_count_{0};
};

}  // namespace mf::fabric
