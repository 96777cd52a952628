// mount_bench — reading a whole region through a managed mount (fabric::Mount) vs reading
// it directly through the Remote, with an added round-trip latency (the r3map thesis
// experiment: its managed mount reached ~2.4 GB/s at 0 ms and stayed near 1 GB/s below
// 10 ms of RTT on a laptop).
//
// One in-process fabric::Server + TcpServer on 127.0.0.1, and a DelayProxy in front of it
// (bench/delay_proxy.h) adding each RTT of --rtts; the client connects through the proxy
// ("loopback" rows connect straight to the server). Per RTT:
//   direct QD1 / QDn: sequential reads of --block requests, 1 or --depth in flight, each
//     hashed in order as it lands (the app has the bytes);
//   mount CHUNK×DEPTH (--mounts): Mount::Create with the background pull at that chunk
//     size and background depth, WaitAllLocal, then Mount::Read of everything in --block
//     pieces, hashed: the time until every byte was readable by the app.
// Every path's hash is checked against the region's; a mismatch fails the run.
// Baselines: memcpy of the region (the physical limit) and the proxy's own cost at 0 ms
// (the loopback row vs the 0 ms row).
//
//   mount_bench [--size 256M] [--rtts 0,1,5,20] [--mounts 64K:8,64K:128,1M:4,1M:64] [--depth 4]
#include <sys/mman.h>
#include <xxhash.h>

#include <CLI/CLI.hpp>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/delay_proxy.h"
#include "fabric/client.h"
#include "fabric/log.h"
#include "fabric/mount.h"
#include "fabric/region.h"
#include "fabric/server.h"
#include "fabric/url.h"
#include "transports/connect.h"
#include "transports/tcp/tcp_server.h"

