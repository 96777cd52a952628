// uffd::Mapping on the real kernel userfaultfd, over MemoryRemote (the end-to-end tests
// over TCP and RDMA are in tests/integration and tests/vm).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <thread>

#include "fabric/memory_remote.h"
#include "tests/death_test_util.h"
#include "uffd/mapping.h"

namespace mf::uffd {
namespace {

using fabric::MemoryRegion;
using fabric::MemoryRemote;

void FillPattern(std::span<std::byte> bytes, uint32_t seed) {
  std::mt19937 rng(seed);
  for (size_t i = 0; i < bytes.size(); i += 4) {
    uint32_t v = rng();
    std::memcpy(bytes.data() + i, &v, std::min<size_t>(4, bytes.size() - i));
  }
}

struct Param {
  size_t chunk;
  bool prefetch;
  WriteTracking tracking;
};

std::string Name(const ::testing::TestParamInfo<Param>& info) {
  return std::to_string(info.param.chunk >> 10) + "K_" + (info.param.prefetch ? "prefetch" : "noprefetch") +
         "_" + (info.param.tracking == WriteTracking::kAsync ? "async" : "sync");
}

class MappingTest : public ::testing::TestWithParam<Param> {
 protected:
  static constexpr size_t kSize = 8u << 20;
  void SetUp() override {
    region_ = std::make_shared<MemoryRegion>("m", kSize);
    FillPattern(region_->bytes(), 42);
    if (GetParam().tracking == WriteTracking::kAsync) {
      auto features = Userfaultfd::AvailableFeatures();
      ASSERT_TRUE(features.ok()) << features.status().ToString();
      if ((*features & UFFD_FEATURE_WP_ASYNC) == 0)
        GTEST_SKIP() << "kernel lacks async WP (the VM suite covers sync)";
    }
  }
  MappingOptions Options() const {
    MappingOptions o;
    o.chunk_size = GetParam().chunk;
    o.prefetch = GetParam().prefetch;
    o.tracking = GetParam().tracking;
    return o;
  }
  std::shared_ptr<MemoryRegion> region_;
};

TEST_P(MappingTest, SequentialAndRandomReadsMatchTheServer) {
  MemoryRemote remote(region_, false);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ((*m)->tracking(), WriteTracking::kOff);
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    size_t off = rng() % kSize;
    ASSERT_EQ((*m)->data()[off], region_->data()[off]) << "offset " << off;
  }
  EXPECT_EQ(std::memcmp((*m)->data(), region_->data(), kSize), 0);
  // The install wakes the reader before the handler records the chunk as local.
  for (int i = 0; i < 1000 && (*m)->stats().local_chunks != (*m)->stats().chunks; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  auto st = (*m)->stats();
  EXPECT_GT(st.faults, 0u);
  EXPECT_EQ(st.local_chunks, st.chunks);
  EXPECT_TRUE((*m)->Close().ok());
}

TEST_P(MappingTest, ManyThreadsFaultingSameAndDifferentChunks) {
  MemoryRemote remote(region_, false);
  remote.SetDelay(std::chrono::microseconds(200));  // widen the races
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<uint32_t>(t));
      for (int i = 0; i < 300; ++i) {
        // Half the threads hammer the first chunks, half go everywhere.
        size_t off = t % 2 == 0 ? rng() % (2 * GetParam().chunk) : rng() % kSize;
        if ((*m)->data()[off] != region_->data()[off]) mismatches++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST_P(MappingTest, WritesReachTheServerOnlyAfterSync) {
  MemoryRemote remote(region_, true);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ((*m)->tracking(), GetParam().tracking);
  std::vector<std::byte> expect(region_->bytes().begin(), region_->bytes().end());
  std::mt19937 rng(9);
  for (int i = 0; i < 200; ++i) {
    size_t off = rng() % (kSize - 100);
    auto v = static_cast<std::byte>(rng());
    std::memset((*m)->data() + off, static_cast<int>(v), 100);
    std::memset(expect.data() + off, static_cast<int>(v), 100);
  }
  // Not yet synced: the server still has the old bytes somewhere we wrote.
  EXPECT_NE(std::memcmp(region_->data(), expect.data(), kSize), 0);
  ASSERT_TRUE((*m)->Sync().ok());
  EXPECT_EQ(std::memcmp(region_->data(), expect.data(), kSize), 0);
  EXPECT_EQ((*m)->stats().dirty_chunks, 0u);
  EXPECT_GT((*m)->stats().pushes, 0u);

  // A second round: only what changed since is pushed, and a fresh reader sees it.
  const uint64_t pushes_before = (*m)->stats().pushes;
  (*m)->data()[kSize - 1] = std::byte{0x77};
  expect[kSize - 1] = std::byte{0x77};
  ASSERT_TRUE((*m)->Sync().ok());
  EXPECT_EQ((*m)->stats().pushes, pushes_before + 1);
  MemoryRemote reader(region_, false);
  MappingOptions ro = Options();
  auto r = Mapping::Create(reader, ro);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(std::memcmp((*r)->data(), expect.data(), kSize), 0);
}

TEST_P(MappingTest, ClosePushesEverything) {
  MemoryRemote remote(region_, true);
  {
    auto m = Mapping::Create(remote, Options());
    ASSERT_TRUE(m.ok());
    std::memset((*m)->data() + 12345, 0xab, 70000);
    EXPECT_TRUE((*m)->Close().ok());
  }
  for (size_t i = 12345; i < 12345 + 70000; ++i) ASSERT_EQ(region_->data()[i], std::byte{0xab});
}

TEST_P(MappingTest, FailedPushKeepsTheDirtySetForTheNextSync) {
  MemoryRemote remote(region_, true);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE((*m)->WaitPrefetched(std::chrono::seconds(10)).ok() || !GetParam().prefetch);
  std::memset((*m)->data(), 0x11, 3 * GetParam().chunk);
  remote.FailNext(1000, Status(Code::kUnavailable, "injected push failure"));
  Status s = (*m)->Sync();
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_EQ((*m)->stats().dirty_chunks, 3u);
  remote.FailNext(0, Status());
  ASSERT_TRUE((*m)->Sync().ok());
  for (size_t i = 0; i < 3 * GetParam().chunk; ++i) ASSERT_EQ(region_->data()[i], std::byte{0x11});
}

TEST_P(MappingTest, DontNeedDropsTheLocalCopyAndRepulls) {
  MemoryRemote remote(region_, true);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok());
  std::byte* p = (*m)->data();
  p[0] = std::byte{1};
  ASSERT_TRUE((*m)->Sync().ok());
  const std::byte server_byte = region_->data()[kPageSize];
  p[kPageSize] = ~server_byte;  // not synced
  ASSERT_EQ(::madvise(p, std::max(GetParam().chunk, 2 * kPageSize), MADV_DONTNEED), 0);
  EXPECT_EQ(p[0], std::byte{1});         // synced value comes back from the server
  EXPECT_EQ(p[kPageSize], server_byte);  // the unsynced write was dropped with the pages
  EXPECT_EQ(std::memcmp(p, region_->data(), kSize), 0);
}

TEST_P(MappingTest, PrefetchPullsEverythingInTheBackground) {
  MemoryRemote remote(region_, false);
  MappingOptions o = Options();
  o.prefetch = true;
  const uint64_t chunks = kSize / o.chunk_size;
  o.prefetch_order = {chunks - 1, 0, chunks / 2};  // hints first, the rest in sequence
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok());
  ASSERT_TRUE((*m)->WaitPrefetched(std::chrono::seconds(20)).ok());
  auto st = (*m)->stats();
  EXPECT_EQ(st.local_chunks, chunks);
  EXPECT_EQ(st.prefetches, chunks);
  EXPECT_EQ(st.faults, 0u);
  EXPECT_EQ(std::memcmp((*m)->data(), region_->data(), kSize), 0);
}

INSTANTIATE_TEST_SUITE_P(Chunks, MappingTest,
                         ::testing::Values(Param{4u << 10, false, WriteTracking::kSync},
                                           Param{64u << 10, true, WriteTracking::kSync},
                                           Param{64u << 10, false, WriteTracking::kAsync},
                                           Param{2u << 20, true, WriteTracking::kAsync},
                                           Param{4u << 10, true, WriteTracking::kAsync}),
                         Name);

TEST(Mapping, PrefetchPullsRunsOfSmallChunksInOneRequest) {
  constexpr size_t kSize = 8u << 20;
  constexpr size_t kChunk = 4u << 10;
  constexpr uint64_t kChunks = kSize / kChunk;
  constexpr uint64_t kRun = kPrefetchRun / kChunk;
  auto region = std::make_shared<MemoryRegion>("runs", kSize);
  FillPattern(region->bytes(), 6);
  MemoryRemote remote(region, false);
  MappingOptions o;
  o.chunk_size = kChunk;
  // Order: 5, 3, then 0 1 2 4 6 7 ...: runs break where the order is not consecutive.
  o.prefetch_order = {5, 3};
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  ASSERT_TRUE((*m)->WaitPrefetched(std::chrono::seconds(20)).ok());
  EXPECT_EQ(std::memcmp((*m)->data(), region->data(), kSize), 0);
  const MappingStats st = (*m)->stats();
  EXPECT_EQ(st.prefetches, kChunks);
  EXPECT_EQ(st.bytes_pulled, kSize);
  EXPECT_EQ(st.faults, 0u);
  // [5] [3] [0 1 2] [4] then runs of kRun from 6 on.
  EXPECT_EQ(remote.requests_served(), 4 + (kChunks - 6 + kRun - 1) / kRun);
}

TEST(Mapping, ChunksLargerThanTheTransportsLimitAreSplit) {
  auto region = std::make_shared<MemoryRegion>("split", 8u << 20);
  FillPattern(region->bytes(), 5);
  MemoryRemote remote(region, true, 64u << 10);
  MappingOptions o;
  o.chunk_size = 2u << 20;
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(std::memcmp((*m)->data(), region->data(), 8u << 20), 0);
  std::memset((*m)->data() + (3u << 20), 0x5c, 1u << 20);
  ASSERT_TRUE((*m)->Sync().ok());
  for (size_t i = 3u << 20; i < 4u << 20; ++i) ASSERT_EQ(region->data()[i], std::byte{0x5c});
  EXPECT_EQ((*m)->stats().pushes, 1u);  // one chunk, in 32 requests
  EXPECT_GE(remote.requests_served(), 4u * 32u + 32u);
}

TEST(MappingDeathTest, UnservableFaultRaisesSigbusNotAHang) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("dead", 1u << 20);
  EXPECT_EXIT(
      {
        MemoryRemote remote(region, false);
        remote.FailNext(1u << 20, Status(Code::kUnavailable, "server gone"));
        MappingOptions o;
        o.prefetch = false;
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        volatile std::byte b = (*m)->data()[5000];
        (void)b;
        _exit(0);
      },
      mf::testing::DiedOf(SIGBUS), mf::testing::DeathMessage(SIGBUS));
}

