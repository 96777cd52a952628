// memfabric bench: latency and throughput of one region as seen from this client.
//
// For each pattern it runs time-bound rows, each keeping a fixed number of requests in
// flight (the depth) and timing every request from Submit to completion:
//   randread / randwrite  random block-aligned --block requests at depth 1 (latency) and
//                         at --depth (IOPS)
//   read / write          sequential --seq-block requests at --seq-depth (throughput)
// Random rows run over --connections data connections, sequential ones over
// --seq-connections; the region is reopened between rows when that number changes.
// Writes overwrite the region's contents and need its write lease.
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fabric/client.h"
#include "fabric/region.h"
#include "fabric/remote.h"
#include "fabric/thread_annotations.h"
#include "tools/cli_common.h"

namespace mf::cli {
namespace {

constexpr char kCmd[] = "bench";
using Clock = std::chrono::steady_clock;

constexpr size_t kMaxDepth = 256;
constexpr auto kProgressInterval = std::chrono::milliseconds(500);
constexpr size_t kLatencyReserve = 1u << 20;  // samples preallocated per row

struct BenchFlags {
  TargetFlags target;
  double seconds = 2.0;
  size_t depth = 16;
  std::string block = "4K";
  size_t seq_depth = 4;
  int connections = 1;      // for the random rows
  int seq_connections = 2;  // for the sequential rows
  std::string seq_block = "1M";
  std::string pattern = "randread,randwrite,read,write";
  bool json = false;
  bool quiet = false;
  bool uffd = false;          // scan through a userfaultfd mapping instead
  std::string chunk = "64K";  // with --uffd
  bool no_prefetch = false;   // with --uffd
  bool no_poll = false;       // sleep until the transport calls back, even where it could poll
};

struct Row {
  std::string pattern;
  bool write = false;
  bool random = false;
  size_t block = 0;
  size_t depth = 0;
  int connections = 1;
};

struct RowResult {
  Row row;
  uint64_t ops = 0;
  double seconds = 0;
  double iops = 0;
  double bytes_per_second = 0;
  double p50_us = 0, p99_us = 0, p999_us = 0, max_us = 0;
};

// Collects completions from transport threads for the one thread that drives a row.
class Completions final : public fabric::IoCallback {
 public:
  struct Done {
    uint64_t slot;
    Clock::time_point at;
  };

  explicit Completions(size_t depth) {
    MutexLock lock(mu_);
    done_.reserve(depth);
  }

  void OnIoComplete(uint64_t cookie, const Status& status) override MF_EXCLUDES(mu_) {
    const Clock::time_point now = Clock::now();
    {
      MutexLock lock(mu_);
      done_.push_back({cookie, now});
      if (!status.ok() && error_.ok()) error_ = status;
    }
    cv_.notify_one();
  }

  // Waits for at least one completion and swaps all of them into *out (cleared first).
  // Returns the first error seen so far. With `spin`, this thread never sleeps: it polls
  // the transport itself where the transport allows (RDMA), and otherwise yields until a
  // transport thread has called back, which saves the wake-up of a sleeping thread per
  // completion (fio's nbd engine and perftest do not hand completions between threads
  // either).
  Status Take(std::vector<Done>* out, fabric::Remote& remote, bool spin) MF_EXCLUDES(mu_) {
    out->clear();
    const bool poll = spin && remote.can_poll();
    // Yield-spinning for another thread's callback only pays with a core to spare.
    spin = poll || (spin && std::thread::hardware_concurrency() > 1);
    while (spin) {
      {
        MutexLock lock(mu_);
        if (!done_.empty()) {
          done_.swap(*out);
          return error_;
        }
      }
      if (!poll || remote.Poll() == 0) std::this_thread::yield();
    }
    MutexLock lock(mu_);
    cv_.wait(mu_, [this]() MF_NO_THREAD_SAFETY_ANALYSIS { return !done_.empty(); });
    done_.swap(*out);
    return error_;
  }

