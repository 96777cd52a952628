#include "fabric/mount_remote.h"

namespace mf::fabric {

Result<std::unique_ptr<MountRemote>> MountRemote::Create(std::unique_ptr<Remote> remote,
                                                         MountOptions options) {
  if (remote == nullptr) return InvalidArgument("MountRemote needs a Remote to mount");
  MF_ASSIGN_OR_RETURN(std::unique_ptr<Mount> mount, Mount::Create(*remote, std::move(options)));
  return std::unique_ptr<MountRemote>(new MountRemote(std::move(remote), std::move(mount)));
}

MountRemote::MountRemote(std::unique_ptr<Remote> remote, std::unique_ptr<Mount> mount)
    : remote_(std::move(remote)),
      mount_(std::move(mount)),
      transport_("mount+" + std::string(remote_->transport())),
      queue_(kMountRemoteQueueDepth) {
  workers_.reserve(kMountRemoteWorkers);
  for (size_t i = 0; i < kMountRemoteWorkers; ++i) workers_.emplace_back([this] { Worker(); });
}

MountRemote::~MountRemote() {
  (void)Close();
}

Result<Buffer> MountRemote::AllocateBuffer(size_t size) {
  MF_ASSIGN_OR_RETURN(MappedMemory memory, MappedMemory::Anonymous(size));
  return Buffer(std::move(memory), nullptr);
}

bool MountRemote::AllLocal(uint64_t offset, uint64_t length) const {
  const size_t chunk = mount_->chunk_size();
  for (uint64_t c = offset / chunk; c <= (offset + length - 1) / chunk; ++c) {
    if (!mount_->IsLocal(c * chunk)) return false;
  }
  return true;
}

Status MountRemote::Serve(const IoRequest& r) {
  if (r.kind == IoKind::kRead) return mount_->Read(r.offset, r.data);
  return mount_->Write(r.offset, r.data);
}

bool MountRemote::BeginUse() {
  // seq_cst on both sides: either Close() sees this use, or this sees closing_.
  users_.fetch_add(1, std::memory_order_seq_cst);
  if (!closing_.load(std::memory_order_seq_cst)) return true;
  EndUse();
  return false;
}

void MountRemote::EndUse() {
  if (users_.fetch_sub(1, std::memory_order_seq_cst) == 1 && closing_.load(std::memory_order_seq_cst)) {
    MutexLock lock(mu_);  // Close() is either before its check or inside wait()
    idle_cv_.notify_all();
  }
}

void MountRemote::Submit(std::span<const IoRequest> requests) {
  for (const IoRequest& r : requests) {
    Status invalid = ValidateRequest(r, *this);
    if (!invalid.ok()) {
      r.callback->OnIoComplete(r.cookie, invalid);
      continue;
    }
    if (!BeginUse()) {
      r.callback->OnIoComplete(r.cookie, Status(Code::kAborted, "mount remote is closed"));
      continue;
    }
    if (AllLocal(r.offset, r.data.size())) {
      const Status status = Serve(r);
      EndUse();
      r.callback->OnIoComplete(r.cookie, status);
      continue;
    }
    EndUse();
    if (!Enqueue(r)) r.callback->OnIoComplete(r.cookie, Status(Code::kAborted, "mount remote is closed"));
  }
}

bool MountRemote::Enqueue(const IoRequest& r) {
  {
    MutexLock lock(mu_);
    space_cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return closed_ || count_ < queue_.size(); });
    if (closed_) return false;
    queue_[(head_ + count_) % queue_.size()] = r;
    ++count_;
  }
  work_cv_.notify_one();
  return true;
}

void MountRemote::Worker() {
  for (;;) {
    IoRequest r;
    {
      MutexLock lock(mu_);
      work_cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return closed_ || count_ > 0; });
      if (count_ == 0) return;  // closed: Close() took what was queued
      r = queue_[head_];
      head_ = (head_ + 1) % queue_.size();
      --count_;
    }
    space_cv_.notify_one();
    const Status status = Serve(r);
    r.callback->OnIoComplete(r.cookie, status);
  }
}

Status MountRemote::Flush() {
  if (!BeginUse()) return Status(Code::kAborted, "mount remote is closed");
  Status synced = mount_->Sync();
  EndUse();
  return synced;
}

Status MountRemote::Close() {
  std::vector<IoRequest> aborted;
  {
    MutexLock lock(mu_);
    if (closed_) return Status::Ok();
    closed_ = true;
    closing_.store(true, std::memory_order_seq_cst);
    aborted.reserve(count_);
    for (; count_ > 0; --count_, head_ = (head_ + 1) % queue_.size()) aborted.push_back(queue_[head_]);
  }
  work_cv_.notify_all();
  space_cv_.notify_all();
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
  for (const IoRequest& r : aborted)
    r.callback->OnIoComplete(r.cookie, Status(Code::kAborted, "mount remote closed"));
  {
    MutexLock lock(mu_);
    idle_cv_.wait(mu_, [this] { return users_.load(std::memory_order_seq_cst) == 0; });
  }
  Status result = mount_->Close();
  Status closed = remote_->Close();
  return result.ok() ? closed : result;
}

}  // namespace mf::fabric
