#include "transports/tcp/stream.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>

namespace mf::tcp {
namespace {

// Drains OpenSSL's (thread-local) error queue into one line.
std::string OpenSslErrors() {
  std::string out;
  unsigned long e = 0;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "unknown OpenSSL error" : out;
}

// ---- A socket BIO that never raises SIGPIPE -------------------------------------------

// The BIO's data points at the Stream's copy of its fd.
int FdOf(BIO* bio) {
  return *static_cast<const int*>(BIO_get_data(bio));
}

int BioWrite(BIO* bio, const char* data, size_t len, size_t* written) {
  BIO_clear_retry_flags(bio);
  ssize_t n = ::send(FdOf(bio), data, len, MSG_NOSIGNAL);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) BIO_set_retry_write(bio);
    return 0;
  }
  *written = static_cast<size_t>(n);
  return 1;
}

int BioRead(BIO* bio, char* data, size_t len, size_t* read_bytes) {
  BIO_clear_retry_flags(bio);
  ssize_t n = ::recv(FdOf(bio), data, len, 0);
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) BIO_set_retry_read(bio);
    return 0;
  }
  if (n == 0) return 0;  // EOF
  *read_bytes = static_cast<size_t>(n);
  return 1;
}

long BioCtrl(BIO* /*bio*/, int cmd, long /*num*/, void* /*ptr*/) {
  return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

int BioCreate(BIO* bio) {
  BIO_set_init(bio, 1);
  return 1;
}

const BIO_METHOD* SocketBioMethod() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "memfabric socket");
    if (m != nullptr) {
      BIO_meth_set_write_ex(m, BioWrite);
      BIO_meth_set_read_ex(m, BioRead);
      BIO_meth_set_ctrl(m, BioCtrl);
      BIO_meth_set_create(m, BioCreate);
    }
    return m;
  }();
  return method;
}

Status LoadFile(SSL_CTX* ctx, const std::string& path, bool key) {
  int ok = key ? SSL_CTX_use_PrivateKey_file(ctx, path.c_str(), SSL_FILETYPE_PEM)
               : SSL_CTX_use_certificate_chain_file(ctx, path.c_str());
  if (ok != 1) {
    return InvalidArgument(
        fmt::format("TLS: cannot load {} {}: {}", key ? "key" : "certificate", path, OpenSslErrors()));
  }
  return Status::Ok();
}

Result<UniqueSslCtx> NewContext(bool server) {
  ERR_clear_error();
  UniqueSslCtx ctx(SSL_CTX_new(server ? TLS_server_method() : TLS_client_method()));
  if (!ctx) return Status(Code::kResourceExhausted, "TLS: SSL_CTX_new: " + OpenSslErrors());
  SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  return ctx;
}

}  // namespace

// ---- TlsContext -----------------------------------------------------------------------

