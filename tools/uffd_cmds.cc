// memfabric mount --uffd: map a remote region into this process with userfaultfd and use
// it as memory — checksum it, fill part of it, or hold it open with periodic sync while
// showing progress. Also the scan behind `memfabric bench --uffd`. `mount --nbd` is
// RunNbdMount (nbd_cmds.cc).
#include <fmt/core.h>
#include <signal.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <thread>

#include "fabric/region.h"
#include "tools/cli_common.h"
#include "tools/mount_cache.h"
#include "tools/nbd_cmds.h"
#include "uffd/mapping.h"

namespace mf::cli {
namespace {

constexpr char kMountCmd[] = "mount";
// Bytes hashed or filled between looks for SIGINT/SIGTERM: small, since with 4 KiB chunks
// and no prefetch every page is a round trip to the server.
constexpr size_t kStep = 1u << 20;
constexpr size_t kProgressEvery = 64;  // steps between progress lines
constexpr auto kHoldInterval = std::chrono::seconds(1);
constexpr char kDefaultChunk[] = "64K";

constexpr char kMountFooter[] = R"(Examples:
  # checksum a region through the mapping (pages pulled on first touch, prefetch ahead)
  memfabric mount --uffd tcp://10.0.0.5:7411/cache
  # compare with the bytes the server holds
  memfabric read tcp://10.0.0.5:7411/cache 0 64M | xxhsum -H3
  # write through the mapping, then push: fill 1 MiB at offset 4 MiB with 0x5a
  memfabric mount --uffd tcp://10.0.0.5:7411/cache --writable --fill 0x5a --offset 4M --length 1M
  # keep it mapped, syncing every 2 s, showing how much is local and dirty (Ctrl-C ends)
  memfabric mount --uffd tcp://10.0.0.5:7411/cache --writable --hold --sync-interval 2s
  # as a block device (root): prints /dev/nbdX, detaches on Ctrl-C or SIGTERM (not while
  # it is mounted or open: it then names who holds it and waits for the next signal)
  memfabric mount --nbd tcp://10.0.0.5:7411/disk --writable
  memfabric mount --nbd tcp://10.0.0.5:7411/disk /dev/nbd3 --reclaim   # take nbd3 back from a crash
  # on a local copy in a file, pulled in the background; progress (local, dirty, rates) each second
  memfabric mount --uffd tcp://10.0.0.5:7411/cache --writable --hold --sync-interval 2s \
      --cache --cache-file /var/tmp/cache.img
  memfabric mount --nbd tcp://10.0.0.5:7411/disk --writable --cache --push-interval 5s
Ctrl-C or SIGTERM stops a checksum or a fill within a 1 MiB step (exit 130 or 143; a
fill first pushes what it wrote) and ends --hold (exit 0, after a final sync).
The mapping lives in this process: a program that wants the memory itself links the
library (uffd::Mapping); any program can use the --nbd block device.)";

struct MountFlags {
  TargetFlags target;
  std::string device;  // --nbd: /dev/nbdN
  bool reclaim = false;
  bool uffd = false;
  bool nbd = false;
  std::string chunk;  // default kDefaultChunk
  bool no_prefetch = false;
  bool writable = false;
  bool hold = false;
  std::string fill;
  std::string offset;  // default 0
  std::string length;
  std::string sync_interval = "0";
  int connections = 4;
  CacheFlags cache;
};

std::string Progress(const uffd::MappingStats& s) {
  return fmt::format(
      "local {}/{} chunks ({:.0f}%), dirty {}, pulled {}, pushed {}", s.local_chunks, s.chunks,
      s.chunks ? 100.0 * static_cast<double>(s.local_chunks) / static_cast<double>(s.chunks) : 0.0,
      s.dirty_chunks, fabric::FormatSize(s.bytes_pulled), fabric::FormatSize(s.bytes_pushed));
}

// --fill's byte: decimal or 0x-prefixed hex, 0 to 255, nothing after it.
Result<uint8_t> ParseFillByte(std::string_view text) {
  const bool hex = text.starts_with("0x") || text.starts_with("0X");
  const std::string_view digits = hex ? text.substr(2) : text;
  unsigned value = 0;
  const auto [end, err] = std::from_chars(digits.data(), digits.data() + digits.size(), value, hex ? 16 : 10);
  if (digits.empty() || err != std::errc() || end != digits.data() + digits.size() || value > 0xff) {
    return InvalidArgument("bad --fill '" + std::string(text) + "': a byte value, 0 to 255 or 0x00 to 0xff");
  }
  return static_cast<uint8_t>(value);
}

struct Opened {
  std::unique_ptr<fabric::Client> client;
  std::unique_ptr<fabric::Remote> remote;  // with --cache, the MountRemote over the region
  fabric::MountRemote* cache = nullptr;    // with --cache: remote
  std::unique_ptr<uffd::Mapping> mapping;
};

int OpenMapping(std::string_view command, const TargetFlags& target, bool writable, int connections,
                const uffd::MappingOptions& options, Opened* out, const CacheFlags& cache = {}) {
  fabric::Url url;
  if (int rc = StartClient(command, target.url, true, target.client, &url, &out->client); rc != kExitOk)
    return rc;
  fabric::OpenOptions open;
  open.writable = writable;
  open.connections = connections;
  auto remote = out->client->Open(url.region, open);
  if (!remote.ok()) return Report(command, remote.status(), HintFor(remote.status(), url, target.client));
  out->remote = std::move(remote).value();
  if (int rc = OpenCache(command, cache, options.chunk_size, &out->remote, &out->cache); rc != kExitOk)
    return rc;
  auto mapping = uffd::Mapping::Create(*out->remote, options);
  if (!mapping.ok()) return Report(command, mapping.status().WithContext("mapping " + url.region));
  out->mapping = std::move(mapping).value();
  return kExitOk;
}

int RunMount(const MountFlags& flags) {
  if (flags.nbd == flags.uffd) {
    return Report(kMountCmd, InvalidArgument("choose one view: --uffd (this process's memory) or --nbd"));
  }
  if (flags.nbd) {
    if (!flags.fill.empty() || !flags.offset.empty() || !flags.length.empty() || flags.hold ||
        flags.sync_interval != "0" || !flags.chunk.empty() || flags.no_prefetch) {
      return Report(kMountCmd,
                    InvalidArgument("--fill, --offset, --length, --hold, --sync-interval, --chunk and "
                                    "--no-prefetch go with --uffd only"));
    }
    return RunNbdMount(
        {flags.target, flags.device, flags.writable, flags.reclaim, flags.connections, flags.cache});
  }
  if (!flags.device.empty() || flags.reclaim) {
    return Report(kMountCmd, InvalidArgument("DEVICE and --reclaim go with --nbd only"));
  }
  auto chunk = ParseByteCount("--chunk", flags.chunk.empty() ? kDefaultChunk : flags.chunk);
  auto interval = ParseDuration(flags.sync_interval);
  if (!chunk.ok()) return Report(kMountCmd, chunk.status());
  if (!interval.ok()) return Report(kMountCmd, interval.status());
  const bool filling = !flags.fill.empty();
  if (!filling && (!flags.offset.empty() || !flags.length.empty())) {
    return Report(kMountCmd, InvalidArgument("--offset and --length say where --fill writes: add --fill"));
  }
  if ((filling || interval->count() > 0) && !flags.writable) {
    return Report(kMountCmd, InvalidArgument("--fill and --sync-interval write: add --writable"));
  }
  // All of --fill's arguments are checked before the write lease is taken; the range
  // against the region's size once it is known.
  uint8_t fill_value = 0;
  uint64_t fill_offset = 0;
  std::optional<uint64_t> fill_length;
  if (filling) {
    auto value = ParseFillByte(flags.fill);
    if (!value.ok()) return Report(kMountCmd, value.status());
    fill_value = *value;
    if (!flags.offset.empty()) {
      auto offset = ParseByteCount("--offset", flags.offset);
      if (!offset.ok()) return Report(kMountCmd, offset.status());
      fill_offset = *offset;
    }
    if (!flags.length.empty()) {
      auto length = ParseByteCount("--length", flags.length);
      if (!length.ok()) return Report(kMountCmd, length.status());
      fill_length = *length;
    }
  }
  uffd::MappingOptions options;
  options.chunk_size = *chunk;
  options.prefetch = !flags.no_prefetch && !flags.cache.cache;  // a cache pulls in the background
  options.sync_interval = *interval;

  // Before any thread exists, so that only the main thread takes SIGINT/SIGTERM.
  const sigset_t stop = BlockStopSignals();

  Opened o;
  if (int rc =
          OpenMapping(kMountCmd, flags.target, flags.writable, flags.connections, options, &o, flags.cache);
      rc != kExitOk) {
    return rc;
  }
  uffd::Mapping& m = *o.mapping;
  std::fprintf(stderr, "mapped %s of '%s' at %p over %s: chunk %s, prefetch %s, write tracking %s\n",
               fabric::FormatSize(m.size()).c_str(), o.remote->info().name.c_str(),
               static_cast<void*>(m.data()), std::string(o.remote->transport()).c_str(),
               fabric::FormatSize(m.chunk_size()).c_str(), options.prefetch ? "on" : "off",
               std::string(uffd::WriteTrackingName(m.tracking())).c_str());

  int stopped_by = 0;
  if (filling) {
    const uint64_t length = fill_length.value_or(m.size() - std::min(fill_offset, m.size()));
    Status range = fabric::CheckRange(fill_offset, length, m.size());
    if (!range.ok()) return Report(kMountCmd, range);
    uint64_t done = 0;
    while (done < length && (stopped_by = TakeSignal(stop, kNoWait)) == 0) {
      const uint64_t step = std::min<uint64_t>(kStep, length - done);
      std::memset(m.data() + fill_offset + done, fill_value, step);
      done += step;
    }
    if (stopped_by != 0) {
      std::fprintf(stderr, "%s: stopped filling after %s of %s; pushing what was written\n",
                   SignalName(stopped_by).c_str(), fabric::FormatSize(done).c_str(),
                   fabric::FormatSize(length).c_str());
    } else {
      Status synced = m.Sync();
      if (!synced.ok()) return Report(kMountCmd, synced);
      std::printf("filled %s at offset %llu with 0x%02x and synced: %s\n", fabric::FormatSize(length).c_str(),
                  static_cast<unsigned long long>(fill_offset), fill_value, Progress(m.stats()).c_str());
    }
  } else if (!flags.hold) {
    XXH3_state_t* state = XXH3_createState();
    XXH3_64bits_reset(state);
    const auto start = std::chrono::steady_clock::now();
    size_t at = 0;
    for (size_t steps = 1; at < m.size() && (stopped_by = TakeSignal(stop, kNoWait)) == 0; ++steps) {
      const size_t step = std::min(kStep, m.size() - at);
      XXH3_64bits_update(state, m.data() + at, step);
      at += step;
      if (steps % kProgressEvery == 0 && isatty(STDERR_FILENO)) {
        std::fprintf(stderr, "\rhashing: %s", Progress(m.stats()).c_str());
      }
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const uint64_t hash = XXH3_64bits_digest(state);
    XXH3_freeState(state);
    if (isatty(STDERR_FILENO)) std::fputc('\n', stderr);
    const auto s = m.stats();
    if (stopped_by != 0) {
      std::fprintf(stderr, "%s: stopped hashing after %s of %s (no checksum)\n",
                   SignalName(stopped_by).c_str(), fabric::FormatSize(at).c_str(),
                   fabric::FormatSize(m.size()).c_str());
    } else {
      std::printf("XXH3_64 %016llx  %s (%s in %.2f s, %.0f MB/s; %llu faults, %llu chunks prefetched)\n",
                  static_cast<unsigned long long>(hash), o.remote->info().name.c_str(),
                  fabric::FormatSize(m.size()).c_str(), seconds,
                  static_cast<double>(m.size()) / 1e6 / seconds, static_cast<unsigned long long>(s.faults),
                  static_cast<unsigned long long>(s.prefetches));
    }
  }

  if (flags.hold && stopped_by == 0) {
    std::fprintf(stderr, "holding the mapping; Ctrl-C or SIGTERM ends it%s\n",
                 flags.writable ? " after a final sync" : "");
    std::optional<CacheProgress> cache_progress;
    if (o.cache) cache_progress.emplace(o.cache->mount());
    while (TakeSignal(stop, kHoldInterval) == 0) {
      std::fprintf(stderr, "%s\n", Progress(m.stats()).c_str());
      if (cache_progress) std::fprintf(stderr, "%s\n", cache_progress->Line().c_str());
    }
  }
  Status closed = m.Close();
  if (!closed.ok()) return Report(kMountCmd, closed.WithContext("final sync"));
  if (o.cache) {
    if (int rc = CloseCache(kMountCmd, *o.cache); rc != kExitOk) return rc;
  }
  return stopped_by != 0 ? kExitInterrupted + stopped_by : kExitOk;
}

}  // namespace

int RunUffdScan(std::string_view command, const TargetFlags& target, const std::string& chunk_text,
                bool prefetch, bool json) {
  auto chunk = ParseByteCount("--chunk", chunk_text);
  if (!chunk.ok()) return Report(command, chunk.status());
  struct Row {
    const char* order;
    double seconds = 0;
    uffd::MappingStats stats;
  } rows[2] = {{"seq", 0, {}}, {"random", 0, {}}};
  std::string transport;
  uint64_t size = 0;
  for (Row& row : rows) {
    uffd::MappingOptions options;
    options.chunk_size = *chunk;
    options.prefetch = prefetch;
    Opened o;
    if (int rc = OpenMapping(command, target, false, 4, options, &o); rc != kExitOk) return rc;
    size = o.mapping->size();
    transport = std::string(o.remote->transport());
    std::vector<uint32_t> pages(static_cast<size_t>(size / kPageSize));
    std::iota(pages.begin(), pages.end(), 0u);
    if (std::strcmp(row.order, "random") == 0) std::shuffle(pages.begin(), pages.end(), std::mt19937(1));
    uint64_t sum = 0;
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t p : pages) {
      sum += static_cast<uint8_t>(
          *static_cast<const volatile std::byte*>(o.mapping->data() + uint64_t{p} * kPageSize));
    }
    row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    row.stats = o.mapping->stats();
    if (sum == 1) std::fputc(' ', stderr);  // keep the loads
  }
  if (json) {
    std::printf(
        "{\"transport\":\"%s\",\"view\":\"uffd\",\"size\":%llu,\"chunk\":%llu,\"prefetch\":%s,\"rows\":[",
        transport.c_str(), static_cast<unsigned long long>(size), static_cast<unsigned long long>(*chunk),
        prefetch ? "true" : "false");
    for (size_t i = 0; i < 2; ++i) {
      std::printf("%s{\"order\":\"%s\",\"mb_per_s\":%.1f,\"faults\":%llu}", i ? "," : "", rows[i].order,
                  static_cast<double>(size) / 1e6 / rows[i].seconds,
                  static_cast<unsigned long long>(rows[i].stats.faults));
    }
    std::printf("]}\n");
  } else {
    std::printf("first-touch scan through a uffd mapping over %s: %s, chunk %s, prefetch %s\n",
                transport.c_str(), fabric::FormatSize(size).c_str(), fabric::FormatSize(*chunk).c_str(),
                prefetch ? "on" : "off");
    for (const Row& row : rows) {
      std::printf("  %-6s %8.0f MB/s  %8llu faults  %8.1f us/fault\n", row.order,
                  static_cast<double>(size) / 1e6 / row.seconds,
                  static_cast<unsigned long long>(row.stats.faults),
                  row.stats.faults ? row.seconds * 1e6 / static_cast<double>(row.stats.faults) : 0.0);
    }
  }
  return kExitOk;
}

