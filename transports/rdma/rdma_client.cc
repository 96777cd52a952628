#include "transports/rdma/rdma_client.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <optional>
#include <shared_mutex>
#include <thread>

#include "fabric/os.h"
#include "fabric/remote.h"
#include "fabric/thread_annotations.h"
#include "transports/rdma/rdma_wire.h"
#include "transports/rdma/verbs.h"
#include "transports/tcp/tcp_client.h"

namespace mf::rdma {
namespace {

using std::chrono::milliseconds;

constexpr int kPollBatch = 32;                    // completions taken per ibv_poll_cq
constexpr milliseconds kTick{100};                // timeout checks while sleeping
constexpr milliseconds kReconnectInterval{1000};  // between reconnect attempts
constexpr int kSidebandQueueDepth = 4;            // the TCP lifeline carries FLUSH and CLOSE only
constexpr uint8_t kRnrRetryInfinite = 7;
constexpr int kResolveTimeoutMs = 2000;

// The client's protection domain (and completion channel) on its RDMA device, shared by
// every Buffer registration, so Buffers may outlive the Remote.
struct Device {
  ibv_context* context = nullptr;
  ProtectionDomain pd;
  CompletionChannel channel;  // completion events of every session's CQ
};

class RdmaRegistration final : public fabric::BufferRegistration {
 public:
  RdmaRegistration(std::shared_ptr<Device> device, MemoryRegistration mr)
      : device_(std::move(device)), mr_(std::move(mr)) {}
  uint32_t lkey() const { return mr_->lkey; }
  const Device* device() const { return device_.get(); }

 private:
  std::shared_ptr<Device> device_;
  MemoryRegistration mr_;  // after device_: deregistered before the PD goes
};

// One in-flight request.
struct Slot {
  fabric::IoCallback* callback = nullptr;
  uint64_t cookie = 0;
  Clock::time_point posted;
  bool busy = false;
};

struct Completion {
  fabric::IoCallback* callback;
  uint64_t cookie;
  Status status;
};

// One RC queue pair and its slot table. Requests complete in posting order (RC), so a
// FIFO of slots is retired up to each signaled completion.
class QueuePair {
 public:
  QueuePair(uint32_t index, int depth) : index_(index), depth_(static_cast<uint32_t>(depth)) {
    MutexLock lock(mu_);
    slots_.resize(depth_);
    fifo_.resize(depth_);
    wrs_.resize(depth_);
    sges_.resize(depth_);
    free_.reserve(depth_);
    for (uint32_t i = depth_; i > 0; --i) free_.push_back(i - 1);
  }

  CmId& id() { return id_; }

  // Posts requests[0..n) (already validated) and blocks while the slot table is full.
  // Requests that cannot be posted are appended to `failed`. While the table is full,
  // `reap` (called without mu_) may take completions itself; it returns false when it
  // leaves that to the completion thread, and the call then sleeps until a slot is free.
  void Post(std::span<const fabric::IoRequest> requests, uint64_t remote_addr, uint32_t rkey,
            const std::function<bool()>& reap, std::vector<Completion>* failed) MF_EXCLUDES(mu_) {
    size_t next = 0;
    MutexLock lock(mu_);
    while (next < requests.size()) {
      if (!dead_ && free_.empty()) {
        mu_.Unlock();
        const bool reaped = reap();
        mu_.Lock();
        if (reaped) continue;
      }
      space_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return dead_ || !free_.empty(); });
      if (dead_) break;
      const size_t m = std::min(requests.size() - next, free_.size());
      const auto now = Clock::now();
      for (size_t i = 0; i < m; ++i) {
        const fabric::IoRequest& r = requests[next + i];
        const uint32_t slot = free_.back();
        free_.pop_back();
        slots_[slot] = Slot{r.callback, r.cookie, now, true};
        fifo_[(fifo_head_ + fifo_count_) % depth_] = slot;
        ++fifo_count_;
        const auto* reg = static_cast<const RdmaRegistration*>(r.buffer->registration());
        ibv_sge& sge = sges_[i];
        sge.addr = reinterpret_cast<uintptr_t>(r.data.data());
        sge.length = static_cast<uint32_t>(r.data.size());
        sge.lkey = reg->lkey();
        ibv_send_wr& wr = wrs_[i];
        wr = ibv_send_wr{};
        wr.wr_id = (static_cast<uint64_t>(index_) << 32) | slot;
        wr.sg_list = &sge;
        wr.num_sge = 1;
        wr.opcode = r.kind == fabric::IoKind::kRead ? IBV_WR_RDMA_READ : IBV_WR_RDMA_WRITE;
        wr.send_flags = (i + 1 == m) ? IBV_SEND_SIGNALED : 0;
        wr.wr.rdma.remote_addr = remote_addr + r.offset;
        wr.wr.rdma.rkey = rkey;
        wr.next = (i + 1 == m) ? nullptr : &wrs_[i + 1];
      }
      ibv_send_wr* bad = nullptr;
      if (int err = ibv_post_send(id_->qp, wrs_.data(), &bad); err != 0) {
        // Nothing from `bad` on was posted: take those slots back (they are the newest).
        const size_t posted = bad == nullptr ? 0 : static_cast<size_t>(bad - wrs_.data());
        Status st = Status::FromErrno(err, "ibv_post_send");
        for (size_t i = m; i > posted; --i) {
          const uint32_t slot = fifo_[(fifo_head_ + fifo_count_ - 1) % depth_];
          --fifo_count_;
          Slot& s = slots_[slot];
          failed->push_back({s.callback, s.cookie, st});
          s.busy = false;
          free_.push_back(slot);
        }
        if (posted > 0 && (wrs_[posted - 1].send_flags & IBV_SEND_SIGNALED) == 0) {
          // The posted prefix has no signaled request: nothing would retire it.
          dead_ = true;
          dead_status_ = st;
        }
      }
      next += m;
    }
    if (next < requests.size()) {
      for (size_t i = next; i < requests.size(); ++i) {
        failed->push_back({requests[i].callback, requests[i].cookie, dead_status_});
      }
    }
  }

