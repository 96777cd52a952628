// OpenTable — the server's live OPENs, shared by every data plane of one server.
//
// A client OPENs a region on the control connection (transports/tcp) and gets a random
// token; data connections (TCP ATTACH, RDMA rdma_cm connect) present the token to be
// bound to that open. An open ends when its last data connection goes, on CLOSE, when
// its token is never used within the attach timeout, or when the server stops. Ending an
// open first runs its revoke hooks (the RDMA data plane deregisters the open's memory
// registration there, so no rkey outlives the open), then releases the write lease.
//
// Thread-safety: OpenTable is thread-safe. An OpenEntry's lease state (writer, writable)
// is guarded by its lease_mu: writers of the region hold it shared while they copy; ending
// the open takes it exclusively.
#pragma once

#include <spdlog/spdlog.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <shared_mutex>
#include <string_view>
#include <utility>
#include <vector>

#include "fabric/server.h"
#include "fabric/thread_annotations.h"

namespace mf::transports {

inline constexpr size_t kOpenTokenSize = 32;
using OpenToken = std::array<uint8_t, kOpenTokenSize>;

// One OPEN: the region's memory (kept alive by `reader`), its write lease (`writer`, for
// writable opens) and what the data planes hang on it.
struct OpenEntry {
  OpenToken token{};
  fabric::RegionHandle reader;
  std::byte* data = nullptr;
  uint64_t size = 0;
  uint64_t generation = 0;
  std::chrono::steady_clock::time_point created;
  // Writes hold lease_mu shared while they copy; ending the open takes it exclusively to
  // drop the lease, so no write lands after the lease went to someone else. (std::
  // shared_mutex is not an annotated capability; these two members are only touched
  // under it.)
  std::shared_mutex lease_mu;
  fabric::RegionHandle writer;
  bool writable = false;

  // Registers fn to run once when the open ends or its region is deleted, before the
  // lease is released. Runs fn at once when that already happened.
  void AddRevokeHook(std::function<void()> fn) MF_EXCLUDES(hooks_mu) {
    {
      MutexLock lock(hooks_mu);
      if (!revoked) {
        revoke_hooks.push_back(std::move(fn));
        return;
      }
    }
    fn();
  }
  // Runs (and forgets) the revoke hooks; later hooks run at once.
  void Revoke() MF_EXCLUDES(hooks_mu) {
    std::vector<std::function<void()>> hooks;
    {
      MutexLock lock(hooks_mu);
      revoked = true;
      hooks.swap(revoke_hooks);
    }
    for (auto& fn : hooks) fn();
  }
  bool is_revoked() MF_EXCLUDES(hooks_mu) {
    MutexLock lock(hooks_mu);
    return revoked;
  }

  Mutex hooks_mu;
  std::vector<std::function<void()>> revoke_hooks MF_GUARDED_BY(hooks_mu);
  bool revoked MF_GUARDED_BY(hooks_mu) = false;
};

class OpenTable {
 public:
  void Add(std::shared_ptr<OpenEntry> entry) MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    auto token = entry->token;
    entries_.emplace(token, Slot{std::move(entry), 0});
  }
  // The open for token, counted as attached; null when unknown.
  std::shared_ptr<OpenEntry> Attach(const OpenToken& token) MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    auto it = entries_.find(token);
    if (it == entries_.end()) return nullptr;
    ++it->second.attached;
    return it->second.entry;
  }
  // The open for token without counting an attachment (RDMA queue pairs: the open's
  // lifetime follows its TCP data connection); null when unknown.
  std::shared_ptr<OpenEntry> Find(const OpenToken& token) MF_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    auto it = entries_.find(token);
    return it == entries_.end() ? nullptr : it->second.entry;
  }
  // A data connection went away; the open ends with its last one.
  void Detach(const std::shared_ptr<OpenEntry>& entry) MF_EXCLUDES(mu_) {
    std::shared_ptr<OpenEntry> dropped;
    {
      MutexLock lock(mu_);
      auto it = entries_.find(entry->token);
      if (it == entries_.end() || it->second.entry != entry) return;
      if (--it->second.attached > 0) return;
      dropped = std::move(it->second.entry);
      entries_.erase(it);
    }
    End(*dropped);
  }
  // CLOSE: ends the open at once and forgets the token.
  void Close(const std::shared_ptr<OpenEntry>& entry) MF_EXCLUDES(mu_) {
    {
      MutexLock lock(mu_);
      auto it = entries_.find(entry->token);
      if (it != entries_.end() && it->second.entry == entry) entries_.erase(it);
    }
    End(*entry);
  }
  // The region `name` was deleted: revokes the data-plane access of its opens (they keep
  // their tokens; TCP readers go on reading the memory they hold).
  void RevokeRegion(std::string_view name) MF_EXCLUDES(mu_) {
    std::vector<std::shared_ptr<OpenEntry>> hit;
    {
      MutexLock lock(mu_);
      for (auto& [token, slot] : entries_) {
        if (slot.entry->reader.region() != nullptr && slot.entry->reader.region()->name() == name) {
          hit.push_back(slot.entry);
        }
      }
    }
    for (auto& e : hit) e->Revoke();
  }
  // Drops opens whose token was never attached within `timeout`.
  void Sweep(std::chrono::steady_clock::time_point now, std::chrono::milliseconds timeout) MF_EXCLUDES(mu_) {
    std::vector<std::shared_ptr<OpenEntry>> dropped;
    {
      MutexLock lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (it->second.attached == 0 && now - it->second.entry->created > timeout) {
          dropped.push_back(std::move(it->second.entry));
          it = entries_.erase(it);
        } else {
          ++it;
        }
      }
    }
    for (auto& e : dropped) {
      spdlog::info("server: releasing open of '{}': no data connection attached", e->reader.region()->name());
      End(*e);
    }
  }
  void Clear() MF_EXCLUDES(mu_) {
    std::map<OpenToken, Slot> entries;
    {
      MutexLock lock(mu_);
      entries.swap(entries_);
    }
    for (auto& [token, slot] : entries) End(*slot.entry);
  }

  // Revokes data-plane access, then releases the lease.
  static void End(OpenEntry& entry) {
    entry.Revoke();
    std::unique_lock lock(entry.lease_mu);
    entry.writable = false;
    entry.writer = fabric::RegionHandle();
  }

 private:
  struct Slot {
    std::shared_ptr<OpenEntry> entry;
    int attached = 0;
  };
  Mutex mu_;
  std::map<OpenToken, Slot> entries_ MF_GUARDED_BY(mu_);
};

}  // namespace mf::transports
