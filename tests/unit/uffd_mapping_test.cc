// uffd::Mapping on the real kernel userfaultfd, over MemoryRemote (the end-to-end tests
// over TCP and RDMA are in tests/integration and tests/vm).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "fabric/log.h"
#include "fabric/memory_remote.h"
#include "tests/death_test_util.h"
#include "uffd/mapping.h"
#include "uffd/userfaultfd.h"

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

bool KernelHasAsyncWp() {
  auto features = Userfaultfd::AvailableFeatures();
  return features.ok() && (*features & UFFD_FEATURE_WP_ASYNC) != 0;
}

// The write trackings to test on this kernel: sync always, async where it has it.
std::vector<WriteTracking> AvailableTrackings() {
  if (KernelHasAsyncWp()) return {WriteTracking::kSync, WriteTracking::kAsync};
  return {WriteTracking::kSync};
}

// Options for most tests: chunks of `chunk_size`, no prefetch (pulls only for faults).
MappingOptions NoPrefetch(size_t chunk_size, WriteTracking tracking = WriteTracking::kAuto) {
  MappingOptions o;
  o.chunk_size = chunk_size;
  o.prefetch = false;
  o.tracking = tracking;
  return o;
}

// True inside the test VM (run-vm-suite names the test it runs): its emulated CPU is tens
// of times slower, so the longest race loops run fewer rounds there.
bool InTestVm() {
  return std::getenv("MF_VM_TEST_NAME") != nullptr;
}

// A Remote over MemoryRemote that can fail its n-th AllocateBuffer, fail reads (as a server
// gone would; writes still succeed), complete reads with
// staging pages made unreadable (so UFFDIO_COPY fails with EFAULT), or hold reads until
// the caller polls (completions then run on the Mapping's fault thread, as with the TCP
// transport), running a hook before the first one.
class FaultyRemote final : public fabric::Remote {
 public:
  FaultyRemote(std::shared_ptr<MemoryRegion> region, bool writable)
      : region_(region), inner_(std::move(region), writable) {}
  ~FaultyRemote() override { CompleteHeld(); }

  const fabric::RegionInfo& info() const override { return inner_.info(); }
  bool writable() const override { return inner_.writable(); }
  std::string_view transport() const override { return "faulty"; }
  size_t max_transfer() const override { return inner_.max_transfer(); }
  Result<fabric::Buffer> AllocateBuffer(size_t size) override {
    if (allocations_++ == fail_allocation) return Status(Code::kUnavailable, "injected allocation failure");
    return inner_.AllocateBuffer(size);
  }
  void Submit(std::span<const fabric::IoRequest> requests) override {
    const bool failing = fail_reads.load(std::memory_order_acquire);
    if (!unreadable_reads && !hold_reads_for_poll && !failing) return inner_.Submit(requests);
    for (const fabric::IoRequest& r : requests) {
      if (r.kind != fabric::IoKind::kRead) {
        inner_.Submit({&r, 1});
        continue;
      }
      if (failing) {
        r.callback->OnIoComplete(r.cookie, Status(Code::kUnavailable, "injected read failure"));
        continue;
      }
      std::memcpy(r.data.data(), region_->data() + r.offset, r.data.size());
      if (unreadable_reads) {
        (void)::mprotect(r.data.data(), r.data.size(), PROT_NONE);
        r.callback->OnIoComplete(r.cookie, Status::Ok());
        continue;
      }
      MutexLock lock(mu_);
      held_.push_back(r);
    }
  }
  Status Flush() override { return inner_.Flush(); }
  Status Close() override { return inner_.Close(); }
  bool can_poll() const override { return hold_reads_for_poll; }
  size_t Poll() override {
    {
      MutexLock lock(mu_);
      if (held_.empty()) return 0;
    }
    if (before_first_completion) std::exchange(before_first_completion, nullptr)();
    return CompleteHeld();
  }
  // The fault thread stops polling: nothing may stay held.
  void SetCallerPolling(bool active) override {
    if (!active) CompleteHeld();
  }

  size_t fail_allocation = SIZE_MAX;
  std::atomic<bool> fail_reads{false};
  bool unreadable_reads = false;
  bool hold_reads_for_poll = false;
  std::function<void()> before_first_completion;  // runs on the polling thread

 private:
  size_t CompleteHeld() {
    std::deque<fabric::IoRequest> ready;
    {
      MutexLock lock(mu_);
      ready.swap(held_);
    }
    for (const fabric::IoRequest& r : ready) r.callback->OnIoComplete(r.cookie, Status::Ok());
    return ready.size();
  }

  std::shared_ptr<MemoryRegion> region_;
  MemoryRemote inner_;
  size_t allocations_ = 0;
  Mutex mu_;
  std::deque<fabric::IoRequest> held_ MF_GUARDED_BY(mu_);
};

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

