// Status and Result<T>: the one error type of memfabric.
//
// A Status is a code, the errno that caused it (0 when none) and a human-readable
// context message. OK statuses carry no allocation. Result<T> holds either a value or a
// non-OK Status. Neither throws; both are cheap to move. errno is mapped to a Code in
// exactly one place, Status::FromErrno.
//
// Thread-safety: values; no shared state.
#pragma once

#include <cerrno>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace mf {

enum class Code : uint8_t {
  kOk = 0,
  kInvalidArgument,    // the caller asked for something malformed
  kNotFound,           // no such region, file, device
  kAlreadyExists,      // a region of that name exists
  kOutOfRange,         // offset/length outside a region
  kPermissionDenied,   // authenticated but not allowed (e.g. read-only open)
  kUnauthenticated,    // bad or missing secret
  kBusy,               // resource held by someone else (e.g. the write lease)
  kUnavailable,        // peer unreachable or gone; retrying may help
  kTimeout,            // a deadline passed
  kIoError,            // the OS reported an I/O failure
  kProtocolError,      // the peer sent bytes that do not follow the protocol
  kResourceExhausted,  // out of memory, descriptors, queue slots
  kUnsupported,        // the system or peer lacks a feature
  kAborted,            // cancelled, e.g. by close()
  kInternal,           // a bug: an invariant did not hold
};

std::string_view CodeName(Code code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(Code code, std::string message, int err = 0);

  static Status Ok() { return Status(); }
  // Maps errno to a Code; the message becomes "context: strerror(err)".
  static Status FromErrno(int err, std::string_view context);

  bool ok() const { return rep_ == nullptr; }
  Code code() const { return rep_ ? rep_->code : Code::kOk; }
  int err() const { return rep_ ? rep_->err : 0; }
  std::string_view message() const { return rep_ ? std::string_view(rep_->message) : ""; }
  // "CODE: message" or "OK".
  std::string ToString() const;
  // Returns a copy whose message is "context: <old message>".
  Status WithContext(std::string_view context) const;

  Status(const Status& other) : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}
  Status& operator=(const Status& other) {
    if (this != &other) rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

 private:
  struct Rep {
    Code code;
    int err;
    std::string message;
  };
  std::unique_ptr<Rep> rep_;
};

// Shorthands for the common codes.
inline Status InvalidArgument(std::string m) {
  return Status(Code::kInvalidArgument, std::move(m));
}
inline Status NotFound(std::string m) {
  return Status(Code::kNotFound, std::move(m));
}
inline Status OutOfRange(std::string m) {
  return Status(Code::kOutOfRange, std::move(m));
}
inline Status ProtocolError(std::string m) {
  return Status(Code::kProtocolError, std::move(m));
}
inline Status Internal(std::string m) {
  return Status(Code::kInternal, std::move(m));
}
inline Status Unavailable(std::string m) {
  return Status(Code::kUnavailable, std::move(m));
}
inline Status Unsupported(std::string m) {
  return Status(Code::kUnsupported, std::move(m));
}

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    if (status_.ok()) status_ = Internal("Result constructed from an OK status");
  }

  bool ok() const { return value_.has_value(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace mf

#define MF_CONCAT_INNER(a, b) a##b
#define MF_CONCAT(a, b) MF_CONCAT_INNER(a, b)

// Returns the Status of `expr` from the enclosing function when it is not OK.
#define MF_RETURN_IF_ERROR(expr)             \
  do {                                       \
    ::mf::Status mf_status_ = (expr);        \
    if (!mf_status_.ok()) return mf_status_; \
  } while (0)

// `MF_ASSIGN_OR_RETURN(auto x, Foo());` declares x from a Result or returns its Status.
#define MF_ASSIGN_OR_RETURN(lhs, expr) MF_ASSIGN_OR_RETURN_IMPL(MF_CONCAT(mf_result_, __LINE__), lhs, expr)
#define MF_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()
