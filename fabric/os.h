// Move-only owners of OS objects: UniqueFd (a file descriptor) and MappedMemory (an
// mmap'ed range). Destruction closes/unmaps. Plus small helpers that map errno through
// Status::FromErrno.
//
// Thread-safety: an owner is confined to one thread at a time; the fd or memory it owns
// may be used from many threads as the OS allows.
#pragma once

#include <sched.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "fabric/status.h"

namespace mf {

constexpr size_t kPageSize = 4096;

class UniqueFd final {
 public:
  UniqueFd() = default;
  // Takes ownership of fd (may be -1).
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.Release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) Reset(other.Release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }
  int Release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void Reset(int fd = -1);

 private:
  int fd_ = -1;
};

class MappedMemory final {
 public:
  MappedMemory() = default;
  // Takes ownership of [addr, addr + size), which must have come from mmap.
  MappedMemory(void* addr, size_t size) : addr_(static_cast<std::byte*>(addr)), size_(size) {}
  ~MappedMemory() { Reset(); }
  MappedMemory(MappedMemory&& other) noexcept;
  MappedMemory& operator=(MappedMemory&& other) noexcept;
  MappedMemory(const MappedMemory&) = delete;
  MappedMemory& operator=(const MappedMemory&) = delete;

  // Anonymous private read/write memory, zero-filled, page-aligned. size is rounded up
  // to whole pages.
  static Result<MappedMemory> Anonymous(size_t size);

  std::byte* data() const { return addr_; }
  size_t size() const { return size_; }
  std::span<std::byte> span() const { return {addr_, size_}; }
  bool valid() const { return addr_ != nullptr; }
  void Reset();
  // Gives up ownership without unmapping; returns the address.
  std::byte* Release() {
    size_ = 0;
    return std::exchange(addr_, nullptr);
  }

 private:
  std::byte* addr_ = nullptr;
  size_t size_ = 0;
};

// Writes/reads exactly buf.size() bytes, retrying on EINTR and short transfers.
// Reading EOF before the end returns kUnavailable ("peer closed").
Status WriteAll(int fd, std::span<const std::byte> buf);
Status ReadAll(int fd, std::span<std::byte> buf);

// Runs argv[0] (looked up in PATH) with argv, stdin from /dev/null and, with `quiet`, its
// stdout too (stderr stays this process's); waits for it. OK when it exits 0; kNotFound when it cannot be
// run; kIoError naming the program and its exit status (or signal) otherwise.
Status RunProgram(const std::vector<std::string>& argv, bool quiet = false);

// Rounds up to a multiple of `align` (a power of two).
constexpr uint64_t AlignUp(uint64_t v, uint64_t align) {
  return (v + align - 1) & ~(align - 1);
}
// Whether a thread waiting for another may spin instead of sleeping: with one CPU the
// spin only delays the thread it waits for.
inline bool CanSpin() {
  return std::thread::hardware_concurrency() > 1;
}
// Called by a spinning thread when a poll found nothing: a thread waiting for this CPU runs
// first (on a host with few CPUs, the client whose next request it spins for, or that
// client's application), else this returns at once.
inline void GiveWayWhileSpinning() {
  sched_yield();
}

constexpr bool IsPowerOfTwo(uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}

}  // namespace mf