  // A completion of this queue pair. Appends the requests it retires to `done`. Returns
  // false when it is a failure (the queue pair is now in error).
  bool Complete(const ibv_wc& wc, std::vector<Completion>* done) MF_EXCLUDES(mu_) {
    const auto slot = static_cast<uint32_t>(wc.wr_id & 0xffffffffu);
    Status st = CompletionStatus(wc);
    MutexLock lock(mu_);
    if (dead_ || slot >= depth_ || !slots_[slot].busy) return st.ok();  // stale
    bool found = false;
    while (fifo_count_ > 0 && !found) {
      const uint32_t s = fifo_[fifo_head_];
      fifo_head_ = (fifo_head_ + 1) % depth_;
      --fifo_count_;
      found = s == slot;
      Slot& x = slots_[s];
      done->push_back({x.callback, x.cookie, found ? st : Status::Ok()});
      x.busy = false;
      free_.push_back(s);
    }
    space_.notify_all();
    return st.ok();
  }

  // The time the oldest outstanding request was posted, if any.
  std::optional<Clock::time_point> Oldest() MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    if (fifo_count_ == 0 || dead_) return std::nullopt;
    return slots_[fifo_[fifo_head_]].posted;
  }

  // Stops the queue pair for good (no more DMA once this returns) and fails everything
  // outstanding with `why`.
  void Kill(const Status& why, std::vector<Completion>* done) MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    if (!dead_) {
      dead_ = true;
      dead_status_ = why;
    }
    if (id_) {
      rdma_disconnect(id_.get());
      id_.DestroyQp();
    }
    while (fifo_count_ > 0) {
      const uint32_t s = fifo_[fifo_head_];
      fifo_head_ = (fifo_head_ + 1) % depth_;
      --fifo_count_;
      Slot& x = slots_[s];
      done->push_back({x.callback, x.cookie, dead_status_});
      x.busy = false;
      free_.push_back(s);
    }
    space_.notify_all();
  }

 private:
  const uint32_t index_;
  const uint32_t depth_;
  CmId id_;
  Mutex mu_;
  std::condition_variable_any space_;
  bool dead_ MF_GUARDED_BY(mu_) = false;
  Status dead_status_ MF_GUARDED_BY(mu_);
  std::vector<Slot> slots_ MF_GUARDED_BY(mu_);
  std::vector<uint32_t> free_ MF_GUARDED_BY(mu_);
  std::vector<uint32_t> fifo_ MF_GUARDED_BY(mu_);  // ring of slots in posting order
  uint32_t fifo_head_ MF_GUARDED_BY(mu_) = 0;
  uint32_t fifo_count_ MF_GUARDED_BY(mu_) = 0;
  std::vector<ibv_send_wr> wrs_ MF_GUARDED_BY(mu_);  // scratch of one post
  std::vector<ibv_sge> sges_ MF_GUARDED_BY(mu_);
};

// One connected generation of a Remote: its lifeline, CQ and queue pairs.
struct Session {
  std::unique_ptr<fabric::Remote> sideband;  // TCP data connection of the open
  CompletionQueue cq;                        // before qps: destroyed after them
  std::vector<std::unique_ptr<QueuePair>> qps;
  uint64_t remote_addr = 0;
  uint32_t rkey = 0;
  bool writable = false;
  uint64_t generation = 0;
};

