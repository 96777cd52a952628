#include "transports/tcp/tcp_server.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fabric/auth.h"
#include "fabric/remote.h"
#include "fabric/thread_annotations.h"
#include "transports/open_table.h"
#include "transports/tcp/byte_buffer.h"
#include "transports/tcp/stream.h"
#include "transports/tcp/wire.h"

namespace mf::tcp {
namespace {

using transports::OpenEntry;
using transports::OpenTable;
static_assert(std::is_same_v<wire::Token, transports::OpenToken>);

constexpr auto kTick = std::chrono::milliseconds(100);  // timer resolution of a worker
constexpr size_t kReadChunk = 64u << 10;                // bytes asked of one recv
constexpr size_t kReadBudget = 4u << 20;                // bytes read per readiness event
constexpr int kMaxEvents = 64;
constexpr int kDriveRounds = 4;  // pause/resume cycles per event
constexpr int kListenBacklog = 128;
constexpr uint64_t kListenId = 0;  // epoll ids that are not connections
constexpr uint64_t kWakeId = 1;
constexpr uint64_t kFirstConnId = 2;
static_assert(kReadChunk <= wire::kMaxFrameSize && kReadBudget >= wire::kMaxFrameSize);
// READ replies at least this large are sent straight from the region (gathered write, no
// copy into the output buffer); smaller ones are copied, which is cheaper than an iovec.
constexpr size_t kSendFromRegionMin = 16u << 10;
static_assert(kSendFromRegionMin <= wire::kMaxPayload);
// WRITE payloads at least this large are received straight into the region once their
// header is checked, instead of through the input buffer.
constexpr size_t kReceiveIntoRegionMin = 64u << 10;
static_assert(kReceiveIntoRegionMin <= wire::kMaxPayload);

enum class ConnState : uint8_t { kTlsHandshake, kHello, kAuth, kReady, kDraining };

// A large WRITE whose payload is being received straight into the region.
struct DirectWrite {
  wire::FrameHeader request;
  std::byte* to = nullptr;  // in the region of the connection's open
  size_t length = 0;
  size_t done = 0;
  bool denied = false;  // the lease is gone: the rest is read and dropped
};

struct Conn {
  uint64_t id = 0;
  std::unique_ptr<Stream> stream;
  std::string peer;
  ConnState state = ConnState::kHello;
  wire::Channel channel = wire::Channel::kControl;
  fabric::Nonce client_nonce{};
  fabric::Nonce server_nonce{};
  std::shared_ptr<OpenEntry> open;  // data connections, once attached
  ByteBuffer in;
  OutputQueue out;                       // may reference the region of `open`, declared after it: dies first
  size_t need = wire::kHelloPrefixSize;  // bytes the next message needs in `in`
  Clock::time_point created;
  std::optional<Clock::time_point> partial_since;  // a message is partly received
  std::optional<DirectWrite> direct;               // set: payload bytes go to the region
  Clock::time_point last_write_progress;
  bool paused = false;         // output full: not reading
  bool flush_pending = false;  // a FLUSH runs on the flusher: wait for it
  uint32_t events = 0;         // current epoll interest
  std::string close_reason;    // set: close after this event
  bool close_is_warning = false;
};

}  // namespace

class TcpServer::Impl {
 public:
  Impl(fabric::Server& server, ListenOptions options)
      : server_(server),
        options_(std::move(options)),
        opens_(options_.opens ? options_.opens : std::make_shared<OpenTable>()) {}
  ~Impl() { Stop(); }

  Status Init();
  uint16_t port() const { return port_; }
  int connections() const { return connections_.load(); }
  void Stop() MF_EXCLUDES(stop_mu_);

 private:
  class Worker;
  class Flusher;

