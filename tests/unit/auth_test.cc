#include "fabric/auth.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace mf::fabric {
namespace {

TEST(Auth, ProofsVerifyOnlyWithSameSecretRoleAndNonces) {
  Secret secret("correct horse battery staple");
  Secret other("correct horse battery stapler");
  Nonce sn = *MakeNonce();
  Nonce cn = *MakeNonce();
  EXPECT_NE(sn, cn);
  Proof p = ComputeProof(secret, Role::kClient, sn, cn);
  EXPECT_TRUE(VerifyProof(secret, Role::kClient, sn, cn, p));
  EXPECT_FALSE(VerifyProof(other, Role::kClient, sn, cn, p));
  EXPECT_FALSE(VerifyProof(secret, Role::kServer, sn, cn, p));  // no reflection
  EXPECT_FALSE(VerifyProof(secret, Role::kClient, cn, sn, p));
  EXPECT_FALSE(VerifyProof(secret, Role::kClient, sn, cn, std::span<const uint8_t>(p).first(31)));
  p[5] ^= 1;
  EXPECT_FALSE(VerifyProof(secret, Role::kClient, sn, cn, p));
}

TEST(Auth, MigrationProofsAreValidOnlyForTheirOwnRole) {
  Secret secret("0123456789abcdef0123456789abcdef");
  auto sn = MakeNonce();
  auto cn = MakeNonce();
  ASSERT_TRUE(sn.ok() && cn.ok());
  const Role roles[] = {Role::kClient, Role::kServer, Role::kMigrationSource, Role::kMigrationDestination};
  for (Role made : roles) {
    const Proof p = ComputeProof(secret, made, *sn, *cn);
    for (Role checked : roles) EXPECT_EQ(VerifyProof(secret, checked, *sn, *cn, p), made == checked);
  }
}

class SecretFile : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/mf-secret-XXXXXX";
    int fd = mkstemp(tmpl);
    ASSERT_GE(fd, 0);
    close(fd);
    path_ = tmpl;
    unsetenv(kSecretEnv);
  }
  void TearDown() override { unlink(path_.c_str()); }
  void Write(const std::string& text, mode_t mode) {
    std::ofstream(path_) << text;
    chmod(path_.c_str(), mode);
  }
  std::string path_;
};

TEST_F(SecretFile, LoadsAndStripsNewline) {
  Write("0123456789abcdef0123\n", 0600);
  auto s = LoadSecret(path_);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  EXPECT_EQ(s->bytes().size(), 20u);
}

TEST_F(SecretFile, RefusesGroupReadableFile) {
  Write("0123456789abcdef0123\n", 0644);
  auto s = LoadSecret(path_);
  EXPECT_EQ(s.status().code(), Code::kPermissionDenied);
  EXPECT_NE(s.status().message().find("chmod 600"), std::string_view::npos);
}

TEST_F(SecretFile, RefusesShortSecret) {
  Write("short\n", 0600);
  EXPECT_EQ(LoadSecret(path_).status().code(), Code::kInvalidArgument);
}

TEST_F(SecretFile, FallsBackToEnvironmentAndExplainsWhenMissing) {
  auto missing = LoadSecret("");
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_NE(missing.status().message().find(kSecretEnv), std::string_view::npos);
  setenv(kSecretEnv, "from-the-environment-123", 1);
  auto s = LoadSecret("");
  EXPECT_TRUE(s.ok());
  unsetenv(kSecretEnv);
}

}  // namespace
}  // namespace mf::fabric
