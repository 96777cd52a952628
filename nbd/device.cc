#include "nbd/device.h"

#include <fcntl.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <netlink/genl/ctrl.h>
#include <netlink/genl/genl.h>
#include <netlink/netlink.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <optional>
#include <span>
#include <sstream>
#include <utility>

namespace mf::nbd {
namespace {

constexpr char kModuleDir[] = "/sys/module/nbd";
constexpr char kSysBlock[] = "/sys/block";
constexpr char kBackendPrefix[] = "memfabric pid=";
constexpr std::string_view kBackendStart = " start=";
constexpr std::string_view kBackendPidNamespace = " pidns=";
constexpr std::string_view kBackendExport = " export=";
// The pid namespace this process is in: a link "pid:[INODE]"; stat gives the inode.
constexpr char kOwnPidNamespace[] = "/proc/self/ns/pid";
constexpr uint64_t kSectorSize = 512;  // unit of /sys/block/*/size
constexpr auto kPollInterval = std::chrono::milliseconds(20);
constexpr auto kMonitorTick = std::chrono::milliseconds(500);
// Bounds of what Users() reads from sysfs. The nbd module gives a device at most 255
// partitions (DISK_MAX_PARTS minors) beside some 30 attribute files; loop devices are
// looked for among the first kMaxBlockDevices entries of /sys/block.
constexpr size_t kMaxDiskEntries = 1024;
constexpr size_t kMaxBlockDevices = 16384;
static_assert(kMaxDiskEntries > 256);

std::string DevicePath(int index) {
  return "/dev/nbd" + std::to_string(index);
}
std::string SysBlock(int index) {
  return std::string(kSysBlock) + "/nbd" + std::to_string(index);
}

// The first line of a sysfs file, or nullopt when it does not exist.
std::optional<std::string> ReadSysfs(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::string line;
  std::getline(in, line);
  return line;
}

template <typename T>
std::optional<T> ParseNumber(std::string_view text) {
  T value{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

bool ProcessAlive(pid_t pid) {
  return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

// When process `pid` started, in clock ticks after boot (/proc/PID/stat field 22), or
// nullopt when it is gone. With the pid it names one process, even after the pid is reused.
std::optional<uint64_t> ProcessStartTime(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t comm_end = stat.rfind(')');  // the name may hold spaces and parentheses
  if (comm_end == std::string::npos) return std::nullopt;
  std::istringstream fields(stat.substr(comm_end + 1));
  std::string field;
  for (int i = 3; i <= 22 && (fields >> field); ++i) {
    if (i == 22) return ParseNumber<uint64_t>(field);
  }
  return std::nullopt;
}

Status SysError(std::string_view what) {
  return Status::FromErrno(errno, what);
}

// The names in `dir`, at most `limit` of them. Entries of /proc and /sys come and go while
// they are read: a directory that vanishes or fails part way gives what was read so far.
std::vector<std::string> DirectoryNames(const std::string& dir, size_t limit = SIZE_MAX) {
  std::vector<std::string> names;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end && names.size() < limit;
       it.increment(ec)) {
    names.push_back(it->path().filename().string());
  }
  return names;
}

// "43:32" (a sysfs dev file) as a device number.
std::optional<dev_t> ParseDevNumber(std::string_view text) {
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos) return std::nullopt;
  const auto major_number = ParseNumber<unsigned>(text.substr(0, colon));
  const auto minor_number = ParseNumber<unsigned>(text.substr(colon + 1));
  if (!major_number || !minor_number) return std::nullopt;
  return makedev(*major_number, *minor_number);
}

// The inode that names this process's pid namespace, or nullopt when /proc does not say
// (a /proc of another namespace shows no /proc/self).
std::optional<uint64_t> OwnPidNamespace() {
  struct stat st {};
  if (::stat(kOwnPidNamespace, &st) != 0) return std::nullopt;
  return static_cast<uint64_t>(st.st_ino);
}

// ---- Generic netlink (libnl-3) ------------------------------------------------------------------

struct NlSockFree {
  void operator()(nl_sock* s) const { nl_socket_free(s); }
};
struct NlMsgFree {
  void operator()(nl_msg* m) const { nlmsg_free(m); }
};
struct NlCbPut {
  void operator()(nl_cb* c) const { nl_cb_put(c); }
};
using NlSock = std::unique_ptr<nl_sock, NlSockFree>;
using NlMsg = std::unique_ptr<nl_msg, NlMsgFree>;
using NlCb = std::unique_ptr<nl_cb, NlCbPut>;

Status NlError(int nl_error, std::string_view what) {
  return Status(Code::kIoError, std::string(what) + ": " + nl_geterror(nl_error));
}

// What a reply carried, filled by the callbacks of Netlink::Transact.
struct Reply {
  std::optional<int> index;                   // NBD_ATTR_INDEX (CONNECT)
  std::vector<std::pair<int, bool>> devices;  // NBD_ATTR_DEVICE_LIST (STATUS): index, connected
  int error = 0;                              // errno of an NLMSG_ERROR
  bool acked = false;
};

int OnReply(nl_msg* msg, void* arg) {
  auto* reply = static_cast<Reply*>(arg);
  nlattr* attrs[NBD_ATTR_MAX + 1] = {};
  if (genlmsg_parse(nlmsg_hdr(msg), 0, attrs, NBD_ATTR_MAX, nullptr) < 0) return NL_SKIP;
  if (attrs[NBD_ATTR_INDEX] != nullptr) reply->index = static_cast<int>(nla_get_u32(attrs[NBD_ATTR_INDEX]));
  if (nlattr* list = attrs[NBD_ATTR_DEVICE_LIST]; list != nullptr) {
    int left = nla_len(list);
    for (auto* item = static_cast<nlattr*>(nla_data(list)); nla_ok(item, left) != 0;
         item = nla_next(item, &left)) {
      nlattr* device[NBD_DEVICE_ATTR_MAX + 1] = {};
      if (nla_parse_nested(device, NBD_DEVICE_ATTR_MAX, item, nullptr) < 0 ||
          device[NBD_DEVICE_INDEX] == nullptr) {
        continue;
      }
      const bool connected =
          device[NBD_DEVICE_CONNECTED] != nullptr && nla_get_u8(device[NBD_DEVICE_CONNECTED]) != 0;
      reply->devices.emplace_back(static_cast<int>(nla_get_u32(device[NBD_DEVICE_INDEX])), connected);
    }
  }
  return NL_OK;
}

int OnError(sockaddr_nl*, nlmsgerr* error, void* arg) {
  static_cast<Reply*>(arg)->error = -error->error;
  return NL_STOP;
}

int OnAck(nl_msg*, void* arg) {
  static_cast<Reply*>(arg)->acked = true;
  return NL_STOP;
}

struct ConnectRequest {
  int index = -1;
  uint64_t size = 0;
  uint16_t server_flags = 0;
  uint64_t io_timeout_s = 0;
  uint64_t dead_timeout_s = 0;
  std::string backend;
  std::vector<int> fds;
};

// A generic netlink socket with the "nbd" family resolved. Not thread-safe: one per use.
class Netlink final {
 public:
  // kUnsupported when the kernel has no "nbd" family (no module, or no netlink interface).
  static Result<Netlink> Open() {
    NlSock sock(nl_socket_alloc());
    if (!sock) return Status(Code::kResourceExhausted, "nl_socket_alloc failed");
    if (int rc = genl_connect(sock.get()); rc < 0) return NlError(rc, "connecting to generic netlink");
    const int family = genl_ctrl_resolve(sock.get(), NBD_GENL_FAMILY_NAME);
    if (family < 0) return Unsupported("the kernel has no \"nbd\" generic netlink family");
    return Netlink(std::move(sock), family);
  }

  nl_sock* sock() const { return sock_.get(); }

  // NBD_CMD_CONNECT; returns the device index the kernel used.
  Result<int> Connect(const ConnectRequest& c) {
    MF_ASSIGN_OR_RETURN(NlMsg msg, NewMessage(NBD_CMD_CONNECT));
    bool ok = true;
    if (c.index >= 0) ok &= nla_put_u32(msg.get(), NBD_ATTR_INDEX, static_cast<uint32_t>(c.index)) == 0;
    ok &= nla_put_u64(msg.get(), NBD_ATTR_SIZE_BYTES, c.size) == 0;
    ok &= nla_put_u64(msg.get(), NBD_ATTR_BLOCK_SIZE_BYTES, kDeviceBlockSize) == 0;
    ok &= nla_put_u64(msg.get(), NBD_ATTR_SERVER_FLAGS, c.server_flags) == 0;
    ok &= nla_put_u64(msg.get(), NBD_ATTR_TIMEOUT, c.io_timeout_s) == 0;
    ok &= nla_put_u64(msg.get(), NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_timeout_s) == 0;
    ok &= nla_put_string(msg.get(), NBD_ATTR_BACKEND_IDENTIFIER, c.backend.c_str()) == 0;
    ok &= PutSockets(msg.get(), c.fds);
    if (!ok) return Status(Code::kResourceExhausted, "NBD_CMD_CONNECT does not fit in a netlink message");
    Reply reply;
    MF_RETURN_IF_ERROR(Transact(std::move(msg), "NBD_CMD_CONNECT", &reply));
    if (reply.index) return *reply.index;
    if (c.index >= 0) return c.index;
    return ProtocolError("NBD_CMD_CONNECT: the kernel's reply names no device");
  }

  // NBD_CMD_RECONFIGURE with new sockets: each replaces a dead connection of the device.
  // `backend` must be the identifier the device was connected with (the kernel checks).
  Status Reconfigure(int index, const std::string& backend, std::span<const int> fds) {
    MF_ASSIGN_OR_RETURN(NlMsg msg, NewMessage(NBD_CMD_RECONFIGURE));
    bool ok = nla_put_u32(msg.get(), NBD_ATTR_INDEX, static_cast<uint32_t>(index)) == 0;
    ok &= nla_put_string(msg.get(), NBD_ATTR_BACKEND_IDENTIFIER, backend.c_str()) == 0;
    ok &= PutSockets(msg.get(), fds);
    if (!ok) return Status(Code::kResourceExhausted, "NBD_CMD_RECONFIGURE does not fit in a netlink message");
    Reply reply;
    return Transact(std::move(msg), "NBD_CMD_RECONFIGURE " + DevicePath(index), &reply);
  }

  Status Disconnect(int index) {
    MF_ASSIGN_OR_RETURN(NlMsg msg, NewMessage(NBD_CMD_DISCONNECT));
    if (nla_put_u32(msg.get(), NBD_ATTR_INDEX, static_cast<uint32_t>(index)) != 0) {
      return Status(Code::kResourceExhausted, "NBD_CMD_DISCONNECT does not fit in a netlink message");
    }
    Reply reply;
    return Transact(std::move(msg), "NBD_CMD_DISCONNECT " + DevicePath(index), &reply);
  }

  // NBD_CMD_STATUS: (index, connected) of one device (index >= 0) or of all.
  Result<std::vector<std::pair<int, bool>>> DeviceStates(int index) {
    MF_ASSIGN_OR_RETURN(NlMsg msg, NewMessage(NBD_CMD_STATUS));
    if (index >= 0 && nla_put_u32(msg.get(), NBD_ATTR_INDEX, static_cast<uint32_t>(index)) != 0) {
      return Status(Code::kResourceExhausted, "NBD_CMD_STATUS does not fit in a netlink message");
    }
    Reply reply;
    MF_RETURN_IF_ERROR(Transact(std::move(msg), "NBD_CMD_STATUS", &reply));
    return std::move(reply.devices);
  }

 private:
  Netlink(NlSock sock, int family) : sock_(std::move(sock)), family_(family) {}

  Result<NlMsg> NewMessage(uint8_t command) const {
    NlMsg msg(nlmsg_alloc());
    if (!msg) return Status(Code::kResourceExhausted, "nlmsg_alloc failed");
    if (genlmsg_put(msg.get(), NL_AUTO_PORT, NL_AUTO_SEQ, family_, 0, 0, command, NBD_GENL_VERSION) ==
        nullptr) {
      return Status(Code::kResourceExhausted, "genlmsg_put failed");
    }
    return msg;
  }

  // [NBD_ATTR_SOCKETS [NBD_SOCK_ITEM [NBD_SOCK_FD fd]]...]
  static bool PutSockets(nl_msg* msg, std::span<const int> fds) {
    nlattr* sockets = nla_nest_start(msg, NBD_ATTR_SOCKETS);
    if (sockets == nullptr) return false;
    for (int fd : fds) {
      nlattr* item = nla_nest_start(msg, NBD_SOCK_ITEM);
      if (item == nullptr || nla_put_u32(msg, NBD_SOCK_FD, static_cast<uint32_t>(fd)) != 0) return false;
      nla_nest_end(msg, item);
    }
    nla_nest_end(msg, sockets);
    return true;
  }

  // Sends msg and receives until the kernel's ACK or error; replies land in *reply.
  Status Transact(NlMsg msg, const std::string& what, Reply* reply) {
    NlCb cb(nl_cb_alloc(NL_CB_DEFAULT));
    if (!cb) return Status(Code::kResourceExhausted, "nl_cb_alloc failed");
    nl_cb_set(cb.get(), NL_CB_VALID, NL_CB_CUSTOM, OnReply, reply);
    nl_cb_set(cb.get(), NL_CB_ACK, NL_CB_CUSTOM, OnAck, reply);
    nl_cb_err(cb.get(), NL_CB_CUSTOM, OnError, reply);
    if (int rc = nl_send_auto(sock_.get(), msg.get()); rc < 0) return NlError(rc, what);
    while (!reply->acked && reply->error == 0) {
      const int rc = nl_recvmsgs(sock_.get(), cb.get());
      if (reply->error != 0) break;
      if (rc < 0) return NlError(rc, what);
    }
    if (reply->error != 0) return Status::FromErrno(reply->error, what);
    return Status::Ok();
  }

  NlSock sock_;
  int family_ = 0;
};

// Socket options of the connections: large buffers let a reply of a big read go out in
// one piece.
constexpr int kSocketBufferBytes = 4 << 20;

}  // namespace

// ---- Monitor: replaces connections the kernel declared dead -------------------------------------

// Listens on the "nbd" multicast group for NBD_CMD_LINK_DEAD of its device and calls
// Device::ReplaceDeadConnections on its own thread.
class Device::Monitor final {
 public:
  static Result<std::unique_ptr<Monitor>> Start(Device& device) {
    MF_ASSIGN_OR_RETURN(Netlink netlink, Netlink::Open());
    const int group = genl_ctrl_resolve_grp(netlink.sock(), NBD_GENL_FAMILY_NAME, NBD_GENL_MCAST_GROUP_NAME);
    if (group < 0) return NlError(group, "resolving the nbd multicast group");
    if (int rc = nl_socket_add_membership(netlink.sock(), group); rc < 0) {
      return NlError(rc, "joining the nbd multicast group");
    }
    if (int rc = nl_socket_set_nonblocking(netlink.sock()); rc < 0)
      return NlError(rc, "nl_socket_set_nonblocking");
    UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake.valid()) return SysError("eventfd");
    NlCb cb(nl_cb_alloc(NL_CB_DEFAULT));
    if (!cb) return Status(Code::kResourceExhausted, "nl_cb_alloc failed");
    auto monitor =
        std::unique_ptr<Monitor>(new Monitor(device, std::move(netlink), std::move(wake), std::move(cb)));
    nl_cb_set(monitor->cb_.get(), NL_CB_VALID, NL_CB_CUSTOM, OnEvent, monitor.get());
    // Multicast events carry no sequence number of ours.
    nl_cb_set(
        monitor->cb_.get(), NL_CB_SEQ_CHECK, NL_CB_CUSTOM, [](nl_msg*, void*) { return int{NL_OK}; },
        nullptr);
    monitor->thread_ = std::thread([m = monitor.get()] { m->Run(); });
    return monitor;
  }

