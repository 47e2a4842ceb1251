// Weights as graph inputs, by editing the ONNX protobuf wire format (see onnx_weights.hpp).
//
// ModelProto.graph = field 7; GraphProto.initializer = 5, .input = 11; TensorProto.dims = 1,
// .data_type = 2, .name = 8, .external_data = 13 (key 1, value 2), .data_location = 14 (1: EXTERNAL);
// ValueInfoProto.name = 1, .type = 2 -> TypeProto.tensor_type = 1 -> elem_type = 1, shape = 2 ->
// dim = 1 -> dim_value = 1.
#include "onnx_weights.hpp"

#include <algorithm>
#include <fstream>
#include <iterator>
#include <map>
#include <utility>

#include "sha256.hpp"

namespace dyc::detail {

namespace {

struct Reader {
  const std::string& s;
  std::size_t pos, end;
  const std::string& what;

  [[noreturn]] void bad() const { throw Error(what + ": not a valid ONNX model (truncated protobuf)"); }
  bool done() const { return pos >= end; }
  std::uint64_t varint() {
    std::uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos >= end) bad();
      const auto b = static_cast<unsigned char>(s[pos++]);
      v |= static_cast<std::uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    bad();
  }
  // one field: its number, wire type, and the payload's [begin, end) (for varints: the value)
  struct Field {
    std::uint32_t number, wire;
    std::size_t start, begin, stop;  // start: the key's first byte; [begin, stop): payload
    std::uint64_t value;
  };
  Field next() {
    Field f{};
    f.start = pos;
    const std::uint64_t key = varint();
    f.number = static_cast<std::uint32_t>(key >> 3);
    f.wire = static_cast<std::uint32_t>(key & 7);
    f.begin = pos;
    switch (f.wire) {
      case 0: f.value = varint(); break;
      case 1: pos += 8; break;
      case 5: pos += 4; break;
      case 2: {
        const std::uint64_t len = varint();
        f.begin = pos;
        if (len > end - pos) bad();
        pos += static_cast<std::size_t>(len);
        break;
      }
      default: bad();
    }
    if (pos > end) bad();
    f.stop = pos;
    return f;
  }
};

void put_varint(std::string& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void put_bytes(std::string& out, std::uint32_t field, const std::string& payload) {
  put_varint(out, (static_cast<std::uint64_t>(field) << 3) | 2);
  put_varint(out, payload.size());
  out += payload;
}

void put_int(std::string& out, std::uint32_t field, std::uint64_t v) {
  put_varint(out, static_cast<std::uint64_t>(field) << 3);
  put_varint(out, v);
}

// ValueInfoProto{name, type{tensor_type{elem_type, shape{dim{dim_value}...}}}}
std::string value_info(const WeightRef& r) {
  std::string shape;
  for (std::int64_t d : r.shape) {
    std::string dim;
    put_int(dim, 1, static_cast<std::uint64_t>(d));
    put_bytes(shape, 1, dim);
  }
  std::string tensor;
  put_int(tensor, 1, static_cast<std::uint64_t>(r.onnx_type));
  put_bytes(tensor, 2, shape);
  std::string type;
  put_bytes(type, 1, tensor);
  std::string vi;
  put_bytes(vi, 1, r.name);
  put_bytes(vi, 2, type);
  return vi;
}

std::size_t element_size(int onnx_type) {
  switch (onnx_type) {
    case 1: case 6: case 12: return 4;   // float, int32, uint32
    case 10: case 16: case 4: case 5: return 2;  // float16, bfloat16, uint16, int16
    case 7: case 11: case 13: return 8;  // int64, double, uint64
    case 2: case 3: case 9: return 1;    // uint8, int8, bool
    default: return 0;
  }
}

// Parses one TensorProto; returns true (and fills `ref`) when its data is external in `file`.
bool external_tensor(const std::string& s, std::size_t begin, std::size_t stop, const std::string& file,
                     WeightRef& ref, const std::string& what) {
  Reader r{s, begin, stop, what};
  std::map<std::string, std::string> ext;
  bool external = false;
  while (!r.done()) {
    const auto f = r.next();
    if (f.number == 1 && f.wire == 0) {
      ref.shape.push_back(static_cast<std::int64_t>(f.value));
    } else if (f.number == 1 && f.wire == 2) {  // packed dims
      Reader p{s, f.begin, f.stop, what};
      while (!p.done()) ref.shape.push_back(static_cast<std::int64_t>(p.varint()));
    } else if (f.number == 2 && f.wire == 0) {
      ref.onnx_type = static_cast<int>(f.value);
    } else if (f.number == 8 && f.wire == 2) {
      ref.name = s.substr(f.begin, f.stop - f.begin);
    } else if (f.number == 14 && f.wire == 0) {
      external = f.value == 1;
    } else if (f.number == 13 && f.wire == 2) {
      Reader e{s, f.begin, f.stop, what};
      std::string key, value;
      while (!e.done()) {
        const auto kv = e.next();
        if (kv.wire != 2) continue;
        (kv.number == 1 ? key : value) = s.substr(kv.begin, kv.stop - kv.begin);
      }
      ext[key] = value;
    }
  }
  if (!external) return false;
  if (ext["location"] != file) {
    throw Error(what + ": initializer " + ref.name + " refers to '" + ext["location"] + "', not the bundle's " + file);
  }
  try {
    ref.offset = ext.count("offset") ? std::stoull(ext["offset"]) : 0;
    ref.length = std::stoull(ext.at("length"));
  } catch (const std::exception&) {
    throw Error(what + ": initializer " + ref.name + " has no valid external offset/length");
  }
  return true;
}

}  // namespace

std::string weights_as_inputs(const std::string& model, const std::string& weights_file, std::uint64_t weights_size,
                              std::vector<WeightRef>& refs, const std::string& what) {
  refs.clear();
  std::string out;
  out.reserve(model.size());
  Reader top{model, 0, model.size(), what};
  bool seen_graph = false;
  while (!top.done()) {
    const auto f = top.next();
    if (f.number != 7 || f.wire != 2) {
      out.append(model, f.start, f.stop - f.start);
      continue;
    }
    seen_graph = true;
    std::string graph;
    graph.reserve(f.stop - f.begin);
    Reader g{model, f.begin, f.stop, what};
    while (!g.done()) {
      const auto gf = g.next();
      if (gf.number == 5 && gf.wire == 2) {
        WeightRef ref;
        if (external_tensor(model, gf.begin, gf.stop, weights_file, ref, what)) {
          std::uint64_t numel = 1;
          for (auto d : ref.shape) numel *= static_cast<std::uint64_t>(d);
          const std::size_t es = element_size(ref.onnx_type);
          if (es == 0 || ref.length != numel * es || ref.offset > weights_size || ref.length > weights_size - ref.offset) {
            throw Error(what + ": initializer " + ref.name + " does not fit " + weights_file + " (offset " +
                        std::to_string(ref.offset) + ", length " + std::to_string(ref.length) + ")");
          }
          refs.push_back(std::move(ref));
          continue;  // dropped: it becomes an input
        }
      }
      graph.append(model, gf.start, gf.stop - gf.start);
    }
    for (const WeightRef& r : refs) put_bytes(graph, 11, value_info(r));
    put_bytes(out, 7, graph);
  }
  if (!seen_graph) throw Error(what + ": not a valid ONNX model (no graph)");
  return out;
}

std::vector<WeightSpan> spans_of(const std::vector<WeightRef>& refs) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;  // [lo, hi)
  for (const WeightRef& r : refs) {
    if (r.length) ranges.emplace_back(r.offset, r.offset + r.length);
  }
  std::sort(ranges.begin(), ranges.end());
  std::vector<std::pair<std::uint64_t, std::uint64_t>> merged;
  for (const auto& [lo, hi] : ranges) {
    if (!merged.empty() && lo <= merged.back().second) merged.back().second = std::max(merged.back().second, hi);
    else merged.emplace_back(lo, hi);
  }
  std::vector<WeightSpan> spans;
  std::uint64_t end = 0;
  for (const auto& [lo, hi] : merged) {
    const std::uint64_t dst = (end + kSpanAlign - 1) / kSpanAlign * kSpanAlign + lo % kSpanAlign;
    spans.push_back({lo, dst, hi - lo});
    end = dst + (hi - lo);
  }
  return spans;
}

