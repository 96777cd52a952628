#include "transports/rdma/rdma_server.h"

#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <set>
#include <shared_mutex>
#include <thread>

#include "fabric/os.h"
#include "fabric/thread_annotations.h"
#include "transports/rdma/rdma_wire.h"
#include "transports/rdma/verbs.h"

namespace mf::rdma {
namespace {

using transports::OpenEntry;
static_assert(std::is_same_v<wire::Token, transports::OpenToken>);

constexpr int kTickMs = 200;  // event-loop wake-up when idle
constexpr int kListenBacklog = 64;
constexpr int kServerCqSize = 16;  // server queue pairs post nothing; the CQ is a formality
constexpr uint8_t kRnrRetryInfinite = 7;

// What one open has on the RDMA device: its own protection domain, the registration of
// the region in it, and the queue pairs connected to it.
struct OpenRdma {
  explicit OpenRdma(std::shared_ptr<OpenEntry> e) : entry(std::move(e)) {}

  // Deregisters the memory and disconnects the queue pairs (their ids are destroyed by
  // the event loop when the disconnect completes). Runs on the thread that ends the open.
  void Revoke() MF_EXCLUDES(mu) {
    MutexLock lock(mu);
    if (revoked) return;
    revoked = true;
    mr.reset();
    for (rdma_cm_id* id : ids) rdma_disconnect(id);
    spdlog::info("rdma server: revoked the registration of '{}' ({} queue pairs)", name, ids.size());
  }

  const std::shared_ptr<OpenEntry> entry;
  std::string name;
  ibv_context* context = nullptr;
  bool writable = false;  // the registration allows remote writes
  Mutex mu;
  ProtectionDomain pd MF_GUARDED_BY(mu);
  MemoryRegistration mr MF_GUARDED_BY(mu);  // after pd: deregistered first
  std::set<rdma_cm_id*> ids MF_GUARDED_BY(mu);
  bool revoked MF_GUARDED_BY(mu) = false;
};

// A connected (or accepting) queue pair of an open.
struct Conn {
  std::shared_ptr<OpenRdma> open;
  CmId id;  // after open: its QP is destroyed before the open's PD
};

}  // namespace

class RdmaServer::Impl {
 public:
  Impl(std::shared_ptr<transports::OpenTable> opens, RdmaListenOptions options)
      : opens_(std::move(opens)), options_(std::move(options)) {}
  ~Impl() { Stop(); }

  Status Init();
  uint16_t port() const { return port_; }
  void Stop() MF_EXCLUDES(stop_mu_);

 private:
  void Run();
  void OnEvent(CmEvent event);
  void OnConnectRequest(rdma_cm_id* id, std::span<const std::byte> private_data, uint8_t initiator_depth);
  Status AcceptConnection(rdma_cm_id* id, std::span<const std::byte> private_data, uint8_t initiator_depth);
  Result<std::shared_ptr<OpenRdma>> StateFor(const std::shared_ptr<OpenEntry>& entry, rdma_cm_id* id);
  Result<ibv_cq*> CqFor(ibv_context* context);
  void DropConn(rdma_cm_id* id, std::string_view why);

  const std::shared_ptr<transports::OpenTable> opens_;
  const RdmaListenOptions options_;
  EventChannel channel_;
  UniqueFd wake_fd_;
  uint16_t port_ = 0;
  // Event thread only (and Stop, after it joined):
  std::map<ibv_context*, CompletionQueue> cqs_;
  std::map<const OpenEntry*, std::weak_ptr<OpenRdma>> states_;
  std::map<rdma_cm_id*, Conn> conns_;  // after cqs_ and states_: destroyed first
  CmId listen_id_;
  std::atomic<bool> stopping_{false};
  Mutex stop_mu_;
  bool stopped_ MF_GUARDED_BY(stop_mu_) = false;
  std::thread thread_;
};

Status RdmaServer::Impl::Init() {
  if (!HasRdmaDevice()) return Unsupported("no RDMA device on this system");
  MF_ASSIGN_OR_RETURN(channel_, MakeEventChannel());
  wake_fd_ = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_) return Status::FromErrno(errno, "eventfd");
  rdma_cm_id* id = nullptr;
  if (rdma_create_id(channel_.get(), &id, nullptr, RDMA_PS_TCP) != 0) {
    return Status::FromErrno(errno, "rdma_create_id");
  }
  listen_id_ = CmId(id);
  sockaddr_storage addr{};
  MF_RETURN_IF_ERROR(ResolveSockaddr(options_.host, options_.port, &addr));
  if (rdma_bind_addr(id, reinterpret_cast<sockaddr*>(&addr)) != 0) {
    return Status::FromErrno(errno, fmt::format("rdma_bind_addr {}:{}", options_.host, options_.port));
  }
  if (rdma_listen(id, kListenBacklog) != 0) return Status::FromErrno(errno, "rdma_listen");
  port_ = ntohs(rdma_get_src_port(id));
  thread_ = std::thread([this] { Run(); });
  spdlog::info("rdma server: listening on {}:{} (rdma_cm)", options_.host, port_);
  return Status::Ok();
}