namespace mf {
namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kMountTimeout = std::chrono::minutes(10);
constexpr int kMemcpyRuns = 3;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

struct MountConfig {
  std::string text;  // as given, e.g. "1M:64"
  size_t chunk = 0;
  size_t depth = 0;  // 0: MountOptions' default (a depth of kMountDefaultInFlightBytes)
};

Result<MountConfig> ParseMountConfig(const std::string& text) {
  const size_t colon = text.find(':');
  if (colon == std::string::npos) return InvalidArgument("--mounts wants CHUNK:DEPTH, got " + text);
  MF_ASSIGN_OR_RETURN(uint64_t chunk, fabric::ParseSize(text.substr(0, colon)));
  size_t depth = 0;
  const std::string d = text.substr(colon + 1);
  if (d == "default") return MountConfig{text, chunk, 0};
  auto [end, error] = std::from_chars(d.data(), d.data() + d.size(), depth);
  if (error != std::errc() || end != d.data() + d.size() || depth == 0)
    return InvalidArgument("--mounts: bad depth in " + text);
  return MountConfig{text, chunk, depth};
}

// Reads [0, size) in order, `block` bytes a request (split at max_transfer), `depth`
// blocks in flight; hashes each block when it lands. Returns the seconds taken.
Result<double> DirectRead(fabric::Remote& remote, uint64_t size, size_t block, size_t depth, uint64_t* hash) {
  MF_ASSIGN_OR_RETURN(fabric::Buffer buffer, remote.AllocateBuffer(block * depth));
  const size_t piece = std::min(block, remote.max_transfer());
  std::vector<fabric::IoBatch> batches(depth);
  std::vector<uint64_t> offsets(depth);
  std::vector<fabric::IoRequest> requests;
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  uint64_t next = 0;
  auto submit = [&](size_t slot) {
    const uint64_t length = std::min<uint64_t>(block, size - next);
    offsets[slot] = next;
    requests.clear();
    for (uint64_t done = 0; done < length; done += piece) {
      std::span<std::byte> data =
          buffer.span().subspan(slot * block + done, std::min<uint64_t>(piece, length - done));
      requests.push_back(
          {fabric::IoKind::kRead, next + done, data, &buffer, &batches[slot], requests.size()});
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
    const uint64_t length = std::min<uint64_t>(block, size - offsets[slot]);
    XXH3_64bits_update(state, buffer.data() + slot * block, length);
    if (status.ok() && next < size) {
      submit(slot);
      ++in_flight;
    }
  }
  const double seconds = Seconds(start);
  *hash = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  MF_RETURN_IF_ERROR(status);
  return seconds;
}

// A mount with the background pull, until every byte has been read through it by the app.
Result<double> MountRead(fabric::Remote& remote, uint64_t size, size_t block, const MountConfig& config,
                         uint64_t* hash, double* local_seconds, bool verbose) {
  std::vector<std::byte> out(block);
  fabric::MountOptions options;
  options.chunk_size = config.chunk;
  if (config.depth > 0) {
    options.background_depth = config.depth;
    options.in_flight_bytes = 0;  // exactly the depth asked for
  }
  options.read_only = true;
  const auto start = Clock::now();
  MF_ASSIGN_OR_RETURN(auto mount, fabric::Mount::Create(remote, options));
  const double created_seconds = Seconds(start);
  MF_RETURN_IF_ERROR(
      mount->WaitAllLocal(std::chrono::duration_cast<std::chrono::milliseconds>(kMountTimeout)));
  *local_seconds = Seconds(start);
  const fabric::MountStats stats = mount->stats();
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  Status status;
  for (uint64_t at = 0; at < size && status.ok(); at += block) {
    std::span<std::byte> piece = std::span(out).first(std::min<uint64_t>(block, size - at));
    status = mount->Read(at, piece);
    XXH3_64bits_update(state, piece.data(), piece.size());
  }
  const double seconds = Seconds(start);
  *hash = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  MF_RETURN_IF_ERROR(status);
  MF_RETURN_IF_ERROR(mount->Close());
  if (verbose) {
    std::fprintf(stderr,
                 "  [mount %s: created %.3f s, all local %.3f s, all read %.3f s; pulls %llu background %llu "
                 "demand, %.0f MB/s by MountStats]\n",
                 config.text.c_str(), created_seconds, *local_seconds, seconds,
                 static_cast<unsigned long long>(stats.background_pulls),
                 static_cast<unsigned long long>(stats.demand_pulls), stats.pull_bytes_per_second / 1e6);
  }
  return seconds;
}

// memcpy of the region, the best of a few runs: into memory already faulted in (the
// physical limit), or into fresh anonymous memory as a Mount's local copy is (page faults
// included), or into fresh memory asking for transparent huge pages.
enum class Target { kFaultedIn, kFresh, kFreshHugePages };
Result<double> MemcpyBaseline(const std::byte* from, uint64_t size, Target target) {
  double best = 0;
  for (int i = 0; i < kMemcpyRuns; ++i) {
    MF_ASSIGN_OR_RETURN(MappedMemory to, MappedMemory::Anonymous(size));
    if (target == Target::kFaultedIn) std::memset(to.data(), 0, size);
    if (target == Target::kFreshHugePages) (void)::madvise(to.data(), size, MADV_HUGEPAGE);
    const auto start = Clock::now();
    std::memcpy(to.data(), from, size);
    const double s = Seconds(start);
    if (std::memcmp(to.data() + size - 64, from + size - 64, 64) != 0) return Internal("memcpy went wrong");
    best = i == 0 ? s : std::min(best, s);
  }
  return best;
}

struct Endpoints {
  std::unique_ptr<fabric::Client> client;
  std::unique_ptr<fabric::Remote> remote;
  Endpoints() = default;
  Endpoints(Endpoints&&) = default;
  ~Endpoints() {
    if (remote) (void)remote->Close();
  }
};

Result<Endpoints> OpenThrough(uint16_t port, int connections) {
  fabric::Url url;
  url.host = "127.0.0.1";
  url.port = port;
  Endpoints e;
  MF_ASSIGN_OR_RETURN(e.client, transports::Connect(url, transports::ClientOptions{}));
  fabric::OpenOptions open;
  open.connections = connections;
  MF_ASSIGN_OR_RETURN(e.remote, e.client->Open("bench", open));
  return e;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "mount_bench: %s\n", what.c_str());
  return 1;
}

int Run(int argc, char** argv) {
  CLI::App app{"Reading a region through fabric::Mount vs directly through the Remote, with added RTT"};
  std::string size_text = "256M";
  std::string block_text = "1M";
  std::vector<double> rtts = {0, 1, 5, 20};
  std::vector<std::string> mount_texts = {"64K:default", "64K:8", "1M:4", "1M:64"};
  size_t depth = 4;
  int connections = 4;
  std::string buffer_text = "32M";
  bool verbose = false;
  app.add_option("--size", size_text, "region size (K/M/G)");
  app.add_option("--block", block_text, "request size of the direct reads and of the app's Mount::Read");
  app.add_option("--rtts", rtts, "added round-trip times in ms (0 still goes through the proxy)")
      ->delimiter(',');
  app.add_option("--mounts", mount_texts,
                 "mount configurations CHUNK:BACKGROUND_DEPTH (DEPTH 'default': MountOptions' own)")
      ->delimiter(',');
  app.add_option("--depth", depth, "direct reads in flight (the QDn column)");
  app.add_option("--connections", connections, "TCP data connections of the client");
  app.add_option("--proxy-buffer", buffer_text, "bytes the proxy holds per direction of a connection");
  app.add_flag("--verbose", verbose, "per-mount timings on stderr");
  CLI11_PARSE(app, argc, argv);
  (void)InitLogging("warn");

  auto size = fabric::ParseSize(size_text);
  auto block = fabric::ParseSize(block_text);
  auto buffer = fabric::ParseSize(buffer_text);
  if (!size.ok() || !block.ok() || !buffer.ok() || *size == 0 || *block == 0 || depth == 0)
    return Fail("bad --size, --block, --proxy-buffer or --depth");
  std::vector<MountConfig> mounts;
  for (const std::string& t : mount_texts) {
    auto c = ParseMountConfig(t);
    if (!c.ok()) return Fail(c.status().ToString());
    mounts.push_back(*c);
  }

  fabric::ServerOptions server_options;
  server_options.insecure = true;
  fabric::Server server(std::move(server_options));
  auto created = server.Create({"bench", *size, fabric::BackingKind::kAnonymous, ""});
  auto handle = server.Open("bench", false);
  if (!created.ok() || !handle.ok())
    return Fail((created.ok() ? handle.status() : created.status()).ToString());
  std::byte* region = handle->region()->data();
  for (uint64_t i = 0; i + 8 <= *size; i += 8) {
    const uint64_t v = (i + 1) * 0x9e3779b97f4a7c15ull;
    std::memcpy(region + i, &v, 8);
  }
  const uint64_t expected = XXH3_64bits(region, *size);
  tcp::ListenOptions listen;
  listen.host = "127.0.0.1";
  listen.port = 0;
  auto tcp_server = tcp::TcpServer::Start(server, listen);
  if (!tcp_server.ok()) return Fail(tcp_server.status().ToString());
  bench::DelayProxyOptions proxy_options;
  proxy_options.upstream_port = (*tcp_server)->port();
  proxy_options.buffer_bytes = *buffer;
  auto proxy = bench::DelayProxy::Start(proxy_options);
  if (!proxy.ok()) return Fail(proxy.status().ToString());

  auto memcpy_seconds = MemcpyBaseline(region, *size, Target::kFaultedIn);
  auto fresh_seconds = MemcpyBaseline(region, *size, Target::kFresh);
  auto huge_seconds = MemcpyBaseline(region, *size, Target::kFreshHugePages);
  for (const auto* r : {&memcpy_seconds, &fresh_seconds, &huge_seconds}) {
    if (!r->ok()) return Fail(r->status().ToString());
  }
  const double mb = static_cast<double>(*size) / 1e6;

  std::printf("mount_bench: %s region, in-process server over TCP loopback (%d connections), %s requests\n",
              fabric::FormatSize(*size).c_str(), connections, block_text.c_str());
  std::printf("delay proxy: %s per direction per connection; mounts are CHUNK×BACKGROUND_DEPTH\n",
              fabric::FormatSize(*buffer).c_str());
  std::printf(
      "baseline: memcpy of the region %.0f MB/s into faulted-in memory, %.0f MB/s into fresh memory, %.0f "
      "MB/s "
      "into fresh memory with MADV_HUGEPAGE (best of %d)\n\n",
      mb / *memcpy_seconds, mb / *fresh_seconds, mb / *huge_seconds, kMemcpyRuns);
  std::printf("%-9s %10s %10s", "RTT", "direct QD1", ("direct QD" + std::to_string(depth)).c_str());
  for (const MountConfig& m : mounts) std::printf(" %13s %6s", ("mount " + m.text).c_str(), "ratio");
  std::printf("   (MB/s; ratio = mount / direct QD%zu)\n", depth);
  std::fflush(stdout);

  struct Row {
    std::string name;
    bool proxied;
    double rtt_ms;
  };
  std::vector<Row> rows = {{"loopback", false, 0}};
  for (double r : rtts) {
    char name[32];
    std::snprintf(name, sizeof(name), "%g ms", r);
    rows.push_back({name, true, r});
  }

  double loopback_qdn = 0, proxy0_qdn = 0;
  std::vector<std::string> notes;
  for (const Row& row : rows) {
    (*proxy)->set_rtt(std::chrono::microseconds(static_cast<int64_t>(row.rtt_ms * 1000)));
    auto ends = OpenThrough(row.proxied ? (*proxy)->port() : (*tcp_server)->port(), connections);
    if (!ends.ok()) return Fail(ends.status().ToString());
    fabric::Remote& remote = *ends->remote;
    std::printf("%-9s", row.name.c_str());
    std::fflush(stdout);
    double qdn_mbs = 0;
    for (size_t d : {size_t{1}, depth}) {
      uint64_t hash = 0;
      auto seconds = DirectRead(remote, *size, *block, d, &hash);
      if (!seconds.ok()) return Fail("direct read: " + seconds.status().ToString());
      if (hash != expected) return Fail("direct read at QD" + std::to_string(d) + " read wrong bytes");
      const double mbs = mb / *seconds;
      if (d == depth) qdn_mbs = mbs;
      std::printf(" %10.0f", mbs);
      std::fflush(stdout);
    }
    if (!row.proxied) loopback_qdn = qdn_mbs;
    if (row.proxied && row.rtt_ms == 0) proxy0_qdn = qdn_mbs;
    for (const MountConfig& m : mounts) {
      uint64_t hash = 0;
      double local_seconds = 0;
      auto seconds = MountRead(remote, *size, *block, m, &hash, &local_seconds, verbose);
      if (!seconds.ok()) return Fail("mount " + m.text + ": " + seconds.status().ToString());
      if (hash != expected) return Fail("mount " + m.text + " read wrong bytes");
      const double mbs = mb / *seconds;
      std::printf(" %13.0f %5.2fx", mbs, mbs / qdn_mbs);
      std::fflush(stdout);
      // What a mount can pull at most: depth chunks per round trip.
      if (row.rtt_ms > 0 && m.depth > 0) {
        const double cap = static_cast<double>(m.chunk * m.depth) / (row.rtt_ms / 1000) / 1e6;
        if (cap < 2 * mbs) {
          char note[160];
          std::snprintf(note, sizeof(note),
                        "mount %s at %g ms: %.0f MB/s, bound by its depth (%zu × %s per RTT = %.0f MB/s)",
                        m.text.c_str(), row.rtt_ms, mbs, m.depth, fabric::FormatSize(m.chunk).c_str(), cap);
          notes.push_back(note);
        }
      }
    }
    std::printf("\n");
    std::fflush(stdout);
  }
  std::printf(
      "\nproxy's own cost at 0 ms: direct QD%zu %.0f MB/s through the proxy vs %.0f MB/s straight (%.2fx)\n",
      depth, proxy0_qdn, loopback_qdn, loopback_qdn > 0 ? proxy0_qdn / loopback_qdn : 0.0);
  std::printf("proxy forwarded %.0f MB over %llu connections\n",
              static_cast<double>((*proxy)->bytes_forwarded()) / 1e6,
              static_cast<unsigned long long>((*proxy)->connections()));
  for (const std::string& n : notes) std::printf("note: %s\n", n.c_str());
  proxy->reset();
  (*tcp_server)->Stop();
  return 0;
}

}  // namespace
}  // namespace mf

int main(int argc, char** argv) {
  return mf::Run(argc, argv);
}
