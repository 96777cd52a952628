// nbd::Device — an nbd::Export attached to the kernel's NBD driver, so that a remote region
// becomes a block device /dev/nbdX: mmap it, put a file system on it, or swap on it.
//
// Attach() creates `connections` socketpairs, serves one end of each with
// Export::ServeTransmission (the kernel skips the handshake) and hands the other ends to
// the kernel over generic netlink (family "nbd", libnl-3): NBD_CMD_CONNECT with the size,
// block size 4096, the export's transmission flags, the I/O and dead-connection timeouts
// and a backend identifier ("memfabric pid=PID start=T pidns=N export=NAME", shown in
// /sys/block/nbdX/backend). Where the kernel has no "nbd" netlink family it falls back to
// the ioctl interface (NBD_SET_SOCK…, NBD_DO_IT on a thread of its own). It returns once
// /dev/nbdX exists with the export's size. A connection the kernel gives up on (an I/O
// timeout) is replaced: a monitor thread listens for NBD_CMD_LINK_DEAD and hands the
// kernel a fresh socketpair with NBD_CMD_RECONFIGURE (netlink only).
//
// Detach() (and the destructor) disconnects (NBD_CMD_DISCONNECT: the kernel fails what is
// queued, sends NBD_CMD_DISC on every connection and closes them) and waits until the
// device is free again; a disconnect that fails leaves the device attached (and its
// connections served), so Detach() can be called again. A device whose owner crashed
// stays connected with dead sockets: Query() reports it as stale and Reclaim()
// disconnects it.
//
// Needs root (CAP_SYS_ADMIN) and the nbd module, which Attach loads with `modprobe nbd`
// when /sys/module/nbd is missing.
//
// Thread-safety: the static functions may be called from any thread. A Device's methods
// may be called from any thread; Detach() calls are serialized and it is idempotent. The
// Export (and the Remotes behind it) must outlive the Device.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "fabric/os.h"
#include "fabric/remote.h"
#include "fabric/status.h"
#include "fabric/thread_annotations.h"
#include "nbd/export.h"

namespace mf::nbd {

inline constexpr int kDefaultDeviceConnections = 4;
inline constexpr int kMaxDeviceConnections = 64;
inline constexpr uint32_t kDeviceBlockSize = 4096;
// The kernel takes NBD_ATTR_BACKEND_IDENTIFIER of any length, but prints it into one page
// (/sys/block/nbdX/backend); a long export name is cut to fit this.
inline constexpr size_t kMaxBackendBytes = 256;
static_assert(kDefaultDeviceConnections >= 1 && kDefaultDeviceConnections <= kMaxDeviceConnections);
static_assert(kDeviceBlockSize == kPreferredBlockSize && IsPowerOfTwo(kDeviceBlockSize));
static_assert(kMaxBackendBytes < 4096, "the smallest page, less the newline sysfs adds");

// How the kernel is told about the device.
enum class DeviceInterface : uint8_t {
  kAuto,     // netlink, or ioctl where the kernel has no "nbd" netlink family
  kNetlink,  // netlink only (kUnsupported without it)
  kIoctl,    // the legacy ioctl interface, even where netlink exists
};
std::string_view DeviceInterfaceName(DeviceInterface interface);

struct DeviceOptions {
  int index = -1;  // /dev/nbd<index>; -1 = any free device (the kernel picks one)
  int connections = kDefaultDeviceConnections;
  // A request the kernel sees no reply to for this long makes it drop that connection
  // (and requeue the request on another). Must be positive: the kernel takes 0 as "never"
  // (with one connection a request then waits forever, and sends to a full socket never
  // time out), and leaving it out means 0 too.
  std::chrono::seconds io_timeout{30};
  // How long the kernel queues requests while no connection is alive, waiting for a new
  // one, before failing them.
  std::chrono::seconds dead_connection_timeout{10};
  // With index >= 0: disconnect that device first when a crashed memfabric left it behind.
  bool reclaim = false;
  DeviceInterface interface = DeviceInterface::kAuto;
  // How long Attach waits for /dev/nbdX to show the size, and Detach for the device to be
  // free.
  std::chrono::milliseconds ready_timeout{10000};
  std::chrono::milliseconds detach_timeout{10000};
};

// What the kernel and sysfs say about /dev/nbd<index>.
struct DeviceStatus {
  int index = -1;
  bool connected = false;  // the kernel holds a configuration (someone attached it)
  uint64_t size = 0;       // bytes, from /sys/block/nbdX/size
  std::string backend;     // /sys/block/nbdX/backend ("" when unset)
  pid_t owner = 0;         // the attaching process: from the backend, else /sys/block/nbdX/pid
  bool owner_alive = false;
  // The owner runs in another pid namespace (see BackendOwner): `owner` is its pid there.
  bool owner_in_other_pid_namespace = false;
  bool memfabric = false;  // attached by memfabric (its backend identifier)

