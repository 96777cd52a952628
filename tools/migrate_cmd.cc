// memfabric migrate recv / send: moves a region's write lease from one host to another with
// fabric::Leecher (destination, `recv`) and fabric::Seeder (source, `send`); see
// docs/migration.md. The two processes talk over one TCP connection, the migration channel,
// which fabric::AuthenticateChannel authenticates with the shared secret before anything
// else; it is not encrypted.
//
// Either side may serve its Mount as an NBD export through MountExport (below): the source
// during the pre-copy, so that a workload keeps writing (the writes are tracked, and
// drained and held at the suspend), the destination once it holds the lease.
//
// Thread-safety: the commands run on the main thread; Leecher::Run / Seeder::Finalize run
// on one worker thread each, and the NBD export on its own threads.
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "fabric/auth.h"
#include "fabric/log.h"
#include "fabric/migration.h"
#include "fabric/os.h"
#include "fabric/region.h"
#include "fabric/thread_annotations.h"
#include "fabric/url.h"
#include "nbd/export.h"
#include "tools/cli_common.h"
#include "transports/tcp/stream.h"

namespace mf::cli {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr char kMigrateCmd[] = "migrate";
constexpr char kRecvCmd[] = "migrate recv";
constexpr char kSendCmd[] = "migrate send";
constexpr char kUnixPrefix[] = "unix:";
constexpr uint16_t kDefaultChannelPort = 7412;  // next to the server's 7411
constexpr uint16_t kNbdPort = 10809;
constexpr int kListenBacklog = 4;
constexpr milliseconds kTick{100};  // how often signals and the channel are looked at
constexpr milliseconds kProgressEvery{1000};
constexpr milliseconds kAuthTimeout{10000};
constexpr milliseconds kConnectTimeout{10000};
constexpr milliseconds kSourcePushInterval{1000};  // less to push at the suspend
constexpr size_t kExportMaxTransfer = 4u << 20;
static_assert(kProgressEvery >= kTick && kExportMaxTransfer % kPageSize == 0);

constexpr char kMigrateFooter[] =
    R"(Moves a region's write lease (its writer) from this host to another with a short
downtime: `migrate recv` on the destination, then `migrate send` on the source.
Run `memfabric migrate recv --help` and `memfabric migrate send --help` for examples.)";

constexpr char kRecvFooter[] = R"(Examples:
  export MEMFABRIC_SECRET=...     # the server's secret; it also authenticates the channel
  # destination: wait for the source on port 7412, then serve the region over NBD
  memfabric migrate recv tcp://10.0.0.5:7411/disk --listen 0.0.0.0:7412 --nbd-listen unix:/run/disk.sock
  # destination: take the region over, sync, release the lease and exit
  memfabric migrate recv tcp://10.0.0.5:7411/disk --listen 0.0.0.0:7412
Opens the region read-only, waits for `migrate send` on --listen, pulls the whole region
(progress every second on stderr) and takes the write lease at the source's finalize.
A connection that fails the challenge-response is refused and the wait goes on.
The migration channel is authenticated (HMAC-SHA256 challenge-response with the secret)
but NOT encrypted: region contents do not cross it, but use it on a trusted network
(TLS for the channel is future work). --insecure: no secret; loopback only.
Exit: 0 migrated (and, with --nbd-listen, served until SIGINT/SIGTERM), 1 aborted or
failed (the source keeps the region), 2 usage.)";

constexpr char kSendFooter[] = R"(Examples:
  # source: the region's writer is this process; a workload writes through NBD
  memfabric migrate send tcp://10.0.0.5:7411/disk --to 10.0.0.7:7412 --nbd-listen unix:/run/disk.sock
  # stop and resume an outside workload at the switch-over, finalize after 30 s
  memfabric migrate send tcp://10.0.0.5:7411/disk --to dest:7412 --finalize-after 30 \
      --suspend-cmd 'systemctl stop app' --resume-cmd 'systemctl start app'
  # finalize on demand
  memfabric migrate send URL --to dest:7412 --finalize-on-signal &  ...  kill -USR1 $!
