// Tests of fabric::Mount over MemoryRemote: correctness against a reference copy, queue
// jumping, priority order, write-back, read-only mounts, injected failures, threads.
#include "fabric/mount.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include "fabric/memory_remote.h"

namespace mf::fabric {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;

constexpr uint64_t kSize = 4u << 20;
constexpr auto kWait = milliseconds(20000);

std::vector<std::byte> Pattern(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

// Forwards to a MemoryRemote and records the offsets of the reads, in submission order.
class RecordingRemote final : public Remote {
 public:
  explicit RecordingRemote(std::shared_ptr<MemoryRegion> region) : inner_(std::move(region), false) {}
  const RegionInfo& info() const override { return inner_.info(); }
  bool writable() const override { return false; }
  std::string_view transport() const override { return "recording"; }
  size_t max_transfer() const override { return inner_.max_transfer(); }
  Result<Buffer> AllocateBuffer(size_t size) override { return inner_.AllocateBuffer(size); }
  void Submit(std::span<const IoRequest> requests) override MF_EXCLUDES(mu_) {
    {
      MutexLock lock(mu_);
      for (const IoRequest& r : requests) reads_.push_back(r.offset);
    }
    inner_.Submit(requests);
  }
  Status Flush() override { return inner_.Flush(); }
  Status Close() override { return inner_.Close(); }
  std::vector<uint64_t> reads() MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return reads_;
  }
  MemoryRemote& inner() { return inner_; }

 private:
  MemoryRemote inner_;
  Mutex mu_;
  std::vector<uint64_t> reads_ MF_GUARDED_BY(mu_);
};

class MountTest : public ::testing::Test {
 protected:
  void SetUp() override { Fill(kSize); }
  void Fill(uint64_t size) {
    region_ = std::make_shared<MemoryRegion>("m", size);
    const auto bytes = Pattern(size, 7);
    std::memcpy(region_->data(), bytes.data(), size);
    reference_ = bytes;
  }
  std::unique_ptr<Mount> MountOf(Remote& remote, MountOptions options) {
    auto m = Mount::Create(remote, std::move(options));
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return m.ok() ? std::move(m).value() : nullptr;
  }
  bool ServerEqualsReference() const {
    return std::memcmp(region_->data(), reference_.data(), reference_.size()) == 0;
  }

