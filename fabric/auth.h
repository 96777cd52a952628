// Shared-secret authentication, used by every transport's control plane.
//
// Mutual challenge/response with HMAC-SHA256 (OpenSSL libcrypto): each side sends a random
// 32-byte nonce; each proves knowledge of the secret with
//   proof = HMAC(secret, role || server_nonce || client_nonce)
// where role is "memfabric-client" or "memfabric-server", so neither proof can be
// replayed as the other. The migration channel (fabric/migration.h) uses the same scheme
// with labels of its own ("memfabric-migration-source"/"-destination"), so that no proof
// made for one protocol is valid in the other. Proofs are compared in constant time. The secret never crosses
// the wire.
//
// Thread-safety: free functions; Secret is a value.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "fabric/status.h"

namespace mf::fabric {

constexpr size_t kNonceSize = 32;
constexpr size_t kProofSize = 32;  // SHA-256
constexpr size_t kMinSecretSize = 16;
constexpr char kSecretEnv[] = "MEMFABRIC_SECRET";

using Nonce = std::array<uint8_t, kNonceSize>;
using Proof = std::array<uint8_t, kProofSize>;

enum class Role : uint8_t { kClient, kServer, kMigrationSource, kMigrationDestination };

class Secret {
 public:
  Secret() = default;
  explicit Secret(std::string bytes) : bytes_(std::move(bytes)) {}
  bool empty() const { return bytes_.empty(); }
  std::span<const uint8_t> bytes() const {
    return {reinterpret_cast<const uint8_t*>(bytes_.data()), bytes_.size()};
  }

 private:
  std::string bytes_;
};

// Loads the secret: from `path` when non-empty (trailing newline stripped; the file must
// not be readable by group or others), else from $MEMFABRIC_SECRET. kNotFound when
// neither is given, kInvalidArgument when shorter than kMinSecretSize bytes.
Result<Secret> LoadSecret(const std::string& path);

// Fills a nonce from the OS CSPRNG.
Result<Nonce> MakeNonce();
Proof ComputeProof(const Secret& secret, Role role, const Nonce& server_nonce, const Nonce& client_nonce);
// Constant-time check of a peer's proof.
bool VerifyProof(const Secret& secret, Role role, const Nonce& server_nonce, const Nonce& client_nonce,
                 std::span<const uint8_t> proof);

}  // namespace mf::fabric
