#include "fabric/chunk_transfer.h"

#include <algorithm>

namespace mf::fabric {
namespace {

// Requests built on the stack per Remote::Submit call.
constexpr size_t kRequestsPerSubmit = 64;

}  // namespace

void ChunkTransfer::Expect(uint32_t requests) {
  failed_.store(false, std::memory_order_relaxed);
  error_ = Status::Ok();
  remaining_.store(requests, std::memory_order_release);
}

void ChunkTransfer::Submit(Remote& remote, IoKind kind, uint64_t offset, std::span<std::byte> staged,
                           size_t piece, const Buffer& buffer, IoCallback* done, size_t slot) {
  const size_t len = staged.size();
  piece = std::min(len, piece);
  const size_t pieces = (len + piece - 1) / piece;
  Expect(static_cast<uint32_t>(pieces));
  // Nothing of *this may be touched from here on: the last request can complete inline.
  IoRequest requests[kRequestsPerSubmit];
  for (size_t i = 0; i < pieces;) {
    size_t n = 0;
    for (; n < kRequestsPerSubmit && i < pieces; ++n, ++i) {
      const size_t at = i * piece;
      requests[n] = IoRequest{kind,    offset + at, staged.subspan(at, std::min(piece, len - at)),
                              &buffer, done,        Cookie(slot, i)};
    }
    remote.Submit({requests, n});
  }
}

bool ChunkTransfer::CompleteOne(const Status& status, Status* result) {
  if (!status.ok() && !failed_.exchange(true, std::memory_order_acq_rel)) error_ = status;
  if (remaining_.fetch_sub(1, std::memory_order_acq_rel) != 1) return false;
  *result = failed_.load(std::memory_order_acquire) ? error_ : Status::Ok();
  return true;
}

}  // namespace mf::fabric