  fabric::Server& server_;
  const ListenOptions options_;
  std::shared_ptr<TlsContext> tls_;
  UniqueFd listen_fd_;
  uint16_t port_ = 0;
  const std::shared_ptr<OpenTable> opens_;
  std::atomic<int> connections_{0};
  std::atomic<uint64_t> next_id_{kFirstConnId};
  std::atomic<bool> stopping_{false};
  Mutex stop_mu_;
  bool stopped_ MF_GUARDED_BY(stop_mu_) = false;
  std::vector<std::unique_ptr<Worker>> workers_;  // use everything above
  std::unique_ptr<Flusher> flusher_;              // last: posts completions to workers
};

// Runs FLUSH (msync, possibly slow) off the workers, one at a time, and hands each result
// back to the worker of its connection.
class TcpServer::Impl::Flusher {
 public:
  struct Job {
    Worker* worker = nullptr;
    uint64_t conn_id = 0;
    wire::FrameHeader request;
    std::shared_ptr<OpenEntry> open;
  };
  Flusher() : thread_([this] { Run(); }) {}
  ~Flusher() {
    {
      MutexLock lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void Post(Job job) MF_EXCLUDES(mu_) {
    {
      MutexLock lock(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }

 private:
  void Run() MF_EXCLUDES(mu_);

  Mutex mu_;
  std::condition_variable_any cv_;
  std::deque<Job> jobs_ MF_GUARDED_BY(mu_);
  bool stop_ MF_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: started after everything it uses exists
};

// One epoll loop. Everything but Wake() and PostFlushDone() runs on the worker's own
// thread, which owns its connections.
class TcpServer::Impl::Worker {
 public:
  Worker(Impl& impl, int index) : impl_(impl), index_(index) {}
  ~Worker() { Join(); }

  Status Init();
  void Start() {
    thread_ = std::thread([this] { Run(); });
  }
  void Wake() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_.get(), &one, sizeof(one));
  }
  void Join() {
    if (thread_.joinable()) thread_.join();
  }
  // From the flusher thread: the result of a FLUSH of connection conn_id.
  void PostFlushDone(uint64_t conn_id, const wire::FrameHeader& request, Status status)
      MF_EXCLUDES(done_mu_) {
    {
      MutexLock lock(done_mu_);
      flush_done_.push_back({conn_id, request, std::move(status)});
    }
    Wake();
  }

 private:
  struct FlushDone {
    uint64_t conn_id;
    wire::FrameHeader request;
    Status status;
  };
  void Run();
  void TakeFlushResults() MF_EXCLUDES(done_mu_);
  void Accept();
  void OnEvent(Conn& c, uint32_t events);
  void Drive(Conn& c);
  void ReadInput(Conn& c);
  // One non-blocking read into c.in, or into the region while c.direct is set.
  Result<size_t> ReceiveBuffered(Conn& c);
  Result<size_t> ReceiveDirect(Conn& c);
  // A WRITE whose payload should bypass c.in: starts c.direct and returns true.
  bool StartDirectWrite(Conn& c, const wire::FrameHeader& h);
  void FinishDirectWrite(Conn& c);
  void ProcessInput(Conn& c);
  void FlushOutput(Conn& c);
  void UpdateInterest(Conn& c);
  void CheckTimers(Conn& c, Clock::time_point now);
  void Destroy(uint64_t id);

  // Message handlers: append replies to c.out, or set c.close_reason.
  void OnHello(Conn& c, const wire::ClientHello& hello);
  void OnFrame(Conn& c, const wire::FrameHeader& h, std::span<const std::byte> payload);
  void OnAuth(Conn& c, const wire::FrameHeader& h, std::span<const std::byte> payload);
  void OnControl(Conn& c, const wire::FrameHeader& h, std::span<const std::byte> payload);
  void OnData(Conn& c, const wire::FrameHeader& h, std::span<const std::byte> payload);
  void OnAttach(Conn& c, const wire::FrameHeader& h, std::span<const std::byte> payload);
  Status DoOpen(const wire::OpenRequest& request, std::vector<std::byte>* reply);

  // Queues a reply; with `by_reference`, the payload is sent from where it lies (region
  // memory kept alive by c.open) instead of being copied.
  void Reply(Conn& c, const wire::FrameHeader& request, std::span<const std::byte> payload,
             bool by_reference = false);
  void ReplyError(Conn& c, const wire::FrameHeader& request, const Status& status);
  void CloseAfterReplies(Conn& c, std::string reason, bool warning);
  void Close(Conn& c, std::string reason, bool warning);

  Impl& impl_;
  const int index_;
  UniqueFd epoll_fd_;
  UniqueFd wake_fd_;
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns_;  // worker thread only
  std::vector<uint64_t> buffered_;  // TLS connections with decrypted input left over
  Mutex done_mu_;
  std::vector<FlushDone> flush_done_ MF_GUARDED_BY(done_mu_);
  std::thread thread_;
};

// ---- Start / Stop ------------------------------------------------------------------------

Status TcpServer::Impl::Init() {
  const auto& sopt = server_.options();
  if (sopt.insecure && !IsLoopbackHost(options_.host)) {
    return InvalidArgument(fmt::format(
        "refusing to serve without authentication (insecure) on '{}', which is not a loopback address; "
        "listen on 127.0.0.1 or ::1, or configure a secret",
        options_.host));
  }
  if (!sopt.insecure && sopt.secret.empty()) {
    return InvalidArgument("server has no secret; give one, or run insecure on a loopback address");
  }
  if (options_.threads < 1 || options_.threads > kMaxServerThreads) {
    return InvalidArgument(fmt::format("threads must be 1..{}, not {}", kMaxServerThreads, options_.threads));
  }
  if (options_.max_output_bytes < wire::kMaxFrameSize) {
    return InvalidArgument(fmt::format("max_output_bytes must be at least {}", wire::kMaxFrameSize));
  }
  if (options_.tls) {
    MF_ASSIGN_OR_RETURN(tls_, TlsContext::ForServer(options_.tls_options));
  }
  MF_ASSIGN_OR_RETURN(listen_fd_, ListenTcp(options_.host, options_.port, kListenBacklog));
  MF_ASSIGN_OR_RETURN(port_, LocalPort(listen_fd_.get()));
  for (int i = 0; i < options_.threads; ++i) {
    auto worker = std::make_unique<Worker>(*this, i);
    MF_RETURN_IF_ERROR(worker->Init());
    workers_.push_back(std::move(worker));
  }
  flusher_ = std::make_unique<Flusher>();
  for (auto& w : workers_) w->Start();
  spdlog::info("tcp server: listening on {}:{} ({}, {} threads{})", options_.host, port_,
               options_.tls ? "tls" : "tcp", options_.threads,
               sopt.insecure ? ", INSECURE: no authentication" : "");
  return Status::Ok();
}

void TcpServer::Impl::Stop() {
  MutexLock lock(stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  stopping_ = true;
  for (auto& w : workers_) w->Wake();
  for (auto& w : workers_) w->Join();
  flusher_.reset();  // may still post to the (stopped) workers
  workers_.clear();
  opens_->Clear();
  listen_fd_.Reset();
  if (port_ != 0) spdlog::info("tcp server: stopped listening on port {}", port_);
}

Status TcpServer::Impl::Worker::Init() {
  epoll_fd_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_fd_) return Status::FromErrno(errno, "epoll_create1");
  wake_fd_ = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!wake_fd_) return Status::FromErrno(errno, "eventfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeId;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, wake_fd_.get(), &ev) != 0) {
    return Status::FromErrno(errno, "epoll_ctl(eventfd)");
  }
  ev.events = EPOLLIN | EPOLLEXCLUSIVE;
  ev.data.u64 = kListenId;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, impl_.listen_fd_.get(), &ev) != 0) {
    return Status::FromErrno(errno, "epoll_ctl(listen)");
  }
  return Status::Ok();
}

