// nbd::Device against the kernel's NBD driver (runs in the test VM: vm_nbd_device). Over a
// MemoryRemote, so what the kernel writes can be checked in the region's bytes: O_DIRECT
// and mmap round trips, netlink and ioctl interfaces, read-only devices, a device in use,
// a device left behind by a crashed process and reclaimed, and a connection the kernel
// drops on an I/O timeout being replaced.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>

#include "fabric/memory_remote.h"
#include "nbd/device.h"

namespace mf::nbd {
namespace {

constexpr uint64_t kSize = 32u << 20;
constexpr size_t kIo = 1u << 20;
// Devices named explicitly; other tests of the VM suite use /dev/nbd0.
constexpr int kBusyIndex = 9;
constexpr int kCrashIndex = 10;

std::string SysfsLine(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

void Fill(std::span<std::byte> bytes, uint8_t seed) {
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>(seed + i * 13 + (i >> 12));
}

// O_DIRECT I/O of one aligned buffer at `offset`.
Status DirectIo(const std::string& path, bool write, uint64_t offset, std::span<std::byte> buf) {
  UniqueFd fd(::open(path.c_str(), (write ? O_WRONLY : O_RDONLY) | O_DIRECT | O_CLOEXEC));
  if (!fd.valid()) return Status::FromErrno(errno, "open " + path);
  const ssize_t n = write ? ::pwrite(fd.get(), buf.data(), buf.size(), static_cast<off_t>(offset))
                          : ::pread(fd.get(), buf.data(), buf.size(), static_cast<off_t>(offset));
  if (n < 0) return Status::FromErrno(errno, write ? "pwrite" : "pread");
  if (static_cast<size_t>(n) != buf.size()) return Status(Code::kIoError, "short transfer");
  return Status::Ok();
}

class NbdDeviceVmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    struct stat st {};
    ASSERT_EQ(::stat("/sys/module/nbd", &st) == 0 || Device::EnsureModule().ok(), true)
        << "no NBD driver: this test runs in the VM (tests/vm/run-in-vm)";
    region_ = std::make_shared<fabric::MemoryRegion>("disk", kSize);
    remote_ = std::make_unique<fabric::MemoryRemote>(region_, true);
    auto buf = MappedMemory::Anonymous(kIo);
    ASSERT_TRUE(buf.ok());
    buf_ = std::move(buf).value();
  }

  // Writes a pattern through the device and checks the region; then the other way round.
  void RoundTrip(const Device& device, uint8_t seed) {
    Fill(buf_.span(), seed);
    ASSERT_TRUE(DirectIo(device.path(), true, 3 * kIo, buf_.span()).ok());
    EXPECT_EQ(std::memcmp(region_->data() + 3 * kIo, buf_.data(), kIo), 0);
    Fill(region_->bytes().subspan(kSize - kIo, kIo), static_cast<uint8_t>(seed + 1));
    ASSERT_TRUE(DirectIo(device.path(), false, kSize - kIo, buf_.span()).ok());
    EXPECT_EQ(std::memcmp(region_->data() + kSize - kIo, buf_.data(), kIo), 0);
  }