// A chunk partly present (some pages dropped with MADV_DONTNEED) whose re-pull fails: the
// missing pages must raise SIGBUS, not fault forever.
TEST(MappingDeathTest, FailedRepullOfAPartlyPresentChunkRaisesSigbus) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("partly", 1u << 20);
  EXPECT_EXIT(
      {
        MemoryRemote remote(region, false);
        MappingOptions o;
        o.prefetch = false;
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        std::byte* p = (*m)->data();
        volatile std::byte b = p[0];  // pulls chunk 0 (64 KiB)
        if (::madvise(p + 2 * kPageSize, kPageSize, MADV_DONTNEED) != 0) _exit(4);
        remote.FailNext(1u << 20, Status(Code::kUnavailable, "server gone"));
        b = p[2 * kPageSize];  // re-pull fails: SIGBUS expected
        (void)b;
        _exit(0);
      },
      mf::testing::DiedOf(SIGBUS), mf::testing::DeathMessage(SIGBUS));
}

// A 2 MiB chunk moves in kInstallPiece pieces, each installed as it arrives. When a later
// piece fails, the pieces that arrived stay readable with the server's bytes, the failed
// ones raise SIGBUS, and writes to the arrived pieces are not silently dropped: Sync
// reports them.
TEST(MappingDeathTest, PullFailingPartwayKeepsArrivedPiecesAndFailsTheRest) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  static_assert((2u << 20) / kInstallPiece >= 2);
  auto region = std::make_shared<MemoryRegion>("pieces", 2u << 20);
  FillPattern(region->bytes(), 9);
  EXPECT_EXIT(
      {
        MemoryRemote remote(region, true);
        remote.FailRange(kInstallPiece, kInstallPiece, Status(Code::kUnavailable, "server gone"));
        MappingOptions o;
        o.chunk_size = 2u << 20;
        o.prefetch = false;
        o.tracking = WriteTracking::kSync;
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        std::byte* p = (*m)->data();
        // Faults on piece 0: woken by its install whatever happens to piece 1.
        if (std::memcmp(p, region->data(), kInstallPiece) != 0) _exit(4);
        if (std::memcmp(p + 2 * kInstallPiece, region->data() + 2 * kInstallPiece, kInstallPiece) != 0)
          _exit(5);
        p[100] = std::byte{0x77};
        Status synced = (*m)->Sync();
        if (synced.ok() || synced.code() != Code::kUnavailable) _exit(6);
        std::fputs("touching the failed piece\n", stderr);
        volatile std::byte b = p[kInstallPiece + 10];  // the failed piece: SIGBUS expected
        (void)b;
        _exit(0);
      },
      mf::testing::DiedOf(SIGBUS), "touching the failed piece");
}

TEST(MappingDeathTest, ReadOnlyMappingRefusesWrites) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("ro", 1u << 20);
  EXPECT_EXIT(
      {
        MemoryRemote remote(region, false);
        auto m = Mapping::Create(remote, MappingOptions{});
        if (!m.ok()) _exit(3);
        (*m)->data()[10] = std::byte{1};
        _exit(0);
      },
      mf::testing::DiedOf(SIGSEGV), mf::testing::DeathMessage(SIGSEGV));
}

TEST(Mapping, RejectsBadOptions) {
  auto region = std::make_shared<MemoryRegion>("o", 1u << 20);
  MemoryRemote remote(region, true);
  MappingOptions o;
  o.chunk_size = 3000;
  EXPECT_EQ(Mapping::Create(remote, o).status().code(), Code::kInvalidArgument);
  o.chunk_size = 4u << 20;
  EXPECT_EQ(Mapping::Create(remote, o).status().code(), Code::kInvalidArgument);
  o = MappingOptions{};
  o.tracking = WriteTracking::kOff;
  EXPECT_EQ(Mapping::Create(remote, o).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace mf::uffd
