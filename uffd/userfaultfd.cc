#include "uffd/userfaultfd.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace mf::uffd {
namespace {

constexpr char kDevice[] = "/dev/userfaultfd";
constexpr unsigned long kIocNew = _IO(0xAA, 0x00);  // USERFAULTFD_IOC_NEW
// EAGAIN from a fill means an event (remove, unmap, remap) waits in the userfaultfd to be
// read. A fill on another thread succeeds once the fault thread has read it; one on the
// fault thread itself never would, so the retries are bounded (each gives the CPU away).
constexpr int kMaxFillRetriesOnEagain = 64;

Result<UniqueFd> OpenRaw() {
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  if (fd >= 0) return UniqueFd(fd);
  int syscall_errno = errno;
  UniqueFd dev(::open(kDevice, O_RDWR | O_CLOEXEC));
  if (dev) {
    fd = ::ioctl(dev.get(), kIocNew, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) return UniqueFd(fd);
  }
  return Status(Code::kUnsupported,
                std::string("userfaultfd is not available (syscall: ") + std::strerror(syscall_errno) +
                    "); as non-root set vm.unprivileged_userfaultfd=1 or grant access to " + kDevice,
                syscall_errno);
}

Status Ioctl(int fd, unsigned long request, void* arg, const char* what) {
  while (::ioctl(fd, request, arg) != 0) {
    if (errno == EINTR) continue;
    return Status::FromErrno(errno, what);
  }
  return Status::Ok();
}

}  // namespace

Result<uint64_t> Userfaultfd::AvailableFeatures() {
  MF_ASSIGN_OR_RETURN(UniqueFd fd, OpenRaw());
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  MF_RETURN_IF_ERROR(Ioctl(fd.get(), UFFDIO_API, &api, "UFFDIO_API"));
  return static_cast<uint64_t>(api.features);
}

Result<Userfaultfd> Userfaultfd::Open(uint64_t wanted) {
  MF_ASSIGN_OR_RETURN(uint64_t available, AvailableFeatures());
  MF_ASSIGN_OR_RETURN(UniqueFd fd, OpenRaw());
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = wanted & available;
  MF_RETURN_IF_ERROR(Ioctl(fd.get(), UFFDIO_API, &api, "UFFDIO_API"));
  return Userfaultfd(std::move(fd), wanted & available);
}

Status Userfaultfd::Register(void* addr, size_t len, uint64_t modes) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uintptr_t>(addr);
  reg.range.len = len;
  reg.mode = modes;
  return Ioctl(fd(), UFFDIO_REGISTER, &reg, "UFFDIO_REGISTER");
}

Status Userfaultfd::Unregister(void* addr, size_t len) {
  uffdio_range range{reinterpret_cast<uintptr_t>(addr), len};
  return Ioctl(fd(), UFFDIO_UNREGISTER, &range, "UFFDIO_UNREGISTER");
}

// Fills [addr, addr+len) with `attempt(offset, length)`, an ioctl over [addr+offset,
// addr+offset+length) that returns 0 or an errno and adds the bytes it filled before
// failing to *progress. Pages already present (EEXIST) are skipped, and the range's
// waiters are woken at the end, since a skipped page's waiter is not woken by the ioctl.
// EAGAIN is retried kMaxFillRetriesOnEagain times, then returned. The kernel fills within
// one VMA only (ENOENT otherwise): a range the program split (mprotect, mlock or madvise of
// part of it) is filled page by page, and ENOENT is returned only for a page that is not
// registered at all (unmapped), after every other page is filled.
template <typename Attempt>
Status Userfaultfd::FillSkippingPresent(void* addr, size_t len, const char* what, Attempt attempt) {
  size_t done = 0;
  bool skipped = false;
  bool by_page = false;
  bool missing = false;  // by_page: a page was not registered
  int eagain_retries = 0;
  while (done < len) {
    int64_t progress = 0;
    const size_t span = by_page ? kPageSize : len - done;
    const int err = attempt(done, span, &progress);
    if (err == 0) {
      if (!by_page) break;
      done += span;
      continue;
    }
    if (progress > 0) done += static_cast<size_t>(progress);
    if (err == EINTR) continue;
    if (err == ENOENT && progress <= 0) {
      if (!by_page && span > kPageSize) {
        by_page = true;  // more than one VMA, or a hole: find out page by page
        continue;
      }
      if (by_page) {
        missing = true;
        done += kPageSize;
        skipped = true;
        continue;
      }
    }
    if (err == EAGAIN) {
      if (++eagain_retries > kMaxFillRetriesOnEagain) {
        if (skipped) (void)Wake(addr, len);
        return Status::FromErrno(err, what);
      }
      sched_yield();
      continue;
    }
    if (err != EEXIST) {
      if (skipped) (void)Wake(addr, len);
      return Status::FromErrno(err, what);
    }
    done = AlignUp(done + 1, kPageSize);  // the page at `done` is present: next one
    skipped = true;
  }
  Status woken = skipped ? Wake(addr, len) : Status::Ok();
  if (missing) return Status::FromErrno(ENOENT, what);
  return woken;
}