// MADV_FREE leaves the pages in place (until memory runs short) but raises the same event
// as MADV_DONTNEED: a write after it must still be tracked and pushed.
TEST_P(MappingTest, WriteAfterMadvFreeIsPushed) {
  MemoryRemote remote(region_, true);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const size_t c = GetParam().chunk;
  std::byte* p = (*m)->data();
  p[10] = std::byte{1};
  ASSERT_TRUE((*m)->Sync().ok());  // and the chunk's pull has ended
  const uint64_t local = (*m)->stats().local_chunks;
  ASSERT_EQ(::madvise(p, c, MADV_FREE), 0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while ((*m)->stats().local_chunks == local && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  p[10] = std::byte{2};
  p[c - 1] = std::byte{3};
  ASSERT_TRUE((*m)->Sync().ok());
  EXPECT_EQ(region_->data()[10], std::byte{2});
  EXPECT_EQ(region_->data()[c - 1], std::byte{3});
}

// The same with no wait: madvise returns once the fault thread has read its event, maybe
// before it handled it, and a write at once must not be lost to the handling.
TEST_P(MappingTest, WriteRightAfterMadvFreeIsPushed) {
  MemoryRemote remote(region_, true);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const size_t c = GetParam().chunk;
  const size_t chunks = std::min<size_t>(kSize / c, 64);
  std::byte* p = (*m)->data();
  constexpr uint32_t kRounds = 300;
  uint32_t lost = 0;
  for (uint32_t round = 1; round <= kRounds; ++round) {
    std::byte* at = p + (round % chunks) * c;
    std::memset(at, 0x31, 64);
    ASSERT_EQ(::madvise(at, c, MADV_FREE), 0);
    std::memcpy(at + 8, &round, sizeof(round));
    Status synced = (*m)->Sync();
    ASSERT_TRUE(synced.ok()) << synced.ToString();
    uint32_t on_server = 0;
    std::memcpy(&on_server, region_->data() + (at - p) + 8, sizeof(on_server));
    lost += on_server != round;
  }
  EXPECT_EQ(lost, 0u) << "of " << kRounds << " writes right after MADV_FREE";
  EXPECT_TRUE((*m)->Close().ok());
}

// munmap of a whole chunk drops it from the dirty set: Sync neither reads the hole nor
// pushes anything for it. A chunk partly unmapped pushes only its pages still mapped.
TEST_P(MappingTest, MunmapOfChunksKeepsSyncWorking) {
  MemoryRemote remote(region_, true);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const size_t c = GetParam().chunk;
  const std::vector<std::byte> before(region_->bytes().begin(), region_->bytes().end());
  std::byte* p = (*m)->data();
  std::memset(p, 0x21, c);
  std::memset(p + 2 * c, 0x22, c);
  ASSERT_EQ(::munmap(p + 2 * c, c), 0);
  Status synced = (*m)->Sync();
  ASSERT_TRUE(synced.ok()) << synced.ToString();
  for (size_t i = 0; i < c; ++i) ASSERT_EQ(region_->data()[i], std::byte{0x21}) << i;
  EXPECT_EQ(std::memcmp(region_->data() + 2 * c, before.data() + 2 * c, c), 0);
  EXPECT_EQ((*m)->stats().dirty_chunks, 0u);

  if (c >= 2 * kPageSize && 6 * c <= kSize) {
    std::memset(p + 4 * c, 0x23, c);
    ASSERT_EQ(::munmap(p + 4 * c + c / 2, c / 2), 0);
    synced = (*m)->Sync();
    ASSERT_TRUE(synced.ok()) << synced.ToString();
    for (size_t i = 4 * c; i < 4 * c + c / 2; ++i) ASSERT_EQ(region_->data()[i], std::byte{0x23}) << i;
    EXPECT_EQ(std::memcmp(region_->data() + 4 * c + c / 2, before.data() + 4 * c + c / 2, c / 2), 0);
    // The mapped half is still tracked.
    p[4 * c + 1] = std::byte{0x24};
    p[5 * c] = std::byte{0x25};  // the next chunk, whole
    synced = (*m)->Sync();
    ASSERT_TRUE(synced.ok()) << synced.ToString();
    EXPECT_EQ(region_->data()[4 * c + 1], std::byte{0x24});
    EXPECT_EQ(region_->data()[5 * c], std::byte{0x25});
  }
  EXPECT_TRUE((*m)->Close().ok());
}

// A writer keeps changing a counter in many chunks while Sync runs again and again; after
// it stops, a last Sync leaves the server with its last values.
TEST_P(MappingTest, WritesConcurrentWithSyncAreNotLost) {
  MemoryRemote remote(region_, true);
  auto m = Mapping::Create(remote, Options());
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  constexpr size_t kSlots = 64;
  constexpr size_t kStride = kSize / kSlots;
  std::atomic<bool> stop{false};
  uint32_t last = 0;
  std::thread writer([&] {
    for (uint32_t v = 1; !stop.load(std::memory_order_relaxed); ++v) {
      for (size_t i = 0; i < kSlots; ++i) {
        const uint32_t value = v * 1000 + static_cast<uint32_t>(i);
        std::memcpy((*m)->data() + i * kStride + 8, &value, sizeof(value));
      }
      last = v;
    }
  });
  for (int i = 0; i < 5; ++i) {
    Status s = (*m)->Sync();
    EXPECT_TRUE(s.ok()) << s.ToString();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  stop = true;
  writer.join();
  ASSERT_GT(last, 0u);
  ASSERT_TRUE((*m)->Sync().ok());
  MemoryRemote reader_remote(region_, false);
  MappingOptions ro = Options();
  auto reader = Mapping::Create(reader_remote, ro);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  for (size_t i = 0; i < kSlots; ++i) {
    uint32_t value = 0;
    std::memcpy(&value, (*reader)->data() + i * kStride + 8, sizeof(value));
    EXPECT_EQ(value, last * 1000 + i) << "slot " << i;
  }
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

// WaitPrefetched ends with the prefetch pass: chunks the program unmapped before the pass
// reached them, or dropped after, stay remote and are not waited for.
TEST(Mapping, WaitPrefetchedEndsWithThePassDespiteUnmappedAndDroppedChunks) {
  constexpr size_t kSize = 8u << 20;
  constexpr size_t kChunk = 64u << 10;
  constexpr size_t kChunks = kSize / kChunk;
  auto region = std::make_shared<MemoryRegion>("wait", kSize);
  FillPattern(region->bytes(), 9);
  MemoryRemote remote(region, false);
  remote.SetDelay(std::chrono::milliseconds(5));  // the tail is unmapped long before the pass gets there
  MappingOptions o;
  o.chunk_size = kChunk;
  o.prefetch_depth = 1;
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::byte* p = (*m)->data();
  ASSERT_EQ(::munmap(p + kSize - 2 * kChunk, 2 * kChunk), 0);
  Status s = (*m)->WaitPrefetched(std::chrono::seconds(20));
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ((*m)->stats().local_chunks, kChunks - 2);
  EXPECT_EQ(std::memcmp(p, region->data(), kSize - 2 * kChunk), 0);

  ASSERT_EQ(::madvise(p, kChunk, MADV_DONTNEED), 0);
  // The fault thread drops the chunk just after madvise returns.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while ((*m)->stats().local_chunks != kChunks - 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_EQ((*m)->stats().local_chunks, kChunks - 3);
  s = (*m)->WaitPrefetched(std::chrono::seconds(2));
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(p[100], region->data()[100]);  // pulled again on touch
  EXPECT_TRUE((*m)->Close().ok());
}

// A transport whose largest request is not a whole number of pages (another server
// version may say so) still serves faults: pulls go in whole pages. One that cannot move a
// page at once is refused.
TEST(Mapping, TransportLimitThatIsNotAPageMultipleStillServesFaults) {
  auto region = std::make_shared<MemoryRegion>("odd", 1u << 20);
  FillPattern(region->bytes(), 23);
  MemoryRemote remote(region, true, 6000);
  MappingOptions o;
  o.chunk_size = 64u << 10;
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  EXPECT_EQ(std::memcmp((*m)->data(), region->data(), 1u << 20), 0);
  std::memset((*m)->data() + 5000, 0x3c, 70000);
  ASSERT_TRUE((*m)->Sync().ok());
  for (size_t i = 5000; i < 75000; ++i) ASSERT_EQ(region->data()[i], std::byte{0x3c}) << i;

  MemoryRemote tiny(region, true, 2048);
  auto refused = Mapping::Create(tiny, o);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kUnsupported);
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

// In a death test's child: maps `remote` without prefetch and touches one byte of its
// first chunk, which is expected to raise a signal. Exits 3 when the mapping cannot be
// made, 0 when the touch returned.
[[noreturn]] void TouchWithoutPrefetch(fabric::Remote& remote) {
  MappingOptions o;
  o.prefetch = false;
  auto m = Mapping::Create(remote, o);
  if (!m.ok()) _exit(3);
  volatile std::byte b = (*m)->data()[5000];
  (void)b;
  _exit(0);
}

TEST(MappingDeathTest, UnservableFaultRaisesSigbusNotAHang) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("dead", 1u << 20);
  EXPECT_EXIT(
      {
        MemoryRemote remote(region, false);
        remote.FailNext(1u << 20, Status(Code::kUnavailable, "server gone"));
        TouchWithoutPrefetch(remote);
      },
      mf::testing::DiedOf(SIGBUS), mf::testing::DeathMessage(SIGBUS));
}

// A program with no file descriptor left still gets SIGBUS for a fault that cannot be
// served. Without UFFDIO_POISON (the VM's kernel) a failed chunk is mapped from an empty
// memfd: that was made when the chunk failed, and with memfd_create failing (EMFILE) the
// faulting thread waited forever. With POISON no descriptor is needed at all.
TEST(MappingDeathTest, UnservableFaultRaisesSigbusWithNoFileDescriptorLeft) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  if (mf::testing::kUnderAsan) {
    GTEST_SKIP() << "UBSan's type check of a virtual call tests that the vtable is readable through a "
                    "pipe: with no descriptor left it reports every object as invalid. The dev preset "
                    "runs this, in the VM too";
  }
  constexpr rlim_t kDescriptorLimit = 64;
  auto region = std::make_shared<MemoryRegion>("no-fds", 1u << 20);
  EXPECT_EXIT(
      {
        ::alarm(20);  // the old hang ends as SIGALRM, not SIGBUS
        MemoryRemote remote(region, false);
        remote.FailNext(1u << 20, Status(Code::kUnavailable, "server gone"));
        MappingOptions o;
        o.prefetch = false;
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        rlimit limit{};
        if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) _exit(4);
        limit.rlim_cur = std::min(limit.rlim_cur, kDescriptorLimit);
        if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) _exit(5);
        const int any = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        while (any >= 0 && ::fcntl(any, F_DUPFD_CLOEXEC, 0) >= 0) {
        }
        if (errno != EMFILE) _exit(6);
        volatile std::byte b = (*m)->data()[5000];
        (void)b;
        _exit(0);
      },
      mf::testing::DiedOf(SIGBUS), mf::testing::DeathMessage(SIGBUS));
}

