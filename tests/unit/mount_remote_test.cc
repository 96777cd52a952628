// Tests of fabric::MountRemote over MemoryRemote: reads and writes through the Remote
// interface against a reference copy, write-back on Flush, reads racing the background
// pull, inline completion of local requests, pull errors, Close with requests pending.
#include "fabric/mount_remote.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "fabric/memory_remote.h"

namespace mf::fabric {
namespace {

using std::chrono::microseconds;
using std::chrono::milliseconds;

constexpr uint64_t kSize = 8u << 20;
constexpr size_t kChunk = 64u << 10;

std::vector<std::byte> Pattern(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

// Records every completion: its status and the thread it ran on.
class Recorder final : public IoCallback {
 public:
  void OnIoComplete(uint64_t cookie, const Status& status) override MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    done_.push_back({cookie, status.code(), std::this_thread::get_id()});
    cv_.notify_all();
  }
  struct Done {
    uint64_t cookie;
    Code code;
    std::thread::id thread;
  };
  // Waits for n completions (at most 20 s) and returns every completion so far.
  std::vector<Done> WaitFor(size_t n) MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    cv_.wait_for(mu_, std::chrono::seconds(20),
                 [&]() MF_NO_THREAD_SAFETY_ANALYSIS { return done_.size() >= n; });
    return done_;
  }

 private:
  Mutex mu_;
  std::condition_variable_any cv_;
  std::vector<Done> done_ MF_GUARDED_BY(mu_);
};

class MountRemoteTest : public ::testing::Test {
 protected:
  void SetUp() override {
    region_ = std::make_shared<MemoryRegion>("m", kSize);
    reference_ = Pattern(kSize, 5);
    std::memcpy(region_->data(), reference_.data(), kSize);
  }
  // A MountRemote over a MemoryRemote of the region; *inner (if given) is the latter.
  std::unique_ptr<MountRemote> Make(bool writable, MountOptions options, MemoryRemote** inner = nullptr,
                                    size_t inner_max_transfer = 256u << 10) {
    auto memory = std::make_unique<MemoryRemote>(region_, writable, inner_max_transfer);
    if (inner != nullptr) *inner = memory.get();
    auto m = MountRemote::Create(std::move(memory), std::move(options));
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return m.ok() ? std::move(m).value() : nullptr;
  }
  // Chunks are pulled only when read.
  static MountOptions OnDemand() {
    MountOptions o;
    o.chunk_size = kChunk;
    o.background_pull = false;
    return o;
  }
  bool ServerEqualsReference() const { return std::memcmp(region_->data(), reference_.data(), kSize) == 0; }

  std::shared_ptr<MemoryRegion> region_;
  std::vector<std::byte> reference_;
};

TEST_F(MountRemoteTest, DescribesItselfAsTheMountedRemote) {
  auto r = Make(true, {});
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->transport(), "mount+memory");
  EXPECT_EQ(r->info().name, "m");
  EXPECT_EQ(r->size(), kSize);
  EXPECT_TRUE(r->writable());
  EXPECT_GE(r->max_transfer(), size_t{1} << 20);
  EXPECT_EQ(r->remote().transport(), "memory");
  auto buffer = r->AllocateBuffer(5000);
  ASSERT_TRUE(buffer.ok());
  EXPECT_GE(buffer->size(), 5000u);
  MountOptions read_only;
  read_only.read_only = true;
  auto ro = Make(true, read_only);
  ASSERT_NE(ro, nullptr);
  EXPECT_FALSE(ro->writable());
  std::vector<std::byte> one(1);
  EXPECT_EQ(WriteAt(*ro, 0, one).code(), Code::kPermissionDenied);
  EXPECT_EQ(MountRemote::Create(nullptr, {}).status().code(), Code::kInvalidArgument);
}