Result<std::shared_ptr<TlsContext>> TlsContext::ForServer(const transports::TlsOptions& options) {
  if (options.cert_file.empty() || options.key_file.empty()) {
    return InvalidArgument("TLS server needs a certificate and a key (cert_file, key_file)");
  }
  MF_ASSIGN_OR_RETURN(UniqueSslCtx ctx, NewContext(/*server=*/true));
  MF_RETURN_IF_ERROR(LoadFile(ctx.get(), options.cert_file, false));
  MF_RETURN_IF_ERROR(LoadFile(ctx.get(), options.key_file, true));
  if (SSL_CTX_check_private_key(ctx.get()) != 1) {
    return InvalidArgument("TLS: key does not match the certificate: " + OpenSslErrors());
  }
  if (!options.ca_file.empty()) {
    if (SSL_CTX_load_verify_locations(ctx.get(), options.ca_file.c_str(), nullptr) != 1) {
      return InvalidArgument(fmt::format("TLS: cannot load CA {}: {}", options.ca_file, OpenSslErrors()));
    }
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  return std::shared_ptr<TlsContext>(new TlsContext(std::move(ctx)));
}

Result<std::shared_ptr<TlsContext>> TlsContext::ForClient(const transports::TlsOptions& options) {
  MF_ASSIGN_OR_RETURN(UniqueSslCtx ctx, NewContext(/*server=*/false));
  int ok = options.ca_file.empty()
               ? SSL_CTX_set_default_verify_paths(ctx.get())
               : SSL_CTX_load_verify_locations(ctx.get(), options.ca_file.c_str(), nullptr);
  if (ok != 1)
    return InvalidArgument(fmt::format("TLS: cannot load CA {}: {}", options.ca_file, OpenSslErrors()));
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  if (!options.cert_file.empty()) {
    MF_RETURN_IF_ERROR(LoadFile(ctx.get(), options.cert_file, false));
    MF_RETURN_IF_ERROR(
        LoadFile(ctx.get(), options.key_file.empty() ? options.cert_file : options.key_file, true));
  }
  return std::shared_ptr<TlsContext>(new TlsContext(std::move(ctx)));
}

// ---- Stream ---------------------------------------------------------------------------

Stream::Stream(UniqueFd fd) : fd_(std::move(fd)) {
  int flags = ::fcntl(fd_.get(), F_GETFL);
  if (flags >= 0) ::fcntl(fd_.get(), F_SETFL, flags | O_NONBLOCK);
}

Status Stream::StartTls(const TlsContext& context, bool server, const std::string& server_name) {
  MutexLock lock(mu_);
  ERR_clear_error();
  UniqueSsl ssl(SSL_new(context.get()));
  if (!ssl) return Status(Code::kResourceExhausted, "TLS: SSL_new: " + OpenSslErrors());
  const BIO_METHOD* method = SocketBioMethod();
  BIO* bio = method != nullptr ? BIO_new(method) : nullptr;
  if (bio == nullptr) return Status(Code::kResourceExhausted, "TLS: BIO_new: " + OpenSslErrors());
  bio_fd_ = fd_.get();
  BIO_set_data(bio, &bio_fd_);
  SSL_set_bio(ssl.get(), bio, bio);  // ssl owns bio from here
  if (server) {
    SSL_set_accept_state(ssl.get());
  } else {
    SSL_set_connect_state(ssl.get());
    if (!server_name.empty()) {
      in6_addr addr6{};
      in_addr addr4{};
      bool is_ip = ::inet_pton(AF_INET, server_name.c_str(), &addr4) == 1 ||
                   ::inet_pton(AF_INET6, server_name.c_str(), &addr6) == 1;
      if (is_ip) {
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl.get()), server_name.c_str()) != 1) {
          return InvalidArgument("TLS: bad server address " + server_name);
        }
      } else {
        if (SSL_set1_host(ssl.get(), server_name.c_str()) != 1 ||
            // SSL_set_tlsext_host_name, without the macro's C-style cast.
            SSL_ctrl(ssl.get(), SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
                     const_cast<char*>(server_name.c_str())) != 1) {
          return InvalidArgument("TLS: bad server name " + server_name);
        }
      }
    }
  }
  ssl_ = std::move(ssl);
  tls_ = true;
  return Status::Ok();
}

Result<size_t> Stream::SslResult(int ret, bool reading, IoWait* wait) {
  int error = SSL_get_error(ssl_.get(), ret);
  switch (error) {
    case SSL_ERROR_WANT_READ: *wait = IoWait::kRead; return size_t{0};
    case SSL_ERROR_WANT_WRITE: *wait = IoWait::kWrite; return size_t{0};
    case SSL_ERROR_ZERO_RETURN: return Status(Code::kUnavailable, "peer closed the TLS session");
    case SSL_ERROR_SYSCALL:
      if (errno != 0 && ERR_peek_error() == 0)
        return Status::FromErrno(errno, reading ? "TLS read" : "TLS write");
      return Status(Code::kUnavailable, "peer closed the connection (" + OpenSslErrors() + ")");
    default: {
      long verify = SSL_get_verify_result(ssl_.get());
      if (verify != X509_V_OK) {
        return Status(Code::kUnauthenticated, fmt::format("TLS certificate verification failed: {}",
                                                          X509_verify_cert_error_string(verify)));
      }
      return ProtocolError("TLS: " + OpenSslErrors());
    }
  }
}

Result<IoWait> Stream::HandshakeStep() {
  MutexLock lock(mu_);
  if (!ssl_) return IoWait::kNone;
  ERR_clear_error();
  errno = 0;
  int ret = SSL_do_handshake(ssl_.get());
  if (ret == 1) return IoWait::kNone;
  IoWait wait = IoWait::kNone;
  auto r = SslResult(ret, true, &wait);
  if (!r.ok()) return r.status().WithContext("TLS handshake");
  return wait == IoWait::kNone ? IoWait::kRead : wait;
}

Result<size_t> Stream::ReadSome(std::span<std::byte> buf) {
  read_wait_ = IoWait::kNone;
  if (buf.empty()) return size_t{0};
  {
    MutexLock lock(mu_);
    if (ssl_) {
      ERR_clear_error();
      errno = 0;
      size_t n = 0;
      int ret = SSL_read_ex(ssl_.get(), buf.data(), buf.size(), &n);
      if (ret == 1) return n;
      return SslResult(ret, true, &read_wait_);
    }
  }
  while (true) {
    ssize_t n = ::recv(fd_.get(), buf.data(), buf.size(), 0);
    if (n > 0) return static_cast<size_t>(n);
    if (n == 0) return Status(Code::kUnavailable, "peer closed the connection");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      read_wait_ = IoWait::kRead;
      return size_t{0};
    }
    return Status::FromErrno(errno, "recv");
  }
}

