// ByteBuffer — a growable FIFO of bytes for a connection's input or output: append at the
// back, consume from the front, without zero-filling what it grows into.
// OutputQueue — a connection's unsent output: bytes it owns (copied into a ByteBuffer) and
// references to memory that outlives the queue (a region's, for large READ replies), in
// order, handed to a gathered write without copying the referenced bytes.
//
// Thread-safety: none; owned by one connection on one thread.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <deque>
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

class OutputQueue final {
 public:
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  bool has_references() const { return references_ > 0; }

  // Copies bytes to the back.
  void Append(std::span<const std::byte> bytes) {
    if (bytes.empty()) return;
    if (pieces_.empty() || pieces_.back().external != nullptr) pieces_.push_back({nullptr, 0});
    pieces_.back().length += bytes.size();
    owned_.Append(bytes);
    size_ += bytes.size();
  }
  // Queues bytes by reference: they must stay valid until consumed, and are sent as they
  // are at that time (CopyReferences() freezes them).
  void AppendReference(std::span<const std::byte> bytes) {
    if (bytes.empty()) return;
    pieces_.push_back({bytes.data(), bytes.size()});
    size_ += bytes.size();
    ++references_;
  }
  // Copies every referenced byte into the queue's own memory, keeping the order.
  void CopyReferences() {
    if (references_ == 0) return;
    ByteBuffer copy;
    auto owned = owned_.readable();
    for (const Piece& p : pieces_) {
      if (p.external != nullptr) {
        copy.Append({p.external, p.length});
      } else {
        copy.Append(owned.first(p.length));
        owned = owned.subspan(p.length);
      }
    }
    owned_ = std::move(copy);
    pieces_.clear();
    pieces_.push_back({nullptr, size_});
    references_ = 0;
  }
  // Fills `out` with the queue's pieces from the front; returns how many it filled.
  size_t Gather(std::span<std::span<const std::byte>> out) const {
    size_t count = 0;
    auto owned = owned_.readable();
    for (const Piece& p : pieces_) {
      if (count == out.size()) break;
      if (p.external != nullptr) {
        out[count++] = {p.external, p.length};
      } else {
        out[count++] = owned.first(p.length);
        owned = owned.subspan(p.length);
      }
    }
    return count;
  }
  // Drops n bytes (at most size()) from the front.
  void Consume(size_t n) {
    size_ -= n;
    while (n > 0) {
      Piece& p = pieces_.front();
      const size_t used = std::min(n, p.length);
      if (p.external != nullptr) {
        p.external += used;
      } else {
        owned_.Consume(used);
      }
      p.length -= used;
      n -= used;
      if (p.length == 0) {
        if (p.external != nullptr) --references_;
        pieces_.pop_front();
      }
    }
  }

 private:
  struct Piece {
    const std::byte* external;  // null: the next `length` bytes of owned_
    size_t length;
  };
  ByteBuffer owned_;
  std::deque<Piece> pieces_;
  size_t size_ = 0;
  size_t references_ = 0;
};

}  // namespace mf::tcp
