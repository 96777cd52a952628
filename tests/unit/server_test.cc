#include "fabric/server.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>

namespace mf::fabric {
namespace {

TEST(Server, CreateStatListDelete) {
  Server server(ServerOptions{Secret("0123456789abcdef0123"), false, ""});
  auto info = server.Create({"a", 1 << 20, BackingKind::kAnonymous, ""});
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->size, 1u << 20);
  EXPECT_EQ(server.Create({"a", 4096, BackingKind::kAnonymous, ""}).status().code(), Code::kAlreadyExists);
  ASSERT_TRUE(server.Create({"b", 8192, BackingKind::kMemfd, ""}).ok());
  auto list = server.List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "a");
  EXPECT_EQ(list[1].backing, BackingKind::kMemfd);
  EXPECT_EQ(server.Stat("b")->size, 8192u);
  EXPECT_EQ(server.Stat("zz").status().code(), Code::kNotFound);
  EXPECT_TRUE(server.Delete("a").ok());
  EXPECT_EQ(server.Delete("a").code(), Code::kNotFound);
  EXPECT_EQ(server.List().size(), 1u);
}

TEST(Server, OneWriterManyReaders) {
  Server server(ServerOptions{Secret("0123456789abcdef0123"), false, ""});
  ASSERT_TRUE(server.Create({"r", 4096, BackingKind::kAnonymous, ""}).ok());
  auto w1 = server.Open("r", true);
  ASSERT_TRUE(w1.ok());
  EXPECT_TRUE(server.Stat("r")->has_writer);
  EXPECT_EQ(server.Open("r", true).status().code(), Code::kBusy);
  auto r1 = server.Open("r", false);
  auto r2 = server.Open("r", false);
  EXPECT_TRUE(r1.ok() && r2.ok());
  EXPECT_EQ(server.Delete("r").code(), Code::kBusy);
  *w1 = RegionHandle();  // releases the lease
  EXPECT_FALSE(server.Stat("r")->has_writer);
  auto w2 = server.Open("r", true);
  EXPECT_TRUE(w2.ok());
}

TEST(Server, DeletedRegionStaysAliveForOpenHandlesAndRecreateBumpsGeneration) {
  Server server(ServerOptions{Secret("0123456789abcdef0123"), false, ""});
  auto first = server.Create({"g", 4096, BackingKind::kAnonymous, ""});
  ASSERT_TRUE(first.ok());
  auto reader = server.Open("g", false);
  ASSERT_TRUE(reader.ok());
  reader->region()->data()[0] = std::byte{42};
  ASSERT_TRUE(server.Delete("g").ok());
  EXPECT_EQ(reader->region()->data()[0], std::byte{42});  // still mapped
  auto second = server.Create({"g", 4096, BackingKind::kAnonymous, ""});
  ASSERT_TRUE(second.ok());
  EXPECT_GT(second->generation, first->generation);
  auto fresh = server.Open("g", false);
  EXPECT_EQ(fresh->region()->data()[0], std::byte{0});
}

TEST(Server, MovedHandleReleasesOnce) {
  Server server(ServerOptions{Secret("0123456789abcdef0123"), false, ""});
  ASSERT_TRUE(server.Create({"m", 4096, BackingKind::kAnonymous, ""}).ok());
  auto w = server.Open("m", true);
  ASSERT_TRUE(w.ok());
  RegionHandle moved = std::move(*w);
  EXPECT_TRUE(moved.writable());
  EXPECT_TRUE(server.Stat("m")->has_writer);
  moved = RegionHandle();
  EXPECT_FALSE(server.Stat("m")->has_writer);
}

TEST(Server, ClientsCreateFileRegionsOnlyInsideTheStore) {
  Server closed(ServerOptions{Secret("0123456789abcdef0123"), false, ""});
  EXPECT_EQ(closed.CreateForClient({"f", 4096, BackingKind::kFile, "x.img"}).status().code(),
            Code::kPermissionDenied);
  EXPECT_TRUE(closed.CreateForClient({"a", 4096, BackingKind::kAnonymous, ""}).ok());

  char tmpl[] = "/tmp/mf-store-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  Server server(ServerOptions{Secret("0123456789abcdef0123"), false, tmpl});
  for (const char* bad : {"/etc/passwd", "../x.img", "a/../../x.img", ""}) {
    EXPECT_EQ(server.CreateForClient({"f", 4096, BackingKind::kFile, bad}).status().code(),
              Code::kPermissionDenied)
        << bad;
  }
  ASSERT_TRUE(server.CreateForClient({"f", 4096, BackingKind::kFile, "f.img"}).ok());
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(tmpl) / "f.img"));
  std::filesystem::remove_all(tmpl);
}

}  // namespace
}  // namespace mf::fabric
