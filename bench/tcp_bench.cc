// Micro-benchmarks of the TCP data path: an in-process fabric::Server behind a TcpServer
// on loopback, one client Remote, batches of reads or writes of 4 KiB, 64 KiB and 1 MiB
// at queue depth 1 and 32 (a batch of `depth` requests submitted together, then waited
// for), and reads at depth 1 with the caller polling for the reply. A memcpy of the same
// size is the baseline row.
//
//   build/release/bench/tcp_bench --benchmark_min_time=0.5
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "fabric/client.h"
#include "fabric/log.h"
#include "fabric/os.h"
#include "fabric/remote.h"
#include "fabric/server.h"
#include "fabric/url.h"
#include "transports/connect.h"
#include "transports/tcp/tcp_server.h"

namespace mf {
namespace {

constexpr uint64_t kRegionSize = 256ull << 20;
constexpr size_t kSizes[] = {4u << 10, 64u << 10, 1u << 20};
constexpr size_t kDepths[] = {1, 32};
constexpr size_t kMaxBatchBytes = (1u << 20) * 32;
static_assert(kMaxBatchBytes <= kRegionSize);

// The server, its listener and one connected client, torn down in reverse order.
struct Loopback {
  std::unique_ptr<fabric::Server> server;
  std::unique_ptr<tcp::TcpServer> listener;
  std::unique_ptr<fabric::Client> client;
  std::unique_ptr<fabric::Remote> remote;
  fabric::Buffer buffer;  // kMaxBatchBytes, registered with remote

  ~Loopback() {
    buffer = fabric::Buffer();
    if (remote) (void)remote->Close();
    remote.reset();
    client.reset();
    if (listener) listener->Stop();
  }
};

Status StartLoopback(Loopback* lb) {
  fabric::ServerOptions options;
  options.insecure = true;
  lb->server = std::make_unique<fabric::Server>(std::move(options));
  fabric::RegionSpec spec;
  spec.name = "bench";
  spec.size = kRegionSize;
  MF_RETURN_IF_ERROR(lb->server->Create(spec).status());
  tcp::ListenOptions listen;
  listen.port = 0;
  MF_ASSIGN_OR_RETURN(lb->listener, tcp::TcpServer::Start(*lb->server, listen));
  fabric::Url url;
  url.host = "127.0.0.1";
  url.port = lb->listener->port();
  MF_ASSIGN_OR_RETURN(lb->client, transports::Connect(url, transports::ClientOptions{}));
  fabric::OpenOptions open;
  open.writable = true;
  MF_ASSIGN_OR_RETURN(lb->remote, lb->client->Open("bench", open));
  MF_ASSIGN_OR_RETURN(lb->buffer, lb->remote->AllocateBuffer(kMaxBatchBytes));
  std::memset(lb->buffer.data(), 0x5a, lb->buffer.size());
  return Status::Ok();
}

// Each iteration submits `depth` requests of `size` bytes at random aligned offsets
// (split at the transport's max_transfer) and waits for all of them.
// With `polled`, the benchmark's thread takes the replies itself (Remote::SetCallerPolling
// and Poll, as the uffd Mapping's fault thread does) instead of sleeping until the
// transport's reader completes them.
void TransferBatches(benchmark::State& state, Loopback& lb, fabric::IoKind kind, size_t size, size_t depth,
                     bool polled = false) {
  fabric::Remote& remote = *lb.remote;
  if (polled) remote.SetCallerPolling(true);
  const size_t piece = std::min(size, remote.max_transfer());
  std::vector<fabric::IoRequest> requests;
  requests.reserve(depth * ((size + piece - 1) / piece));
  fabric::IoBatch batch;
  std::mt19937_64 rng(42);
  const uint64_t slots = kRegionSize / size;
  for (auto _ : state) {
    requests.clear();
    for (size_t i = 0; i < depth; ++i) {
      const uint64_t offset = (rng() % slots) * size;
      for (size_t done = 0; done < size; done += piece) {
        std::span<std::byte> data = lb.buffer.span().subspan(i * size + done, std::min(piece, size - done));
        requests.push_back(fabric::IoRequest{kind, offset + done, data, &lb.buffer, &batch, requests.size()});
      }
    }
    batch.Reset(requests.size());
    remote.Submit(requests);
    if (polled) {
      while (!batch.done()) remote.Poll();
    }
    Status status = batch.Wait();
    if (!status.ok()) {
      state.SkipWithError(status.ToString().c_str());
      break;
    }
  }
  if (polled) remote.SetCallerPolling(false);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(depth * size));
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(depth));
  state.SetLabel(std::string(remote.transport()));
}

// Page-aligned source and destination, like the transport's Buffers.
void Memcpy(benchmark::State& state, size_t size) {
  Result<MappedMemory> from = MappedMemory::Anonymous(size);
  Result<MappedMemory> to = MappedMemory::Anonymous(size);
  if (!from.ok() || !to.ok()) {
    state.SkipWithError("mmap failed");
    return;
  }
  std::memset(from->data(), 0x5a, size);
  std::memset(to->data(), 0, size);
  for (auto _ : state) {
    std::memcpy(to->data(), from->data(), size);
    benchmark::DoNotOptimize(to->data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(size));
  state.SetItemsProcessed(state.iterations());
}

void RegisterAll(Loopback& lb) {
  for (size_t size : kSizes) {
    const std::string suffix = "/" + std::to_string(size >> 10) + "KiB";
    benchmark::RegisterBenchmark(("memcpy" + suffix).c_str(),
                                 [size](benchmark::State& s) { Memcpy(s, size); });
    for (size_t depth : kDepths) {
      const std::string tail = suffix + "/qd" + std::to_string(depth);
      benchmark::RegisterBenchmark(("tcp_read" + tail).c_str(), [&lb, size, depth](benchmark::State& s) {
        TransferBatches(s, lb, fabric::IoKind::kRead, size, depth);
      })->UseRealTime();
      benchmark::RegisterBenchmark(("tcp_write" + tail).c_str(), [&lb, size, depth](benchmark::State& s) {
        TransferBatches(s, lb, fabric::IoKind::kWrite, size, depth);
      })->UseRealTime();
      if (depth == 1 && CanSpin()) {
        benchmark::RegisterBenchmark(("tcp_read" + tail + "/polled").c_str(), [&lb,
                                                                               size](benchmark::State& s) {
          TransferBatches(s, lb, fabric::IoKind::kRead, size, 1, true);
        })->UseRealTime();
      }
    }
  }
}

}  // namespace
}  // namespace mf

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  (void)mf::InitLogging("warn");
  mf::Loopback lb;
  mf::Status started = mf::StartLoopback(&lb);
  if (!started.ok()) {
    std::fprintf(stderr, "tcp_bench: could not start the loopback server and client: %s\n",
                 started.ToString().c_str());
    return 1;
  }
  mf::RegisterAll(lb);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