Takes the write lease, connects to `migrate recv`, and finalizes when the destination has
pulled the whole region (or later, as asked): suspend (--suspend-cmd, then the NBD
export drains and holds its requests), push, hand the lease over. Prints the downtime and
its parts. On an abort the source resumes (NBD export reopened, --resume-cmd run), keeps
the lease, syncs everything to the server and exits 1: nothing is lost.
The migration channel is authenticated but NOT encrypted (TLS for it is future work).
--insecure: no secret; loopback only. Exit: 0 migrated, 1 aborted or failed, 2 usage.)";

struct MigrateFlags {
  TargetFlags target;
  std::string chunk = "64K";
  std::string channel_secret_file;
  std::string nbd_listen;
  int connections = 4;
};

struct RecvFlags {
  MigrateFlags common;
  std::string listen;
  std::string port_file;
  std::string cache_file;
};

struct SendFlags {
  MigrateFlags common;
  std::string to;
  std::string suspend_cmd;
  std::string resume_cmd;
  double finalize_after = -1;  // seconds; < 0: when the destination is ready
  bool finalize_on_signal = false;
};

// ---- MountExport ----------------------------------------------------------------------------

// A Remote over a Mount for nbd::Export, with a gate: Pause() holds every new request and
// waits for those running, Resume() lets them go on, Shut() fails them (kAborted). Requests
// run inline on the submitting thread (Mount::Read/Write; a read may wait for a pull).
// Thread-safety: any thread; the Mount must outlive it (or Shut() was called).
class MountExport final : public fabric::Remote {
 public:
  MountExport(fabric::Mount& mount, fabric::RegionInfo info) : mount_(mount), info_(std::move(info)) {}

  const fabric::RegionInfo& info() const override { return info_; }
  bool writable() const override { return !mount_.read_only(); }
  std::string_view transport() const override { return "mount"; }
  size_t max_transfer() const override { return kExportMaxTransfer; }
  Result<fabric::Buffer> AllocateBuffer(size_t size) override {
    MF_ASSIGN_OR_RETURN(MappedMemory memory, MappedMemory::Anonymous(size));
    return fabric::Buffer(std::move(memory), nullptr);
  }
  void Submit(std::span<const fabric::IoRequest> requests) override {
    for (const fabric::IoRequest& r : requests) {
      Status status = fabric::ValidateRequest(r, *this);
      if (status.ok()) status = Enter();
      if (status.ok()) {
        status =
            r.kind == fabric::IoKind::kRead ? mount_.Read(r.offset, r.data) : mount_.Write(r.offset, r.data);
        Leave();
      }
      r.callback->OnIoComplete(r.cookie, status);
    }
  }
  Status Flush() override {
    MF_RETURN_IF_ERROR(Enter());
    Status synced = mount_.Sync();
    Leave();
    return synced;
  }
  Status Close() override {
    Shut();
    return Status::Ok();
  }

  void Pause() MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    if (state_ == State::kOpen) state_ = State::kPaused;
    cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return active_ == 0; });
  }
  void Resume() MF_EXCLUDES(mu_) { Set(State::kOpen); }
  void Shut() MF_EXCLUDES(mu_) { Set(State::kShut); }

 private:
  enum class State { kOpen, kPaused, kShut };
  Status Enter() MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return state_ != State::kPaused; });
    if (state_ == State::kShut) return Status(Code::kAborted, "the region has moved: this export is closed");
    ++active_;
    return Status::Ok();
  }
  void Leave() MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    --active_;
    cv_.notify_all();
  }
  void Set(State state) MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    state_ = state;
    cv_.notify_all();
  }

  fabric::Mount& mount_;
  const fabric::RegionInfo info_;
  Mutex mu_;
  std::condition_variable_any cv_;  // state_ or active_ changed
  State state_ MF_GUARDED_BY(mu_) = State::kOpen;
  int active_ MF_GUARDED_BY(mu_) = 0;
};

