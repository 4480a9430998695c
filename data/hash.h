// defines: Fnv1a64 (incremental FNV-1a 64 + hex), splitmix64, hash_combine —
// the small non-cryptographic hashes data/ uses for file fingerprints, the
// train/val split and counter-based window sampling.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace moetrain {

// FNV-1a 64: detects changed files and tokenizers; not a defence against malice.
struct Fnv1a64 {
  uint64_t h = 0xcbf29ce484222325ULL;
  void update(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  }
  void update(std::string_view s) { update(s.data(), s.size()); }
  std::string hex() const { return fmt::format("{:016x}", h); }
};

inline std::string fnv1a64_hex(std::string_view s) {
  Fnv1a64 f;
  f.update(s);
  return f.hex();
}

// splitmix64's finalizer (Steele et al.): a bijective mixer, so hashing a counter
// gives independent-looking values with no state to save or replay.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline uint64_t hash_combine(uint64_t a, uint64_t b) { return splitmix64(a ^ splitmix64(b)); }

// Uniform in [0, n) from a 64-bit hash (Lemire's multiply-shift; bias < n / 2^64).
inline uint64_t hash_below(uint64_t h, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(h) * n) >> 64);
}

// Uniform in [0, 1) with 53 bits.
inline double hash_unit(uint64_t h) { return static_cast<double>(h >> 11) * 0x1.0p-53; }

}  // namespace moetrain