  std::shared_ptr<MemoryRegion> region_;
  std::vector<std::byte> reference_;  // what the region must hold after a sync
};

TEST_F(MountTest, RejectsBadOptions) {
  MemoryRemote remote(region_, true);
  for (size_t chunk : {size_t{0}, size_t{2048}, size_t{3} << 12, size_t{4} << 20}) {
    MountOptions o;
    o.chunk_size = chunk;
    EXPECT_EQ(Mount::Create(remote, o).status().code(), Code::kInvalidArgument) << chunk;
  }
  MountOptions o;
  o.push_depth = 0;
  EXPECT_EQ(Mount::Create(remote, o).status().code(), Code::kInvalidArgument);
  o = MountOptions{};
  o.max_pull_attempts = 0;
  EXPECT_EQ(Mount::Create(remote, o).status().code(), Code::kInvalidArgument);
}

class MountChunkTest : public MountTest, public ::testing::WithParamInterface<size_t> {};

TEST_P(MountChunkTest, RandomReadsAndWritesEqualAReferenceAfterSync) {
  // An odd size: the last chunk is short. A small max_transfer splits big chunks.
  Fill(kSize - 12345);
  MemoryRemote remote(region_, true, 256u << 10);
  MountOptions o;
  o.chunk_size = GetParam();
  o.background_depth = 2;
  o.in_flight_bytes = 0;  // exactly this depth
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  std::vector<std::byte> local = reference_;  // what reads through the mount must see
  std::mt19937_64 rng(GetParam());
  std::vector<std::byte> buf;
  for (int i = 0; i < 400; ++i) {
    const uint64_t off = rng() % local.size();
    const size_t len = 1 + rng() % std::min<uint64_t>(local.size() - off, 3 * GetParam());
    buf.resize(len);
    if (rng() % 2 == 0) {
      ASSERT_TRUE(m->Read(off, buf).ok());
      ASSERT_EQ(std::memcmp(buf.data(), local.data() + off, len), 0) << "read at " << off;
    } else {
      for (auto& b : buf) b = static_cast<std::byte>(rng());
      ASSERT_TRUE(m->Write(off, buf).ok());
      std::memcpy(local.data() + off, buf.data(), len);
    }
  }
  reference_ = local;
  ASSERT_TRUE(m->Sync().ok());
  EXPECT_TRUE(ServerEqualsReference());
  EXPECT_EQ(m->stats().dirty_chunks, 0u);
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  const MountStats s = m->stats();
  EXPECT_EQ(s.local_chunks, s.chunks);
  EXPECT_EQ(s.bytes_local, local.size());
  EXPECT_GT(s.pull_bytes_per_second, 0);
  EXPECT_GT(s.push_bytes_per_second, 0);
  EXPECT_TRUE(m->Close().ok());
}

INSTANTIATE_TEST_SUITE_P(ChunkSizes, MountChunkTest,
                         ::testing::Values(kMountMinChunkSize, kMountDefaultChunkSize, kMountMaxChunkSize));

TEST_F(MountTest, ReadsBeforeTheBackgroundPullFinishesAreCorrect) {
  MemoryRemote remote(region_, false);
  remote.SetDelay(milliseconds(2));
  MountOptions o;
  o.chunk_size = 16u << 10;  // 256 chunks: ~500 ms of background pull
  o.background_depth = 1;
  o.in_flight_bytes = 0;  // exactly this depth
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  std::mt19937_64 rng(5);
  std::vector<std::byte> buf(5000);
  for (int i = 0; i < 10; ++i) {
    const uint64_t off = rng() % (kSize - buf.size());
    ASSERT_TRUE(m->Read(off, buf).ok());
    ASSERT_EQ(std::memcmp(buf.data(), reference_.data() + off, buf.size()), 0);
  }
  EXPECT_LT(m->stats().local_chunks, m->stats().chunks)
      << "the background pull was too fast to test anything";
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  EXPECT_EQ(std::memcmp(m->data(), reference_.data(), kSize), 0);
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, AReadOfAFarChunkJumpsTheQueue) {
  MemoryRemote remote(region_, false);
  remote.SetDelay(milliseconds(5));
  MountOptions o;
  o.background_depth = 2;  // 64 chunks at 5 ms each: ~320 ms for the whole region
  o.in_flight_bytes = 0;   // exactly this depth
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  std::vector<std::byte> buf(100);
  const uint64_t far = kSize - 1000;
  ASSERT_TRUE(m->Read(far, buf).ok());
  // Judged by what else is local when the read returns, not by the clock (shared CI).
  const MountStats s = m->stats();
  EXPECT_EQ(std::memcmp(buf.data(), reference_.data() + far, buf.size()), 0);
  EXPECT_TRUE(m->IsLocal(far));
  EXPECT_FALSE(m->IsLocal(kSize / 2)) << "the background pull reached the middle already";
  EXPECT_LT(s.local_chunks, s.chunks / 2);
  EXPECT_EQ(s.demand_pulls, 1u);
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, PriorityHintsArePulledFirst) {
  RecordingRemote remote(region_);
  const uint64_t chunk = kMountDefaultChunkSize;
  MountOptions o;
  o.priority_offsets = {kSize - 1, 40 * chunk + 17, 20 * chunk};
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  const std::vector<uint64_t> reads = remote.reads();
  ASSERT_EQ(reads.size(), kSize / chunk);
  EXPECT_EQ(reads[0], kSize - chunk);
  EXPECT_EQ(reads[1], 40 * chunk);
  EXPECT_EQ(reads[2], 20 * chunk);
  EXPECT_EQ(reads[3], 0u);
  EXPECT_EQ(reads[4], chunk);
  EXPECT_EQ(m->stats().demand_pulls, 0u);
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, PriorityFunctionOrdersTheBackgroundPull) {
  RecordingRemote remote(region_);
  MountOptions o;
  o.priority = [](uint64_t offset) { return kSize - offset; };  // last chunk first
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  const std::vector<uint64_t> reads = remote.reads();
  ASSERT_EQ(reads.size(), kSize / kMountDefaultChunkSize);
  for (size_t i = 0; i < reads.size(); ++i) EXPECT_EQ(reads[i], kSize - (i + 1) * kMountDefaultChunkSize);
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, PrioritizeMovesChunksToTheFront) {
  RecordingRemote remote(region_);
  remote.inner().SetDelay(milliseconds(3));
  MountOptions o;
  o.background_depth = 1;
  o.in_flight_bytes = 0;  // exactly this depth
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  m->Prioritize(kSize - 3 * kMountDefaultChunkSize, 3 * kMountDefaultChunkSize);
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  const std::vector<uint64_t> reads = remote.reads();
  // The three prioritized chunks come right after whatever was started before the call.
  const auto at = std::find(reads.begin(), reads.end(), kSize - 3 * kMountDefaultChunkSize) - reads.begin();
  EXPECT_LT(at, 30);  // sequentially they would come at 61
  ASSERT_LE(static_cast<size_t>(at) + 3, reads.size());
  EXPECT_EQ(reads[static_cast<size_t>(at) + 1], kSize - 2 * kMountDefaultChunkSize);
  EXPECT_EQ(reads[static_cast<size_t>(at) + 2], kSize - kMountDefaultChunkSize);
  EXPECT_EQ(m->stats().demand_pulls, 0u);
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, CloseAndThePushIntervalPushEverything) {
  MemoryRemote remote(region_, true);
  MountOptions o;
  o.push_interval = milliseconds(5);
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  const auto data = Pattern(300000, 9);
  ASSERT_TRUE(m->Write(77777, data).ok());
  std::memcpy(reference_.data() + 77777, data.data(), data.size());
  // The interval pushes without a Sync (watched through the counters: the region's bytes
  // may only be read once no push runs).
  for (int i = 0; i < 2000 && (m->stats().dirty_chunks > 0 || m->stats().pushes < 5); ++i)
    std::this_thread::sleep_for(milliseconds(1));
  EXPECT_EQ(m->stats().pushes, 5u);
  EXPECT_EQ(m->stats().dirty_chunks, 0u);
  const auto more = Pattern(kMountDefaultChunkSize * 2, 10);  // whole chunks: no pull needed
  ASSERT_TRUE(m->Write(10 * kMountDefaultChunkSize, more).ok());
  std::memcpy(reference_.data() + 10 * kMountDefaultChunkSize, more.data(), more.size());
  ASSERT_TRUE(m->Close().ok());
  EXPECT_TRUE(ServerEqualsReference());
  std::vector<std::byte> one(1);
  EXPECT_EQ(m->Read(0, one).code(), Code::kAborted);
  EXPECT_TRUE(m->Close().ok());  // idempotent
}

TEST_F(MountTest, WholeChunkWritesNeedNoPull) {
  MemoryRemote remote(region_, true);
  MountOptions o;
  o.background_pull = false;
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  const auto data = Pattern(4 * kMountDefaultChunkSize, 3);
  ASSERT_TRUE(m->Write(8 * kMountDefaultChunkSize, data).ok());
  EXPECT_EQ(remote.requests_served(), 0u);
  EXPECT_EQ(m->stats().dirty_chunks, 4u);
  EXPECT_EQ(m->stats().bytes_dirty, data.size());
  ASSERT_TRUE(m->Sync().ok());
  EXPECT_EQ(remote.requests_served(), 4u);
  std::memcpy(reference_.data() + 8 * kMountDefaultChunkSize, data.data(), data.size());
  EXPECT_TRUE(ServerEqualsReference());
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, ReadOnlyMountPushesNothing) {
  for (bool lease : {false, true}) {
    MemoryRemote remote(region_, lease);
    MountOptions o;
    o.read_only = true;
    auto m = MountOf(remote, o);
    ASSERT_NE(m, nullptr);
    EXPECT_TRUE(m->read_only());
    std::vector<std::byte> buf(4096, std::byte{1});
    EXPECT_EQ(m->Write(0, buf).code(), Code::kPermissionDenied);
    EXPECT_EQ(m->MarkDirty(0, 1).code(), Code::kPermissionDenied);
    ASSERT_TRUE(m->Read(0, buf).ok());
    ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
    const uint64_t served = remote.requests_served();
    EXPECT_TRUE(m->Sync().ok());
    EXPECT_TRUE(m->Close().ok());
    EXPECT_EQ(remote.requests_served(), served);
    EXPECT_TRUE(ServerEqualsReference());
  }
}

TEST_F(MountTest, APullFailingForGoodIsAnErrorNotAHang) {
  MemoryRemote remote(region_, true);
  MountOptions o;
  o.background_pull = false;
  o.max_pull_attempts = 3;
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  remote.FailNext(3, Unavailable("injected"));
  std::vector<std::byte> buf(10);
  Status s = m->Read(5, buf);
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_EQ(m->Read(5, buf).code(), Code::kUnavailable);   // stays failed
  EXPECT_EQ(m->Write(5, buf).code(), Code::kUnavailable);  // a partial write needs the pull
  ASSERT_TRUE(m->Read(kMountDefaultChunkSize, buf).ok());  // other chunks are fine
  EXPECT_EQ(m->stats().failed_chunks, 1u);
  EXPECT_EQ(m->stats().pull_retries, 2u);
  // A write of the whole chunk replaces what could not be pulled.
  const auto whole = Pattern(kMountDefaultChunkSize, 4);
  ASSERT_TRUE(m->Write(0, whole).ok());
  ASSERT_TRUE(m->Read(5, buf).ok());
  EXPECT_EQ(m->stats().failed_chunks, 0u);
  std::memcpy(reference_.data(), whole.data(), whole.size());
  EXPECT_TRUE(m->Close().ok());
  EXPECT_TRUE(ServerEqualsReference());
}

TEST_F(MountTest, TransientPullFailuresAreRetried) {
  MemoryRemote remote(region_, false);
  remote.FailNext(5, Unavailable("injected"));
  MountOptions o;
  o.background_depth = 1;  // retries land on different chunks' single attempts
  o.in_flight_bytes = 0;   // exactly this depth
  o.max_pull_attempts = 6;
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  EXPECT_EQ(std::memcmp(m->data(), reference_.data(), kSize), 0);
  EXPECT_EQ(m->stats().pull_retries, 5u);
  EXPECT_EQ(m->stats().failed_chunks, 0u);
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, BackgroundPullFailuresSurfaceInWaitAllLocal) {
  MemoryRemote remote(region_, false);
  remote.FailNext(1000, Status(Code::kIoError, "injected"));
  MountOptions o;
  o.max_pull_attempts = 2;
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->WaitAllLocal(kWait).code(), Code::kIoError);
  std::vector<std::byte> buf(10);
  EXPECT_EQ(m->Read(kSize / 2, buf).code(), Code::kIoError);
  EXPECT_TRUE(m->Close().ok());
}

