#include "fabric/server.h"

#include <spdlog/spdlog.h>

#include <filesystem>

namespace mf::fabric {

RegionHandle::~RegionHandle() {
  Release();
}

RegionHandle::RegionHandle(RegionHandle&& other) noexcept
    : server_(std::exchange(other.server_, nullptr)),
      region_(std::move(other.region_)),
      writable_(std::exchange(other.writable_, false)) {}

RegionHandle& RegionHandle::operator=(RegionHandle&& other) noexcept {
  if (this != &other) {
    Release();
    server_ = std::exchange(other.server_, nullptr);
    region_ = std::move(other.region_);
    writable_ = std::exchange(other.writable_, false);
  }
  return *this;
}

void RegionHandle::Release() {
  if (writable_ && server_ != nullptr && region_ != nullptr) server_->ReleaseLease(region_.get());
  server_ = nullptr;
  region_.reset();
  writable_ = false;
}

Server::Server(ServerOptions options) : options_(std::move(options)) {}

Server::~Server() = default;

RegionInfo Server::InfoLocked(const Region& region) const {
  RegionInfo info;
  info.name = region.name();
  info.size = region.size();
  info.generation = region.generation();
  info.backing = region.spec().backing;
  info.has_writer = writers_.count(&region) != 0;
  return info;
}

Result<RegionInfo> Server::Create(const RegionSpec& spec) {
  MutexLock lock(mu_);
  if (regions_.count(spec.name) != 0) {
    return Status(Code::kAlreadyExists, "region '" + spec.name + "' already exists");
  }
  MF_ASSIGN_OR_RETURN(std::unique_ptr<Region> region, Region::Create(spec, next_generation_));
  ++next_generation_;
  std::shared_ptr<Region> shared(std::move(region));
  RegionInfo info = InfoLocked(*shared);
  regions_.emplace(spec.name, std::move(shared));
  spdlog::info("region '{}' created: {} {} (generation {})", spec.name, FormatSize(spec.size),
               BackingName(spec.backing), info.generation);
  return info;
}

Result<RegionInfo> Server::CreateForClient(const RegionSpec& spec) {
  if (spec.backing != BackingKind::kFile) return Create(spec);
  if (options_.store_dir.empty()) {
    return Status(Code::kPermissionDenied,
                  "this server does not let clients create file-backed regions; start it with --store DIR");
  }
  const std::filesystem::path relative(spec.path);
  bool escapes = relative.empty() || relative.is_absolute();
  for (const auto& part : relative) escapes = escapes || part == "..";
  if (escapes) {
    return Status(Code::kPermissionDenied,
                  "file path '" + spec.path + "' must be relative to the server's store, without '..'");
  }
  RegionSpec inside = spec;
  inside.path = (std::filesystem::path(options_.store_dir) / relative).string();
  return Create(inside);
}

Result<RegionInfo> Server::Stat(std::string_view name) const {
  MutexLock lock(mu_);
  auto it = regions_.find(name);
  if (it == regions_.end()) return NotFound("no region named '" + std::string(name) + "'");
  return InfoLocked(*it->second);
}

std::vector<RegionInfo> Server::List() const {
  MutexLock lock(mu_);
  std::vector<RegionInfo> out;
  out.reserve(regions_.size());
  for (const auto& [name, region] : regions_) out.push_back(InfoLocked(*region));
  return out;
}

Status Server::Delete(std::string_view name) {
  std::shared_ptr<Region> doomed;
  {
    MutexLock lock(mu_);
    auto it = regions_.find(name);
    if (it == regions_.end()) return NotFound("no region named '" + std::string(name) + "'");
    if (writers_.count(it->second.get()) != 0) {
      return Status(Code::kBusy,
                    "region '" + std::string(name) + "' is open for writing; close the writer first");
    }
    doomed = std::move(it->second);
    regions_.erase(it);
  }
  spdlog::info("region '{}' deleted", name);
  return Status::Ok();  // `doomed` unmaps here unless open handles still hold it
}

Result<RegionHandle> Server::Open(std::string_view name, bool writable) {
  MutexLock lock(mu_);
  auto it = regions_.find(name);
  if (it == regions_.end()) return NotFound("no region named '" + std::string(name) + "'");
  if (writable) {
    if (writers_.count(it->second.get()) != 0) {
      return Status(Code::kBusy,
                    "region '" + std::string(name) +
                        "' already has a writer (one writer per region); open it read-only or wait");
    }
    writers_.emplace(it->second.get(), true);
  }
  return RegionHandle(this, it->second, writable);
}

void Server::ReleaseLease(const Region* region) {
  MutexLock lock(mu_);
  writers_.erase(region);
}

Status Server::FlushAll() const {
  std::vector<std::shared_ptr<Region>> all;
  {
    MutexLock lock(mu_);
    for (const auto& [name, region] : regions_) all.push_back(region);
  }
  Status first;
  for (const auto& region : all) {
    Status s = region->Flush();
    if (!s.ok() && first.ok()) first = s;
  }
  return first;
}

}  // namespace mf::fabric
