// fabric Migration end to end: a real memfabric server (TCP data plane, or the one named by
// MF_TEST_SCHEME, see test_servers.h), a source and a destination each with its own client
// session, talking over a loopback TCP connection. A writer thread keeps writing a known
// pattern into the source during pre-copy; after finalize the destination's bytes equal the
// source's final bytes. Abort paths: the destination killed mid-pull, and the channel
// broken mid-finalize; the source resumes with its lease and nothing is lost.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "fabric/migration.h"
#include "tests/integration/tcp_test_util.h"
#include "tests/integration/test_servers.h"
#include "tests/migration_test_util.h"
#include "transports/connect.h"

namespace mf::fabric {
namespace {

using mf::testing::TestScheme;
using std::chrono::milliseconds;
using tcp::testing::ClientOpts;
using TestServer = mf::testing::TestServers;

constexpr size_t kSize = 32u << 20;
constexpr size_t kBlock = 4096;          // the writer's unit
constexpr size_t kHotBytes = kSize / 4;  // the writer writes here (a working set)

// A connected loopback TCP pair: the migration channel as it runs between two hosts.
std::pair<UniqueFd, UniqueFd> TcpPair() {
  UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(listener);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  EXPECT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), len), 0);
  EXPECT_EQ(::listen(listener.get(), 1), 0);
  EXPECT_EQ(::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  UniqueFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::connect(client.get(), reinterpret_cast<sockaddr*>(&addr), len), 0);
  UniqueFd server(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  EXPECT_TRUE(server);
  return {std::move(client), std::move(server)};
}

class MigrationOverTcp : public mf::testing::MigrationWriterTest {
 protected:
  void SetUp() override {
    server_ = TestServer::Start();
    ASSERT_NE(server_, nullptr);
    handle_ = mf::testing::CreateSeededRegion(*server_, "r", kSize, 3);
    ASSERT_NE(handle_.region(), nullptr);
    auto w = Open(true);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    MountOptions mo;
    mo.push_interval = milliseconds(10);
    auto s = MountSource::Create(std::move(w).value(), mo, [this] { return Open(true); });
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    source_ = std::move(s).value();
    ASSERT_TRUE(source_->mount().WaitAllLocal(milliseconds(60000)).ok());
    auto [a, b] = TcpPair();
    source_fd_ = std::move(a);
    dest_fd_ = std::move(b);
  }

  // Each open on its own client session, as two hosts would have.
  Result<std::unique_ptr<Remote>> Open(bool writable) {
    auto client = transports::Connect(server_->url(TestScheme()), ClientOpts());
    if (!client.ok()) return client.status();
    OpenOptions o;
    o.writable = writable;
    return (*client)->Open("r", o);
  }
  std::byte* server_bytes() const { return handle_.region()->data(); }

  // Writes blocks of a known pattern: block b of write n holds (n, b) in every word.
  void StartWriter() {
    StartWriterLoop(
        [this, rng = std::mt19937_64(11), block = std::vector<uint64_t>(kBlock / 8)](uint64_t n) mutable {
          const uint64_t b = rng() % (kHotBytes / kBlock);
          std::fill(block.begin(), block.end(), (n << 32) | b);
          ASSERT_TRUE(source_->mount().Write(b * kBlock, std::as_bytes(std::span(block))).ok());
          if (n % 16 == 0) std::this_thread::sleep_for(std::chrono::microseconds(500));
        });
  }
  SeederOptions Hooks() {
    SeederOptions o;
    o.suspend = [this] {
      if (writer_running()) AwaitWrites(40);  // some writes during pre-copy
      StopWriter();
      return Status::Ok();
    };
    o.resume = [this] { resumed_.store(true); };
    return o;
  }
  LeecherOptions DestOptions() {
    LeecherOptions o;
    o.open_writable = [this] { return Open(true); };
    return o;
  }
  std::vector<std::byte> SourceBytes() { return {source_->mount().data(), source_->mount().data() + kSize}; }
  std::vector<std::byte> ServerBytes() { return {server_bytes(), server_bytes() + kSize}; }

  // After an abort: the source holds the lease, writes reach the server, nothing is lost.
  void ExpectSourceResumed() {
    EXPECT_FALSE(source_->mount().detached());
    EXPECT_FALSE(source_->mount().read_only());
    EXPECT_EQ(Open(true).status().code(), Code::kBusy) << "the source holds the lease";
    std::vector<std::byte> more(3 * kBlock, std::byte{0x5a});
    ASSERT_TRUE(source_->mount().Write(kSize / 2, more).ok());
    ASSERT_TRUE(source_->mount().Sync().ok());
    EXPECT_TRUE(SourceBytes() == ServerBytes()) << "the server holds the source's bytes";
  }

  std::unique_ptr<TestServer> server_;
  RegionHandle handle_;
  std::unique_ptr<MountSource> source_;
  UniqueFd source_fd_, dest_fd_;
  std::atomic<bool> resumed_{false};
};

