// Helpers for the NBD tests: a raw NBD client speaking (mal)formed protocol through
// nbd/protocol.h, a temporary directory, and running the real NBD tools (libnbd's
// nbdinfo/nbdcopy/nbdsh, fio) with their output captured.
//
// Thread-safety: each object is used by one test thread.
#pragma once

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "fabric/os.h"
#include "nbd/protocol.h"

namespace mf::nbd::testing {

#define NBD_ASSERT_OK(expr)                          \
  do {                                               \
    ::mf::Status nbd_st_ = (expr);                   \
    ASSERT_TRUE(nbd_st_.ok()) << nbd_st_.ToString(); \
  } while (0)

// A temporary directory removed at destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "mf_nbd_test.XXXXXX").string();
    if (::mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Runs `command` under /bin/sh with the system Python first on PATH (nbdsh needs the
// python3-libnbd module); returns the exit status and stdout+stderr.
inline int RunTool(const std::string& command, std::string* output) {
  const std::string full = "PATH=/usr/bin:/bin:$PATH; export PATH; " + command + " 2>&1";
  FILE* pipe = ::popen(full.c_str(), "r");
  if (pipe == nullptr) return -1;
  std::array<char, 4096> buf{};
  output->clear();
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) output->append(buf.data(), n);
  const int status = ::pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

inline std::vector<std::byte> Bytes(std::string_view s) {
  std::vector<std::byte> v(s.size());
  if (!s.empty()) std::memcpy(v.data(), s.data(), s.size());
  return v;
}

// A blocking NBD client over one socket, with deadlines on every read.
class RawClient {
 public:
  RawClient() = default;
  explicit RawClient(UniqueFd fd) : fd_(std::move(fd)) {}

  static RawClient ConnectUnix(const std::string& path) {
    UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), std::min(path.size(), sizeof(addr.sun_path) - 1));
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) fd.Reset();
    return RawClient(std::move(fd));
  }

  bool connected() const { return fd_.valid(); }
  int fd() const { return fd_.get(); }