  // Connected by a memfabric process that is gone: Reclaim() may disconnect it.
  bool stale() const { return connected && memfabric && !owner_alive; }
  // "/dev/nbd3: free", "/dev/nbd3: in use by pid 42 (memfabric pid=42 export=swap)", ...
  std::string Describe() const;
};

// Who attached a device, from its backend identifier ("memfabric pid=N start=T pidns=I
// export=X"): the pid, and whether that same process still runs (its start time must match,
// so a pid reused since is not taken for the owner; an identifier without start= trusts the
// pid). An owner in another pid namespace than ours (pidns= is the inode of its
// /proc/self/ns/pid) cannot be looked up here: pid N names another process, or none, in
// ours. It counts as alive, so that nobody disconnects the device of a live process in a
// container; an identifier without pidns= is checked in our namespace, as it always was.
// {0, false} for an identifier memfabric did not write.
struct BackendOwner {
  pid_t pid = 0;
  bool alive = false;
  bool other_pid_namespace = false;
};
BackendOwner OwnerOfBackend(std::string_view backend);

class Device final {
 public:
  // Attaches export `export_name` of `exporter` ("" = its default export) to a kernel NBD
  // device. Errors: kUnsupported (no NBD driver and modprobe failed, or no netlink with
  // kNetlink), kPermissionDenied (not root), kNotFound (no such export), kBusy (the
  // requested device is in use, or left behind by a crashed memfabric without `reclaim`;
  // the message names it and its owner), kInvalidArgument (bad options, or a size that is
  // not a positive multiple of 4096), kTimeout (the device did not come up in time).
  static Result<std::unique_ptr<Device>> Attach(Export& exporter, std::string_view export_name,
                                                const DeviceOptions& options = {});
  // The same over an Export of its own that serves `remote` (not owned) only.
  static Result<std::unique_ptr<Device>> Attach(fabric::Remote& remote, const DeviceOptions& options = {},
                                                const ExportOptions& export_options = {});

  ~Device();  // Detach(); an error is logged, and a device it cannot disconnect stays behind
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  // Disconnects the device and waits (detach_timeout) until the kernel released it. kBusy
  // when it is disconnected but still held open (mounted, swapped on, or opened by a
  // program): it becomes free once they close it, and later calls return OK. Any other
  // error means the disconnect itself failed: the device stays attached and served, and a
  // later call tries again. A call concurrent with another waits for it; once the device
  // is disconnected, every call returns OK at once.
  Status Detach() MF_EXCLUDES(detach_mu_, mu_);

  // Who holds the device or one of its partitions (nbdXpN), one line each: "mounted at
  // /mnt", "swap area", "used by dm-0", "used by loop0 (backed by /dev/nbd3p1)", "open in
  // pid 42 (dd)", "mapped by pid 42 (python3)", or "held exclusively (a mount or swap area
  // elsewhere)" when the kernel refuses an exclusive open but none of the above names the
  // holder. This process is not counted. Empty: the device may be detached without taking
  // anything from anyone. Call it before Detach() where a user may still hold the device
  // (a file system's unwritten data is lost when its device is disconnected under it).
  // Fails when sysfs does not show the device's number: then nothing is known.
  Result<std::vector<std::string>> Users() const;