Result<size_t> Stream::WriteSome(std::span<const std::byte> buf) {
  write_wait_ = IoWait::kNone;
  if (buf.empty()) return size_t{0};
  {
    MutexLock lock(mu_);
    if (ssl_) {
      ERR_clear_error();
      errno = 0;
      size_t n = 0;
      int ret = SSL_write_ex(ssl_.get(), buf.data(), buf.size(), &n);
      if (ret == 1) return n;
      return SslResult(ret, false, &write_wait_);
    }
  }
  while (true) {
    ssize_t n = ::send(fd_.get(), buf.data(), buf.size(), MSG_NOSIGNAL);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      write_wait_ = IoWait::kWrite;
      return size_t{0};
    }
    return Status::FromErrno(errno, "send");
  }
}

Result<size_t> Stream::WriteSomeV(std::span<const std::span<const std::byte>> pieces) {
  std::array<iovec, kMaxGatherPieces> iov{};
  size_t count = 0;
  for (const auto& piece : pieces) {
    if (piece.empty()) continue;
    if (tls_) return WriteSome(piece);
    if (count == iov.size()) break;
    iov[count++] = iovec{const_cast<std::byte*>(piece.data()), piece.size()};
  }
  write_wait_ = IoWait::kNone;
  if (count == 0) return size_t{0};
  if (count == 1) return WriteSome({static_cast<const std::byte*>(iov[0].iov_base), iov[0].iov_len});
  msghdr msg{};
  msg.msg_iov = iov.data();
  msg.msg_iovlen = count;
  while (true) {
    ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      write_wait_ = IoWait::kWrite;
      return size_t{0};
    }
    return Status::FromErrno(errno, "sendmsg");
  }
}

bool Stream::HasBufferedInput() {
  MutexLock lock(mu_);
  return ssl_ && SSL_has_pending(ssl_.get()) == 1;
}

void Stream::Shutdown() {
  ::shutdown(fd_.get(), SHUT_RDWR);
}

// ---- Blocking helpers -------------------------------------------------------------------

Status WaitFd(int fd, short events, Clock::time_point deadline) {
  while (true) {
    auto now = Clock::now();
    if (now >= deadline) return Status(Code::kTimeout, "timed out waiting for the peer");
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "poll");
    }
    if (n > 0) return Status::Ok();  // ready, or an error the next I/O call reports
  }
}

namespace {
short PollEvents(IoWait wait) {
  return wait == IoWait::kWrite ? POLLOUT : POLLIN;
}
}  // namespace

Status ReadExact(Stream& stream, std::span<std::byte> buf, Clock::time_point deadline) {
  while (!buf.empty()) {
    MF_ASSIGN_OR_RETURN(size_t n, stream.ReadSome(buf));
    if (n == 0) {
      MF_RETURN_IF_ERROR(WaitFd(stream.fd(), PollEvents(stream.read_wait()), deadline));
      continue;
    }
    buf = buf.subspan(n);
  }
  return Status::Ok();
}

Status WriteExact(Stream& stream, std::span<const std::byte> buf, Clock::time_point deadline) {
  while (!buf.empty()) {
    MF_ASSIGN_OR_RETURN(size_t n, stream.WriteSome(buf));
    if (n == 0) {
      MF_RETURN_IF_ERROR(WaitFd(stream.fd(), PollEvents(stream.write_wait()), deadline));
      continue;
    }
    buf = buf.subspan(n);
  }
  return Status::Ok();
}

Status WriteExactV(Stream& stream, std::span<std::span<const std::byte>> pieces, Clock::time_point deadline) {
  while (!pieces.empty()) {
    if (pieces.front().empty()) {
      pieces = pieces.subspan(1);
      continue;
    }
    MF_ASSIGN_OR_RETURN(size_t n, stream.WriteSomeV(pieces));
    if (n == 0) {
      MF_RETURN_IF_ERROR(WaitFd(stream.fd(), PollEvents(stream.write_wait()), deadline));
      continue;
    }
    while (n > 0) {
      const size_t used = std::min(n, pieces.front().size());
      pieces.front() = pieces.front().subspan(used);
      n -= used;
      if (pieces.front().empty()) pieces = pieces.subspan(1);
    }
  }
  return Status::Ok();
}

Status WriteExactV(Stream& stream, std::span<const std::byte> first, std::span<const std::byte> second,
                   Clock::time_point deadline) {
  std::array<std::span<const std::byte>, 2> pieces{first, second};
  return WriteExactV(stream, pieces, deadline);
}