TEST_F(MountTest, APushFailureKeepsTheDirtySet) {
  MemoryRemote remote(region_, true);
  auto m = MountOf(remote, {});
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  const auto data = Pattern(5 * kMountDefaultChunkSize + 100, 12);
  ASSERT_TRUE(m->Write(1000, data).ok());
  const uint64_t dirty = m->stats().dirty_chunks;
  EXPECT_EQ(dirty, 6u);
  remote.FailNext(2, Unavailable("injected"));
  Status s = m->Sync();
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_EQ(m->stats().dirty_chunks, 2u);
  EXPECT_EQ(m->stats().failed_pushes, 2u);
  ASSERT_TRUE(m->Sync().ok());
  EXPECT_EQ(m->stats().dirty_chunks, 0u);
  std::memcpy(reference_.data() + 1000, data.data(), data.size());
  EXPECT_TRUE(ServerEqualsReference());
  // Close's final sync reports a failure too, and nothing hangs.
  ASSERT_TRUE(m->Write(0, data).ok());
  remote.FailNext(100, Unavailable("injected"));
  EXPECT_EQ(m->Close().code(), Code::kUnavailable);
}

TEST_F(MountTest, FileBackedLocalCopy) {
  const std::string path =
      (std::filesystem::temp_directory_path() / ("mount_test." + std::to_string(::getpid()))).string();
  MemoryRemote remote(region_, true);
  MountOptions o;
  o.path = path;
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->WaitAllLocal(kWait).ok());
  EXPECT_EQ(std::filesystem::file_size(path), kSize);
  EXPECT_EQ(std::memcmp(m->data(), reference_.data(), kSize), 0);
  const auto data = Pattern(3000, 1);
  ASSERT_TRUE(m->Write(kSize - 3000, data).ok());
  std::memcpy(reference_.data() + kSize - 3000, data.data(), data.size());
  ASSERT_TRUE(m->Close().ok());
  EXPECT_TRUE(ServerEqualsReference());
  std::filesystem::remove(path);
}

