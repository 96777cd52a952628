// ByteBuffer — a growable FIFO of bytes for a connection's input or output: append at the
// back, consume from the front, without zero-filling what it grows into.
//
// Thread-safety: none; owned by one connection on one thread.
#pragma once

#include <cstddef>
#include <cstring>
#include <memory>
#include <span>

namespace mf::tcp {

class ByteBuffer final {
 public:
  size_t size() const { return end_ - begin_; }
  bool empty() const { return begin_ == end_; }
  size_t capacity() const { return capacity_; }
  std::span<std::byte> readable() const { return {data_.get() + begin_, end_ - begin_}; }

  // Makes room for at least n more bytes at the back and returns that space; commit what
  // was filled with Commit().
  std::span<std::byte> Writable(size_t n) {
    if (capacity_ - end_ < n) Grow(n);
    return {data_.get() + end_, capacity_ - end_};
  }
  void Commit(size_t n) { end_ += n; }
  void Append(std::span<const std::byte> bytes) {
    auto space = Writable(bytes.size());
    if (!bytes.empty()) std::memcpy(space.data(), bytes.data(), bytes.size());
    Commit(bytes.size());
  }
  void Consume(size_t n) {
    begin_ += n;
    if (begin_ == end_) begin_ = end_ = 0;
  }
  // Frees the memory when empty (for idle connections).
  void Release() {
    if (empty()) {
      data_.reset();
      capacity_ = begin_ = end_ = 0;
    }
  }

 private:
  void Grow(size_t n) {
    size_t live = size();
    // Compact in place when that frees enough and moves at most half the buffer (so the
    // cost of moving stays amortized); else grow.
    if (begin_ > 0 && capacity_ - live >= n && live <= capacity_ / 2) {
      std::memmove(data_.get(), data_.get() + begin_, live);
    } else {
      size_t cap = capacity_ == 0 ? kMinCapacity : 2 * capacity_;
      while (cap - live < n) cap *= 2;
      std::unique_ptr<std::byte[]> bigger(new std::byte[cap]);  // not zero-filled
      if (live > 0) std::memcpy(bigger.get(), data_.get() + begin_, live);
      data_ = std::move(bigger);
      capacity_ = cap;
    }
    begin_ = 0;
    end_ = live;
  }

  static constexpr size_t kMinCapacity = 4096;
  std::unique_ptr<std::byte[]> data_;
  size_t capacity_ = 0;
  size_t begin_ = 0;
  size_t end_ = 0;
};

}  // namespace mf::tcp
