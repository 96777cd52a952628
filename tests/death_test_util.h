// Death-test predicates that hold in plain and in ASan builds. ASan catches SIGBUS and
// SIGSEGV itself, prints "AddressSanitizer: BUS on unknown address" (or SEGV) and exits
// or aborts; in such a build the test checks that report instead of the raw signal.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <functional>

#if defined(__SANITIZE_ADDRESS__)
#define MF_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MF_UNDER_ASAN 1
#endif
#endif

namespace mf::testing {

#ifdef MF_UNDER_ASAN
constexpr bool kUnderAsan = true;
#else
constexpr bool kUnderAsan = false;
#endif

// The process died of `sig` (or, under ASan, ASan reported it and ended the process).
inline std::function<bool(int)> DiedOf(int sig) {
  return [sig](int status) {
    if (WIFSIGNALED(status) && WTERMSIG(status) == sig) return true;
    if (!kUnderAsan) return false;
    return (WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT) ||
           (WIFEXITED(status) && WEXITSTATUS(status) != 0);
  };
}

// What the dying process must have printed: ASan's report of that signal, or nothing.
inline const char* DeathMessage(int sig) {
  if (!kUnderAsan) return "";
  return sig == SIGBUS ? "AddressSanitizer: BUS on unknown address"
                       : "AddressSanitizer: SEGV on unknown address";
}

}  // namespace mf::testing
