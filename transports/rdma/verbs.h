// RAII owners and small helpers for rdma-core objects (libibverbs, librdmacm), so that
// every verbs object of the RDMA transport has exactly one owner and is released in the
// right order, also on error paths. The teardown order the transport relies on
// (docs/rdma.md): queue pairs, then connection ids, then memory registrations, then
// protection domains, then completion queues and channels, then event channels.
//
// Thread-safety: the owners are not synchronized; helpers are thread-safe.
#pragma once

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "fabric/status.h"

namespace mf::rdma {

using Clock = std::chrono::steady_clock;

struct EventChannelDeleter {
  void operator()(rdma_event_channel* c) const;
};
using EventChannel = std::unique_ptr<rdma_event_channel, EventChannelDeleter>;

struct ProtectionDomainDeleter {
  void operator()(ibv_pd* pd) const;
};
using ProtectionDomain = std::unique_ptr<ibv_pd, ProtectionDomainDeleter>;

struct MemoryRegistrationDeleter {
  void operator()(ibv_mr* mr) const;
};
using MemoryRegistration = std::unique_ptr<ibv_mr, MemoryRegistrationDeleter>;

struct CompletionChannelDeleter {
  void operator()(ibv_comp_channel* c) const;
};
using CompletionChannel = std::unique_ptr<ibv_comp_channel, CompletionChannelDeleter>;

struct CompletionQueueDeleter {
  void operator()(ibv_cq* cq) const;
};
using CompletionQueue = std::unique_ptr<ibv_cq, CompletionQueueDeleter>;

// An acknowledged-on-destruction connection-manager event.
struct CmEventDeleter {
  void operator()(rdma_cm_event* e) const { rdma_ack_cm_event(e); }
};
using CmEvent = std::unique_ptr<rdma_cm_event, CmEventDeleter>;

// An rdma_cm id and the queue pair made on it: destroys the QP first, then the id.
class CmId final {
 public:
  CmId() = default;
  explicit CmId(rdma_cm_id* id) : id_(id) {}
  ~CmId() { Reset(); }
  CmId(CmId&& other) noexcept : id_(other.id_) { other.id_ = nullptr; }
  CmId& operator=(CmId&& other) noexcept;
  CmId(const CmId&) = delete;
  CmId& operator=(const CmId&) = delete;

  rdma_cm_id* get() const { return id_; }
  rdma_cm_id* operator->() const { return id_; }
  explicit operator bool() const { return id_ != nullptr; }
  void DestroyQp();
  void Reset();

 private:
  rdma_cm_id* id_ = nullptr;
};

// True when the system has at least one RDMA device.
bool HasRdmaDevice();

// Makes an event channel whose fd is non-blocking (WaitCmEvent polls it).
Result<EventChannel> MakeEventChannel();

// The next event of `channel`, waiting until deadline (kTimeout after).
Result<CmEvent> WaitCmEvent(rdma_event_channel* channel, Clock::time_point deadline);
// The next event if one is ready; null otherwise.
Result<CmEvent> PollCmEvent(rdma_event_channel* channel);

// "ADDR_RESOLVED"-style names, for logs and errors.
std::string_view CmEventName(rdma_cm_event_type type);

// A failed work completion as a Status: kTimeout for retry-exceeded (the peer is gone),
// kPermissionDenied for a remote access error (bad or revoked rkey, or a write without
// access), kAborted for a flushed request, kIoError otherwise.
Status CompletionStatus(const ibv_wc& wc);

// Registers [data, data+size) on pd with `access`; a clear error naming the size and
// RLIMIT_MEMLOCK when the kernel refuses.
Result<MemoryRegistration> Register(ibv_pd* pd, void* data, size_t size, int access);

// Parses host:port into a sockaddr_storage for rdma_cm (numeric or resolvable host).
Status ResolveSockaddr(const std::string& host, uint16_t port, sockaddr_storage* out);

}  // namespace mf::rdma