TEST_F(MountRemoteTest, RandomReadsAndWritesMatchAReferenceAfterFlush) {
  MemoryRemote* inner = nullptr;
  MountOptions o;
  o.chunk_size = kChunk;
  auto r = Make(true, o, &inner);
  ASSERT_NE(r, nullptr);
  inner->SetDelay(microseconds(50));  // the background pull is still running meanwhile
  std::mt19937_64 rng(9);
  std::vector<std::byte> buf;
  bool wrote = false;
  for (int i = 0; i < 400; ++i) {
    const uint64_t off = rng() % kSize;
    const size_t len = 1 + rng() % std::min<uint64_t>(kSize - off, 3u << 20);  // split at 1 MiB
    buf.resize(len);
    if (rng() % 2 == 0) {
      Status read = ReadAt(*r, off, buf);
      ASSERT_TRUE(read.ok()) << read.ToString();
      ASSERT_EQ(std::memcmp(buf.data(), reference_.data() + off, len), 0) << "read at " << off;
    } else {
      for (auto& b : buf) b = static_cast<std::byte>(rng());
      Status written = WriteAt(*r, off, buf);
      ASSERT_TRUE(written.ok()) << written.ToString();
      std::memcpy(reference_.data() + off, buf.data(), len);
      wrote = true;
    }
  }
  ASSERT_TRUE(wrote);
  // Write-back: without a push interval nothing reached the server before Flush.
  EXPECT_FALSE(ServerEqualsReference());
  EXPECT_GT(r->mount().stats().bytes_dirty, 0u);
  Status flushed = r->Flush();
  ASSERT_TRUE(flushed.ok()) << flushed.ToString();
  EXPECT_TRUE(ServerEqualsReference());
  EXPECT_EQ(r->mount().stats().bytes_dirty, 0u);
  std::vector<std::byte> whole(kSize);
  ASSERT_TRUE(ReadAt(*r, 0, whole).ok());
  EXPECT_EQ(whole, reference_);
  EXPECT_TRUE(r->Close().ok());
}

TEST_F(MountRemoteTest, ReadsBeforeTheBackgroundPullFinishesAreCorrect) {
  MemoryRemote* inner = nullptr;
  MountOptions o;
  o.chunk_size = kChunk;
  o.background_depth = 1;
  o.in_flight_bytes = 0;  // keeps the depth at 1
  auto r = Make(false, o, &inner);
  ASSERT_NE(r, nullptr);
  inner->SetDelay(microseconds(2000));  // 128 chunks: the background pull takes > 250 ms
  std::vector<std::byte> buf(10000);
  // From the far end down: the first reads are certainly ahead of the background pull.
  for (uint64_t off = kSize - buf.size(); off > kSize / 2; off -= 700000) {
    ASSERT_TRUE(ReadAt(*r, off, buf).ok());
    ASSERT_EQ(std::memcmp(buf.data(), reference_.data() + off, buf.size()), 0) << "read at " << off;
  }
  const MountStats s = r->mount().stats();
  EXPECT_GT(s.demand_pulls, 0u);
  EXPECT_LT(s.local_chunks, s.chunks);
  EXPECT_TRUE(r->mount().WaitAllLocal(milliseconds(20000)).ok());
}

TEST_F(MountRemoteTest, LocalRequestsCompleteInlineOthersOnAWorker) {
  MemoryRemote* inner = nullptr;
  MountOptions o = OnDemand();
  auto r = Make(true, o, &inner);
  ASSERT_NE(r, nullptr);
  auto buffer = r->AllocateBuffer(2 * kChunk);
  ASSERT_TRUE(buffer.ok());
  Recorder done;
  const IoRequest far{IoKind::kRead, kSize - kChunk, buffer->span().first(kChunk), &*buffer, &done, 1};
  r->Submit({&far, 1});
  auto first = done.WaitFor(1);
  ASSERT_EQ(first.size(), 1u);
  EXPECT_EQ(first[0].code, Code::kOk);
  EXPECT_NE(first[0].thread, std::this_thread::get_id());  // it had to be pulled
  EXPECT_EQ(std::memcmp(buffer->data(), reference_.data() + kSize - kChunk, kChunk), 0);
  // Now local: a read and a write of it complete on this thread, before Submit returns.
  const IoRequest again[] = {
      {IoKind::kRead, kSize - kChunk + 100, buffer->span().subspan(kChunk, 1000), &*buffer, &done, 2},
      {IoKind::kWrite, kSize - kChunk, buffer->span().first(10), &*buffer, &done, 3}};
  r->Submit(again);
  auto all = done.WaitFor(3);
  ASSERT_EQ(all.size(), 3u);
  for (size_t i = 1; i < 3; ++i) {
    EXPECT_EQ(all[i].code, Code::kOk);
    EXPECT_EQ(all[i].thread, std::this_thread::get_id()) << "request " << all[i].cookie;
  }
  EXPECT_TRUE(r->mount().IsDirty(kSize - kChunk));
  EXPECT_EQ(inner->requests_served(), 1u);  // the one pull; the write stayed local
  EXPECT_TRUE(r->Close().ok());
}

