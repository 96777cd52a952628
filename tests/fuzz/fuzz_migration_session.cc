// libFuzzer target for the migration hand-over's two state machines (fabric/migration.h):
// the input is the byte stream of the peer, fed over a socketpair to a real Leecher (the
// destination) or a real Seeder's Finalize (the source), each on MemoryRemotes. Neither may
// crash, hang or leak, and each must end (OK or an error) once the input has ended.
// The first byte selects:
//   bit 0  the side under test: 0 a Leecher (the input plays the source), 1 a Seeder (the
//          input plays the destination);
//   bit 1  a prelude that reaches the later states without the fuzzer having to find it:
//          for a Leecher a HELLO that matches its region, for a Seeder a READY;
//   bit 2  AuthenticateChannel first, with a secret the input does not know: only the
//          refusals are reachable (a proof cannot be forged), and nothing else may follow.
// The rest of the input follows the prelude. The source's workload has written two chunks
// before the finalize, so its push and DIRTY_SET paths run too.
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "fabric/auth.h"
#include "fabric/memory_remote.h"
#include "fabric/migration.h"
#include "tests/fuzz/fuzz_session.h"

namespace {

using namespace mf;
namespace wire = fabric::migration_wire;
using std::chrono::milliseconds;

constexpr uint64_t kRegionSize = 256u << 10;
constexpr size_t kChunk = 16u << 10;
constexpr size_t kMaxTransfer = 64u << 10;
// Every wait of either side: short, as the input always ends with EOF anyway.
constexpr milliseconds kTimeout{500};
constexpr uint8_t kSideSeeder = 1;
constexpr uint8_t kPrelude = 2;
constexpr uint8_t kAuthenticate = 4;

struct Harness {
  Harness() {
    spdlog::set_level(spdlog::level::off);
    region = std::make_shared<fabric::MemoryRegion>("vm", kRegionSize);
  }
  std::unique_ptr<fabric::Remote> Open(bool writable) const {
    return std::make_unique<fabric::MemoryRemote>(region, writable, kMaxTransfer);
  }
  std::shared_ptr<fabric::MemoryRegion> region;
  const fabric::Secret secret{"a secret the input does not know"};
};

fabric::MountOptions SmallMount() {
  fabric::MountOptions mo;
  mo.chunk_size = kChunk;
  mo.in_flight_bytes = 0;
  return mo;
}

// The destination: Start (HELLO), then Run to the end.
void RunLeecher(const Harness& h, UniqueFd fd) {
  fabric::LeecherOptions options;
  options.mount = SmallMount();
  options.open_writable = [&h]() -> Result<std::unique_ptr<fabric::Remote>> { return h.Open(true); };
  options.io_timeout = options.hello_timeout = options.precopy_timeout = options.finalize_timeout = kTimeout;
  options.lease_timeout = kTimeout;
  options.progress_interval = milliseconds(1);
  auto leecher = fabric::Leecher::Start(h.Open(false), std::move(fd), options);
  if (!leecher.ok()) return;
  const Status run = (*leecher)->Run();
  // Holding the lease means a writable Remote under a writable mount.
  if (run.ok() && ((*leecher)->writable_remote() == nullptr || (*leecher)->mount().read_only())) std::abort();
}

// The source: a workload that wrote two chunks, Start (HELLO), then Finalize.
void RunSeeder(const Harness& h, UniqueFd fd) {
  auto source = fabric::MountSource::Create(
      h.Open(true), SmallMount(), [&h]() -> Result<std::unique_ptr<fabric::Remote>> { return h.Open(true); });
  if (!source.ok()) std::abort();
  const std::byte mark[8] = {std::byte{0x4d}};
  fabric::SeederOptions options;
  options.suspend = [] { return Status::Ok(); };
  options.resume = [] {};
  options.io_timeout = options.ready_timeout = options.done_timeout = options.retake_timeout = kTimeout;
  auto seeder = fabric::Seeder::Start(**source, std::move(fd), options);
  if (seeder.ok()) {
    if (!(*source)->mount().Write(0, mark).ok() || !(*source)->mount().Write(5 * kChunk + 3, mark).ok())
      std::abort();
    auto stats = (*seeder)->Finalize();
    // A completed hand-over names the two chunks written during the pre-copy.
    if (stats.ok() && stats->dirty_chunks != 2) std::abort();
  }
  (void)(*source)->mount().Close();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Harness* harness = new Harness();  // lives for the process
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  const bool seeder = (mode & kSideSeeder) != 0;
  std::vector<std::byte> stream;
  if ((mode & kPrelude) != 0) {
    const wire::Message prelude =
        seeder ? wire::MakeReady(kRegionSize)
               : wire::MakeHello({kRegionSize, kChunk, harness->region->info().generation, "vm"});
    stream = wire::Encode(prelude);
  }
  const size_t at = stream.size();
  stream.resize(at + size - 1);
  if (size > 1) std::memcpy(stream.data() + at, data + 1, size - 1);

  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
  UniqueFd side_fd(sv[0]);
  UniqueFd peer(sv[1]);
  std::atomic<bool> done{false};
  std::thread side([&, fd = std::move(side_fd)]() mutable {
    struct MarkDone {
      std::atomic<bool>& done;
      ~MarkDone() { done.store(true); }
    } mark_done{done};
    if ((mode & kAuthenticate) != 0) {
      const auto as = seeder ? fabric::MigrationSide::kSource : fabric::MigrationSide::kDestination;
      auto authenticated = fabric::AuthenticateChannel(std::move(fd), harness->secret, as, kTimeout);
      // The input cannot hold the secret: a channel it authenticated is a broken check.
      if (authenticated.ok()) std::abort();
      return;
    }
    if (seeder) {
      RunSeeder(*harness, std::move(fd));
    } else {
      RunLeecher(*harness, std::move(fd));
    }
  });  // its side of the socket closes when it ends
  const auto deadline = fuzz::InputDeadline();
  fuzz::Feed(peer.get(), stream, fuzz::StreamEnd::kHalfClose, deadline);
  fuzz::WaitUntil([&] { return done.load(); }, deadline);  // a side that never ends aborts, not hangs
  side.join();
  return 0;
}
