#include "fabric/region.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace mf::fabric {
namespace {

TEST(ParseSize, SuffixesAndErrors) {
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("4k"), 4096u);
  EXPECT_EQ(*ParseSize("64M"), 64ull << 20);
  EXPECT_EQ(*ParseSize("1GiB"), 1ull << 30);
  EXPECT_EQ(*ParseSize("2T"), 2ull << 40);
  EXPECT_FALSE(ParseSize("").ok());
  EXPECT_FALSE(ParseSize("M").ok());
  EXPECT_FALSE(ParseSize("12X").ok());
  EXPECT_FALSE(ParseSize("-1").ok());
  EXPECT_FALSE(ParseSize("99999999999999999999").ok());
  EXPECT_FALSE(ParseSize("17179869184T").ok());  // overflows 64 bits
}

TEST(FormatSize, Units) {
  EXPECT_EQ(FormatSize(512), "512 B");
  EXPECT_EQ(FormatSize(64ull << 20), "64 MiB");
  EXPECT_EQ(FormatSize(3ull << 29), "1.5 GiB");
}

TEST(RegionName, Validation) {
  EXPECT_TRUE(ValidateRegionName("cache-0.v1_a").ok());
  EXPECT_FALSE(ValidateRegionName("").ok());
  EXPECT_FALSE(ValidateRegionName(".hidden").ok());
  EXPECT_FALSE(ValidateRegionName("-flag").ok());
  EXPECT_FALSE(ValidateRegionName("a/b").ok());
  EXPECT_FALSE(ValidateRegionName("a b").ok());
  EXPECT_FALSE(ValidateRegionName(std::string(kMaxRegionNameLength + 1, 'a')).ok());
  EXPECT_TRUE(ValidateRegionName(std::string(kMaxRegionNameLength, 'a')).ok());
}

TEST(RegionSpec, Parse) {
  auto spec = ParseRegionSpec("cache=64M");
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  EXPECT_EQ(spec->name, "cache");
  EXPECT_EQ(spec->size, 64ull << 20);
  EXPECT_EQ(spec->backing, BackingKind::kAnonymous);

  spec = ParseRegionSpec("f=1G,backing=file:/tmp/a,b");
  ASSERT_TRUE(spec.ok());
  EXPECT_EQ(spec->backing, BackingKind::kFile);
  EXPECT_EQ(spec->path, "/tmp/a,b");

  EXPECT_EQ(ParseRegionSpec("m=4K,backing=memfd")->backing, BackingKind::kMemfd);
  EXPECT_EQ(ParseRegionSpec("h=2M,backing=hugetlb")->backing, BackingKind::kHugetlb);
  EXPECT_FALSE(ParseRegionSpec("noequals").ok());
  EXPECT_FALSE(ParseRegionSpec("x=4K,backing=tape").ok());
  EXPECT_FALSE(ParseRegionSpec("x=4K,color=red").ok());
  EXPECT_FALSE(ParseRegionSpec("x=4K,backing=file:").ok());
  EXPECT_FALSE(ParseRegionSpec("bad name=4K").ok());
}

class RegionBackings : public ::testing::TestWithParam<BackingKind> {};

TEST_P(RegionBackings, ZeroFilledAndWritable) {
  RegionSpec spec{"r", 1 << 20, GetParam(), ""};
  std::filesystem::path dir;
  if (GetParam() == BackingKind::kFile) {
    char tmpl[] = "/tmp/mf-region-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir = tmpl;
    spec.path = dir / "r.bin";
  }
  auto region = Region::Create(spec, 7);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  EXPECT_EQ((*region)->generation(), 7u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*region)->data()) % kPageSize, 0u);
  for (size_t i = 0; i < spec.size; i += 997) ASSERT_EQ((*region)->data()[i], std::byte{0});
  (*region)->data()[spec.size - 1] = std::byte{0x5a};
  EXPECT_TRUE((*region)->Flush().ok());
  if (!dir.empty()) std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(All, RegionBackings,
                         ::testing::Values(BackingKind::kAnonymous, BackingKind::kMemfd, BackingKind::kFile));

TEST(Region, FileKeepsDataAcrossReopen) {
  char tmpl[] = "/tmp/mf-region-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::filesystem::path dir = tmpl;
  RegionSpec spec{"persist", 64 << 10, BackingKind::kFile, dir / "p.bin"};
  {
    auto region = Region::Create(spec, 1);
    ASSERT_TRUE(region.ok()) << region.status().ToString();
    std::memcpy((*region)->data() + 4096, "hello", 5);
    ASSERT_TRUE((*region)->Flush().ok());
  }
  {
    auto region = Region::Create(spec, 2);
    ASSERT_TRUE(region.ok());
    EXPECT_EQ(std::memcmp((*region)->data() + 4096, "hello", 5), 0);
  }
  spec.size = 128 << 10;  // wrong size for the existing file: refused, file untouched
  auto wrong = Region::Create(spec, 3);
  EXPECT_EQ(wrong.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(std::filesystem::file_size(dir / "p.bin"), 64u << 10);
  std::filesystem::remove_all(dir);
}

TEST(Region, RejectsBadSizes) {
  EXPECT_EQ(Region::Create({"z", 0, BackingKind::kAnonymous, ""}, 1).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(Region::Create({"z", 4097, BackingKind::kAnonymous, ""}, 1).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(Region::Create({"z", 4096, BackingKind::kHugetlb, ""}, 1).status().code(),
            Code::kInvalidArgument);
}

TEST(Region, HugetlbWithoutPagesSaysHowToReserve) {
  auto r = Region::Create({"huge", 1ull << 40, BackingKind::kHugetlb, ""}, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kUnsupported);
  EXPECT_NE(r.status().message().find("nr_hugepages"), std::string_view::npos) << r.status().ToString();
}

}  // namespace
}  // namespace mf::fabric