// Serves `remote` as export `name` on --nbd-listen (unix:PATH or HOST:PORT); returns the
// NBD URI, or reports the error and returns its exit code in *rc.
std::string ListenNbd(std::string_view command, nbd::Export& exporter, fabric::Remote& remote,
                      const std::string& name, const std::string& listen, int* rc) {
  *rc = kExitOk;
  if (Status added = exporter.Add({name, "memfabric region " + name + " (migrating)", &remote});
      !added.ok()) {
    *rc = Report(command, added);
    return "";
  }
  if (listen.rfind(kUnixPrefix, 0) == 0) {
    const std::string path = listen.substr(sizeof(kUnixPrefix) - 1);
    if (Status listening = exporter.ListenUnix(path); !listening.ok()) {
      *rc = Report(command, listening.WithContext("--nbd-listen"),
                   listening.code() == Code::kAlreadyExists ? "remove the stale socket file " + path : "");
      return "";
    }
    return "nbd+unix:///" + name + "?socket=" + path;
  }
  std::string host;
  uint16_t port = kNbdPort;
  if (Status parsed = fabric::ParseHostPort(listen, &host, &port); !parsed.ok()) {
    *rc = Report(command, InvalidArgument("--nbd-listen: " + std::string(parsed.message())),
                 "use unix:PATH or HOST:PORT, e.g. 127.0.0.1:10809");
    return "";
  }
  auto bound = exporter.ListenTcp(host, port);
  if (!bound.ok()) {
    *rc = Report(command, bound.status().WithContext("--nbd-listen " + listen));
    return "";
  }
  return "nbd://" + (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" +
         std::to_string(*bound) + "/" + name;
}

// ---- Shared helpers ------------------------------------------------------------------------

double Seconds(Clock::duration d) {
  return std::chrono::duration<double>(d).count();
}
double Millis(uint64_t ns) {
  return static_cast<double>(ns) / 1e6;
}
double Percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? 0.0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

// The channel's secret: --channel-secret-file, else the server's (--secret-file,
// $MEMFABRIC_SECRET); none with --insecure and no --channel-secret-file, which the
// channel's own address must then be loopback for.
Result<std::optional<fabric::Secret>> ChannelSecret(const MigrateFlags& flags,
                                                    const std::string& channel_host,
                                                    std::string_view channel_flag) {
  if (!flags.channel_secret_file.empty()) {
    auto secret = fabric::LoadSecret(flags.channel_secret_file);
    if (!secret.ok())
      return InvalidArgument("--channel-secret-file: " + std::string(secret.status().message()));
    return std::optional<fabric::Secret>(std::move(secret).value());
  }
  if (flags.target.client.insecure) {
    if (!tcp::IsLoopbackHost(channel_host)) {
      return InvalidArgument(
          "--insecure leaves the migration channel unauthenticated, which is allowed on a "
          "loopback address only, not on '" +
          channel_host + "' (" + std::string(channel_flag) +
          "): give both sides a secret (--channel-secret-file)");
    }
    return std::optional<fabric::Secret>();
  }
  auto secret = fabric::LoadSecret(flags.target.client.secret_file);
  if (!secret.ok()) {
    if (secret.status().code() == Code::kNotFound) {
      return InvalidArgument(
          "no secret: set MEMFABRIC_SECRET or pass --secret-file PATH (it authenticates the "
          "server and the migration channel); or --insecure on loopback");
    }
    return InvalidArgument(std::string(secret.status().message()));
  }
  return std::optional<fabric::Secret>(std::move(secret).value());
}

Result<uint64_t> ParseChunk(const std::string& text) {
  MF_ASSIGN_OR_RETURN(const uint64_t chunk, ParseByteCount("--chunk", text));
  if (!IsPowerOfTwo(chunk) || chunk < fabric::kMountMinChunkSize || chunk > fabric::kMountMaxChunkSize) {
    return InvalidArgument("bad --chunk '" + text + "': a power of two from 4K to 2M");
  }
  return chunk;
}

std::string Address(const std::string& host, uint16_t port) {
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

// ---- recv -----------------------------------------------------------------------------------

// Waits for a source on listen_fd and authenticates it (when `secret` is set). Connections
// that fail are logged and the wait goes on. Returns the channel, or kAborted on a stop
// signal.
Result<UniqueFd> AcceptSource(int listen_fd, const std::optional<fabric::Secret>& secret,
                              const sigset_t& stop, std::string* peer) {
  for (;;) {
    if (const int sig = TakeSignal(stop, kNoWait); sig != 0) {
      return Status(Code::kAborted, SignalName(sig) + " before a source connected");
    }
    pollfd p{listen_fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(kTick.count())) <= 0) continue;
    UniqueFd fd(::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) continue;
    *peer = tcp::PeerName(fd.get());
    if (!secret.has_value()) return fd;
    auto authenticated = fabric::AuthenticateChannel(std::move(fd), *secret,
                                                     fabric::MigrationSide::kDestination, kAuthTimeout);
    if (authenticated.ok()) return authenticated;
    std::fprintf(stderr, "memfabric %s: refused a connection from %s: %s; still waiting\n", kRecvCmd,
                 peer->c_str(), std::string(authenticated.status().message()).c_str());
  }
}

int RunRecv(const RecvFlags& flags) {
  const sigset_t stop = BlockStopSignals();  // before any thread exists
  const MigrateFlags& common = flags.common;
  auto chunk = ParseChunk(common.chunk);
  if (!chunk.ok()) return Report(kRecvCmd, chunk.status());
  std::string host;
  uint16_t port = kDefaultChannelPort;
  if (Status parsed = fabric::ParseHostPort(flags.listen, &host, &port); !parsed.ok()) {
    return Report(kRecvCmd, InvalidArgument("--listen: " + std::string(parsed.message())),
                  "use HOST:PORT, e.g. 0.0.0.0:7412 (the source's --to names it)");
  }
  auto secret = ChannelSecret(common, host, "--listen");
  if (!secret.ok()) return Report(kRecvCmd, secret.status());

  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient(kRecvCmd, common.target.url, true, common.target.client, &url, &client);
      rc != kExitOk) {
    return rc;
  }
  fabric::OpenOptions open;
  open.connections = common.connections;
  auto read_only = client->Open(url.region, open);
  if (!read_only.ok())
    return Report(kRecvCmd, read_only.status(), HintFor(read_only.status(), url, common.target.client));
  const fabric::RegionInfo info = (*read_only)->info();

  auto listening = tcp::ListenTcp(host, port, kListenBacklog);
  if (!listening.ok()) {
    return Report(kRecvCmd, listening.status().WithContext("--listen " + flags.listen),
                  "pick a free port, or 0 for any (see --port-file)");
  }
  UniqueFd listen_fd = std::move(listening).value();
  auto bound = tcp::LocalPort(listen_fd.get());
  if (!bound.ok()) return Report(kRecvCmd, bound.status());
  if (!flags.port_file.empty()) {
    if (Status written = WritePortFile(flags.port_file, *bound); !written.ok())
      return Report(kRecvCmd, written);
  }
  std::fprintf(stderr, "waiting for the source of '%s' (%s) on %s (channel %s)\n", info.name.c_str(),
               fabric::FormatSize(info.size).c_str(), Address(host, *bound).c_str(),
               secret->has_value() ? "authenticated, not encrypted" : "NOT authenticated: --insecure");

  std::string peer;
  auto channel = AcceptSource(listen_fd.get(), *secret, stop, &peer);
  listen_fd.Reset();
  if (!channel.ok()) return Report(kRecvCmd, channel.status(), "nothing was migrated");
  UniqueFd watch(::dup(channel->get()));  // to interrupt the Leecher: shutdown() reaches its socket

  fabric::LeecherOptions options;
  options.mount.chunk_size = *chunk;
  options.mount.path = flags.cache_file;
  options.open_writable = [&]() -> Result<std::unique_ptr<fabric::Remote>> {
    fabric::OpenOptions writable = open;
    writable.writable = true;
    return client->Open(url.region, writable);
  };
  const auto start = Clock::now();
  auto started = fabric::Leecher::Start(std::move(read_only).value(), std::move(channel).value(), options);
  if (!started.ok()) {
    Report(kRecvCmd, started.status().WithContext("migration from " + peer + " aborted"),
           "the source keeps the region and goes on; check that both sides name the same region");
    return kExitRuntime;
  }
  std::unique_ptr<fabric::Leecher> leecher = std::move(started).value();
  std::fprintf(stderr, "source %s connected: pulling '%s' in chunks of %s\n", peer.c_str(), info.name.c_str(),
               fabric::FormatSize(*chunk).c_str());

  std::atomic<bool> finished{false};
  Status ran;
  std::thread runner([&] {
    ran = leecher->Run();
    finished.store(true);
  });
  bool precopy_reported = false;
  auto report_precopy = [&](const fabric::MountStats& s) {
    precopy_reported = true;
    std::fprintf(stderr, "pre-copy complete: %s in %.2f s (%.1f MB/s)\n",
                 fabric::FormatSize(s.bytes_pulled).c_str(), Seconds(Clock::now() - start),
                 s.pull_bytes_per_second / 1e6);
  };
  auto next_progress = Clock::now() + kProgressEvery;
  bool interrupted = false;
  while (!finished.load()) {
    if (const int sig = TakeSignal(stop, kTick); sig != 0) {
      std::fprintf(stderr, "%s: aborting the migration; the source keeps the region\n",
                   SignalName(sig).c_str());
      ::shutdown(watch.get(), SHUT_RDWR);
      interrupted = true;
    }
    if (finished.load() || precopy_reported) continue;
    const fabric::MountStats s = leecher->mount().stats();
    if (s.local_chunks == s.chunks) {
      report_precopy(s);
      std::fprintf(stderr, "waiting for the source's finalize\n");
    } else if (Clock::now() >= next_progress) {
      next_progress += kProgressEvery;
      std::fprintf(stderr, "pulled %s / %s (%.0f%%), %.1f MB/s\n", fabric::FormatSize(s.bytes_local).c_str(),
                   fabric::FormatSize(s.size).c_str(), Percent(s.bytes_local, s.size),
                   s.pull_bytes_per_second / 1e6);
    }
  }
  runner.join();
  if (ran.ok() && !precopy_reported) report_precopy(leecher->mount().stats());  // finished within a tick
  if (!ran.ok()) {
    Report(kRecvCmd, ran.WithContext("migration aborted"),
           "the source keeps the write lease and goes on; nothing is lost");
    return kExitRuntime;
  }
  const fabric::LeecherStats ls = leecher->stats();
  const fabric::MountStats ms = leecher->mount().stats();
  std::fprintf(
      stderr,
      "migrated '%s' (%s) from %s in %.2f s: pulled %s; downtime here: lease %.3f ms, re-pull %.3f ms "
      "(%llu dirty chunks, %s); this side holds the write lease\n",
      info.name.c_str(), fabric::FormatSize(info.size).c_str(), peer.c_str(), Seconds(Clock::now() - start),
      fabric::FormatSize(ms.bytes_pulled).c_str(), Millis(ls.lease_ns), Millis(ls.repull_ns),
      static_cast<unsigned long long>(ls.dirty_chunks), fabric::FormatSize(ls.repull_bytes).c_str());
  auto takeover = leecher->TakeOver();
  if (!takeover.ok()) return Report(kRecvCmd, takeover.status());

  if (interrupted) {
    std::fprintf(stderr, "interrupted after this side took the lease: syncing and releasing it\n");
  } else if (!common.nbd_listen.empty()) {
    MountExport exported(*takeover->mount, takeover->remote->info());
    nbd::Export exporter;
    int rc = kExitOk;
    const std::string where = ListenNbd(kRecvCmd, exporter, exported, info.name, common.nbd_listen, &rc);
    if (rc == kExitOk) {
      std::fprintf(stderr,
                   "serving '%s' read-write at %s; SIGINT/SIGTERM stops, syncs and releases the lease\n",
                   info.name.c_str(), where.c_str());
      int sig = 0;
      while (sig != SIGINT && sig != SIGTERM) sig = TakeSignal(stop, kProgressEvery);
      std::fprintf(stderr, "%s: stopping the NBD export\n", SignalName(sig).c_str());
    }
    exported.Shut();
    exporter.Stop();
    if (rc != kExitOk) {
      (void)takeover->mount->Close();  // syncs what was written
      (void)takeover->remote->Close();
      return rc;
    }
  }
  Status closed = takeover->mount->Close();  // the final sync
  Status released = takeover->remote->Close();
  if (!closed.ok()) return Report(kRecvCmd, closed.WithContext("syncing the region"));
  if (!released.ok()) return Report(kRecvCmd, released.WithContext("closing the region"));
  std::printf("migrated '%s' (%s) from %s; synced to the server; write lease released\n", info.name.c_str(),
              fabric::FormatSize(info.size).c_str(), peer.c_str());
  return kExitOk;
}