Status HandshakeBlocking(Stream& stream, Clock::time_point deadline) {
  while (true) {
    MF_ASSIGN_OR_RETURN(IoWait wait, stream.HandshakeStep());
    if (wait == IoWait::kNone) return Status::Ok();
    MF_RETURN_IF_ERROR(WaitFd(stream.fd(), PollEvents(wait), deadline).WithContext("TLS handshake"));
  }
}

namespace {

struct AddrInfoDeleter {
  void operator()(addrinfo* ai) const { ::freeaddrinfo(ai); }
};
using UniqueAddrInfo = std::unique_ptr<addrinfo, AddrInfoDeleter>;

Result<UniqueAddrInfo> Resolve(const std::string& host, uint16_t port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* result = nullptr;
  std::string port_text = std::to_string(port);
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port_text.c_str(), &hints, &result);
  if (rc != 0) return NotFound(fmt::format("cannot resolve '{}': {}", host, ::gai_strerror(rc)));
  return UniqueAddrInfo(result);
}

std::string FormatAddress(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (sa->sa_family == AF_INET) {
    const auto* in = reinterpret_cast<const sockaddr_in*>(sa);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
    return fmt::format("{}:{}", host, ntohs(in->sin_port));
  }
  if (sa->sa_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(sa);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
    return fmt::format("[{}]:{}", host, ntohs(in6->sin6_port));
  }
  return "?";
}

}  // namespace

Result<UniqueFd> ConnectTcp(const std::string& host, uint16_t port, Clock::time_point deadline) {
  MF_ASSIGN_OR_RETURN(UniqueAddrInfo addrs, Resolve(host, port, false));
  Status last = Status(Code::kUnavailable, fmt::format("no address for {}", host));
  for (addrinfo* ai = addrs.get(); ai != nullptr; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd) {
      last = Status::FromErrno(errno, "socket");
      continue;
    }
    std::string where = FormatAddress(ai->ai_addr);
    if (::connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      if (errno != EINPROGRESS) {
        last = Status::FromErrno(errno, "connect to " + where);
        continue;
      }
      Status waited = WaitFd(fd.get(), POLLOUT, deadline);
      if (!waited.ok()) {
        last = Status(Code::kTimeout, "connect to " + where + ": timed out");
        continue;
      }
      int err = 0;
      socklen_t len = sizeof(err);
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        last = Status::FromErrno(err, "connect to " + where);
        continue;
      }
    }
    int one = 1;
    ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
  }
  return last;
}

Result<UniqueFd> ListenTcp(const std::string& host, uint16_t port, int backlog) {
  MF_ASSIGN_OR_RETURN(UniqueAddrInfo addrs, Resolve(host, port, true));
  Status last = Status(Code::kUnavailable, fmt::format("no address for '{}'", host));
  for (addrinfo* ai = addrs.get(); ai != nullptr; ai = ai->ai_next) {
    UniqueFd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (!fd) {
      last = Status::FromErrno(errno, "socket");
      continue;
    }
    int one = 1;
    ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    std::string where = FormatAddress(ai->ai_addr);
    if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
      last = Status::FromErrno(errno, "bind " + where);
      continue;
    }
    if (::listen(fd.get(), backlog) != 0) {
      last = Status::FromErrno(errno, "listen on " + where);
      continue;
    }
    return fd;
  }
  return last;
}

Result<uint16_t> LocalPort(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0)
    return Status::FromErrno(errno, "getsockname");
  if (ss.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&ss)->sin_port);
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&ss)->sin6_port);
  return Internal("socket is not TCP/IP");
}

bool IsLoopbackHost(const std::string& host) {
  if (host.empty()) return false;
  auto addrs = Resolve(host, 0, false);
  if (!addrs.ok()) return false;
  for (addrinfo* ai = addrs->get(); ai != nullptr; ai = ai->ai_next) {
    if (ai->ai_family == AF_INET) {
      uint32_t a = ntohl(reinterpret_cast<const sockaddr_in*>(ai->ai_addr)->sin_addr.s_addr);
      if ((a >> 24) != 127) return false;
    } else if (ai->ai_family == AF_INET6) {
      const in6_addr& a6 = reinterpret_cast<const sockaddr_in6*>(ai->ai_addr)->sin6_addr;
      if (!IN6_IS_ADDR_LOOPBACK(&a6)) return false;
    } else {
      return false;
    }
  }
  return true;
}

std::string PeerName(int fd) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  return FormatAddress(reinterpret_cast<const sockaddr*>(&ss));
}

}  // namespace mf::tcp