// A program at vm.max_map_count still gets SIGBUS for a fault that cannot be served.
// Without UFFDIO_POISON (the VM's kernel) a failed chunk is mapped over from an empty memfd;
// the kernel refuses that mmap at the limit (ENOMEM), and the faulting thread then faulted,
// failed and was woken forever. Now it is sent SIGBUS. With POISON (the host's kernel) no
// mapping is needed and this passes either way; without, it must log the fallback.
TEST(MappingDeathTest, UnservableFaultRaisesSigbusAtTheMapCountLimit) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  if (mf::testing::kUnderAsan) {
    GTEST_SKIP() << "ASan's allocator needs mappings of its own and reports its failure to get one. The "
                    "dev preset runs this, in the VM too";
  }
  constexpr size_t kRegion = 4u << 20;
  constexpr size_t kChunk = 64u << 10;
  // Debian's default is 65530; some distributions raise it to 2^20, too many to map here.
  constexpr uint64_t kMaxMapCount = 256u << 10;
  constexpr size_t kHeapReserve = 32u << 20;
  uint64_t max_map_count = 0;
  if (FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r")) {
    if (std::fscanf(f, "%" SCNu64, &max_map_count) != 1) max_map_count = 0;
    std::fclose(f);
  }
  ASSERT_GT(max_map_count, 0u) << "cannot read /proc/sys/vm/max_map_count";
  if (max_map_count > kMaxMapCount) {
    GTEST_SKIP() << "vm.max_map_count is " << max_map_count << "; the test maps up to " << kMaxMapCount;
  }
  auto region = std::make_shared<MemoryRegion>("map-count", kRegion);
  auto features = mf::uffd::Userfaultfd::AvailableFeatures();
  ASSERT_TRUE(features.ok()) << features.status().ToString();
  // Without POISON the log says which way the SIGBUS came.
  const char* expected_log =
      (*features & UFFD_FEATURE_POISON) != 0 ? "" : "threads that touch them are sent SIGBUS instead";
  EXPECT_EXIT(
      {
        ::alarm(20);  // the old livelock ends as SIGALRM, not SIGBUS
        const rlimit no_core{};
        (void)::setrlimit(RLIMIT_CORE, &no_core);  // no dump of tens of thousands of mappings
        // At the limit malloc could not map a new arena or a large block: every thread
        // allocates from the main heap, grown now and never trimmed.
        if (::mallopt(M_ARENA_MAX, 1) != 1 || ::mallopt(M_MMAP_MAX, 0) != 1 ||
            ::mallopt(M_TRIM_THRESHOLD, static_cast<int>(2 * kHeapReserve)) != 1) {
          _exit(2);
        }
        std::free(std::malloc(kHeapReserve));
        if (!mf::InitLogging("info").ok()) _exit(2);  // to stderr, which the matcher reads
        MemoryRemote remote(region, false);
        remote.FailNext(kRegion, Status(Code::kUnavailable, "server gone"));
        auto m = Mapping::Create(remote, NoPrefetch(kChunk));
        if (!m.ok()) _exit(3);
        // One-page mappings, alternately readable and not so that none merge, until the
        // kernel refuses one (they stay mapped: the child ends here).
        bool refused = false;
        for (size_t i = 0; i <= max_map_count && !refused; ++i) {
          refused = ::mmap(nullptr, kPageSize, i % 2 == 0 ? PROT_READ : PROT_NONE,
                           MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED;
        }
        if (!refused || errno != ENOMEM) _exit(4);
        volatile std::byte b = (*m)->data()[kRegion / 2 + 5000];
        (void)b;
        _exit(0);
      },
      mf::testing::DiedOf(SIGBUS), expected_log);
}

// The fault thread's poll fails (EINVAL) once the program sets RLIMIT_NOFILE below the two
// descriptors it waits on. The thread used to return, and the next fault waited forever;
// now the process aborts with a message that says why.
TEST(MappingDeathTest, FaultThreadThatCannotPollAbortsWithTheReason) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  if (mf::testing::kUnderAsan) {
    GTEST_SKIP() << "UBSan's type check of a virtual call tests that the vtable is readable through a "
                    "pipe, which RLIMIT_NOFILE 1 forbids: it reports the fault thread's own std::thread "
                    "state as invalid. The dev preset runs this, in the VM too";
  }
  constexpr size_t kChunk = 64u << 10;
  auto region = std::make_shared<MemoryRegion>("no-poll", 1u << 20);
  EXPECT_EXIT(
      {
        ::alarm(20);                                  // the old hang ends as SIGALRM, not SIGABRT
        if (!mf::InitLogging("info").ok()) _exit(2);  // to stderr, which the matcher reads
        MemoryRemote remote(region, false);
        auto m = Mapping::Create(remote, NoPrefetch(kChunk));
        if (!m.ok()) _exit(3);
        rlimit limit{};
        if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) _exit(4);
        limit.rlim_cur = 1;
        if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) _exit(5);
        // The first fault ends the poll the thread was in (begun before the limit fell);
        // its next poll fails, and the second fault would wait for it forever.
        volatile std::byte b = (*m)->data()[0];
        b = (*m)->data()[kChunk];
        (void)b;
        _exit(0);
      },
      ::testing::KilledBySignal(SIGABRT), "fault thread cannot go on \\(poll: .*RLIMIT_NOFILE");
}

