// uffd::Mapping end to end over a real transport: a real memfabric server, a real
// client, the real kernel userfaultfd. TCP on loopback by default; the VM suite runs it
// again with MF_TEST_SCHEME=rdma over rxe (tests/integration/test_servers.h).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include "tests/death_test_util.h"
#include "tests/integration/tcp_test_util.h"
#include "tests/integration/test_servers.h"
#include "uffd/mapping.h"

namespace mf::uffd {
namespace {

using mf::testing::TestScheme;
using tcp::testing::ClientOpts;
using TestServer = mf::testing::TestServers;

constexpr size_t kSize = 16u << 20;

class UffdOverTcp : public ::testing::TestWithParam<size_t> {
 protected:
  void SetUp() override {
    server_ = TestServer::Start();
    ASSERT_NE(server_, nullptr);
    handle_ = mf::testing::CreateSeededRegion(*server_, "r", kSize, 3);
    ASSERT_NE(handle_.region(), nullptr);
  }
  std::unique_ptr<fabric::Remote> Open(bool writable) {
    auto remote = mf::testing::OpenRegion(*server_, "r", writable);
    if (remote != nullptr && TestScheme() == fabric::Scheme::kRdma) EXPECT_EQ(remote->transport(), "rdma");
    return remote;
  }
  MappingOptions Options(bool prefetch) const {
    MappingOptions o;
    o.chunk_size = GetParam();
    o.prefetch = prefetch;
    return o;
  }
  std::byte* server_bytes() const { return handle_.region()->data(); }

