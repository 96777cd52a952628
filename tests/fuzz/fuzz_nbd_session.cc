// libFuzzer target for nbd::Export's state machine: each input is the byte stream of one
// client (handshake and transmission) fed to ServeConnection over a socketpair, whose
// replies are drained until the server closes. The first byte selects a prelude so that
// transmission is reached without the fuzzer having to discover a handshake: bit 0 sends
// client flags and NBD_OPT_GO "disk" first, bit 1 adds NBD_OPT_STRUCTURED_REPLY. The Export must neither
// crash, nor hang, nor leak a connection; the next input gets a fresh connection to the same Export.
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "fabric/memory_remote.h"
#include "nbd/export.h"
#include "nbd/protocol.h"
#include "tests/fuzz/fuzz_session.h"

namespace {

using namespace mf;

struct Harness {
  Harness() {
    region = std::make_shared<fabric::MemoryRegion>("disk", 1u << 20);
    remote = std::make_unique<fabric::MemoryRemote>(region, true, 64u << 10);
    nbd::ExportOptions options;
    options.max_block_size = 256u << 10;
    options.slot_buffer_size = 64u << 10;
    options.queue_depth = 4;
    options.handshake_timeout = std::chrono::milliseconds(2000);
    exporter = std::make_unique<nbd::Export>(options);
    if (!exporter->Add({"disk", "fuzz", remote.get(), false}).ok()) std::abort();
    spdlog::set_level(spdlog::level::off);
  }
  std::shared_ptr<fabric::MemoryRegion> region;
  std::unique_ptr<fabric::MemoryRemote> remote;
  std::unique_ptr<nbd::Export> exporter;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Harness* harness = new Harness();  // lives for the process
  if (size == 0) return 0;
  std::vector<std::byte> stream;
  if ((data[0] & 1) != 0) {
    std::array<std::byte, nbd::kClientFlagsSize> flags{};
    nbd::EncodeClientFlags(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes, flags);
    stream.insert(stream.end(), flags.begin(), flags.end());
    if ((data[0] & 2) != 0) nbd::AppendOption(nbd::kOptStructuredReply, {}, &stream);
    nbd::AppendOption(nbd::kOptGo, nbd::EncodeInfoRequest({"disk", {}}), &stream);
  }
  const size_t prelude = stream.size();
  stream.resize(prelude + size - 1);
  if (size > 1) std::memcpy(stream.data() + prelude, data + 1, size - 1);
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0) std::abort();
  if (!harness->exporter->ServeConnection(UniqueFd(sv[0])).ok()) std::abort();
  UniqueFd client(sv[1]);
  const auto deadline = fuzz::InputDeadline();
  fuzz::Feed(client.get(), stream, fuzz::StreamEnd::kHalfClose, deadline);
  // The connection's thread winds down after it closed the socket.
  fuzz::WaitUntil([&] { return harness->exporter->stats().connections_active == 0; }, deadline);
  return 0;
}