  ~Monitor() {
    const uint64_t one = 1;
    if (::write(wake_.get(), &one, sizeof(one)) < 0) spdlog::warn("nbd: cannot wake the monitor");
    if (thread_.joinable()) thread_.join();
  }
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;

 private:
  Monitor(Device& device, Netlink netlink, UniqueFd wake, NlCb cb)
      : device_(device), netlink_(std::move(netlink)), wake_(std::move(wake)), cb_(std::move(cb)) {}

  static int OnEvent(nl_msg* msg, void* arg) {
    auto* self = static_cast<Monitor*>(arg);
    const genlmsghdr* header = genlmsg_hdr(nlmsg_hdr(msg));
    if (header->cmd != NBD_CMD_LINK_DEAD) return NL_OK;
    nlattr* attrs[NBD_ATTR_MAX + 1] = {};
    if (genlmsg_parse(nlmsg_hdr(msg), 0, attrs, NBD_ATTR_MAX, nullptr) < 0 ||
        attrs[NBD_ATTR_INDEX] == nullptr) {
      return NL_OK;
    }
    if (static_cast<int>(nla_get_u32(attrs[NBD_ATTR_INDEX])) == self->device_.index_) ++self->dead_links_;
    return NL_OK;
  }

  // Stopping for any reason but wake_ leaves the device without a replacement for a
  // connection the kernel drops: once all are gone its I/O fails. Hence error level.
  void Run() {
    pollfd fds[2] = {{nl_socket_get_fd(netlink_.sock()), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    for (;;) {
      const int ready = ::poll(fds, 2, static_cast<int>(kMonitorTick.count()));
      if (ready < 0 && errno == EINTR) continue;  // revents are not set
      if (ready < 0) {
        spdlog::error(
            "nbd: {}: the monitor stopped (poll: {}); connections the kernel drops are no "
            "longer replaced",
            device_.path_, std::strerror(errno));
        return;
      }
      if ((fds[1].revents & POLLIN) != 0) return;  // Detach or the destructor
      if ((fds[0].revents & (POLLHUP | POLLNVAL)) != 0 || (fds[1].revents & (POLLERR | POLLNVAL)) != 0) {
        // Would wake every poll at once from now on.
        spdlog::error(
            "nbd: {}: the monitor stopped (its sockets failed: {:#x}, {:#x}); connections the "
            "kernel drops are no longer replaced",
            device_.path_, fds[0].revents, fds[1].revents);
        return;
      }
      // POLLERR alone: the socket overflowed (ENOBUFS); reading reports and clears that.
      if ((fds[0].revents & (POLLIN | POLLERR)) != 0) {
        // One datagram per call (the socket does not block; EAGAIN also returns 0).
        dead_links_ = 0;
        if (int rc = nl_recvmsgs(netlink_.sock(), cb_.get()); rc < 0 && rc != -NLE_AGAIN) {
          spdlog::warn("nbd: {} monitor: {}", device_.path_, nl_geterror(rc));
        }
        owed_ += dead_links_;
      }
      // One that cannot be replaced yet (say the Export still serves the dropped one's
      // requests and has no room) is tried again every tick.
      while (owed_ > 0) {
        Status replaced = device_.ReplaceDeadConnection();
        // A Detach is under way: still owed should its disconnect fail.
        if (replaced.code() == Code::kAborted) break;
        if (!replaced.ok()) {
          if (!retrying_) {
            spdlog::warn("nbd: {}: the kernel dropped a connection; cannot replace it yet ({}); retrying",
                         device_.path_, replaced.ToString());
          }
          retrying_ = true;
          break;
        }
        --owed_;
        if (owed_ == 0) retrying_ = false;
      }
    }
  }

  Device& device_;
  Netlink netlink_;
  UniqueFd wake_;  // an eventfd: written once to stop the thread
  NlCb cb_;
  int dead_links_ = 0;  // monitor thread only
  int owed_ = 0;        // dropped connections not replaced yet (monitor thread only)
  bool retrying_ = false;
  std::thread thread_;  // last: uses everything above
};

// ---- DeviceStatus --------------------------------------------------------------------------------

std::string_view DeviceInterfaceName(DeviceInterface interface) {
  switch (interface) {
    case DeviceInterface::kAuto: return "auto";
    case DeviceInterface::kNetlink: return "netlink";
    case DeviceInterface::kIoctl: return "ioctl";
  }
  return "?";
}

std::string DeviceStatus::Describe() const {
  std::string text = DevicePath(index) + ": ";
  if (!connected) return text + "free";
  if (stale()) {
    text += "left behind by memfabric process " + std::to_string(owner) + ", which is gone";
  } else if (owner > 0 && owner_in_other_pid_namespace) {
    text += "in use by process " + std::to_string(owner) + " of another pid namespace";
  } else if (owner > 0) {
    text += "in use by process " + std::to_string(owner) + (owner_alive ? "" : " (gone)");
  } else {
    text += "in use";
  }
  if (!backend.empty()) text += " (" + backend + ")";
  if (size > 0) text += ", " + std::to_string(size) + " bytes";
  return text;
}

// ---- Device: queries ------------------------------------------------------------------------------

namespace {

// The value of `key` (" start=") in the fields of a backend identifier, or nullopt.
std::optional<std::string_view> BackendField(std::string_view fields, std::string_view key) {
  const size_t at = fields.find(key);
  if (at == std::string_view::npos) return std::nullopt;
  std::string_view value = fields.substr(at + key.size());
  return value.substr(0, value.find(' '));
}

}  // namespace

std::string Device::BackendIdentifier(std::string_view export_name) {
  const pid_t self = ::getpid();
  std::string id = kBackendPrefix + std::to_string(self);
  id += std::string(kBackendStart) + std::to_string(ProcessStartTime(self).value_or(0));
  if (const std::optional<uint64_t> pidns = OwnPidNamespace()) {
    id += std::string(kBackendPidNamespace) + std::to_string(*pidns);
  }
  id += kBackendExport;
  // sysfs shows the identifier as one line, read back by ReadSysfs.
  for (char c : export_name.substr(0, kMaxBackendBytes - std::min(id.size(), kMaxBackendBytes))) {
    id += std::iscntrl(static_cast<unsigned char>(c)) != 0 ? '?' : c;
  }
  return id;
}

BackendOwner OwnerOfBackend(std::string_view backend) {
  BackendOwner owner;
  if (backend.rfind(kBackendPrefix, 0) != 0) return owner;
  std::string_view rest = backend.substr(sizeof(kBackendPrefix) - 1);
  owner.pid = ParseNumber<pid_t>(rest.substr(0, rest.find(' '))).value_or(0);
  // The export name is last and may hold anything, " start=" too.
  const std::string_view fields = rest.substr(0, rest.find(kBackendExport));
  if (const auto recorded = BackendField(fields, kBackendPidNamespace)) {
    const std::optional<uint64_t> ours = OwnPidNamespace();
    if (!ours || ParseNumber<uint64_t>(*recorded) != ours) {
      owner.other_pid_namespace = true;
      owner.alive = true;  // cannot tell from here: not stale
      return owner;
    }
  }
  owner.alive = ProcessAlive(owner.pid);
  if (const auto value = BackendField(fields, kBackendStart); owner.alive && value) {
    const std::optional<uint64_t> recorded = ParseNumber<uint64_t>(*value);
    owner.alive = recorded && *recorded != 0 && ProcessStartTime(owner.pid) == recorded;
  }
  return owner;
}

Status Device::EnsureModule() {
  struct stat st {};
  if (::stat(kModuleDir, &st) == 0) return Status::Ok();
  Status loaded = RunProgram({"modprobe", "-q", "nbd"}, true);
  if (::stat(kModuleDir, &st) == 0) return Status::Ok();
  return Unsupported("the kernel has no NBD driver: " + std::string(kModuleDir) +
                     " is missing and `modprobe nbd` failed (" +
                     std::string(loaded.ok() ? "no error, but no module" : loaded.message()) +
                     "); load the nbd module, or use a kernel built with CONFIG_BLK_DEV_NBD");
}

namespace {

// Fills what sysfs knows about the device; `connected` comes from the caller.
DeviceStatus ReadStatus(int index, bool connected) {
  DeviceStatus s;
  s.index = index;
  s.connected = connected;
  if (auto size = ReadSysfs(SysBlock(index) + "/size"))
    s.size = ParseNumber<uint64_t>(*size).value_or(0) * kSectorSize;
  if (auto backend = ReadSysfs(SysBlock(index) + "/backend")) s.backend = *backend;
  if (s.backend.rfind(kBackendPrefix, 0) == 0) {
    s.memfabric = true;
    const BackendOwner owner = OwnerOfBackend(s.backend);
    s.owner = owner.pid;
    s.owner_alive = owner.alive;
    s.owner_in_other_pid_namespace = owner.other_pid_namespace;
  }
  if (s.owner == 0) {
    if (auto pid = ReadSysfs(SysBlock(index) + "/pid")) s.owner = ParseNumber<pid_t>(*pid).value_or(0);
    s.owner_alive = ProcessAlive(s.owner);
  }
  return s;
}

// Indices of every NBD device sysfs shows (/sys/block/nbdN).
std::vector<int> SysfsDevices() {
  std::vector<int> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(kSysBlock, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("nbd", 0) != 0) continue;
    if (auto index = ParseNumber<int>(std::string_view(name).substr(3))) found.push_back(*index);
  }
  std::sort(found.begin(), found.end());
  return found;
}

// Whether the kernel holds a configuration for each device: netlink, else the pid file.
Result<std::vector<std::pair<int, bool>>> DeviceStates(int index) {
  Result<Netlink> netlink = Netlink::Open();
  if (netlink.ok()) return netlink->DeviceStates(index);
  if (netlink.status().code() != Code::kUnsupported) return netlink.status();
  std::vector<std::pair<int, bool>> states;
  for (int i : index >= 0 ? std::vector<int>{index} : SysfsDevices()) {
    struct stat st {};
    if (::stat(SysBlock(i).c_str(), &st) != 0) continue;
    states.emplace_back(i, ::stat((SysBlock(i) + "/pid").c_str(), &st) == 0);
  }
  return states;
}

// Waits until the kernel released /dev/nbd<index>.
Status WaitFree(int index, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    MF_ASSIGN_OR_RETURN(auto states, DeviceStates(index));
    if (states.empty() || !states.front().second) return Status::Ok();
    if (std::chrono::steady_clock::now() >= deadline) {
      return Status(Code::kBusy,
                    DevicePath(index) +
                        " is disconnected but still held open (mounted, swapped on, or opened by a "
                        "program); it becomes free once they close it");
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

}  // namespace

Result<DeviceStatus> Device::Query(int index) {
  if (index < 0) return InvalidArgument("NBD device index " + std::to_string(index) + " is negative");
  MF_RETURN_IF_ERROR(EnsureModule());
  MF_ASSIGN_OR_RETURN(auto states, DeviceStates(index));
  struct stat st {};
  if (states.empty() || ::stat(SysBlock(index).c_str(), &st) != 0) {
    return NotFound("there is no " + DevicePath(index) + " (" + SysBlock(index) + " is missing)");
  }
  return ReadStatus(index, states.front().second);
}

Result<std::vector<DeviceStatus>> Device::List() {
  MF_RETURN_IF_ERROR(EnsureModule());
  MF_ASSIGN_OR_RETURN(auto states, DeviceStates(-1));
  std::sort(states.begin(), states.end());
  std::vector<DeviceStatus> list;
  for (const auto& [index, connected] : states) list.push_back(ReadStatus(index, connected));
  return list;
}

Status Device::Reclaim(int index, bool force, std::chrono::milliseconds timeout) {
  MF_ASSIGN_OR_RETURN(DeviceStatus status, Query(index));
  if (!status.connected) return Status::Ok();
  if (status.owner_in_other_pid_namespace && !force) {
    return Status(Code::kBusy, "cannot reclaim " + status.Describe() +
                                   ": its owner may be alive there; stop it in its container instead");
  }
  if (status.owner_alive && !force) {
    return Status(Code::kBusy,
                  "cannot reclaim " + status.Describe() + ": its owner is alive; stop it instead");
  }
  if (!status.memfabric && !force) {
    return Status(Code::kBusy, "cannot reclaim " + status.Describe() +
                                   ": another NBD client attached it; disconnect it with `nbd-client -d " +
                                   DevicePath(index) + "`");
  }
  spdlog::warn("nbd: reclaiming {}", status.Describe());
  Result<Netlink> netlink = Netlink::Open();
  if (netlink.ok()) {
    MF_RETURN_IF_ERROR(netlink->Disconnect(index));
  } else {
    UniqueFd fd(::open(DevicePath(index).c_str(), O_RDWR | O_CLOEXEC));
    if (!fd.valid()) return SysError("opening " + DevicePath(index));
    if (::ioctl(fd.get(), NBD_DISCONNECT) != 0) return SysError("NBD_DISCONNECT " + DevicePath(index));
    (void)::ioctl(fd.get(), NBD_CLEAR_SOCK);
  }
  return WaitFree(index, timeout);
}

// ---- Device: attach and detach -----------------------------------------------------------------------

Device::Device(std::unique_ptr<Export> owned, Export& exporter, std::string export_name,
               const DeviceOptions& options)
    : owned_export_(std::move(owned)),
      export_(exporter),
      export_name_(std::move(export_name)),
      options_(options) {}

Result<std::unique_ptr<Device>> Device::Attach(Export& exporter, std::string_view export_name,
                                               const DeviceOptions& options) {
  MF_ASSIGN_OR_RETURN(ExportInfo info, exporter.Info(export_name));
  std::unique_ptr<Device> device(new Device(nullptr, exporter, std::string(export_name), options));
  MF_RETURN_IF_ERROR(device->Start(info.size, info.flags));
  return device;
}

Result<std::unique_ptr<Device>> Device::Attach(fabric::Remote& remote, const DeviceOptions& options,
                                               const ExportOptions& export_options) {
  // Room for a replacement of every connection while the one it replaces still answers
  // the requests it had in flight.
  ExportOptions sized = export_options;
  sized.max_connections = std::max(sized.max_connections, 2 * options.connections);
  auto exporter = std::make_unique<Export>(sized);
  MF_RETURN_IF_ERROR(exporter->Add({remote.info().name, "", &remote, false}));
  MF_ASSIGN_OR_RETURN(ExportInfo info, exporter->Info(remote.info().name));
  Export& ref = *exporter;
  std::unique_ptr<Device> device(new Device(std::move(exporter), ref, remote.info().name, options));
  MF_RETURN_IF_ERROR(device->Start(info.size, info.flags));
  return device;
}

Device::~Device() {
  Status detached = Detach();
  if (detached.ok()) return;
  if (detached.code() == Code::kBusy) {
    spdlog::warn("nbd: detaching {}: {}", path_, detached.ToString());
    return;
  }
  spdlog::error("nbd: detaching {}: {}", path_, detached.ToString());
  MutexLock lock(detach_mu_);
  if (do_it_.joinable()) {
    // The thread stays in NBD_DO_IT on the descriptor until this process exits (which
    // ends NBD_DO_IT and shuts the sockets): leave both to it.
    do_it_.detach();
    (void)ioctl_fd_.Release();
  }
}

Result<UniqueFd> Device::NewConnection() {
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) return SysError("socketpair");
  UniqueFd ours(pair[0]);
  UniqueFd kernel(pair[1]);
  for (int fd : pair) {
    (void)::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &kSocketBufferBytes, sizeof(kSocketBufferBytes));
    (void)::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &kSocketBufferBytes, sizeof(kSocketBufferBytes));
  }
  MF_RETURN_IF_ERROR(export_.ServeTransmission(std::move(ours), export_name_));
  return kernel;
}

Status Device::Start(uint64_t size, uint16_t flags) {
  const DeviceOptions& o = options_;
  if (o.connections < 1 || o.connections > kMaxDeviceConnections) {
    return InvalidArgument("connections must be 1 to " + std::to_string(kMaxDeviceConnections));
  }
  if (o.index < -1) return InvalidArgument("device index " + std::to_string(o.index) + " is negative");
  if (o.io_timeout.count() <= 0) {
    // The kernel takes 0 for "no timeout": with one connection a request the Export never
    // answers would hang its caller forever.
    return InvalidArgument("the NBD I/O timeout must be at least 1 s (0 would let a request wait forever)");
  }
  if (o.dead_connection_timeout.count() < 0) return InvalidArgument("NBD timeouts cannot be negative");
  if (size == 0 || size % kDeviceBlockSize != 0) {
    return InvalidArgument("export '" + export_name_ + "' has " + std::to_string(size) +
                           " bytes; a block device needs a positive multiple of " +
                           std::to_string(kDeviceBlockSize));
  }
  MF_RETURN_IF_ERROR(EnsureModule());
  size_ = size;

  if (o.index >= 0) {
    Result<DeviceStatus> status = Query(o.index);
    if (status.ok() && status->connected) {
      if (status->stale() && o.reclaim) {
        MF_RETURN_IF_ERROR(Reclaim(o.index, false, o.detach_timeout));
      } else if (status->stale()) {
        return Status(Code::kBusy, status->Describe() + "; reclaim it (--reclaim) or pick another device");
      } else {
        return Status(Code::kBusy, status->Describe() + "; pick another device, or none to get a free one");
      }
    } else if (!status.ok() && status.status().code() != Code::kNotFound) {
      return status.status();
    }
  }

  Result<Netlink> netlink = o.interface == DeviceInterface::kIoctl
                                ? Result<Netlink>(Unsupported("ioctl asked for"))
                                : Netlink::Open();
  if (!netlink.ok()) {
    if (o.interface == DeviceInterface::kNetlink || netlink.status().code() != Code::kUnsupported) {
      return netlink.status();
    }
    if (o.interface == DeviceInterface::kAuto) {
      spdlog::info("nbd: {}; using the ioctl interface", netlink.status().message());
    }
  }

  std::vector<UniqueFd> kernel_ends;
  for (int i = 0; i < o.connections; ++i) {
    MF_ASSIGN_OR_RETURN(UniqueFd end, NewConnection());
    kernel_ends.push_back(std::move(end));
  }
  // Closing kernel_ends on failure ends the Export's connections too.
  if (!netlink.ok()) {
    interface_ = DeviceInterface::kIoctl;
    MF_RETURN_IF_ERROR(StartIoctl(size, flags, std::move(kernel_ends)));
  } else {
    interface_ = DeviceInterface::kNetlink;
    ConnectRequest c;
    c.index = o.index;
    c.size = size;
    c.server_flags = flags;
    c.io_timeout_s = static_cast<uint64_t>(o.io_timeout.count());
    c.dead_timeout_s = static_cast<uint64_t>(o.dead_connection_timeout.count());
    backend_ = BackendIdentifier(export_name_);
    c.backend = backend_;
    for (const UniqueFd& fd : kernel_ends) c.fds.push_back(fd.get());
    Result<int> index = netlink->Connect(c);
    if (!index.ok()) {
      const Status& s = index.status();
      if (s.code() == Code::kPermissionDenied)
        return s.WithContext("attaching an NBD device needs root (CAP_SYS_ADMIN)");
      if (s.code() == Code::kBusy) return s.WithContext(DevicePath(o.index) + " is in use");
      return s;
    }
    index_ = *index;
    // The kernel holds its own references to its ends: ours close when kernel_ends goes.
  }
  path_ = DevicePath(index_);
  {
    MutexLock lock(mu_);
    attached_ = true;
  }
  if (Status ready = WaitReady(); !ready.ok()) {
    (void)Detach();
    return ready;
  }
  if (interface_ == DeviceInterface::kNetlink) {
    auto monitor = Monitor::Start(*this);
    if (monitor.ok()) {
      MutexLock lock(detach_mu_);
      monitor_ = std::move(monitor).value();
    } else {
      spdlog::warn("nbd: {}: dead connections will not be replaced: {}", path_, monitor.status().ToString());
    }
  }
  spdlog::info("nbd: {} attached to export '{}' ({} bytes, {} connections, {})", path_, export_name_, size,
               o.connections, DeviceInterfaceName(interface_));
  return Status::Ok();
}

namespace {

// Configures /dev/nbdX (open as fd) with the legacy ioctls. The first NBD_SET_SOCK claims
// the device for the calling thread (EBUSY when another task did); NBD_DO_IT must follow
// on the same thread. *claimed says whether it did: only then is a failed configuration
// ours to clear (NBD_CLEAR_SOCK on a device another task is setting up shuts its sockets).
Status ConfigureIoctl(int fd, const std::string& path, uint64_t size, uint16_t flags, unsigned long timeout_s,
                      const std::vector<UniqueFd>& kernel_ends, bool* claimed) {
  auto set = [&](unsigned long request, unsigned long value, const char* name) -> Status {
    if (::ioctl(fd, request, value) == 0) return Status::Ok();
    return SysError(std::string(name) + " " + path);
  };
  for (const UniqueFd& end : kernel_ends) {
    MF_RETURN_IF_ERROR(set(NBD_SET_SOCK, static_cast<unsigned long>(end.get()), "NBD_SET_SOCK"));
    *claimed = true;
  }
  MF_RETURN_IF_ERROR(set(NBD_SET_BLKSIZE, kDeviceBlockSize, "NBD_SET_BLKSIZE"));
  MF_RETURN_IF_ERROR(set(NBD_SET_SIZE, size, "NBD_SET_SIZE"));
  MF_RETURN_IF_ERROR(set(NBD_SET_TIMEOUT, timeout_s, "NBD_SET_TIMEOUT"));
  return set(NBD_SET_FLAGS, flags, "NBD_SET_FLAGS");
}

}  // namespace

Status Device::StartIoctl(uint64_t size, uint16_t flags, std::vector<UniqueFd> kernel_ends) {
  std::vector<int> candidates;
  if (options_.index >= 0) {
    candidates.push_back(options_.index);
  } else {
    MF_ASSIGN_OR_RETURN(auto states, DeviceStates(-1));
    std::sort(states.begin(), states.end());
    for (const auto& [index, connected] : states) {
      if (!connected) candidates.push_back(index);
    }
  }
  const auto timeout_s = static_cast<unsigned long>(options_.io_timeout.count());
  Status last = Status(Code::kBusy, "every NBD device is in use");
  for (int index : candidates) {
    const std::string path = DevicePath(index);
    UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (!fd.valid()) {
      last = SysError("opening " + path);
      continue;
    }
    // One thread configures the device and then sits in NBD_DO_IT until it is
    // disconnected; it reports the configuration's outcome first.
    std::promise<Status> configured;
    std::future<Status> outcome = configured.get_future();
    const int dev = fd.get();
    std::thread thread(
        [dev, path, size, flags, timeout_s, &kernel_ends, configured = std::move(configured)]() mutable {
          bool claimed = false;
          Status s = ConfigureIoctl(dev, path, size, flags, timeout_s, kernel_ends, &claimed);
          const bool ok = s.ok();
          if (!ok && claimed) (void)::ioctl(dev, NBD_CLEAR_SOCK);
          configured.set_value(std::move(s));
          if (!ok) return;
          if (::ioctl(dev, NBD_DO_IT) != 0 && errno != EINTR) {
            spdlog::info("nbd: {}: NBD_DO_IT ended: {}", path, std::strerror(errno));
          }
          (void)::ioctl(dev, NBD_CLEAR_QUE);
          (void)::ioctl(dev, NBD_CLEAR_SOCK);
        });
    Status result = outcome.get();
    if (!result.ok()) {
      thread.join();
      last = std::move(result);
      if (last.code() == Code::kBusy && options_.index < 0) continue;
      return last;
    }
    index_ = index;
    MutexLock lock(detach_mu_);
    ioctl_fd_ = std::move(fd);
    do_it_ = std::move(thread);
    return Status::Ok();  // kernel_ends close: the kernel holds its own references
  }
  return last;
}

Status Device::WaitReady() {
  const auto deadline = std::chrono::steady_clock::now() + options_.ready_timeout;
  for (;;) {
    struct stat st {};
    const bool node = ::stat(path_.c_str(), &st) == 0 && S_ISBLK(st.st_mode);
    const auto sectors = ReadSysfs(SysBlock(index_) + "/size");
    if (node && sectors && ParseNumber<uint64_t>(*sectors).value_or(0) * kSectorSize == size_)
      return Status::Ok();
    if (std::chrono::steady_clock::now() >= deadline) {
      return Status(Code::kTimeout, path_ + " did not come up with " + std::to_string(size_) + " bytes in " +
                                        std::to_string(options_.ready_timeout.count()) + " ms");
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

Status Device::ReplaceDeadConnection() {
  // Held throughout, so that Detach, which clears attached_ first, never disconnects while
  // a replacement is on its way to the kernel.
  MutexLock lock(mu_);
  if (!attached_) return Status(Code::kAborted, "detaching");
  Result<UniqueFd> end = NewConnection();
  Status replaced = end.ok() ? Status::Ok() : end.status();
  if (replaced.ok()) {
    Result<Netlink> netlink = Netlink::Open();
    const int fd = end->get();
    replaced = netlink.ok() ? netlink->Reconfigure(index_, backend_, std::span(&fd, 1)) : netlink.status();
  }
  if (replaced.ok()) {
    reconnects_.fetch_add(1);
    spdlog::warn("nbd: {}: the kernel dropped a connection; replaced it", path_);
  }
  return replaced;
}

namespace {

// "python3" for a pid, or "" when it is gone.
std::string ProcessName(const std::string& pid) {
  return ReadSysfs("/proc/" + pid + "/comm").value_or("");
}

// The whole disk or one of its partitions, as sysfs shows it.
struct BlockDevice {
  std::string name;  // "nbd3", "nbd3p1"
  dev_t number = 0;
  std::string path() const { return "/dev/" + name; }
};

bool IsOneOf(dev_t number, const std::vector<BlockDevice>& devices) {
  return std::any_of(devices.begin(), devices.end(),
                     [&](const BlockDevice& d) { return d.number == number; });
}

// /dev/nbd<index> (first) and its partitions, which the nbd module creates as
// sys_block/nbdX/nbdXpN. kNotFound when sysfs shows no number for the disk; a partition
// that vanishes while it is read is left out.
Result<std::vector<BlockDevice>> DiskAndPartitions(const std::string& sys_block, int index) {
  const std::string disk = "nbd" + std::to_string(index);
  const std::string dir = sys_block + "/" + disk;
  const std::optional<dev_t> number = ParseDevNumber(ReadSysfs(dir + "/dev").value_or(""));
  if (!number)
    return NotFound("cannot read the device number of " + DevicePath(index) + " from " + dir + "/dev");
  std::vector<BlockDevice> devices = {{disk, *number}};
  const std::string prefix = disk + "p";
  for (const std::string& name : DirectoryNames(dir, kMaxDiskEntries)) {
    if (!name.starts_with(prefix) || !ParseNumber<unsigned>(std::string_view(name).substr(prefix.size()))) {
      continue;
    }
    if (auto part = ParseDevNumber(ReadSysfs(dir + "/" + name + "/dev").value_or(""))) {
      devices.push_back({name, *part});
    }
  }
  return devices;
}

// Where the devices are mounted in this mount namespace (/proc/self/mountinfo: field 3 is
// MAJOR:MINOR, field 5 the mount point).
std::vector<std::string> MountPointsOf(const std::vector<BlockDevice>& devices) {
  std::vector<std::string> points;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string id, parent, numbers, root, point;
    if (!(fields >> id >> parent >> numbers >> root >> point)) continue;
    if (const std::optional<dev_t> number = ParseDevNumber(numbers); number && IsOneOf(*number, devices)) {
      points.push_back(point);
    }
  }
  return points;
}

bool IsSwapArea(const std::string& path) {
  std::ifstream in("/proc/swaps");
  std::string line;
  std::getline(in, line);  // the header
  while (std::getline(in, line)) {
    if (line.substr(0, line.find_first_of(" \t")) == path) return true;
  }
  return false;
}

// dm, md or bcache devices built on the disk or a partition: sysfs links them under
// holders/ of what they hold.
void AddHolders(const std::string& sys_block, const std::vector<BlockDevice>& devices,
                std::vector<std::string>* users) {
  const std::string disk_dir = sys_block + "/" + devices.front().name;
  for (const BlockDevice& d : devices) {
    const std::string dir = d.name == devices.front().name ? disk_dir : disk_dir + "/" + d.name;
    for (const std::string& holder : DirectoryNames(dir + "/holders", kMaxDiskEntries)) {
      users->push_back("used by " + holder);
    }
  }
}

// Loop devices backed by the disk or a partition. The loop driver holds the device open
// itself, so no process's descriptors show it, and it is no holder in sysfs. backing_file
// is the path of the device node as the kernel resolved it (symbolic links followed): a
// node made outside /dev is not recognised. Loop devices beyond the first
// kMaxBlockDevices entries of /sys/block are not looked at.
void AddLoopUsers(const std::string& sys_block, const std::vector<BlockDevice>& devices,
                  std::vector<std::string>* users) {
  for (const std::string& name : DirectoryNames(sys_block, kMaxBlockDevices)) {
    if (!name.starts_with("loop")) continue;
    // Missing: the loop device is not bound to a file, or it went away meanwhile.
    const std::optional<std::string> backing = ReadSysfs(sys_block + "/" + name + "/loop/backing_file");
    if (!backing) continue;
    if (std::any_of(devices.begin(), devices.end(),
                    [&](const BlockDevice& d) { return *backing == d.path(); })) {
      users->push_back("used by " + name + " (backed by " + *backing + ")");
    }
  }
}

// Whether `link`, a /proc/PID/fd entry, opens one of the devices. statx, not stat: stat
// follows the link into the open file's own file system and has that revalidate the
// attributes (NFS even writes back dirty pages first), which blocks for as long as a
// hard-mounted NFS server or a FUSE daemon does not answer. Asked for the type only, with
// AT_STATX_DONT_SYNC, the kernel answers from its cache; the device number of a special
// file comes with every statx.
bool OpensOneOf(const std::string& link, const std::vector<BlockDevice>& devices) {
  struct statx sx {};
  if (::statx(AT_FDCWD, link.c_str(), AT_STATX_DONT_SYNC, STATX_TYPE, &sx) != 0) return false;
  if ((sx.stx_mask & STATX_TYPE) == 0 || !S_ISBLK(sx.stx_mode)) return false;
  return IsOneOf(makedev(sx.stx_rdev_major, sx.stx_rdev_minor), devices);
}

// Whether a /proc/PID/maps line maps one of the devices: its path is the last field.
bool MapsOneOf(std::string_view line, const std::vector<BlockDevice>& devices) {
  return std::any_of(devices.begin(), devices.end(), [&](const BlockDevice& d) {
    const std::string path = d.path();
    return line.size() > path.size() && line.ends_with(path) && line[line.size() - path.size() - 1] == ' ';
  });
}

// Other processes with the disk or a partition open (/proc/PID/fd) or mapped
// (/proc/PID/maps). Reading maps takes the process's mmap lock for reading (killably): it
// waits while the process holds that lock for writing, which an mmap or munmap does only
// briefly unless the process is itself stuck. It is read anyway: a mapping whose
// descriptor was closed shows nowhere else.
void AddProcessUsers(const std::vector<BlockDevice>& devices, std::vector<std::string>* users) {
  const std::string self = std::to_string(::getpid());
  for (const std::string& pid : DirectoryNames("/proc")) {
    if (pid == self || !ParseNumber<pid_t>(pid)) continue;
    const std::string dir = "/proc/" + pid;
    const std::vector<std::string> fds = DirectoryNames(dir + "/fd");
    if (std::any_of(fds.begin(), fds.end(),
                    [&](const std::string& fd) { return OpensOneOf(dir + "/fd/" + fd, devices); })) {
      users->push_back("open in pid " + pid + " (" + ProcessName(pid) + ")");
    }
    std::ifstream maps(dir + "/maps");
    std::string line;
    while (std::getline(maps, line)) {
      if (MapsOneOf(line, devices)) {
        users->push_back("mapped by pid " + pid + " (" + ProcessName(pid) + ")");
        break;
      }
    }
  }
}

}  // namespace

Result<std::vector<std::string>> Device::Users() const {
  return UsersOf(index_, kSysBlock);
}

Result<std::vector<std::string>> Device::UsersOf(int index, const std::string& sys_block) {
  MF_ASSIGN_OR_RETURN(const std::vector<BlockDevice> devices, DiskAndPartitions(sys_block, index));
  std::vector<std::string> users;
  for (const std::string& point : MountPointsOf(devices)) users.push_back("mounted at " + point);
  for (const BlockDevice& d : devices) {
    if (!IsSwapArea(d.path())) continue;
    users.push_back(&d == &devices.front() ? "swap area (swapon)" : "swap area on " + d.path() + " (swapon)");
  }
  AddHolders(sys_block, devices, &users);
  AddLoopUsers(sys_block, devices, &users);
  AddProcessUsers(devices, &users);
  if (users.empty()) {
    // Mounts in other namespaces and O_EXCL openers show only as a refused exclusive open
    // (of the disk, which fails too while a partition is claimed).
    const std::string path = devices.front().path();
    UniqueFd probe(::open(path.c_str(), O_RDONLY | O_EXCL | O_CLOEXEC | O_NONBLOCK));
    if (!probe && errno == EBUSY) users.push_back("held exclusively (a mount or swap area elsewhere)");
  }
  return users;
}

Status Device::Disconnect() {
  if (interface_ == DeviceInterface::kNetlink) {
    MF_ASSIGN_OR_RETURN(Netlink netlink, Netlink::Open());
    return netlink.Disconnect(index_);
  }
  // Fails only when the kernel refuses the request (so NBD_DO_IT goes on): the thread and
  // its descriptor stay for another try.
  if (::ioctl(ioctl_fd_.get(), NBD_DISCONNECT) != 0) return SysError("NBD_DISCONNECT " + path_);
  do_it_.join();  // NBD_DO_IT returns once the device is down
  ioctl_fd_.Reset();
  return Status::Ok();
}

Status Device::Detach() {
  MutexLock detaching(detach_mu_);
  {
    MutexLock lock(mu_);
    if (!attached_) return Status::Ok();
    attached_ = false;
  }
  if (Status disconnected = Disconnect(); !disconnected.ok()) {
    // Still connected with live sockets, still served, and the monitor still replaces
    // dropped connections: a later Detach() (or the destructor's) tries again.
    MutexLock lock(mu_);
    attached_ = true;
    return disconnected.WithContext(path_ + " stays attached");
  }
  monitor_.reset();  // nothing left to replace
  // kBusy here leaves attached_ clear: the device is disconnected, and the kernel frees it
  // once its holders close it.
  MF_RETURN_IF_ERROR(WaitFree(index_, options_.detach_timeout));
  spdlog::info("nbd: {} detached", path_);
  return Status::Ok();
}

}  // namespace mf::nbd