void RdmaServer::Impl::Stop() {
  MutexLock lock(stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  stopping_ = true;
  if (wake_fd_) {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
  }
  if (thread_.joinable()) thread_.join();
  // Teardown order (docs/rdma.md): queue pairs and ids, then registrations and PDs (with
  // the last Conn of each open), then CQs, the listener and the event channel.
  for (auto& [id, conn] : conns_) rdma_disconnect(id);
  conns_.clear();
  states_.clear();
  cqs_.clear();
  listen_id_.Reset();
  channel_.reset();
  if (port_ != 0) spdlog::info("rdma server: stopped listening on port {}", port_);
}

void RdmaServer::Impl::Run() {
  std::array<pollfd, 2> fds{pollfd{channel_->fd, POLLIN, 0}, pollfd{wake_fd_.get(), POLLIN, 0}};
  while (!stopping_) {
    if (::poll(fds.data(), fds.size(), kTickMs) < 0 && errno != EINTR) {
      spdlog::error("rdma server: poll: {}", std::strerror(errno));
      return;
    }
    for (;;) {
      auto event = PollCmEvent(channel_.get());
      if (!event.ok()) {
        spdlog::error("rdma server: {}", event.status().ToString());
        break;
      }
      if (!*event) break;
      OnEvent(std::move(event).value());
    }
    // Forget opens whose last queue pair went.
    std::erase_if(states_, [](const auto& kv) { return kv.second.expired(); });
  }
}

void RdmaServer::Impl::OnEvent(CmEvent event) {
  const rdma_cm_event_type type = event->event;
  rdma_cm_id* id = event->id;
  if (type == RDMA_CM_EVENT_CONNECT_REQUEST) {
    // Copy what is needed, then acknowledge: destroying an id waits for its events.
    std::array<std::byte, 256> data{};
    const rdma_conn_param& conn = event->param.conn;
    const size_t n = conn.private_data != nullptr ? std::min<size_t>(conn.private_data_len, data.size()) : 0;
    if (n > 0) std::memcpy(data.data(), conn.private_data, n);
    // rdma_cm reports the request from this side's view: the client's initiator depth
    // (the RDMA READs it keeps in flight) arrives as responder_resources.
    const uint8_t initiator_depth = conn.responder_resources;
    event.reset();  // `conn` is gone from here on
    OnConnectRequest(id, std::span(data).first(n), initiator_depth);
    return;
  }
  event.reset();
  switch (type) {
    case RDMA_CM_EVENT_ESTABLISHED:
      if (auto it = conns_.find(id); it != conns_.end()) {
        spdlog::debug("rdma server: queue pair of '{}' established", it->second.open->name);
      }
      break;
    case RDMA_CM_EVENT_DISCONNECTED: DropConn(id, "disconnected"); break;
    case RDMA_CM_EVENT_REJECTED:
    case RDMA_CM_EVENT_UNREACHABLE:
    case RDMA_CM_EVENT_CONNECT_ERROR: DropConn(id, CmEventName(type)); break;
    case RDMA_CM_EVENT_DEVICE_REMOVAL:
      if (id == listen_id_.get()) {
        spdlog::error("rdma server: the RDMA device of the listener was removed; RDMA stops");
        stopping_ = true;
      } else {
        DropConn(id, "device removed");
      }
      break;
    default: spdlog::debug("rdma server: ignoring {}", CmEventName(type)); break;
  }
}

void RdmaServer::Impl::OnConnectRequest(rdma_cm_id* id, std::span<const std::byte> private_data,
                                        uint8_t initiator_depth) {
  Status st = AcceptConnection(id, private_data, initiator_depth);
  if (st.ok()) return;
  spdlog::warn("rdma server: refusing a queue pair: {}", st.ToString());
  auto bytes = wire::EncodeReject(st);
  if (rdma_reject(id, bytes.data(), static_cast<uint8_t>(bytes.size())) != 0) {
    spdlog::warn("rdma server: rdma_reject: {}", std::strerror(errno));
  }
  auto it = conns_.find(id);
  if (it != conns_.end()) {
    DropConn(id, "refused");
  } else {
    CmId owned(id);  // destroys the QP, if one was made, and the id
  }
}

Status RdmaServer::Impl::AcceptConnection(rdma_cm_id* id, std::span<const std::byte> private_data,
                                          uint8_t initiator_depth) {
  MF_ASSIGN_OR_RETURN(wire::ConnectRequest request, wire::DecodeConnectRequest(private_data));
  if (request.version != wire::kVersion) {
    return Unsupported(
        fmt::format("client speaks RDMA version {}, this server {}", request.version, wire::kVersion));
  }
  std::shared_ptr<OpenEntry> entry = opens_->Find(request.token);
  if (!entry || entry->is_revoked()) return NotFound("unknown or expired open token");
  MF_ASSIGN_OR_RETURN(std::shared_ptr<OpenRdma> state, StateFor(entry, id));
  MF_ASSIGN_OR_RETURN(ibv_cq * cq, CqFor(id->verbs));

  ibv_device_attr device{};
  if (ibv_query_device(id->verbs, &device) != 0) return Status::FromErrno(errno, "ibv_query_device");
  MutexLock lock(state->mu);
  if (state->revoked || !state->mr) return NotFound("the open ended");
  ibv_qp_init_attr attr{};
  attr.send_cq = cq;
  attr.recv_cq = cq;
  attr.qp_type = IBV_QPT_RC;
  attr.cap.max_send_wr = 1;
  attr.cap.max_recv_wr = 1;
  attr.cap.max_send_sge = 1;
  attr.cap.max_recv_sge = 1;
  if (rdma_create_qp(id, state->pd.get(), &attr) != 0) return Status::FromErrno(errno, "rdma_create_qp");
  conns_.emplace(id, Conn{state, CmId(id)});

  wire::Accept accept;
  {
    std::shared_lock lease(entry->lease_mu);
    accept.writable = entry->writable;
  }
  accept.writable = accept.writable && state->writable;
  accept.addr = reinterpret_cast<uintptr_t>(entry->data);
  accept.rkey = state->mr->rkey;
  accept.size = entry->size;
  accept.generation = entry->generation;
  auto bytes = wire::EncodeAccept(accept);
  rdma_conn_param param{};
  param.private_data = bytes.data();
  param.private_data_len = static_cast<uint8_t>(bytes.size());
  param.responder_resources =
      static_cast<uint8_t>(std::min<int>(initiator_depth, std::max(device.max_qp_rd_atom, 1)));
  param.initiator_depth = 0;
  param.rnr_retry_count = kRnrRetryInfinite;
  if (rdma_accept(id, &param) != 0) return Status::FromErrno(errno, "rdma_accept");
  state->ids.insert(id);
  spdlog::info("rdma server: queue pair for '{}' {} (rkey {:#x})", state->name,
               accept.writable ? "read-write" : "read-only", accept.rkey);
  return Status::Ok();
}

Result<std::shared_ptr<OpenRdma>> RdmaServer::Impl::StateFor(const std::shared_ptr<OpenEntry>& entry,
                                                             rdma_cm_id* id) {
  if (auto it = states_.find(entry.get()); it != states_.end()) {
    if (auto state = it->second.lock()) {
      if (state->context != id->verbs) {
        return Unsupported("the open's other queue pairs are on another RDMA device");
      }
      return state;
    }
  }
  auto state = std::make_shared<OpenRdma>(entry);
  state->name = entry->reader.region() != nullptr ? entry->reader.region()->name() : "?";
  state->context = id->verbs;
  bool writable = false;
  {
    std::shared_lock lease(entry->lease_mu);
    writable = entry->writable;
  }
  int access = IBV_ACCESS_REMOTE_READ;
  if (writable) access |= IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_LOCAL_WRITE;
  state->writable = writable;
  {
    MutexLock lock(state->mu);
    state->pd = ProtectionDomain(ibv_alloc_pd(id->verbs));
    if (!state->pd) return Status::FromErrno(errno, "ibv_alloc_pd");
    MF_ASSIGN_OR_RETURN(state->mr, Register(state->pd.get(), entry->data, entry->size, access));
  }
  std::weak_ptr<OpenRdma> weak = state;
  entry->AddRevokeHook([weak] {
    if (auto s = weak.lock()) s->Revoke();
  });
  states_[entry.get()] = state;
  return state;
}

Result<ibv_cq*> RdmaServer::Impl::CqFor(ibv_context* context) {
  auto& cq = cqs_[context];
  if (!cq) {
    cq = CompletionQueue(ibv_create_cq(context, kServerCqSize, nullptr, nullptr, 0));
    if (!cq) {
      cqs_.erase(context);
      return Status::FromErrno(errno, "ibv_create_cq");
    }
  }
  return cq.get();
}

void RdmaServer::Impl::DropConn(rdma_cm_id* id, std::string_view why) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  auto state = it->second.open;
  {
    MutexLock lock(state->mu);
    state->ids.erase(id);
  }
  spdlog::info("rdma server: queue pair of '{}' closed ({})", state->name, why);
  conns_.erase(it);  // destroys the QP and the id; the last one of an open frees its MR and PD
}

// ---- RdmaServer ----------------------------------------------------------------------------

RdmaServer::RdmaServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RdmaServer::~RdmaServer() {
  Stop();
}

Result<std::unique_ptr<RdmaServer>> RdmaServer::Start(std::shared_ptr<transports::OpenTable> opens,
                                                      const RdmaListenOptions& options) {
  if (!opens) return InvalidArgument("RdmaServer needs the server's open table");
  auto impl = std::make_unique<Impl>(std::move(opens), options);
  MF_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<RdmaServer>(new RdmaServer(std::move(impl)));
}

uint16_t RdmaServer::port() const {
  return impl_->port();
}
void RdmaServer::Stop() {
  impl_->Stop();
}

}  // namespace mf::rdma
