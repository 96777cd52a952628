// uffd_bench — first-touch scan of a region through uffd::Mapping over TCP loopback, next
// to the physical limit on this machine: a raw local userfaultfd handler that installs
// each chunk straight from memory with UFFDIO_COPY. Both scan the same size in the same
// page order (sequential or random) at each chunk size; the table prints the ratios.
//
//   uffd_bench [--size 1G] [--chunks 4K,64K,2M] [--connections 4] [--schemes tcp,rdma]
//              [--host ADDR] [--rounds N] [--poll-spin US]
// With --rounds N every row scans N times per kind, the kinds taking turns, and prints
// the medians: on a shared 2-vCPU host single scans swing by 2x and more.
// With several schemes (rdma needs an RDMA device: run it in the test VM, see
// bench/compare_uffd_rdma.sh) each gets its table, then a table of their ratios.
// On a VM whose kernel hands freed memory back to the hypervisor (free page reporting),
// first touches also fault in the hypervisor; the bench says so when it happened.
#include <fmt/format.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <thread>
#include <tuple>
#include <vector>

#include "fabric/log.h"
#include "fabric/server.h"
#include "transports/connect.h"
#include "transports/open_table.h"
#include "transports/rdma/rdma_server.h"
#include "transports/tcp/tcp_server.h"
#include "uffd/mapping.h"
#include "uffd/userfaultfd.h"

namespace mf {
namespace {

using Clock = std::chrono::steady_clock;

// Reads one byte of every page in `order`; returns seconds taken.
double Scan(const std::byte* base, const std::vector<uint32_t>& order) {
  auto start = Clock::now();
  uint64_t sum = 0;
  for (uint32_t page : order)
    sum += static_cast<uint8_t>(*static_cast<const volatile std::byte*>(base + uint64_t{page} * kPageSize));
  double s = std::chrono::duration<double>(Clock::now() - start).count();
  if (sum == 0xdeadbeef) std::puts("");  // keep the loads
  return s;
}

// The physical limit: a local handler thread copying chunks from `source`. It waits for
// faults as the Mapping's fault thread does: polling the userfaultfd for `spin` after
// each fault before it sleeps in poll(2) (on a virtual machine a sleeping handler's
// wake-up costs more than the copy of a 4 KiB chunk), so the ratio compares equals.
Result<double> RawScan(const std::byte* source, size_t size, size_t chunk, const std::vector<uint32_t>& order,
                       std::chrono::microseconds spin) {
  MF_ASSIGN_OR_RETURN(uffd::Userfaultfd uffd, uffd::Userfaultfd::Open(0));
  void* addr =
      ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (addr == MAP_FAILED) return Status::FromErrno(errno, "mmap");
  MappedMemory memory(addr, size);
  (void)::madvise(addr, size, MADV_NOHUGEPAGE);
  MF_RETURN_IF_ERROR(uffd.Register(addr, size, UFFDIO_REGISTER_MODE_MISSING));
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC));
  std::atomic<bool> stopping{false};
  auto* base = static_cast<std::byte*>(addr);
  std::thread handler([&] {
    uffd_msg msgs[64];
    pollfd fds[2] = {{uffd.fd(), POLLIN, 0}, {stop.get(), POLLIN, 0}};
    auto spin_until = Clock::now() + spin;
    for (;;) {
      if (stopping.load(std::memory_order_relaxed)) return;
      auto n = uffd.ReadMessages(msgs);
      if (!n.ok()) return;
      if (*n == 0) {
        if (Clock::now() < spin_until) continue;
        if (::poll(fds, 2, -1) < 0) continue;
        if ((fds[1].revents & POLLIN) != 0) return;
        continue;
      }
      for (size_t i = 0; i < *n; ++i) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t off =
            (msgs[i].arg.pagefault.address - reinterpret_cast<uint64_t>(base)) & ~uint64_t{chunk - 1};
        (void)uffd.Copy(base + off, source + off, std::min<uint64_t>(chunk, size - off), false);
      }
      spin_until = Clock::now() + spin;
    }
  });
  double seconds = Scan(base, order);
  stopping.store(true, std::memory_order_relaxed);
  uint64_t one = 1;
  (void)!::write(stop.get(), &one, sizeof(one));
  handler.join();
  if (std::memcmp(base, source, std::min<size_t>(size, 1 << 20)) != 0)
    return Internal("raw scan read wrong bytes");
  return seconds;
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
}

// The fault threads' spin after each fault or completion (MappingOptions::poll_spin).
std::chrono::microseconds g_poll_spin = uffd::kDefaultPollSpin;

Result<double> MappingScan(fabric::Remote& remote, const fabric::Region& region, size_t chunk, bool prefetch,
                           const std::vector<uint32_t>& order) {
  uffd::MappingOptions options;
  options.chunk_size = chunk;
  options.prefetch = prefetch;
  options.poll_spin = g_poll_spin;
  MF_ASSIGN_OR_RETURN(auto mapping, uffd::Mapping::Create(remote, options));
  double seconds = Scan(mapping->data(), order);
  if (std::memcmp(mapping->data(), region.data(), std::min<size_t>(region.size(), 1 << 20)) != 0 ||
      std::memcmp(mapping->data() + region.size() - kPageSize, region.data() + region.size() - kPageSize,
                  kPageSize) != 0) {
    return Internal("mapping read wrong bytes");
  }
  MF_RETURN_IF_ERROR(mapping->Close());
  return seconds;
}