// ---- The event loop -----------------------------------------------------------------------

void TcpServer::Impl::Worker::Run() {
  std::array<epoll_event, kMaxEvents> events{};
  auto next_tick = Clock::now() + kTick;
  const std::chrono::microseconds spin = CanSpin() ? impl_.options_.poll_spin : std::chrono::microseconds(0);
  auto spin_until = Clock::now();
  while (!impl_.stopping_.load()) {
    const bool polling = Clock::now() < spin_until;
    int timeout = buffered_.empty() && !polling ? static_cast<int>(kTick.count()) : 0;
    int n = ::epoll_wait(epoll_fd_.get(), events.data(), kMaxEvents, timeout);
    if (n < 0 && errno != EINTR) {
      spdlog::error("tcp server: epoll_wait: {}", std::strerror(errno));
      break;
    }
    if (n > 0) {
      spin_until = Clock::now() + spin;
    } else if (polling) {
      GiveWayWhileSpinning();
    }
    for (int i = 0; i < n; ++i) {
      uint64_t id = events[static_cast<size_t>(i)].data.u64;
      if (id == kWakeId) {
        uint64_t v = 0;
        [[maybe_unused]] ssize_t r = ::read(wake_fd_.get(), &v, sizeof(v));
        TakeFlushResults();
        continue;
      }
      if (id == kListenId) {
        Accept();
        continue;
      }
      auto it = conns_.find(id);
      if (it == conns_.end()) continue;
      OnEvent(*it->second, events[static_cast<size_t>(i)].events);
      if (!it->second->close_reason.empty() && it->second->out.empty()) Destroy(id);
    }
    // TLS input already decrypted is invisible to epoll: serve it now.
    std::vector<uint64_t> buffered;
    buffered.swap(buffered_);
    for (uint64_t id : buffered) {
      auto it = conns_.find(id);
      if (it == conns_.end()) continue;
      Drive(*it->second);
      if (!it->second->close_reason.empty() && it->second->out.empty()) Destroy(id);
    }
    auto now = Clock::now();
    if (now >= next_tick) {
      next_tick = now + kTick;
      std::vector<uint64_t> dead;
      for (auto& [id, c] : conns_) {
        CheckTimers(*c, now);
        if (!c->close_reason.empty() && c->out.empty()) dead.push_back(id);
      }
      for (uint64_t id : dead) Destroy(id);
      if (index_ == 0) impl_.opens_->Sweep(now, impl_.options_.attach_timeout);
    }
  }
  std::vector<uint64_t> ids;
  for (auto& [id, c] : conns_) ids.push_back(id);
  for (uint64_t id : ids) {
    conns_[id]->close_reason = "server stopping";
    Destroy(id);
  }
}

void TcpServer::Impl::Worker::Accept() {
  for (int i = 0; i < kMaxEvents; ++i) {
    int fd = ::accept4(impl_.listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
      if (errno == ECONNABORTED) continue;
      spdlog::warn("tcp server: accept: {}", std::strerror(errno));
      return;
    }
    UniqueFd owned(fd);
    std::string peer = PeerName(fd);
    if (impl_.connections_.load() >= impl_.options_.max_connections) {
      spdlog::warn("tcp server: refusing {}: {} connections already", peer, impl_.options_.max_connections);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto c = std::make_unique<Conn>();
    c->id = impl_.next_id_.fetch_add(1);
    c->stream = std::make_unique<Stream>(std::move(owned));
    c->peer = std::move(peer);
    c->created = Clock::now();
    c->last_write_progress = c->created;
    if (impl_.tls_) {
      Status st = c->stream->StartTls(*impl_.tls_, /*server=*/true, "");
      if (!st.ok()) {
        spdlog::warn("tcp server: {}: {}", c->peer, st.ToString());
        continue;
      }
      c->state = ConnState::kTlsHandshake;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = c->id;
    if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, c->stream->fd(), &ev) != 0) {
      spdlog::warn("tcp server: epoll_ctl: {}", std::strerror(errno));
      continue;
    }
    c->events = EPOLLIN;
    spdlog::info("tcp server: connection from {}", c->peer);
    impl_.connections_.fetch_add(1);
    uint64_t id = c->id;
    conns_.emplace(id, std::move(c));
  }
}

