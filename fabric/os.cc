#include "fabric/os.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <utility>

namespace mf {

void UniqueFd::Reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

MappedMemory::MappedMemory(MappedMemory&& other) noexcept
    : addr_(std::exchange(other.addr_, nullptr)), size_(std::exchange(other.size_, 0)) {}

MappedMemory& MappedMemory::operator=(MappedMemory&& other) noexcept {
  if (this != &other) {
    Reset();
    addr_ = std::exchange(other.addr_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void MappedMemory::Reset() {
  if (addr_ != nullptr) ::munmap(addr_, size_);
  addr_ = nullptr;
  size_ = 0;
}

Result<MappedMemory> MappedMemory::Anonymous(size_t size) {
  if (size == 0) return InvalidArgument("cannot map 0 bytes");
  size_t rounded = AlignUp(size, kPageSize);
  void* p = ::mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return Status::FromErrno(errno, "mmap anonymous " + std::to_string(rounded) + " bytes");
  return MappedMemory(p, rounded);
}

Status WriteAll(int fd, std::span<const std::byte> buf) {
  while (!buf.empty()) {
    ssize_t n = ::write(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write");
    }
    buf = buf.subspan(static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status ReadAll(int fd, std::span<std::byte> buf) {
  while (!buf.empty()) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read");
    }
    if (n == 0) return Status(Code::kUnavailable, "peer closed the connection");
    buf = buf.subspan(static_cast<size_t>(n));
  }
  return Status::Ok();
}

Status RunProgram(const std::vector<std::string>& argv, bool quiet) {
  if (argv.empty()) return InvalidArgument("no program to run");
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  if (quiet) {
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  }
  pid_t pid = 0;
  const int spawned = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) return Status::FromErrno(spawned, "running " + argv[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return Status::FromErrno(errno, "waiting for " + argv[0]);
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return Status::Ok();
  if (WIFEXITED(status)) {
    return Status(Code::kIoError, argv[0] + " exited with status " + std::to_string(WEXITSTATUS(status)));
  }
  return Status(Code::kIoError, argv[0] + " was killed by signal " + std::to_string(WTERMSIG(status)));
}

}  // namespace mf
