// libFuzzer target: every decoder of rdma_cm private data on arbitrary bytes. They must
// never read out of bounds, and what decodes must re-encode to a prefix of the input.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "transports/rdma/rdma_wire.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  using namespace mf::rdma::wire;
  if (auto request = DecodeConnectRequest(in); request.ok() && request->version == kVersion) {
    auto again = EncodeConnectRequest(*request);
    if (again.size() > size || std::memcmp(again.data(), data, again.size()) != 0) __builtin_trap();
  }
  if (auto accept = DecodeAccept(in); accept.ok()) {
    auto again = EncodeAccept(*accept);
    if (again.size() > size || std::memcmp(again.data(), data, again.size()) != 0) __builtin_trap();
  }
  mf::Status reject = DecodeReject(in);
  if (reject.ok()) __builtin_trap();  // a reject is never OK
  return 0;
}