// A program that closes every descriptor above 2 (closefrom, as daemons do) closes the
// Mapping's userfaultfd too. Its fault thread then got POLLNVAL from every poll and spun
// forever; now it aborts and says why. (Once the userfaultfd is gone the kernel serves
// faults on the range as plain memory: the process must not go on.)
TEST(MappingDeathTest, FaultThreadWhoseDescriptorsAreClosedAbortsWithTheReason) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("closed", 1u << 20);
  EXPECT_EXIT(
      {
        ::alarm(20);                                  // the old spin ends as SIGALRM, not SIGABRT
        if (!mf::InitLogging("info").ok()) _exit(2);  // to stderr, which the matcher reads
        MemoryRemote remote(region, false);
        auto m = Mapping::Create(remote, NoPrefetch(64u << 10));
        if (!m.ok()) _exit(3);
        ::closefrom(3);
        // Wakes the fault thread's poll, which then finds the descriptors gone.
        volatile std::byte b = (*m)->data()[0];
        (void)b;
        for (;;) ::pause();  // the abort, not this thread, ends the process
      },
      ::testing::KilledBySignal(SIGABRT), "fault thread cannot go on \\(the program closed the userfaultfd");
}

// A chunk partly unmapped whose pull fails: its pages still mapped must raise SIGBUS. A
// poison of the whole chunk, hole included, failed every time and the fault came back
// forever.
TEST(MappingDeathTest, FailedPullOfAPartlyUnmappedChunkRaisesSigbus) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("cut-dead", 1u << 20);
  EXPECT_EXIT(
      {
        ::alarm(20);  // the old livelock ends as SIGALRM, not SIGBUS
        FaultyRemote remote(region, false);
        remote.fail_reads = true;
        MappingOptions o = NoPrefetch(64u << 10);
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        std::byte* p = (*m)->data();
        if (::munmap(p + (16u << 10), kPageSize) != 0) _exit(4);
        (void)*reinterpret_cast<volatile std::byte*>(p);
        _exit(0);
      },
      mf::testing::DiedOf(SIGBUS), mf::testing::DeathMessage(SIGBUS));
}

