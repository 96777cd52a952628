// fabric::Server — the transport-independent heart of a memfabric server: the region
// store (create, find, list, stat, delete), write leases (one writer per region, many
// readers) and the authentication policy. Transports (transports/tcp, transports/rdma)
// own the sockets and call into it.
//
// Regions are shared: deleting a region removes it from the store at once, while handles
// already open keep its memory alive until they are released; a region re-created under
// the same name gets a new generation.
//
// Thread-safety: every method is thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fabric/auth.h"
#include "fabric/region.h"
#include "fabric/remote.h"
#include "fabric/status.h"
#include "fabric/thread_annotations.h"

namespace mf::fabric {

class Server;

// An open region: keeps the memory alive; a writable handle holds the write lease and
// releases it when destroyed. Move-only.
class RegionHandle final {
 public:
  RegionHandle() = default;
  ~RegionHandle();
  RegionHandle(RegionHandle&& other) noexcept;
  RegionHandle& operator=(RegionHandle&& other) noexcept;
  RegionHandle(const RegionHandle&) = delete;
  RegionHandle& operator=(const RegionHandle&) = delete;

  Region* region() const { return region_.get(); }
  bool writable() const { return writable_; }
  bool valid() const { return region_ != nullptr; }

 private:
  friend class Server;
  RegionHandle(Server* server, std::shared_ptr<Region> region, bool writable)
      : server_(server), region_(std::move(region)), writable_(writable) {}
  void Release();

  Server* server_ = nullptr;
  std::shared_ptr<Region> region_;
  bool writable_ = false;
};

struct ServerOptions {
  // Empty only when insecure is set: then clients are not asked to authenticate.
  Secret secret;
  bool insecure = false;
  // Where file-backed regions that clients create live. Empty: clients may not create
  // file-backed regions at all (the operator's own --region flags are not limited).
  std::string store_dir;
};

class Server {
 public:
  explicit Server(ServerOptions options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  const ServerOptions& options() const { return options_; }

  // Creates and adds a region; kAlreadyExists if the name is taken. For the operator.
  Result<RegionInfo> Create(const RegionSpec& spec) MF_EXCLUDES(mu_);
  // Create on behalf of a remote client: a file-backed region must name a relative path
  // without ".." and is created inside options().store_dir; kPermissionDenied when the
  // server has no store or the path would leave it.
  Result<RegionInfo> CreateForClient(const RegionSpec& spec) MF_EXCLUDES(mu_);
  Result<RegionInfo> Stat(std::string_view name) const MF_EXCLUDES(mu_);
  std::vector<RegionInfo> List() const MF_EXCLUDES(mu_);
  // kNotFound if absent; kBusy while a writer holds it.
  Status Delete(std::string_view name) MF_EXCLUDES(mu_);
  // kNotFound if absent; kBusy when writable is asked and another handle holds the lease.
  Result<RegionHandle> Open(std::string_view name, bool writable) MF_EXCLUDES(mu_);
  // Flushes every region (e.g. on shutdown).
  Status FlushAll() const MF_EXCLUDES(mu_);

 private:
  friend class RegionHandle;
  void ReleaseLease(const Region* region) MF_EXCLUDES(mu_);
  RegionInfo InfoLocked(const Region& region) const MF_REQUIRES(mu_);

  const ServerOptions options_;
  mutable Mutex mu_;
  std::map<std::string, std::shared_ptr<Region>, std::less<>> regions_ MF_GUARDED_BY(mu_);
  std::map<const Region*, bool> writers_ MF_GUARDED_BY(mu_);  // regions whose lease is held
  uint64_t next_generation_ MF_GUARDED_BY(mu_) = 1;
};

}  // namespace mf::fabric
