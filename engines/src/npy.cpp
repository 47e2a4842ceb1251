// Minimal .npy IO: C-order little-endian float32 / float64 arrays, which is what `dyc run
// --noise FILE.npy` reads and `--save-latents` writes. Anything else is refused by name.
#include <algorithm>
#include <cstring>
#include <fstream>
#include <numeric>
#include <string>

#include "dyc/runtime.hpp"

namespace dyc {

Tensor::Tensor(std::vector<std::int64_t> shape_, float fill) : shape(std::move(shape_)) {
  std::int64_t n = 1;
  for (auto d : shape) {
    if (d < 0) throw Error("tensor dimensions must be >= 0");
    n *= d;
  }
  data.assign(static_cast<std::size_t>(n), fill);
}

namespace {

// value of 'key' in the header dict, e.g. "'descr': '<f4'" -> "'<f4'" (up to the next ',' or '}'
// outside parentheses)
std::string dict_value(const std::string& header, const std::string& key, const std::string& file) {
  const std::size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw Error(file + ": .npy header has no '" + key + "'");
  std::size_t p = header.find(':', k);
  if (p == std::string::npos) throw Error(file + ": malformed .npy header");
  ++p;
  int depth = 0;
  std::size_t e = p;
  for (; e < header.size(); ++e) {
    const char c = header[e];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
  }
  std::string v = header.substr(p, e - p);
  const auto b = v.find_first_not_of(" \t");
  const auto l = v.find_last_not_of(" \t");
  return b == std::string::npos ? std::string() : v.substr(b, l - b + 1);
}

}  // namespace

Tensor read_npy(const std::filesystem::path& path) {
  const std::string file = path.string();
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(file + ": cannot open .npy file");
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw Error(file + ": not a .npy file");
  const int major = static_cast<unsigned char>(magic[6]);
  std::uint32_t hlen = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!f.read(reinterpret_cast<char*>(b), 2)) throw Error(file + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!f.read(reinterpret_cast<char*>(b), 4)) throw Error(file + ": truncated .npy header");
    hlen = b[0] | (b[1] << 8) | (b[2] << 16) | (std::uint32_t(b[3]) << 24);
  } else {
    throw Error(file + ": unsupported .npy format version " + std::to_string(major));
  }
  std::string header(hlen, '\0');
  if (!f.read(header.data(), hlen)) throw Error(file + ": truncated .npy header");

  const std::string descr = dict_value(header, "descr", file);
  const bool f4 = descr == "'<f4'" || descr == "'float32'";
  const bool f8 = descr == "'<f8'" || descr == "'float64'";
  if (!f4 && !f8) throw Error(file + ": .npy dtype " + descr + " is not supported (use float32)");
  if (dict_value(header, "fortran_order", file) != "False") {
    throw Error(file + ": Fortran-order .npy arrays are not supported (save a C-contiguous array)");
  }
  std::string shape = dict_value(header, "shape", file);
  if (shape.size() < 2 || shape.front() != '(' || shape.back() != ')') throw Error(file + ": malformed .npy shape");
  Tensor t;
  std::size_t pos = 1;
  while (pos < shape.size() - 1) {
    const std::size_t comma = std::min(shape.find(',', pos), shape.size() - 1);
    std::string tok = shape.substr(pos, comma - pos);
    tok.erase(0, tok.find_first_not_of(' '));
    tok.erase(tok.find_last_not_of(' ') + 1);
    if (!tok.empty()) {
      try {
        t.shape.push_back(std::stoll(tok));
      } catch (const std::exception&) {
        throw Error(file + ": malformed .npy shape " + shape);
      }
    }
    pos = comma + 1;
  }
  const std::size_t n =
      std::accumulate(t.shape.begin(), t.shape.end(), std::size_t{1}, [](std::size_t a, std::int64_t d) {
        return a * static_cast<std::size_t>(d);
      });
  t.data.resize(n);
  if (f4) {
    if (!f.read(reinterpret_cast<char*>(t.data.data()), static_cast<std::streamsize>(n * 4))) {
      throw Error(file + ": truncated .npy data");
    }
  } else {
    std::vector<double> d(n);
    if (!f.read(reinterpret_cast<char*>(d.data()), static_cast<std::streamsize>(n * 8))) {
      throw Error(file + ": truncated .npy data");
    }
    for (std::size_t i = 0; i < n; ++i) t.data[i] = static_cast<float>(d[i]);
  }
  return t;
}

void write_npy(const std::filesystem::path& path, const Tensor& tensor) {
  std::string shape = "(";
  for (std::size_t i = 0; i < tensor.shape.size(); ++i) {
    shape += std::to_string(tensor.shape[i]) + (tensor.shape.size() == 1 ? "," : (i + 1 < tensor.shape.size() ? ", " : ""));
  }
  shape += ")";
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  // pad with spaces so data starts on a 64-byte boundary, newline-terminated (format 1.0)
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw Error(path.string() + ": cannot open for writing");
  const std::uint16_t hlen = static_cast<std::uint16_t>(header.size());
  const char pre[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  f.write(pre, 8);
  const char len[2] = {static_cast<char>(hlen & 0xff), static_cast<char>(hlen >> 8)};
  f.write(len, 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(reinterpret_cast<const char*>(tensor.data.data()), static_cast<std::streamsize>(tensor.data.size() * 4));
  if (!f) throw Error(path.string() + ": write failed");
}

}  // namespace dyc
