// What the session fuzz targets (a whole client stream fed to a real server) share: feeding
// one stream to the server while draining its replies, and waiting for the server to free a
// connection before the input ends. Any hang aborts, which libFuzzer reports with the input.
#pragma once

#include <poll.h>
#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <thread>

namespace mf::fuzz {

using Clock = std::chrono::steady_clock;

// How long one input may take before the harness calls it a hang (and aborts).
inline constexpr auto kInputDeadline = std::chrono::seconds(20);
inline Clock::time_point InputDeadline() {
  return Clock::now() + kInputDeadline;
}

// How a fed stream ends once all of it is sent.
enum class StreamEnd : uint8_t {
  kHalfClose,  // shutdown(SHUT_WR): the server sees EOF and must wind down
  // Nothing more is sent; the feed ends after the server has been silent for kQuietTime.
  // (No EOF: a server drops the replies of a connection whose peer closed its side, and
  // they would go untested.)
  kQuiet,
};
inline constexpr auto kQuietTime = std::chrono::milliseconds(2);
// How long a poll waits while there is still something to send.
inline constexpr int kSendPollMs = 100;

// Sends `stream` on the socket fd and reads and drops whatever comes back, until the server
// closes the connection (or, for kQuiet, falls silent). Aborts past the deadline.
inline void Feed(int fd, std::span<const std::byte> stream, StreamEnd end, Clock::time_point deadline) {
  size_t sent = 0;
  bool write_closed = false;
  std::array<char, 65536> sink{};
  for (;;) {
    if (Clock::now() > deadline) std::abort();  // the server hung
    const bool sending = sent < stream.size() && !write_closed;
    if (!sending && end == StreamEnd::kHalfClose && !write_closed) {
      ::shutdown(fd, SHUT_WR);
      write_closed = true;
    }
    pollfd p{fd, static_cast<short>(POLLIN | (sending ? POLLOUT : 0)), 0};
    const int wait_ms =
        sending || end == StreamEnd::kHalfClose ? kSendPollMs : static_cast<int>(kQuietTime.count());
    const int ready = ::poll(&p, 1, wait_ms);
    if (ready == 0 && !sending && end == StreamEnd::kQuiet) return;  // the server answered all it will
    if (ready <= 0) continue;
    if ((p.revents & POLLOUT) != 0 && sending) {
      const ssize_t n = ::send(fd, stream.data() + sent, stream.size() - sent, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) sent += static_cast<size_t>(n);
      if (n < 0 && errno != EAGAIN) write_closed = true;  // the server closed: read the rest
    }
    if ((p.revents & (POLLIN | POLLHUP | POLLERR)) != 0) {
      const ssize_t n = ::recv(fd, sink.data(), sink.size(), MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;  // the server closed
    }
  }
}

// Waits until done() holds; aborts past the deadline (the server hung). A server frees a
// connection after it has seen it close, on its own thread: libFuzzer compares an input's
// allocations with its frees when the input returns, and would report what that thread has
// not freed yet as a leak.
template <typename Done>
void WaitUntil(Done done, Clock::time_point deadline) {
  while (!done()) {
    if (Clock::now() > deadline) std::abort();
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

}  // namespace mf::fuzz
