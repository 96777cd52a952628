// `--cache` of `memfabric mount` and `memfabric nbd`: the view (uffd mapping, NBD export
// or /dev/nbdX) sits on a managed fabric::Mount, given to it as a fabric::MountRemote.
// The Mount pulls the whole region in the background (reads of chunks not local yet jump
// the queue) and pushes writes back every --push-interval and on exit. While the view
// runs, a progress line each second says how much is local and dirty and the pull and
// push rates.
//
// Thread-safety: used from the main thread only.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "fabric/mount_remote.h"
#include "tools/cli_common.h"

namespace mf::cli {

constexpr char kDefaultPushInterval[] = "1s";

struct CacheFlags {
  bool cache = false;
  std::string cache_file;     // "": the local copy is anonymous memory
  std::string push_interval;  // "": kDefaultPushInterval
};
void AddCacheFlags(CLI::App& sub, CacheFlags& flags);

// With --cache, replaces *remote by a MountRemote that owns it (chunks of chunk_size, the
// local copy in --cache-file, pushes every --push-interval when writable) and sets *cache
// to it; without, leaves both alone (and rejects --cache-file/--push-interval). Returns
// kExitOk, or reports the error and returns its exit code.
int OpenCache(std::string_view command, const CacheFlags& flags, size_t chunk_size,
              std::unique_ptr<fabric::Remote>* remote, fabric::MountRemote** cache);

// The progress line: "cache: local 37% (6 MiB of 16 MiB), dirty 128 KiB, pull 85.3 MB/s,
// push 0.0 MB/s", the rates over the time since the previous line.
class CacheProgress {
 public:
  explicit CacheProgress(const fabric::Mount& mount);
  std::string Line();

 private:
  using Clock = std::chrono::steady_clock;
  const fabric::Mount& mount_;
  fabric::MountStats last_;
  Clock::time_point last_time_;
};

// Waits for SIGINT or SIGTERM in `stop`, printing the cache's progress line to stderr
// each second; returns the signal.
int WaitForStopShowingProgress(const sigset_t& stop, const fabric::MountRemote& cache);

// Closes the cache (its final sync, then the mounted Remote) and prints what it pulled and
// pushed. Returns kExitOk, or reports the error and returns its exit code.
int CloseCache(std::string_view command, fabric::MountRemote& cache);

}  // namespace mf::cli
