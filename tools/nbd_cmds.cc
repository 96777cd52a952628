// memfabric nbd / swap / mount --nbd: a remote region as an NBD export (for any NBD client)
// or as the kernel block device /dev/nbdX (nbd::Device), optionally swapped on.
#include "tools/nbd_cmds.h"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/swap.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>

#include "fabric/log.h"
#include "fabric/region.h"
#include "fabric/url.h"
#include "nbd/device.h"
#include "nbd/export.h"

namespace mf::cli {
namespace {

constexpr char kNbdCmd[] = "nbd";
constexpr char kSwapCmd[] = "swap";
constexpr char kMountCmd[] = "mount";
constexpr char kUnixPrefix[] = "unix:";
constexpr uint16_t kNbdPort = 10809;  // IANA's port for NBD
constexpr int kMaxSwapPriority = 32767;
// ReadyToDetach looks this many times, this far apart, before it calls a device busy.
constexpr int kBusyChecks = 5;
constexpr auto kBusyRecheck = std::chrono::milliseconds(200);

constexpr char kNbdFooter[] = R"(Examples:
  # export a region on a unix socket, read-only (no write lease)
  memfabric nbd tcp://10.0.0.5:7411/disk --listen unix:/run/mf-disk.sock
  nbdinfo 'nbd+unix:///disk?socket=/run/mf-disk.sock'
  # read-write on TCP, for qemu or the kernel's nbd-client on another host
  memfabric nbd tcp://10.0.0.5:7411/disk --writable --listen 0.0.0.0:10809
  qemu-system-x86_64 -drive file=nbd://this-host:10809/disk,format=raw ...
  nbd-client this-host 10809 /dev/nbd0 -N disk
  # on a local copy (pulled in the background, writes pushed every 2 s), progress each second
  memfabric nbd tcp://10.0.0.5:7411/disk --writable --listen 127.0.0.1:10809 --cache --push-interval 2s
The export is named after the region (also the default export, ""). Runs until SIGINT/SIGTERM.)";

constexpr char kSwapFooter[] = R"(Examples:
  # remote swap: attach the region as /dev/nbdX, mkswap and swapon it (as root)
  memfabric swap tcp://10.0.0.5:7411/swap
  # on a given device, with a priority above the local swap's
  memfabric swap tcp://10.0.0.5:7411/swap /dev/nbd3 --priority 10
  # a crashed memfabric left /dev/nbd3 connected: take it back
  memfabric swap tcp://10.0.0.5:7411/swap /dev/nbd3 --reclaim
Prints the device on stdout and stays in the foreground; SIGINT/SIGTERM swapoff (which
pages everything back in: it needs that much free memory) and detach. When swapoff fails
(too little free memory) the swap stays on and served until the next signal. The region's write
lease is taken, so no other client may write it meanwhile. Everything on it is overwritten.)";

struct NbdServeFlags {
  TargetFlags target;
  std::string listen;
  std::string name;
  bool writable = false;
  int connections = 4;
  CacheFlags cache;
};

struct SwapFlags {
  NbdAttachFlags attach;
  int priority = -1;  // -1: the kernel's default
};

// "/dev/nbd3", "nbd3" or "3" -> 3.
Result<int> ParseDevice(std::string_view text) {
  std::string_view digits = text;
  for (std::string_view prefix : {"/dev/nbd", "nbd"}) {
    if (digits.substr(0, prefix.size()) == prefix) {
      digits.remove_prefix(prefix.size());
      break;
    }
  }
  int index = -1;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
  if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() || index < 0) {
    return InvalidArgument("'" + std::string(text) + "' is not an NBD device: use /dev/nbdN, e.g. /dev/nbd0");
  }
  return index;
}

// A region opened for an NBD view.
struct Opened {
  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  std::unique_ptr<fabric::Remote> remote;  // with --cache, the MountRemote over the region
  fabric::MountRemote* cache = nullptr;    // with --cache: remote
};

// Exits on SIGINT/SIGTERM: detach, stop or close (with the cache's final sync) come after.
int WaitForStop(const sigset_t& stop, const Opened& opened) {
  return opened.cache ? WaitForStopShowingProgress(stop, *opened.cache) : TakeSignal(stop, kWaitForever);
}

int CloseRegion(std::string_view command, const Opened& opened) {
  if (opened.cache) return CloseCache(command, *opened.cache);
  if (Status closed = opened.remote->Close(); !closed.ok()) return Report(command, closed);
  return kExitOk;
}

