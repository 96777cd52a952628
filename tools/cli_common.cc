#include "tools/cli_common.h"

#include <cstdio>

#include "fabric/auth.h"
#include "fabric/log.h"
#include "fabric/region.h"

namespace mf::cli {
namespace {

constexpr char kLogLevels[] = "trace, debug, info, warn, error or off";

std::string ServerUrl(const fabric::Url& url) {
  fabric::Url server = url;
  server.region.clear();
  return server.ToString();
}

}  // namespace

int Report(std::string_view command, const Status& status, std::string_view hint) {
  std::string message(status.message());
  if (message.empty()) message = std::string(CodeName(status.code()));
  std::fprintf(stderr, "memfabric %.*s: error: %s\n", static_cast<int>(command.size()), command.data(),
               message.c_str());
  if (!hint.empty()) {
    std::fprintf(stderr, "memfabric %.*s: hint: %.*s\n", static_cast<int>(command.size()), command.data(),
                 static_cast<int>(hint.size()), hint.data());
  }
  return status.code() == Code::kInvalidArgument ? kExitUsage : kExitRuntime;
}

void AddLogLevelFlag(CLI::App& sub, std::string& level) {
  sub.add_option("--log-level", level, std::string("Log level: ") + kLogLevels)
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}))
      ->capture_default_str();
}

void AddClientFlags(CLI::App& sub, ClientFlags& flags) {
  sub.add_option("--secret-file", flags.secret_file,
                 "File holding the shared secret (mode 0600); default: $MEMFABRIC_SECRET")
      ->group("Authentication");
  sub.add_flag("--insecure", flags.insecure, "Connect without a secret (the server must run with --insecure)")
      ->group("Authentication");
  sub.add_option("--tls-ca", flags.tls_ca, "tls://: PEM CA bundle that signed the server's certificate")
      ->group("TLS");
  sub.add_option("--tls-cert", flags.tls_cert,
                 "tls://: PEM client certificate (when the server asks for one)")
      ->group("TLS");
  sub.add_option("--tls-key", flags.tls_key, "tls://: PEM private key of --tls-cert")->group("TLS");
  sub.add_option("--tls-server-name", flags.tls_server_name,
                 "tls://: name expected in the server's certificate (default: the URL's host)")
      ->group("TLS");
  sub.add_option("--rdma-poll", flags.rdma_poll,
                 "rdma://: how the completion thread waits: hybrid (spin 50 us after the last completion, "
                 "then sleep), busy (spin always: lowest latency, a core), event (always sleep: least CPU)")
      ->check(CLI::IsMember({"hybrid", "busy", "event"}))
      ->capture_default_str()
      ->group("RDMA");
  static_assert(transports::kDefaultConnectTimeout.count() % 1000 == 0, "the default is named in seconds");
  if (flags.connect_timeout.empty()) {
    flags.connect_timeout = std::to_string(transports::kDefaultConnectTimeout.count() / 1000) + "s";
  }
  sub.add_option("--connect-timeout", flags.connect_timeout,
                 "How long connecting may take: TCP connect, TLS, hello and authentication (e.g. 5s, "
                 "500ms; raise it for a slow link or an overloaded server)")
      ->envname(kConnectTimeoutEnv)
      ->type_name("DURATION")
      ->capture_default_str()
      ->group("Connection");
  AddLogLevelFlag(sub, flags.log_level);
}

Result<fabric::Url> ParseTarget(std::string_view text, bool need_region) {
  MF_ASSIGN_OR_RETURN(fabric::Url url, fabric::ParseUrl(text));
  if (need_region) {
    if (url.region.empty()) {
      url.region = "NAME";
      return InvalidArgument("'" + std::string(text) + "' names no region; add /NAME, e.g. " +
                             url.ToString());
    }
    Status valid = fabric::ValidateRegionName(url.region);
    if (!valid.ok())
      return InvalidArgument("bad region name in '" + std::string(text) +
                             "': " + std::string(valid.message()));
  } else if (!url.region.empty()) {
    return InvalidArgument("'" + std::string(text) +
                           "' names a region; this command takes the server only, e.g. " + ServerUrl(url));
  }
  return url;
}