std::uint64_t spans_size(const std::vector<WeightSpan>& spans) {
  return spans.empty() ? 0 : spans.back().dst + spans.back().length;
}

namespace {
// the last span starting at or before `off` (spans.begin() when none does)
std::vector<WeightSpan>::const_iterator span_at(const std::vector<WeightSpan>& spans, std::uint64_t off) {
  auto it = std::upper_bound(spans.begin(), spans.end(), off,
                             [](std::uint64_t o, const WeightSpan& s) { return o < s.src; });
  return it == spans.begin() ? it : std::prev(it);
}
}  // namespace

void remap(std::vector<WeightRef>& refs, const std::vector<WeightSpan>& spans) {
  for (WeightRef& r : refs) {
    if (!r.length) {  // an empty tensor reads nothing
      r.offset = 0;
      continue;
    }
    const auto s = span_at(spans, r.offset);
    if (s == spans.end() || s->src > r.offset || r.offset + r.length > s->src + s->length) {
      throw Error("weight " + r.name + " (offset " + std::to_string(r.offset) + ", length " +
                  std::to_string(r.length) + ") is outside the loaded spans");
    }
    r.offset = s->dst + (r.offset - s->src);
  }
}

void copy_spans(const std::vector<WeightSpan>& spans, std::uint64_t off, const char* data, std::size_t size,
                const std::function<void(std::uint64_t, const char*, std::size_t)>& put) {
  const std::uint64_t end = off + size;
  for (auto s = span_at(spans, off); s != spans.end() && s->src < end; ++s) {
    const std::uint64_t lo = std::max(off, s->src), hi = std::min(end, s->src + s->length);
    if (lo < hi) put(s->dst + (lo - s->src), data + (lo - off), static_cast<std::size_t>(hi - lo));
  }
}

