#include "fabric/region.h"

#include <fcntl.h>
#include <linux/mman.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <charconv>
#include <cinttypes>
#include <cstdio>
#include <fstream>

namespace mf::fabric {
namespace {

constexpr char kFreeHugePages[] = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

Result<uint64_t> FreeHugePages() {
  std::ifstream in(kFreeHugePages);
  uint64_t free_pages = 0;
  if (!(in >> free_pages))
    return Unsupported("this system has no 2 MiB huge pages (" + std::string(kFreeHugePages) +
                       " unreadable)");
  return free_pages;
}

}  // namespace

std::string_view BackingName(BackingKind kind) {
  switch (kind) {
    case BackingKind::kAnonymous: return "anon";
    case BackingKind::kMemfd: return "memfd";
    case BackingKind::kHugetlb: return "hugetlb";
    case BackingKind::kFile: return "file";
  }
  return "?";
}

Result<uint64_t> ParseSize(std::string_view text) {
  std::string_view digits = text;
  size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  digits = text.substr(0, i);
  std::string suffix;
  for (char c : text.substr(i)) suffix += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (digits.empty()) {
    return InvalidArgument("bad size '" + std::string(text) +
                           "': expected a number with an optional K/M/G/T suffix, e.g. 64M");
  }
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (ec != std::errc() || end != digits.data() + digits.size()) {
    return InvalidArgument("size '" + std::string(text) + "' is too large");
  }
  unsigned shift = 0;
  if (suffix.empty() || suffix == "B") {
    shift = 0;
  } else if (suffix == "K" || suffix == "KB" || suffix == "KIB") {
    shift = 10;
  } else if (suffix == "M" || suffix == "MB" || suffix == "MIB") {
    shift = 20;
  } else if (suffix == "G" || suffix == "GB" || suffix == "GIB") {
    shift = 30;
  } else if (suffix == "T" || suffix == "TB" || suffix == "TIB") {
    shift = 40;
  } else {
    return InvalidArgument("bad size suffix in '" + std::string(text) +
                           "': use K, M, G or T (powers of 1024)");
  }
  if (shift != 0 && value > (UINT64_MAX >> shift))
    return InvalidArgument("size '" + std::string(text) + "' is too large");
  return value << shift;
}

std::string FormatSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  size_t unit = 0;
  uint64_t whole = bytes;
  while (whole >= 1024 && unit + 1 < std::size(kUnits)) {
    whole /= 1024;
    ++unit;
  }
  if (unit == 0) return std::to_string(bytes) + " B";
  uint64_t scale = 1ull << (10 * unit);
  if (bytes % scale == 0) return std::to_string(bytes / scale) + " " + kUnits[unit];
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f %s", static_cast<double>(bytes) / static_cast<double>(scale),
                kUnits[unit]);
  return buf;
}

Status ValidateRegionName(std::string_view name) {
  if (name.empty() || name.size() > kMaxRegionNameLength) {
    return InvalidArgument("region name '" + std::string(name) + "' must be 1 to " +
                           std::to_string(kMaxRegionNameLength) + " characters long");
  }
  if (name.front() == '.' || name.front() == '-') {
    return InvalidArgument("region name '" + std::string(name) + "' may not start with '.' or '-'");
  }
  for (char c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return InvalidArgument("region name '" + std::string(name) +
                             "' may only hold letters, digits, '.', '_' and '-'");
    }
  }
  return Status::Ok();
}

Result<RegionSpec> ParseRegionSpec(std::string_view text) {
  RegionSpec spec;
  size_t eq = text.find('=');
  if (eq == std::string_view::npos) {
    return InvalidArgument("bad region '" + std::string(text) +
                           "': expected NAME=SIZE[,backing=anon|memfd|hugetlb|file:PATH], e.g. cache=64M");
  }
  spec.name = std::string(text.substr(0, eq));
  MF_RETURN_IF_ERROR(ValidateRegionName(spec.name));
  std::string_view rest = text.substr(eq + 1);
  size_t comma = rest.find(',');
  MF_ASSIGN_OR_RETURN(spec.size, ParseSize(rest.substr(0, comma)));
  while (comma != std::string_view::npos) {
    rest = rest.substr(comma + 1);
    comma = rest.find(',');
    std::string_view option = rest.substr(0, comma);
    constexpr std::string_view kBacking = "backing=";
    if (option.substr(0, kBacking.size()) != kBacking) {
      return InvalidArgument("unknown region option '" + std::string(option) +
                             "'; the only option is backing=");
    }
    std::string_view backing = option.substr(kBacking.size());
    if (backing == "anon") {
      spec.backing = BackingKind::kAnonymous;
    } else if (backing == "memfd") {
      spec.backing = BackingKind::kMemfd;
    } else if (backing == "hugetlb") {
      spec.backing = BackingKind::kHugetlb;
    } else if (backing.substr(0, 5) == "file:" && backing.size() > 5) {
      spec.backing = BackingKind::kFile;
      // A path may contain commas: the rest of the text belongs to it.
      spec.path = std::string(rest.substr(kBacking.size() + 5));
      break;
    } else {
      return InvalidArgument("unknown backing '" + std::string(backing) +
                             "'; use anon, memfd, hugetlb or file:PATH");
    }
  }
  return spec;
}