Result<transports::ClientOptions> MakeClientOptions(const fabric::Url& url, const ClientFlags& flags) {
  transports::ClientOptions options;
  const bool any_tls = !flags.tls_ca.empty() || !flags.tls_cert.empty() || !flags.tls_key.empty() ||
                       !flags.tls_server_name.empty();
  if (any_tls && url.scheme != fabric::Scheme::kTls) {
    fabric::Url tls = url;
    tls.scheme = fabric::Scheme::kTls;
    return InvalidArgument("--tls-* flags apply to tls:// URLs only; use " + tls.ToString());
  }
  if (flags.tls_cert.empty() != flags.tls_key.empty()) {
    return InvalidArgument("--tls-cert and --tls-key go together; pass both or neither");
  }
  options.tls.ca_file = flags.tls_ca;
  options.tls.cert_file = flags.tls_cert;
  options.tls.key_file = flags.tls_key;
  options.tls.server_name = flags.tls_server_name;
  Result<std::chrono::milliseconds> connect_timeout = ParseDuration(flags.connect_timeout);
  if (!connect_timeout.ok() || connect_timeout->count() <= 0) {
    return InvalidArgument("--connect-timeout (or $" + std::string(kConnectTimeoutEnv) + ") '" +
                           flags.connect_timeout + "' is not a positive duration such as 5s or 500ms");
  }
  options.connect_timeout = *connect_timeout;
  options.rdma.poll_mode = flags.rdma_poll == "busy"    ? transports::PollMode::kBusy
                           : flags.rdma_poll == "event" ? transports::PollMode::kEvent
                                                        : transports::PollMode::kHybrid;
  if (flags.insecure) {
    if (!flags.secret_file.empty()) {
      return InvalidArgument("--insecure and --secret-file contradict each other; pass one of them");
    }
    return options;  // no secret: the server must be --insecure
  }
  Result<fabric::Secret> secret = fabric::LoadSecret(flags.secret_file);
  if (!secret.ok()) {
    if (secret.status().code() == Code::kNotFound && flags.secret_file.empty()) {
      return InvalidArgument(
          "no secret: set MEMFABRIC_SECRET or pass --secret-file PATH; or start the server with --insecure "
          "on "
          "loopback and pass --insecure here");
    }
    return InvalidArgument(std::string(secret.status().message()));
  }
  options.secret = std::move(secret).value();
  return options;
}

std::string HintFor(const Status& status, const fabric::Url& url, const ClientFlags& flags) {
  const std::string server = ServerUrl(url);
  const std::string address = url.host + ":" + std::to_string(url.port);
  switch (status.code()) {
    case Code::kUnauthenticated:
      if (status.message().find("certificate") != std::string_view::npos) {
        return "pass the CA that signed the server's certificate with --tls-ca, and --tls-server-name when "
               "the "
               "certificate names the server differently from the URL";
      }
      if (flags.insecure) {
        return "the server requires a secret: set MEMFABRIC_SECRET or pass --secret-file with the server's "
               "secret";
      }
      return "use the same secret as the server (its --secret-file or MEMFABRIC_SECRET)";
    case Code::kUnavailable:
      if (status.message().find("refused") != std::string_view::npos) {
        return "is `memfabric serve` running and listening on " + address +
               "? (see its 'serving on' log line)";
      }
      if (url.scheme == fabric::Scheme::kTls) {
        return "is " + address +
               " a memfabric server started with --tls-cert? A server without TLS needs tcp://";
      }
      return "is " + address + " a memfabric server? One started with --tls-cert needs a tls:// URL";
    case Code::kTimeout:
      return address +
             " did not answer in time: check the address, the port and any firewall in between (over a slow "
             "link, raise --connect-timeout)";
    case Code::kProtocolError:
      return "is " + address +
             " a memfabric server of this version? A server started with --tls-cert needs a "
             "tls:// URL, and a plain one a tcp:// URL";
    case Code::kNotFound:
      if (url.region.empty()) return "";
      return "list the regions with `memfabric ls " + server +
             "`, or create this one with `memfabric create " + url.ToString() + " --size SIZE`";
    case Code::kAlreadyExists:
      return "pick another name, or remove it first with `memfabric rm " + url.ToString() + "`";
    case Code::kBusy:
      return "another client holds the write lease of '" + url.region +
             "'; retry once it has closed the region";
    case Code::kOutOfRange: return "check the region's size with `memfabric stat " + url.ToString() + "`";
    case Code::kUnsupported:
      if (url.scheme == fabric::Scheme::kRdma)
        return "no RDMA path here: use auto:// (falls back to TCP) or tcp://";
      return "";
    default: return "";
  }
}

