// fabric::ChunkTransfer — one chunk moving between a staging slot and a Remote, split into
// requests of at most `piece` bytes; the last request to complete finishes it. The shared
// bookkeeping of fabric::Mount's and uffd::Mapping's staging slots.
//
// Thread-safety: Submit is called by the thread that owns the slot; CompleteOne by the
// Remote's completion threads, concurrently. Only the call to CompleteOne that returns true
// may reuse the slot.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>

#include "fabric/remote.h"
#include "fabric/status.h"

namespace mf::fabric {

class ChunkTransfer {
 public:
  // A request's cookie names its staging slot and its piece of the chunk.
  static constexpr uint64_t Cookie(size_t slot, size_t piece) {
    return (uint64_t{slot} << kPieceBits) | piece;
  }
  static constexpr size_t SlotOf(uint64_t cookie) { return static_cast<size_t>(cookie >> kPieceBits); }
  static constexpr size_t PieceOf(uint64_t cookie) { return static_cast<size_t>(cookie & kPieceMask); }

  // Moves `staged` from (kRead) or to (kWrite) the region at `offset`, in requests of
  // `piece` bytes (the last may be shorter); request i completes on `done` with
  // Cookie(slot, i). The transfer may finish before Submit returns.
  void Submit(Remote& remote, IoKind kind, uint64_t offset, std::span<std::byte> staged, size_t piece,
              const Buffer& buffer, IoCallback* done, size_t slot);
  // Expects `requests` completions from now on (Submit calls it): a caller that fails a
  // transfer before submitting it calls Expect(1) and completes it once with the error.
  void Expect(uint32_t requests);
  // Records one request's completion; true when it was the last, and then *result is the
  // transfer's first error, or OK.
  bool CompleteOne(const Status& status, Status* result);

 private:
  static constexpr unsigned kPieceBits = 32;
  static constexpr uint64_t kPieceMask = (uint64_t{1} << kPieceBits) - 1;

  std::atomic<uint32_t> remaining_{0};
  std::atomic<bool> failed_{false};
  Status error_;  // written once, by whoever set failed_
};

}  // namespace mf::fabric