  Status Send(std::span<const std::byte> bytes) {
    while (!bytes.empty()) {
      ssize_t n = ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "send");
      }
      bytes = bytes.subspan(static_cast<size_t>(n));
    }
    return Status::Ok();
  }
  Status Recv(std::span<std::byte> bytes, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!bytes.empty()) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return Status(Code::kTimeout, "no reply in time");
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      ssize_t n = ::recv(fd_.get(), bytes.data(), bytes.size(), 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "recv");
      }
      if (n == 0) return Status(Code::kUnavailable, "server closed the connection");
      bytes = bytes.subspan(static_cast<size_t>(n));
    }
    return Status::Ok();
  }
  // True when the server closes the connection (EOF or reset) within timeout; any bytes it
  // sends first are ignored.
  bool ClosedByServer(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::array<std::byte, 4096> sink{};
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      ssize_t n = ::recv(fd_.get(), sink.data(), sink.size(), 0);
      if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) return true;
    }
    return false;
  }

  Result<ServerGreeting> ReadGreeting() {
    std::array<std::byte, kServerGreetingSize> raw{};
    MF_RETURN_IF_ERROR(Recv(raw));
    return DecodeServerGreeting(raw);
  }
  Status SendClientFlags(uint32_t flags) {
    std::array<std::byte, kClientFlagsSize> raw{};
    EncodeClientFlags(flags, raw);
    return Send(raw);
  }
  // Greeting + client flags.
  Status Start(uint32_t flags = kClientFlagFixedNewstyle | kClientFlagNoZeroes) {
    auto g = ReadGreeting();
    if (!g.ok()) return g.status();
    return SendClientFlags(flags);
  }
  Status SendOption(uint32_t option, std::span<const std::byte> data = {}) {
    std::vector<std::byte> out;
    AppendOption(option, data, &out);
    return Send(out);
  }
  struct OptionReply {
    OptionReplyHeader header;
    std::vector<std::byte> data;
  };
  Result<OptionReply> ReadOptionReply() {
    std::array<std::byte, kOptionReplyHeaderSize> raw{};
    MF_RETURN_IF_ERROR(Recv(raw));
    MF_ASSIGN_OR_RETURN(OptionReplyHeader h, DecodeOptionReplyHeader(raw));
    OptionReply r{h, std::vector<std::byte>(h.length)};
    MF_RETURN_IF_ERROR(Recv(r.data));
    return r;
  }
  // Sends NBD_OPT_GO for `name` and reads the replies up to the final one, which is returned
  // (NBD_REP_ACK on success). *size and *flags come from NBD_INFO_EXPORT.
  Result<uint32_t> Go(const std::string& name, uint64_t* size = nullptr, uint16_t* flags = nullptr,
                      uint32_t option = kOptGo) {
    MF_RETURN_IF_ERROR(SendOption(option, EncodeInfoRequest({name, {kInfoBlockSize}})));
    for (;;) {
      MF_ASSIGN_OR_RETURN(OptionReply r, ReadOptionReply());
      if (r.header.type != kRepInfo) return r.header.type;
      auto e = DecodeInfoExport(r.data);
      if (e.ok()) {
        if (size) *size = e->first;
        if (flags) *flags = e->second;
      }
    }
  }
  // Full negotiation into transmission with structured replies when asked.
  Status Negotiate(const std::string& name, bool structured, uint64_t* size = nullptr) {
    MF_RETURN_IF_ERROR(Start());
    if (structured) {
      MF_RETURN_IF_ERROR(SendOption(kOptStructuredReply));
      MF_ASSIGN_OR_RETURN(OptionReply r, ReadOptionReply());
      if (r.header.type != kRepAck) return ProtocolError("structured replies refused");
    }
    MF_ASSIGN_OR_RETURN(uint32_t final_type, Go(name, size));
    if (final_type != kRepAck)
      return ProtocolError("GO failed with reply type " + std::to_string(final_type));
    return Status::Ok();
  }

  Status SendRequest(const Request& r, std::span<const std::byte> payload = {}) {
    std::vector<std::byte> out(kRequestSize);
    EncodeRequest(r, std::span(out).first<kRequestSize>());
    out.insert(out.end(), payload.begin(), payload.end());
    return Send(out);
  }
  // Reads a simple reply; when its error is 0 and read_length > 0, that many data bytes.
  Result<SimpleReply> ReadSimpleReply(std::vector<std::byte>* data = nullptr, size_t read_length = 0) {
    std::array<std::byte, kSimpleReplySize> raw{};
    MF_RETURN_IF_ERROR(Recv(raw));
    MF_ASSIGN_OR_RETURN(SimpleReply r, DecodeSimpleReply(raw));
    if (r.error == 0 && read_length > 0) {
      std::vector<std::byte> buf(read_length);
      MF_RETURN_IF_ERROR(Recv(buf));
      if (data) *data = std::move(buf);
    }
    return r;
  }
  // Reads one structured chunk (header + payload).
  Result<std::pair<StructuredReplyHeader, std::vector<std::byte>>> ReadChunk() {
    std::array<std::byte, kStructuredReplyHeaderSize> raw{};
    MF_RETURN_IF_ERROR(Recv(raw));
    MF_ASSIGN_OR_RETURN(StructuredReplyHeader h, DecodeStructuredReplyHeader(raw));
    std::vector<std::byte> payload(h.length);
    MF_RETURN_IF_ERROR(Recv(payload));
    return std::make_pair(h, std::move(payload));
  }

  // Writes then reads back `n` bytes at `offset` with simple replies; OK when they match.
  Status RoundTrip(uint64_t offset, size_t n, uint64_t handle, uint8_t seed) {
    std::vector<std::byte> data(n);
    for (size_t i = 0; i < n; ++i) data[i] = static_cast<std::byte>(seed + i * 7);
    MF_RETURN_IF_ERROR(SendRequest({0, kCmdWrite, handle, offset, static_cast<uint32_t>(n)}, data));
    MF_ASSIGN_OR_RETURN(SimpleReply w, ReadSimpleReply());
    if (w.error != 0 || w.handle != handle) return Internal("write failed: " + std::to_string(w.error));
    MF_RETURN_IF_ERROR(SendRequest({0, kCmdRead, handle + 1, offset, static_cast<uint32_t>(n)}));
    std::vector<std::byte> back;
    MF_ASSIGN_OR_RETURN(SimpleReply r, ReadSimpleReply(&back, n));
    if (r.error != 0 || r.handle != handle + 1) return Internal("read failed: " + std::to_string(r.error));
    if (back != data) return Internal("read back different bytes");
    return Status::Ok();
  }

  void Close() { fd_.Reset(); }

 private:
  UniqueFd fd_;
};

}  // namespace mf::nbd::testing