void TcpServer::Impl::Worker::Destroy(uint64_t id) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& c = *it->second;
  const std::string_view reason = c.close_reason.empty() ? std::string_view("closed") : c.close_reason;
  if (c.close_is_warning) {
    spdlog::warn("tcp server: dropping {}: {}", c.peer, reason);
  } else {
    spdlog::info("tcp server: {} disconnected: {}", c.peer, reason);
  }
  if (c.open) impl_.opens_->Detach(c.open);
  conns_.erase(it);  // closes the socket, which leaves the epoll set
  impl_.connections_.fetch_sub(1);
}

void TcpServer::Impl::Worker::Close(Conn& c, std::string reason, bool warning) {
  if (!c.close_reason.empty()) return;
  c.close_reason = std::move(reason);
  c.close_is_warning = warning;
  c.out.Consume(c.out.size());  // nothing more is sent
}

void TcpServer::Impl::Worker::CloseAfterReplies(Conn& c, std::string reason, bool warning) {
  c.state = ConnState::kDraining;
  c.close_is_warning = warning;
  c.paused = true;
  if (c.close_reason.empty()) c.close_reason = std::move(reason);
}

void TcpServer::Impl::Worker::OnEvent(Conn& c, uint32_t events) {
  if ((events & (EPOLLHUP | EPOLLERR)) != 0 && (events & EPOLLIN) == 0) {
    Close(c, "connection reset", false);
    return;
  }
  Drive(c);
}

// Advances a connection as far as it can go without blocking.
void TcpServer::Impl::Worker::Drive(Conn& c) {
  if (c.state == ConnState::kTlsHandshake) {
    auto step = c.stream->HandshakeStep();
    if (!step.ok()) {
      Close(c, step.status().ToString(), true);
      return;
    }
    if (*step != IoWait::kNone) {
      uint32_t want = *step == IoWait::kWrite ? EPOLLOUT : EPOLLIN;
      if (want != c.events) {
        epoll_event ev{};
        ev.events = want;
        ev.data.u64 = c.id;
        ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, c.stream->fd(), &ev);
        c.events = want;
      }
      return;
    }
    c.state = ConnState::kHello;
  }
  const size_t resume_below = impl_.options_.max_output_bytes / 2;
  auto can_resume = [&] {
    return c.paused && c.close_reason.empty() && c.state != ConnState::kDraining &&
           c.out.size() <= resume_below;
  };
  FlushOutput(c);
  for (int round = 0; round < kDriveRounds && c.close_reason.empty(); ++round) {
    // Output drained enough: take up the input left buffered first, then read again.
    if (can_resume()) {
      c.paused = false;
      ProcessInput(c);
      FlushOutput(c);
    }
    if (!c.paused && c.close_reason.empty()) ReadInput(c);
    FlushOutput(c);
    if (!can_resume()) break;
  }
  // Paused with the socket drained: no epoll event would come, so go round again soon.
  if (can_resume()) buffered_.push_back(c.id);
  if (c.close_reason.empty() || !c.out.empty()) UpdateInterest(c);
}

void TcpServer::Impl::Worker::ReadInput(Conn& c) {
  size_t budget = kReadBudget;
  while (budget > 0 && !c.paused && !c.flush_pending && c.close_reason.empty()) {
    auto n = c.direct ? ReceiveDirect(c) : ReceiveBuffered(c);
    if (!n.ok()) {
      bool eof = n.status().code() == Code::kUnavailable;
      if (eof && c.direct) {
        Close(c,
              fmt::format("disconnected in the middle of a WRITE ({} bytes of {} received)", c.direct->done,
                          c.direct->length),
              true);
      } else if (eof && c.in.size() > 0) {
        Close(c,
              fmt::format("disconnected in the middle of a message ({} bytes of {} received)", c.in.size(),
                          c.need),
              true);
      } else {
        Close(c, eof ? "peer closed the connection" : n.status().ToString(), !eof);
      }
      return;
    }
    if (*n == 0) return;  // would block
    budget -= std::min(budget, *n);
    ProcessInput(c);
  }
  if (c.stream->tls() && c.close_reason.empty() && !c.paused && c.stream->HasBufferedInput()) {
    buffered_.push_back(c.id);
  }
}

Result<size_t> TcpServer::Impl::Worker::ReceiveBuffered(Conn& c) {
  size_t want = std::max(kReadChunk, c.need > c.in.size() ? c.need - c.in.size() : 0);
  auto space = c.in.Writable(want).first(want);
  auto n = c.stream->ReadSome(space);
  if (n.ok()) c.in.Commit(*n);
  return n;
}

Result<size_t> TcpServer::Impl::Worker::ReceiveDirect(Conn& c) {
  DirectWrite& d = *c.direct;
  auto rest = std::span(d.to + d.done, d.length - d.done);
  Result<size_t> n = size_t{0};
  if (!d.denied) {
    // Under the lease, as the copy from c.in would be: nothing lands once CLOSE dropped it.
    std::shared_lock lock(c.open->lease_mu);
    if (c.open->writable) {
      n = c.stream->ReadSome(rest);
    } else {
      d.denied = true;
    }
  }
  if (d.denied) {
    auto scratch = c.in.Writable(kReadChunk).first(std::min(kReadChunk, rest.size()));
    n = c.stream->ReadSome(scratch);  // dropped: not committed
  }
  if (n.ok()) d.done += *n;
  return n;
}