// ---- send -----------------------------------------------------------------------------------

Status RunHook(const std::string& what, const std::string& command) {
  if (command.empty()) return Status::Ok();
  Status ran = RunProgram({"/bin/sh", "-c", command});
  return ran.ok() ? ran : ran.WithContext(what + " '" + command + "'");
}

void PrintStats(const fabric::MigrationStats& s, const fabric::RegionInfo& info, const std::string& to) {
  std::fprintf(stderr,
               "migrated '%s' (%s) to %s\n"
               "  pre-copy   %.3f s, destination pulled %s\n"
               "  downtime   %.3f ms = suspend %.3f + push %.3f + hand-over %.3f + lease %.3f + re-pull %.3f "
               "(+ channel latency)\n"
               "  dirty      %llu chunks (%s) written during pre-copy, %s re-pulled\n",
               info.name.c_str(), fabric::FormatSize(info.size).c_str(), to.c_str(),
               Millis(s.precopy_ns) / 1e3, fabric::FormatSize(s.precopy_bytes).c_str(), Millis(s.downtime_ns),
               Millis(s.suspend_ns), Millis(s.push_ns), Millis(s.handover_ns), Millis(s.lease_ns),
               Millis(s.repull_ns), static_cast<unsigned long long>(s.dirty_chunks),
               fabric::FormatSize(s.dirty_bytes).c_str(), fabric::FormatSize(s.repull_bytes).c_str());
  std::printf("migrated '%s' to %s: downtime %.3f ms, %llu dirty chunks\n", info.name.c_str(), to.c_str(),
              Millis(s.downtime_ns), static_cast<unsigned long long>(s.dirty_chunks));
}