int OpenRegion(std::string_view command, const TargetFlags& target, bool writable, int connections,
               const CacheFlags& cache, Opened* out) {
  if (int rc = StartClient(command, target.url, true, target.client, &out->url, &out->client);
      rc != kExitOk) {
    return rc;
  }
  fabric::OpenOptions open;
  open.writable = writable;
  open.connections = connections;
  auto remote = out->client->Open(out->url.region, open);
  if (!remote.ok())
    return Report(command, remote.status(), HintFor(remote.status(), out->url, target.client));
  out->remote = std::move(remote).value();
  return OpenCache(command, cache, fabric::kMountDefaultChunkSize, &out->remote, &out->cache);
}

std::string DeviceHint(const Status& status) {
  switch (status.code()) {
    case Code::kPermissionDenied: return "attaching an NBD device needs root";
    case Code::kUnsupported:
      return "load the NBD driver (modprobe nbd) or use `memfabric nbd` with a user-space client";
    case Code::kBusy:
      if (status.message().find("left behind") != std::string_view::npos)
        return "add --reclaim to take it back";
      return "name another device, or none to get a free one";
    default: return "";
  }
}

// Opens the region and attaches it. On success *device is attached.
int AttachRegion(std::string_view command, const NbdAttachFlags& flags, Opened* opened,
                 std::unique_ptr<nbd::Device>* device) {
  nbd::DeviceOptions options;
  if (!flags.device.empty()) {
    Result<int> index = ParseDevice(flags.device);
    if (!index.ok()) return Report(command, index.status());
    options.index = *index;
  }
  options.reclaim = flags.reclaim;
  options.connections = flags.connections;
  if (flags.reclaim && options.index < 0) {
    return Report(command, InvalidArgument("--reclaim needs the device to take back, e.g. /dev/nbd0"));
  }
  // Loaded first: without a driver there is no point in connecting.
  if (Status module = nbd::Device::EnsureModule(); !module.ok()) {
    return Report(command, module, DeviceHint(module));
  }
  if (int rc = OpenRegion(command, flags.target, flags.writable, flags.connections, flags.cache, opened);
      rc != kExitOk) {
    return rc;
  }
  auto attached = nbd::Device::Attach(*opened->remote, options);
  if (!attached.ok()) return Report(command, attached.status(), DeviceHint(attached.status()));
  *device = std::move(attached).value();
  return kExitOk;
}

void PrintDevice(const nbd::Device& device, const Opened& opened, bool read_only) {
  std::printf("%s\n", device.path().c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "%s: region '%s' (%s, %s%s) via %s; Ctrl-C or SIGTERM detaches\n",
               device.path().c_str(), opened.remote->info().name.c_str(),
               fabric::FormatSize(device.size()).c_str(), read_only ? "read-only" : "read-write",
               read_only ? ": add --writable to write" : "", std::string(opened.remote->transport()).c_str());
}

// ---- nbd ----------------------------------------------------------------------------------