void RunCallbacks(std::vector<Completion>* done) {
  for (auto& c : *done) c.callback->OnIoComplete(c.cookie, c.status);
  done->clear();
}

class RdmaRemote final : public fabric::Remote {
 public:
  RdmaRemote(fabric::Url url, transports::ClientOptions options, std::shared_ptr<tcp::TcpClient> control,
             std::string name, fabric::OpenOptions open_options)
      : url_(std::move(url)),
        options_(std::move(options)),
        name_(std::move(name)),
        open_options_(open_options),
        control_(std::move(control)) {}

  ~RdmaRemote() override { [[maybe_unused]] Status st = Close(); }

  // Connects the first session and starts the completion thread.
  Status Start() {
    MF_ASSIGN_OR_RETURN(cm_channel_, MakeEventChannel());
    wake_fd_ = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!wake_fd_) return Status::FromErrno(errno, "eventfd");
    MF_ASSIGN_OR_RETURN(auto session, Establish());
    writable_ = session->writable;
    {
      std::unique_lock lock(session_mu_);
      session_ = std::move(session);
    }
    thread_ = std::thread([this] { Run(); });
    return Status::Ok();
  }

  const fabric::RegionInfo& info() const override { return info_; }
  bool writable() const override { return writable_; }
  std::string_view transport() const override { return "rdma"; }
  size_t max_transfer() const override { return max_transfer_; }

  Result<fabric::Buffer> AllocateBuffer(size_t size) override {
    if (size == 0) return InvalidArgument("buffer size 0");
    MF_ASSIGN_OR_RETURN(MappedMemory memory, MappedMemory::Anonymous(AlignUp(size, kPageSize)));
    MF_ASSIGN_OR_RETURN(MemoryRegistration mr,
                        Register(device_->pd.get(), memory.data(), memory.size(), IBV_ACCESS_LOCAL_WRITE));
    return fabric::Buffer(std::move(memory), std::make_unique<RdmaRegistration>(device_, std::move(mr)));
  }

  void Submit(std::span<const fabric::IoRequest> requests) override {
    // Requests that failed, and completions taken while posting (see PostValid).
    std::vector<Completion> failed;
    // Requests are validated up front; the valid ones go to the queue pairs in groups.
    size_t valid_begin = 0;
    auto flush_valid = [&](size_t end) {
      PostValid(requests.subspan(valid_begin, end - valid_begin), &failed);
    };
    for (size_t i = 0; i < requests.size(); ++i) {
      Status st = closed_.load() ? Status(Code::kAborted, "remote is closed") : Check(requests[i]);
      if (!st.ok()) {
        flush_valid(i);
        valid_begin = i + 1;
        failed.push_back({requests[i].callback, requests[i].cookie, std::move(st)});
      }
    }
    flush_valid(requests.size());
    RunCallbacks(&failed);
  }

  bool can_poll() const override { return true; }

  size_t Poll() override {
    thread_local std::vector<Completion> done;
    thread_local std::array<ibv_wc, kPollBatch> wcs;
    {
      std::shared_lock lock(session_mu_);
      Session* s = session_.get();
      if (s == nullptr || broken_flag_.load()) return 0;
      Collect(*s, wcs, &done);
    }
    const size_t n = done.size();
    RunCallbacks(&done);
    return n;
  }

  void SetCallerPolling(bool active) override {
    if (active) {
      caller_pollers_.fetch_add(1);
    } else if (caller_pollers_.fetch_sub(1) == 1) {
      Wake();  // the completion thread takes over again
    }
  }

  Status Flush() override {
    std::shared_lock lock(session_mu_);
    if (!session_ || !session_->sideband) return broken_status();
    // Completed RDMA WRITEs are in the region's memory; the server makes them durable.
    return session_->sideband->Flush();
  }

  Status Close() override {
    if (closed_.exchange(true)) return Status::Ok();
    Wake();
    if (thread_.joinable()) thread_.join();
    std::unique_ptr<Session> session;
    {
      std::unique_lock lock(session_mu_);
      session = std::move(session_);
    }
    Status st;
    if (session) {
      std::vector<Completion> done;
      for (auto& qp : session->qps) qp->Kill(Status(Code::kAborted, "remote is closed"), &done);
      RunCallbacks(&done);
      // CLOSE on the lifeline: the server revokes the registration and releases the lease.
      if (session->sideband) st = session->sideband->Close();
    }
    // Teardown order (docs/rdma.md): QPs and ids, CQ (in ~Session), then the PD once the
    // last Buffer registration is gone, then the channels.
    session.reset();
    return st;
  }

 private:
  void Wake() {
    if (!wake_fd_) return;
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
  }

  Status Check(const fabric::IoRequest& r) const {
    MF_RETURN_IF_ERROR(fabric::ValidateRequest(r, *this));
    const auto* reg = dynamic_cast<const RdmaRegistration*>(r.buffer->registration());
    if (reg == nullptr || reg->device() != device_.get()) {
      return InvalidArgument("buffer was not allocated by this remote");
    }
    return Status::Ok();
  }

  Status broken_status() const {
    MutexLock lock(broken_mu_);
    return broken_.ok() ? Status(Code::kUnavailable, "RDMA connection lost; reconnecting") : broken_;
  }

  void PostValid(std::span<const fabric::IoRequest> requests, std::vector<Completion>* failed) {
    if (requests.empty()) return;
    std::shared_lock lock(session_mu_);
    Session* s = session_.get();
    if (s == nullptr || broken_flag_.load()) {
      Status st = broken_status();
      for (const auto& r : requests) failed->push_back({r.callback, r.cookie, st});
      return;
    }
    // While callers poll, the completion thread sleeps: with a full slot table this
    // thread may be the one that would poll, so it takes completions itself (their
    // callbacks run with the failed ones, after the session lock).
    auto reap = [this, s, failed]() -> bool {
      if (caller_pollers_.load() == 0) return false;
      std::array<ibv_wc, kPollBatch> wcs;
      if (!Collect(*s, wcs, failed)) GiveWayWhileSpinning();
      return true;
    };
    // Spread the batch over the queue pairs in contiguous groups, starting round-robin.
    const size_t n = s->qps.size();
    const size_t groups = std::min(n, requests.size());
    const size_t first = next_qp_.fetch_add(1, std::memory_order_relaxed);
    size_t begin = 0;
    for (size_t g = 0; g < groups; ++g) {
      const size_t end = requests.size() * (g + 1) / groups;
      s->qps[(first + g) % n]->Post(requests.subspan(begin, end - begin), s->remote_addr, s->rkey, reap,
                                    failed);
      begin = end;
    }
  }

  // ---- connecting ----------------------------------------------------------------------

  // Opens the region on the control plane and connects the queue pairs.
  Result<std::unique_ptr<Session>> Establish() {
    auto session = std::make_unique<Session>();
    fabric::OpenOptions lifeline{open_options_.writable, 1, kSidebandQueueDepth};
    auto opened = control_->OpenRegion(name_, lifeline);
    if (!opened.ok() && opened.status().code() == Code::kUnavailable) {
      // The control session died with the old server: make a new one.
      fabric::Url tcp_url = url_;
      tcp_url.scheme = fabric::Scheme::kTcp;
      MF_ASSIGN_OR_RETURN(auto fresh, tcp::TcpClient::Connect(tcp_url, options_, false));
      control_ = std::shared_ptr<tcp::TcpClient>(std::move(fresh));
      opened = control_->OpenRegion(name_, lifeline);
    }
    if (!opened.ok()) return opened.status();
    session->sideband = std::move(opened->remote);
    auto fail = [&](Status st) {
      [[maybe_unused]] Status closed = session->sideband->Close();
      return st;
    };
    if (opened->rdma_port == 0) {
      return fail(Unsupported(fmt::format(
          "{} has no RDMA data plane (serve it on a host with an RDMA device, or use tcp://)", url_.host)));
    }
    const fabric::RegionInfo& info = session->sideband->info();
    if (info_.size != 0 && info.size != info_.size) {
      return fail(Unavailable(
          fmt::format("region '{}' changed size from {} to {} bytes", name_, info_.size, info.size)));
    }
    if (info_.size != 0 && info.generation != info_.generation) {
      spdlog::warn("rdma: region '{}' on {} was re-created (generation {} -> {})", name_, url_.host,
                   info_.generation, info.generation);
    }
    session->generation = info.generation;
    for (int i = 0; i < open_options_.connections; ++i) {
      Status st = ConnectQueuePair(*session, static_cast<uint32_t>(i), opened->token, opened->rdma_port);
      if (!st.ok()) {
        std::vector<Completion> none;
        for (auto& qp : session->qps) qp->Kill(st, &none);
        return fail(st.WithContext(fmt::format("connecting RDMA queue pair {} of {} to {}:{}", i + 1,
                                               open_options_.connections, url_.host, opened->rdma_port)));
      }
    }
    if (info_.size == 0) info_ = info;
    return session;
  }

  Status ConnectQueuePair(Session& session, uint32_t index, const wire::Token& token, uint16_t port) {
    const auto deadline = Clock::now() + options_.connect_timeout;
    auto qp = std::make_unique<QueuePair>(index, open_options_.queue_depth);
    rdma_cm_id* raw = nullptr;
    if (rdma_create_id(cm_channel_.get(), &raw, nullptr, RDMA_PS_TCP) != 0) {
      return Status::FromErrno(errno, "rdma_create_id");
    }
    qp->id() = CmId(raw);
    sockaddr_storage addr{};
    MF_RETURN_IF_ERROR(ResolveSockaddr(url_.host, port, &addr));
    if (rdma_resolve_addr(raw, nullptr, reinterpret_cast<sockaddr*>(&addr), kResolveTimeoutMs) != 0) {
      return Status::FromErrno(errno, "rdma_resolve_addr");
    }
    MF_RETURN_IF_ERROR(Expect(raw, RDMA_CM_EVENT_ADDR_RESOLVED, deadline, nullptr));
    if (rdma_resolve_route(raw, kResolveTimeoutMs) != 0)
      return Status::FromErrno(errno, "rdma_resolve_route");
    MF_RETURN_IF_ERROR(Expect(raw, RDMA_CM_EVENT_ROUTE_RESOLVED, deadline, nullptr));
    MF_RETURN_IF_ERROR(UseDevice(raw->verbs));
    if (!session.cq) {
      const int cqe = open_options_.connections * (open_options_.queue_depth + 1);
      session.cq = CompletionQueue(ibv_create_cq(device_->context, cqe, nullptr, device_->channel.get(), 0));
      if (!session.cq) return Status::FromErrno(errno, "ibv_create_cq");
    }
    ibv_qp_init_attr attr{};
    attr.send_cq = session.cq.get();
    attr.recv_cq = session.cq.get();
    attr.qp_type = IBV_QPT_RC;
    attr.sq_sig_all = 0;
    attr.cap.max_send_wr = static_cast<uint32_t>(open_options_.queue_depth);
    attr.cap.max_recv_wr = 1;
    attr.cap.max_send_sge = 1;
    attr.cap.max_recv_sge = 1;
    if (rdma_create_qp(raw, device_->pd.get(), &attr) != 0) return Status::FromErrno(errno, "rdma_create_qp");
    uint8_t ack_timeout = options_.rdma.ack_timeout_exponent;
    if (rdma_set_option(raw, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &ack_timeout, sizeof(ack_timeout)) !=
        0) {
      spdlog::debug("rdma: cannot set the ACK timeout: {}", std::strerror(errno));
    }
    auto request = wire::EncodeConnectRequest({wire::kVersion, token});
    rdma_conn_param param{};
    param.private_data = request.data();
    param.private_data_len = static_cast<uint8_t>(request.size());
    param.initiator_depth = static_cast<uint8_t>(std::clamp(max_rd_atom_, 1, open_options_.queue_depth));
    param.responder_resources = 0;
    param.retry_count = options_.rdma.retry_count;
    param.rnr_retry_count = kRnrRetryInfinite;
    if (rdma_connect(raw, &param) != 0) return Status::FromErrno(errno, "rdma_connect");
    wire::Accept accept;
    // The server registers the region on an open's first queue pair, which pins every
    // page of it: for a large region that takes a while, so the accept gets io_timeout
    // on top of the connect timeout.
    MF_RETURN_IF_ERROR(Expect(raw, RDMA_CM_EVENT_ESTABLISHED,
                              Clock::now() + options_.connect_timeout + options_.io_timeout, &accept));
    if (accept.size != session.sideband->info().size) {
      return ProtocolError(
          fmt::format("RDMA accept names {} bytes, the open {}", accept.size, session.sideband->info().size));
    }
    if (index > 0 && (accept.addr != session.remote_addr || accept.rkey != session.rkey)) {
      return ProtocolError("queue pairs of one open got different registrations");
    }
    session.remote_addr = accept.addr;
    session.rkey = accept.rkey;
    session.writable = accept.writable;
    session.qps.push_back(std::move(qp));
    return Status::Ok();
  }

  Status UseDevice(ibv_context* context) {
    if (device_) {
      if (device_->context != context) {
        return Unsupported("the route to the server now goes through another RDMA device");
      }
      return Status::Ok();
    }
    auto device = std::make_shared<Device>();
    device->context = context;
    device->pd = ProtectionDomain(ibv_alloc_pd(context));
    if (!device->pd) return Status::FromErrno(errno, "ibv_alloc_pd");
    device->channel = CompletionChannel(ibv_create_comp_channel(context));
    if (!device->channel) return Status::FromErrno(errno, "ibv_create_comp_channel");
    const int flags = ::fcntl(device->channel->fd, F_GETFL);
    if (flags < 0 || ::fcntl(device->channel->fd, F_SETFL, flags | O_NONBLOCK) != 0) {
      return Status::FromErrno(errno, "fcntl(completion channel)");
    }
    ibv_device_attr attr{};
    if (ibv_query_device(context, &attr) != 0) return Status::FromErrno(errno, "ibv_query_device");
    max_rd_atom_ = std::max(attr.max_qp_init_rd_atom, 1);
    ibv_port_attr port{};
    if (ibv_query_port(context, 1, &port) == 0 && port.max_msg_sz > 0) {
      max_transfer_ = std::min<size_t>(kMaxRdmaTransfer, port.max_msg_sz);
    }
    device_ = std::move(device);
    return Status::Ok();
  }

  // Waits for `want` on id (events of other, older ids are dropped). On ESTABLISHED,
  // decodes the accept into *accept; a reject becomes the server's Status.
  Status Expect(rdma_cm_id* id, rdma_cm_event_type want, Clock::time_point deadline, wire::Accept* accept) {
    for (;;) {
      MF_ASSIGN_OR_RETURN(CmEvent event, WaitCmEvent(cm_channel_.get(), deadline));
      if (event->id != id) continue;
      const auto& conn = event->param.conn;
      std::span<const std::byte> data(static_cast<const std::byte*>(conn.private_data),
                                      conn.private_data != nullptr ? conn.private_data_len : 0);
      if (event->event == want) {
        if (accept != nullptr) {
          MF_ASSIGN_OR_RETURN(*accept, wire::DecodeAccept(data));
        }
        return Status::Ok();
      }
      if (event->event == RDMA_CM_EVENT_REJECTED) {
        if (!data.empty()) {
          Status server = wire::DecodeReject(data);
          if (server.code() != Code::kProtocolError)
            return server.WithContext("the server refused the queue pair");
        }
        return Unavailable(
            fmt::format("RDMA connection refused (reject reason {}): is a memfabric server "
                        "listening there?",
                        event->status));
      }
      return Unavailable(fmt::format("RDMA connection manager: {} while waiting for {} (status {})",
                                     CmEventName(event->event), CmEventName(want), event->status));
    }
  }

  // ---- the completion thread -----------------------------------------------------------

  void Run() {
    std::vector<Completion> done;
    done.reserve(static_cast<size_t>(kPollBatch) * 2);
    std::array<ibv_wc, kPollBatch> wcs{};
    auto last_activity = Clock::now();
    auto next_check = last_activity + kTick;
    auto next_reconnect = last_activity;
    const bool busy = options_.rdma.poll_mode == transports::PollMode::kBusy;
    const auto spin = options_.rdma.poll_mode == transports::PollMode::kEvent ? std::chrono::microseconds(0)
                                                                              : options_.rdma.poll_spin;
    while (!closed_.load()) {
      Session* s = nullptr;
      {
        std::shared_lock lock(session_mu_);
        s = session_.get();
      }
      // Only this thread replaces the session, so s stays valid in this iteration.
      const bool usable = s != nullptr && !broken_flag_.load();
      if (usable && PollOnce(*s, wcs, &done)) {
        last_activity = Clock::now();
        continue;
      }
      auto now = Clock::now();
      if (now >= next_check) {
        next_check = now + kTick;
        if (usable) CheckTimeouts(*s, now);
        DrainCmEvents(s);
        if (broken_flag_.load() && now >= next_reconnect) {
          next_reconnect = now + kReconnectInterval;
          Reconnect();
          continue;
        }
      }
      if (caller_pollers_.load() > 0) {
        // A caller polls the queue itself: stay out of its way (no spinning, no arming);
        // wake up for connection events, timeouts and the end of its polling.
        Sleep();
        continue;
      }
      if (usable && (busy || now - last_activity < spin)) continue;
      // Sleep until a completion, a connection-manager event, Close() or the next tick.
      // Arm first, then look again: a completion that arrived before arming raised no
      // event but is in the queue.
      if (usable) {
        ibv_req_notify_cq(s->cq.get(), 0);
        if (PollOnce(*s, wcs, &done)) {
          last_activity = Clock::now();
          continue;
        }
      }
      Sleep();
    }
  }

  // Takes one batch of completions off s's queue into *done (callbacks not run yet);
  // true when there was any.
  bool Collect(Session& s, std::array<ibv_wc, kPollBatch>& wcs, std::vector<Completion>* done) {
    const int n = ibv_poll_cq(s.cq.get(), kPollBatch, wcs.data());
    if (n < 0) {
      Break(s, Status(Code::kIoError, "ibv_poll_cq failed"), done);
      return true;
    }
    if (n == 0) return false;
    Status error;
    for (size_t i = 0; i < static_cast<size_t>(n); ++i) {
      const auto q = static_cast<size_t>(wcs[i].wr_id >> 32);
      if (q < s.qps.size() && !s.qps[q]->Complete(wcs[i], done) && error.ok())
        error = CompletionStatus(wcs[i]);
    }
    if (!error.ok()) Break(s, error, done);
    return true;
  }

  // The completion thread's poll: the session cannot go away under it (only this thread
  // replaces it).
  bool PollOnce(Session& s, std::array<ibv_wc, kPollBatch>& wcs, std::vector<Completion>* done) {
    const bool any = Collect(s, wcs, done);
    RunCallbacks(done);
    return any;
  }

  void Sleep() {
    std::array<pollfd, 3> fds{pollfd{cm_channel_->fd, POLLIN, 0}, pollfd{wake_fd_.get(), POLLIN, 0},
                              pollfd{device_ ? device_->channel->fd : -1, POLLIN, 0}};
    if (::poll(fds.data(), fds.size(), static_cast<int>(kTick.count())) <= 0) return;
    if ((fds[1].revents & POLLIN) != 0) {
      uint64_t count = 0;
      [[maybe_unused]] ssize_t n = ::read(wake_fd_.get(), &count, sizeof(count));
    }
    if (device_ && (fds[2].revents & POLLIN) != 0) {
      ibv_cq* cq = nullptr;
      void* context = nullptr;
      while (ibv_get_cq_event(device_->channel.get(), &cq, &context) == 0) ibv_ack_cq_events(cq, 1);
    }
  }

  void CheckTimeouts(Session& s, Clock::time_point now) {
    for (auto& qp : s.qps) {
      auto oldest = qp->Oldest();
      if (oldest && now - *oldest > options_.io_timeout) {
        BreakNow(s, Status(Code::kTimeout,
                           fmt::format("RDMA request unanswered for {} ms", options_.io_timeout.count())));
        return;
      }
    }
  }

  void DrainCmEvents(Session* s) {
    for (;;) {
      auto event = PollCmEvent(cm_channel_.get());
      if (!event.ok() || !*event) return;
      const rdma_cm_event_type type = (*event)->event;
      rdma_cm_id* id = (*event)->id;
      event->reset();
      if (s == nullptr || broken_flag_.load()) continue;
      const bool ours =
          std::any_of(s->qps.begin(), s->qps.end(), [&](auto& qp) { return qp->id().get() == id; });
      if (ours && (type == RDMA_CM_EVENT_DISCONNECTED || type == RDMA_CM_EVENT_DEVICE_REMOVAL)) {
        BreakNow(*s,
                 Unavailable(fmt::format("RDMA connection to {} lost: {}", url_.host, CmEventName(type))));
      }
    }
  }

  // Fails everything outstanding and stops the session's queue pairs; the failed requests
  // go to *done (the caller runs their callbacks, outside any lock).
  void Break(Session& s, Status why, std::vector<Completion>* done) {
    if (broken_flag_.exchange(true)) return;
    spdlog::warn("rdma: {}: {}; reconnecting", name_, why.ToString());
    {
      MutexLock lock(broken_mu_);
      broken_ = Status(why.code() == Code::kTimeout ? Code::kTimeout : Code::kUnavailable,
                       fmt::format("{} (reconnecting)", why.message()));
    }
    for (auto& qp : s.qps) qp->Kill(why, done);
  }

  // Break from the completion thread, which holds no lock: runs the callbacks at once.
  void BreakNow(Session& s, Status why) {
    std::vector<Completion> done;
    Break(s, std::move(why), &done);
    RunCallbacks(&done);
  }

  void Reconnect() {
    std::unique_ptr<Session> old;
    {
      std::unique_lock lock(session_mu_);
      old = std::move(session_);
    }
    // Give the old open back first (if its server is alive) so a writable re-open finds
    // the lease free.
    if (old && old->sideband) [[maybe_unused]]
      Status st = old->sideband->Close();
    old.reset();
    auto fresh = Establish();
    if (!fresh.ok()) {
      spdlog::info("rdma: {}: reconnect failed: {}", name_, fresh.status().ToString());
      MutexLock lock(broken_mu_);
      broken_ = Status(Code::kUnavailable,
                       fmt::format("RDMA connection lost; reconnect failed: {}", fresh.status().message()));
      return;
    }
    {
      std::unique_lock lock(session_mu_);
      session_ = std::move(fresh).value();
    }
    {
      MutexLock lock(broken_mu_);
      broken_ = Status::Ok();
    }
    broken_flag_ = false;
    spdlog::info("rdma: {}: reconnected to {}", name_, url_.ToString());
  }

  const fabric::Url url_;
  const transports::ClientOptions options_;
  const std::string name_;
  const fabric::OpenOptions open_options_;
  std::shared_ptr<tcp::TcpClient> control_;  // Start() and the completion thread only
  fabric::RegionInfo info_;                  // set by the first Establish, then constant
  bool writable_ = false;
  size_t max_transfer_ = kMaxRdmaTransfer;
  int max_rd_atom_ = 1;
  std::shared_ptr<Device> device_;  // set by the first Establish, then constant
  EventChannel cm_channel_;
  UniqueFd wake_fd_;
  // Submit, Flush hold session_mu_ shared; the completion thread replaces the session
  // holding it exclusively. (std::shared_mutex is not an annotated capability.)
  std::shared_mutex session_mu_;
  std::unique_ptr<Session> session_;
  std::atomic<bool> broken_flag_{false};
  mutable Mutex broken_mu_;
  Status broken_ MF_GUARDED_BY(broken_mu_);
  std::atomic<size_t> next_qp_{0};
  std::atomic<bool> closed_{false};
  std::atomic<int> caller_pollers_{0};  // threads inside SetCallerPolling(true)
  std::thread thread_;
};

}  // namespace

