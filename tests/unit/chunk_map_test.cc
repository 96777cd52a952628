// fabric::ChunkMap: the state transitions, and Drop racing the end of a pull.
#include "fabric/chunk_map.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>

namespace mf::fabric {
namespace {

TEST(ChunkMap, ClaimFinishDropAndFail) {
  ChunkMap map(3);
  EXPECT_EQ(map.size(), 3u);
  EXPECT_EQ(map.state(0), ChunkState::kRemote);
  EXPECT_TRUE(map.TryClaim(0));
  EXPECT_FALSE(map.TryClaim(0));  // one claim wins
  EXPECT_TRUE(map.FinishPull(0));
  EXPECT_EQ(map.state(0), ChunkState::kLocal);
  EXPECT_EQ(map.local_count(), 1u);
  map.Drop(0);
  EXPECT_EQ(map.state(0), ChunkState::kRemote);
  EXPECT_EQ(map.local_count(), 0u);

  // Dropped under a running pull: the pull's result does not count.
  EXPECT_TRUE(map.TryClaim(1));
  map.Drop(1);
  EXPECT_EQ(map.state(1), ChunkState::kInFlightDropped);
  EXPECT_FALSE(map.FinishPull(1));
  EXPECT_EQ(map.state(1), ChunkState::kRemote);
  EXPECT_EQ(map.local_count(), 0u);

  // Nothing to drop on a remote or failed chunk.
  map.Drop(2);
  EXPECT_EQ(map.state(2), ChunkState::kRemote);
  map.Set(2, ChunkState::kFailed);
  map.Drop(2);
  EXPECT_EQ(map.state(2), ChunkState::kFailed);

  EXPECT_FALSE(map.SetDirty(0, true));
  EXPECT_TRUE(map.SetDirty(0, true));
  EXPECT_EQ(map.dirty_count(), 1u);
  EXPECT_TRUE(map.SetDirty(0, false));
  EXPECT_EQ(map.dirty_count(), 0u);
}

// A drop that comes after the claim leaves the chunk remote, whichever of the drop and the
// pull's end runs first or interleaves with the other. Drop used to try kLocal -> kRemote
// and then kInFlight -> kInFlightDropped once each: a pull ending between the two left the
// chunk kLocal with its pages gone (seen as a uffd Sync copying a dropped page).
TEST(ChunkMap, DropRacingTheEndOfAPullLeavesTheChunkRemote) {
  constexpr int kRounds = 200000;
  ChunkMap map(1);
  std::atomic<int> round{-1};
  std::atomic<int> finished{-1};
  std::thread puller([&] {
    for (int r = 0; r < kRounds; ++r) {
      while (round.load(std::memory_order_acquire) != r) std::this_thread::yield();
      (void)map.FinishPull(0);
      finished.store(r, std::memory_order_release);
    }
  });
  int wrong = 0;
  for (int r = 0; r < kRounds; ++r) {
    ASSERT_TRUE(map.TryClaim(0)) << "round " << r;
    round.store(r, std::memory_order_release);
    map.Drop(0);
    while (finished.load(std::memory_order_acquire) != r) std::this_thread::yield();
    if (map.state(0) != ChunkState::kRemote) {
      ++wrong;
      map.Set(0, ChunkState::kRemote);
    }
  }
  puller.join();
  EXPECT_EQ(wrong, 0) << "rounds that ended with the chunk not remote, of " << kRounds;
  EXPECT_EQ(map.local_count(), 0u);
}

}  // namespace
}  // namespace mf::fabric
