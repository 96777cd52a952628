#include "fabric/status.h"

#include <gtest/gtest.h>

namespace mf {
namespace {

TEST(Status, OkIsCheapAndEmpty) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), Code::kOk);
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_EQ(s.err(), 0);
}

TEST(Status, FromErrnoMapsCodesAndKeepsErrno) {
  EXPECT_EQ(Status::FromErrno(ENOENT, "open x").code(), Code::kNotFound);
  EXPECT_EQ(Status::FromErrno(ECONNRESET, "read").code(), Code::kUnavailable);
  EXPECT_EQ(Status::FromErrno(ETIMEDOUT, "connect").code(), Code::kTimeout);
  EXPECT_EQ(Status::FromErrno(EIO, "pread").code(), Code::kIoError);
  Status s = Status::FromErrno(EACCES, "open /secret");
  EXPECT_EQ(s.code(), Code::kPermissionDenied);
  EXPECT_EQ(s.err(), EACCES);
  EXPECT_NE(s.ToString().find("open /secret: Permission denied"), std::string::npos) << s.ToString();
}

TEST(Status, WithContextPrefixesAndKeepsCode) {
  Status s = NotFound("no region named 'x'").WithContext("stat");
  EXPECT_EQ(s.code(), Code::kNotFound);
  EXPECT_EQ(s.message(), "stat: no region named 'x'");
  EXPECT_TRUE(Status::Ok().WithContext("anything").ok());
}

TEST(Status, CopiesAreDeep) {
  Status a = InvalidArgument("a");
  Status b = a;
  a = Status::Ok();
  EXPECT_EQ(b.message(), "a");
}

Result<int> Half(int v) {
  if (v % 2 != 0) return InvalidArgument("odd");
  return v / 2;
}

Status UseHalf(int v, int* out) {
  MF_ASSIGN_OR_RETURN(*out, Half(v));
  return Status::Ok();
}

TEST(Result, ValueOrStatus) {
  int out = 0;
  EXPECT_TRUE(UseHalf(8, &out).ok());
  EXPECT_EQ(out, 4);
  Status s = UseHalf(3, &out);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(out, 4);
}

TEST(Result, OkStatusBecomesInternalError) {
  Result<int> r{Status::Ok()};
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInternal);
}

}  // namespace
}  // namespace mf