  int index() const { return index_; }
  const std::string& path() const { return path_; }  // "/dev/nbd3"
  uint64_t size() const { return size_; }
  DeviceInterface interface() const { return interface_; }
  // Connections the monitor replaced after the kernel dropped them.
  uint64_t reconnects() const { return reconnects_.load(); }

  // Loads the nbd module when /sys/module/nbd is missing. kUnsupported with what to do.
  static Status EnsureModule();
  // The status of /dev/nbd<index> (kNotFound if there is none) or of every NBD device.
  static Result<DeviceStatus> Query(int index);
  static Result<std::vector<DeviceStatus>> List();
  // Disconnects /dev/nbd<index> when it is stale (see DeviceStatus::stale), or with
  // `force` when any other process attached it, and waits for it to be free. OK when it
  // is not connected. kBusy (naming the owner) when its owner is alive or it is not
  // memfabric's and !force.
  static Status Reclaim(int index, bool force = false,
                        std::chrono::milliseconds timeout = std::chrono::milliseconds(10000));

  class Monitor;  // the LINK_DEAD listener; defined in device.cc

 private:
  friend class DeviceTestPeer;  // tests/unit/nbd_device_test.cc

  Device(std::unique_ptr<Export> owned, Export& exporter, std::string export_name,
         const DeviceOptions& options);
  // The identifier NBD_CMD_CONNECT gives the kernel for an export of that name, from this
  // process (see BackendOwner); at most kMaxBackendBytes long.
  static std::string BackendIdentifier(std::string_view export_name);
  // Users() of /dev/nbd<index>, as `sys_block` (/sys/block, or a test's copy) shows it and
  // its partitions and the loop devices.
  static Result<std::vector<std::string>> UsersOf(int index, const std::string& sys_block);
  Status Start(uint64_t size, uint16_t flags);
  // One connection: a socketpair whose one end Export serves. Returns the kernel's end.
  Result<UniqueFd> NewConnection();
  Status StartIoctl(uint64_t size, uint16_t flags, std::vector<UniqueFd> kernel_ends) MF_EXCLUDES(detach_mu_);
  Status WaitReady();
  // Tells the kernel to disconnect; Detach's first half.
  Status Disconnect() MF_REQUIRES(detach_mu_);
  // A new connection for one the kernel dropped. kAborted while a Detach is under way (the
  // connection is still owed should its disconnect fail). Monitor thread.
  Status ReplaceDeadConnection() MF_EXCLUDES(mu_);

  // Declared in the order they are made; the destructor detaches first, so the kernel is
  // done with the Export before it (and an owned one) is destroyed.
  std::unique_ptr<Export> owned_export_;
  Export& export_;
  const std::string export_name_;
  const DeviceOptions options_;
  int index_ = -1;
  std::string path_;
  uint64_t size_ = 0;
  DeviceInterface interface_ = DeviceInterface::kNetlink;
  std::string backend_;  // netlink: the identifier the device was connected with
  std::atomic<uint64_t> reconnects_{0};
  // Held for all of Detach(), so that a call concurrent with a failing one does not report
  // a device as detached that is still attached. Taken before mu_.
  Mutex detach_mu_;
  Mutex mu_;
  // Cleared while a disconnect is under way (so no dead connection is replaced), and for
  // good once it went through. ReplaceDeadConnection holds mu_ while it replaces one, so
  // clearing it also waits for a replacement in flight.
  bool attached_ MF_GUARDED_BY(mu_) = false;
  // ioctl interface: /dev/nbdX held open and the thread that sits in NBD_DO_IT.
  UniqueFd ioctl_fd_ MF_GUARDED_BY(detach_mu_);
  std::thread do_it_ MF_GUARDED_BY(detach_mu_);
  // Netlink interface; stopped once the device is disconnected (and first on destruction).
  std::unique_ptr<Monitor> monitor_ MF_GUARDED_BY(detach_mu_);
};

}  // namespace mf::nbd
