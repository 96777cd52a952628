#include "fabric/remote.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace mf::fabric {

Status CheckRange(uint64_t offset, uint64_t length, uint64_t size) {
  if (offset > size || length > size - offset) {
    return OutOfRange("range [" + std::to_string(offset) + ", +" + std::to_string(length) +
                      ") is outside the region of " + std::to_string(size) + " bytes");
  }
  return Status::Ok();
}

Status ValidateRequest(const IoRequest& r, const Remote& remote) {
  if (r.data.empty()) return InvalidArgument("a request of 0 bytes");
  if (r.data.size() > remote.max_transfer()) {
    return InvalidArgument("a request of " + std::to_string(r.data.size()) +
                           " bytes exceeds the transport's limit of " +
                           std::to_string(remote.max_transfer()));
  }
  if (r.buffer == nullptr || r.data.data() < r.buffer->data() ||
      r.data.data() + r.data.size() > r.buffer->data() + r.buffer->size()) {
    return InvalidArgument("request data does not lie inside a Buffer of this Remote");
  }
  MF_RETURN_IF_ERROR(CheckRange(r.offset, r.data.size(), remote.size()));
  if (r.kind == IoKind::kWrite && !remote.writable()) {
    return Status(Code::kPermissionDenied, "region '" + remote.info().name + "' was opened read-only");
  }
  return Status::Ok();
}

void IoBatch::Reset(size_t expected) {
  MutexLock lock(mu_);
  pending_ = expected;
  first_error_ = Status::Ok();
}

void IoBatch::OnIoComplete(uint64_t /*cookie*/, const Status& status) {
  MutexLock lock(mu_);
  if (!status.ok() && first_error_.ok()) first_error_ = status;
  if (pending_ > 0 && --pending_ == 0) cv_.notify_all();
}

Status IoBatch::Wait() {
  MutexLock lock(mu_);
  // The analysis cannot see through the wait predicate; mu_ is held when it runs.
  cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return pending_ == 0; });
  return first_error_;
}

namespace {

// Moves [offset, offset+length) between `user` and the region through one bounce buffer
// split into `depth` slots, each slot one request of at most max_transfer() bytes.
Status Transfer(Remote& remote, IoKind kind, uint64_t offset, std::byte* user, size_t length, size_t depth) {
  if (length == 0) return Status::Ok();
  MF_RETURN_IF_ERROR(CheckRange(offset, length, remote.size()));
  depth = std::max<size_t>(1, depth);
  const size_t slot = std::min(remote.max_transfer(), AlignUp(length, kPageSize));
  const size_t slots = std::min(depth, (length + slot - 1) / slot);
  MF_ASSIGN_OR_RETURN(Buffer buffer, remote.AllocateBuffer(slot * slots));
  std::vector<IoRequest> requests;
  IoBatch batch;
  size_t done = 0;
  while (done < length) {
    requests.clear();
    size_t round = 0;
    for (size_t i = 0; i < slots && done + round < length; ++i) {
      const size_t n = std::min(slot, length - done - round);
      std::span<std::byte> data = buffer.span().subspan(i * slot, n);
      if (kind == IoKind::kWrite) std::memcpy(data.data(), user + done + round, n);
      requests.push_back(IoRequest{kind, offset + done + round, data, &buffer, &batch, i});
      round += n;
    }
    batch.Reset(requests.size());
    remote.Submit(requests);
    MF_RETURN_IF_ERROR(batch.Wait());
    if (kind == IoKind::kRead) {
      for (const IoRequest& r : requests)
        std::memcpy(user + (r.offset - offset), r.data.data(), r.data.size());
    }
    done += round;
  }
  return Status::Ok();
}

}  // namespace

Status ReadAt(Remote& remote, uint64_t offset, std::span<std::byte> out, size_t depth) {
  return Transfer(remote, IoKind::kRead, offset, out.data(), out.size(), depth);
}

Status WriteAt(Remote& remote, uint64_t offset, std::span<const std::byte> in, size_t depth) {
  return Transfer(remote, IoKind::kWrite, offset, const_cast<std::byte*>(in.data()), in.size(), depth);
}

}  // namespace mf::fabric
