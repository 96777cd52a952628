// Tests of the seam's helpers (IoBatch, ReadAt/WriteAt, ValidateRequest) over MemoryRemote.
#include "fabric/memory_remote.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <thread>
#include <vector>

namespace mf::fabric {
namespace {

std::vector<std::byte> Pattern(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

TEST(MemoryRemote, ReadAtWriteAtRoundTripAcrossTransferSplits) {
  auto region = std::make_shared<MemoryRegion>("m", 16u << 20);
  MemoryRemote remote(region, true);
  auto data = Pattern(9u << 20, 1);  // > 2 * max_transfer: split into several requests
  ASSERT_TRUE(WriteAt(remote, 12345, data).ok());
  EXPECT_EQ(std::memcmp(region->data() + 12345, data.data(), data.size()), 0);
  std::vector<std::byte> back(data.size());
  ASSERT_TRUE(ReadAt(remote, 12345, back, 3).ok());
  EXPECT_EQ(back, data);
}

TEST(MemoryRemote, RangeChecksAtTheEdges) {
  auto region = std::make_shared<MemoryRegion>("m", 1u << 20);
  MemoryRemote remote(region, true);
  std::vector<std::byte> one(1);
  EXPECT_TRUE(ReadAt(remote, (1u << 20) - 1, one).ok());
  EXPECT_EQ(ReadAt(remote, 1u << 20, one).code(), Code::kOutOfRange);
  EXPECT_EQ(WriteAt(remote, UINT64_MAX, one).code(), Code::kOutOfRange);
  EXPECT_EQ(CheckRange(UINT64_MAX - 1, 4, UINT64_MAX).code(), Code::kOutOfRange);  // overflow
  EXPECT_TRUE(CheckRange(0, 0, 0).ok());
}

TEST(MemoryRemote, InvalidRequestsCompleteInlineWithTheirError) {
  auto region = std::make_shared<MemoryRegion>("m", 1u << 20);
  MemoryRemote reader(region, false);
  auto buffer = reader.AllocateBuffer(8192);
  ASSERT_TRUE(buffer.ok());
  Buffer foreign = MemoryRemote(region, false).AllocateBuffer(4096).value();
  IoBatch batch(5);
  std::vector<IoRequest> reqs = {
      {IoKind::kWrite, 0, buffer->span().first(4096), &*buffer, &batch, 1},                 // read-only
      {IoKind::kRead, 0, buffer->span().first(0), &*buffer, &batch, 2},                     // empty
      {IoKind::kRead, 1u << 20, buffer->span().first(1), &*buffer, &batch, 3},              // past end
      {IoKind::kRead, 0, foreign.span(), &*buffer, &batch, 4},                              // not in buffer
      {IoKind::kRead, (1u << 20) - 4096, buffer->span().first(4096), &*buffer, &batch, 5},  // fine
  };
  reader.Submit(reqs);
  Status s = batch.Wait();
  EXPECT_EQ(s.code(), Code::kPermissionDenied);
  EXPECT_EQ(reader.requests_served(), 1u);
}

TEST(MemoryRemote, InjectedFailuresAndCloseAbort) {
  auto region = std::make_shared<MemoryRegion>("m", 1u << 20);
  MemoryRemote remote(region, true);
  remote.FailNext(1, Status(Code::kUnavailable, "injected"));
  std::vector<std::byte> buf(4096);
  EXPECT_EQ(ReadAt(remote, 0, buf).code(), Code::kUnavailable);
  EXPECT_TRUE(ReadAt(remote, 0, buf).ok());
  ASSERT_TRUE(remote.Close().ok());
  EXPECT_EQ(ReadAt(remote, 0, buf).code(), Code::kAborted);
  EXPECT_TRUE(remote.Close().ok());  // idempotent
}

TEST(MemoryRemote, ConcurrentWritersOnDisjointRanges) {
  auto region = std::make_shared<MemoryRegion>("m", 8u << 20);
  MemoryRemote remote(region, true);
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      auto data = Pattern(2u << 20, t + 10);
      EXPECT_TRUE(WriteAt(remote, uint64_t{t} << 21, data).ok());
    });
  }
  for (auto& th : threads) th.join();
  for (uint32_t t = 0; t < 4; ++t) {
    auto expect = Pattern(2u << 20, t + 10);
    EXPECT_EQ(std::memcmp(region->data() + (uint64_t{t} << 21), expect.data(), expect.size()), 0);
  }
}

}  // namespace
}  // namespace mf::fabric