  std::shared_ptr<fabric::MemoryRegion> region_;
  std::unique_ptr<fabric::MemoryRemote> remote_;
  MappedMemory buf_;
};

TEST_F(NbdDeviceVmTest, NetlinkAttachRoundTripMmapDetach) {
  DeviceOptions options;
  options.connections = 3;
  auto attached = Device::Attach(*remote_, options);
  ASSERT_TRUE(attached.ok()) << attached.status().ToString();
  std::unique_ptr<Device> device = std::move(attached).value();
  EXPECT_EQ(device->interface(), DeviceInterface::kNetlink);
  const int index = device->index();
  const std::string sys = "/sys/block/nbd" + std::to_string(index);
  EXPECT_EQ(SysfsLine(sys + "/size"), std::to_string(kSize / 512));
  EXPECT_EQ(SysfsLine(sys + "/queue/logical_block_size"), "4096");
  const std::string backend = SysfsLine(sys + "/backend");
  EXPECT_TRUE(backend.starts_with("memfabric pid=" + std::to_string(::getpid()) + " start=")) << backend;
  EXPECT_TRUE(backend.ends_with(" export=disk")) << backend;
  EXPECT_TRUE(OwnerOfBackend(backend).alive) << backend;

  auto status = Device::Query(index);
  ASSERT_TRUE(status.ok()) << status.status().ToString();
  EXPECT_TRUE(status->connected);
  EXPECT_TRUE(status->memfabric);
  EXPECT_TRUE(status->owner_alive);
  EXPECT_EQ(status->owner, ::getpid());
  EXPECT_FALSE(status->stale());
  EXPECT_EQ(status->size, kSize);

  RoundTrip(*device, 1);

  // mmap of the block device: stores reach the region after msync.
  UniqueFd fd(::open(device->path().c_str(), O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(fd.valid());
  void* map = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(map, MAP_FAILED);
  auto* bytes = static_cast<std::byte*>(map);
  EXPECT_EQ(std::memcmp(bytes + 3 * kIo, region_->data() + 3 * kIo, kIo), 0);  // reads
  Fill(std::span(bytes + 5 * kIo, kIo), 77);
  ASSERT_EQ(::msync(map, kSize, MS_SYNC), 0);
  EXPECT_EQ(std::memcmp(bytes + 5 * kIo, region_->data() + 5 * kIo, kIo), 0);
  ASSERT_EQ(::munmap(map, kSize), 0);
  fd.Reset();

  ASSERT_TRUE(device->Detach().ok());
  auto after = Device::Query(index);
  ASSERT_TRUE(after.ok());
  EXPECT_FALSE(after->connected);
  EXPECT_EQ(after->size, 0u);
  EXPECT_TRUE(device->Detach().ok());  // idempotent
}

TEST_F(NbdDeviceVmTest, IoctlInterface) {
  DeviceOptions options;
  options.interface = DeviceInterface::kIoctl;
  options.connections = 2;
  auto device = Device::Attach(*remote_, options);
  ASSERT_TRUE(device.ok()) << device.status().ToString();
  EXPECT_EQ((*device)->interface(), DeviceInterface::kIoctl);
  RoundTrip(**device, 5);
  const int index = (*device)->index();
  ASSERT_TRUE((*device)->Detach().ok());
  auto after = Device::Query(index);
  ASSERT_TRUE(after.ok());
  EXPECT_FALSE(after->connected);
}

TEST_F(NbdDeviceVmTest, ReadOnlyRegionGivesReadOnlyDevice) {
  fabric::MemoryRemote reader(region_, false);
  auto device = Device::Attach(reader);
  ASSERT_TRUE(device.ok()) << device.status().ToString();
  EXPECT_EQ(SysfsLine("/sys/block/nbd" + std::to_string((*device)->index()) + "/ro"), "1");
  EXPECT_FALSE(DirectIo((*device)->path(), true, 0, buf_.span()).ok());
  Fill(region_->bytes().first(kIo), 9);
  ASSERT_TRUE(DirectIo((*device)->path(), false, 0, buf_.span()).ok());
  EXPECT_EQ(std::memcmp(region_->data(), buf_.data(), kIo), 0);
}

TEST_F(NbdDeviceVmTest, RequestedDeviceInUseIsNamed) {
  DeviceOptions options;
  options.index = kBusyIndex;
  auto first = Device::Attach(*remote_, options);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ((*first)->path(), "/dev/nbd" + std::to_string(kBusyIndex));
  auto second = Device::Attach(*remote_, options);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), Code::kBusy);
  EXPECT_NE(second.status().message().find("/dev/nbd" + std::to_string(kBusyIndex) + ": in use by process " +
                                           std::to_string(::getpid())),
            std::string::npos)
      << second.status().ToString();
  // Its owner is alive: not reclaimable.
  EXPECT_EQ(Device::Reclaim(kBusyIndex).code(), Code::kBusy);
  // Without an index the kernel picks another, free device.
  auto other = Device::Attach(*remote_);
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  EXPECT_NE((*other)->index(), kBusyIndex);
}

// A child attaches /dev/nbd<kCrashIndex> and dies without detaching.
void CrashWhileAttached(std::shared_ptr<fabric::MemoryRegion> region) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    fabric::MemoryRemote remote(region, true);
    DeviceOptions options;
    options.index = kCrashIndex;
    auto device = Device::Attach(remote, options);
    if (!device.ok()) {
      std::fprintf(stderr, "child: %s\n", device.status().ToString().c_str());
      ::_exit(1);
    }
    (void)device->release();  // "crash": no detach
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST_F(NbdDeviceVmTest, DeviceLeftByCrashIsDetectedAndReclaimed) {
  CrashWhileAttached(region_);
  auto stale = Device::Query(kCrashIndex);
  ASSERT_TRUE(stale.ok()) << stale.status().ToString();
  EXPECT_TRUE(stale->connected);
  EXPECT_TRUE(stale->stale()) << stale->Describe();
  EXPECT_NE(stale->Describe().find("left behind"), std::string::npos) << stale->Describe();

  DeviceOptions options;
  options.index = kCrashIndex;
  auto refused = Device::Attach(*remote_, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kBusy);
  EXPECT_NE(refused.status().message().find("/dev/nbd" + std::to_string(kCrashIndex)), std::string::npos);
  EXPECT_NE(refused.status().message().find("reclaim"), std::string::npos) << refused.status().ToString();

  ASSERT_TRUE(Device::Reclaim(kCrashIndex).ok());
  auto freed = Device::Query(kCrashIndex);
  ASSERT_TRUE(freed.ok());
  EXPECT_FALSE(freed->connected);

  // Again, this time reclaimed by Attach itself.
  CrashWhileAttached(region_);
  options.reclaim = true;
  auto reclaimed = Device::Attach(*remote_, options);
  ASSERT_TRUE(reclaimed.ok()) << reclaimed.status().ToString();
  EXPECT_EQ((*reclaimed)->index(), kCrashIndex);
  RoundTrip(**reclaimed, 21);
}

// Also when the Export has room for no more connections than the device uses: the dropped
// one still answers its requests in flight, so the Device sizes its Export above that and
// retries a replacement refused meanwhile.
class NbdDeviceDropTest : public NbdDeviceVmTest, public ::testing::WithParamInterface<int> {};

TEST_P(NbdDeviceDropTest, ConnectionDroppedOnTimeoutIsReplaced) {
  DeviceOptions options;
  options.connections = 2;
  options.io_timeout = std::chrono::seconds(1);
  ExportOptions export_options;
  if (GetParam() > 0) export_options.max_connections = GetParam();
  auto attached = Device::Attach(*remote_, options, export_options);
  ASSERT_TRUE(attached.ok()) << attached.status().ToString();
  Device& device = **attached;
  Fill(region_->bytes().first(kIo), 33);
  remote_->SetDelay(std::chrono::milliseconds(2500));  // past the kernel's timeout
  Status read;
  std::thread reader([&] { read = DirectIo(device.path(), false, 0, buf_.span()); });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (device.reconnects() == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  remote_->SetDelay(std::chrono::microseconds(0));
  reader.join();
  EXPECT_GE(device.reconnects(), 1u);
  ASSERT_TRUE(read.ok()) << read.ToString();  // requeued by the kernel and served
  EXPECT_EQ(std::memcmp(region_->data(), buf_.data(), kIo), 0);
  RoundTrip(device, 40);  // the replacement connections work
}

INSTANTIATE_TEST_SUITE_P(ExportLimit, NbdDeviceDropTest, ::testing::Values(0, 2),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return info.param == 0 ? std::string("Default")
                                                  : "Max" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace mf::nbd
