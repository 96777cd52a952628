// fabric::Region — server-side memory exported to clients, and its specification.
//
// A Region is page-aligned, zero-filled on creation and backed by anonymous memory, a
// memfd, hugetlb pages (2 MiB; fails with a clear kUnsupported error when the system has
// none reserved) or a file mapped shared (data survives a server restart; an existing
// file of the right size is reopened with its contents).
//
// Thread-safety: the memory may be read and written from any thread; the Region object
// itself is immutable after creation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "fabric/os.h"
#include "fabric/remote.h"
#include "fabric/status.h"

namespace mf::fabric {

constexpr size_t kMaxRegionNameLength = 64;
constexpr uint64_t kHugePageSize = 2ull << 20;

struct RegionSpec {
  std::string name;
  uint64_t size = 0;
  BackingKind backing = BackingKind::kAnonymous;
  std::string path;  // kFile only
};

// Parses "64M", "4096", "1G", "2k"... (K/M/G/T, powers of 1024, case-insensitive).
Result<uint64_t> ParseSize(std::string_view text);
// Formats bytes as "64 MiB", "4 KiB", "1.5 GiB".
std::string FormatSize(uint64_t bytes);
// Names are 1..64 characters of [A-Za-z0-9._-], not starting with '.' or '-'.
Status ValidateRegionName(std::string_view name);
// Parses "NAME=SIZE[,backing=anon|memfd|hugetlb|file:PATH]".
Result<RegionSpec> ParseRegionSpec(std::string_view text);

class Region final {
 public:
  // Creates memory for spec (validated). For kFile, an existing file of exactly
  // spec.size bytes keeps its contents; one of another size is an error.
  static Result<std::unique_ptr<Region>> Create(const RegionSpec& spec, uint64_t generation);
  ~Region();
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  const RegionSpec& spec() const { return spec_; }
  const std::string& name() const { return spec_.name; }
  uint64_t size() const { return spec_.size; }
  uint64_t generation() const { return generation_; }
  std::byte* data() const { return memory_.data(); }
  // Makes the region's contents durable (msync for kFile; nothing to do otherwise).
  Status Flush() const;

 private:
  Region(RegionSpec spec, uint64_t generation, UniqueFd fd, MappedMemory memory);
  RegionSpec spec_;
  uint64_t generation_;
  UniqueFd fd_;          // memfd or file; invalid for anonymous/hugetlb
  MappedMemory memory_;  // declared after fd_: unmapped before the fd closes
};

}  // namespace mf::fabric