 private:
  Mutex mu_;
  std::condition_variable_any cv_;
  std::vector<Done> done_ MF_GUARDED_BY(mu_);
  Status error_ MF_GUARDED_BY(mu_);
};

double Percentile(const std::vector<uint64_t>& sorted_ns, double q) {
  if (sorted_ns.empty()) return 0;
  const size_t index =
      std::min(sorted_ns.size() - 1, static_cast<size_t>(q * static_cast<double>(sorted_ns.size())));
  return static_cast<double>(sorted_ns[index]) / 1000.0;
}

std::string RowLabel(const Row& row) {
  return fmt::format("{} {} QD{}", row.pattern, fabric::FormatSize(row.block), row.depth);
}

// Runs one row on `remote` for `seconds`; progress goes to stderr when `progress`.
Result<RowResult> RunRow(fabric::Remote& remote, const Row& row, double seconds, bool progress, bool poll,
                         uint64_t seed) {
  MF_ASSIGN_OR_RETURN(fabric::Buffer buffer, remote.AllocateBuffer(row.block * row.depth));
  if (row.write) {
    std::mt19937_64 fill(seed);
    for (size_t i = 0; i + sizeof(uint64_t) <= buffer.size(); i += sizeof(uint64_t)) {
      const uint64_t v = fill();
      std::memcpy(buffer.data() + i, &v, sizeof(v));
    }
  }
  const uint64_t blocks = remote.size() / row.block;
  std::mt19937_64 rng(seed);
  uint64_t next_sequential = 0;
  auto next_offset = [&]() -> uint64_t {
    if (row.random) return (rng() % blocks) * row.block;
    const uint64_t offset = next_sequential * row.block;
    next_sequential = (next_sequential + 1) % blocks;
    return offset;
  };

  Completions completions(row.depth);
  std::vector<fabric::IoRequest> requests(row.depth);
  std::vector<Clock::time_point> started(row.depth);
  std::vector<fabric::IoRequest> batch;
  batch.reserve(row.depth);
  std::vector<Completions::Done> done;
  done.reserve(row.depth);
  std::vector<uint64_t> latencies_ns;
  latencies_ns.reserve(kLatencyReserve);

  const Clock::time_point start = Clock::now();
  const Clock::time_point deadline =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  Clock::time_point next_progress = start + kProgressInterval;
  for (size_t slot = 0; slot < row.depth; ++slot) {
    fabric::IoRequest& r = requests[slot];
    r.kind = row.write ? fabric::IoKind::kWrite : fabric::IoKind::kRead;
    r.offset = next_offset();
    r.data = buffer.span().subspan(slot * row.block, row.block);
    r.buffer = &buffer;
    r.callback = &completions;
    r.cookie = slot;
    started[slot] = Clock::now();
    batch.push_back(r);
  }
  if (poll) remote.SetCallerPolling(true);
  remote.Submit(batch);
  size_t in_flight = row.depth;
  Status error;
  while (in_flight > 0) {
    Status status = completions.Take(&done, remote, poll);
    if (!status.ok() && error.ok()) error = std::move(status);
    const Clock::time_point now = Clock::now();
    const bool stop = now >= deadline || !error.ok();
    batch.clear();
    for (const Completions::Done& d : done) {
      latencies_ns.push_back(static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(d.at - started[d.slot]).count()));
      if (stop) {
        --in_flight;
        continue;
      }
      fabric::IoRequest& r = requests[d.slot];
      r.offset = next_offset();
      started[d.slot] = Clock::now();
      batch.push_back(r);
    }
    if (!batch.empty()) remote.Submit(batch);
    if (progress && now >= next_progress) {
      const double elapsed = std::chrono::duration<double>(now - start).count();
      std::fprintf(stderr, "\rbench: %-24s %4.1f/%.1f s  %10.0f IOPS", RowLabel(row).c_str(), elapsed,
                   seconds, static_cast<double>(latencies_ns.size()) / elapsed);
      next_progress = now + kProgressInterval;
    }
  }
  if (poll) remote.SetCallerPolling(false);
  if (progress) std::fprintf(stderr, "\r%70s\r", "");
  if (!error.ok()) return error.WithContext(RowLabel(row));

