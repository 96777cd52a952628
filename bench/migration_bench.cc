// migration_bench — downtime of a migration (fabric/migration.h) against its physical
// minimum, for several fractions of the region dirtied after the pre-copy.
//
// One in-process fabric::Server + TcpServer on 127.0.0.1 (optionally behind a DelayProxy,
// --rtt-ms). Per fraction: the source is a MountSource on a writable Remote (its own client
// session) whose Mount holds the whole region; the destination a Leecher on a read-only
// Remote (another session), the two talking over a socketpair. Once the destination holds
// the whole region (its pre-copy is complete and READY goes out), the bench writes a
// pattern over that fraction of the chunks (random, distinct, whole chunks via
// Mount::Write), then runs Seeder::Finalize with a no-op suspend hook. Push interval 0 by
// default: every dirtied chunk is pushed during the downtime (the worst case).
//
// The physical minimum is what the downtime must move over the link: the source pushes
// the dirty bytes (a write) and the destination pulls them again (a read), so
//   minimum = dirty bytes / write bandwidth + dirty bytes / read bandwidth,
// both measured in the same run over the same transport (sequential --block requests at
// --link-depth through a Remote). At the end of each migration the destination's bytes,
// the source's final bytes and the server's bytes must have the same hash; the run fails
// otherwise.
//
//   migration_bench [--size 1G] [--fractions 1,10,50] [--chunk 64K] [--rtt-ms 0]
#include <sys/socket.h>
#include <xxhash.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bench/delay_proxy.h"
#include "fabric/client.h"
#include "fabric/log.h"
#include "fabric/migration.h"
#include "fabric/region.h"
#include "fabric/server.h"
#include "fabric/url.h"
#include "transports/connect.h"
#include "transports/tcp/tcp_server.h"

namespace mf {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
constexpr auto kLocalTimeout = milliseconds(600000);
constexpr auto kReadyPoll = std::chrono::microseconds(200);
constexpr char kRegion[] = "mig";
constexpr int kLinkRuns = 3;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}
double Ms(uint64_t ns) {
  return static_cast<double>(ns) / 1e6;
}

// Sequential transfer of [0, size) in `block` requests with `depth` in flight; seconds.
Result<double> Sequential(fabric::Remote& remote, fabric::IoKind kind, uint64_t size, size_t block,
                          size_t depth) {
  MF_ASSIGN_OR_RETURN(fabric::Buffer buffer, remote.AllocateBuffer(block * depth));
  std::memset(buffer.data(), 0x3c, buffer.size());
  const size_t piece = std::min(block, remote.max_transfer());
  std::vector<fabric::IoBatch> batches(depth);
  std::vector<fabric::IoRequest> requests;
  uint64_t next = 0;
  auto submit = [&](size_t slot) {
    const uint64_t length = std::min<uint64_t>(block, size - next);
    requests.clear();
    for (uint64_t done = 0; done < length; done += piece) {
      std::span<std::byte> data =
          buffer.span().subspan(slot * block + done, std::min<uint64_t>(piece, length - done));
      requests.push_back({kind, next + done, data, &buffer, &batches[slot], requests.size()});
    }
    batches[slot].Reset(requests.size());
    remote.Submit(requests);
    next += length;
  };
  const auto start = Clock::now();
  size_t in_flight = 0;
  for (size_t slot = 0; slot < depth && next < size; ++slot, ++in_flight) submit(slot);
  Status status;
  for (size_t slot = 0; in_flight > 0; slot = (slot + 1) % depth, --in_flight) {
    Status landed = batches[slot].Wait();
    if (status.ok()) status = std::move(landed);
    if (status.ok() && next < size) {
      submit(slot);
      ++in_flight;
    }
  }
  const double seconds = Seconds(start);
  MF_RETURN_IF_ERROR(status);
  if (kind == fabric::IoKind::kWrite) MF_RETURN_IF_ERROR(remote.Flush());
  return seconds;
}