int RunNbdServe(const NbdServeFlags& flags) {
  const sigset_t stop = BlockStopSignals();  // before any thread exists
  Opened opened;
  if (int rc = OpenRegion(kNbdCmd, flags.target, flags.writable, flags.connections, flags.cache, &opened);
      rc != kExitOk) {
    return rc;
  }
  nbd::Export exporter;
  const std::string name = flags.name.empty() ? opened.remote->info().name : flags.name;
  if (Status added = exporter.Add({name, "memfabric region " + opened.url.ToString(), opened.remote.get()});
      !added.ok()) {
    return Report(kNbdCmd, added);
  }
  std::string where;
  if (flags.listen.rfind(kUnixPrefix, 0) == 0) {
    const std::string path = flags.listen.substr(sizeof(kUnixPrefix) - 1);
    if (Status listening = exporter.ListenUnix(path); !listening.ok()) {
      return Report(kNbdCmd, listening,
                    listening.code() == Code::kAlreadyExists ? "remove the stale socket file " + path : "");
    }
    where = "nbd+unix:///" + name + "?socket=" + path;
  } else {
    std::string host;
    uint16_t port = kNbdPort;
    if (Status parsed = fabric::ParseHostPort(flags.listen, &host, &port); !parsed.ok()) {
      return Report(kNbdCmd, parsed.WithContext("--listen"),
                    "use unix:PATH or HOST:PORT, e.g. 127.0.0.1:10809");
    }
    auto bound = exporter.ListenTcp(host, port);
    if (!bound.ok()) return Report(kNbdCmd, bound.status().WithContext("--listen " + flags.listen));
    where = "nbd://" + (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
            std::to_string(*bound) + "/" + name;
  }
  spdlog::info("serving '{}' ({}, {}) at {}", name, fabric::FormatSize(opened.remote->size()),
               opened.remote->writable() ? "read-write" : "read-only", where);
  const int received = WaitForStop(stop, opened);
  spdlog::info("{}: stopping", SignalName(received));
  exporter.Stop();
  const nbd::ExportStats s = exporter.stats();
  spdlog::info("served {} connections, {} requests ({} failed)", s.connections_accepted, s.requests,
               s.request_errors);
  return CloseRegion(kNbdCmd, opened);
}

// Before a detach on SIGINT/SIGTERM: true when nothing holds the device. Otherwise says who
// does, and the caller keeps it attached until the next signal: disconnecting a mounted
// device loses the file system's unwritten data. A holder seen only for a moment (udev
// probing the device after a umount) is waited out. When the holders cannot be listed the
// first signal only says so (*unsure is set) and the next one detaches.
bool ReadyToDetach(std::string_view command, const nbd::Device& device, bool* unsure) {
  Result<std::vector<std::string>> users = device.Users();
  for (int check = 1; users.ok() && !users->empty() && check < kBusyChecks; ++check) {
    std::this_thread::sleep_for(kBusyRecheck);
    users = device.Users();
  }
  if (!users.ok()) {
    if (*unsure) return true;
    *unsure = true;
    std::fprintf(stderr,
                 "%.*s: not detaching %s: cannot tell whether it is in use (%s). It stays attached and "
                 "served; send SIGINT or SIGTERM again to detach it anyway.\n",
                 static_cast<int>(command.size()), command.data(), device.path().c_str(),
                 users.status().ToString().c_str());
    return false;
  }
  if (users->empty()) return true;
  std::string list;
  for (const std::string& user : *users) list += (list.empty() ? "" : ", ") + user;
  std::fprintf(stderr,
               "%.*s: not detaching %s: it is in use (%s). It stays attached and served; unmount it or "
               "close the programs using it, then send SIGINT or SIGTERM again.\n",
               static_cast<int>(command.size()), command.data(), device.path().c_str(), list.c_str());
  return false;
}

// ---- swap ---------------------------------------------------------------------------------

// The swap device's memory must never need swap itself: lock this process's pages, and mark
// it as part of the I/O path so that its allocations do not recurse into reclaim I/O.
void GuardAgainstSwapDeadlock() {
  if (::mlockall(MCL_CURRENT | MCL_FUTURE) != 0) {
    spdlog::warn("mlockall failed ({}): this process's own pages may be swapped to the device",
                 std::strerror(errno));
  }
  if (::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) {
    spdlog::info("PR_SET_IO_FLUSHER failed ({}): under memory pressure the device may stall",
                 std::strerror(errno));
  }
}

int RunSwap(const SwapFlags& flags) {
  const sigset_t stop = BlockStopSignals();  // before any thread exists
  if (Status logging = InitLogging(flags.attach.target.client.log_level); !logging.ok()) {
    return Report(kSwapCmd, logging);
  }
  GuardAgainstSwapDeadlock();
  NbdAttachFlags attach = flags.attach;
  attach.writable = true;  // swap writes
  Opened opened;
  std::unique_ptr<nbd::Device> device;
  if (int rc = AttachRegion(kSwapCmd, attach, &opened, &device); rc != kExitOk) return rc;
  const std::string& path = device->path();
  // Connecting and attaching can take a while: Ctrl-C meanwhile (a wrong URL?) must not
  // let mkswap overwrite the region.
  if (const int early = TakeSignal(stop, kNoWait); early != 0) {
    std::fprintf(stderr, "%s before swapon: detaching %s; the region was not written\n",
                 SignalName(early).c_str(), path.c_str());
    if (Status detached = device->Detach(); !detached.ok()) return Report(kSwapCmd, detached);
    const int closed = CloseRegion(kSwapCmd, opened);
    return closed != kExitOk ? closed : kExitInterrupted + early;
  }
  if (Status made = RunProgram({"mkswap", path}, true); !made.ok()) {
    return Report(kSwapCmd, made.WithContext("mkswap " + path), "is mkswap (util-linux) installed?");
  }
  int swap_flags = 0;
  if (flags.priority >= 0) {
    swap_flags = SWAP_FLAG_PREFER | ((flags.priority << SWAP_FLAG_PRIO_SHIFT) & SWAP_FLAG_PRIO_MASK);
  }
  if (::swapon(path.c_str(), swap_flags) != 0) {
    return Report(kSwapCmd, Status::FromErrno(errno, "swapon " + path));
  }
  PrintDevice(*device, opened, false);
  std::fprintf(stderr, "swapping on %s (priority %s)\n", path.c_str(),
               flags.priority >= 0 ? std::to_string(flags.priority).c_str() : "default");
  bool unsure = false;  // ReadyToDetach could not list the holders once
  for (;;) {
    const int received = TakeSignal(stop, kWaitForever);
    std::fprintf(stderr, "%s: swapoff %s (pages swapped out come back into memory first)\n",
                 SignalName(received).c_str(), path.c_str());
    // EINVAL: no longer a swap area (someone ran swapoff already).
    if (::swapoff(path.c_str()) != 0 && errno != EINVAL) {
      // Detaching now would lose the pages still on it: keep serving them.
      const Status failed = Status::FromErrno(errno, "swapoff " + path);
      std::fprintf(stderr,
                   "swap: %s. %s stays attached, swapped on and served; free memory, then send SIGINT or "
                   "SIGTERM again.\n",
                   failed.ToString().c_str(), path.c_str());
      continue;
    }
    if (ReadyToDetach(kSwapCmd, *device, &unsure)) break;
  }
  if (Status detached = device->Detach(); !detached.ok()) return Report(kSwapCmd, detached);
  std::fprintf(stderr, "%s detached\n", path.c_str());
  return CloseRegion(kSwapCmd, opened);
}

}  // namespace

