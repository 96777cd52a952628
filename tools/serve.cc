// memfabric serve: export regions over TCP (or TLS) until SIGINT/SIGTERM, then stop
// accepting, flush every region and exit 0.
#include <fmt/format.h>
#include <pthread.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "fabric/auth.h"
#include "fabric/log.h"
#include "fabric/region.h"
#include "fabric/server.h"
#include "fabric/url.h"
#include "tools/cli_common.h"
#include "transports/open_table.h"
#include "transports/rdma/rdma_server.h"
#include "transports/tcp/tcp_server.h"

namespace mf::cli {
namespace {

constexpr char kCommand[] = "serve";

constexpr char kServeFooter[] = R"(Examples:
  # a 1 GiB region on loopback, secret from a file (mode 0600)
  (umask 077; openssl rand -hex 32 > /root/mf.secret)
  memfabric serve --listen 127.0.0.1:7411 --region cache=1G --secret-file /root/mf.secret
  # several regions; file-backed data survives a restart
  MEMFABRIC_SECRET=... memfabric serve --listen 0.0.0.0:7411 \
      --region swap=4G,backing=memfd --region state=256M,backing=file:/var/lib/mf/state
  # TLS on the control and data connections
  memfabric serve --listen 0.0.0.0:7411 --region cache=1G --secret-file S \
      --tls-cert server.pem --tls-key server.key
  # RDMA: clients use rdma://HOST:7411/REGION (auto:// picks RDMA when it can)
  memfabric serve --listen 10.0.0.1:7411 --region pool=8G --secret-file S --rdma on
  # no secret: only on loopback, for tests and demos
  memfabric serve --listen 127.0.0.1:0 --port-file /tmp/mf.port --region t=64M --insecure
The secret is never taken from the command line. SIGINT/SIGTERM flush every region and exit 0.)";

struct ServeFlags {
  std::string listen = "127.0.0.1:" + std::to_string(fabric::kDefaultPort);
  std::vector<std::string> regions;
  std::string secret_file;
  bool insecure = false;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_ca;
  int threads = 2;
  int64_t poll_spin_us = tcp::kDefaultServerPollSpin.count();
  std::string port_file;
  std::string store;
  std::string log_level = "info";
  std::string rdma = "auto";
  int rdma_port = -1;  // -1: the TCP port
};

bool IsLoopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

std::string DescribeRegion(const fabric::RegionSpec& spec) {
  std::string text = spec.name + ": " + fabric::FormatSize(spec.size) + ", backing " +
                     std::string(fabric::BackingName(spec.backing));
  if (spec.backing == fabric::BackingKind::kFile) text += " " + spec.path;
  return text;
}

int RunServe(const ServeFlags& flags) {
  Status logging = InitLogging(flags.log_level);
  if (!logging.ok()) return Report(kCommand, logging);

  tcp::ListenOptions listen;
  listen.threads = flags.threads;
  listen.poll_spin = std::chrono::microseconds(flags.poll_spin_us);
  Status address = fabric::ParseHostPort(flags.listen, &listen.host, &listen.port);
  if (!address.ok())
    return Report(kCommand, address.WithContext("--listen"), "use HOST:PORT, e.g. 127.0.0.1:7411");

  std::vector<fabric::RegionSpec> specs;
  for (const std::string& text : flags.regions) {
    Result<fabric::RegionSpec> spec = fabric::ParseRegionSpec(text);
    if (!spec.ok()) {
      return Report(
          kCommand, InvalidArgument("--region " + text + ": " + std::string(spec.status().message())),
          "use NAME=SIZE[,backing=anon|memfd|hugetlb|file:PATH], e.g. --region cache=1G,backing=memfd");
    }
    specs.push_back(std::move(spec).value());
  }

  if (!flags.tls_cert.empty() || !flags.tls_key.empty() || !flags.tls_ca.empty()) {
    if (flags.tls_cert.empty() || flags.tls_key.empty()) {
      return Report(
          kCommand, InvalidArgument("TLS needs both --tls-cert and --tls-key"),
          "e.g. --tls-cert server.pem --tls-key server.key (--tls-ca only to verify client certificates)");
    }
    listen.tls = true;
    listen.tls_options.cert_file = flags.tls_cert;
    listen.tls_options.key_file = flags.tls_key;
    listen.tls_options.ca_file = flags.tls_ca;
  }

  fabric::ServerOptions options;
  if (flags.insecure) {
    if (!flags.secret_file.empty()) {
      return Report(kCommand, InvalidArgument("--insecure and --secret-file contradict each other"),
                    "pass one of them");
    }
    if (!IsLoopback(listen.host)) {
      return Report(
          kCommand,
          InvalidArgument("--insecure is only allowed on a loopback address, not on '" + listen.host + "'"),
          "listen on 127.0.0.1 or [::1], or give a secret with --secret-file or MEMFABRIC_SECRET");
    }
    options.insecure = true;
  } else {
    Result<fabric::Secret> secret = fabric::LoadSecret(flags.secret_file);
    if (!secret.ok()) {
      if (secret.status().code() == Code::kNotFound && flags.secret_file.empty()) {
        return Report(
            kCommand,
            InvalidArgument("no secret: set MEMFABRIC_SECRET or pass --secret-file PATH; or pass --insecure "
                            "to run without one on loopback"),
            "make one with: (umask 077; openssl rand -hex 32 > /root/mf.secret)");
      }
      return Report(
          kCommand, InvalidArgument(std::string(secret.status().message())),
          "the secret file must hold at least 16 bytes and be readable by its owner only (chmod 600)");
    }
    options.secret = std::move(secret).value();
  }

  // Before any thread exists, so that every thread inherits the mask.
  const sigset_t stop_signals = BlockStopSignals();

  if (!flags.store.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(flags.store, ec);
    if (ec || !std::filesystem::is_directory(flags.store)) {
      return Report(kCommand, InvalidArgument("--store " + flags.store + " is not a usable directory" +
                                              (ec ? ": " + ec.message() : std::string())));
    }
    options.store_dir = flags.store;
  }
  fabric::Server server(std::move(options));
  for (const fabric::RegionSpec& spec : specs) {
    Result<fabric::RegionInfo> created = server.Create(spec);
    if (!created.ok()) {
      return Report(kCommand, created.status().WithContext("creating region " + spec.name));
    }
  }

  // The RDMA data plane first: OPEN replies advertise its port.
  auto opens = std::make_shared<transports::OpenTable>();
  listen.opens = opens;
  std::unique_ptr<rdma::RdmaServer> rdma_server;
  if (flags.rdma != "off") {
    rdma::RdmaListenOptions rdma_listen;
    rdma_listen.host = listen.host;
    rdma_listen.port = flags.rdma_port >= 0 ? static_cast<uint16_t>(flags.rdma_port) : listen.port;
    Result<std::unique_ptr<rdma::RdmaServer>> rdma_started = rdma::RdmaServer::Start(opens, rdma_listen);
    if (rdma_started.ok()) {
      rdma_server = std::move(rdma_started).value();
      listen.rdma_port = rdma_server->port();
    } else if (flags.rdma == "on") {
      return Report(kCommand, rdma_started.status().WithContext("--rdma on"),
                    "check `ibv_devices` and that --listen names an address of an RDMA interface "
                    "(for soft-RoCE: rdma link add rxe0 type rxe netdev IFACE)");
    } else {
      spdlog::info("RDMA data plane off: {} (TCP only; --rdma on makes this an error)",
                   rdma_started.status().ToString());
    }
  }

  Result<std::unique_ptr<tcp::TcpServer>> started = tcp::TcpServer::Start(server, listen);
  if (!started.ok()) {
    std::string hint;
    if (started.status().code() == Code::kAlreadyExists || started.status().err() == EADDRINUSE) {
      hint = "another process listens on " + flags.listen + ": pick another port, or port 0 for any free one";
    }
    return Report(kCommand, started.status().WithContext("listening on " + flags.listen), hint);
  }
  std::unique_ptr<tcp::TcpServer> transport = std::move(started).value();

  fabric::Url url;
  url.scheme = listen.tls ? fabric::Scheme::kTls : fabric::Scheme::kTcp;
  url.host = listen.host;
  url.port = transport->port();
  spdlog::info(
      "serving on {}: transport {}{}, {} threads, {}", url.ToString(), fabric::SchemeName(url.scheme),
      rdma_server ? fmt::format(" + rdma (rdma_cm port {})", rdma_server->port()) : std::string(),
      listen.threads, server.options().insecure ? "no authentication (--insecure)" : "shared-secret auth");
  for (const fabric::RegionSpec& spec : specs) spdlog::info("  region {}", DescribeRegion(spec));
  if (specs.empty()) spdlog::info("  no regions yet: clients can add them with `memfabric create`");
  if (!flags.port_file.empty()) {
    Status written = WritePortFile(flags.port_file, url.port);
    if (!written.ok()) {
      transport->Stop();
      return Report(kCommand, written.WithContext("--port-file"));
    }
  }

  const int received = TakeSignal(stop_signals, kWaitForever);
  spdlog::info("{}: stopping", SignalName(received));
  transport->Stop();
  transport.reset();
  if (rdma_server) rdma_server->Stop();
  rdma_server.reset();
  const size_t regions = server.List().size();
  Status flushed = server.FlushAll();
  if (!flushed.ok()) return Report(kCommand, flushed.WithContext("flushing regions at shutdown"));
  spdlog::info("flushed {} region{}; bye", regions, regions == 1 ? "" : "s");
  if (!flags.port_file.empty()) ::unlink(flags.port_file.c_str());
  return kExitOk;
}

}  // namespace