bool TcpServer::Impl::Worker::StartDirectWrite(Conn& c, const wire::FrameHeader& h) {
  if (h.reply || c.state != ConnState::kReady || c.channel != wire::Channel::kData || !c.open ||
      h.opcode != static_cast<uint8_t>(wire::Opcode::kWrite) || h.payload_length < kReceiveIntoRegionMin ||
      (h.length != 0 && h.length != h.payload_length) ||
      !fabric::CheckRange(h.offset, h.payload_length, c.open->size).ok()) {
    return false;  // the ordinary path handles (and answers) it
  }
  // Requests execute in order: READ replies still queued by reference must not see it.
  c.out.CopyReferences();
  DirectWrite d;
  d.request = h;
  d.to = c.open->data + h.offset;
  d.length = h.payload_length;
  c.in.Consume(wire::kFrameHeaderSize);
  const size_t buffered = std::min(d.length, c.in.size());
  {
    std::shared_lock lock(c.open->lease_mu);
    d.denied = !c.open->writable;
    if (!d.denied) std::memcpy(d.to, c.in.readable().data(), buffered);
  }
  c.in.Consume(buffered);
  d.done = buffered;
  c.direct = d;
  c.need = wire::kFrameHeaderSize;
  return true;
}

void TcpServer::Impl::Worker::FinishDirectWrite(Conn& c) {
  const DirectWrite d = *c.direct;
  c.direct.reset();
  if (d.denied) {
    ReplyError(c, d.request, Status(Code::kPermissionDenied, "write without the write lease"));
  } else {
    Reply(c, d.request, {});
  }
}

// Handles every complete message in c.in, while the output has room.
void TcpServer::Impl::Worker::ProcessInput(Conn& c) {
  const auto& opt = impl_.options_;
  while (c.close_reason.empty() && c.state != ConnState::kDraining && !c.flush_pending) {
    if (c.out.size() >= opt.max_output_bytes) {
      c.paused = true;
      break;
    }
    if (c.direct) {
      if (c.direct->done < c.direct->length) break;
      FinishDirectWrite(c);
      continue;
    }
    auto avail = c.in.readable();
    if (c.state == ConnState::kHello) {
      wire::ClientHello hello;
      auto r = wire::DecodeClientHello(avail, &hello);
      if (!r.ok()) {
        Close(c, "before the handshake: " + r.status().ToString(), true);
        return;
      }
      if (*r == 0) {
        c.need = avail.size() >= wire::kHelloPrefixSize ? wire::kClientHelloSize : wire::kHelloPrefixSize;
        break;
      }
      c.in.Consume(*r);
      c.need = wire::kFrameHeaderSize;
      OnHello(c, hello);
      continue;
    }
    wire::FrameHeader h;
    auto r = wire::DecodeFrameHeader(avail, &h);
    if (!r.ok()) {
      Close(c, r.status().ToString(), true);
      return;
    }
    if (*r == 0) {
      c.need = wire::kFrameHeaderSize;
      break;
    }
    size_t total = wire::kFrameHeaderSize + h.payload_length;
    if (avail.size() < total) {
      if (StartDirectWrite(c, h)) continue;
      c.need = total;
      break;
    }
    OnFrame(c, h, avail.subspan(wire::kFrameHeaderSize, h.payload_length));
    c.in.Consume(total);
    c.need = wire::kFrameHeaderSize;
  }
  if (c.in.empty() && !c.direct) {
    c.partial_since.reset();
    if (c.in.capacity() > 2 * wire::kMaxFrameSize) c.in.Release();
  } else if (!c.paused && !c.flush_pending) {
    if (!c.partial_since) c.partial_since = Clock::now();
  }
}

void TcpServer::Impl::Worker::FlushOutput(Conn& c) {
  std::array<std::span<const std::byte>, kMaxGatherPieces> pieces{};
  while (!c.out.empty()) {
    auto n = c.stream->WriteSomeV(std::span(pieces).first(c.out.Gather(pieces)));
    if (!n.ok()) {
      Close(c, n.status().code() == Code::kUnavailable ? "peer closed the connection" : n.status().ToString(),
            false);
      return;
    }
    if (*n == 0) return;
    c.out.Consume(*n);
    c.last_write_progress = Clock::now();
  }
}

void TcpServer::Impl::Worker::UpdateInterest(Conn& c) {
  uint32_t want = 0;
  if (!c.paused && !c.flush_pending) want |= EPOLLIN;
  if (!c.out.empty() || c.stream->write_wait() == IoWait::kWrite) want |= EPOLLOUT;
  if (want == c.events) return;
  epoll_event ev{};
  ev.events = want;
  ev.data.u64 = c.id;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, c.stream->fd(), &ev) != 0) {
    Close(c, fmt::format("epoll_ctl: {}", std::strerror(errno)), true);
    return;
  }
  c.events = want;
}

