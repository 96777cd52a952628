// Little-endian encoding helpers shared by the wire codecs (transports/tcp/wire.cc,
// transports/rdma/rdma_wire.cc): a Writer that appends to a byte vector and a
// bounds-checked Reader whose getters fail, without reading, once the input is exhausted.
//
// Thread-safety: plain values; one thread per object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace mf::fabric {

// Little-endian appends to a byte vector.
class Writer {
 public:
  explicit Writer(std::vector<std::byte>* out) : out_(out) {}
  void U8(uint8_t v) { out_->push_back(static_cast<std::byte>(v)); }
  void U16(uint16_t v) { Le(v, 2); }
  void U32(uint32_t v) { Le(v, 4); }
  void U64(uint64_t v) { Le(v, 8); }
  void Bytes(std::span<const uint8_t> b) {
    for (uint8_t x : b) U8(x);
  }
  void Text(std::string_view s) {
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    out_->insert(out_->end(), p, p + s.size());
  }
  // u16 length + bytes; the caller has bounded the length.
  void String16(std::string_view s) {
    U16(static_cast<uint16_t>(s.size()));
    Text(s);
  }

 private:
  void Le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) U8(static_cast<uint8_t>(v >> (8 * i)));
  }
  std::vector<std::byte>* out_;
};

// Bounds-checked little-endian reads; every getter fails once the input is exhausted.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> in) : in_(in) {}
  size_t remaining() const { return in_.size() - pos_; }
  bool U8(uint8_t* v) {
    uint64_t x = 0;
    if (!Le(1, &x)) return false;
    *v = static_cast<uint8_t>(x);
    return true;
  }
  bool U16(uint16_t* v) {
    uint64_t x = 0;
    if (!Le(2, &x)) return false;
    *v = static_cast<uint16_t>(x);
    return true;
  }
  bool U32(uint32_t* v) {
    uint64_t x = 0;
    if (!Le(4, &x)) return false;
    *v = static_cast<uint32_t>(x);
    return true;
  }
  bool U64(uint64_t* v) { return Le(8, v); }
  bool Bytes(std::span<uint8_t> out) {
    if (remaining() < out.size()) return false;
    std::memcpy(out.data(), in_.data() + pos_, out.size());
    pos_ += out.size();
    return true;
  }
  // u16 length (at most max) + bytes.
  bool String16(size_t max, std::string* out) {
    uint16_t n = 0;
    if (!U16(&n) || n > max || remaining() < n) return false;
    out->assign(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return true;
  }

 private:
  bool Le(size_t n, uint64_t* v) {
    if (remaining() < n) return false;
    uint64_t x = 0;
    for (size_t i = 0; i < n; ++i) x |= static_cast<uint64_t>(in_[pos_ + i]) << (8 * i);
    pos_ += n;
    *v = x;
    return true;
  }
  std::span<const std::byte> in_;
  size_t pos_ = 0;
};

}  // namespace mf::fabric
