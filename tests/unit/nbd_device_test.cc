// What of the kernel device path runs on the host (which has no NBD driver): the
// handshake-free transmission that nbd::Device hands the kernel (Export::ServeTransmission
// over a socketpair, driven by a raw client the way the kernel drives it), Export::Info,
// DeviceStatus, the backend identifier, Users() over a made-up /sys/block, Detach of a
// device whose disconnect fails, and Attach's errors without a driver. Attaching for real
// runs in the VM (nbd_device_vm_test.cc).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

#include "fabric/memory_remote.h"
#include "nbd/device.h"
#include "nbd/export.h"
#include "tests/integration/nbd_test_util.h"

namespace mf::nbd {

// Reaches the Device internals that need no kernel (a friend of Device).
class DeviceTestPeer {
 public:
  static std::string BackendIdentifier(std::string_view export_name) {
    return Device::BackendIdentifier(export_name);
  }
  static Result<std::vector<std::string>> UsersOf(int index, const std::string& sys_block) {
    return Device::UsersOf(index, sys_block);
  }
  // A Device that takes itself for attached as /dev/nbd<index>, which the kernel knows
  // nothing of; `ioctl_fd` stands for the /dev/nbdX it would hold with kIoctl.
  static std::unique_ptr<Device> Attached(Export& exporter, DeviceInterface interface, int index,
                                          UniqueFd ioctl_fd) {
    std::unique_ptr<Device> device(new Device(nullptr, exporter, "disk", DeviceOptions{}));
    device->index_ = index;
    device->path_ = "/dev/nbd" + std::to_string(index);
    device->interface_ = interface;
    {
      MutexLock lock(device->detach_mu_);
      device->ioctl_fd_ = std::move(ioctl_fd);
    }
    MutexLock lock(device->mu_);
    device->attached_ = true;
    return device;
  }
  static bool IsAttached(Device& device) {
    MutexLock lock(device.mu_);
    return device.attached_;
  }
  static int IoctlFd(Device& device) {
    MutexLock lock(device.detach_mu_);
    return device.ioctl_fd_.get();
  }
  // Lets the destructor go without trying again.
  static void Forget(Device& device) {
    MutexLock lock(device.mu_);
    device.attached_ = false;
  }
};

namespace {

using testing::RawClient;
using testing::TempDir;

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

// The inode of this process's pid namespace, as Device records it.
uint64_t OwnPidNamespace() {
  struct stat st {};
  EXPECT_EQ(::stat("/proc/self/ns/pid", &st), 0);
  return st.st_ino;
}

std::string OwnStartTime() {
  std::ifstream in("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::istringstream fields(stat.substr(stat.rfind(')') + 1));
  std::string start;
  for (int i = 3; i <= 22; ++i) fields >> start;
  return start;
}

// A pid N recorded in another pid namespace (a container's) names another process, or none,
// in ours: the owner counts as alive there, so the device is not stale and Reclaim leaves it.
TEST(NbdDeviceStatusTest, OwnerInAnotherPidNamespaceIsNotStale) {
  const std::string ours = std::to_string(OwnPidNamespace());
  const std::string other = std::to_string(OwnPidNamespace() + 1);
  const std::string me = "memfabric pid=" + std::to_string(::getpid()) + " start=" + OwnStartTime();
  BackendOwner o = OwnerOfBackend(me + " pidns=" + ours + " export=swap");
  EXPECT_TRUE(o.alive);
  EXPECT_FALSE(o.other_pid_namespace);
  // Our namespace: pid and start time decide, as without pidns=.
  o = OwnerOfBackend("memfabric pid=999999999 start=1 pidns=" + ours + " export=x");
  EXPECT_FALSE(o.alive);
  EXPECT_FALSE(o.other_pid_namespace);
  // Another namespace: a pid that is free here, or taken by another process, is no evidence.
  o = OwnerOfBackend("memfabric pid=999999999 start=1 pidns=" + other + " export=x");
  EXPECT_EQ(o.pid, 999999999);
  EXPECT_TRUE(o.alive);
  EXPECT_TRUE(o.other_pid_namespace);
  o = OwnerOfBackend(me + "1 pidns=" + other + " export=x");  // our pid, another start time
  EXPECT_TRUE(o.alive);
  EXPECT_TRUE(o.other_pid_namespace);
  EXPECT_TRUE(OwnerOfBackend("memfabric pid=999999999 start=1 pidns=junk export=x").alive);
  // Only the fields before export= count: the export name may hold anything.
  o = OwnerOfBackend("memfabric pid=999999999 start=1 export=a pidns=" + other);
  EXPECT_FALSE(o.alive);
  EXPECT_FALSE(o.other_pid_namespace);

  DeviceStatus s;
  s.index = 2;
  s.connected = true;
  s.memfabric = true;
  s.owner = o.pid;
  s.owner_alive = true;
  s.owner_in_other_pid_namespace = true;
  EXPECT_FALSE(s.stale());
  EXPECT_NE(s.Describe().find("in use by process 999999999 of another pid namespace"), std::string::npos)
      << s.Describe();
}

// The identifier names this process (pid, start time, pid namespace) so that OwnerOfBackend
// finds it alive, and stays one short line whatever the export's name.
TEST(NbdDeviceStatusTest, BackendIdentifierNamesThisProcessInOneShortLine) {
  const std::string id = DeviceTestPeer::BackendIdentifier("swap");
  EXPECT_EQ(id, "memfabric pid=" + std::to_string(::getpid()) + " start=" + OwnStartTime() +
                    " pidns=" + std::to_string(OwnPidNamespace()) + " export=swap");
  BackendOwner o = OwnerOfBackend(id);
  EXPECT_EQ(o.pid, ::getpid());
  EXPECT_TRUE(o.alive);
  EXPECT_FALSE(o.other_pid_namespace);

  const std::string odd = DeviceTestPeer::BackendIdentifier(std::string(5000, 'x') + "\n");
  EXPECT_EQ(odd.size(), kMaxBackendBytes);
  EXPECT_TRUE(OwnerOfBackend(odd).alive);
  const std::string line = DeviceTestPeer::BackendIdentifier("a\nb start=1");
  EXPECT_TRUE(line.ends_with(" export=a?b start=1")) << line;
  EXPECT_TRUE(OwnerOfBackend(line).alive) << "the start= in the export name is not the owner's";
}

// Writes `text` (and a newline, as sysfs does) to root/relative, making the directories.
void WriteSysfs(const std::filesystem::path& root, const std::string& relative, const std::string& text) {
  const std::filesystem::path file = root / relative;
  std::filesystem::create_directories(file.parent_path());
  std::ofstream(file) << text << "\n";
}

bool Has(const std::vector<std::string>& users, const std::string& user) {
  return std::find(users.begin(), users.end(), user) != users.end();
}

// Users() counts what holds a partition as well as the disk, and the loop devices backed by
// either; entries that vanished while it read are skipped. Over a made-up /sys/block (the
// processes and mounts are this host's).
TEST(NbdDeviceUsersTest, PartitionsHoldersAndLoopDevicesCount) {
  // A mount of this host, as /proc/self/mountinfo gives it, plays partition 2's file system.
  std::ifstream mountinfo("/proc/self/mountinfo");
  std::string id, parent, numbers, root, point;
  ASSERT_TRUE(mountinfo >> id >> parent >> numbers >> root >> point);

  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const std::filesystem::path& sys = dir.path();
  WriteSysfs(sys, "nbd3/dev", "43:96");
  WriteSysfs(sys, "nbd3/size", "8192");
  WriteSysfs(sys, "nbd3/holders/dm-0", "");
  WriteSysfs(sys, "nbd3/nbd3p1/dev", "43:97");
  WriteSysfs(sys, "nbd3/nbd3p1/holders/md0", "");
  WriteSysfs(sys, "nbd3/nbd3p2/dev", numbers);
  std::filesystem::create_directories(sys / "nbd3/nbd3p9");  // removed while listed: no dev
  std::filesystem::create_directories(sys / "nbd3/nbd3p9/holders");
  WriteSysfs(sys, "nbd30/dev", "43:960");
  WriteSysfs(sys, "loop5/loop/backing_file", "/dev/nbd3p1");
  WriteSysfs(sys, "loop6/loop/backing_file", "/dev/nbd30");
  WriteSysfs(sys, "loop7/size", "0");  // not bound to a file
  WriteSysfs(sys, "vda/dev", "253:0");

  auto users = DeviceTestPeer::UsersOf(3, sys.string());
  ASSERT_TRUE(users.ok()) << users.status().ToString();
  std::string all;
  for (const std::string& user : *users) all += user + "; ";
  EXPECT_TRUE(Has(*users, "mounted at " + point)) << all;
  EXPECT_TRUE(Has(*users, "used by dm-0")) << all;
  EXPECT_TRUE(Has(*users, "used by md0")) << all;
  EXPECT_TRUE(Has(*users, "used by loop5 (backed by /dev/nbd3p1)")) << all;
  EXPECT_EQ(all.find("loop6"), std::string::npos) << all;
  EXPECT_EQ(all.find("loop7"), std::string::npos) << all;

  // Without a device number for the disk nothing is known: an error, not "no users".
  EXPECT_EQ(DeviceTestPeer::UsersOf(4, sys.string()).status().code(), Code::kNotFound);
  WriteSysfs(sys, "nbd5/dev", "garbage");
  EXPECT_EQ(DeviceTestPeer::UsersOf(5, sys.string()).status().code(), Code::kNotFound);
}

// A disconnect that fails leaves the device attached: Detach reports it every time it is
// tried (the first version cleared its state first and then said OK), and the ioctl
// interface keeps its descriptor for the next try.
TEST(NbdDeviceTest, FailedDisconnectLeavesTheDeviceAttached) {
  Export exporter;
  // /dev/null refuses NBD_DISCONNECT (ENOTTY) as a device the kernel will not let go would.
  UniqueFd null_fd(::open("/dev/null", O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(null_fd.valid());
  const int fd = null_fd.get();
  auto ioctl = DeviceTestPeer::Attached(exporter, DeviceInterface::kIoctl, 7, std::move(null_fd));
  const Status first = ioctl->Detach();
  EXPECT_FALSE(first.ok());
  EXPECT_NE(first.message().find("/dev/nbd7 stays attached"), std::string::npos) << first.ToString();
  EXPECT_TRUE(DeviceTestPeer::IsAttached(*ioctl));
  EXPECT_EQ(DeviceTestPeer::IoctlFd(*ioctl), fd);
  EXPECT_FALSE(ioctl->Detach().ok()) << "tried again, not taken for detached";
  EXPECT_TRUE(DeviceTestPeer::IsAttached(*ioctl));
  DeviceTestPeer::Forget(*ioctl);
  EXPECT_TRUE(ioctl->Detach().ok());

  struct stat st {};
  if (::stat("/sys/module/nbd", &st) == 0) GTEST_SKIP() << "the kernel has nbd: netlink would work";
  // Netlink: without the "nbd" family, opening the socket fails.
  auto netlink = DeviceTestPeer::Attached(exporter, DeviceInterface::kNetlink, 7, UniqueFd());
  EXPECT_FALSE(netlink->Detach().ok());
  EXPECT_TRUE(DeviceTestPeer::IsAttached(*netlink));
  EXPECT_FALSE(netlink->Detach().ok());
  DeviceTestPeer::Forget(*netlink);
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

// io_timeout 0 is "never" to the kernel (a request the Export does not answer hangs its
// caller for good): refused before anything reaches the kernel.
TEST(NbdDeviceTest, AttachRejectsZeroIoTimeout) {
  auto region = std::make_shared<fabric::MemoryRegion>("disk", kSize);
  fabric::MemoryRemote remote(region, true);
  DeviceOptions options;
  options.connections = 1;
  options.io_timeout = std::chrono::seconds(0);
  Status refused = Device::Attach(remote, options).status();
  EXPECT_EQ(refused.code(), Code::kInvalidArgument);
  EXPECT_NE(refused.message().find("I/O timeout must be at least 1 s"), std::string::npos)
      << refused.ToString();
  options.io_timeout = std::chrono::seconds(-1);
  EXPECT_EQ(Device::Attach(remote, options).status().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace mf::nbd