void TcpServer::Impl::Worker::CheckTimers(Conn& c, Clock::time_point now) {
  const auto& opt = impl_.options_;
  if (!c.close_reason.empty()) {  // draining its last replies
    if (!c.out.empty() && now - c.last_write_progress > opt.stall_timeout) c.out.Consume(c.out.size());
    return;
  }
  if ((c.state == ConnState::kTlsHandshake || c.state == ConnState::kHello || c.state == ConnState::kAuth) &&
      now - c.created > opt.handshake_timeout) {
    Close(c, "handshake not completed in time", true);
  } else if (!c.out.empty() && now - c.last_write_progress > opt.stall_timeout) {
    Close(c, fmt::format("peer stopped reading its replies ({} bytes unsent)", c.out.size()), true);
  } else if (c.partial_since && !c.paused && !c.flush_pending && now - *c.partial_since > opt.frame_timeout) {
    Close(c, fmt::format("incomplete message ({} of {} bytes) for too long", c.in.size(), c.need), true);
  }
}

void TcpServer::Impl::Worker::TakeFlushResults() {
  std::vector<FlushDone> done;
  {
    MutexLock lock(done_mu_);
    done.swap(flush_done_);
  }
  for (auto& d : done) {
    auto it = conns_.find(d.conn_id);
    if (it == conns_.end()) continue;  // gone meanwhile
    Conn& c = *it->second;
    c.flush_pending = false;
    if (!c.close_reason.empty()) continue;
    if (d.status.ok()) {
      Reply(c, d.request, {});
    } else {
      ReplyError(c, d.request, d.status);
    }
    ProcessInput(c);  // requests that arrived behind the FLUSH
    Drive(c);
    if (!c.close_reason.empty() && c.out.empty()) Destroy(d.conn_id);
  }
}

void TcpServer::Impl::Flusher::Run() {
  while (true) {
    Job job;
    {
      MutexLock lock(mu_);
      // The analysis cannot see through the predicate; mu_ is held when it runs.
      cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return stop_ || !jobs_.empty(); });
      if (stop_) return;  // pending FLUSHes die with their connections
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    Status st = job.open->reader.region()->Flush();
    job.worker->PostFlushDone(job.conn_id, job.request, std::move(st));
  }
}

// ---- Replies ------------------------------------------------------------------------------

void TcpServer::Impl::Worker::Reply(Conn& c, const wire::FrameHeader& request,
                                    std::span<const std::byte> payload, bool by_reference) {
  wire::FrameHeader h;
  h.opcode = request.opcode;
  h.reply = true;
  h.tag = request.tag;
  h.payload_length = static_cast<uint32_t>(payload.size());
  std::array<std::byte, wire::kFrameHeaderSize> header{};
  wire::EncodeFrameHeader(h, header);
  if (c.out.empty()) c.last_write_progress = Clock::now();
  c.out.Append(header);
  if (by_reference) {
    c.out.AppendReference(payload);
  } else {
    c.out.Append(payload);
  }
}

void TcpServer::Impl::Worker::ReplyError(Conn& c, const wire::FrameHeader& request, const Status& status) {
  std::vector<std::byte> message;
  wire::EncodeMessage(status.message(), &message);
  wire::FrameHeader h;
  h.opcode = request.opcode;
  h.reply = true;
  h.status = status.code();
  h.tag = request.tag;
  h.payload_length = static_cast<uint32_t>(message.size());
  std::array<std::byte, wire::kFrameHeaderSize> header{};
  wire::EncodeFrameHeader(h, header);
  if (c.out.empty()) c.last_write_progress = Clock::now();
  c.out.Append(header);
  c.out.Append(message);
}

// ---- Handshake and auth ---------------------------------------------------------------------

void TcpServer::Impl::Worker::OnHello(Conn& c, const wire::ClientHello& hello) {
  wire::ServerHello reply;
  const bool insecure = impl_.server_.options().insecure;
  reply.auth = insecure ? wire::AuthMode::kNone : wire::AuthMode::kHmacSha256;
  std::vector<std::byte> out;
  if (hello.version != wire::kVersion) {
    reply.status = Code::kUnsupported;
    reply.message =
        fmt::format("protocol version mismatch: client speaks version {}, server speaks version {}",
                    hello.version, wire::kVersion);
    wire::EncodeServerHello(reply, &out);
    c.out.Append(out);
    CloseAfterReplies(c, reply.message, true);
    return;
  }
  auto nonce = fabric::MakeNonce();
  if (!nonce.ok()) {
    reply.status = Code::kInternal;
    reply.message = "server could not make a nonce";
    wire::EncodeServerHello(reply, &out);
    c.out.Append(out);
    CloseAfterReplies(c, nonce.status().ToString(), true);
    return;
  }
  c.server_nonce = *nonce;
  c.client_nonce = hello.nonce;
  c.channel = hello.channel;
  reply.nonce = c.server_nonce;
  wire::EncodeServerHello(reply, &out);
  if (c.out.empty()) c.last_write_progress = Clock::now();
  c.out.Append(out);
  c.state = insecure ? ConnState::kReady : ConnState::kAuth;
}

