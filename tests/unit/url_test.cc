#include "fabric/url.h"

#include <gtest/gtest.h>

namespace mf::fabric {
namespace {

TEST(Url, ParsesSchemesHostsPortsRegions) {
  auto u = ParseUrl("tcp://127.0.0.1:9000/cache");
  ASSERT_TRUE(u.ok()) << u.status().ToString();
  EXPECT_EQ(u->scheme, Scheme::kTcp);
  EXPECT_EQ(u->host, "127.0.0.1");
  EXPECT_EQ(u->port, 9000);
  EXPECT_EQ(u->region, "cache");
  EXPECT_EQ(u->ToString(), "tcp://127.0.0.1:9000/cache");

  u = ParseUrl("auto://node-7");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->scheme, Scheme::kAuto);
  EXPECT_EQ(u->port, kDefaultPort);
  EXPECT_TRUE(u->region.empty());

  u = ParseUrl("rdma://[fe80::1]:7000/r");
  ASSERT_TRUE(u.ok());
  EXPECT_EQ(u->host, "fe80::1");
  EXPECT_EQ(u->ToString(), "rdma://[fe80::1]:7000/r");
  EXPECT_EQ(ParseUrl("tls://h/")->region, "");
}

TEST(Url, RejectsWithUsefulMessages) {
  for (const char* bad : {"127.0.0.1:7411", "http://h/r", "tcp://:7411/r", "tcp://h:99999/r", "tcp://h:x/r",
                          "tcp://fe80::1/r", "tcp://[::1/r", "tcp://h/a/b"}) {
    auto u = ParseUrl(bad);
    EXPECT_FALSE(u.ok()) << bad;
    EXPECT_EQ(u.status().code(), Code::kInvalidArgument) << bad;
    EXPECT_FALSE(u.status().message().empty());
  }
}

TEST(HostPort, ListenAddresses) {
  std::string host;
  uint16_t port = 1;
  ASSERT_TRUE(ParseHostPort("0.0.0.0:0", &host, &port).ok());
  EXPECT_EQ(host, "0.0.0.0");
  EXPECT_EQ(port, 0);
  ASSERT_TRUE(ParseHostPort("[::1]:7411", &host, &port).ok());
  EXPECT_EQ(host, "::1");
  EXPECT_FALSE(ParseHostPort(":7411", &host, &port).ok());
}

}  // namespace
}  // namespace mf::fabric