void stream_checked(const Bundle& bundle, const std::string& name,
                    const std::function<void(std::uint64_t, const char*, std::size_t)>& sink) {
  const auto info = bundle.file_info(name);
  const std::filesystem::path p = bundle.path() / name;
  std::ifstream f(p, std::ios::binary);
  if (!f) throw BundleError(bundle.path().string() + ": bundle file " + name + " is missing");
  Sha256 h;
  std::vector<char> buf(std::size_t{1} << 26);
  std::uint64_t off = 0;
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto k = static_cast<std::size_t>(f.gcount());
    if (k == 0) break;
    if (off + k > info.bytes) {
      off += k;
      break;
    }
    h.update(buf.data(), k);
    sink(off, buf.data(), k);
    off += k;
  }
  if (off != info.bytes) {
    throw BundleError(bundle.path().string() + ": bundle file " + name + " does not have the " +
                      std::to_string(info.bytes) + " bytes the manifest says");
  }
  if (h.hexdigest() != info.sha256) {
    throw BundleError(bundle.path().string() + ": bundle file " + name + " was altered (sha256 mismatch)");
  }
}

std::string read_checked(const Bundle& bundle, const std::string& name) {
  std::string out;
  out.resize(static_cast<std::size_t>(bundle.file_info(name).bytes));
  stream_checked(bundle, name, [&](std::uint64_t off, const char* data, std::size_t k) {
    std::copy(data, data + k, out.begin() + static_cast<std::ptrdiff_t>(off));
  });
  return out;
}

}  // namespace dyc::detail
