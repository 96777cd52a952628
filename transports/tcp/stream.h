// Sockets and TLS for the TCP transport: connecting and listening with deadlines, and
// Stream — a connected non-blocking socket, optionally wrapped in TLS (OpenSSL), with one
// read/write interface for both.
//
// TLS runs over a small custom BIO that sends with MSG_NOSIGNAL, so a peer that vanished
// yields EPIPE instead of SIGPIPE and the library never touches the process's signal
// dispositions.
//
// Thread-safety: TlsContext is immutable after creation and may be shared. A Stream may be
// read by one thread while other threads write to it (the client's reader thread and its
// submitters): for TLS, every SSL call is serialized by an internal mutex and is
// non-blocking, so neither side waits for the other's I/O. Shutdown() may be called from
// any thread to wake a blocked reader.
#pragma once

#include <openssl/ssl.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "fabric/os.h"
#include "fabric/status.h"
#include "fabric/thread_annotations.h"
#include "transports/connect.h"

namespace mf::tcp {

using Clock = std::chrono::steady_clock;

// Pieces one gathered write takes at most (well below IOV_MAX, on the stack).
inline constexpr size_t kMaxGatherPieces = 64;

struct SslCtxDeleter {
  void operator()(SSL_CTX* ctx) const { SSL_CTX_free(ctx); }
};
struct SslDeleter {
  void operator()(SSL* ssl) const { SSL_free(ssl); }
};
using UniqueSslCtx = std::unique_ptr<SSL_CTX, SslCtxDeleter>;
using UniqueSsl = std::unique_ptr<SSL, SslDeleter>;

// A configured OpenSSL context (TLS 1.2 minimum).
class TlsContext final {
 public:
  // Server: cert_file and key_file are required; with ca_file, clients must present a
  // certificate signed by it (mutual TLS). kInvalidArgument / kNotFound with the OpenSSL
  // reason when a file cannot be loaded.
  static Result<std::shared_ptr<TlsContext>> ForServer(const transports::TlsOptions& options);
  // Client: verifies the server against ca_file (or the system store when empty) and
  // presents cert_file/key_file when given.
  static Result<std::shared_ptr<TlsContext>> ForClient(const transports::TlsOptions& options);

  SSL_CTX* get() const { return ctx_.get(); }

 private:
  explicit TlsContext(UniqueSslCtx ctx) : ctx_(std::move(ctx)) {}
  UniqueSslCtx ctx_;
};

// What a non-blocking operation that made no progress waits for.
enum class IoWait : uint8_t { kNone, kRead, kWrite };

class Stream final {
 public:
  // Takes ownership of fd, which is made non-blocking.
  explicit Stream(UniqueFd fd);
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  int fd() const { return fd_.get(); }
  bool tls() const { return tls_; }

  // Wraps the socket in TLS. server_name (client side) is checked against the peer's
  // certificate: as an IP address when it parses as one, else as a DNS name (also sent
  // as SNI). Drive the handshake with HandshakeStep().
  Status StartTls(const TlsContext& context, bool server, const std::string& server_name) MF_EXCLUDES(mu_);
  // One non-blocking step of the TLS handshake: kNone once it is complete, else what it
  // waits for. kUnauthenticated when certificate verification fails, kProtocolError or
  // kUnavailable for other failures.
  Result<IoWait> HandshakeStep() MF_EXCLUDES(mu_);

  // Non-blocking. Returns the bytes transferred; 0 means no progress, and wait() says for
  // what. kUnavailable when the peer closed the connection, kIoError/kProtocolError on
  // failures.
  Result<size_t> ReadSome(std::span<std::byte> buf) MF_EXCLUDES(mu_);
  Result<size_t> WriteSome(std::span<const std::byte> buf) MF_EXCLUDES(mu_);
  // Writes from `pieces` in order (headers and payloads), gathered into one system call
  // when the stream is plain TCP (at most kMaxGatherPieces of them); TLS writes from the
  // first non-empty piece only. Returns the bytes taken from the front, as WriteSome.
  Result<size_t> WriteSomeV(std::span<const std::span<const std::byte>> pieces) MF_EXCLUDES(mu_);
  IoWait read_wait() const { return read_wait_; }
  IoWait write_wait() const { return write_wait_; }
  // Bytes TLS has already decrypted and buffered (invisible to poll/epoll).
  bool HasBufferedInput() MF_EXCLUDES(mu_);

  // shutdown(2) both directions: wakes any thread blocked on the socket. The fd stays open.
  void Shutdown();

 private:
  Result<size_t> SslResult(int ret, bool reading, IoWait* wait) MF_REQUIRES(mu_);

  UniqueFd fd_;
  Mutex mu_;                           // serializes calls into ssl_
  UniqueSsl ssl_ MF_GUARDED_BY(mu_);   // declared after fd_: freed before the fd closes
  int bio_fd_ = -1;                    // the TLS BIO's data: the fd it sends and receives on
  bool tls_ = false;                   // set by StartTls, before the stream is shared
  IoWait read_wait_ = IoWait::kNone;   // touched only by the reading thread
  IoWait write_wait_ = IoWait::kNone;  // touched only by the (serialized) writers
};

// ---- Blocking helpers with deadlines (client side and tests) --------------------------

// Waits until fd is ready for `events` (POLLIN/POLLOUT) or the deadline passes (kTimeout).
Status WaitFd(int fd, short events, Clock::time_point deadline);
Status ReadExact(Stream& stream, std::span<std::byte> buf, Clock::time_point deadline);
Status WriteExact(Stream& stream, std::span<const std::byte> buf, Clock::time_point deadline);
// WriteExact of every piece in order, gathered into as few system calls as possible.
// `pieces` is used as scratch: its spans are advanced past what was sent.
Status WriteExactV(Stream& stream, std::span<std::span<const std::byte>> pieces, Clock::time_point deadline);
// WriteExact of first then second (a header and its payload), gathered.
Status WriteExactV(Stream& stream, std::span<const std::byte> first, std::span<const std::byte> second,
                   Clock::time_point deadline);
Status HandshakeBlocking(Stream& stream, Clock::time_point deadline);

// Resolves host and connects to the first address that answers before the deadline.
// Returns a non-blocking socket with TCP_NODELAY set. kUnavailable / kTimeout / kNotFound.
Result<UniqueFd> ConnectTcp(const std::string& host, uint16_t port, Clock::time_point deadline);

// Binds and listens on host:port (port 0 = ephemeral). Returns the non-blocking socket.
Result<UniqueFd> ListenTcp(const std::string& host, uint16_t port, int backlog);
// The port a bound socket listens on.
Result<uint16_t> LocalPort(int fd);
// True when every address host resolves to is a loopback address (127/8, ::1).
bool IsLoopbackHost(const std::string& host);
// "1.2.3.4:5678" or "[::1]:5678" for the peer of a connected socket.
std::string PeerName(int fd);

}  // namespace mf::tcp
