// nbd_bench_server — a standalone nbd::Export for bench/compare_nbd.sh.
//
//   nbd_bench_server SOCKET SIZE [region|memory|tcp] [NAME]
//
// Serves export NAME (default "mem") of SIZE bytes ("1G", "256M") on the unix socket SOCKET
// (or on 127.0.0.1:PORT when SOCKET is "tcp:PORT"; port 0 picks one) until SIGINT/SIGTERM,
// after printing "ready SOCKET" or "ready tcp:PORT". The backend:
//   region  (default) an in-process fabric::Region; a Remote that copies on the submitting
//           thread — the Export's own cost with no transport in the way
//   memory  fabric::MemoryRemote (one worker thread completes every request)
//   tcp     a fabric::Server + TcpServer on loopback and a TCP Remote to it: the full path
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

#include "fabric/log.h"
#include "fabric/memory_remote.h"
#include "fabric/region.h"
#include "fabric/server.h"
#include "nbd/export.h"
#include "transports/connect.h"
#include "transports/tcp/tcp_server.h"

namespace {

using namespace mf;

// A Remote over a local Region that completes every request inline. Bench-only: the
// Remote contract allows inline completion only for invalid requests, which the Export
// tolerates either way.
class RegionRemote final : public fabric::Remote {
 public:
  explicit RegionRemote(std::unique_ptr<fabric::Region> region) : region_(std::move(region)) {
    info_.name = region_->name();
    info_.size = region_->size();
    info_.generation = 1;
  }
  const fabric::RegionInfo& info() const override { return info_; }
  bool writable() const override { return true; }
  std::string_view transport() const override { return "local"; }
  size_t max_transfer() const override { return 32u << 20; }
  Result<fabric::Buffer> AllocateBuffer(size_t size) override {
    MF_ASSIGN_OR_RETURN(MappedMemory memory, MappedMemory::Anonymous(size));
    return fabric::Buffer(std::move(memory), nullptr);
  }
  void Submit(std::span<const fabric::IoRequest> requests) override {
    for (const fabric::IoRequest& r : requests) {
      Status invalid = fabric::ValidateRequest(r, *this);
      if (invalid.ok()) {
        std::byte* at = region_->data() + r.offset;
        if (r.kind == fabric::IoKind::kRead) {
          std::memcpy(r.data.data(), at, r.data.size());
        } else {
          std::memcpy(at, r.data.data(), r.data.size());
        }
      }
      r.callback->OnIoComplete(r.cookie, invalid);
    }
  }
  Status Flush() override { return region_->Flush(); }
  Status Close() override { return Status::Ok(); }

 private:
  std::unique_ptr<fabric::Region> region_;
  fabric::RegionInfo info_;
};

volatile sig_atomic_t g_stop = 0;
void OnSignal(int) {
  g_stop = 1;
}

int Fail(const Status& s) {
  std::fprintf(stderr, "nbd_bench_server: %s\n", s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s SOCKET SIZE [region|memory|tcp] [NAME]\n", argv[0]);
    return 2;
  }
  const std::string socket_path = argv[1];
  auto size = fabric::ParseSize(argv[2]);
  if (!size.ok()) return Fail(size.status());
  const std::string mode = argc > 3 ? argv[3] : "region";
  const std::string name = argc > 4 ? argv[4] : "mem";
  (void)InitLogging(std::getenv("MF_LOG") ? std::getenv("MF_LOG") : "warn");

  std::unique_ptr<fabric::Remote> remote;
  std::unique_ptr<fabric::Server> server;
  std::unique_ptr<tcp::TcpServer> tcp_server;
  std::unique_ptr<fabric::Client> client;
  if (mode == "region") {
    auto region = fabric::Region::Create({name, *size, fabric::BackingKind::kAnonymous, ""}, 1);
    if (!region.ok()) return Fail(region.status());
    remote = std::make_unique<RegionRemote>(std::move(region).value());
  } else if (mode == "memory") {
    remote =
        std::make_unique<fabric::MemoryRemote>(std::make_shared<fabric::MemoryRegion>(name, *size), true);
  } else if (mode == "tcp") {
    fabric::ServerOptions options;
    options.insecure = true;
    server = std::make_unique<fabric::Server>(std::move(options));
    if (auto created = server->Create({name, *size, fabric::BackingKind::kAnonymous, ""}); !created.ok()) {
      return Fail(created.status());
    }
    tcp::ListenOptions listen;
    listen.port = 0;
    auto started = tcp::TcpServer::Start(*server, listen);
    if (!started.ok()) return Fail(started.status());
    tcp_server = std::move(started).value();
    fabric::Url url;
    url.scheme = fabric::Scheme::kTcp;
    url.host = "127.0.0.1";
    url.port = tcp_server->port();
    auto connected = transports::Connect(url, {});
    if (!connected.ok()) return Fail(connected.status());
    client = std::move(connected).value();
    fabric::OpenOptions open;
    open.writable = true;
    auto opened = client->Open(name, open);
    if (!opened.ok()) return Fail(opened.status());
    remote = std::move(opened).value();
  } else {
    std::fprintf(stderr, "unknown backend '%s'\n", mode.c_str());
    return 2;
  }

  nbd::Export exporter;
  if (Status s = exporter.Add({name, "nbd_bench_server " + mode, remote.get(), false}); !s.ok())
    return Fail(s);
  std::string where = socket_path;
  if (socket_path.rfind("tcp:", 0) == 0) {
    auto port = exporter.ListenTcp("127.0.0.1", static_cast<uint16_t>(std::stoi(socket_path.substr(4))));
    if (!port.ok()) return Fail(port.status());
    where = "tcp:" + std::to_string(*port);
  } else if (Status s = exporter.ListenUnix(socket_path); !s.ok()) {
    return Fail(s);
  }
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  std::printf("ready %s\n", where.c_str());
  std::fflush(stdout);
  while (!g_stop) ::pause();
  exporter.Stop();
  (void)remote->Close();
  if (tcp_server) tcp_server->Stop();
  return 0;
}