// The end of an aborted migration on the source: it holds the lease; stop the export and
// sync everything to the server.
int EndAborted(const Status& why, fabric::MountSource& source, MountExport* exported, nbd::Export* exporter) {
  if (exported != nullptr) exported->Shut();
  if (exporter != nullptr) exporter->Stop();
  Status synced = source.mount().Sync();
  // The Seeder's errors say "migration aborted" already.
  const bool said = why.message().find("migration aborted") != std::string_view::npos;
  Report(kSendCmd, said ? why : why.WithContext("migration aborted"),
         synced.ok()
             ? "the source went on (resumed if it was suspended) and holds the write lease; every write "
               "is on the server: nothing is lost"
             : "the source went on and holds the write lease, but the final sync failed: " +
                   std::string(synced.message()));
  return kExitRuntime;
}

int RunSend(const SendFlags& flags) {
  sigset_t stop = BlockStopSignals();  // before any thread exists
  sigaddset(&stop, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  const MigrateFlags& common = flags.common;
  auto chunk = ParseChunk(common.chunk);
  if (!chunk.ok()) return Report(kSendCmd, chunk.status());
  std::string host;
  uint16_t port = kDefaultChannelPort;
  if (Status parsed = fabric::ParseHostPort(flags.to, &host, &port); !parsed.ok()) {
    return Report(kSendCmd, InvalidArgument("--to: " + std::string(parsed.message())),
                  "use HOST:PORT, the destination's `migrate recv --listen`");
  }
  if (port == 0)
    return Report(kSendCmd, InvalidArgument("--to " + flags.to + ": port 0"), "name the destination's port");
  auto secret = ChannelSecret(common, host, "--to");
  if (!secret.ok()) return Report(kSendCmd, secret.status());

  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient(kSendCmd, common.target.url, true, common.target.client, &url, &client);
      rc != kExitOk) {
    return rc;
  }
  fabric::OpenOptions open;
  open.connections = common.connections;
  open.writable = true;
  auto writable = client->Open(url.region, open);
  if (!writable.ok()) {
    return Report(kSendCmd, writable.status(),
                  writable.status().code() == Code::kBusy
                      ? "the source must be the region's writer: stop the client holding the write lease "
                        "and let its workload write through --nbd-listen"
                      : HintFor(writable.status(), url, common.target.client));
  }
  const fabric::RegionInfo info = (*writable)->info();
  fabric::MountOptions mount_options;
  mount_options.chunk_size = *chunk;
  mount_options.push_interval = kSourcePushInterval;
  auto created = fabric::MountSource::Create(std::move(writable).value(), mount_options,
                                             [&]() { return client->Open(url.region, open); });
  if (!created.ok()) return Report(kSendCmd, created.status());
  std::unique_ptr<fabric::MountSource> source = std::move(created).value();

  std::unique_ptr<MountExport> exported;
  nbd::Export exporter;
  if (!common.nbd_listen.empty()) {
    exported = std::make_unique<MountExport>(source->mount(), info);
    int rc = kExitOk;
    const std::string where = ListenNbd(kSendCmd, exporter, *exported, info.name, common.nbd_listen, &rc);
    if (rc != kExitOk) return rc;
    std::fprintf(stderr, "serving '%s' read-write at %s until the switch-over\n", info.name.c_str(),
                 where.c_str());
  }

  auto connected = tcp::ConnectTcp(host, port, Clock::now() + kConnectTimeout);
  if (!connected.ok()) {
    return EndAborted(connected.status().WithContext("connecting to the destination " + flags.to), *source,
                      exported.get(), &exporter);
  }
  UniqueFd fd = std::move(connected).value();
  if (secret->has_value()) {
    auto authenticated =
        fabric::AuthenticateChannel(std::move(fd), **secret, fabric::MigrationSide::kSource, kAuthTimeout);
    if (!authenticated.ok()) {
      return EndAborted(authenticated.status().WithContext("authenticating the channel to " + flags.to),
                        *source, exported.get(), &exporter);
    }
    fd = std::move(authenticated).value();
  }
  UniqueFd watch(::dup(fd.get()));  // to interrupt the Seeder, and to see the destination go

  fabric::SeederOptions options;
  options.suspend = [&]() -> Status {
    MF_RETURN_IF_ERROR(RunHook("--suspend-cmd", flags.suspend_cmd));
    if (exported) exported->Pause();
    return Status::Ok();
  };
  options.resume = [&] {
    if (exported) exported->Resume();
    if (Status resumed = RunHook("--resume-cmd", flags.resume_cmd); !resumed.ok()) {
      std::fprintf(stderr, "memfabric %s: warning: %s\n", kSendCmd, resumed.ToString().c_str());
    }
  };
  auto started = fabric::Seeder::Start(*source, std::move(fd), options);
  if (!started.ok()) return EndAborted(started.status(), *source, exported.get(), &exporter);
  std::unique_ptr<fabric::Seeder> seeder = std::move(started).value();
  std::string when = "when the destination is ready";
  if (flags.finalize_after >= 0) when = fmt::format("in {:g} s", flags.finalize_after);
  if (flags.finalize_on_signal) when = "on SIGUSR1 (kill -USR1 " + std::to_string(::getpid()) + ")";
  std::fprintf(stderr, "connected to %s (channel %s): pre-copy of '%s' (%s) started; finalizing %s\n",
               flags.to.c_str(),
               secret->has_value() ? "authenticated, not encrypted" : "NOT authenticated: --insecure",
               info.name.c_str(), fabric::FormatSize(info.size).c_str(), when.c_str());

  const auto start = Clock::now();
  std::atomic<bool> finished{false};
  Result<fabric::MigrationStats> result = Internal("not finalized");
  std::thread finalizer;
  auto finalize = [&] {
    std::fprintf(stderr, "finalizing: waiting for the destination's pre-copy, then the switch-over\n");
    finalizer = std::thread([&] {
      result = seeder->Finalize();
      finished.store(true);
    });
  };
  const bool at_once = flags.finalize_after < 0 && !flags.finalize_on_signal;
  if (at_once) finalize();
  Status cancelled;  // set when the migration ends before any finalize
  auto next_progress = Clock::now() + kProgressEvery;
  while (!finished.load()) {
    const int sig = TakeSignal(stop, kTick);
    const bool finalizing = finalizer.joinable();
    if (sig == SIGINT || sig == SIGTERM) {
      const std::string name = SignalName(sig);
      if (!finalizing) {
        cancelled = Status(Code::kAborted, name + " before the finalize");
        break;
      }
      std::fprintf(stderr, "%s: aborting the migration\n", name.c_str());
      ::shutdown(watch.get(), SHUT_RDWR);
    }
    if (!finalizing) {
      // The destination gone before the finalize: nothing to undo, the source goes on.
      pollfd p{watch.get(), POLLRDHUP, 0};
      if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0) {
        cancelled = Unavailable("the destination closed the migration channel before the finalize");
        break;
      }
      if ((sig == SIGUSR1 && flags.finalize_on_signal) ||
          (flags.finalize_after >= 0 && Seconds(Clock::now() - start) >= flags.finalize_after)) {
        finalize();
      }
    }
    if (Clock::now() >= next_progress && !finished.load()) {
      next_progress += kProgressEvery;
      const fabric::SeederProgress p = seeder->progress();
      // The destination's reports are read by the finalize: before it, they wait in the channel.
      std::string destination = "(reported here once finalizing; see its own output)";
      if (p.destination_local_bytes > 0 || p.destination_ready_bytes > 0) {
        destination = fabric::FormatSize(p.destination_local_bytes) + " / " + fabric::FormatSize(info.size) +
                      " (" + std::to_string(static_cast<int>(Percent(p.destination_local_bytes, info.size))) +
                      "%)";
      }
      std::fprintf(stderr, "pre-copy: destination pulled %s; %llu chunks written here since it began\n",
                   destination.c_str(), static_cast<unsigned long long>(p.tracked_chunks));
    }
  }
  if (finalizer.joinable()) finalizer.join();
  if (!cancelled.ok()) return EndAborted(cancelled, *source, exported.get(), &exporter);
  if (!result.ok()) {
    if (result.status().code() == Code::kBusy) {
      if (exported) exported->Shut();
      exporter.Stop();
      Report(
          kSendCmd, result.status(),
          "the destination holds the write lease: it is the writer now; this side stays suspended and wrote "
          "nothing after the switch-over. Check the destination's output");
      return kExitRuntime;
    }
    return EndAborted(result.status(), *source, exported.get(), &exporter);
  }
  if (exported) exported->Shut();  // the region is the destination's now
  exporter.Stop();
  PrintStats(*result, info, flags.to);
  return kExitOk;
}

