#include "tools/mount_cache.h"

#include <fmt/core.h>
#include <signal.h>

#include <cstdio>

#include "fabric/region.h"

namespace mf::cli {
namespace {

constexpr auto kProgressInterval = std::chrono::seconds(1);

double MegabytesPerSecond(uint64_t bytes, double seconds) {
  return seconds > 0 ? static_cast<double>(bytes) / 1e6 / seconds : 0.0;
}

}  // namespace

void AddCacheFlags(CLI::App& sub, CacheFlags& flags) {
  sub.add_flag("--cache", flags.cache,
               "Keep a local copy (a managed mount): pull it all in the background, push writes back");
  sub.add_option("--cache-file", flags.cache_file, "--cache: hold the local copy in this file (overwritten)");
  sub.add_option("--push-interval", flags.push_interval,
                 std::string("--cache: push dirty chunks this often (default ") + kDefaultPushInterval + ")");
}

int OpenCache(std::string_view command, const CacheFlags& flags, size_t chunk_size,
              std::unique_ptr<fabric::Remote>* remote, fabric::MountRemote** cache) {
  if (!flags.cache) {
    if (!flags.cache_file.empty() || !flags.push_interval.empty())
      return Report(command, InvalidArgument("--cache-file and --push-interval go with --cache"));
    return kExitOk;
  }
  auto interval = ParseDuration(flags.push_interval.empty() ? kDefaultPushInterval : flags.push_interval);
  if (!interval.ok()) return Report(command, interval.status().WithContext("--push-interval"));
  fabric::MountOptions options;
  options.chunk_size = chunk_size;
  options.path = flags.cache_file;
  options.push_interval = *interval;
  const std::string name = (*remote)->info().name;
  auto mounted = fabric::MountRemote::Create(std::move(*remote), std::move(options));
  if (!mounted.ok()) return Report(command, mounted.status().WithContext("cache of " + name));
  *cache = mounted->get();
  *remote = std::move(mounted).value();
  std::string pushes = "read-only";
  if ((*cache)->writable()) {
    pushes = interval->count() > 0 ? "writes pushed every " + std::to_string(interval->count()) + " ms"
                                   : "writes pushed on flush and exit";
  }
  std::fprintf(stderr, "cache of '%s': %s, chunk %s, local copy in %s, %s\n", name.c_str(),
               fabric::FormatSize((*cache)->size()).c_str(), fabric::FormatSize(chunk_size).c_str(),
               flags.cache_file.empty() ? "memory" : flags.cache_file.c_str(), pushes.c_str());
  return kExitOk;
}

CacheProgress::CacheProgress(const fabric::Mount& mount)
    : mount_(mount), last_(mount.stats()), last_time_(Clock::now()) {}

std::string CacheProgress::Line() {
  const fabric::MountStats s = mount_.stats();
  const Clock::time_point now = Clock::now();
  const double seconds = std::chrono::duration<double>(now - last_time_).count();
  std::string line = fmt::format(
      "cache: local {:.0f}% ({} of {}), dirty {}, pull {:.1f} MB/s, push {:.1f} MB/s",
      s.size ? 100.0 * static_cast<double>(s.bytes_local) / static_cast<double>(s.size) : 0.0,
      fabric::FormatSize(s.bytes_local), fabric::FormatSize(s.size), fabric::FormatSize(s.bytes_dirty),
      MegabytesPerSecond(s.bytes_pulled - last_.bytes_pulled, seconds),
      MegabytesPerSecond(s.bytes_pushed - last_.bytes_pushed, seconds));
  if (s.failed_chunks > 0) line += fmt::format(", {} chunks failed", s.failed_chunks);
  last_ = s;
  last_time_ = now;
  return line;
}

int WaitForStopShowingProgress(const sigset_t& stop, const fabric::MountRemote& cache) {
  CacheProgress progress(cache.mount());
  for (;;) {
    if (const int sig = TakeSignal(stop, kProgressInterval); sig != 0) return sig;
    std::fprintf(stderr, "%s\n", progress.Line().c_str());
  }
}

int CloseCache(std::string_view command, fabric::MountRemote& cache) {
  Status closed = cache.Close();
  const fabric::MountStats s = cache.mount().stats();
  std::fprintf(stderr, "cache: pushed %s (%llu chunks, %.1f MB/s), pulled %s (%.1f MB/s)%s\n",
               fabric::FormatSize(s.bytes_pushed).c_str(), static_cast<unsigned long long>(s.pushes),
               s.push_bytes_per_second / 1e6, fabric::FormatSize(s.bytes_pulled).c_str(),
               s.pull_bytes_per_second / 1e6, closed.ok() ? "" : "; the final sync failed");
  if (!closed.ok()) return Report(command, closed.WithContext("final sync of the cache"));
  return kExitOk;
}

}  // namespace mf::cli