  RowResult result;
  result.row = row;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  result.ops = latencies_ns.size();
  result.iops = static_cast<double>(result.ops) / result.seconds;
  result.bytes_per_second = result.iops * static_cast<double>(row.block);
  std::sort(latencies_ns.begin(), latencies_ns.end());
  result.p50_us = Percentile(latencies_ns, 0.50);
  result.p99_us = Percentile(latencies_ns, 0.99);
  result.p999_us = Percentile(latencies_ns, 0.999);
  result.max_us = latencies_ns.empty() ? 0 : static_cast<double>(latencies_ns.back()) / 1000.0;
  return result;
}

std::string HumanCount(double v) {
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
  return fmt::format("{:.0f}", v);
}

void PrintTable(const fabric::Url& url, std::string_view transport, uint64_t size, double seconds,
                const std::vector<RowResult>& results) {
  fmt::print("memfabric bench {}: transport {}, region {}, {:.1f} s per row\n", url.ToString(), transport,
             fabric::FormatSize(size), seconds);
  fmt::print("{:<10} {:>8} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9}\n", "pattern", "block", "depth", "IOPS",
             "MB/s", "p50 us", "p99 us", "p999 us");
  for (const RowResult& r : results) {
    fmt::print("{:<10} {:>8} {:>6} {:>10} {:>10.1f} {:>9.1f} {:>9.1f} {:>9.1f}\n", r.row.pattern,
               fabric::FormatSize(r.row.block), r.row.depth, HumanCount(r.iops), r.bytes_per_second / 1e6,
               r.p50_us, r.p99_us, r.p999_us);
  }
}

void PrintJson(const fabric::Url& url, std::string_view transport, uint64_t size, double seconds,
               const std::vector<RowResult>& results) {
  fmt::print(
      "{{\"url\": \"{}\", \"transport\": \"{}\", \"region_size\": {}, \"seconds_per_row\": {},\n \"rows\": [",
      url.ToString(), transport, size, seconds);
  for (size_t i = 0; i < results.size(); ++i) {
    const RowResult& r = results[i];
    fmt::print(
        "{}\n  {{\"pattern\": \"{}\", \"block\": {}, \"depth\": {}, \"ops\": {}, \"seconds\": {:.3f}, "
        "\"iops\": {:.1f}, \"bytes_per_sec\": {:.0f}, \"lat_us\": {{\"p50\": {:.2f}, \"p99\": {:.2f}, "
        "\"p999\": {:.2f}, \"max\": {:.2f}}}}}",
        i == 0 ? "" : ",", r.row.pattern, r.row.block, r.row.depth, r.ops, r.seconds, r.iops,
        r.bytes_per_second, r.p50_us, r.p99_us, r.p999_us, r.max_us);
  }
  fmt::print("\n]}}\n");
}

// Turns --pattern and the sizes into rows; kInvalidArgument on a bad pattern or size.
Result<std::vector<Row>> PlanRows(const BenchFlags& flags, uint64_t region_size, size_t max_transfer) {
  MF_ASSIGN_OR_RETURN(uint64_t block, ParseByteCount("--block", flags.block));
  MF_ASSIGN_OR_RETURN(uint64_t seq_block, ParseByteCount("--seq-block", flags.seq_block));
  for (uint64_t b : {block, seq_block}) {
    if (b == 0 || b > max_transfer) {
      return InvalidArgument("block size " + std::to_string(b) +
                             " must be between 1 and the transport's limit of " +
                             std::to_string(max_transfer) + " bytes");
    }
    if (b > region_size) {
      return InvalidArgument("block size " + fabric::FormatSize(b) + " exceeds the region (" +
                             fabric::FormatSize(region_size) + ")");
    }
  }
  std::vector<Row> rows;
  std::stringstream list(flags.pattern);
  std::string name;
  while (std::getline(list, name, ',')) {
    const bool write = name == "randwrite" || name == "write";
    if (name == "randread" || name == "randwrite") {
      rows.push_back({name, write, true, block, 1, flags.connections});
      if (flags.depth > 1) rows.push_back({name, write, true, block, flags.depth, flags.connections});
    } else if (name == "read" || name == "write") {
      rows.push_back({name, write, false, seq_block, flags.seq_depth, flags.seq_connections});
    } else {
      return InvalidArgument("unknown pattern '" + name +
                             "' in --pattern; use a list of randread, randwrite, read, write");
    }
  }
  if (rows.empty()) return InvalidArgument("--pattern is empty");
  return rows;
}

int RunBench(const BenchFlags& flags) {
  fabric::Url url;
  std::unique_ptr<fabric::Client> client;
  if (int rc = StartClient(kCmd, flags.target.url, true, flags.target.client, &url, &client); rc != kExitOk) {
    return rc;
  }
  const bool writes = flags.pattern.find("write") != std::string::npos;
  fabric::OpenOptions options;
  options.writable = writes;
  options.queue_depth = static_cast<int>(std::max(flags.depth, flags.seq_depth));
  // Opens the region with `connections` data connections, closing the previous handle
  // first (it may hold the write lease). Returns an exit code.
  std::unique_ptr<fabric::Remote> remote;
  auto open = [&](int connections) -> int {
    if (remote) {
      Status closed = remote->Close();
      if (!closed.ok()) return Report(kCmd, closed.WithContext("closing " + url.region));
      remote.reset();
    }
    options.connections = connections;
    Result<std::unique_ptr<fabric::Remote>> opened = client->Open(url.region, options);
    if (!opened.ok()) {
      std::string hint = HintFor(opened.status(), url, flags.target.client);
      if (opened.status().code() == Code::kBusy) hint += "; or bench reads only: --pattern randread,read";
      return Report(kCmd, opened.status().WithContext("opening " + url.region), hint);
    }
    remote = std::move(opened).value();
    return kExitOk;
  };
  if (int rc = open(flags.connections); rc != kExitOk) return rc;
  Result<std::vector<Row>> rows = PlanRows(flags, remote->size(), remote->max_transfer());
  if (!rows.ok()) return Report(kCmd, rows.status());

  const bool live_progress = !flags.quiet && ::isatty(STDERR_FILENO);
  if (!flags.quiet) {
    std::fprintf(stderr, "memfabric bench: %s over %.*s, %zu rows of %.1f s%s\n", url.ToString().c_str(),
                 static_cast<int>(remote->transport().size()), remote->transport().data(), rows->size(),
                 flags.seconds, writes ? " (writes overwrite the region)" : "");
  }
  std::vector<RowResult> results;
  uint64_t seed = 0x6d656d666162ull;  // fixed: rows are repeatable
  for (const Row& row : *rows) {
    if (row.connections != options.connections) {
      if (int rc = open(row.connections); rc != kExitOk) return rc;
    }
    Result<RowResult> result = RunRow(*remote, row, flags.seconds, live_progress, !flags.no_poll, seed++);
    if (!result.ok())
      return Report(kCmd, result.status(), HintFor(result.status(), url, flags.target.client));
    if (!flags.quiet && !live_progress) {
      std::fprintf(stderr, "bench: %s done: %.0f IOPS\n", RowLabel(row).c_str(), result->iops);
    }
    results.push_back(std::move(result).value());
  }
  const std::string transport(remote->transport());
  const uint64_t size = remote->size();
  Status closed = remote->Close();
  if (!closed.ok()) return Report(kCmd, closed.WithContext("closing " + url.region));
  if (flags.json) {
    PrintJson(url, transport, size, flags.seconds, results);
  } else {
    PrintTable(url, transport, size, flags.seconds, results);
  }
  return kExitOk;
}

}  // namespace