void AddMigrateFlags(CLI::App& sub, MigrateFlags& flags) {
  sub.add_option("URL", flags.target.url, "The region: SCHEME://HOST[:PORT]/NAME")->required();
  sub.add_option("--chunk", flags.chunk, "Pull/push unit of the local copy, a power of two from 4K to 2M")
      ->capture_default_str();
  sub.add_option("--nbd-listen", flags.nbd_listen, "Serve the region over NBD on unix:PATH or HOST:PORT");
  sub.add_option("--connections", flags.connections, "Data connections to the server")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  sub.add_option("--channel-secret-file", flags.channel_secret_file,
                 "Secret of the migration channel (mode 0600); default: the server's secret")
      ->group("Authentication");
  AddClientFlags(sub, flags.target.client);
}

}  // namespace

void AddMigrateCommand(CLI::App& app, std::vector<Command>& commands) {
  CLI::App* migrate =
      app.add_subcommand(kMigrateCmd, "Move a region's writer to another host (recv, then send)");
  migrate->footer(kMigrateFooter);
  migrate->require_subcommand(1);
  {
    auto flags = std::make_shared<RecvFlags>();
    CLI::App* sub =
        migrate->add_subcommand("recv", "Destination: wait for the source, pull the region, take it over");
    sub->footer(kRecvFooter);
    AddMigrateFlags(*sub, flags->common);
    sub->add_option("--listen", flags->listen, "HOST:PORT for the source's channel (port 0: any free port)")
        ->required();
    sub->add_option("--port-file", flags->port_file, "Write the channel's port to this file once listening");
    sub->add_option("--cache-file", flags->cache_file, "Hold the local copy in this file (default: memory)");
    commands.push_back({sub, [flags] { return RunRecv(*flags); }});
  }
  {
    auto flags = std::make_shared<SendFlags>();
    CLI::App* sub =
        migrate->add_subcommand("send", "Source: take the region's writer, hand it to `migrate recv`");
    sub->footer(kSendFooter);
    AddMigrateFlags(*sub, flags->common);
    sub->add_option("--to", flags->to, "HOST:PORT of the destination's `migrate recv --listen`")->required();
    sub->add_option("--suspend-cmd", flags->suspend_cmd,
                    "Run (sh -c) at the switch-over to stop the workload");
    sub->add_option("--resume-cmd", flags->resume_cmd,
                    "Run (sh -c) after an abort to let the workload go on");
    auto* after = sub->add_option("--finalize-after", flags->finalize_after,
                                  "Start the switch-over this many seconds after the pre-copy began")
                      ->check(CLI::NonNegativeNumber);
    auto* on_signal =
        sub->add_flag("--finalize-on-signal", flags->finalize_on_signal, "Start the switch-over on SIGUSR1");
    after->excludes(on_signal);
    commands.push_back({sub, [flags] { return RunSend(*flags); }});
  }
}

}  // namespace mf::cli
