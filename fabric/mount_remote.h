// fabric::MountRemote — a Remote whose I/O is served by a fabric::Mount, so that the views
// (uffd::Mapping, nbd::Export, nbd::Device) sit on a managed mount simply by being given
// one: reads come from the Mount's local copy (pulling the chunks that are not local yet,
// ahead of the background pull), writes land in the local copy and mark it dirty, and the
// Mount pushes them back on its interval and on Flush().
//
// It owns both the Remote it mounts and the Mount (the Mount is destroyed first). A
// request whose bytes are all local completes inline on the submitting thread, with a
// memcpy; the others go through a bounded queue to a small fixed pool of workers that call
// Mount::Read/Write (which wait for pulls) and then the callback. Nothing is allocated per
// request.
//
// Views over a MountRemote should not prefetch themselves (uffd::MappingOptions::prefetch
// off): the Mount already pulls every chunk in the background, and a view's prefetch would
// only turn those pulls into demand pulls. A uffd view costs one more copy per chunk
// (Mount local copy -> the Mapping's staging Buffer -> UFFDIO_COPY).
//
// Thread-safety: as every Remote: all methods may be called from any thread
// concurrently, except that Close() must not race with the destructor. Callbacks run on a
// worker thread, or inline on the submitting thread (invalid requests, requests whose bytes
// are all local, and requests after Close()); they never run with a lock of MountRemote
// held. Close() fails queued requests with kAborted and waits for those in the workers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fabric/mount.h"
#include "fabric/remote.h"
#include "fabric/thread_annotations.h"

namespace mf::fabric {

constexpr size_t kMountRemoteMaxTransfer = 1u << 20;
constexpr size_t kMountRemoteWorkers = 4;       // requests waiting for pulls at once
constexpr size_t kMountRemoteQueueDepth = 256;  // queued requests; then Submit blocks
static_assert(kMountRemoteMaxTransfer % kPageSize == 0 && kMountRemoteMaxTransfer <= (32u << 20));
static_assert(kMountRemoteWorkers >= 1 && kMountRemoteQueueDepth >= kMountRemoteWorkers);

class MountRemote final : public Remote {
 public:
  // Mounts `remote` (taking ownership) with `options` and starts the workers. Errors as
  // Mount::Create; `remote` is destroyed then.
  static Result<std::unique_ptr<MountRemote>> Create(std::unique_ptr<Remote> remote, MountOptions options);
  ~MountRemote() override;  // Close()
  MountRemote(const MountRemote&) = delete;
  MountRemote& operator=(const MountRemote&) = delete;

  const RegionInfo& info() const override { return remote_->info(); }
  bool writable() const override { return !mount_->read_only(); }
  // "mount+" and the mounted Remote's transport, e.g. "mount+tcp".
  std::string_view transport() const override { return transport_; }
  size_t max_transfer() const override { return kMountRemoteMaxTransfer; }
  // Plain anonymous memory: data is copied to and from the Mount's local copy.
  Result<Buffer> AllocateBuffer(size_t size) override;
  // Validates each request (ValidateRequest); serves it inline when its bytes are all
  // local, else queues it for a worker (blocking while the queue is full). A read fails
  // with the pull's error when a chunk cannot be pulled; kAborted after Close().
  void Submit(std::span<const IoRequest> requests) override MF_EXCLUDES(mu_);
  // Mount::Sync(): pushes every dirty chunk and flushes the mounted Remote. kAborted after
  // Close().
  Status Flush() override MF_EXCLUDES(mu_);
  // Fails queued requests with kAborted, waits for the workers, closes the Mount (a final
  // sync when writable) and then the mounted Remote. Idempotent; returns the first error.
  Status Close() override MF_EXCLUDES(mu_);

  // For progress (stats()) and the Mount's other controls; valid until destruction.
  Mount& mount() const { return *mount_; }
  // The mounted Remote.
  Remote& remote() const { return *remote_; }

 private:
  MountRemote(std::unique_ptr<Remote> remote, std::unique_ptr<Mount> mount);
  bool AllLocal(uint64_t offset, uint64_t length) const;
  // Runs the request against the Mount; the callback is the caller's to run.
  Status Serve(const IoRequest& r);
  // Brackets a use of the Mount from outside the workers (an inline request, Flush), so
  // that Close() waits for it before closing the Mount. BeginUse is false once closing.
  bool BeginUse();
  void EndUse() MF_EXCLUDES(mu_);
  // Queues r for a worker; false when closed.
  bool Enqueue(const IoRequest& r) MF_EXCLUDES(mu_);
  void Worker() MF_EXCLUDES(mu_);

  // Declared in creation order: the Mount refers to the Remote and dies first.
  std::unique_ptr<Remote> remote_;
  std::unique_ptr<Mount> mount_;
  const std::string transport_;

  Mutex mu_;
  std::condition_variable_any work_cv_;              // a request queued, or closed_
  std::condition_variable_any space_cv_;             // room in the queue, or closed_
  std::vector<IoRequest> queue_ MF_GUARDED_BY(mu_);  // ring of kMountRemoteQueueDepth
  size_t head_ MF_GUARDED_BY(mu_) = 0;
  size_t count_ MF_GUARDED_BY(mu_) = 0;
  bool closed_ MF_GUARDED_BY(mu_) = false;
  std::condition_variable_any idle_cv_;  // users_ reached 0 while closing_
  std::atomic<bool> closing_{false};
  std::atomic<size_t> users_{0};

  std::vector<std::thread> workers_;  // last: started after everything they use exists
};

}  // namespace mf::fabric