void TcpServer::Impl::Worker::OnFrame(Conn& c, const wire::FrameHeader& h,
                                      std::span<const std::byte> payload) {
  if (h.reply) {
    Close(c, "client sent a reply frame", true);
    return;
  }
  if (c.state == ConnState::kAuth) {
    OnAuth(c, h, payload);
    return;
  }
  if (!wire::IsKnownOpcode(h.opcode)) {
    ReplyError(c, h, Unsupported(fmt::format("unknown opcode {}", wire::OpcodeName(h.opcode))));
    return;
  }
  if (static_cast<wire::Opcode>(h.opcode) == wire::Opcode::kAuth) {
    ReplyError(c, h, InvalidArgument("already authenticated"));
    return;
  }
  if (c.channel == wire::Channel::kControl) {
    OnControl(c, h, payload);
  } else {
    OnData(c, h, payload);
  }
}

void TcpServer::Impl::Worker::OnAuth(Conn& c, const wire::FrameHeader& h,
                                     std::span<const std::byte> payload) {
  if (static_cast<wire::Opcode>(h.opcode) != wire::Opcode::kAuth) {
    ReplyError(c, h, Status(Code::kUnauthenticated, "authenticate first"));
    CloseAfterReplies(c, fmt::format("sent {} before authenticating", wire::OpcodeName(h.opcode)), true);
    return;
  }
  const auto& secret = impl_.server_.options().secret;
  auto proof = wire::DecodeProof(payload);
  if (!proof.ok() ||
      !fabric::VerifyProof(secret, fabric::Role::kClient, c.server_nonce, c.client_nonce, *proof)) {
    ReplyError(c, h, Status(Code::kUnauthenticated, "authentication failed: wrong secret"));
    CloseAfterReplies(c, "authentication failed", true);
    return;
  }
  fabric::Proof mine = fabric::ComputeProof(secret, fabric::Role::kServer, c.server_nonce, c.client_nonce);
  std::vector<std::byte> out;
  wire::EncodeProof(mine, &out);
  Reply(c, h, out);
  c.state = ConnState::kReady;
  spdlog::debug("tcp server: {} authenticated ({} channel)", c.peer,
                c.channel == wire::Channel::kControl ? "control" : "data");
}

// ---- Control plane ----------------------------------------------------------------------------

void TcpServer::Impl::Worker::OnControl(Conn& c, const wire::FrameHeader& h,
                                        std::span<const std::byte> payload) {
  auto& server = impl_.server_;
  std::vector<std::byte> out;
  Status st;
  switch (static_cast<wire::Opcode>(h.opcode)) {
    case wire::Opcode::kList: {
      if (!payload.empty()) {
        st = InvalidArgument("LIST takes no payload");
        break;
      }
      auto regions = server.List();
      wire::EncodeRegionList(regions, &out);
      if (out.size() > wire::kMaxPayload)
        st = Status(Code::kResourceExhausted, "too many regions for one reply");
      break;
    }
    case wire::Opcode::kStat: {
      auto name = wire::DecodeName(payload);
      if (!name.ok()) {
        st = name.status();
        break;
      }
      auto info = server.Stat(*name);
      if (info.ok()) wire::EncodeRegionInfo(*info, &out);
      st = info.status();
      break;
    }
    case wire::Opcode::kCreate: {
      auto spec = wire::DecodeRegionSpec(payload);
      if (!spec.ok()) {
        st = spec.status();
        break;
      }
      auto info = server.CreateForClient(*spec);
      if (info.ok()) {
        wire::EncodeRegionInfo(*info, &out);
        spdlog::info("tcp server: {} created region '{}' ({} bytes)", c.peer, spec->name, spec->size);
      }
      st = info.status();
      break;
    }
    case wire::Opcode::kDelete: {
      auto name = wire::DecodeName(payload);
      if (!name.ok()) {
        st = name.status();
        break;
      }
      st = server.Delete(*name);
      if (st.ok()) {
        impl_.opens_->RevokeRegion(*name);
        spdlog::info("tcp server: {} deleted region '{}'", c.peer, *name);
      }
      break;
    }
    case wire::Opcode::kOpen: {
      auto request = wire::DecodeOpenRequest(payload);
      st = request.ok() ? DoOpen(*request, &out) : request.status();
      break;
    }
    default:
      st =
          InvalidArgument(fmt::format("{} is not valid on a control connection", wire::OpcodeName(h.opcode)));
      break;
  }
  if (st.ok()) {
    Reply(c, h, out);
  } else {
    ReplyError(c, h, st);
  }
}

Status TcpServer::Impl::Worker::DoOpen(const wire::OpenRequest& request, std::vector<std::byte>* reply) {
  auto& server = impl_.server_;
  auto entry = std::make_shared<OpenEntry>();
  MF_ASSIGN_OR_RETURN(fabric::RegionHandle first, server.Open(request.name, request.writable));
  if (request.writable) {
    // A second, read-only handle keeps the memory alive after CLOSE hands the lease back.
    MF_ASSIGN_OR_RETURN(entry->reader, server.Open(request.name, false));
    entry->writer = std::move(first);
    entry->writable = true;
  } else {
    entry->reader = std::move(first);
  }
  fabric::Region* region = entry->reader.region();
  if (region == nullptr) return Internal("open returned an empty handle");
  MF_ASSIGN_OR_RETURN(fabric::Nonce token, fabric::MakeNonce());
  static_assert(sizeof(token) == wire::kTokenSize);
  std::copy(token.begin(), token.end(), entry->token.begin());
  entry->data = region->data();
  entry->size = region->size();
  entry->generation = region->generation();
  entry->created = Clock::now();

  wire::OpenReply open;
  open.info.name = region->name();
  open.info.size = region->size();
  open.info.generation = region->generation();
  open.info.backing = region->spec().backing;
  open.info.has_writer = request.writable;
  if (!request.writable) {
    auto info = server.Stat(request.name);
    if (info.ok() && info->generation == open.info.generation) open.info.has_writer = info->has_writer;
  }
  open.token = entry->token;
  open.max_transfer = wire::kMaxPayload;
  open.rdma_port = impl_.options_.rdma_port;
  wire::EncodeOpenReply(open, reply);
  spdlog::info("tcp server: opened region '{}' {}", open.info.name,
               request.writable ? "read-write" : "read-only");
  impl_.opens_->Add(std::move(entry));
  return Status::Ok();
}