struct Settings {
  uint64_t size = 0;
  size_t chunk = 0;
  size_t depth = 0;       // background pulls of both mounts
  size_t push_depth = 0;  // the source's pushes in flight
  milliseconds push_interval{0};
  int connections = 4;
  uint16_t port = 0;  // the server's, or the proxy's
};

Result<std::unique_ptr<fabric::Client>> Connect(const Settings& s) {
  fabric::Url url;
  url.host = "127.0.0.1";
  url.port = s.port;
  return transports::Connect(url, transports::ClientOptions{});
}

Result<std::unique_ptr<fabric::Remote>> Open(fabric::Client& client, const Settings& s, bool writable) {
  fabric::OpenOptions o;
  o.writable = writable;
  o.connections = s.connections;
  return client.Open(kRegion, o);
}

fabric::MountOptions MountOptionsFor(const Settings& s) {
  fabric::MountOptions o;
  o.chunk_size = s.chunk;
  // 0 keeps MountOptions' defaults (depths of kMountDefaultInFlightBytes).
  if (s.depth > 0 || s.push_depth > 0) o.in_flight_bytes = 0;
  if (s.depth > 0) o.background_depth = s.depth;
  if (s.push_depth > 0) o.push_depth = s.push_depth;
  o.push_interval = s.push_interval;
  return o;
}

// Whole chunks of a pattern unique to the migration, the chunk and the word.
Status WritePattern(fabric::Mount& mount, std::span<const uint64_t> chunks, uint64_t salt) {
  std::vector<uint64_t> words(mount.chunk_size() / 8);
  for (uint64_t c : chunks) {
    const uint64_t offset = c * mount.chunk_size();
    const size_t length = std::min<uint64_t>(mount.chunk_size(), mount.size() - offset);
    for (size_t i = 0; i < words.size(); ++i) words[i] = (salt << 48) ^ (c << 20) ^ i;
    MF_RETURN_IF_ERROR(mount.Write(offset, std::as_bytes(std::span(words)).first(length))
                           .WithContext("dirtying chunk " + std::to_string(c)));
  }
  return Status::Ok();
}

struct Outcome {
  fabric::MigrationStats stats;
  uint64_t dirtied = 0;  // chunks the bench wrote
  double dirty_s = 0;    // writing them (before the downtime)
  double precopy_s = 0;  // destination start → whole region local
};