// KiB of freed memory this VM's kernel has handed back to its hypervisor since boot; none
// without free page reporting.
constexpr const char* kReportedKibPath = "/sys/module/page_reporting/parameters/reported_kib";
std::optional<uint64_t> ReportedKib() {
  std::ifstream in(kReportedKibPath);
  uint64_t kib = 0;
  if (!(in >> kib)) return std::nullopt;
  return kib;
}

int Run(int argc, char** argv) {
  CLI::App app{"First-touch scan through uffd::Mapping over TCP/RDMA vs a raw local userfaultfd handler"};
  std::string size_text = "1G";
  std::vector<std::string> chunk_texts = {"4K", "64K", "2M"};
  int connections = 4;
  std::vector<std::string> scheme_texts = {"tcp"};
  std::string host = "127.0.0.1";
  app.add_option("--schemes", scheme_texts, "data planes to map over: tcp, rdma")->delimiter(',');
  app.add_option("--host", host, "address to serve on (an RDMA interface's for rdma)");
  app.add_option("--size", size_text, "bytes to scan (K/M/G)");
  app.add_option("--chunks", chunk_texts, "chunk sizes")->delimiter(',');
  app.add_option("--connections", connections, "TCP data connections");
  int rounds = 1;
  app.add_option("--rounds", rounds, "scans of each kind per row, taking turns; the table shows medians")
      ->check(CLI::Range(1, 99))
      ->capture_default_str();
  int64_t poll_spin_us = uffd::kDefaultPollSpin.count();
  app.add_option(
         "--poll-spin", poll_spin_us,
         "microseconds the fault threads (Mapping's and the raw handler's) spin (0: they always sleep)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  g_poll_spin = std::chrono::microseconds(poll_spin_us);
  const std::chrono::microseconds spin = CanSpin() ? g_poll_spin : std::chrono::microseconds(0);
  (void)InitLogging("warn");

  auto size = fabric::ParseSize(size_text);
  if (!size.ok() || *size % (2u << 20) != 0) {
    std::fprintf(stderr, "uffd_bench: --size must be a multiple of 2 MiB\n");
    return 2;
  }
  fabric::Server server(fabric::ServerOptions{fabric::Secret("uffd-bench-secret-0123456789"), false, ""});
  auto info = server.Create({"bench", *size, fabric::BackingKind::kAnonymous, ""});
  auto handle = server.Open("bench", false);
  if (!info.ok() || !handle.ok()) {
    std::fprintf(stderr, "uffd_bench: %s\n",
                 (info.ok() ? handle.status() : info.status()).ToString().c_str());
    return 1;
  }
  const fabric::Region& region = *handle->region();
  for (size_t i = 0; i < *size; i += 8) {
    uint64_t v = i * 0x9e3779b97f4a7c15ull;
    std::memcpy(region.data() + i, &v, 8);
  }
  tcp::ListenOptions listen;
  listen.host = host;
  listen.port = 0;
  listen.opens = std::make_shared<transports::OpenTable>();
  std::unique_ptr<rdma::RdmaServer> rdma_server;
  if (std::find(scheme_texts.begin(), scheme_texts.end(), "rdma") != scheme_texts.end()) {
    auto started = rdma::RdmaServer::Start(listen.opens, {host, 0});
    if (!started.ok()) {
      std::fprintf(stderr, "uffd_bench: rdma: %s\n", started.status().ToString().c_str());
      return 1;
    }
    rdma_server = std::move(started).value();
    listen.rdma_port = rdma_server->port();
  }
  auto tcp_server = tcp::TcpServer::Start(server, listen);
  if (!tcp_server.ok()) {
    std::fprintf(stderr, "uffd_bench: %s\n", tcp_server.status().ToString().c_str());
    return 1;
  }
  struct Plane {
    std::string name;
    std::unique_ptr<fabric::Client> client;
    std::unique_ptr<fabric::Remote> remote;
  };
  std::vector<Plane> planes;
  for (const std::string& scheme_text : scheme_texts) {
    auto url = fabric::ParseUrl(scheme_text + "://" + host + ":" + std::to_string((*tcp_server)->port()));
    if (!url.ok()) {
      std::fprintf(stderr, "uffd_bench: --schemes %s: %s\n", scheme_text.c_str(),
                   url.status().ToString().c_str());
      return 2;
    }
    transports::ClientOptions copts;
    copts.secret = fabric::Secret("uffd-bench-secret-0123456789");
    auto client = transports::Connect(*url, copts);
    if (!client.ok()) {
      std::fprintf(stderr, "uffd_bench: %s\n", client.status().ToString().c_str());
      return 1;
    }
    fabric::OpenOptions oopts;
    oopts.connections = connections;
    auto remote = (*client)->Open("bench", oopts);
    if (!remote.ok()) {
      std::fprintf(stderr, "uffd_bench: %s\n", remote.status().ToString().c_str());
      return 1;
    }
    planes.push_back({scheme_text, std::move(client).value(), std::move(remote).value()});
  }

  const auto pages = static_cast<uint32_t>(*size / kPageSize);
  std::vector<uint32_t> sequential(pages);
  std::iota(sequential.begin(), sequential.end(), 0u);
  std::vector<uint32_t> random = sequential;
  std::shuffle(random.begin(), random.end(), std::mt19937(1));
  const double mb = static_cast<double>(*size) / 1e6;

  const std::optional<uint64_t> reported_before = ReportedKib();
  // mapping MB/s without and with prefetch, per plane, chunk and order
  std::map<std::tuple<std::string, std::string, std::string>, std::pair<double, double>> results;
  for (Plane& plane : planes) {
    std::printf(
        "first-touch scan of %s, uffd Mapping over %s (%s, %d connections) vs raw local uffd handler; "
        "both fault threads spin %lld us before sleeping; median of %d round(s)\n",
        fabric::FormatSize(*size).c_str(), std::string(plane.remote->transport()).c_str(), host.c_str(),
        connections, static_cast<long long>(spin.count()), rounds);
    std::printf("%-6s %-6s %12s %14s %7s %16s %7s %12s\n", "chunk", "order", "raw MB/s", "mapping MB/s",
                "ratio", "+prefetch MB/s", "ratio", "vs raw 4K");
    double raw4k_seq = 0;
    for (const std::string& ct : chunk_texts) {
      auto chunk = fabric::ParseSize(ct);
      if (!chunk.ok()) {
        std::fprintf(stderr, "uffd_bench: %s\n", chunk.status().ToString().c_str());
        return 2;
      }
      for (const auto* order : {&sequential, &random}) {
        const char* name = order == &sequential ? "seq" : "random";
        // Each scan runs `rounds` times, the three kinds taking turns; the medians count.
        std::vector<double> raw_s, plain_s, pre_s;
        for (int round = 0; round < rounds; ++round) {
          auto raw = RawScan(region.data(), *size, *chunk, *order, spin);
          auto plain = MappingScan(*plane.remote, region, *chunk, false, *order);
          auto pre = MappingScan(*plane.remote, region, *chunk, true, *order);
          if (!raw.ok() || !plain.ok() || !pre.ok()) {
            std::fprintf(stderr, "uffd_bench: %s\n",
                         (!raw.ok()     ? raw.status()
                          : !plain.ok() ? plain.status()
                                        : pre.status())
                             .ToString()
                             .c_str());
            return 1;
          }
          raw_s.push_back(*raw);
          plain_s.push_back(*plain);
          pre_s.push_back(*pre);
        }
        const double raw = Median(raw_s), plain = Median(plain_s), pre = Median(pre_s);
        if (*chunk == 4096 && order == &sequential) raw4k_seq = mb / raw;
        const double r = mb / raw, p = mb / plain, f = mb / pre;
        results[{plane.name, ct, name}] = {p, f};
        // The last column needs the 4K sequential row (--chunks without 4K: "-").
        const std::string vs_raw4k = raw4k_seq > 0 ? fmt::format("{:.2f}x", f / raw4k_seq) : "-";
        std::printf("%-6s %-6s %12.0f %14.0f %6.2fx %16.0f %6.2fx %12s\n", ct.c_str(), name, r, p, p / r, f,
                    f / r, vs_raw4k.c_str());
        std::fflush(stdout);
      }
    }
  }
  if (planes.size() == 2) {
    const std::string& a = planes[1].name;
    const std::string& b = planes[0].name;
    std::printf("\nmapping over %s vs over %s (same boot, same region)\n", a.c_str(), b.c_str());
    std::printf("%-6s %-6s %14s %14s %7s %16s %16s %7s\n", "chunk", "order", (a + " MB/s").c_str(),
                (b + " MB/s").c_str(), "ratio", (a + "+pf MB/s").c_str(), (b + "+pf MB/s").c_str(), "ratio");
    for (const std::string& ct : chunk_texts) {
      for (const char* name : {"seq", "random"}) {
        auto [pa, fa] = results[{a, ct, name}];
        auto [pb, fb] = results[{b, ct, name}];
        std::printf("%-6s %-6s %14.0f %14.0f %6.2fx %16.0f %16.0f %6.2fx\n", ct.c_str(), name, pa, pb,
                    pa / pb, fa, fb, fa / fb);
      }
    }
  }
  const std::optional<uint64_t> reported_after = ReportedKib();
  if (reported_before && reported_after && *reported_after > *reported_before) {
    std::printf(
        "\nnote: during the run this VM handed %llu MiB of freed memory back to its hypervisor (free page "
        "reporting, %s).\nA first touch of such memory faults in the hypervisor too, for the raw handler and "
        "the Mapping alike, so rows vary between runs; delaying the reporting steadies them.\n",
        static_cast<unsigned long long>((*reported_after - *reported_before) >> 10), kReportedKibPath);
  }
  return 0;
}

}  // namespace
}  // namespace mf

int main(int argc, char** argv) {
  return mf::Run(argc, argv);
}