// The program maps a file over part of the range: userfaultfd cannot register such a
// mapping, so one unregister of the whole range failed, and Close's munmap of the rest,
// still registered, waited forever for its event to be read.
// One mmap(MAP_FIXED) replaces the part, as a program would: a munmap and then an mmap
// into the hole let any mmap of another thread in between (the mapping's threads start
// meanwhile; ASan maps pages for their thread-local storage) land in the hole, the
// highest free gap, and be overwritten by the file (a CI run crashed so, under ASan).
TEST(MappingDeathTest, CloseWithAFileMappedIntoAHoleReturns) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("file-hole", 1u << 20);
  FillPattern(region->bytes(), 23);
  EXPECT_EXIT(
      {
        ::alarm(20);
        MemoryRemote remote(region, true);
        MappingOptions o;
        o.chunk_size = 64u << 10;
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        std::byte* p = (*m)->data();
        std::memset(p, 0x41, 4096);
        std::byte* hole = p + (256u << 10);
        UniqueFd file(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
        if (!file || ::mmap(hole, 64u << 10, PROT_READ, MAP_PRIVATE | MAP_FIXED, file.get(), 0) == MAP_FAILED)
          _exit(5);
        if (!(*m)->Close().ok()) _exit(6);
        // The file's mapping is left alone, and the write reached the server.
        std::byte head[4];
        std::memcpy(head, hole, sizeof(head));
        if (std::memcmp(head,
                        "\x7f"
                        "ELF",
                        4) != 0)
          _exit(7);
        if (region->data()[0] != std::byte{0x41}) _exit(8);
        _exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// Async tracking: a chunk never written whose pull failed is poisoned, and a poison marker
// looks "written" to PAGEMAP_SCAN (it has no WP bit). It must not count as a write that
// cannot be pushed, which failed every later Sync, Close's too.
TEST(Mapping, FailedPullOfAChunkNeverWrittenDoesNotFailSync) {
  if (!KernelHasAsyncWp()) GTEST_SKIP() << "kernel lacks async WP";
  auto features = Userfaultfd::AvailableFeatures();
  if (!features.ok() || (*features & UFFD_FEATURE_POISON) == 0) GTEST_SKIP() << "kernel lacks UFFDIO_POISON";
  constexpr size_t kChunk = 64u << 10;
  auto region = std::make_shared<MemoryRegion>("poisoned", 1u << 20);
  FaultyRemote remote(region, true);
  MappingOptions o = NoPrefetch(kChunk, WriteTracking::kAsync);
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::byte* p = (*m)->data();
  p[0] = std::byte{0x51};  // chunk 0: written, pushed below
  remote.fail_reads = true;
  // Chunk 2's pull fails. Read through the kernel, so the poisoned page is an EFAULT here
  // rather than SIGBUS.
  std::byte copy[64];
  iovec local{copy, sizeof(copy)};
  iovec far{p + 2 * kChunk, sizeof(copy)};
  EXPECT_EQ(::process_vm_readv(::getpid(), &local, 1, &far, 1, 0), -1);
  EXPECT_EQ((*m)->stats().failed_pulls, 1u);
  remote.fail_reads = false;
  Status synced = (*m)->Sync();
  EXPECT_TRUE(synced.ok()) << synced.ToString();
  EXPECT_EQ(region->data()[0], std::byte{0x51});
  EXPECT_TRUE((*m)->Close().ok());
}

// A written chunk dropped whole with MADV_DONTNEED stays dirty (a write may follow the drop
// at once), but Sync finds none of its pages left and skips it: no pull, no push. Nor may a
// later failed pull of it (the server away for a moment) fail every Sync after.
TEST(Mapping, DroppedDirtyChunkIsSkippedBySyncEvenAfterAFailedPull) {
  constexpr size_t kChunk = 64u << 10;
  for (WriteTracking tracking : AvailableTrackings()) {
    SCOPED_TRACE(std::string(WriteTrackingName(tracking)));
    auto region = std::make_shared<MemoryRegion>("dropped", 1u << 20);
    FillPattern(region->bytes(), 29);
    const std::vector<std::byte> before(region->bytes().begin(), region->bytes().end());
    FaultyRemote remote(region, true);
    MappingOptions o = NoPrefetch(kChunk, tracking);
    auto m = Mapping::Create(remote, o);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    std::byte* c = (*m)->data() + 2 * kChunk;
    std::memset(c, 0x61, kChunk);
    // The fault's pull is counted after its install has woken the writer: wait for it.
    for (int i = 0; i < 1000 && (*m)->stats().pulls != 1; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_EQ((*m)->stats().pulls, 1u);
    ASSERT_EQ(::madvise(c, kChunk, MADV_DONTNEED), 0);
    const uint64_t pulls = (*m)->stats().pulls;
    Status synced = (*m)->Sync();
    ASSERT_TRUE(synced.ok()) << synced.ToString();
    EXPECT_EQ((*m)->stats().pulls, pulls) << "Sync pulled back a chunk with no pages left";
    EXPECT_EQ((*m)->stats().dirty_chunks, 0u);
    EXPECT_EQ(std::memcmp(region->data(), before.data(), before.size()), 0);

    std::memset(c, 0x62, kChunk);
    ASSERT_EQ(::madvise(c, kChunk, MADV_DONTNEED), 0);
    remote.fail_reads = true;
    std::byte copy[64];
    iovec local{copy, sizeof(copy)};
    iovec far{c, sizeof(copy)};
    EXPECT_EQ(::process_vm_readv(::getpid(), &local, 1, &far, 1, 0), -1);  // its pull fails
    remote.fail_reads = false;
    synced = (*m)->Sync();
    EXPECT_TRUE(synced.ok()) << synced.ToString();
    EXPECT_EQ(std::memcmp(region->data(), before.data(), before.size()), 0);
    EXPECT_TRUE((*m)->Close().ok());
  }
}

// The program splits a chunk into several VMAs (mprotect of one page). The kernel fills and
// (before 6.5) write-protects within one VMA only: the pull's install failed with ENOENT,
// was given back, and the fault came back forever. Reads are served, and writes tracked.
TEST(MappingDeathTest, ChunkSplitIntoSeveralVmasIsServedAndTracked) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  constexpr size_t kChunk = 64u << 10;
  auto region = std::make_shared<MemoryRegion>("split", 1u << 20);
  FillPattern(region->bytes(), 31);
  for (WriteTracking tracking : AvailableTrackings()) {
    SCOPED_TRACE(std::string(WriteTrackingName(tracking)));
    EXPECT_EXIT(
        {
          ::alarm(20);  // the old livelock ends as SIGALRM
          MemoryRemote remote(region, true);
          MappingOptions o = NoPrefetch(kChunk, tracking);
          auto m = Mapping::Create(remote, o);
          if (!m.ok()) _exit(3);
          std::byte* p = (*m)->data();
          if (::mprotect(p + (16u << 10), kPageSize, PROT_READ) != 0) _exit(4);
          if (std::memcmp(p, region->data(), kChunk) != 0) _exit(5);  // pulls the split chunk
          p[100] = std::byte{0x71};
          p[kChunk - 1] = std::byte{0x72};
          if (!(*m)->Sync().ok()) _exit(6);
          if (region->data()[100] != std::byte{0x71} || region->data()[kChunk - 1] != std::byte{0x72})
            _exit(7);
          p[200] = std::byte{0x73};  // tracked again after the push
          if (!(*m)->Close().ok()) _exit(8);
          _exit(region->data()[200] == std::byte{0x73} ? 0 : 9);
        },
        ::testing::ExitedWithCode(0), "");
  }
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
        MappingOptions o = NoPrefetch(2u << 20, WriteTracking::kSync);
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

// One fault slot, many threads faulting on different chunks: the faults queue for the
// slot and every thread reads the server's bytes.
TEST(Mapping, FaultsWaitForAFreeFaultSlot) {
  constexpr size_t kSize = 4u << 20;
  auto region = std::make_shared<MemoryRegion>("slots", kSize);
  FillPattern(region->bytes(), 11);
  MemoryRemote remote(region, false);
  remote.SetDelay(std::chrono::microseconds(500));
  MappingOptions o;
  o.prefetch = false;
  o.fault_depth = 1;
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  constexpr int kThreads = 8;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const size_t chunk_bytes = o.chunk_size;
      for (size_t c = static_cast<size_t>(t); c < kSize / chunk_bytes; c += kThreads) {
        if (std::memcmp((*m)->data() + c * chunk_bytes, region->data() + c * chunk_bytes, chunk_bytes) != 0)
          mismatches++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
  // The install wakes the reader before the handler counts the pull.
  for (int i = 0; i < 1000 && (*m)->stats().pulls != kSize / o.chunk_size; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ((*m)->stats().pulls, kSize / o.chunk_size);
}

// Init failing after the range is mapped (here: the staging buffers cannot be allocated)
// returns the error; the half-built Mapping is torn down without waiting for push slots
// or threads that never existed.
TEST(MappingDeathTest, FailedCreateReturnsTheErrorAndDoesNotHang) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("nobuf", 1u << 20);
  EXPECT_EXIT(
      {
        ::alarm(30);  // a hang ends in SIGALRM, not in a stuck test
        for (bool writable : {true, false}) {
          for (size_t fail_at : {size_t{0}, size_t{1}}) {
            if (!writable && fail_at == 1) continue;  // a read-only mapping allocates once
            FaultyRemote remote(region, writable);
            remote.fail_allocation = fail_at;
            MappingOptions o;
            o.tracking = writable ? WriteTracking::kSync : WriteTracking::kAuto;
            auto m = Mapping::Create(remote, o);
            if (m.ok()) _exit(3);
            if (m.status().code() != Code::kUnavailable) _exit(4);
          }
        }
        _exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// A pulled chunk whose install fails for good (UFFDIO_COPY: EFAULT here, as ENOMEM would)
// fails the chunk: the faulting thread gets SIGBUS instead of sleeping forever.
TEST(MappingDeathTest, FailedInstallRaisesSigbusNotAHang) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("noinstall", 1u << 20);
  EXPECT_EXIT(
      {
        ::alarm(30);
        FaultyRemote remote(region, false);
        remote.unreadable_reads = true;
        TouchWithoutPrefetch(remote);
      },
      mf::testing::DiedOf(SIGBUS), mf::testing::DeathMessage(SIGBUS));
}

// The pull's completion runs on the fault thread (caller polling) while a MADV_DONTNEED
// elsewhere in the range has its remove event waiting in the userfaultfd: UFFDIO_COPY
// answers EAGAIN until the fault thread reads that event. The install gives up, the chunk
// goes back to remote, and the woken reader faults again and gets its bytes.
TEST(MappingDeathTest, InstallRefusedWithEagainOnTheFaultThreadIsRetried) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  if (!CanSpin()) GTEST_SKIP() << "the fault thread polls the transport only with several CPUs";
  auto region = std::make_shared<MemoryRegion>("eagain", 1u << 20);
  FillPattern(region->bytes(), 13);
  EXPECT_EXIT(
      {
        ::alarm(30);
        FaultyRemote remote(region, false);
        remote.hold_reads_for_poll = true;
        MappingOptions o;
        o.prefetch = false;
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        std::byte* p = (*m)->data();
        std::thread remover;
        remote.before_first_completion = [&] {
          remover = std::thread([p] { (void)::madvise(p + (512u << 10), 64u << 10, MADV_DONTNEED); });
          std::this_thread::sleep_for(std::chrono::milliseconds(100));  // its event is queued
        };
        if (std::memcmp(p, region->data(), 64u << 10) != 0) _exit(4);
        if (remover.joinable()) remover.join();
        _exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// Sync tracking: Sync's write-protect of a dirty chunk is refused with EAGAIN while an
// event (here a MADV_DONTNEED elsewhere) waits unread, because the fault thread is busy
// with a pull. Sync retries until the fault thread reads the event, then pushes the chunk.
TEST(Mapping, SyncRetriesAWriteProtectRefusedWhileAnEventWaitsUnread) {
  if (!CanSpin()) GTEST_SKIP() << "the fault thread polls the transport only with several CPUs";
  constexpr size_t kChunk = 64u << 10;
  auto region = std::make_shared<MemoryRegion>("wp-eagain", 1u << 20);
  FillPattern(region->bytes(), 17);
  FaultyRemote remote(region, true);
  remote.hold_reads_for_poll = true;
  MappingOptions o = NoPrefetch(kChunk, WriteTracking::kSync);
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::byte* p = (*m)->data();
  std::memset(p + 100, 0xab, 1000);  // chunk 0: pulled, then dirty
  ASSERT_EQ((*m)->stats().dirty_chunks, 1u);

  std::thread remover;
  std::thread syncer;
  Status synced = Internal("Sync did not run");
  remote.before_first_completion = [&] {  // on the fault thread, pulling chunk 1
    remover = std::thread([p] { (void)::madvise(p + 8 * kChunk, kChunk, MADV_DONTNEED); });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // its event is queued, unread
    syncer = std::thread([&] { synced = (*m)->Sync(); });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));  // Sync meets EAGAIN meanwhile
  };
  EXPECT_EQ(std::memcmp(p + kChunk, region->data() + kChunk, kChunk), 0);  // pulls chunk 1
  if (remover.joinable()) remover.join();
  ASSERT_TRUE(syncer.joinable()) << "the pull of chunk 1 never ran the hook";
  syncer.join();
  EXPECT_TRUE(synced.ok()) << synced.ToString();
  EXPECT_GT((*m)->stats().protect_retries, 0u);
  EXPECT_EQ((*m)->stats().dirty_chunks, 0u);
  std::vector<std::byte> expected(1000, std::byte{0xab});
  EXPECT_EQ(std::memcmp(region->data() + 100, expected.data(), expected.size()), 0);
  ASSERT_TRUE((*m)->Close().ok());
}

// mremap moves a pulled chunk away (sync tracking): a write at the new address is let
// through (no longer tracked) instead of indexing the chunk map out of range, and a page
// never pulled there gets SIGBUS.
TEST(MappingDeathTest, AccessesAfterMremapAreServedOrFail) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  constexpr size_t kChunk = 64u << 10;
  auto region = std::make_shared<MemoryRegion>("moved", 1u << 20);
  FillPattern(region->bytes(), 17);
  EXPECT_EXIT(
      {
        ::alarm(30);
        MemoryRemote remote(region, true);
        MappingOptions o = NoPrefetch(kChunk, WriteTracking::kSync);
        auto m = Mapping::Create(remote, o);
        if (!m.ok()) _exit(3);
        std::byte* p = (*m)->data();
        volatile std::byte b = p[0];  // pulls chunk 0, write-protected
        void* dest = ::mmap(nullptr, 2 * kChunk, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (dest == MAP_FAILED) _exit(4);
        // Chunk 0 (present) and chunk 1 (never pulled) move.
        auto* q =
            static_cast<std::byte*>(::mremap(p, 2 * kChunk, 2 * kChunk, MREMAP_MAYMOVE | MREMAP_FIXED, dest));
        if (q != dest) _exit(5);
        q[100] = std::byte{0x42};
        if (q[100] != std::byte{0x42} || q[200] != region->data()[200]) _exit(6);
        if (!(*m)->Sync().ok()) _exit(7);
        std::fputs("touching a page never pulled\n", stderr);
        b = q[kChunk + 10];  // SIGBUS expected
        (void)b;
        _exit(0);
      },
      mf::testing::DiedOf(SIGBUS), "touching a page never pulled");
}

// mremap with MREMAP_DONTUNMAP moves chunk 1 away but leaves its old range mapped, empty,
// and registered with the Mapping's userfaultfd. That range is the program's now, not the
// region's: a read there sees zeros, a write lands and is never pushed, and Sync and the
// rest of the mapping carry on. Each fault there used to pull the chunk, whose install
// skips a range the program moved away: the thread faulted forever.
TEST(MappingDeathTest, RangeLeftByMremapDontunmapIsTheProgramsEmptyMemory) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  constexpr size_t kChunk = 64u << 10;
  auto region = std::make_shared<MemoryRegion>("dontunmap", 1u << 20);
  FillPattern(region->bytes(), 23);
  for (WriteTracking tracking : AvailableTrackings()) {
    SCOPED_TRACE(std::string(WriteTrackingName(tracking)));
    EXPECT_EXIT(
        {
          ::alarm(30);
          MemoryRemote remote(region, true);
          MappingOptions o = NoPrefetch(kChunk, tracking);
          auto m = Mapping::Create(remote, o);
          if (!m.ok()) _exit(3);
          std::byte* p = (*m)->data();
          void* moved = ::mremap(p + kChunk, kChunk, kChunk, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, nullptr);
          if (moved == MAP_FAILED) _exit(4);
          if ((*m)->Sync().code() != Code::kOk) _exit(5);  // the remap event is handled
          std::byte* left = p + kChunk;
          if (left[10] != std::byte{0}) _exit(6);
          left[10] = std::byte{0x5a};
          if (left[10] != std::byte{0x5a}) _exit(7);
          p[10] = std::byte{0x5b};  // chunk 0 is the region's as before
          if ((*m)->Sync().code() != Code::kOk) _exit(8);
          if (region->data()[10] != std::byte{0x5b}) _exit(9);
          if (region->data()[kChunk + 10] == std::byte{0x5a}) _exit(10);  // never pushed
          if ((*m)->Close().code() != Code::kOk) _exit(11);
          _exit(0);
        },
        ::testing::ExitedWithCode(0), "");
  }
}

// A written chunk with one of its pages dropped (MADV_DONTNEED) is no longer local. Sync
// must not read the missing page: that fault would pull, and with the server failing,
// raise SIGBUS in the caller. Sync pulls the chunk first; that pull fails, Sync names the
// chunk in its error and keeps it dirty, and once the server answers a Sync pushes the
// write. A SIGBUS or a hang fails the test instead of killing the runner.
TEST(MappingDeathTest, SyncOfAPartlyDroppedChunkWithTheServerFailingReturnsAnError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto region = std::make_shared<MemoryRegion>("dropped", 1u << 20);
  FillPattern(region->bytes(), 19);
  for (WriteTracking tracking : AvailableTrackings()) {
    SCOPED_TRACE(std::string(WriteTrackingName(tracking)));
    EXPECT_EXIT(
        {
          ::alarm(30);
          FaultyRemote remote(region, true);
          MappingOptions o = NoPrefetch(64u << 10, tracking);
          auto m = Mapping::Create(remote, o);
          if (!m.ok()) _exit(3);
          std::byte* p = (*m)->data();
          const std::byte server_byte = region->data()[2 * kPageSize];
          p[100] = std::byte{0x5a};  // pulls chunk 0, then writes its first page
          if (::madvise(p + 2 * kPageSize, kPageSize, MADV_DONTNEED) != 0) _exit(4);
          remote.fail_reads = true;
          Status synced = (*m)->Sync();
          if (synced.ok()) {
            // Allowed only with the written page on the server.
            if (region->data()[100] != std::byte{0x5a}) _exit(5);
          } else {
            std::fprintf(stderr, "sync: %s\n", synced.ToString().c_str());  // shown if the test fails
            if (synced.code() != Code::kUnavailable) _exit(6);
            if (synced.ToString().find("chunk 0") == std::string::npos) _exit(7);
            if ((*m)->stats().dirty_chunks != 1) _exit(8);
          }
          remote.fail_reads = false;
          if (!(*m)->Sync().ok()) _exit(9);
          if (region->data()[100] != std::byte{0x5a}) _exit(10);
          if (p[2 * kPageSize] != server_byte) _exit(11);
          _exit(0);
        },
        ::testing::ExitedWithCode(0), "");
  }
}

// The program drops pages of a dirty chunk (MADV_DONTNEED) while Sync copies it, with the
// server failing reads: those pages cannot come back, and Sync must return an error (the
// chunk stays dirty) instead of raising SIGBUS in its caller. The pages go one at a time
// from the chunk's end while the copy runs from its start, so that the two meet; each
// round (a fresh mapping: a chunk that failed to pull stays failed) starts dropping a
// little later than the one before. On a memcpy copy this died in about a third of runs.
TEST(MappingDeathTest, PagesDroppedUnderSyncsCopyAreAnErrorNotASigbus) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  // The VM runs few rounds (each takes about 2 s of emulated CPU there, mostly in the
  // kernel) on a smaller chunk.
  const size_t kChunk = InTestVm() ? (256u << 10) : (2u << 20);
  // The dropper starts 0 to kLatestStart after Sync, in even steps over the rounds.
  constexpr std::chrono::microseconds kLatestStart(512);
  const size_t rounds = InTestVm() ? 8 : 128;
  auto region = std::make_shared<MemoryRegion>("race", kChunk);
  EXPECT_EXIT(
      {
        ::alarm(120);
        FaultyRemote remote(region, true);
        for (WriteTracking tracking : AvailableTrackings()) {
          MappingOptions o = NoPrefetch(kChunk, tracking);
          for (size_t round = 0; round < rounds; ++round) {
            auto m = Mapping::Create(remote, o);
            if (!m.ok()) _exit(3);
            std::byte* chunk = (*m)->data();
            std::memset(chunk, static_cast<int>(round + 1), kChunk);
            remote.fail_reads = true;
            std::atomic<bool> synced{false};
            std::thread dropper([&] {
              const auto start = std::chrono::steady_clock::now() + kLatestStart * round / rounds;
              while (std::chrono::steady_clock::now() < start) {
              }
              for (size_t page = kChunk / kPageSize - 1; page > 0 && !synced.load(std::memory_order_acquire);
                   --page) {
                if (::madvise(chunk + page * kPageSize, kPageSize, MADV_DONTNEED) != 0) _exit(4);
              }
            });
            Status s = (*m)->Sync();
            synced.store(true, std::memory_order_release);
            dropper.join();
            if (!s.ok() && (*m)->stats().dirty_chunks == 0) _exit(5);  // an error keeps the chunk
            remote.fail_reads = false;
            (void)(*m)->Close();
          }
        }
        _exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// Sync waits for a push slot for chunk 1 while the program unmaps it, or maps memory of
// its own over it: Sync neither fails nor pushes those bytes over the region's.
TEST(Mapping, ChunkUnmappedOrMappedOverWhileSyncWaitsIsNotPushed) {
  constexpr size_t kChunk = 64u << 10;
  for (WriteTracking tracking : AvailableTrackings()) {
    for (bool map_over : {false, true}) {
      SCOPED_TRACE(std::string(WriteTrackingName(tracking)) + (map_over ? " mmap over" : " munmap"));
      auto region = std::make_shared<MemoryRegion>("replaced", 1u << 20);
      std::memset(region->data(), 0x11, 1u << 20);
      MemoryRemote remote(region, true);
      MappingOptions o = NoPrefetch(kChunk);
      o.push_depth = 1;
      o.tracking = tracking;
      auto m = Mapping::Create(remote, o);
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      std::byte* p = (*m)->data();
      std::memset(p, 0x22, 2 * kChunk);
      remote.SetDelay(std::chrono::milliseconds(200));
      Status synced;
      std::thread syncer([&] { synced = (*m)->Sync(); });
      std::this_thread::sleep_for(std::chrono::milliseconds(80));  // chunk 0 is being pushed
      if (map_over) {
        void* own = ::mmap(p + kChunk, kChunk, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        ASSERT_NE(own, MAP_FAILED);
        std::memset(p + kChunk, 0xee, kChunk);
      } else {
        ASSERT_EQ(::munmap(p + kChunk, kChunk), 0);
      }
      syncer.join();
      remote.SetDelay(std::chrono::microseconds(0));
      EXPECT_TRUE(synced.ok()) << synced.ToString();
      EXPECT_EQ(region->data()[0], std::byte{0x22});
      EXPECT_EQ(region->data()[kChunk], std::byte{0x11});
      EXPECT_EQ(region->data()[2 * kChunk - 1], std::byte{0x11});
      EXPECT_EQ((*m)->stats().dirty_chunks, 0u);
      EXPECT_TRUE((*m)->Close().ok());
    }
  }
}

// Kernels without UFFDIO_POISON (the VM's): a failed chunk gets an empty memfd mapped over
// it, whose mmap raises an unmap event. That event is the Mapping's own even when the fault
// thread handles it after the mmap has returned; it was taken for the program's unmap at
// times, with a warning, and Close then left the memfd mapping behind. Rounds, as it is
// a race between two threads.
TEST(Mapping, FailedChunkMappedOverWithoutPoisonIsNotAHoleAndCloseUnmapsIt) {
  auto features = Userfaultfd::AvailableFeatures();
  ASSERT_TRUE(features.ok()) << features.status().ToString();
  if ((*features & UFFD_FEATURE_POISON) != 0)
    GTEST_SKIP() << "kernel has UFFDIO_POISON (the VM suite covers this)";
  constexpr size_t kChunk = 64u << 10;
  constexpr int kRounds = 20;
  auto region = std::make_shared<MemoryRegion>("memfd-over", 4 * kChunk);
  FaultyRemote remote(region, true);
  remote.fail_reads = true;
  MappingOptions o = NoPrefetch(kChunk);
  for (int round = 0; round < kRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto m = Mapping::Create(remote, o);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    std::byte* chunk = (*m)->data() + kChunk;
    // Through the kernel: the failed page is an EFAULT here rather than SIGBUS.
    std::byte copy[64];
    iovec local{copy, sizeof(copy)};
    iovec far{chunk, sizeof(copy)};
    ASSERT_EQ(::process_vm_readv(::getpid(), &local, 1, &far, 1, 0), -1);
    ASSERT_EQ((*m)->Close().code(), Code::kOk);
    unsigned char resident = 0;
    EXPECT_EQ(::mincore(chunk, kPageSize, &resident), -1) << "the failed chunk is still mapped after Close";
    EXPECT_EQ(errno, ENOMEM);
  }
}

// A thread waits on a page whose chunk's pull is in flight when the program maps memory of
// its own over that page. The pull's install skips the page (it is no longer ours), so
// nothing it does wakes the thread: the unmap's handling must, and the thread then reads
// the new mapping. It used to sleep until something else woke the chunk (here: Close).
TEST(Mapping, WaiterOnAPageMappedOverDuringItsPullWakesUp) {
  constexpr size_t kChunk = 64u << 10;
  constexpr size_t kPage = 3;
  constexpr auto kWaitLimit = std::chrono::seconds(5);
  auto region = std::make_shared<MemoryRegion>("mapped-over", 1u << 20);
  std::memset(region->data(), 0x11, 1u << 20);
  MemoryRemote remote(region, true);
  remote.SetDelay(std::chrono::milliseconds(300));  // the pull is still in flight below
  MappingOptions o = NoPrefetch(kChunk);
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::byte* page = (*m)->data() + kPage * kPageSize;
  std::atomic<bool> woke{false};
  std::atomic<int> seen{-1};
  std::thread waiter([&] {
    seen = static_cast<int>(*reinterpret_cast<volatile std::byte*>(page));
    woke = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(80));  // the waiter faulted
  ASSERT_FALSE(woke.load());
  void* own = ::mmap(page, kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
  ASSERT_NE(own, MAP_FAILED);
  const auto deadline = std::chrono::steady_clock::now() + kWaitLimit;
  while (!woke.load() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(woke.load()) << "the waiter still sleeps " << kWaitLimit.count() << " s after the mmap";
  EXPECT_EQ((*m)->Close().code(), Code::kOk);  // wakes the waiter if nothing else did
  waiter.join();
  EXPECT_EQ(seen.load(), 0) << "the waiter read the remote's byte, not its own mapping's";
  remote.SetDelay(std::chrono::microseconds(0));
}

// Close with the periodic sync running: a pass that queued behind Close's own Sync must
// not run once the fault thread is gone (a page it touched would never be served, and
// Close would hang joining it). Chunks are written and partly dropped right before each
// Close, so that the passes have chunks to pull and push. A Sync after Close is refused.
TEST(MappingDeathTest, CloseWithPeriodicSyncRunningDoesNotHang) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  constexpr size_t kChunk = 64u << 10;
  constexpr size_t kRounds = 40;
  auto region = std::make_shared<MemoryRegion>("periodic-close", 2u << 20);
  EXPECT_EXIT(
      {
        ::alarm(60);
        for (size_t round = 0; round < kRounds; ++round) {
          MemoryRemote remote(region, true);
          remote.SetDelay(std::chrono::microseconds(100));  // Close's Sync takes a while
          MappingOptions o;
          o.chunk_size = kChunk;
          o.prefetch = round % 2 == 0;
          o.sync_interval = std::chrono::milliseconds(2);
          auto m = Mapping::Create(remote, o);
          if (!m.ok()) _exit(3);
          std::byte* p = (*m)->data();
          for (size_t i = 0; i < (*m)->size() / kChunk; ++i) {
            std::byte* chunk = p + i * kChunk;
            chunk[(round % 16) * kPageSize] = static_cast<std::byte>(round);
            if (i % 3 == 0 &&
                ::madvise(chunk + kPageSize * ((round + 1) % 16), kPageSize, MADV_DONTNEED) != 0)
              _exit(4);
          }
          if (!(*m)->Close().ok()) _exit(5);
          // A Sync after Close touches nothing and says so.
          if ((*m)->Sync().code() != Code::kAborted) _exit(6);
        }
        _exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// sync_interval pushes writes in the background: a reader of the server sees them without
// anyone calling Sync.
TEST(Mapping, PeriodicSyncPushesWithoutACall) {
  auto region = std::make_shared<MemoryRegion>("periodic", 1u << 20);
  MemoryRemote remote(region, true);
  MappingOptions o;
  o.sync_interval = std::chrono::milliseconds(20);
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::memset((*m)->data() + 70000, 0x6d, 5000);
  MemoryRemote reader(region, false);
  std::vector<std::byte> seen(5000);
  const std::vector<std::byte> want(5000, std::byte{0x6d});
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (;;) {
    ASSERT_TRUE(fabric::ReadAt(reader, 70000, seen).ok());
    // The bytes land before the push's completion is counted: wait for both.
    if (seen == want && (*m)->stats().pushes > 0) break;
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "the periodic sync never pushed the write";
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ((*m)->stats().dirty_chunks, 0u);
}

// The range is MADV_DONTFORK: a forked child has nothing mapped there, so a touch is a
// SIGSEGV (a page the parent has, or one it never pulled), not a fault nobody serves. The
// parent's mapping keeps working.
TEST(Mapping, ForkedChildDoesNotInheritTheRange) {
  constexpr size_t kSize = 1u << 20;
  auto region = std::make_shared<MemoryRegion>("fork", kSize);
  FillPattern(region->bytes(), 23);
  MemoryRemote remote(region, true);
  MappingOptions o;
  o.prefetch = false;
  auto m = Mapping::Create(remote, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  std::byte* p = (*m)->data();
  ASSERT_EQ(p[10], region->data()[10]);  // chunk 0 is present in the parent
  for (size_t offset : {size_t{10}, kSize - 10}) {
    SCOPED_TRACE("offset " + std::to_string(offset));
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::alarm(10);  // a hang ends in SIGALRM, which the parent reports
      volatile std::byte b = p[offset];
      (void)b;
      _exit(0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(mf::testing::DiedOf(SIGSEGV)(status))
        << (WIFEXITED(status) ? "exited with " + std::to_string(WEXITSTATUS(status))
                              : "died of signal " + std::to_string(WTERMSIG(status)));
  }
  EXPECT_EQ(std::memcmp(p, region->data(), kSize), 0);
  p[kSize - 1] = std::byte{0x31};
  ASSERT_TRUE((*m)->Sync().ok());
  EXPECT_EQ(region->data()[kSize - 1], std::byte{0x31});
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
