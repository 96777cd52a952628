// Clang thread-safety annotations (checked with -Wthread-safety in the `clang` presets),
// and mf::Mutex / mf::MutexLock, the annotated lock types. No-ops on other compilers.
#pragma once

#include <mutex>

#if defined(__clang__)
#define MF_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define MF_THREAD_ANNOTATION(x)
#endif

#define MF_CAPABILITY(x) MF_THREAD_ANNOTATION(capability(x))
#define MF_SCOPED_CAPABILITY MF_THREAD_ANNOTATION(scoped_lockable)
#define MF_GUARDED_BY(x) MF_THREAD_ANNOTATION(guarded_by(x))
#define MF_PT_GUARDED_BY(x) MF_THREAD_ANNOTATION(pt_guarded_by(x))
#define MF_REQUIRES(...) MF_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define MF_EXCLUDES(...) MF_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define MF_ACQUIRE(...) MF_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define MF_RELEASE(...) MF_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define MF_TRY_ACQUIRE(...) MF_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define MF_NO_THREAD_SAFETY_ANALYSIS MF_THREAD_ANNOTATION(no_thread_safety_analysis)

namespace mf {

class MF_CAPABILITY("mutex") Mutex {
 public:
  void Lock() MF_ACQUIRE() { mu_.lock(); }
  void Unlock() MF_RELEASE() { mu_.unlock(); }
  bool TryLock() MF_TRY_ACQUIRE(true) { return mu_.try_lock(); }
  // For std::condition_variable_any.
  void lock() MF_ACQUIRE() { mu_.lock(); }
  void unlock() MF_RELEASE() { mu_.unlock(); }

 private:
  std::mutex mu_;
};

class MF_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) MF_ACQUIRE(mu) : mu_(mu) { mu_.Lock(); }
  ~MutexLock() MF_RELEASE() { mu_.Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

}  // namespace mf