TEST_F(MigrationOverTcp, DestinationEndsWithTheSourcesFinalBytes) {
  StartWriter();
  AwaitWrites(20);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok()) << seeder.status().ToString();
  auto ro = Open(false);
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  auto leecher = Leecher::Start(std::move(ro).value(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok()) << leecher.status().ToString();
  Status run;
  auto stats = Migrate(**seeder, **leecher, &run);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ASSERT_TRUE(run.ok()) << run.ToString();
  EXPECT_FALSE(resumed_.load());
  EXPECT_GT(writes_.load(), 0u);
  EXPECT_GT(stats->dirty_chunks, 0u);
  std::printf(
      "downtime %.3f ms: suspend %.3f, push %.3f, hand-over %.3f, lease %.3f, re-pull %.3f; "
      "%llu dirty chunks (%llu bytes), %llu writes during pre-copy of %.1f ms over %s\n",
      static_cast<double>(stats->downtime_ns) / 1e6, static_cast<double>(stats->suspend_ns) / 1e6,
      static_cast<double>(stats->push_ns) / 1e6, static_cast<double>(stats->handover_ns) / 1e6,
      static_cast<double>(stats->lease_ns) / 1e6, static_cast<double>(stats->repull_ns) / 1e6,
      static_cast<unsigned long long>(stats->dirty_chunks),
      static_cast<unsigned long long>(stats->dirty_bytes), static_cast<unsigned long long>(writes_.load()),
      static_cast<double>(stats->precopy_ns) / 1e6,
      std::string((*leecher)->writable_remote()->transport()).c_str());

  const auto final_bytes = SourceBytes();
  EXPECT_TRUE(ServerBytes() == final_bytes) << "server differs from the source's final bytes";
  Mount& dm = (*leecher)->mount();
  EXPECT_FALSE(dm.read_only());
  std::vector<std::byte> dest_bytes(kSize);
  ASSERT_TRUE(dm.Read(0, dest_bytes).ok());
  EXPECT_TRUE(dest_bytes == final_bytes) << "destination differs from the source's final bytes";
  EXPECT_EQ(Open(true).status().code(), Code::kBusy) << "the destination holds the lease";

  // The destination is the writer now, and can be the source of the next migration.
  std::vector<std::byte> more(kBlock, std::byte{0x77});
  ASSERT_TRUE(dm.Write(kBlock * 3, more).ok());
  ASSERT_TRUE(dm.Sync().ok());
  EXPECT_EQ(std::memcmp(server_bytes() + kBlock * 3, more.data(), kBlock), 0);
}

TEST_F(MigrationOverTcp, DestinationKilledMidPullLeavesTheSourceRunning) {
  StartWriter();
  AwaitWrites(20);
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), Hooks());
  ASSERT_TRUE(seeder.ok());
  auto ro = Open(false);
  ASSERT_TRUE(ro.ok());
  auto leecher = Leecher::Start(std::move(ro).value(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok());
  // Some of the region is local, most of it is not yet (when the pull is not too fast).
  const auto deadline = std::chrono::steady_clock::now() + milliseconds(5000);
  while ((*leecher)->mount().stats().bytes_local == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  const uint64_t pulled = (*leecher)->mount().stats().bytes_local;
  (*leecher)->Kill();
  leecher->reset();
  std::printf("destination killed with %llu of %zu bytes pulled\n", static_cast<unsigned long long>(pulled),
              kSize);
  auto stats = (*seeder)->Finalize();
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Code::kUnavailable) << stats.status().ToString();
  EXPECT_FALSE(resumed_.load()) << "never suspended";
  const uint64_t before = writes_.load();
  std::this_thread::sleep_for(milliseconds(20));
  EXPECT_GT(writes_.load(), before) << "the writer kept running";
  StopWriter();
  ExpectSourceResumed();
}

TEST_F(MigrationOverTcp, ChannelBrokenMidFinalizeResumesTheSource) {
  StartWriter();
  AwaitWrites(20);
  const int dest_socket = ::dup(dest_fd_.get());
  ASSERT_GE(dest_socket, 0);
  UniqueFd dest_socket_owner(dest_socket);
  SeederOptions o = Hooks();
  // The network goes while the source is suspended, before the dirty set is out.
  o.suspend = [this, dest_socket] {
    AwaitWrites(40);
    StopWriter();
    ::shutdown(dest_socket, SHUT_RDWR);
    return Status::Ok();
  };
  auto seeder = Seeder::Start(*source_, std::move(source_fd_), o);
  ASSERT_TRUE(seeder.ok());
  auto ro = Open(false);
  ASSERT_TRUE(ro.ok());
  auto leecher = Leecher::Start(std::move(ro).value(), std::move(dest_fd_), DestOptions());
  ASSERT_TRUE(leecher.ok());
  Status run;
  auto stats = Migrate(**seeder, **leecher, &run);
  ASSERT_FALSE(stats.ok());
  EXPECT_FALSE(run.ok());
  EXPECT_TRUE(resumed_.load());
  EXPECT_TRUE((*leecher)->mount().read_only());
  EXPECT_EQ((*leecher)->writable_remote(), nullptr);
  ExpectSourceResumed();
}

}  // namespace
}  // namespace mf::fabric
