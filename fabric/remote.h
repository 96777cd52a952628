// fabric::Remote — the seam of memfabric: one client's handle on one remote region.
//
// Everything above this header (mounts, migration, the uffd and NBD views) works on any
// transport that implements it: transports/tcp, transports/rdma, and MemoryRemote (an
// in-memory stand-in for unit tests of the upper layers).
//
// I/O is asynchronous and batched. The caller obtains Buffers from the Remote (RDMA needs
// registered memory), builds IoRequests that point into them and hands a batch to
// Submit(). Each request completes exactly once, through its IoCallback, with its own
// Status. IoBatch is a ready-made callback that lets a thread wait for a batch.
//
// Thread-safety: all methods of a Remote may be called from any thread concurrently,
// except that Close() must not race with the destructor. Callbacks run on a transport
// thread, or inline on the submitting thread when a request fails validation; they must
// not block and must not call Close().
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "fabric/os.h"
#include "fabric/status.h"
#include "fabric/thread_annotations.h"

namespace mf::fabric {

// How a region's memory is provided on the server.
enum class BackingKind : uint8_t { kAnonymous = 0, kMemfd = 1, kHugetlb = 2, kFile = 3 };
std::string_view BackingName(BackingKind kind);

// What a client may learn about a region once authenticated.
struct RegionInfo {
  std::string name;
  uint64_t size = 0;
  // Changes whenever a region of this name is (re)created; a client holding a stale
  // generation knows its view is of a deleted region.
  uint64_t generation = 0;
  BackingKind backing = BackingKind::kAnonymous;
  bool has_writer = false;  // someone holds the write lease
};

// Transport-specific registration of a Buffer (e.g. an RDMA MR). Owned by the Buffer.
class BufferRegistration {
 public:
  virtual ~BufferRegistration() = default;
};

// Page-aligned memory a transport can move data in and out of. Move-only; obtained from
// Remote::AllocateBuffer and usable only with the Remote that made it.
class Buffer final {
 public:
  Buffer() = default;
  // Takes ownership of memory and registration (which may be null).
  Buffer(MappedMemory memory, std::unique_ptr<BufferRegistration> registration)
      : memory_(std::move(memory)), registration_(std::move(registration)) {}

  std::byte* data() const { return memory_.data(); }
  size_t size() const { return memory_.size(); }
  std::span<std::byte> span() const { return memory_.span(); }
  BufferRegistration* registration() const { return registration_.get(); }

 private:
  MappedMemory memory_;  // declared first: the registration refers to it and dies first
  std::unique_ptr<BufferRegistration> registration_;
};

enum class IoKind : uint8_t { kRead, kWrite };

// Receives completions. OnIoComplete is called exactly once per submitted request.
class IoCallback {
 public:
  virtual void OnIoComplete(uint64_t cookie, const Status& status) = 0;

 protected:
  ~IoCallback() = default;
};

struct IoRequest {
  IoKind kind = IoKind::kRead;
  uint64_t offset = 0;        // byte offset in the region
  std::span<std::byte> data;  // lies inside *buffer; its size is the transfer length
  const Buffer* buffer = nullptr;
  IoCallback* callback = nullptr;
  uint64_t cookie = 0;  // handed back to the callback
};

class Remote {
 public:
  virtual ~Remote() = default;

  virtual const RegionInfo& info() const = 0;
  uint64_t size() const { return info().size; }
  // True when this handle holds the region's write lease.
  virtual bool writable() const = 0;
  // "tcp", "tls", "rdma" or "memory": what actually carries the data.
  virtual std::string_view transport() const = 0;
  // Largest transfer one request may carry; larger ones are split by the caller or by
  // the helpers below.
  virtual size_t max_transfer() const = 0;

  // Memory usable in IoRequests of this Remote. size is rounded up to whole pages.
  virtual Result<Buffer> AllocateBuffer(size_t size) = 0;

  // Starts every request. Each completes exactly once through its callback: later from a
  // transport thread, or inline when it is invalid (kOutOfRange past the region's end or
  // on offset+length overflow, kPermissionDenied for a write without the lease,
  // kInvalidArgument for a length of 0, above max_transfer(), or outside its buffer) or
  // the Remote is closed (kAborted). May block while the transport's queue is full.
  virtual void Submit(std::span<const IoRequest> requests) = 0;

  // Returns once everything written before the call is durable on the server's side
  // (msync for file-backed regions). Error when the server could not make it so.
  virtual Status Flush() = 0;

  // Completes every outstanding request (kAborted where not already done), releases the
  // write lease and the transport's resources. Idempotent.
  virtual Status Close() = 0;

  // Polling on the caller's thread, for callers that would rather spin than sleep while
  // they wait (lowest latency, as perftest measures): Poll() runs the callbacks of the
  // completions that are ready, on the calling thread, and returns how many ran. Wrap a
  // spin in SetCallerPolling(true/false) so the transport's own completion thread stays
  // asleep meanwhile. Transports whose completions arrive only on their own threads
  // (can_poll() false) return 0 and ignore SetCallerPolling.
  virtual bool can_poll() const { return false; }
  virtual size_t Poll() { return 0; }
  virtual void SetCallerPolling(bool /*active*/) {}
};

// An IoCallback that counts down a batch and lets one thread wait for it. Keeps the first
// error. Reusable after Wait() returns by calling Reset().
class IoBatch final : public IoCallback {
 public:
  explicit IoBatch(size_t expected = 0) : pending_(expected) {}
  void Reset(size_t expected) MF_EXCLUDES(mu_);
  void OnIoComplete(uint64_t cookie, const Status& status) override MF_EXCLUDES(mu_);
  // Blocks until every request of the batch completed; returns the first error or OK.
  Status Wait() MF_EXCLUDES(mu_);
  // True when every request of the batch completed (does not block).
  bool done() MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return pending_ == 0;
  }

 private:
  Mutex mu_;
  std::condition_variable_any cv_;
  size_t pending_ MF_GUARDED_BY(mu_);
  Status first_error_ MF_GUARDED_BY(mu_);
};

// Synchronous helpers for callers whose memory is not a Buffer (CLI, tests): they copy
// through a bounce buffer of the Remote, split at max_transfer() and keep up to
// `depth` requests in flight.
Status ReadAt(Remote& remote, uint64_t offset, std::span<std::byte> out, size_t depth = 8);
Status WriteAt(Remote& remote, uint64_t offset, std::span<const std::byte> in, size_t depth = 8);

// Checks offset/length against a region of `size` bytes, overflow-safe.
Status CheckRange(uint64_t offset, uint64_t length, uint64_t size);

// The checks every transport's Submit makes before starting a request (see Submit):
// length 0 or above max_transfer(), data outside its buffer, CheckRange, write without
// the lease. Transports call it so that all of them fail the same way.
Status ValidateRequest(const IoRequest& request, const Remote& remote);

}  // namespace mf::fabric