void AddMountCommand(CLI::App& app, std::vector<Command>& commands) {
  auto flags = std::make_shared<MountFlags>();
  CLI::App* sub = app.add_subcommand(
      "mount", "Map a remote region into memory (--uffd) or attach it as /dev/nbdX (--nbd)");
  sub->footer(kMountFooter);
  sub->add_option("URL", flags->target.url, "The region: SCHEME://HOST[:PORT]/NAME")->required();
  sub->add_flag("--uffd", flags->uffd, "Map into this process with userfaultfd");
  sub->add_flag("--nbd", flags->nbd, "As a /dev/nbdX block device (root); stays until SIGINT/SIGTERM");
  sub->add_option("DEVICE", flags->device, "--nbd: the device, e.g. /dev/nbd0 (default: any free one)");
  sub->add_flag("--reclaim", flags->reclaim,
                "--nbd: take DEVICE back when a crashed memfabric left it connected");
  sub->add_option("--chunk", flags->chunk,
                  "--uffd: pull/push unit, a power of two from 4K to 2M (default 64K)");
  sub->add_flag("--no-prefetch", flags->no_prefetch, "--uffd: pull only what is touched");
  sub->add_flag("--writable", flags->writable, "Take the region's write lease (one writer per region)");
  sub->add_option("--fill", flags->fill, "Write this byte value (e.g. 0x5a) through the mapping, then sync");
  sub->add_option("--offset", flags->offset, "Where --fill starts (K/M/G; default 0)");
  sub->add_option("--length", flags->length, "How much --fill writes (default: to the end)");
  sub->add_flag("--hold", flags->hold, "Stay mapped until SIGINT/SIGTERM, printing progress each second");
  sub->add_option("--sync-interval", flags->sync_interval, "Push dirty chunks this often (e.g. 2s, 500ms)")
      ->capture_default_str();
  sub->add_option("--connections", flags->connections, "Data connections")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  AddCacheFlags(*sub, flags->cache);
  AddClientFlags(*sub, flags->target.client);
  commands.push_back({sub, [flags] { return RunMount(*flags); }});
}

}  // namespace mf::cli
