// libFuzzer target: the decoder of the migration hand-over channel (fabric/migration.h,
// docs/migration.md) on arbitrary bytes. It must never read out of bounds, and a message
// that decodes must re-encode to exactly the bytes it was decoded from.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "fabric/migration.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace wire = mf::fabric::migration_wire;
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  size_t used = 0;
  auto message = wire::Decode(in, &used);
  if (!message.ok()) return 0;
  if (used > size) __builtin_trap();
  if (message->type == wire::Type::kAbort && message->abort.ok()) __builtin_trap();
  const auto again = wire::Encode(*message);
  if (again.size() != used || std::memcmp(again.data(), data, used) != 0) __builtin_trap();
  if (message->type == wire::Type::kDirtySet && message->dirty.chunks() > message->dirty.chunk_count)
    __builtin_trap();
  // CHALLENGE and PROOF (the channel's authentication) carry exactly one nonce or proof.
  if ((message->type == wire::Type::kChallenge || message->type == wire::Type::kProof) &&
      used != wire::kHeaderSize + wire::kAuthSize)
    __builtin_trap();
  return 0;
}