// ---- RdmaClient ----------------------------------------------------------------------------

RdmaClient::RdmaClient(fabric::Url url, transports::ClientOptions options,
                       std::shared_ptr<tcp::TcpClient> control, bool fallback_to_tcp)
    : url_(std::move(url)),
      options_(std::move(options)),
      control_(std::move(control)),
      fallback_to_tcp_(fallback_to_tcp) {}

RdmaClient::~RdmaClient() = default;

Result<std::unique_ptr<RdmaClient>> RdmaClient::Connect(const fabric::Url& url,
                                                        const transports::ClientOptions& options,
                                                        bool fallback_to_tcp) {
  if (!HasRdmaDevice()) return Unsupported("no RDMA device on this system (ibv_devices lists none)");
  fabric::Url tcp_url = url;
  tcp_url.scheme = fabric::Scheme::kTcp;
  MF_ASSIGN_OR_RETURN(auto control, tcp::TcpClient::Connect(tcp_url, options, false));
  return std::unique_ptr<RdmaClient>(
      new RdmaClient(url, options, std::shared_ptr<tcp::TcpClient>(std::move(control)), fallback_to_tcp));
}

Result<std::vector<fabric::RegionInfo>> RdmaClient::List() {
  return control_->List();
}
Result<fabric::RegionInfo> RdmaClient::Stat(std::string_view name) {
  return control_->Stat(name);
}
Result<fabric::RegionInfo> RdmaClient::Create(const fabric::RegionSpec& spec) {
  return control_->Create(spec);
}
Status RdmaClient::Delete(std::string_view name) {
  return control_->Delete(name);
}

