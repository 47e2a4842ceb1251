// SHA-256 (FIPS 180-4), small and dependency-free: bundles are verified the way the Python
// loader does (hashlib.sha256 of every file), without pulling a crypto library into every
// application that embeds the runtime.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace dyc::detail {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, std::size_t size);
  void update(std::string_view s) { update(s.data(), s.size()); }
  /// Finishes the hash and returns it as 64 lowercase hex digits (hashlib's hexdigest()).
  std::string hexdigest();

 private:
  void block(const std::uint8_t* p);
  std::array<std::uint32_t, 8> h_;
  std::array<std::uint8_t, 64> buf_{};
  std::size_t buffered_ = 0;
  std::uint64_t total_ = 0;
};

std::string sha256_hex(std::string_view data);
/// Hash of a whole file, read in chunks (bundles of XL models hold gigabytes of weights).
std::string sha256_file(const std::filesystem::path& path);

}  // namespace dyc::detail
