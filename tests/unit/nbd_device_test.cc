// What of the kernel device path runs on the host (which has no NBD driver): the
// handshake-free transmission that nbd::Device hands the kernel (Export::ServeTransmission
// over a socketpair, driven by a raw client the way the kernel drives it), Export::Info,
// DeviceStatus, and Attach's error without a driver. Attaching for real runs in the VM
// (nbd_device_vm_test.cc).
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <memory>
#include <sstream>

#include "fabric/memory_remote.h"
#include "nbd/device.h"
#include "nbd/export.h"
#include "tests/integration/nbd_test_util.h"

namespace mf::nbd {
namespace {

using testing::RawClient;

constexpr uint64_t kSize = 4u << 20;

class NbdTransmissionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    region_ = std::make_shared<fabric::MemoryRegion>("disk", kSize);
    remote_ = std::make_unique<fabric::MemoryRemote>(region_, true);
    ro_remote_ = std::make_unique<fabric::MemoryRemote>(region_, false);
    NBD_ASSERT_OK(export_.Add({"disk", "", remote_.get(), false}));
    NBD_ASSERT_OK(export_.Add({"ro", "", ro_remote_.get(), false}));
  }

  RawClient Serve(std::string_view name) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    EXPECT_TRUE(export_.ServeTransmission(UniqueFd(sv[0]), name).ok());
    return RawClient(UniqueFd(sv[1]));
  }

  std::shared_ptr<fabric::MemoryRegion> region_;
  std::unique_ptr<fabric::MemoryRemote> remote_;
  std::unique_ptr<fabric::MemoryRemote> ro_remote_;
  Export export_;
};

TEST_F(NbdTransmissionTest, InfoGivesSizeAndKernelFlags) {
  auto info = export_.Info("disk");
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->size, kSize);
  EXPECT_FALSE(info->read_only);
  EXPECT_EQ(info->flags & (kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxCanMultiConn),
            kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxCanMultiConn);
  EXPECT_EQ(info->flags & (kTxReadOnly | kTxSendDf), 0);  // no structured replies for the kernel
  auto ro = export_.Info("ro");
  ASSERT_TRUE(ro.ok());
  EXPECT_TRUE(ro->read_only);
  EXPECT_NE(ro->flags & kTxReadOnly, 0);
  auto fallback = export_.Info("");
  ASSERT_TRUE(fallback.ok());
  EXPECT_EQ(fallback->name, "disk");  // the default export is the first one
  EXPECT_EQ(export_.Info("nope").status().code(), Code::kNotFound);
}

TEST_F(NbdTransmissionTest, RequestsComeWithoutHandshake) {
  RawClient c = Serve("disk");
  NBD_ASSERT_OK(c.RoundTrip(0, 4096, 1, 3));
  NBD_ASSERT_OK(c.RoundTrip(kSize - 8192, 8192, 10, 9));
  EXPECT_EQ(region_->bytes()[0], std::byte{3});
  // Several requests in flight, as the kernel sends them; replies may come in any order.
  for (uint64_t h = 100; h < 108; ++h) NBD_ASSERT_OK(c.SendRequest({0, kCmdRead, h, (h - 100) * 4096, 4096}));
  std::vector<bool> seen(8);
  for (int i = 0; i < 8; ++i) {
    std::vector<std::byte> data;
    auto r = c.ReadSimpleReply(&data, 4096);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->error, 0u);
    ASSERT_GE(r->handle, 100u);
    ASSERT_LT(r->handle, 108u);
    seen[r->handle - 100] = true;
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), true), 8);
  // FLUSH and a FUA write, then a soft disconnect: the server closes its end.
  NBD_ASSERT_OK(c.SendRequest({0, kCmdFlush, 200, 0, 0}));
  auto flushed = c.ReadSimpleReply();
  ASSERT_TRUE(flushed.ok());
  EXPECT_EQ(flushed->error, 0u);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdDisc, 201, 0, 0}));
  EXPECT_TRUE(c.ClosedByServer());
}