// One migration of the region with `fraction` of its chunks dirtied after the pre-copy.
Result<Outcome> Migrate(const Settings& s, double fraction, uint64_t salt, const std::byte* server_bytes) {
  Outcome out;
  MF_ASSIGN_OR_RETURN(auto source_client, Connect(s));
  MF_ASSIGN_OR_RETURN(auto dest_client, Connect(s));
  MF_ASSIGN_OR_RETURN(auto writable, Open(*source_client, s, true));
  fabric::Client* src = source_client.get();
  MF_ASSIGN_OR_RETURN(auto source, fabric::MountSource::Create(std::move(writable), MountOptionsFor(s),
                                                               [src, &s] { return Open(*src, s, true); }));
  // The workload's host has its data local before the migration starts.
  MF_RETURN_IF_ERROR(source->mount().WaitAllLocal(kLocalTimeout));

  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
    return Status::FromErrno(errno, "socketpair");
  UniqueFd source_fd(fds[0]), dest_fd(fds[1]);
  const int source_end = fds[0];  // owned by the Seeder from here on
  std::atomic<bool> resumed{false};
  fabric::SeederOptions so;
  so.suspend = [] { return Status::Ok(); };  // the bench's writer has stopped already
  so.resume = [&resumed] { resumed.store(true); };
  MF_ASSIGN_OR_RETURN(auto seeder, fabric::Seeder::Start(*source, std::move(source_fd), so));

  const auto precopy_start = Clock::now();
  MF_ASSIGN_OR_RETURN(auto read_only, Open(*dest_client, s, false));
  fabric::LeecherOptions lo;
  lo.mount = MountOptionsFor(s);
  fabric::Client* dst = dest_client.get();
  lo.open_writable = [dst, &s] { return Open(*dst, s, true); };
  MF_ASSIGN_OR_RETURN(auto leecher, fabric::Leecher::Start(std::move(read_only), std::move(dest_fd), lo));
  Status run;
  std::thread destination([&] { run = leecher->Run(); });
  // On an early return the destination would wait for the dirty set: break the channel.
  struct Joiner {
    std::thread& t;
    int channel;
    ~Joiner() {
      if (!t.joinable()) return;
      (void)::shutdown(channel, SHUT_RDWR);
      t.join();
    }
  } joiner{destination, source_end};

  // Pre-copy complete: the destination's Mount holds every chunk (READY follows at once).
  const uint64_t chunks = (s.size + s.chunk - 1) / s.chunk;
  while (leecher->mount().stats().local_chunks < chunks) {
    if (Seconds(precopy_start) > std::chrono::duration<double>(kLocalTimeout).count())
      return Status(Code::kTimeout, "destination pre-copy");
    std::this_thread::sleep_for(kReadyPoll);
  }
  out.precopy_s = Seconds(precopy_start);

  // Dirty `fraction` of the chunks, chosen at random.
  std::vector<uint64_t> order(chunks);
  std::iota(order.begin(), order.end(), uint64_t{0});
  std::shuffle(order.begin(), order.end(), std::mt19937_64(salt));
  out.dirtied = std::max<uint64_t>(1, static_cast<uint64_t>(fraction * static_cast<double>(chunks) + 0.5));
  order.resize(out.dirtied);
  std::sort(order.begin(), order.end());
  const auto dirty_start = Clock::now();
  MF_RETURN_IF_ERROR(WritePattern(source->mount(), order, salt));
  out.dirty_s = Seconds(dirty_start);

  auto stats = seeder->Finalize();
  destination.join();
  if (!stats.ok()) return stats.status().WithContext("finalize");
  if (!run.ok()) return run.WithContext("destination");
  if (resumed.load()) return Internal("the source was resumed after a successful migration");
  out.stats = *stats;
  if (out.stats.dirty_chunks != out.dirtied)
    return Internal("dirty set has " + std::to_string(out.stats.dirty_chunks) + " chunks, the bench wrote " +
                    std::to_string(out.dirtied));

  // The destination ends with the source's final bytes, and so does the server.
  fabric::Mount& dm = leecher->mount();
  MF_RETURN_IF_ERROR(dm.EnsureLocal(0, s.size));
  const uint64_t source_hash = XXH3_64bits(source->mount().data(), s.size);
  const uint64_t dest_hash = XXH3_64bits(dm.data(), s.size);
  const uint64_t server_hash = XXH3_64bits(server_bytes, s.size);
  if (dest_hash != source_hash || server_hash != source_hash) {
    char what[200];
    std::snprintf(what, sizeof(what),
                  "bytes differ after the migration: source %016llx destination %016llx server %016llx",
                  static_cast<unsigned long long>(source_hash), static_cast<unsigned long long>(dest_hash),
                  static_cast<unsigned long long>(server_hash));
    return Internal(what);
  }
  if (dm.read_only()) return Internal("the destination's mount is not writable after the migration");
  return out;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "migration_bench: FAILED: %s\n", what.c_str());
  return 1;
}