Region::Region(RegionSpec spec, uint64_t generation, UniqueFd fd, MappedMemory memory)
    : spec_(std::move(spec)), generation_(generation), fd_(std::move(fd)), memory_(std::move(memory)) {}

Region::~Region() = default;

Result<std::unique_ptr<Region>> Region::Create(const RegionSpec& spec, uint64_t generation) {
  MF_RETURN_IF_ERROR(ValidateRegionName(spec.name));
  const std::string what = "region '" + spec.name + "'";
  if (spec.size == 0) return InvalidArgument(what + ": size must be greater than 0");
  if (spec.size % kPageSize != 0) {
    return InvalidArgument(what + ": size " + std::to_string(spec.size) + " is not a multiple of 4 KiB");
  }
  if (spec.size > SIZE_MAX / 2) return InvalidArgument(what + ": size is too large for this machine");
  const size_t size = spec.size;
  UniqueFd fd;
  void* addr = MAP_FAILED;
  switch (spec.backing) {
    case BackingKind::kAnonymous:
      addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (addr == MAP_FAILED) return Status::FromErrno(errno, what + ": mmap anonymous");
      break;
    case BackingKind::kMemfd:
      fd.Reset(::memfd_create(spec.name.c_str(), MFD_CLOEXEC));
      if (!fd) return Status::FromErrno(errno, what + ": memfd_create");
      if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
        return Status::FromErrno(errno, what + ": ftruncate memfd");
      addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
      if (addr == MAP_FAILED) return Status::FromErrno(errno, what + ": mmap memfd");
      break;
    case BackingKind::kHugetlb: {
      if (size % kHugePageSize != 0) {
        return InvalidArgument(what + ": hugetlb regions must be a multiple of 2 MiB");
      }
      MF_ASSIGN_OR_RETURN(uint64_t free_pages, FreeHugePages());
      const uint64_t needed = size / kHugePageSize;
      if (free_pages < needed) {
        return Status(Code::kUnsupported, what + ": needs " + std::to_string(needed) +
                                              " free 2 MiB huge pages but the system has " +
                                              std::to_string(free_pages) + "; reserve them with: echo " +
                                              std::to_string(needed) + " > /proc/sys/vm/nr_hugepages");
      }
      addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB, -1, 0);
      if (addr == MAP_FAILED) return Status::FromErrno(errno, what + ": mmap hugetlb");
      break;
    }
    case BackingKind::kFile: {
      if (spec.path.empty()) return InvalidArgument(what + ": file backing needs a path (backing=file:PATH)");
      fd.Reset(::open(spec.path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
      if (!fd) return Status::FromErrno(errno, what + ": open " + spec.path);
      struct stat st {};
      if (::fstat(fd.get(), &st) != 0) return Status::FromErrno(errno, what + ": fstat " + spec.path);
      if (!S_ISREG(st.st_mode)) return InvalidArgument(what + ": " + spec.path + " is not a regular file");
      const auto existing = static_cast<uint64_t>(st.st_size);
      if (existing == 0) {
        if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
          return Status::FromErrno(errno, what + ": ftruncate " + spec.path);
        }
      } else if (existing != spec.size) {
        return InvalidArgument(what + ": " + spec.path + " holds " + std::to_string(existing) +
                               " bytes but the region is " + std::to_string(spec.size) +
                               "; give the file's size or another path");
      }
      addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
      if (addr == MAP_FAILED) return Status::FromErrno(errno, what + ": mmap " + spec.path);
      break;
    }
  }
  return std::unique_ptr<Region>(new Region(spec, generation, std::move(fd), MappedMemory(addr, size)));
}

Status Region::Flush() const {
  if (spec_.backing != BackingKind::kFile) return Status::Ok();
  if (::msync(memory_.data(), memory_.size(), MS_SYNC) != 0) {
    return Status::FromErrno(errno, "msync region '" + spec_.name + "'");
  }
  return Status::Ok();
}

}  // namespace mf::fabric
