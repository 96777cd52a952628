// The part of a migration test that the unit (MemoryRemote) and integration (real server)
// suites share: a writer thread that keeps writing into the source during pre-copy until
// it is stopped, and running the destination beside the source's finalize.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <thread>

#include "fabric/migration.h"

namespace mf::testing {

class MigrationWriterTest : public ::testing::Test {
 protected:
  void TearDown() override { StopWriter(); }

  // Calls write(n) for n = 1, 2, ... on a thread of its own until StopWriter(); each call
  // counts as one write.
  void StartWriterLoop(std::function<void(uint64_t)> write) {
    writer_ = std::thread([this, write = std::move(write)] {
      for (uint64_t n = 1; !stop_.load(); ++n) {
        write(n);
        writes_.fetch_add(1);
      }
    });
  }
  bool writer_running() const { return writer_.joinable(); }
  // Lets the writer get going (threads start late on a loaded machine).
  void AwaitWrites(uint64_t n) {
    while (writes_.load() < n) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  void StopWriter() {
    stop_.store(true);
    if (writer_.joinable()) writer_.join();
  }
  // Finalizes on this thread while the destination runs on another; *run gets its end.
  static Result<fabric::MigrationStats> Migrate(fabric::Seeder& seeder, fabric::Leecher& leecher,
                                                Status* run) {
    std::thread dest([&] { *run = leecher.Run(); });
    auto stats = seeder.Finalize();
    dest.join();
    return stats;
  }

  std::atomic<uint64_t> writes_{0};

 private:
  std::thread writer_;
  std::atomic<bool> stop_{false};
};

}  // namespace mf::testing
