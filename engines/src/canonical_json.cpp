#include "canonical_json.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <system_error>

#include "dyc/runtime.hpp"

namespace dyc::detail {

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";  // what Python's json writes (allow_nan=True)
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  // shortest digits that round-trip, in scientific form: "-d.ddde+XX"
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  if (res.ec != std::errc()) throw Error("cannot format a float of the manifest");
  const std::string sci(buf, res.ptr);
  const std::size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  const int exp10 = std::stoi(sci.substr(e + 1));
  std::string sign;
  if (!mant.empty() && mant[0] == '-') {
    sign = "-";
    mant.erase(0, 1);
  }
  std::string digits;
  for (char c : mant) {
    if (c != '.') digits.push_back(c);
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  // value = 0.DIGITS x 10^decpt, Python's float_repr_style 'short' with repr's 'r' mode
  const int decpt = exp10 + 1;
  const int nd = static_cast<int>(digits.size());
  std::string out = sign;
  if (decpt <= -4 || decpt > 16) {
    out += digits.substr(0, 1);
    if (nd > 1) out += "." + digits.substr(1);
    char ebuf[24];
    std::snprintf(ebuf, sizeof ebuf, "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += ebuf;
  } else if (decpt <= 0) {
    out += "0." + std::string(static_cast<std::size_t>(-decpt), '0') + digits;
  } else if (decpt >= nd) {
    out += digits + std::string(static_cast<std::size_t>(decpt - nd), '0') + ".0";
  } else {
    out += digits.substr(0, static_cast<std::size_t>(decpt)) + "." + digits.substr(static_cast<std::size_t>(decpt));
  }
  return out;
}

namespace {

void append_u16(std::string& out, unsigned cp) {
  char b[16];
  std::snprintf(b, sizeof b, "\\u%04x", cp & 0xffffu);
  out += b;
}

// ensure_ascii escaping of a UTF-8 string: printable ASCII as is, every other code point as a
// backslash-u escape of four hex digits
// (surrogate pairs beyond the BMP), with Python's short escapes for the usual controls.
void append_string(std::string& out, const std::string& s) {
  out.push_back('"');
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    unsigned cp = c;
    std::size_t len = 1;
    if (c >= 0x80) {
      if ((c & 0xe0) == 0xc0) { cp = c & 0x1f; len = 2; }
      else if ((c & 0xf0) == 0xe0) { cp = c & 0x0f; len = 3; }
      else if ((c & 0xf8) == 0xf0) { cp = c & 0x07; len = 4; }
      else throw BundleError("manifest holds a string that is not valid UTF-8");
      if (i + len > s.size()) throw BundleError("manifest holds a string that is not valid UTF-8");
      for (std::size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
    }
    i += len;
    switch (cp) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    if (cp >= 0x20 && cp <= 0x7e) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x10000) {
      append_u16(out, cp);
    } else {
      cp -= 0x10000;
      append_u16(out, 0xd800 | (cp >> 10));
      append_u16(out, 0xdc00 | (cp & 0x3ff));
    }
  }
  out.push_back('"');
}

void append(std::string& out, const nlohmann::json& v) {
  using T = nlohmann::json::value_t;
  switch (v.type()) {
    case T::null: out += "null"; return;
    case T::boolean: out += v.get<bool>() ? "true" : "false"; return;
    case T::number_integer: out += std::to_string(v.get<std::int64_t>()); return;
    case T::number_unsigned: out += std::to_string(v.get<std::uint64_t>()); return;
    case T::number_float: out += python_float_repr(v.get<double>()); return;
    case T::string: append_string(out, v.get_ref<const std::string&>()); return;
    case T::array: {
      out.push_back('[');
      bool first = true;
      for (const auto& e : v) {
        if (!first) out.push_back(',');
        first = false;
        append(out, e);
      }
      out.push_back(']');
      return;
    }
    case T::object: {
      // nlohmann's default object is a std::map: keys already in byte order, which for UTF-8
      // is code point order, i.e. Python's sort_keys order
      out.push_back('{');
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (!first) out.push_back(',');
        first = false;
        append_string(out, it.key());
        out.push_back(':');
        append(out, it.value());
      }
      out.push_back('}');
      return;
    }
    default: throw BundleError("manifest holds a value JSON cannot express");
  }
}

}  // namespace

std::string canonical_json(const nlohmann::json& value) {
  std::string out;
  append(out, value);
  return out;
}

}  // namespace dyc::detail