// ---- Data plane -----------------------------------------------------------------------------

void TcpServer::Impl::Worker::OnAttach(Conn& c, const wire::FrameHeader& h,
                                       std::span<const std::byte> payload) {
  if (c.open) {
    ReplyError(c, h, InvalidArgument("already attached"));
    return;
  }
  auto token = wire::DecodeToken(payload);
  if (!token.ok()) {
    ReplyError(c, h, token.status());
    CloseAfterReplies(c, "bad ATTACH", true);
    return;
  }
  c.open = impl_.opens_->Attach(*token);
  if (!c.open) {
    ReplyError(c, h, NotFound("unknown or expired open token"));
    CloseAfterReplies(c, "ATTACH with an unknown token", true);
    return;
  }
  wire::AttachReply reply;
  reply.size = c.open->size;
  reply.generation = c.open->generation;
  {
    std::shared_lock lock(c.open->lease_mu);
    reply.writable = c.open->writable;
  }
  std::vector<std::byte> out;
  wire::EncodeAttachReply(reply, &out);
  Reply(c, h, out);
}

void TcpServer::Impl::Worker::OnData(Conn& c, const wire::FrameHeader& h,
                                     std::span<const std::byte> payload) {
  const auto op = static_cast<wire::Opcode>(h.opcode);
  if (op == wire::Opcode::kAttach) {
    OnAttach(c, h, payload);
    return;
  }
  if (!c.open) {
    ReplyError(c, h, InvalidArgument("ATTACH to an open region first"));
    return;
  }
  OpenEntry& e = *c.open;
  switch (op) {
    case wire::Opcode::kRead: {
      if (!payload.empty()) return ReplyError(c, h, InvalidArgument("READ takes no payload"));
      if (h.length == 0 || h.length > wire::kMaxPayload) {
        return ReplyError(
            c, h, InvalidArgument(fmt::format("READ length {} not in 1..{}", h.length, wire::kMaxPayload)));
      }
      Status range = fabric::CheckRange(h.offset, h.length, e.size);
      if (!range.ok()) return ReplyError(c, h, range);
      Reply(c, h, std::span<const std::byte>(e.data + h.offset, h.length), h.length >= kSendFromRegionMin);
      return;
    }
    case wire::Opcode::kWrite: {
      if (payload.empty()) return ReplyError(c, h, InvalidArgument("WRITE of 0 bytes"));
      if (h.length != 0 && h.length != payload.size()) {
        return ReplyError(c, h, InvalidArgument("WRITE length does not match its payload"));
      }
      Status range = fabric::CheckRange(h.offset, payload.size(), e.size);
      if (!range.ok()) return ReplyError(c, h, range);
      // Requests execute in order: READ replies still queued by reference must not see it.
      c.out.CopyReferences();
      {
        std::shared_lock lock(e.lease_mu);
        if (!e.writable) {
          lock.unlock();
          return ReplyError(c, h, Status(Code::kPermissionDenied, "write without the write lease"));
        }
        std::memcpy(e.data + h.offset, payload.data(), payload.size());
      }
      Reply(c, h, {});
      return;
    }
    case wire::Opcode::kFlush: {
      // msync may take long: run it on the flusher; this connection's later requests
      // wait for it (they are executed in order), other connections do not.
      if (!payload.empty()) return ReplyError(c, h, InvalidArgument("FLUSH takes no payload"));
      c.flush_pending = true;
      impl_.flusher_->Post({this, c.id, h, c.open});
      return;
    }
    case wire::Opcode::kClose: {
      impl_.opens_->Close(c.open);
      Reply(c, h, {});
      return;
    }
    default:
      ReplyError(
          c, h,
          InvalidArgument(fmt::format("{} is not valid on a data connection", wire::OpcodeName(h.opcode))));
  }
}

// ---- TcpServer ------------------------------------------------------------------------------

TcpServer::TcpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TcpServer::~TcpServer() {
  Stop();
}

Result<std::unique_ptr<TcpServer>> TcpServer::Start(fabric::Server& server, const ListenOptions& options) {
  auto impl = std::make_unique<Impl>(server, options);
  MF_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<TcpServer>(new TcpServer(std::move(impl)));
}

uint16_t TcpServer::port() const {
  return impl_->port();
}
int TcpServer::connections() const {
  return impl_->connections();
}
void TcpServer::Stop() {
  if (impl_) impl_->Stop();
}

}  // namespace mf::tcp
