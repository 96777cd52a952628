#include "fabric/status.h"

#include <cstring>

namespace mf {

std::string_view CodeName(Code code) {
  switch (code) {
    case Code::kOk: return "OK";
    case Code::kInvalidArgument: return "INVALID_ARGUMENT";
    case Code::kNotFound: return "NOT_FOUND";
    case Code::kAlreadyExists: return "ALREADY_EXISTS";
    case Code::kOutOfRange: return "OUT_OF_RANGE";
    case Code::kPermissionDenied: return "PERMISSION_DENIED";
    case Code::kUnauthenticated: return "UNAUTHENTICATED";
    case Code::kBusy: return "BUSY";
    case Code::kUnavailable: return "UNAVAILABLE";
    case Code::kTimeout: return "TIMEOUT";
    case Code::kIoError: return "IO_ERROR";
    case Code::kProtocolError: return "PROTOCOL_ERROR";
    case Code::kResourceExhausted: return "RESOURCE_EXHAUSTED";
    case Code::kUnsupported: return "UNSUPPORTED";
    case Code::kAborted: return "ABORTED";
    case Code::kInternal: return "INTERNAL";
  }
  return "UNKNOWN";
}

Status::Status(Code code, std::string message, int err) {
  if (code != Code::kOk) rep_ = std::make_unique<Rep>(Rep{code, err, std::move(message)});
}

Status Status::FromErrno(int err, std::string_view context) {
  Code code = Code::kIoError;
  switch (err) {
    case 0: return Status(Code::kInternal, std::string(context) + ": errno was 0");
    case EINVAL: code = Code::kInvalidArgument; break;
    case ENOENT:
    case ENODEV:
    case ENXIO: code = Code::kNotFound; break;
    case EEXIST: code = Code::kAlreadyExists; break;
    case EACCES:
    case EPERM:
    case EROFS: code = Code::kPermissionDenied; break;
    case EBUSY: code = Code::kBusy; break;
    case ECONNREFUSED:
    case ECONNRESET:
    case ECONNABORTED:
    case EPIPE:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENOTCONN:
    case ESHUTDOWN: code = Code::kUnavailable; break;
    case ETIMEDOUT:
    case EAGAIN: code = Code::kTimeout; break;
    case ENOMEM:
    case ENOSPC:
    case EMFILE:
    case ENFILE: code = Code::kResourceExhausted; break;
    case ENOSYS:
    case EOPNOTSUPP:
    case EPROTONOSUPPORT:
    case EAFNOSUPPORT: code = Code::kUnsupported; break;
    case ERANGE:
    case EOVERFLOW:
    case EFBIG: code = Code::kOutOfRange; break;
    case ECANCELED: code = Code::kAborted; break;
    case EPROTO:
    case EBADMSG: code = Code::kProtocolError; break;
    default: break;
  }
  std::string message(context);
  message += ": ";
  message += std::strerror(err);
  return Status(code, std::move(message), err);
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s(CodeName(rep_->code));
  s += ": ";
  s += rep_->message;
  return s;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string message(context);
  message += ": ";
  message += rep_->message;
  return Status(rep_->code, std::move(message), rep_->err);
}

}  // namespace mf