void AddServeCommand(CLI::App& app, std::vector<Command>& commands) {
  auto flags = std::make_shared<ServeFlags>();
  CLI::App* sub = app.add_subcommand("serve", "Export memory regions to clients (runs until SIGINT/SIGTERM)");
  sub->footer(kServeFooter);
  sub->add_option("--listen", flags->listen, "HOST:PORT to listen on (port 0: any free port)")
      ->capture_default_str();
  sub->add_option("--region", flags->regions,
                  "NAME=SIZE[,backing=anon|memfd|hugetlb|file:PATH] (repeatable; SIZE like 64M, 1G)");
  sub->add_option("--secret-file", flags->secret_file,
                  "File holding the shared secret (mode 0600); default: $MEMFABRIC_SECRET")
      ->group("Authentication");
  sub->add_flag("--insecure", flags->insecure, "No authentication; allowed on a loopback address only")
      ->group("Authentication");
  sub->add_option("--tls-cert", flags->tls_cert, "PEM certificate: serve tls:// instead of tcp://")
      ->group("TLS");
  sub->add_option("--tls-key", flags->tls_key, "PEM private key of --tls-cert")->group("TLS");
  sub->add_option("--tls-ca", flags->tls_ca, "PEM CA bundle to verify client certificates")->group("TLS");
  sub->add_option("--threads", flags->threads, "Transport worker threads")
      ->check(CLI::Range(1, tcp::kMaxServerThreads))
      ->capture_default_str();
  sub->add_option("--poll-spin", flags->poll_spin_us,
                  "Microseconds a TCP worker keeps polling its connections after serving a request "
                  "before it sleeps: a client's next request then costs no thread wake-up (page "
                  "faults in a row) at the price of CPU while busy (it yields to any thread waiting for "
                  "that CPU); 0: always sleep")
      ->check(CLI::Range(int64_t{0}, int64_t{1000000}))
      ->capture_default_str();
  sub->add_option("--rdma", flags->rdma,
                  "RDMA data plane: auto (when this host has an RDMA device), on (fail without one), off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str()
      ->group("RDMA");
  sub->add_option("--rdma-port", flags->rdma_port,
                  "rdma_cm port of the RDMA data plane (default: the TCP port)")
      ->check(CLI::Range(0, 65535))
      ->group("RDMA");
  sub->add_option("--store", flags->store,
                  "Directory where clients may create file-backed regions (memfabric create ... "
                  "--backing file:NAME); without it they may not");
  sub->add_option("--port-file", flags->port_file,
                  "Write the bound port to this file once listening (for scripts)");
  AddLogLevelFlag(*sub, flags->log_level);
  commands.push_back({sub, [flags] { return RunServe(*flags); }});
}

}  // namespace mf::cli
