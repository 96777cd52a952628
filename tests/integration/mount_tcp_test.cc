// fabric::Mount end to end over a real transport: a real memfabric server and client on
// loopback TCP (or the data plane named by MF_TEST_SCHEME, see test_servers.h).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "fabric/mount.h"
#include "tests/integration/tcp_test_util.h"
#include "tests/integration/test_servers.h"

namespace mf::fabric {
namespace {

using mf::testing::TestScheme;
using TestServer = mf::testing::TestServers;

constexpr size_t kSize = 16u << 20;

class MountOverTcp : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = TestServer::Start();
    ASSERT_NE(server_, nullptr);
    handle_ = mf::testing::CreateSeededRegion(*server_, "r", kSize, 3);
    ASSERT_NE(handle_.region(), nullptr);
  }
  std::unique_ptr<Remote> Open(bool writable) { return mf::testing::OpenRegion(*server_, "r", writable); }
  std::byte* server_bytes() const { return handle_.region()->data(); }

  std::unique_ptr<TestServer> server_;
  RegionHandle handle_;
};

TEST_F(MountOverTcp, ReadsWritesAndCloseMatchAReference) {
  auto remote = Open(true);
  ASSERT_NE(remote, nullptr);
  std::vector<std::byte> reference(server_bytes(), server_bytes() + kSize);
  MountOptions o;
  o.push_interval = std::chrono::milliseconds(20);
  auto m = Mount::Create(*remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  Mount& mount = **m;
  std::mt19937_64 rng(17);
  std::vector<std::byte> buf;
  for (int i = 0; i < 2000; ++i) {
    const uint64_t off = rng() % kSize;
    const size_t len = 1 + rng() % std::min<uint64_t>(kSize - off, 200000);
    buf.resize(len);
    if (rng() % 2 == 0) {
      ASSERT_TRUE(mount.Read(off, buf).ok());
      ASSERT_EQ(std::memcmp(buf.data(), reference.data() + off, len), 0) << "read at " << off;
    } else {
      for (auto& b : buf) b = static_cast<std::byte>(rng());
      ASSERT_TRUE(mount.Write(off, buf).ok());
      std::memcpy(reference.data() + off, buf.data(), len);
    }
  }
  ASSERT_TRUE(mount.WaitAllLocal(std::chrono::seconds(60)).ok());
  const MountStats s = mount.stats();
  EXPECT_EQ(s.bytes_local, kSize);
  EXPECT_GT(s.pull_bytes_per_second, 0);
  ASSERT_TRUE(mount.Close().ok());
  EXPECT_EQ(std::memcmp(server_bytes(), reference.data(), kSize), 0);
  EXPECT_TRUE(remote->Close().ok());
}

TEST_F(MountOverTcp, ReadOnlyMountAndConcurrentReaders) {
  auto remote = Open(false);
  ASSERT_NE(remote, nullptr);
  MountOptions o;
  o.chunk_size = 256u << 10;
  auto m = Mount::Create(*remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  Mount& mount = **m;
  EXPECT_TRUE(mount.read_only());
  std::vector<std::byte> one(1);
  EXPECT_EQ(mount.Write(0, one).code(), Code::kPermissionDenied);
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<std::byte> buf(3000);
      for (int i = 0; i < 300; ++i) {
        const uint64_t off = rng() % (kSize - buf.size());
        if (!mount.Read(off, buf).ok() || std::memcmp(buf.data(), server_bytes() + off, buf.size()) != 0)
          ++mismatches;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
  ASSERT_TRUE(mount.WaitAllLocal(std::chrono::seconds(60)).ok());
  EXPECT_EQ(std::memcmp(mount.data(), server_bytes(), kSize), 0);
  EXPECT_TRUE(mount.Close().ok());
}

}  // namespace
}  // namespace mf::fabric