void AddBenchCommand(CLI::App& app, std::vector<Command>& commands) {
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* sub =
      app.add_subcommand("bench", "Measure a region's latency, IOPS and throughput from this client");
  sub->footer(R"(Examples:
  memfabric bench tcp://127.0.0.1:7411/cache
  memfabric bench auto://10.0.0.5:7411/cache --seconds 5 --depth 32
  memfabric bench tcp://127.0.0.1:7411/cache --pattern randread,read --json > result.json
Rows: randread/randwrite at depth 1 (latency) and --depth (IOPS) with --block requests;
read/write sequential with --seq-block requests at --seq-depth. Random rows use --connections
data connections (1: the fewest wake-ups per small request), sequential rows --seq-connections
(2: large copies proceed in parallel); the region is reopened when that changes. Writes
overwrite the region and need its write lease. The first output line names the transport that carried the data.
  memfabric bench tcp://127.0.0.1:7411/cache --uffd --chunk 64K   # first touch through a uffd mapping)");
  sub->add_option("URL", flags->target.url, "The region: SCHEME://HOST[:PORT]/NAME")->required();
  sub->add_option("--seconds", flags->seconds, "Duration of each row")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  sub->add_option("--depth", flags->depth, "Requests in flight for the random IOPS rows")
      ->check(CLI::Range(size_t{1}, kMaxDepth))
      ->capture_default_str();
  sub->add_option("--block", flags->block, "Random request size (K/M suffixes)")->capture_default_str();
  sub->add_option("--seq-depth", flags->seq_depth, "Requests in flight for the sequential rows")
      ->check(CLI::Range(size_t{1}, kMaxDepth))
      ->capture_default_str();
  sub->add_option("--seq-block", flags->seq_block, "Sequential request size (K/M suffixes)")
      ->capture_default_str();
  sub->add_option("--connections", flags->connections,
                  "Data connections (TCP) or queue pairs (RDMA) for the random rows")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  sub->add_option("--seq-connections", flags->seq_connections,
                  "Data connections (TCP) or queue pairs (RDMA) for the sequential rows")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  sub->add_option("--pattern", flags->pattern, "Comma-separated rows: randread, randwrite, read, write")
      ->capture_default_str();
  sub->add_flag("--json", flags->json, "Print the results as JSON (for scripts)");
  sub->add_flag("-q,--quiet", flags->quiet, "No progress on stderr");
  sub->add_flag("--no-poll", flags->no_poll,
                "Wait for completions asleep instead of spinning on the bench thread (busy-polling the "
                "completion queue over RDMA, as perftest does; yielding otherwise). Spinning costs a core");
  sub->add_flag("--uffd", flags->uffd,
                "Instead: map the region with userfaultfd and time a first-touch scan of every page, "
                "sequential then random")
      ->group("userfaultfd");
  sub->add_option("--chunk", flags->chunk, "With --uffd: the pull unit, a power of two from 4K to 2M")
      ->capture_default_str()
      ->group("userfaultfd");
  sub->add_flag("--no-prefetch", flags->no_prefetch, "With --uffd: pull only what is touched")
      ->group("userfaultfd");
  AddClientFlags(*sub, flags->target.client);
  commands.push_back({sub, [flags] {
                        if (flags->uffd) {
                          return RunUffdScan(kCmd, flags->target, flags->chunk, !flags->no_prefetch,
                                             flags->json);
                        }
                        return RunBench(*flags);
                      }});
}

}  // namespace mf::cli