Result<std::unique_ptr<fabric::Remote>> RdmaClient::Open(std::string_view name,
                                                         const fabric::OpenOptions& options) {
  if (options.connections < 1 || options.connections > kMaxQueuePairs) {
    return InvalidArgument(fmt::format("connections (queue pairs) must be 1..{}", kMaxQueuePairs));
  }
  if (options.queue_depth < 1 || options.queue_depth > kMaxRdmaQueueDepth) {
    return InvalidArgument(fmt::format("queue_depth must be 1..{}", kMaxRdmaQueueDepth));
  }
  if (name.size() > fabric::kMaxRegionNameLength) return InvalidArgument("region name too long");
  auto remote = std::make_unique<RdmaRemote>(url_, options_, control_, std::string(name), options);
  Status st = remote->Start();
  if (st.ok()) {
    spdlog::debug("rdma: opened '{}' over RDMA ({} queue pairs)", name, options.connections);
    return std::unique_ptr<fabric::Remote>(std::move(remote));
  }
  remote.reset();
  if (!fallback_to_tcp_ || st.code() == Code::kNotFound || st.code() == Code::kBusy ||
      st.code() == Code::kUnauthenticated || st.code() == Code::kPermissionDenied) {
    return st.WithContext(fmt::format("opening '{}' over RDMA", name));
  }
  spdlog::info("{}: using TCP for '{}': {}", url_.ToString(), name, st.ToString());
  return control_->Open(name, options);
}

}  // namespace mf::rdma
