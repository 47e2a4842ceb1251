// The manifest's self-checksum is sha256 over Python's
//   json.dumps(manifest_without_checksum, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
// so the C++ loader must reproduce those exact bytes. nlohmann's dump() differs from Python in
// float formatting (Grisu2 is not always shortest; different fixed/exponent switch points), so
// the canonical form is written here: shortest round-trip digits from std::to_chars, laid out as
// Python's float repr does, and strings escaped as ensure_ascii does.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace dyc::detail {

/// Python's repr() of a finite double ("0.1", "1e-06", "1e+16", "12.0", "-0.0").
std::string python_float_repr(double v);
/// Python's json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True).
std::string canonical_json(const nlohmann::json& value);

}  // namespace dyc::detail
