// The NBD subcommands: `memfabric nbd` (a standalone NBD server for a remote region),
// `memfabric swap` (remote swap on /dev/nbdX) and the `--nbd` view of `memfabric mount`.
//
// Thread-safety: used from the main thread only.
#pragma once

#include <string>
#include <vector>

#include "tools/cli_common.h"
#include "tools/mount_cache.h"

namespace mf::cli {

// What `mount --nbd` and `swap` need to attach a region as /dev/nbdX.
struct NbdAttachFlags {
  TargetFlags target;
  std::string device;  // "" = any free device; else /dev/nbdN, nbdN or N
  bool writable = false;
  bool reclaim = false;
  int connections = 4;  // data connections to the server, and NBD connections to the kernel
  CacheFlags cache;     // mount --nbd --cache: the device sits on a managed mount
};

// Registers `nbd` and `swap`.
void AddNbdCommands(CLI::App& app, std::vector<Command>& commands);

// `mount --nbd URL [DEVICE]`: attaches, prints the device on stdout, stays in the
// foreground until SIGINT/SIGTERM, then detaches. Returns the exit code.
int RunNbdMount(const NbdAttachFlags& flags);

}  // namespace mf::cli
