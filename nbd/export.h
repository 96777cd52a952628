// nbd::Export — an NBD protocol server (fixed newstyle, see docs/nbd.md) for one or more
// named exports, each backed by a fabric::Remote. Any NBD client can use it: nbdinfo,
// nbdcopy, qemu, fio's nbd engine, and the kernel's NBD driver through ServeConnection.
//
// Negotiation: EXPORT_NAME, GO, INFO (NBD_INFO_EXPORT, _NAME, _DESCRIPTION, _BLOCK_SIZE),
// LIST, ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT (base:allocation only); every other
// option gets NBD_REP_ERR_UNSUP. Commands: READ, WRITE, FLUSH (Remote::Flush), TRIM
// (validated, then answered without any I/O: it discards nothing, which the spec allows),
// WRITE_ZEROES (writes zeroes; FAST_ZERO fails with ENOTSUP because zeroing is no faster
// than writing), CACHE (accepted, no-op), BLOCK_STATUS (all allocated data), DISC; FUA
// flushes before the reply. An export whose Remote is not writable is READ_ONLY and
// fails writes with EPERM. CAN_MULTI_CONN is advertised: every connection to an export
// shares its one Remote, so a flush covers the completed writes of all of them.
//
// Threading: each connection has a reader thread (handshake, then parses requests and
// submits them to the Remote asynchronously) and a writer thread (sends the replies of all
// completed requests in one batch, out of request order, after one flush if any of them
// needs it). Requests use `queue_depth` preallocated slots, each with a Buffer from the
// Remote; requests larger than a slot's buffer take turns on one lazily allocated buffer,
// grown in powers of two up to max_block_size. Listeners run one accept thread each.
//
// Thread-safety: all public methods may be called from any thread. Every Remote must stay
// valid until Stop() returned (the destructor stops).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "fabric/os.h"
#include "fabric/remote.h"
#include "fabric/status.h"
#include "fabric/thread_annotations.h"
#include "nbd/write_fence.h"

namespace mf::nbd {

inline constexpr uint32_t kDefaultMaxBlockSize = 32u << 20;  // what interoperable clients use
inline constexpr uint32_t kMaxMaxBlockSize = 1u << 30;       // the most ExportOptions may set
inline constexpr uint32_t kPreferredBlockSize = 4096;
inline constexpr size_t kDefaultQueueDepth = 16;
inline constexpr size_t kDefaultSlotBufferSize = 1u << 20;
inline constexpr std::chrono::microseconds kDefaultRecvSpin{50};
static_assert(kDefaultSlotBufferSize <= kDefaultMaxBlockSize && kDefaultSlotBufferSize % kPageSize == 0);

struct ExportOptions {
  // Largest READ/WRITE/CACHE accepted, advertised in NBD_INFO_BLOCK_SIZE. Requests are split
  // at the Remote's max_transfer(), so this is independent of the transport.
  uint32_t max_block_size = kDefaultMaxBlockSize;
  size_t queue_depth = kDefaultQueueDepth;           // requests in flight per connection
  size_t slot_buffer_size = kDefaultSlotBufferSize;  // bytes of each slot's Buffer
  int max_connections = 64;                          // further connections are closed at once
  size_t max_options = 128;                          // per handshake; then a hard disconnect
  // Deadline for the whole handshake, from the greeting until the client enters
  // transmission or aborts, however slowly it sends; then a hard disconnect. 0: none.
  std::chrono::milliseconds handshake_timeout{10000};
  // A client that takes no reply bytes for this long is disconnected.
  std::chrono::milliseconds send_timeout{30000};
  // Before a connection's reader sleeps in recv it polls the socket this long, so that a
  // client sending its next request right after a reply (QD1) costs no thread wake-up: on
  // virtual machines the wake-up is most of a 4 KiB request's latency. 0: always sleep.
  // Ignored on a machine with one CPU.
  std::chrono::microseconds recv_spin = kDefaultRecvSpin;
};

// One named export.
struct ExportSpec {
  std::string name;  // "" is allowed; the first export added is also the default ("")
  std::string description;
  fabric::Remote* remote = nullptr;  // not owned
  bool read_only = false;            // also read-only when !remote->writable()
};

// What a client learns about an export when it enters transmission without structured
// replies (as the kernel's NBD driver does).
struct ExportInfo {
  std::string name;
  uint64_t size = 0;
  uint16_t flags = 0;  // NBD transmission flags (kTx*)
  bool read_only = false;
};

struct ExportStats {
  uint64_t connections_accepted = 0;
  uint64_t connections_active = 0;
  uint64_t requests = 0;
  uint64_t request_errors = 0;   // replies with a nonzero error
  uint64_t protocol_errors = 0;  // hard disconnects for malformed input
};

class Export {
 public:
  explicit Export(ExportOptions options = {});
  ~Export();  // Stop()
  Export(const Export&) = delete;
  Export& operator=(const Export&) = delete;

