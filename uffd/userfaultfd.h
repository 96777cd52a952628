// uffd::Userfaultfd — a move-only owner of one userfaultfd, with the ioctls memfabric
// uses, each returning Status. Opened with the syscall (falling back to /dev/userfaultfd),
// non-blocking and close-on-exec; Open() asks for the wanted features and keeps the
// subset the running kernel grants (see features()).
//
// Thread-safety: ioctls may be issued from any thread concurrently (the kernel
// serializes what it must); the owner object is confined to one thread for move/close.
#pragma once

#include <linux/userfaultfd.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "fabric/os.h"
#include "fabric/status.h"
#include "uffd/kernel_abi.h"

namespace mf::uffd {

class Userfaultfd final {
 public:
  // Opens a userfaultfd and negotiates `wanted` features; optional ones the kernel lacks
  // are dropped, so check features(). kUnsupported when userfaultfd is unavailable.
  static Result<Userfaultfd> Open(uint64_t wanted);
  // Features the kernel offers (probed on a throwaway fd).
  static Result<uint64_t> AvailableFeatures();

  int fd() const { return fd_.get(); }
  uint64_t features() const { return features_; }
  bool has(uint64_t feature) const { return (features_ & feature) == feature; }

  // UFFDIO_REGISTER of [addr, addr+len) with modes (UFFDIO_REGISTER_MODE_*).
  Status Register(void* addr, size_t len, uint64_t modes);
  Status Unregister(void* addr, size_t len);
  // UFFDIO_COPY: installs len bytes from src at dst (page-aligned), write-protected when
  // `write_protect`, waking waiters. Pages already present are skipped (EEXIST handled
  // page by page), so a partly populated range still ends fully populated. While an event
  // (remove, unmap, remap) waits unread in the userfaultfd the kernel refuses with EAGAIN:
  // retried a bounded number of times, then returned (err() == EAGAIN), so that a caller
  // on the thread that reads the events does not spin forever; the caller wakes the
  // waiters to fault again. A range the program split into several VMAs is filled page by
  // page. Other errors keep their errno (ENOENT: part of the range is no longer
  // registered, and when that was found page by page the rest was filled; ESRCH: the
  // process is exiting).
  Status Copy(void* dst, const void* src, size_t len, bool write_protect);
  // UFFDIO_WRITEPROTECT: protect (true) or unprotect-and-wake (false), page by page over a
  // range split into several VMAs where the kernel needs that. EAGAIN (an event waits
  // unread) is returned at once, not retried; ENOENT when part of the range is not
  // registered (the rest is done).
  Status WriteProtect(void* addr, size_t len, bool protect);
  Status Wake(void* addr, size_t len);
  // UFFDIO_POISON (kernel >= 6.6): later accesses to the pages not present get SIGBUS;
  // present pages are left as they are (as in Copy); waiters are woken. EAGAIN as in Copy.
  Status Poison(void* addr, size_t len);
  // UFFDIO_ZEROPAGE: maps the zero page at the pages of [addr, addr+len) not present
  // (present ones are left as they are, as in Copy) and wakes waiters. Only on a range
  // still registered with this userfaultfd (ENOENT otherwise); EAGAIN as in Copy.
  Status ZeroPage(void* addr, size_t len);
  // Reads up to out.size() messages; returns how many (0 when none are pending).
  Result<size_t> ReadMessages(std::span<uffd_msg> out);

 private:
  Userfaultfd(UniqueFd fd, uint64_t features) : fd_(std::move(fd)), features_(features) {}
  template <typename Attempt>
  Status FillSkippingPresent(void* addr, size_t len, const char* what, Attempt attempt);
  UniqueFd fd_;
  uint64_t features_ = 0;
};

}  // namespace mf::uffd
