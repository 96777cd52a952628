// Tests of the seam's helpers (IoBatch, ReadAt/WriteAt, ValidateRequest, ChunkTransfer) over
// MemoryRemote.
#include "fabric/memory_remote.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "fabric/chunk_transfer.h"

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

// Collects a ChunkTransfer's completions: the cookies seen, and the result of the one
// CompleteOne that finished the transfer.
class TransferDone final : public IoCallback {
 public:
  explicit TransferDone(ChunkTransfer* transfer) : transfer_(transfer) {}
  void OnIoComplete(uint64_t cookie, const Status& status) override {
    Status result;
    const bool last = transfer_->CompleteOne(status, &result);
    std::lock_guard lock(mu_);
    cookies_.push_back(cookie);
    if (last) {
      ++finished_;
      result_ = result;
      cv_.notify_all();
    }
  }
  Status Wait() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return finished_ > 0; });
    return result_;
  }
  std::vector<uint64_t> cookies() {
    std::lock_guard lock(mu_);
    return cookies_;
  }
  int finished() {
    std::lock_guard lock(mu_);
    return finished_;
  }

 private:
  ChunkTransfer* transfer_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint64_t> cookies_;
  int finished_ = 0;
  Status result_;
};

TEST(ChunkTransfer, SplitsIntoPiecesNamedBySlotAndPieceAndFinishesOnce) {
  constexpr size_t kPiece = 16u << 10;
  constexpr size_t kLength = 3 * kPiece + 4096;  // a shorter last piece
  constexpr uint64_t kOffset = 1u << 20;
  constexpr size_t kSlot = 7;
  auto region = std::make_shared<MemoryRegion>("m", 4u << 20);
  auto data = Pattern(region->bytes().size(), 3);
  std::memcpy(region->data(), data.data(), data.size());
  MemoryRemote remote(region, true);
  Buffer buffer = remote.AllocateBuffer(kLength).value();
  ChunkTransfer transfer;
  TransferDone done(&transfer);
  transfer.Submit(remote, IoKind::kRead, kOffset, buffer.span(), kPiece, buffer, &done, kSlot);
  ASSERT_TRUE(done.Wait().ok());
  EXPECT_EQ(std::memcmp(buffer.span().data(), data.data() + kOffset, kLength), 0);
  std::vector<uint64_t> cookies = done.cookies();
  std::sort(cookies.begin(), cookies.end());
  ASSERT_EQ(cookies.size(), 4u);
  for (size_t i = 0; i < cookies.size(); ++i) {
    EXPECT_EQ(ChunkTransfer::SlotOf(cookies[i]), kSlot);
    EXPECT_EQ(ChunkTransfer::PieceOf(cookies[i]), i);
  }
  EXPECT_EQ(done.finished(), 1);
}

TEST(ChunkTransfer, KeepsTheFirstErrorAndTheBytesOfThePiecesThatArrived) {
  constexpr size_t kPiece = 8u << 10;
  constexpr size_t kLength = 4 * kPiece;
  auto region = std::make_shared<MemoryRegion>("m", 1u << 20);
  auto data = Pattern(region->bytes().size(), 4);
  std::memcpy(region->data(), data.data(), data.size());
  MemoryRemote remote(region, true);
  remote.FailRange(2 * kPiece, 1, Status(Code::kUnavailable, "piece 2 is lost"));
  Buffer buffer = remote.AllocateBuffer(kLength).value();
  std::memset(buffer.span().data(), 0, kLength);
  ChunkTransfer transfer;
  TransferDone done(&transfer);
  transfer.Submit(remote, IoKind::kRead, 0, buffer.span(), kPiece, buffer, &done, 0);
  Status result = done.Wait();
  EXPECT_EQ(result.code(), Code::kUnavailable);
  EXPECT_EQ(result.message(), "piece 2 is lost");
  EXPECT_EQ(std::memcmp(buffer.span().data(), data.data(), 2 * kPiece), 0);
  EXPECT_EQ(std::memcmp(buffer.span().data() + 3 * kPiece, data.data() + 3 * kPiece, kPiece), 0);
  EXPECT_EQ(done.finished(), 1);

  // Reused for a transfer failed before it was submitted.
  TransferDone again(&transfer);
  transfer.Expect(1);
  again.OnIoComplete(ChunkTransfer::Cookie(0, 0), Status(Code::kTimeout, "never sent"));
  EXPECT_EQ(again.Wait().code(), Code::kTimeout);
}

}  // namespace
}  // namespace mf::fabric