// ---- mount --nbd --------------------------------------------------------------------------

int RunNbdMount(const NbdAttachFlags& flags) {
  const sigset_t stop = BlockStopSignals();  // before any thread exists
  if (Status logging = InitLogging(flags.target.client.log_level); !logging.ok()) {
    return Report(kMountCmd, logging);
  }
  Opened opened;
  std::unique_ptr<nbd::Device> device;
  if (int rc = AttachRegion(kMountCmd, flags, &opened, &device); rc != kExitOk) return rc;
  PrintDevice(*device, opened, !opened.remote->writable());
  bool unsure = false;  // ReadyToDetach could not list the holders once
  for (;;) {
    const int received = WaitForStop(stop, opened);
    if (!ReadyToDetach(kMountCmd, *device, &unsure)) continue;
    std::fprintf(stderr, "%s: detaching %s\n", SignalName(received).c_str(), device->path().c_str());
    break;
  }
  if (Status detached = device->Detach(); !detached.ok()) {
    return Report(kMountCmd, detached,
                  detached.code() == Code::kBusy
                      ? "unmount it (umount) or close the programs using it, then it is free"
                      : "");
  }
  return CloseRegion(kMountCmd, opened);
}

void AddNbdCommands(CLI::App& app, std::vector<Command>& commands) {
  {
    auto flags = std::make_shared<NbdServeFlags>();
    flags->target.client.log_level = "info";  // connections are logged
    CLI::App* sub =
        app.add_subcommand(kNbdCmd, "Serve a region over the NBD protocol (until SIGINT/SIGTERM)");
    sub->footer(kNbdFooter);
    sub->add_option("URL", flags->target.url, "The region: SCHEME://HOST[:PORT]/NAME")->required();
    sub->add_option("--listen", flags->listen,
                    "unix:PATH, or HOST:PORT (default port 10809; 0: any free port)")
        ->required();
    sub->add_option("--name", flags->name, "Export name (default: the region's name)");
    sub->add_flag("--writable", flags->writable,
                  "Take the region's write lease; without it the export is read-only");
    sub->add_option("--connections", flags->connections, "Data connections to the server")
        ->check(CLI::Range(1, 64))
        ->capture_default_str();
    AddCacheFlags(*sub, flags->cache);
    AddClientFlags(*sub, flags->target.client);
    commands.push_back({sub, [flags] { return RunNbdServe(*flags); }});
  }
  {
    auto flags = std::make_shared<SwapFlags>();
    CLI::App* sub =
        app.add_subcommand(kSwapCmd, "Swap on a region: attach /dev/nbdX, mkswap, swapon (as root)");
    sub->footer(kSwapFooter);
    sub->add_option("URL", flags->attach.target.url, "The region: SCHEME://HOST[:PORT]/NAME")->required();
    sub->add_option("DEVICE", flags->attach.device, "The NBD device, e.g. /dev/nbd0 (default: any free one)");
    sub->add_option("--priority", flags->priority, "Swap priority, 0 to 32767 (default: the kernel's)")
        ->check(CLI::Range(0, kMaxSwapPriority));
    sub->add_flag("--reclaim", flags->attach.reclaim,
                  "Take DEVICE back when a crashed memfabric left it connected");
    sub->add_option("--connections", flags->attach.connections, "Connections to the server and to the kernel")
        ->check(CLI::Range(1, nbd::kMaxDeviceConnections))
        ->capture_default_str();
    AddClientFlags(*sub, flags->attach.target.client);
    commands.push_back({sub, [flags] { return RunSwap(*flags); }});
  }
}

}  // namespace mf::cli
