#include "transports/rdma/verbs.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstring>

namespace mf::rdma {

void EventChannelDeleter::operator()(rdma_event_channel* c) const {
  rdma_destroy_event_channel(c);
}

void ProtectionDomainDeleter::operator()(ibv_pd* pd) const {
  if (int err = ibv_dealloc_pd(pd); err != 0) spdlog::error("rdma: ibv_dealloc_pd: {}", std::strerror(err));
}

void MemoryRegistrationDeleter::operator()(ibv_mr* mr) const {
  if (int err = ibv_dereg_mr(mr); err != 0) spdlog::error("rdma: ibv_dereg_mr: {}", std::strerror(err));
}

void CompletionChannelDeleter::operator()(ibv_comp_channel* c) const {
  if (int err = ibv_destroy_comp_channel(c); err != 0) {
    spdlog::error("rdma: ibv_destroy_comp_channel: {}", std::strerror(err));
  }
}

void CompletionQueueDeleter::operator()(ibv_cq* cq) const {
  if (int err = ibv_destroy_cq(cq); err != 0) spdlog::error("rdma: ibv_destroy_cq: {}", std::strerror(err));
}

CmId& CmId::operator=(CmId&& other) noexcept {
  if (this != &other) {
    Reset();
    id_ = other.id_;
    other.id_ = nullptr;
  }
  return *this;
}

void CmId::DestroyQp() {
  if (id_ != nullptr && id_->qp != nullptr) rdma_destroy_qp(id_);
}

void CmId::Reset() {
  if (id_ == nullptr) return;
  DestroyQp();
  if (rdma_destroy_id(id_) != 0) spdlog::error("rdma: rdma_destroy_id: {}", std::strerror(errno));
  id_ = nullptr;
}

bool HasRdmaDevice() {
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) return false;
  ibv_free_device_list(list);
  return n > 0;
}

Result<EventChannel> MakeEventChannel() {
  EventChannel channel(rdma_create_event_channel());
  if (!channel) {
    const int err = errno;
    if (err == ENODEV || err == ENOENT) {
      return Unsupported("no RDMA connection manager (/dev/infiniband/rdma_cm): is rdma_ucm loaded?");
    }
    return Status::FromErrno(err, "rdma_create_event_channel");
  }
  const int flags = ::fcntl(channel->fd, F_GETFL);
  if (flags < 0 || ::fcntl(channel->fd, F_SETFL, flags | O_NONBLOCK) != 0) {
    return Status::FromErrno(errno, "fcntl(rdma event channel)");
  }
  return channel;
}

Result<CmEvent> PollCmEvent(rdma_event_channel* channel) {
  rdma_cm_event* event = nullptr;
  if (rdma_get_cm_event(channel, &event) != 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return CmEvent();
    return Status::FromErrno(errno, "rdma_get_cm_event");
  }
  return CmEvent(event);
}

Result<CmEvent> WaitCmEvent(rdma_event_channel* channel, Clock::time_point deadline) {
  for (;;) {
    MF_ASSIGN_OR_RETURN(CmEvent event, PollCmEvent(channel));
    if (event) return event;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return Status(Code::kTimeout, "no answer from the RDMA connection manager");
    pollfd p{channel->fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), INT32_MAX))) < 0 && errno != EINTR) {
      return Status::FromErrno(errno, "poll(rdma event channel)");
    }
  }
}

std::string_view CmEventName(rdma_cm_event_type type) {
  return rdma_event_str(type);
}

Status CompletionStatus(const ibv_wc& wc) {
  const std::string what = fmt::format(
      "RDMA {} failed: {}", wc.opcode == IBV_WC_RDMA_WRITE ? "WRITE" : "READ", ibv_wc_status_str(wc.status));
  switch (wc.status) {
    case IBV_WC_SUCCESS: return Status::Ok();
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR: return Status(Code::kTimeout, what + " (the server does not answer)");
    case IBV_WC_REM_ACCESS_ERR:
      return Status(Code::kPermissionDenied, what + " (the server revoked or never granted this access)");
    case IBV_WC_WR_FLUSH_ERR: return Status(Code::kAborted, what);
    default: return Status(Code::kIoError, what);
  }
}

Result<MemoryRegistration> Register(ibv_pd* pd, void* data, size_t size, int access) {
  MemoryRegistration mr(ibv_reg_mr(pd, data, size, access));
  if (!mr) {
    const int err = errno;
    rlimit limit{};
    ::getrlimit(RLIMIT_MEMLOCK, &limit);
    std::string hint;
    if (err == ENOMEM || err == EPERM) {
      hint = limit.rlim_cur == RLIM_INFINITY
                 ? std::string()
                 : fmt::format(" (RLIMIT_MEMLOCK is {} bytes; raise it with `ulimit -l unlimited`)",
                               limit.rlim_cur);
    }
    return Status::FromErrno(err, fmt::format("registering {} bytes for RDMA{}", size, hint));
  }
  return mr;
}

Status ResolveSockaddr(const std::string& host, uint16_t port, sockaddr_storage* out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res); rc != 0) {
    return Status(Code::kNotFound, fmt::format("cannot resolve '{}': {}", host, ::gai_strerror(rc)));
  }
  std::memset(out, 0, sizeof(*out));
  std::memcpy(out, res->ai_addr, std::min<size_t>(res->ai_addrlen, sizeof(*out)));
  ::freeaddrinfo(res);
  return Status::Ok();
}

}  // namespace mf::rdma