TEST_F(MountTest, DirectWritesThroughDataWithMarkDirty) {
  MemoryRemote remote(region_, true);
  auto m = MountOf(remote, {});
  ASSERT_NE(m, nullptr);
  ASSERT_TRUE(m->EnsureLocal(100, 5000).ok());
  std::memset(m->data() + 100, 0x5a, 5000);
  std::memset(reference_.data() + 100, 0x5a, 5000);
  ASSERT_TRUE(m->MarkDirty(100, 5000).ok());
  EXPECT_TRUE(m->IsDirty(100));
  ASSERT_TRUE(m->Close().ok());
  EXPECT_TRUE(ServerEqualsReference());
}

TEST_F(MountTest, ConcurrentReadersAndWriters) {
  MemoryRemote remote(region_, true);
  remote.SetDelay(microseconds(50));
  MountOptions o;
  o.chunk_size = 16u << 10;
  o.push_interval = milliseconds(3);
  o.demand_depth = 2;  // fewer slots than threads: readers wait for slots too
  auto m = MountOf(remote, o);
  ASSERT_NE(m, nullptr);
  constexpr int kThreads = 4;
  // Each thread owns a slice whose ends are not chunk-aligned, so threads share chunks.
  const uint64_t slice = kSize / kThreads - 777;
  std::vector<std::byte> expected = reference_;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const uint64_t lo = static_cast<uint64_t>(t) * slice;
      std::mt19937_64 rng(static_cast<uint64_t>(t) + 100);
      std::vector<std::byte> buf;
      for (int i = 0; i < 300; ++i) {
        const uint64_t off = lo + rng() % slice;
        const size_t len = 1 + rng() % std::min<uint64_t>(lo + slice - off, 40000);
        buf.resize(len);
        if (rng() % 3 == 0) {
          if (!m->Read(off, buf).ok() || std::memcmp(buf.data(), expected.data() + off, len) != 0) ++failures;
        } else {
          for (auto& b : buf) b = static_cast<std::byte>(rng());
          if (!m->Write(off, buf).ok()) ++failures;
          std::memcpy(expected.data() + off, buf.data(), len);
        }
      }
    });
  }
  // Meanwhile, whole-region reads of bytes no thread writes, and syncs.
  const uint64_t tail = kThreads * slice;
  std::vector<std::byte> tail_buf(kSize - tail);
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(m->Read(tail, tail_buf).ok());
    ASSERT_EQ(std::memcmp(tail_buf.data(), reference_.data() + tail, tail_buf.size()), 0);
    ASSERT_TRUE(m->Sync().ok());
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  reference_ = expected;
  ASSERT_TRUE(m->Sync().ok());
  EXPECT_TRUE(ServerEqualsReference());
  EXPECT_TRUE(m->Close().ok());
}

}  // namespace
}  // namespace mf::fabric