TEST_F(MountRemoteTest, APullThatFailsSurfacesItsError) {
  MemoryRemote* inner = nullptr;
  MountOptions o = OnDemand();
  o.max_pull_attempts = 2;
  auto r = Make(true, o, &inner);
  ASSERT_NE(r, nullptr);
  inner->FailNext(2, Status(Code::kUnavailable, "injected"));
  std::vector<std::byte> buf(100);
  Status read = ReadAt(*r, 3 * kChunk, buf);
  EXPECT_EQ(read.code(), Code::kUnavailable) << read.ToString();
  // A partial write to that chunk needs it pulled: it fails too, and nothing is written.
  EXPECT_EQ(WriteAt(*r, 3 * kChunk, buf).code(), Code::kUnavailable);
  EXPECT_FALSE(r->mount().IsDirty(3 * kChunk));
  // Other chunks are unaffected.
  ASSERT_TRUE(ReadAt(*r, 5 * kChunk, buf).ok());
  EXPECT_EQ(std::memcmp(buf.data(), reference_.data() + 5 * kChunk, buf.size()), 0);
  EXPECT_TRUE(r->Close().ok());
}

TEST_F(MountRemoteTest, CloseFailsQueuedRequestsAndLaterOnes) {
  MemoryRemote* inner = nullptr;
  MountOptions o = OnDemand();
  auto r = Make(true, o, &inner);
  ASSERT_NE(r, nullptr);
  inner->SetDelay(milliseconds(30));
  constexpr size_t kRequests = 40;
  auto buffer = r->AllocateBuffer(kRequests * 100);
  ASSERT_TRUE(buffer.ok());
  Recorder done;
  std::vector<IoRequest> requests;
  for (size_t i = 0; i < kRequests; ++i) {
    requests.push_back({IoKind::kRead, i * kChunk, buffer->span().subspan(i * 100, 100), &*buffer, &done, i});
  }
  r->Submit(requests);
  EXPECT_TRUE(r->Close().ok());
  const auto all = done.WaitFor(kRequests);
  ASSERT_EQ(all.size(), kRequests);  // every one completed, and only once
  std::vector<int> seen(kRequests);
  size_t aborted = 0;
  for (const auto& d : all) {
    ++seen[d.cookie];
    if (d.code == Code::kAborted)
      ++aborted;
    else
      EXPECT_EQ(d.code, Code::kOk) << "request " << d.cookie;
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), static_cast<long>(kRequests));
  // The workers held at most one each; the rest were still queued.
  EXPECT_GE(aborted, kRequests - kMountRemoteWorkers);
  // After Close: requests fail inline, Flush fails.
  std::vector<std::byte> buf(10);
  EXPECT_EQ(ReadAt(*r, 0, buf).code(), Code::kAborted);
  EXPECT_EQ(r->Flush().code(), Code::kAborted);
  EXPECT_TRUE(r->Close().ok());  // idempotent
}

TEST_F(MountRemoteTest, CloseSyncsWritesAndConcurrentWritersLandOnTheServer) {
  MountOptions o;
  o.chunk_size = kChunk;
  o.push_interval = milliseconds(5);
  auto r = Make(true, o);
  ASSERT_NE(r, nullptr);
  constexpr uint32_t kThreads = 4;
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (uint32_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Each thread owns a quarter of the region.
      const uint64_t base = t * (kSize / kThreads);
      std::mt19937_64 rng(t);
      for (int i = 0; i < 100; ++i) {
        const uint64_t off = base + rng() % (kSize / kThreads - 5000);
        std::vector<std::byte> data = Pattern(1 + rng() % 5000, static_cast<uint32_t>(rng()));
        if (!WriteAt(*r, off, data).ok()) ++errors;
        std::memcpy(reference_.data() + off, data.data(), data.size());
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
  ASSERT_TRUE(r->Close().ok());  // the final sync
  EXPECT_TRUE(ServerEqualsReference());
  EXPECT_GT(r->mount().stats().bytes_pushed, 0u);
}

}  // namespace
}  // namespace mf::fabric
