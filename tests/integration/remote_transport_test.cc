// The transport-independent suite of fabric::Remote, run over every data plane: TCP on
// the host and in the VM, RDMA (soft-RoCE rxe) in the VM. Each test starts a real server
// (fabric::Server + TcpServer + RdmaServer) on $MF_VM_ADDR in the VM, 127.0.0.1 on the
// host, and talks to it through transports::Connect.
//
// RDMA cases skip on a host without an RDMA device; inside the VM (MF_VM_ADDR set) a
// missing device is a failure, never a skip.
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>

#include "fabric/os.h"
#include "tests/integration/tcp_test_util.h"
#include "tests/integration/test_servers.h"
#include "transports/open_table.h"
#include "transports/rdma/rdma_server.h"
#include "transports/rdma/rdma_wire.h"
#include "transports/rdma/verbs.h"
#include "transports/tcp/tcp_client.h"

namespace mf {
namespace {

using testing::Host;
using testing::InVm;
using Servers = testing::TestServers;

using std::chrono::milliseconds;
using std::chrono::seconds;
using tcp::testing::ClientOpts;
using tcp::testing::FillPattern;
using tcp::testing::OpenOpts;
using tcp::testing::SecureOptions;
using Clock = std::chrono::steady_clock;

class RemoteTransport : public ::testing::TestWithParam<fabric::Scheme> {
 protected:
  void SetUp() override {
    if (GetParam() == fabric::Scheme::kRdma && !rdma::HasRdmaDevice()) {
      if (InVm()) FAIL() << "no RDMA device in the VM";
      GTEST_SKIP() << "no RDMA device on this host (the VM suite runs these)";
    }
    servers_ = Servers::Start();
    ASSERT_NE(servers_, nullptr);
  }
  Result<std::unique_ptr<fabric::Client>> Connect(std::string secret = tcp::testing::kTestSecret) {
    return transports::Connect(servers_->url(GetParam()), ClientOpts(std::move(secret)));
  }
  std::unique_ptr<Servers> servers_;
};

std::string SchemeParamName(const ::testing::TestParamInfo<fabric::Scheme>& info) {
  return std::string(fabric::SchemeName(info.param));
}

INSTANTIATE_TEST_SUITE_P(Schemes, RemoteTransport,
                         ::testing::Values(fabric::Scheme::kTcp, fabric::Scheme::kRdma), SchemeParamName);

TEST_P(RemoteTransport, RandomIoMatchesReference) {
  constexpr uint64_t kSize = 8u << 20;
  MF_ASSERT_OK_AND_ASSIGN(auto client, Connect());
  MF_ASSERT_OK(client->Create({"r", kSize, fabric::BackingKind::kMemfd, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto writer, client->Open("r", OpenOpts(true, 2, 16)));
  EXPECT_EQ(writer->transport(), GetParam() == fabric::Scheme::kRdma ? "rdma" : "tcp");
  EXPECT_TRUE(writer->writable());
  std::vector<std::byte> reference(kSize);
  std::mt19937_64 rng(42);
  // Unaligned, chunk-spanning, larger than max_transfer, and touching the region's end.
  std::vector<std::pair<uint64_t, uint64_t>> ranges = {
      {0, 1}, {kSize - 1, 1}, {4095, 2}, {kSize - 3 * 4096 - 7, 3 * 4096 + 7}, {12345, 3u << 20}};
  for (int i = 0; i < 60; ++i) {
    const uint64_t len = 1 + rng() % (300u << 10);
    ranges.emplace_back(rng() % (kSize - len + 1), len);
  }
  for (size_t i = 0; i < ranges.size(); ++i) {
    auto [off, len] = ranges[i];
    std::vector<std::byte> data(len);
    FillPattern(data, i);
    MF_ASSERT_OK(fabric::WriteAt(*writer, off, data));
    std::copy(data.begin(), data.end(), reference.begin() + static_cast<ptrdiff_t>(off));
  }
  MF_ASSERT_OK(writer->Flush());

  // Several readers at once, each on its own client, verify random ranges.
  std::atomic<int> failures{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&, t] {
      auto c = Connect();
      if (!c.ok()) {
        ADD_FAILURE() << c.status().ToString();
        ++failures;
        return;
      }
      auto reader = (*c)->Open("r", OpenOpts(false, 2, 8));
      if (!reader.ok()) {
        ADD_FAILURE() << reader.status().ToString();
        ++failures;
        return;
      }
      std::mt19937_64 r(100 + static_cast<uint64_t>(t));
      for (int i = 0; i < 40; ++i) {
        const uint64_t len = 1 + r() % (200u << 10);
        const uint64_t off = r() % (kSize - len + 1);
        std::vector<std::byte> got(len);
        Status st = fabric::ReadAt(**reader, off, got);
        if (!st.ok() || std::memcmp(got.data(), reference.data() + off, len) != 0) {
          ADD_FAILURE() << "reader " << t << " at " << off << "+" << len << ": " << st.ToString();
          ++failures;
          return;
        }
      }
    });
  }
  for (auto& th : readers) th.join();
  EXPECT_EQ(failures.load(), 0);
  std::vector<std::byte> all(kSize);
  MF_ASSERT_OK(fabric::ReadAt(*writer, 0, all));
  EXPECT_TRUE(all == reference);
}

// A batch much larger than the queue depth: requests wait for slots, each completes once.
TEST_P(RemoteTransport, LargeBatchOnShallowQueues) {
  constexpr uint64_t kSize = 4u << 20;
  MF_ASSERT_OK_AND_ASSIGN(auto client, Connect());
  MF_ASSERT_OK(client->Create({"b", kSize, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("b", OpenOpts(true, 3, 4)));
  MF_ASSERT_OK_AND_ASSIGN(fabric::Buffer buffer, remote->AllocateBuffer(kSize));
  FillPattern(buffer.span(), 7);
  constexpr size_t kRequests = 256;
  const size_t piece = kSize / kRequests;
  std::vector<fabric::IoRequest> requests(kRequests);
  fabric::IoBatch batch(kRequests);
  for (size_t i = 0; i < kRequests; ++i) {
    requests[i] = {
        fabric::IoKind::kWrite, i * piece, buffer.span().subspan(i * piece, piece), &buffer, &batch, i};
  }
  remote->Submit(requests);
  MF_ASSERT_OK(batch.Wait());
  MF_ASSERT_OK_AND_ASSIGN(fabric::Buffer back, remote->AllocateBuffer(kSize));
  batch.Reset(kRequests);
  for (size_t i = 0; i < kRequests; ++i) {
    requests[i] = {fabric::IoKind::kRead, i * piece, back.span().subspan(i * piece, piece), &back, &batch, i};
  }
  remote->Submit(requests);
  MF_ASSERT_OK(batch.Wait());
  EXPECT_EQ(std::memcmp(buffer.data(), back.data(), kSize), 0);
}

// A caller that polls completions on its own thread (as `memfabric bench` does over
// RDMA) gets every callback there; afterwards the transport's thread takes over again.
TEST_P(RemoteTransport, CallerPolling) {
  MF_ASSERT_OK_AND_ASSIGN(auto client, Connect());
  MF_ASSERT_OK(client->Create({"p", 1u << 20, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("p", OpenOpts(true, 2, 8)));
  EXPECT_TRUE(remote->can_poll());  // both TCP and RDMA let callers poll
  std::vector<std::byte> data(1u << 20);
  FillPattern(data, 5);
  MF_ASSERT_OK(fabric::WriteAt(*remote, 0, data));
  MF_ASSERT_OK_AND_ASSIGN(fabric::Buffer buffer, remote->AllocateBuffer(4096));
  remote->SetCallerPolling(true);
  size_t polled = 0;
  for (uint64_t i = 0; i < 200; ++i) {
    fabric::IoBatch batch(1);
    const uint64_t offset = (i * 7919 * 4096) % (1u << 20);
    fabric::IoRequest r{fabric::IoKind::kRead, offset, buffer.span(), &buffer, &batch, i};
    remote->Submit({&r, 1});
    if (remote->can_poll()) {
      const auto deadline = Clock::now() + seconds(10);
      while (!batch.done() && Clock::now() < deadline) {
        polled += remote->Poll();
      }
    }
    MF_ASSERT_OK(batch.Wait());
    ASSERT_EQ(std::memcmp(buffer.data(), data.data() + offset, 4096), 0) << i;
  }
  remote->SetCallerPolling(false);
  if (remote->can_poll()) EXPECT_GT(polled, 0u);
  std::vector<std::byte> got(1u << 20);
  MF_ASSERT_OK(fabric::ReadAt(*remote, 0, got));
  EXPECT_TRUE(got == data);
}

// A polling caller that submits more requests than the connection has slots: the
// transport's own thread is asleep, so Submit takes completions itself instead of waiting
// for a slot until the requests time out (the 3 s I/O timeout would fail them).
TEST_P(RemoteTransport, CallerPollingSubmitsBeyondTheQueueDepth) {
  constexpr size_t kRequests = 64;
  constexpr size_t kPiece = 4096;
  MF_ASSERT_OK_AND_ASSIGN(auto client, Connect());
  MF_ASSERT_OK(client->Create({"q", kRequests * kPiece, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("q", OpenOpts(true, 1, 2)));
  std::vector<std::byte> data(kRequests * kPiece);
  FillPattern(data, 9);
  MF_ASSERT_OK(fabric::WriteAt(*remote, 0, data));
  MF_ASSERT_OK_AND_ASSIGN(fabric::Buffer buffer, remote->AllocateBuffer(data.size()));
  std::memset(buffer.data(), 0, buffer.size());
  fabric::IoBatch batch(kRequests);
  std::vector<fabric::IoRequest> requests(kRequests);
  for (uint64_t i = 0; i < kRequests; ++i) {
    requests[i] = {
        fabric::IoKind::kRead, i * kPiece, buffer.span().subspan(i * kPiece, kPiece), &buffer, &batch, i};
  }
  remote->SetCallerPolling(true);
  remote->Submit(requests);
  const auto deadline = Clock::now() + seconds(10);
  while (!batch.done() && Clock::now() < deadline) remote->Poll();
  remote->SetCallerPolling(false);
  MF_ASSERT_OK(batch.Wait());
  EXPECT_EQ(std::memcmp(buffer.data(), data.data(), data.size()), 0);
}

TEST_P(RemoteTransport, OutOfRangeFailsAndLeavesOtherMemoryAlone) {
  constexpr uint64_t kSize = 64u << 10;
  MF_ASSERT_OK_AND_ASSIGN(auto client, Connect());
  MF_ASSERT_OK(client->Create({"a", kSize, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK(client->Create({"b", kSize, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto a, client->Open("a", OpenOpts(true, 1, 8)));
  MF_ASSERT_OK_AND_ASSIGN(auto b, client->Open("b", OpenOpts(true, 1, 8)));
  std::vector<std::byte> pa(kSize), pb(kSize);
  FillPattern(pa, 1);
  FillPattern(pb, 2);
  MF_ASSERT_OK(fabric::WriteAt(*a, 0, pa));
  MF_ASSERT_OK(fabric::WriteAt(*b, 0, pb));
  std::vector<std::byte> junk(8192, std::byte{0xee});
  Status st = fabric::WriteAt(*a, kSize - 4096, junk);
  EXPECT_EQ(st.code(), Code::kOutOfRange) << st.ToString();
  EXPECT_EQ(fabric::WriteAt(*a, kSize, std::span(junk).first(1)).code(), Code::kOutOfRange);
  EXPECT_EQ(fabric::WriteAt(*a, UINT64_MAX - 10, std::span(junk).first(100)).code(), Code::kOutOfRange);
  EXPECT_EQ(fabric::ReadAt(*a, kSize - 1, std::span(junk).first(2)).code(), Code::kOutOfRange);
  std::vector<std::byte> got(kSize);
  MF_ASSERT_OK(fabric::ReadAt(*a, 0, got));
  EXPECT_TRUE(got == pa);
  MF_ASSERT_OK(fabric::ReadAt(*b, 0, got));
  EXPECT_TRUE(got == pb);
}

TEST_P(RemoteTransport, WrongSecretLearnsNothing) {
  auto client = Connect("not the secret at all");
  ASSERT_FALSE(client.ok());
  EXPECT_EQ(client.status().code(), Code::kUnauthenticated) << client.status().ToString();
}

TEST_P(RemoteTransport, LeaseMovesOnClose) {
  MF_ASSERT_OK_AND_ASSIGN(auto client, Connect());
  MF_ASSERT_OK(client->Create({"l", 1u << 20, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto first, client->Open("l", OpenOpts(true, 2, 8)));
  auto second = client->Open("l", OpenOpts(true, 2, 8));
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), Code::kBusy) << second.status().ToString();
  std::vector<std::byte> data(4096, std::byte{1});
  EXPECT_EQ(fabric::WriteAt(*first, 0, data).code(), Code::kOk);
  MF_ASSERT_OK(first->Close());
  EXPECT_EQ(fabric::WriteAt(*first, 0, data).code(), Code::kAborted);
  MF_ASSERT_OK_AND_ASSIGN(auto third, client->Open("l", OpenOpts(true, 2, 8)));
  MF_ASSERT_OK(fabric::WriteAt(*third, 0, data));
  auto reader = client->Open("l", OpenOpts(false, 1, 8));
  ASSERT_TRUE(reader.ok());
  EXPECT_EQ(fabric::WriteAt(**reader, 0, data).code(), Code::kPermissionDenied);
}

TEST_P(RemoteTransport, DeleteRevokesReaders) {
  MF_ASSERT_OK_AND_ASSIGN(auto client, Connect());
  MF_ASSERT_OK(client->Create({"d", 1u << 20, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto reader, client->Open("d", OpenOpts(false, 1, 8)));
  std::vector<std::byte> got(4096);
  MF_ASSERT_OK(fabric::ReadAt(*reader, 0, got));
  MF_ASSERT_OK(client->Delete("d"));
  if (GetParam() != fabric::Scheme::kRdma) return;  // TCP readers keep the memory they hold
  // The registration is gone: the next read fails (and reconnecting finds no region).
  const auto deadline = Clock::now() + seconds(10);
  Status st;
  do {
    st = fabric::ReadAt(*reader, 0, got);
  } while (st.ok() && Clock::now() < deadline);
  EXPECT_FALSE(st.ok());
}

TEST(RemoteTransportAuto, PicksRdmaWhenItCan) {
  auto servers = Servers::Start();
  ASSERT_NE(servers, nullptr);
  MF_ASSERT_OK_AND_ASSIGN(auto client,
                          transports::Connect(servers->url(fabric::Scheme::kAuto), ClientOpts()));
  MF_ASSERT_OK(client->Create({"x", 1u << 20, fabric::BackingKind::kAnonymous, ""}).status());
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("x", OpenOpts(true, 1, 8)));
  const bool rdma = rdma::HasRdmaDevice();
  if (InVm()) EXPECT_TRUE(rdma) << "the VM has rxe0";
  EXPECT_EQ(remote->transport(), rdma ? "rdma" : "tcp");
  std::vector<std::byte> data(10000), got(10000);
  FillPattern(data, 3);
  MF_ASSERT_OK(fabric::WriteAt(*remote, 5, data));
  MF_ASSERT_OK(fabric::ReadAt(*remote, 5, got));
  EXPECT_TRUE(data == got);
  // rdma:// without a device is a clear error, not a hang.
  if (!rdma) {
    auto r = transports::Connect(servers->url(fabric::Scheme::kRdma), ClientOpts());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Code::kUnsupported) << r.status().ToString();
  }
}

// ---- RDMA only: the server's side of the security rules, spoken raw -----------------------

class RawRdma {
 public:
  // Connects a queue pair to port presenting token; returns the accept or the server's
  // reject as a Status.
  Result<rdma::wire::Accept> Connect(uint16_t port, const rdma::wire::Token& token) {
    MF_ASSIGN_OR_RETURN(channel_, rdma::MakeEventChannel());
    rdma_cm_id* raw = nullptr;
    if (rdma_create_id(channel_.get(), &raw, nullptr, RDMA_PS_TCP) != 0)
      return Status::FromErrno(errno, "id");
    id_ = rdma::CmId(raw);
    sockaddr_storage addr{};
    MF_RETURN_IF_ERROR(rdma::ResolveSockaddr(Host(), port, &addr));
    const auto deadline = Clock::now() + seconds(5);
    if (rdma_resolve_addr(raw, nullptr, reinterpret_cast<sockaddr*>(&addr), 2000) != 0) {
      return Status::FromErrno(errno, "resolve");
    }
    MF_RETURN_IF_ERROR(Expect(RDMA_CM_EVENT_ADDR_RESOLVED, deadline).status());
    if (rdma_resolve_route(raw, 2000) != 0) return Status::FromErrno(errno, "route");
    MF_RETURN_IF_ERROR(Expect(RDMA_CM_EVENT_ROUTE_RESOLVED, deadline).status());
    pd_ = rdma::ProtectionDomain(ibv_alloc_pd(raw->verbs));
    cq_ = rdma::CompletionQueue(ibv_create_cq(raw->verbs, 8, nullptr, nullptr, 0));
    if (!pd_ || !cq_) return Internal("pd/cq");
    ibv_qp_init_attr attr{};
    attr.send_cq = attr.recv_cq = cq_.get();
    attr.qp_type = IBV_QPT_RC;
    attr.cap.max_send_wr = attr.cap.max_recv_wr = 4;
    attr.cap.max_send_sge = attr.cap.max_recv_sge = 1;
    if (rdma_create_qp(raw, pd_.get(), &attr) != 0) return Status::FromErrno(errno, "qp");
    auto request = rdma::wire::EncodeConnectRequest({rdma::wire::kVersion, token});
    rdma_conn_param param{};
    param.private_data = request.data();
    param.private_data_len = static_cast<uint8_t>(request.size());
    param.initiator_depth = 1;
    param.retry_count = 3;
    param.rnr_retry_count = 7;
    if (rdma_connect(raw, &param) != 0) return Status::FromErrno(errno, "connect");
    return Expect(RDMA_CM_EVENT_ESTABLISHED, deadline);
  }

  // One RDMA WRITE of 8 bytes at remote addr/rkey; the completion's status.
  Result<ibv_wc_status> Write(uint64_t addr, uint32_t rkey) {
    auto mr = rdma::Register(pd_.get(), buf_.data(), buf_.size(), IBV_ACCESS_LOCAL_WRITE);
    if (!mr.ok()) return mr.status();
    ibv_sge sge{reinterpret_cast<uintptr_t>(buf_.data()), 8, (*mr)->lkey};
    ibv_send_wr wr{};
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = IBV_WR_RDMA_WRITE;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = addr;
    wr.wr.rdma.rkey = rkey;
    ibv_send_wr* bad = nullptr;
    if (ibv_post_send(id_->qp, &wr, &bad) != 0) return Status::FromErrno(errno, "post");
    const auto deadline = Clock::now() + seconds(20);
    ibv_wc wc{};
    while (ibv_poll_cq(cq_.get(), 1, &wc) == 0) {
      if (Clock::now() > deadline) return Status(Code::kTimeout, "no completion");
      std::this_thread::sleep_for(milliseconds(1));
    }
    return wc.status;
  }

 private:
  Result<rdma::wire::Accept> Expect(rdma_cm_event_type want, Clock::time_point deadline) {
    MF_ASSIGN_OR_RETURN(rdma::CmEvent event, rdma::WaitCmEvent(channel_.get(), deadline));
    std::span<const std::byte> data(static_cast<const std::byte*>(event->param.conn.private_data),
                                    event->param.conn.private_data ? event->param.conn.private_data_len : 0);
    if (event->event == RDMA_CM_EVENT_REJECTED) return rdma::wire::DecodeReject(data);
    if (event->event != want) return Internal(std::string("unexpected ") + rdma_event_str(event->event));
    if (want == RDMA_CM_EVENT_ESTABLISHED) return rdma::wire::DecodeAccept(data);
    return rdma::wire::Accept{};
  }

  std::array<std::byte, 64> buf_{};
  rdma::EventChannel channel_;
  rdma::ProtectionDomain pd_;  // before id_: the QP goes first
  rdma::CompletionQueue cq_;
  rdma::CmId id_;
};

TEST(RemoteTransportRdma, ServerEnforcesTokensAndAccess) {
  if (!rdma::HasRdmaDevice()) {
    if (InVm()) FAIL() << "no RDMA device in the VM";
    GTEST_SKIP() << "no RDMA device on this host (the VM suite runs this)";
  }
  auto servers = Servers::Start();
  ASSERT_NE(servers, nullptr);
  const uint16_t port = servers->rdma->port();
  // A made-up token gets a reject and no rkey.
  {
    RawRdma raw;
    rdma::wire::Token bogus{};
    bogus.fill(0x5a);
    auto accepted = raw.Connect(port, bogus);
    ASSERT_FALSE(accepted.ok());
    EXPECT_EQ(accepted.status().code(), Code::kNotFound) << accepted.status().ToString();
  }
  // A reader's token gives a read-only registration: an RDMA WRITE through it fails on
  // the server's device and leaves the region as it was.
  MF_ASSERT_OK_AND_ASSIGN(auto control,
                          tcp::TcpClient::Connect(servers->url(fabric::Scheme::kTcp), ClientOpts(), false));
  MF_ASSERT_OK(control->Create({"s", 1u << 20, fabric::BackingKind::kAnonymous, ""}).status());
  {
    MF_ASSERT_OK_AND_ASSIGN(auto writer, control->Open("s", OpenOpts(true, 1, 8)));
    std::vector<std::byte> ones(4096, std::byte{0x11});
    MF_ASSERT_OK(fabric::WriteAt(*writer, 0, ones));
    MF_ASSERT_OK_AND_ASSIGN(auto opened, control->OpenRegion("s", OpenOpts(false, 1, 4)));
    ASSERT_EQ(opened.rdma_port, port);
    RawRdma raw;
    MF_ASSERT_OK_AND_ASSIGN(rdma::wire::Accept accept, raw.Connect(port, opened.token));
    EXPECT_FALSE(accept.writable);
    MF_ASSERT_OK_AND_ASSIGN(ibv_wc_status status, raw.Write(accept.addr, accept.rkey));
    EXPECT_EQ(status, IBV_WC_REM_ACCESS_ERR) << ibv_wc_status_str(status);
    std::vector<std::byte> got(4096);
    MF_ASSERT_OK(fabric::ReadAt(*writer, 0, got));
    EXPECT_TRUE(got == ones);
    // After the open ends, its token no longer connects.
    rdma::wire::Token token = opened.token;
    MF_ASSERT_OK(opened.remote->Close());
    RawRdma late;
    auto again = late.Connect(port, token);
    EXPECT_FALSE(again.ok());
  }
}

constexpr char kServeChildEnv[] = "MF_TEST_SERVE_CHILD";

// The server process of ServerKilledThenRestarted: PORT:READY_FD:PATH in the environment.
// Runs before main (a static initializer), serves until killed.
[[noreturn]] void ServeChild(const char* spec) {
  char path[4096] = {};
  unsigned port = 0;
  int ready = -1;
  if (std::sscanf(spec, "%u:%d:%4095s", &port, &ready, path) != 3) _exit(2);
  fabric::Server server(SecureOptions());
  if (!server.Create({"f", 4u << 20, fabric::BackingKind::kFile, path}).ok()) _exit(3);
  auto opens = std::make_shared<transports::OpenTable>();
  auto r = rdma::RdmaServer::Start(opens, {Host(), static_cast<uint16_t>(port)});
  if (!r.ok()) _exit(4);
  tcp::ListenOptions listen;
  listen.host = Host();
  listen.port = static_cast<uint16_t>(port);
  listen.opens = opens;
  listen.rdma_port = (*r)->port();
  auto t = tcp::TcpServer::Start(server, listen);
  if (!t.ok()) _exit(5);
  char c = 1;
  if (::write(ready, &c, 1) != 1) _exit(6);
  ::close(ready);
  for (;;) ::pause();
}

[[maybe_unused]] const bool kIsServeChild = [] {
  if (const char* spec = std::getenv(kServeChildEnv)) ServeChild(spec);
  return false;
}();

// Kill the server (a child process) mid-transfer: the client reports an error within its
// timeout; restart it on the same ports and the client reconnects by itself.
TEST_P(RemoteTransport, ServerKilledThenRestarted) {
  if (GetParam() != fabric::Scheme::kRdma) GTEST_SKIP() << "TCP: see TcpTransport.DeadServerSurfacesAsError";
  servers_.reset();
  tcp::testing::TempDir dir;
  const std::string path = (dir.path() / "region").string();
  const auto port = static_cast<uint16_t>(20000 + ::getpid() % 20000);
  // The server runs in a fresh process image (this binary, re-executed): a plain fork of
  // this multi-threaded test could inherit a lock held by one of the client's threads.
  auto spawn = [&]() -> pid_t {
    int ready[2];
    if (::pipe(ready) != 0) return -1;
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
    env_strings.push_back(fmt::format("{}={}:{}:{}", kServeChildEnv, port, ready[1], path));
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    char exe[] = "/proc/self/exe";
    char* argv[] = {exe, nullptr};
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(ready[0]);
      ::execve(exe, argv, envp.data());
      _exit(127);
    }
    ::close(ready[1]);
    char c = 0;
    pollfd p{ready[0], POLLIN, 0};
    const bool ok = ::poll(&p, 1, 30000) == 1 && ::read(ready[0], &c, 1) == 1;
    ::close(ready[0]);
    if (!ok && pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    return ok ? pid : -1;
  };
  pid_t child = spawn();
  ASSERT_GT(child, 0);
  fabric::Url url;
  url.scheme = fabric::Scheme::kRdma;
  url.host = Host();
  url.port = port;
  auto options = ClientOpts();
  options.io_timeout = milliseconds(2000);
  options.rdma.ack_timeout_exponent = 14;  // ~67 ms
  options.rdma.retry_count = 3;
  MF_ASSERT_OK_AND_ASSIGN(auto client, transports::Connect(url, options));
  MF_ASSERT_OK_AND_ASSIGN(auto remote, client->Open("f", OpenOpts(true, 2, 8)));
  std::vector<std::byte> data(1u << 20);
  FillPattern(data, 9);
  MF_ASSERT_OK(fabric::WriteAt(*remote, 0, data));
  MF_ASSERT_OK(remote->Flush());

  std::atomic<bool> failed{false};
  Clock::time_point killed_at;
  Clock::time_point failed_at;
  std::thread io([&] {
    std::vector<std::byte> got(256u << 10);
    while (!failed) {
      if (!fabric::ReadAt(*remote, 0, got).ok()) {
        failed_at = Clock::now();
        failed = true;
      }
    }
  });
  std::this_thread::sleep_for(milliseconds(300));
  killed_at = Clock::now();
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  io.join();
  const auto took = std::chrono::duration_cast<milliseconds>(failed_at - killed_at);
  EXPECT_LT(took, milliseconds(8000)) << "the dead server surfaced after " << took.count() << " ms";

  child = spawn();
  ASSERT_GT(child, 0);
  const auto deadline = Clock::now() + seconds(30);
  std::vector<std::byte> got(data.size());
  Status st;
  do {
    std::this_thread::sleep_for(milliseconds(200));
    st = fabric::ReadAt(*remote, 0, got);
  } while (!st.ok() && Clock::now() < deadline);
  EXPECT_TRUE(st.ok()) << "no reconnect: " << st.ToString();
  EXPECT_TRUE(got == data) << "file-backed data after the restart";
  EXPECT_EQ(remote->transport(), "rdma");
  MF_ASSERT_OK(remote->Close());
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
}

}  // namespace
}  // namespace mf