TEST_F(NbdTransmissionTest, ReadOnlyExportRefusesWrites) {
  RawClient c = Serve("ro");
  std::vector<std::byte> payload(4096);
  NBD_ASSERT_OK(c.SendRequest({0, kCmdWrite, 7, 0, 4096}, payload));
  auto r = c.ReadSimpleReply();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->error, kEperm);
}

TEST_F(NbdTransmissionTest, UnknownExportIsRefused) {
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  UniqueFd peer(sv[1]);
  EXPECT_EQ(export_.ServeTransmission(UniqueFd(sv[0]), "nope").code(), Code::kNotFound);
}

TEST(NbdDeviceStatusTest, DescribesFreeInUseAndStale) {
  DeviceStatus s;
  s.index = 3;
  EXPECT_EQ(s.Describe(), "/dev/nbd3: free");
  EXPECT_FALSE(s.stale());
  s.connected = true;
  s.owner = 42;
  s.owner_alive = true;
  s.memfabric = true;
  s.backend = "memfabric pid=42 export=swap";
  EXPECT_FALSE(s.stale());
  EXPECT_NE(s.Describe().find("in use by process 42"), std::string::npos) << s.Describe();
  s.owner_alive = false;
  EXPECT_TRUE(s.stale());
  EXPECT_NE(s.Describe().find("left behind by memfabric process 42"), std::string::npos) << s.Describe();
  s.memfabric = false;  // e.g. nbd-client, which exits once the device is connected
  EXPECT_FALSE(s.stale());
}

// The owner named in a backend identifier counts as alive only while its pid runs the same
// process: one that died and whose pid was reused leaves a stale device.
TEST(NbdDeviceStatusTest, OwnerIsThePidAndItsStartTime) {
  std::ifstream in("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::istringstream fields(stat.substr(stat.rfind(')') + 1));
  std::string start;
  for (int i = 3; i <= 22; ++i) fields >> start;
  const std::string me = "memfabric pid=" + std::to_string(::getpid());
  BackendOwner o = OwnerOfBackend(me + " start=" + start + " export=swap");
  EXPECT_EQ(o.pid, ::getpid());
  EXPECT_TRUE(o.alive);
  o = OwnerOfBackend(me + " start=" + std::to_string(std::stoull(start) + 1) + " export=swap");
  EXPECT_EQ(o.pid, ::getpid());
  EXPECT_FALSE(o.alive) << "a reused pid is not the owner";
  EXPECT_TRUE(OwnerOfBackend(me + " export=swap").alive);  // written before start= existed
  EXPECT_FALSE(OwnerOfBackend("memfabric pid=999999999 start=1 export=x").alive);
  o = OwnerOfBackend("nbd-client something");
  EXPECT_EQ(o.pid, 0);
  EXPECT_FALSE(o.alive);
}

TEST(NbdDeviceTest, AttachWithoutDriverSaysWhatIsMissing) {
  struct stat st {};
  if (::stat("/sys/module/nbd", &st) == 0) GTEST_SKIP() << "this kernel has the NBD driver: see the VM test";
  auto region = std::make_shared<fabric::MemoryRegion>("disk", kSize);
  fabric::MemoryRemote remote(region, true);
  auto device = Device::Attach(remote);
  ASSERT_FALSE(device.ok());
  EXPECT_EQ(device.status().code(), Code::kUnsupported);
  EXPECT_NE(device.status().message().find("modprobe nbd"), std::string::npos) << device.status().ToString();
}

TEST(NbdDeviceTest, AttachRejectsBadOptions) {
  auto region = std::make_shared<fabric::MemoryRegion>("odd", kSize + 512);
  fabric::MemoryRemote remote(region, true);
  DeviceOptions options;
  EXPECT_EQ(Device::Attach(remote, options).status().code(), Code::kInvalidArgument);  // not 4 KiB-aligned
  auto good = std::make_shared<fabric::MemoryRegion>("disk", kSize);
  fabric::MemoryRemote good_remote(good, true);
  options.connections = 0;
  EXPECT_EQ(Device::Attach(good_remote, options).status().code(), Code::kInvalidArgument);
  options.connections = 1;
  options.index = -2;
  EXPECT_EQ(Device::Attach(good_remote, options).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace mf::nbd
