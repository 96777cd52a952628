// Unit tests of ByteBuffer, the TCP server's per-connection input/output FIFO.
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "transports/tcp/byte_buffer.h"

namespace mf::tcp {
namespace {

std::vector<std::byte> Seq(size_t n, uint8_t start) {
  std::vector<std::byte> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>(start + i);
  return v;
}

TEST(TcpByteBuffer, AppendConsumeKeepsOrder) {
  ByteBuffer b;
  EXPECT_TRUE(b.empty());
  auto a = Seq(100, 0);
  b.Append(a);
  b.Consume(40);
  auto c = Seq(10000, 100);
  b.Append(c);  // grows, keeping the 60 live bytes first
  ASSERT_EQ(b.size(), 60u + 10000u);
  auto r = b.readable();
  EXPECT_EQ(r[0], std::byte{40});
  EXPECT_EQ(r[59], std::byte{99});
  EXPECT_EQ(r[60], std::byte{100});
  b.Consume(b.size());
  EXPECT_TRUE(b.empty());
  b.Release();
  EXPECT_EQ(b.capacity(), 0u);
}

TEST(TcpByteBuffer, WritableCommit) {
  ByteBuffer b;
  auto space = b.Writable(5000);
  ASSERT_GE(space.size(), 5000u);
  for (size_t i = 0; i < 5000; ++i) space[i] = static_cast<std::byte>(i);
  b.Commit(3000);
  EXPECT_EQ(b.size(), 3000u);
  EXPECT_EQ(b.readable()[2999], static_cast<std::byte>(2999 & 0xff));
}

// A FIFO used as a queue stays bounded: capacity does not grow without bound when the
// live size is bounded.
TEST(TcpByteBuffer, BoundedUnderSteadyUse) {
  ByteBuffer b;
  auto chunk = Seq(64 * 1024, 7);
  size_t max_cap = 0;
  for (int i = 0; i < 1000; ++i) {
    b.Append(chunk);
    if (b.size() > 8 * chunk.size()) b.Consume(b.size() - 2 * chunk.size());
    max_cap = std::max(max_cap, b.capacity());
  }
  EXPECT_LE(max_cap, 64 * chunk.size());
  EXPECT_EQ(b.readable()[0], std::byte{7});
}

}  // namespace
}  // namespace mf::tcp
