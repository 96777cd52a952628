// memfabric: serve memory regions, and use them from a client, on one command line.
// Every subcommand lives in its own file (serve.cc, client_cmds.cc, bench_cmd.cc); this
// file only parses argv and dispatches. Exit codes: 0 ok, 1 runtime error, 2 usage error.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <exception>
#include <vector>

#include "tools/cli_common.h"
#include "tools/nbd_cmds.h"

namespace {

constexpr char kFooter[] = R"(Examples:
  export MEMFABRIC_SECRET=$(openssl rand -hex 32)   # the same secret for server and clients
  memfabric serve --listen 127.0.0.1:7411 --region cache=1G &
  memfabric ls tcp://127.0.0.1:7411
  memfabric write tcp://127.0.0.1:7411/cache 0 < file
  memfabric bench auto://127.0.0.1:7411/cache
Run `memfabric SUBCOMMAND --help` for each subcommand's options and examples.)";

}  // namespace

int main(int argc, char** argv) {
  // A closed stdout (e.g. `memfabric read ... | head`) is reported as a write error, not
  // a silent death by SIGPIPE.
  std::signal(SIGPIPE, SIG_IGN);

  CLI::App app(
      "memfabric: export memory regions from a server and use them from clients over TCP, TLS or RDMA",
      "memfabric");
  app.set_version_flag("--version", "memfabric " MF_VERSION);
  app.footer(kFooter);
  app.require_subcommand(1);

  std::vector<mf::cli::Command> commands;
  mf::cli::AddServeCommand(app, commands);
  mf::cli::AddClientCommands(app, commands);
  mf::cli::AddBenchCommand(app, commands);
  mf::cli::AddMountCommand(app, commands);
  mf::cli::AddNbdCommands(app, commands);
  mf::cli::AddMigrateCommand(app, commands);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Prints the help (exit 0) or the parse error and "Run with --help" (usage error).
    const int code = app.exit(e);
    return code == static_cast<int>(CLI::ExitCodes::Success) ? mf::cli::kExitOk : mf::cli::kExitUsage;
  }
  for (const mf::cli::Command& command : commands) {
    if (!command.app->parsed()) continue;
    try {
      return command.run();
    } catch (const std::exception& e) {  // e.g. bad_alloc, or a thread that could not start
      std::fprintf(stderr, "memfabric %s: error: %s\n", command.app->get_name().c_str(), e.what());
      return mf::cli::kExitRuntime;
    }
  }
  return mf::cli::kExitUsage;  // unreachable: require_subcommand(1)
}