Status Userfaultfd::Copy(void* dst, const void* src, size_t len, bool write_protect) {
  auto* d = static_cast<std::byte*>(dst);
  const auto* s = static_cast<const std::byte*>(src);
  return FillSkippingPresent(dst, len, "UFFDIO_COPY", [&](size_t done, size_t span, int64_t* progress) {
    uffdio_copy copy{};
    copy.dst = reinterpret_cast<uintptr_t>(d + done);
    copy.src = reinterpret_cast<uintptr_t>(s + done);
    copy.len = span;
    copy.mode = write_protect ? UFFDIO_COPY_MODE_WP : 0;
    if (::ioctl(fd(), UFFDIO_COPY, &copy) == 0) return 0;
    *progress = copy.copy;
    return errno;
  });
}

Status Userfaultfd::WriteProtect(void* addr, size_t len, bool protect) {
  auto one = [&](std::byte* at, size_t span) {
    uffdio_writeprotect wp{};
    wp.range.start = reinterpret_cast<uintptr_t>(at);
    wp.range.len = span;
    wp.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0;
    return Ioctl(fd(), UFFDIO_WRITEPROTECT, &wp, "UFFDIO_WRITEPROTECT");
  };
  auto* a = static_cast<std::byte*>(addr);
  Status s = one(a, len);
  if (s.err() != ENOENT || len <= kPageSize) return s;
  // Kernels before 6.5 protect within one VMA only: a range the program split is done page
  // by page; ENOENT stays for a page not registered at all.
  Status result;
  for (size_t done = 0; done < len; done += kPageSize) {
    Status page = one(a + done, kPageSize);
    if (page.err() == EAGAIN) return page;
    if (!page.ok() && result.ok()) result = page;
  }
  return result;
}

Status Userfaultfd::Wake(void* addr, size_t len) {
  uffdio_range range{reinterpret_cast<uintptr_t>(addr), len};
  return Ioctl(fd(), UFFDIO_WAKE, &range, "UFFDIO_WAKE");
}

Status Userfaultfd::Poison(void* addr, size_t len) {
  auto* a = static_cast<std::byte*>(addr);
  return FillSkippingPresent(addr, len, "UFFDIO_POISON", [&](size_t done, size_t span, int64_t* progress) {
    uffdio_poison poison{};
    poison.range.start = reinterpret_cast<uintptr_t>(a + done);
    poison.range.len = span;
    if (::ioctl(fd(), UFFDIO_POISON, &poison) == 0) return 0;
    *progress = poison.updated;
    return errno;
  });
}

Status Userfaultfd::ZeroPage(void* addr, size_t len) {
  auto* a = static_cast<std::byte*>(addr);
  return FillSkippingPresent(addr, len, "UFFDIO_ZEROPAGE", [&](size_t done, size_t span, int64_t* progress) {
    uffdio_zeropage zero{};
    zero.range.start = reinterpret_cast<uintptr_t>(a + done);
    zero.range.len = span;
    if (::ioctl(fd(), UFFDIO_ZEROPAGE, &zero) == 0) return 0;
    *progress = zero.zeropage;
    return errno;
  });
}

Result<size_t> Userfaultfd::ReadMessages(std::span<uffd_msg> out) {
  for (;;) {
    ssize_t n = ::read(fd(), out.data(), out.size_bytes());
    if (n >= 0) return static_cast<size_t>(n) / sizeof(uffd_msg);
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return size_t{0};
    return Status::FromErrno(errno, "read userfaultfd");
  }
}

}  // namespace mf::uffd