int Run(int argc, char** argv) {
  CLI::App app{"Migration downtime vs the physical minimum (dirty bytes over the measured link)"};
  std::string size_text = "1G";
  std::string chunk_text = "64K";
  std::string block_text = "1M";
  std::vector<double> fractions = {1, 10, 50};
  Settings s;
  s.depth = 0;  // MountOptions' defaults
  s.push_depth = 0;
  int push_interval_ms = 0;
  size_t link_depth = 16;
  double rtt_ms = 0;
  app.add_option("--size", size_text, "region size (K/M/G)");
  app.add_option("--fractions", fractions, "percent of the chunks dirtied after pre-copy")->delimiter(',');
  app.add_option("--chunk", chunk_text, "chunk size of both mounts (the dirty-tracking unit)");
  app.add_option("--depth", s.depth,
                 "background pulls in flight (both mounts; the destination's re-pull too); 0: the default");
  app.add_option("--push-depth", s.push_depth, "the source's pushes in flight; 0: the default");
  app.add_option("--push-interval-ms", push_interval_ms,
                 "the source's background push interval (0: only on sync)");
  app.add_option("--connections", s.connections, "TCP data connections per Remote");
  app.add_option("--block", block_text, "request size of the link measurement");
  app.add_option("--link-depth", link_depth, "requests in flight in the link measurement");
  app.add_option("--rtt-ms", rtt_ms, "round trip added by a delaying proxy (0: straight to the server)");
  CLI11_PARSE(app, argc, argv);
  (void)InitLogging("warn");

  auto size = fabric::ParseSize(size_text);
  auto chunk = fabric::ParseSize(chunk_text);
  auto block = fabric::ParseSize(block_text);
  if (!size.ok() || !chunk.ok() || !block.ok() || *size == 0 || link_depth == 0)
    return Fail("bad --size, --chunk, --block or --link-depth");
  s.size = *size;
  s.chunk = *chunk;
  s.push_interval = milliseconds(push_interval_ms);

  fabric::ServerOptions server_options;
  server_options.insecure = true;
  fabric::Server server(std::move(server_options));
  auto created = server.Create({kRegion, s.size, fabric::BackingKind::kMemfd, ""});
  auto handle = server.Open(kRegion, false);
  if (!created.ok() || !handle.ok())
    return Fail((created.ok() ? handle.status() : created.status()).ToString());
  std::byte* server_bytes = handle->region()->data();
  tcp::ListenOptions listen;
  listen.host = "127.0.0.1";
  listen.port = 0;
  auto tcp_server = tcp::TcpServer::Start(server, listen);
  if (!tcp_server.ok()) return Fail(tcp_server.status().ToString());
  s.port = (*tcp_server)->port();
  std::unique_ptr<bench::DelayProxy> proxy;
  if (rtt_ms > 0) {
    bench::DelayProxyOptions po;
    po.upstream_port = s.port;
    po.rtt = std::chrono::microseconds(static_cast<int64_t>(rtt_ms * 1000));
    auto started = bench::DelayProxy::Start(po);
    if (!started.ok()) return Fail(started.status().ToString());
    proxy = std::move(started).value();
    s.port = proxy->port();
  }

  // Known, varied bytes in the region (this also faults its pages in before the link is
  // measured, so that the writes measure the link, not the server's page faults).
  auto fill = [&] {
    for (uint64_t i = 0; i + 8 <= s.size; i += 8) {
      const uint64_t v = (i + 7) * 0x9e3779b97f4a7c15ull;
      std::memcpy(server_bytes + i, &v, 8);
    }
  };
  fill();
  // The link, over the same transport: sequential writes, then reads, of the whole region;
  // the best of kLinkRuns each.
  double write_bps = 0, read_bps = 0;
  {
    auto client = Connect(s);
    if (!client.ok()) return Fail(client.status().ToString());
    auto remote = Open(**client, s, true);
    if (!remote.ok()) return Fail(remote.status().ToString());
    for (int i = 0; i < kLinkRuns; ++i) {
      auto w = Sequential(**remote, fabric::IoKind::kWrite, s.size, *block, link_depth);
      auto r = Sequential(**remote, fabric::IoKind::kRead, s.size, *block, link_depth);
      if (!w.ok() || !r.ok()) return Fail("link: " + (w.ok() ? r.status() : w.status()).ToString());
      write_bps = std::max(write_bps, static_cast<double>(s.size) / *w);
      read_bps = std::max(read_bps, static_cast<double>(s.size) / *r);
    }
    (void)(*remote)->Close();
  }
  fill();  // the link measurement overwrote it

  char rtt_text[64] = "";
  if (rtt_ms > 0) std::snprintf(rtt_text, sizeof(rtt_text), " via a delaying proxy, RTT %g ms", rtt_ms);
  const std::string rtt_label = rtt_text;
  std::printf(
      "migration_bench: %s region (memfd), in-process server over TCP loopback%s, %d connections a Remote\n",
      fabric::FormatSize(s.size).c_str(), rtt_label.c_str(), s.connections);
  const fabric::MountOptions used = MountOptionsFor(s);
  const uint64_t chunks = (s.size + s.chunk - 1) / s.chunk;
  const auto effective = [&](size_t depth) {  // as Mount::Create raises it
    return std::max<uint64_t>(depth, std::min<uint64_t>(used.in_flight_bytes / s.chunk, chunks));
  };
  std::printf("mounts: chunk %s, background depth %" PRIu64 ", push depth %" PRIu64
              ", push interval %d ms; channel: socketpair\n",
              fabric::FormatSize(s.chunk).c_str(), effective(used.background_depth),
              effective(used.push_depth), push_interval_ms);
  std::printf("link (same run, %s requests at QD%zu, best of %d): write %.0f MB/s, read %.0f MB/s\n",
              block_text.c_str(), link_depth, kLinkRuns, write_bps / 1e6, read_bps / 1e6);
  std::printf(
      "minimum = dirty/write_bw + dirty/read_bw (the source pushes the dirty bytes, the destination "
      "pulls them again)\n\n");
  std::printf("%6s %7s %9s %11s %8s %8s %9s %8s %8s %8s %10s %7s %9s\n", "dirty", "chunks", "MiB",
              "downtime ms", "suspend", "push", "handover", "lease", "re-pull", "other", "minimum ms",
              "ratio", "precopy s");
  std::fflush(stdout);
  uint64_t salt = 1;
  for (double percent : fractions) {
    auto outcome = Migrate(s, percent / 100, salt++, server_bytes);
    if (!outcome.ok()) return Fail(std::to_string(percent) + " %: " + outcome.status().ToString());
    const fabric::MigrationStats& m = outcome->stats;
    const double dirty = static_cast<double>(m.dirty_bytes);
    const double minimum_ms = (dirty / write_bps + dirty / read_bps) * 1e3;
    const uint64_t parts = m.suspend_ns + m.push_ns + m.handover_ns + m.lease_ns + m.repull_ns;
    const double other = m.downtime_ns > parts ? Ms(m.downtime_ns - parts) : 0.0;
    char label[16];
    std::snprintf(label, sizeof(label), "%g %%", percent);
    std::printf("%6s %7llu %9.1f %11.2f %8.2f %8.2f %9.2f %8.2f %8.2f %8.2f %10.2f %6.2fx %9.2f\n", label,
                static_cast<unsigned long long>(m.dirty_chunks), dirty / (1 << 20), Ms(m.downtime_ns),
                Ms(m.suspend_ns), Ms(m.push_ns), Ms(m.handover_ns), Ms(m.lease_ns), Ms(m.repull_ns), other,
                minimum_ms, Ms(m.downtime_ns) / minimum_ms, outcome->precopy_s);
    std::fflush(stdout);
    if (m.repull_bytes < m.dirty_bytes)
      std::printf("  note: re-pulled %llu bytes, fewer than the dirty %llu\n",
                  static_cast<unsigned long long>(m.repull_bytes),
                  static_cast<unsigned long long>(m.dirty_bytes));
  }
  if (rtt_ms > 0) {
    std::printf(
        "\nnote: the minimum counts bytes only; with an RTT of %g ms the push and the re-pull need at "
        "least one round trip each on top (%g ms)\n",
        rtt_ms, 2 * rtt_ms);
  }
  std::printf(
      "\nevery migration verified: destination bytes == source's final bytes == server bytes (XXH3)\n");
  proxy.reset();
  (*tcp_server)->Stop();
  return 0;
}

}  // namespace
}  // namespace mf

int main(int argc, char** argv) {
  return mf::Run(argc, argv);
}
