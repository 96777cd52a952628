// The views on a managed mount, end to end: a uffd::Mapping and an nbd::Export each given
// a fabric::MountRemote over a real memfabric client and server (loopback TCP, or the data
// plane named by MF_TEST_SCHEME, see test_servers.h). The NBD side is driven by libnbd's
// nbdcopy; a second, plain client checks what reached the server.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <vector>

#include "fabric/mount_remote.h"
#include "nbd/export.h"
#include "tests/integration/nbd_test_util.h"
#include "tests/integration/tcp_test_util.h"
#include "tests/integration/test_servers.h"
#include "uffd/mapping.h"

namespace mf::fabric {
namespace {

using mf::testing::CreateSeededRegion;
using mf::testing::OpenRegion;
using nbd::testing::RunTool;
using nbd::testing::TempDir;
using TestServer = mf::testing::TestServers;

constexpr size_t kSize = 16u << 20;
constexpr size_t kChunk = 64u << 10;

class MountViews : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = TestServer::Start();
    ASSERT_NE(server_, nullptr);
    handle_ = CreateSeededRegion(*server_, "r", kSize, 21);
    ASSERT_NE(handle_.region(), nullptr);
  }
  std::unique_ptr<Remote> Open(bool writable) { return OpenRegion(*server_, "r", writable); }
  std::unique_ptr<MountRemote> OpenMounted() {
    auto remote = Open(true);
    if (remote == nullptr) return nullptr;
    MountOptions o;
    o.chunk_size = kChunk;
    auto m = MountRemote::Create(std::move(remote), o);
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    return m.ok() ? std::move(m).value() : nullptr;
  }
  std::byte* server_bytes() const { return handle_.region()->data(); }

  std::unique_ptr<TestServer> server_;
  RegionHandle handle_;
};

TEST_F(MountViews, UffdMappingOnAMount) {
  auto mounted = OpenMounted();
  ASSERT_NE(mounted, nullptr);
  EXPECT_EQ(mounted->transport().substr(0, 6), "mount+");
  uffd::MappingOptions o;
  o.chunk_size = kChunk;
  o.prefetch = false;  // the Mount pulls in the background
  auto m = uffd::Mapping::Create(*mounted, o);
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  uffd::Mapping& mapping = **m;

  // Touch and verify: random bytes first (faults ahead of the Mount's pull), then all.
  std::mt19937 rng(4);
  for (int i = 0; i < 2000; ++i) {
    const size_t off = rng() % kSize;
    ASSERT_EQ(mapping.data()[off], server_bytes()[off]) << "offset " << off;
  }
  EXPECT_EQ(std::memcmp(mapping.data(), server_bytes(), kSize), 0);
  EXPECT_GT(mapping.stats().faults, 0u);

  // Write through the mapping; Sync pushes to the Mount and the Mount to the server.
  std::vector<std::byte> expect(server_bytes(), server_bytes() + kSize);
  for (int i = 0; i < 200; ++i) {
    const size_t off = rng() % (kSize - 3000);
    const auto v = static_cast<int>(rng() & 0xff);
    std::memset(mapping.data() + off, v, 3000);
    std::memset(expect.data() + off, v, 3000);
  }
  auto reader = Open(false);  // a second, plain client
  ASSERT_NE(reader, nullptr);
  std::vector<std::byte> seen(kSize);
  ASSERT_TRUE(ReadAt(*reader, 0, seen).ok());
  EXPECT_NE(seen, expect) << "writes reached the server before sync";
  Status synced = mapping.Sync();
  ASSERT_TRUE(synced.ok()) << synced.ToString();
  ASSERT_TRUE(ReadAt(*reader, 0, seen).ok());
  EXPECT_EQ(seen, expect);
  const MountStats s = mounted->mount().stats();
  EXPECT_EQ(s.bytes_dirty, 0u);
  EXPECT_GT(s.bytes_pushed, 0u);
  EXPECT_EQ(s.failed_chunks, 0u);

  ASSERT_TRUE(mapping.Close().ok());
  ASSERT_TRUE(mounted->Close().ok());
  EXPECT_TRUE(reader->Close().ok());
}

TEST_F(MountViews, NbdExportOnAMountWithNbdcopy) {
  std::string out;
  if (RunTool("command -v nbdcopy", &out) != 0) GTEST_SKIP() << "nbdcopy (libnbd-bin) is needed";
  auto mounted = OpenMounted();
  ASSERT_NE(mounted, nullptr);
  TempDir dir;
  nbd::Export exporter;
  ASSERT_TRUE(exporter.Add({"r", "a mounted region", mounted.get(), false}).ok());
  const std::string socket = (dir.path() / "nbd.sock").string();
  ASSERT_TRUE(exporter.ListenUnix(socket).ok());
  const std::string uri = "nbd+unix:///r?socket=" + socket;

  // Random data over the whole export, then a flush (which is Mount::Sync).
  std::vector<char> data(kSize);
  std::mt19937_64 rng(8);
  for (auto& c : data) c = static_cast<char>(rng());
  const std::string in = (dir.path() / "in.bin").string();
  const std::string back = (dir.path() / "back.bin").string();
  {
    std::ofstream f(in, std::ios::binary);
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
  }
  ASSERT_EQ(RunTool("nbdcopy --flush '" + in + "' '" + uri + "'", &out), 0) << out;
  EXPECT_EQ(std::memcmp(server_bytes(), data.data(), kSize), 0) << "the server lacks bytes after the flush";
  const MountStats s = mounted->mount().stats();
  EXPECT_EQ(s.bytes_dirty, 0u);
  EXPECT_GE(s.bytes_pushed, kSize);

  ASSERT_EQ(RunTool("nbdcopy '" + uri + "' '" + back + "'", &out), 0) << out;
  std::ifstream f(back, std::ios::binary);
  const std::vector<char> read_back((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(read_back, data);

  exporter.Stop();
  EXPECT_GT(exporter.stats().requests, 0u);
  EXPECT_EQ(exporter.stats().request_errors, 0u);
  ASSERT_TRUE(mounted->Close().ok());
}

}  // namespace
}  // namespace mf::fabric