  std::unique_ptr<TestServer> server_;
  fabric::RegionHandle handle_;
};

TEST_P(UffdOverTcp, RandomAndSequentialReadsMatchTheServer) {
  auto remote = Open(false);
  ASSERT_NE(remote, nullptr);
  for (bool prefetch : {false, true}) {
    auto m = Mapping::Create(*remote, Options(prefetch));
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    std::mt19937 rng(11);
    for (int i = 0; i < 3000; ++i) {
      size_t off = rng() % kSize;
      ASSERT_EQ((*m)->data()[off], server_bytes()[off]) << "offset " << off;
    }
    EXPECT_EQ(std::memcmp((*m)->data(), server_bytes(), kSize), 0);
    EXPECT_TRUE((*m)->Close().ok());
  }
}

TEST_P(UffdOverTcp, ManyThreadsFaultingTheSameAndDifferentChunks) {
  auto remote = Open(false);
  ASSERT_NE(remote, nullptr);
  auto m = Mapping::Create(*remote, Options(false));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 500; ++i) {
        size_t off = t % 2 == 0 ? rng() % (2 * GetParam()) : rng() % kSize;
        if ((*m)->data()[off] != server_bytes()[off]) mismatches++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_P(UffdOverTcp, WritesAreVisibleToASecondClientOnlyAfterSync) {
  auto writer = Open(true);
  ASSERT_NE(writer, nullptr);
  auto m = Mapping::Create(*writer, Options(true));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::vector<std::byte> expect(server_bytes(), server_bytes() + kSize);
  std::mt19937 rng(5);
  for (int i = 0; i < 300; ++i) {
    size_t off = rng() % (kSize - 5000);
    auto v = static_cast<int>(rng() & 0xff);
    std::memset((*m)->data() + off, v, 5000);
    std::memset(expect.data() + off, v, 5000);
  }
  auto reader = Open(false);
  ASSERT_NE(reader, nullptr);
  std::vector<std::byte> seen(kSize);
  ASSERT_TRUE(fabric::ReadAt(*reader, 0, seen).ok());
  EXPECT_NE(seen, expect) << "writes reached the server before sync";
  ASSERT_TRUE((*m)->Sync().ok());
  ASSERT_TRUE(fabric::ReadAt(*reader, 0, seen).ok());
  EXPECT_EQ(seen, expect);

  // Close pushes what was written after the last sync.
  std::memset((*m)->data() + kSize - 100, 0x3c, 100);
  std::memset(expect.data() + kSize - 100, 0x3c, 100);
  ASSERT_TRUE((*m)->Close().ok());
  ASSERT_TRUE(fabric::ReadAt(*reader, 0, seen).ok());
  EXPECT_EQ(seen, expect);
}

INSTANTIATE_TEST_SUITE_P(Chunks, UffdOverTcp, ::testing::Values(4u << 10, 64u << 10, 2u << 20),
                         [](const auto& info) { return std::to_string(info.param >> 10) + "K"; });

// The client side of the dead-server test, in its own process: maps the region, proves
// a fault is served, tells the parent (`ready`), waits until the parent has killed the
// server (`go`), then touches a chunk it never pulled (`chunk_size` bytes, the first chunk
// at 2 MiB too: the region is 4 MiB). Exits with a code naming the step
// that went wrong; SIGBUS is the expected end.
[[noreturn]] void TouchAfterServerDies(uint16_t port, size_t chunk_size, int ready, int go) {
  transports::ClientOptions opts = ClientOpts();
  opts.io_timeout = std::chrono::milliseconds(2000);
  fabric::Url url{TestScheme(), mf::testing::Host(), port, ""};
  auto client = transports::Connect(url, opts);
  if (!client.ok()) _exit(10);
  auto remote = (*client)->Open("r", fabric::OpenOptions{});
  if (!remote.ok()) _exit(11);
  MappingOptions mo;
  mo.chunk_size = chunk_size;
  mo.prefetch = false;
  auto m = Mapping::Create(**remote, mo);
  if (!m.ok()) _exit(12);
  if ((*m)->data()[0] != std::byte{0}) _exit(13);  // served while the server runs
  char byte = 1;
  if (::write(ready, &byte, 1) != 1 || ::read(go, &byte, 1) != 1) _exit(14);
  // SIGBUS's default action ends the process the moment it comes. ASan's handler would
  // first report it with a symbolized stack, which takes seconds in the test VM and would
  // count against the parent's time limit (ASan lets a program set its own disposition).
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  if (::sigaction(SIGBUS, &default_action, nullptr) != 0) _exit(15);
  volatile std::byte b = (*m)->data()[3u << 20];  // SIGBUS expected here
  (void)b;
  _exit(0);
}

// A server process that dies while the client maps its region: the faulting thread must
// get SIGBUS (within the client's I/O timeout at worst), never a hang and never data.
// Plain fork()s rather than a gtest death test: its threadsafe style re-runs the test body
// in the child, which would start a second server. At each chunk size: a 2 MiB chunk
// fails in several pieces, a 4 KiB one in one small request.
class UffdOverTcpDeathTest : public ::testing::TestWithParam<size_t> {};

TEST_P(UffdOverTcpDeathTest, DeadServerGivesSigbus) {
  // Each pipe's write end stays open only in the process that writes it, so a child that
  // dies early shows up as end-of-file here instead of a read that never returns.
  int ports[2];
  ASSERT_EQ(::pipe(ports), 0);
  pid_t server_pid = ::fork();
  ASSERT_GE(server_pid, 0);
  if (server_pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
    ::close(ports[0]);
    auto s = TestServer::Start();
    if (s == nullptr || !s->server->Create({"r", 4u << 20, fabric::BackingKind::kAnonymous, ""}).ok())
      _exit(1);
    uint16_t port = s->tcp->port();
    (void)!::write(ports[1], &port, sizeof(port));
    for (;;) ::pause();
  }
  ::close(ports[1]);
  pid_t client_pid = -1;
  auto reap = [&] {  // on an early return too: no child outlives the test
    for (pid_t pid : {client_pid, server_pid}) {
      if (pid > 0 && ::kill(pid, SIGKILL) == 0) (void)::waitpid(pid, nullptr, 0);
    }
  };
  struct Reaper {
    std::function<void()> run;
    ~Reaper() { run(); }
  } reaper{reap};
  uint16_t port = 0;
  ASSERT_EQ(::read(ports[0], &port, sizeof(port)), static_cast<ssize_t>(sizeof(port)))
      << "the server child failed to start";
  ::close(ports[0]);

  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  client_pid = ::fork();
  ASSERT_GE(client_pid, 0);
  if (client_pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::close(ready[0]);
    ::close(go[1]);
    TouchAfterServerDies(port, GetParam(), ready[1], go[0]);
  }
  ::close(ready[1]);
  ::close(go[0]);
  char byte = 0;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1) << "the client failed before the server was killed";
  ASSERT_EQ(::kill(server_pid, SIGKILL), 0);
  int server_status = 0;
  ASSERT_EQ(::waitpid(server_pid, &server_status, 0), server_pid);
  server_pid = -1;
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::write(go[1], &byte, 1), 1);
  int status = 0;
  ASSERT_EQ(::waitpid(client_pid, &status, 0), client_pid);
  client_pid = -1;
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, std::chrono::seconds(5));
  // Exit codes 10..15 are the client's own failures, never ASan's report of SIGBUS.
  const bool own_failure = WIFEXITED(status) && WEXITSTATUS(status) >= 10;
  EXPECT_TRUE(mf::testing::DiedOf(SIGBUS)(status) && !own_failure)
      << "client "
      << (WIFEXITED(status) ? "exited with " + std::to_string(WEXITSTATUS(status))
                            : "died of signal " + std::to_string(WTERMSIG(status)));
  ::close(ready[0]);
  ::close(go[1]);
}

INSTANTIATE_TEST_SUITE_P(Chunks, UffdOverTcpDeathTest, ::testing::Values(4u << 10, 64u << 10, 2u << 20),
                         [](const auto& info) { return std::to_string(info.param >> 10) + "K"; });

}  // namespace
}  // namespace mf::uffd