  // Adds an export. kInvalidArgument for a null Remote, a name above 4096 bytes or with NUL,
  // or options that break the spec's block size rules; kAlreadyExists for a duplicate name.
  // Exports added while serving are visible to later handshakes.
  Status Add(ExportSpec spec);

  // Listens on a unix socket at `path` (which must not exist) and serves every client on
  // its own threads until Stop(). The socket file is removed by Stop().
  Status ListenUnix(const std::string& path);
  // Listens on host:port (0 = ephemeral) and returns the bound port.
  Result<uint16_t> ListenTcp(const std::string& host, uint16_t port);
  // Serves an already-connected stream socket (e.g. one end of a socketpair handed to the
  // kernel's NBD driver); takes ownership of fd. kResourceExhausted when max_connections
  // are being served (fd is closed), kAborted after Stop().
  Status ServeConnection(UniqueFd fd);
  // Serves a connection that is already past the handshake, as the kernel's NBD driver
  // uses one: requests for export `name` ("" = the default export) come at once and get
  // simple replies with the flags of Info(name). Takes ownership of fd. kNotFound for an
  // unknown export (fd is closed); otherwise as ServeConnection. The kernel gives up on a
  // connection by shutting it down, and re-sends what was unanswered on another: on a unix
  // socket (a socketpair) that is seen, and a write read from it afterwards is failed
  // without I/O (a TCP peer's shutdown is not told apart from a FIN).
  Status ServeTransmission(UniqueFd fd, std::string_view name);
  // The size and transmission flags of export `name` ("" = the default). kNotFound if none.
  Result<ExportInfo> Info(std::string_view name) const;

  // Stops listening and stops reading requests; every request in flight completes and is
  // answered (a client that takes no replies is dropped after send_timeout), then every
  // connection is closed and every thread joined. A client still in the handshake gets
  // NBD_REP_ERR_SHUTDOWN for options already sent (EXPORT_NAME: closed without a reply).
  // Idempotent.
  void Stop() MF_EXCLUDES(stop_mu_, mu_);

  ExportStats stats() const;

  class Connection;  // one client; defined in export.cc

 private:
  friend class Connection;
  struct Listener {
    UniqueFd fd;
    std::string unix_path;
    std::thread thread;
  };
  struct Lookup {
    ExportSpec spec;
    bool found = false;
  };

  Status StartListener(UniqueFd fd, std::string unix_path) MF_EXCLUDES(mu_);
  // ServeConnection and ServeTransmission: starts a Connection (with the handshake unless
  // `entered` names the export it serves).
  Status StartConnection(UniqueFd fd, const ExportSpec* entered) MF_EXCLUDES(mu_);
  void AcceptLoop(int listen_fd);
  void ReapFinished() MF_EXCLUDES(mu_);
  // The export named `name` ("" = the default export).
  Lookup Find(std::string_view name) const MF_EXCLUDES(mu_);
  std::vector<ExportSpec> List() const MF_EXCLUDES(mu_);

  const ExportOptions options_;
  const std::chrono::microseconds recv_spin_;  // options_.recv_spin, or 0 on one CPU
  std::atomic<bool> stopping_{false};
  WriteFence write_fence_;  // every connection's writes, so that a re-sent one waits for its stale copy
  mutable Mutex mu_;
  std::vector<ExportSpec> exports_ MF_GUARDED_BY(mu_);
  std::list<std::unique_ptr<Listener>> listeners_ MF_GUARDED_BY(mu_);
  std::list<std::unique_ptr<Connection>> connections_ MF_GUARDED_BY(mu_);
  int reaping_ MF_GUARDED_BY(mu_) = 0;  // ReapFinished calls freeing connections outside mu_
  std::condition_variable_any reaped_cv_;
  Mutex stop_mu_;  // one Stop at a time
  std::atomic<uint64_t> next_connection_id_{1};
  // Counters (ExportStats).
  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> active_{0};
  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> request_errors_{0};
  std::atomic<uint64_t> protocol_errors_{0};
};

}  // namespace mf::nbd