int StartClient(std::string_view command, std::string_view url_text, bool need_region,
                const ClientFlags& flags, fabric::Url* url, std::unique_ptr<fabric::Client>* client) {
  Status logging = InitLogging(flags.log_level);
  if (!logging.ok()) return Report(command, logging);
  Result<fabric::Url> parsed = ParseTarget(url_text, need_region);
  if (!parsed.ok()) return Report(command, parsed.status());
  *url = std::move(parsed).value();
  Result<transports::ClientOptions> options = MakeClientOptions(*url, flags);
  if (!options.ok()) return Report(command, options.status());
  Result<std::unique_ptr<fabric::Client>> connected = transports::Connect(*url, *options);
  if (!connected.ok()) {
    // Name the server once: the transport may have said where it was connecting already.
    Status status = connected.status();
    if (status.message().find(ServerUrl(*url)) == std::string_view::npos) {
      status = status.WithContext("connecting to " + ServerUrl(*url));
    }
    return Report(command, status, HintFor(connected.status(), *url, flags));
  }
  *client = std::move(connected).value();
  return kExitOk;
}

sigset_t BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  return set;
}

int TakeSignal(const sigset_t& set, std::chrono::milliseconds timeout) {
  if (timeout < std::chrono::milliseconds(0)) {
    int received = 0;
    while (sigwait(&set, &received) != 0) {
    }
    return received;
  }
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(timeout);
  const timespec wait{static_cast<time_t>(seconds.count()),
                      static_cast<long>(std::chrono::nanoseconds(timeout - seconds).count())};
  const int received = sigtimedwait(&set, nullptr, &wait);  // -1: EAGAIN (none came) or EINTR
  return received > 0 ? received : 0;
}

std::string SignalName(int sig) {
  const char* abbreviation = sigabbrev_np(sig);
  return abbreviation != nullptr ? "SIG" + std::string(abbreviation) : "signal " + std::to_string(sig);
}

Result<uint64_t> ParseByteCount(std::string_view what, std::string_view text) {
  Result<uint64_t> value = fabric::ParseSize(text);
  if (!value.ok()) {
    return InvalidArgument("bad " + std::string(what) + " '" + std::string(text) +
                           "': expected a byte count such as 4096, 64K, 16M or 1G");
  }
  return value;
}

Result<std::chrono::milliseconds> ParseDuration(std::string_view text) {
  std::string_view digits = text;
  int scale = 1000;
  if (text.size() > 2 && text.substr(text.size() - 2) == "ms") {
    digits = text.substr(0, text.size() - 2);
    scale = 1;
  } else if (!text.empty() && text.back() == 's') {
    digits = text.substr(0, text.size() - 1);
  }
  uint64_t value = 0;
  for (char c : digits) {
    if (c < '0' || c > '9' || value > 1'000'000'000) {
      return InvalidArgument("bad duration '" + std::string(text) + "': use e.g. 2s or 500ms");
    }
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  if (digits.empty())
    return InvalidArgument("bad duration '" + std::string(text) + "': use e.g. 2s or 500ms");
  return std::chrono::milliseconds(static_cast<int64_t>(value) * scale);
}

Status WritePortFile(const std::string& path, uint16_t port) {
  const std::string temp = path + ".tmp";
  std::FILE* file = std::fopen(temp.c_str(), "w");
  if (file == nullptr) return Status::FromErrno(errno, "creating " + temp);
  const bool written = std::fprintf(file, "%u\n", static_cast<unsigned>(port)) > 0;
  const bool closed = std::fclose(file) == 0;
  if (!written || !closed) return Status(Code::kIoError, "writing " + temp);
  if (std::rename(temp.c_str(), path.c_str()) != 0) return Status::FromErrno(errno, "renaming to " + path);
  return Status::Ok();
}

}  // namespace mf::cli
