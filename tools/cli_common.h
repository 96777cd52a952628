// What the memfabric subcommands share: exit codes, error reports that say what was
// wrong and how to fix it, the client flags (secret, TLS) and connecting with them.
//
// Each subcommand group registers itself with Add*Command(); main() parses argv with
// CLI11 and runs the one Command whose app was parsed. A command returns its exit code.
//
// Thread-safety: used from the main thread only.
#pragma once

#include <signal.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fabric/client.h"
#include "fabric/status.h"
#include "fabric/url.h"
#include "transports/connect.h"

namespace mf::cli {

constexpr int kExitOk = 0;
constexpr int kExitRuntime = 1;        // the operation failed (server, network, I/O)
constexpr int kExitUsage = 2;          // the command line or its configuration is wrong
constexpr int kExitInterrupted = 128;  // + the signal (SIGINT, SIGTERM) that cut the work short
// The environment variable that --connect-timeout defaults to (e.g. for every command of
// a script over a slow link).
inline constexpr char kConnectTimeoutEnv[] = "MEMFABRIC_CONNECT_TIMEOUT";

// One subcommand: its CLI11 app and what runs it once parsed.
struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

void AddServeCommand(CLI::App& app, std::vector<Command>& commands);
void AddClientCommands(CLI::App& app, std::vector<Command>& commands);
void AddBenchCommand(CLI::App& app, std::vector<Command>& commands);
void AddMountCommand(CLI::App& app, std::vector<Command>& commands);
// `migrate recv` and `migrate send` (tools/migrate_cmd.cc).
void AddMigrateCommand(CLI::App& app, std::vector<Command>& commands);

// Prints "memfabric COMMAND: error: MESSAGE" and, when hint is non-empty,
// "memfabric COMMAND: hint: HINT" to stderr. Returns kExitUsage for kInvalidArgument
// (the user asked for something malformed) and kExitRuntime otherwise.
int Report(std::string_view command, const Status& status, std::string_view hint = {});

// Flags every client subcommand takes.
struct ClientFlags {
  std::string secret_file;
  bool insecure = false;
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_server_name;
  std::string log_level = "warn";
  std::string rdma_poll = "hybrid";  // rdma:// and auto://: how completions are awaited
  // How long connecting (TCP connect, TLS, hello, authentication) may take; a duration
  // for ParseDuration. Default: transports::kDefaultConnectTimeout.
  std::string connect_timeout;
};
void AddClientFlags(CLI::App& sub, ClientFlags& flags);

// A client subcommand's URL argument and its flags.
struct TargetFlags {
  std::string url;
  ClientFlags client;
};
void AddLogLevelFlag(CLI::App& sub, std::string& level);

// Parses a memfabric URL. With need_region, a URL without /REGION (or with an invalid
// region name) is a kInvalidArgument that shows a corrected example; without it, a URL
// naming a region is rejected the same way.
Result<fabric::Url> ParseTarget(std::string_view text, bool need_region);

// Builds the client options from the flags: the secret (or none with --insecure; a
// missing secret is a kInvalidArgument that says how to provide one) and TLS files.
Result<transports::ClientOptions> MakeClientOptions(const fabric::Url& url, const ClientFlags& flags);

// A hint on how to fix `status`, which came from talking to `url` (empty if none fits).
std::string HintFor(const Status& status, const fabric::Url& url, const ClientFlags& flags);

// The common start of a client subcommand: sets the log level, parses url_text (see
// ParseTarget) and connects. Returns kExitOk and fills *url and *client, or reports the
// error with a hint and returns its exit code.
int StartClient(std::string_view command, std::string_view url_text, bool need_region,
                const ClientFlags& flags, fabric::Url* url, std::unique_ptr<fabric::Client>* client);

// `bench --uffd`: maps the region read-only with userfaultfd and times a first-touch scan
// of every page, sequential then random, each on a fresh mapping. Returns the exit code.
int RunUffdScan(std::string_view command, const TargetFlags& target, const std::string& chunk, bool prefetch,
                bool json);

// Blocks SIGINT and SIGTERM in this thread and in every thread started after it (call it
// before starting any), so that only a sigwait on the returned set receives them.
sigset_t BlockStopSignals();
// Timeouts of TakeSignal: until a signal of the set comes; only a signal already pending.
inline constexpr std::chrono::milliseconds kWaitForever{-1};
inline constexpr std::chrono::milliseconds kNoWait{0};
// Takes the next signal of `set` (blocked in every thread), waiting at most `timeout`; 0
// when none came.
int TakeSignal(const sigset_t& set, std::chrono::milliseconds timeout);
// "SIGINT", "SIGTERM", ...: how messages name a signal TakeSignal returned.
std::string SignalName(int sig);

// Parses a byte count such as "4096", "64K", "1G" for the option named `what`.
Result<uint64_t> ParseByteCount(std::string_view what, std::string_view text);
// Writes "PORT\n" to path atomically (temp file + rename), so a reader never sees half
// (serve --port-file, migrate recv --port-file).
Status WritePortFile(const std::string& path, uint16_t port);
// Parses a duration such as "2s", "500ms" or "0" (seconds without a unit).
Result<std::chrono::milliseconds> ParseDuration(std::string_view text);

}  // namespace mf::cli
