#include "fabric/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace mf::fabric {
namespace {

constexpr std::string_view kClientLabel = "memfabric-client";
constexpr std::string_view kServerLabel = "memfabric-server";
constexpr std::string_view kMigrationSourceLabel = "memfabric-migration-source";
constexpr std::string_view kMigrationDestinationLabel = "memfabric-migration-destination";
constexpr size_t kMaxLabel = kMigrationDestinationLabel.size();
static_assert(kClientLabel.size() <= kMaxLabel && kServerLabel.size() <= kMaxLabel &&
              kMigrationSourceLabel.size() <= kMaxLabel);

std::string_view Label(Role role) {
  switch (role) {
    case Role::kClient: return kClientLabel;
    case Role::kServer: return kServerLabel;
    case Role::kMigrationSource: return kMigrationSourceLabel;
    case Role::kMigrationDestination: return kMigrationDestinationLabel;
  }
  return kClientLabel;
}

}  // namespace

Result<Secret> LoadSecret(const std::string& path) {
  std::string bytes;
  std::string origin;
  if (!path.empty()) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, "secret file " + path);
    if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
      return Status(Code::kPermissionDenied,
                    "secret file " + path + " is readable by group or others; run: chmod 600 " + path);
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) return Status::FromErrno(errno, "open secret file " + path);
    std::ostringstream ss;
    ss << in.rdbuf();
    bytes = ss.str();
    origin = "secret file " + path;
  } else if (const char* env = std::getenv(kSecretEnv); env != nullptr && *env != '\0') {
    bytes = env;
    origin = std::string("$") + kSecretEnv;
  } else {
    return NotFound(std::string("no secret given: set ") + kSecretEnv + " or pass --secret-file PATH");
  }
  while (!bytes.empty() && (bytes.back() == '\n' || bytes.back() == '\r')) bytes.pop_back();
  if (bytes.size() < kMinSecretSize) {
    return InvalidArgument(origin + " holds " + std::to_string(bytes.size()) +
                           " bytes; a secret needs at least " + std::to_string(kMinSecretSize) +
                           " (e.g. openssl rand -hex 32)");
  }
  return Secret(std::move(bytes));
}

Result<Nonce> MakeNonce() {
  Nonce nonce{};
  if (RAND_bytes(nonce.data(), static_cast<int>(nonce.size())) != 1) {
    return Internal("RAND_bytes failed: the OpenSSL CSPRNG is not seeded");
  }
  return nonce;
}

Proof ComputeProof(const Secret& secret, Role role, const Nonce& server_nonce, const Nonce& client_nonce) {
  const std::string_view label = Label(role);
  uint8_t message[kMaxLabel + 2 * kNonceSize];
  size_t n = 0;
  for (char c : label) message[n++] = static_cast<uint8_t>(c);
  for (uint8_t b : server_nonce) message[n++] = b;
  for (uint8_t b : client_nonce) message[n++] = b;
  Proof proof{};
  unsigned int len = 0;
  auto key = secret.bytes();
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), message, n, proof.data(), &len);
  return proof;
}

bool VerifyProof(const Secret& secret, Role role, const Nonce& server_nonce, const Nonce& client_nonce,
                 std::span<const uint8_t> proof) {
  if (proof.size() != kProofSize) return false;
  Proof expected = ComputeProof(secret, role, server_nonce, client_nonce);
  return CRYPTO_memcmp(expected.data(), proof.data(), kProofSize) == 0;
}

}  // namespace mf::fabric
