// nbd::WriteFence: overlapping writes wait for the one in flight, others do not; Shutdown
// releases a waiter without admitting it.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "nbd/write_fence.h"

namespace mf::nbd {
namespace {

int remote_a;  // two Remotes: only their addresses matter
int remote_b;

TEST(WriteFence, DisjointRangesAndOtherRemotesDoNotWait) {
  WriteFence fence(4);
  const uint64_t a = fence.Admit(&remote_a, 0, 4096);
  ASSERT_NE(a, 0u);
  EXPECT_NE(fence.Admit(&remote_a, 4096, 4096), 0u);  // adjacent, not overlapping
  EXPECT_NE(fence.Admit(&remote_b, 0, 4096), 0u);     // same bytes of another Remote
  EXPECT_EQ(fence.in_flight(), 3u);
  EXPECT_EQ(fence.waits(), 0u);
  fence.Leave(a);
  EXPECT_EQ(fence.in_flight(), 2u);
}

TEST(WriteFence, OverlappingWriteWaitsForTheOneInFlight) {
  WriteFence fence(4);
  const uint64_t first = fence.Admit(&remote_a, 8192, 8192);
  ASSERT_NE(first, 0u);
  std::atomic<bool> admitted{false};
  std::thread second([&] {
    const uint64_t t = fence.Admit(&remote_a, 12288, 100);
    admitted = t != 0;
    fence.Leave(t);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(admitted.load());
  fence.Leave(first);
  second.join();
  EXPECT_TRUE(admitted.load());
  EXPECT_EQ(fence.waits(), 1u);
  EXPECT_EQ(fence.in_flight(), 0u);
}

TEST(WriteFence, ShutdownReleasesAWaiterWithoutAdmittingIt) {
  WriteFence fence(1);
  ASSERT_NE(fence.Admit(&remote_a, 0, 1), 0u);
  std::atomic<uint64_t> ticket{1};
  std::thread waiter([&] { ticket = fence.Admit(&remote_a, 0, 1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  fence.Shutdown();
  waiter.join();
  EXPECT_EQ(ticket.load(), 0u);
  EXPECT_EQ(fence.Admit(&remote_b, 0, 1), 0u);
}

}  // namespace
}  // namespace mf::nbd
