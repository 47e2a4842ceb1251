// Unit tests of what needs no model: sha256, the manifest's canonical JSON (Python's bytes),
// timestep respacing, the noise schedule, 16-bit conversions, .npy IO, the shared weights' spans.
// Expected values were printed by Python (hashlib, json.dumps, dyc.timesteps, dyc.runtime.samplers)
// or worked out by hand (spans).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>

#include "canonical_json.hpp"
#include "dyc/runtime.hpp"
#include "half.hpp"
#include "onnx_weights.hpp"
#include "sha256.hpp"

namespace {

int failures = 0, checks = 0;

template <class A, class B>
void expect_eq(const A& got, const B& want, const std::string& what) {
  ++checks;
  if (!(got == want)) {
    ++failures;
    std::cerr << "FAIL " << what << "\n";
  }
}

template <class F>
void expect_throw(F&& f, const std::string& needle, const std::string& what) {
  ++checks;
  try {
    f();
  } catch (const dyc::Error& e) {
    if (std::string(e.what()).find(needle) == std::string::npos) {
      ++failures;
      std::cerr << "FAIL " << what << ": message '" << e.what() << "' lacks '" << needle << "'\n";
    }
    return;
  }
  ++failures;
  std::cerr << "FAIL " << what << ": no exception\n";
}

std::vector<int> range(int lo, int hi, int step) {
  std::vector<int> v;
  for (int i = lo; step > 0 ? i < hi : i > hi; i += step) v.push_back(i);
  return v;
}

}  // namespace

int main() {
  using dyc::detail::python_float_repr;
  // ---- sha256 (FIPS 180-2 vectors) ----
  expect_eq(dyc::detail::sha256_hex(""), std::string("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            "sha256('')");
  expect_eq(dyc::detail::sha256_hex("abc"),
            std::string("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"), "sha256('abc')");
  expect_eq(dyc::detail::sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            std::string("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"), "sha256(448 bits)");
  {
    dyc::detail::Sha256 h;
    const std::string chunk(1000, 'a');
    for (int i = 0; i < 1000; ++i) h.update(chunk);
    expect_eq(h.hexdigest(), std::string("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
              "sha256(10^6 'a', streamed)");
  }

  // ---- Python float repr / canonical JSON ----
  const std::pair<double, const char*> floats[] = {
      {0.1, "0.1"}, {1e-06, "1e-06"}, {1e16, "1e+16"}, {1e15, "1000000000000000.0"}, {12.0, "12.0"},
      {-0.0, "-0.0"}, {0.0001, "0.0001"}, {1e-05, "1e-05"}, {123456789.123, "123456789.123"},
      {5e-324, "5e-324"}, {1.7976931348623157e308, "1.7976931348623157e+308"},
      {0.30000000000000004, "0.30000000000000004"}, {2.5e-07, "2.5e-07"},
      {1234567890123456.7, "1234567890123456.8"}, {0.5, "0.5"}, {100.0, "100.0"}, {1e22, "1e+22"},
      {3.14159, "3.14159"}, {-2.5e+100, "-2.5e+100"}};
  for (const auto& [v, want] : floats) expect_eq(python_float_repr(v), std::string(want), std::string("repr ") + want);
  {
    const auto obj = nlohmann::json::parse(
        R"({"b":[1,2.5,null,true,false],"a":"h\u00e9llo \"q\" \\ \n \ud83d\ude00 \u007f","c":{"z":-3,"y":1e-7}})");
    const std::string s = dyc::detail::canonical_json(obj);
    expect_eq(s, std::string(R"({"a":"h\u00e9llo \"q\" \\ \n \ud83d\ude00 \u007f","b":[1,2.5,null,true,false],"c":{"y":1e-07,"z":-3}})"),
              "canonical_json");
    expect_eq(dyc::detail::sha256_hex(s),
              std::string("770a1a532f46d894d905ba332c1f6ee9a43ea7597a4c9690351c5c47def2fa34"), "canonical sha");
  }

  // ---- timesteps (DESIGN.md section 3) ----
  {
    const auto s250 = dyc::space_timesteps(1000, "250");
    expect_eq(s250.size(), std::size_t(250), "space_timesteps 250 size");
    expect_eq(std::vector<int>(s250.begin(), s250.begin() + 3), std::vector<int>{0, 4, 8}, "space_timesteps 250 head");
    expect_eq(std::vector<int>(s250.end() - 3, s250.end()), std::vector<int>{991, 995, 999}, "space_timesteps 250 tail");
    const auto s100 = dyc::space_timesteps(1000, "100");
    expect_eq(s100.size(), std::size_t(100), "space_timesteps 100 size");
    expect_eq(std::vector<int>(s100.end() - 3, s100.end()), std::vector<int>{979, 989, 999}, "space_timesteps 100 tail");
    expect_eq(dyc::space_timesteps(1000, "ddim50"), range(0, 1000, 20), "space_timesteps ddim50");
    expect_eq(dyc::sampler_timesteps(dyc::SamplerKind::ddim, 50), range(980, -1, -20), "ddim 50");
    expect_eq(dyc::sampler_timesteps(dyc::SamplerKind::ddim, 7), std::vector<int>{858, 715, 572, 429, 286, 143, 0},
              "ddim 7");
    expect_eq(dyc::sampler_timesteps(dyc::SamplerKind::dpm_solver_pp, 20),
              std::vector<int>{999, 946, 894, 841, 789, 736, 684, 631, 578, 526, 473, 421, 368, 315, 263, 210, 158,
                               105, 53, 0},
              "dpm-solver++ 20");
    expect_throw([] { dyc::sampler_timesteps(dyc::SamplerKind::ddim, 0); }, "steps must be positive", "steps 0");
    expect_throw([] { dyc::sampler_timesteps(dyc::SamplerKind::ddim, 1001); }, "at most 1000", "steps 1001");
    expect_throw([] { dyc::parse_sampler("euler"); }, "unknown sampler 'euler'", "bad sampler");
    expect_eq(dyc::parse_sampler("DPM++") == dyc::SamplerKind::dpm_solver_pp, true, "sampler alias");
    const auto acp = dyc::linear_alphas_cumprod();
    expect_eq(acp[0], 0.9999, "acp[0]");
    expect_eq(acp[499], 0.07858724288177824, "acp[499]");
    expect_eq(acp[999], 4.035829765375676e-05, "acp[999]");
  }

  // ---- 16-bit conversions (round to nearest even) ----
  {
    using namespace dyc::detail;
    expect_eq(float_to_half(1.0f), std::uint16_t(0x3c00), "half 1");
    expect_eq(float_to_half(-2.0f), std::uint16_t(0xc000), "half -2");
    expect_eq(float_to_half(65504.0f), std::uint16_t(0x7bff), "half max");
    expect_eq(float_to_half(70000.0f), std::uint16_t(0x7c00), "half overflow");
    expect_eq(float_to_half(1.0f + 1.0f / 2048), std::uint16_t(0x3c00), "half tie to even");
    expect_eq(float_to_half(5.960464477539063e-08f), std::uint16_t(0x0001), "half min subnormal");
    expect_eq(half_to_float(0x0001), 5.960464477539063e-08f, "half subnormal back");
    expect_eq(half_to_float(0x3555), 0.333251953125f, "half 1/3");
    expect_eq(float_to_bf16(1.0f), std::uint16_t(0x3f80), "bf16 1");
    expect_eq(bf16_to_float(0x4049), 3.140625f, "bf16 pi");
  }

  // ---- .npy round trip ----
  {
    const auto path = std::filesystem::temp_directory_path() / "dyc_unit_roundtrip.npy";
    dyc::Tensor t({2, 3});
    for (std::size_t i = 0; i < t.numel(); ++i) t.data[i] = 0.5f * static_cast<float>(i) - 1.0f;
    dyc::write_npy(path, t);
    const dyc::Tensor r = dyc::read_npy(path);
    expect_eq(r.shape, t.shape, "npy shape");
    expect_eq(r.data, t.data, "npy data");
    std::filesystem::remove(path);
    expect_throw([] { dyc::read_npy("/nonexistent/x.npy"); }, "cannot open", "npy missing");
    expect_throw([] { dyc::Bundle::load("/nonexistent/b.dyc"); }, "no such bundle directory", "bundle missing");
  }

  // ---- shared weights: the referenced byte ranges of weights.bin, compacted ----
  {
    using dyc::detail::WeightRef;
    using dyc::detail::WeightSpan;
    auto ref = [](const std::string& name, std::uint64_t offset, std::uint64_t length) {
      WeightRef r;
      r.name = name;
      r.offset = offset;
      r.length = length;
      return r;
    };
    // b overlaps a, c touches b's end, d after a gap (and twice), f at a start that is not 64-aligned
    std::vector<WeightRef> refs = {ref("f", 10005, 20), ref("a", 4096, 100), ref("b", 4146, 100),
                                   ref("d", 8192, 64),  ref("c", 4246, 10),  ref("d2", 8192, 64),
                                   ref("empty", 9000, 0)};
    const auto spans = dyc::detail::spans_of(refs);
    std::vector<std::array<std::uint64_t, 3>> got;
    for (const WeightSpan& s : spans) got.push_back({s.src, s.dst, s.length});
    // by hand: [4096, 4256) at 0; [8192, 8256) at round64(160) = 192; [10005, 10025) at 256 + 10005 % 64 = 277
    expect_eq(got, std::vector<std::array<std::uint64_t, 3>>{{4096, 0, 160}, {8192, 192, 64}, {10005, 277, 20}},
              "spans merged, gaps kept, alignment mod 64 kept");
    expect_eq(dyc::detail::spans_size(spans), std::uint64_t{297}, "compacted size");
    expect_eq(dyc::detail::spans_size({}), std::uint64_t{0}, "no spans");

    // a 11000-byte "file" streamed in 37-byte chunks (crossing every span boundary)
    std::string file(11000, '\0');
    for (std::size_t i = 0; i < file.size(); ++i) file[i] = static_cast<char>((i * 7 + 3) % 251);
    std::string buf(dyc::detail::spans_size(spans), '\xee');
    std::uint64_t written = 0;
    for (std::size_t off = 0; off < file.size(); off += 37) {
      const std::size_t k = std::min<std::size_t>(37, file.size() - off);
      dyc::detail::copy_spans(spans, off, file.data() + off, k, [&](std::uint64_t at, const char* p, std::size_t n) {
        std::copy(p, p + n, buf.begin() + static_cast<std::ptrdiff_t>(at));
        written += n;
      });
    }
    expect_eq(written, std::uint64_t{160 + 64 + 20}, "only the spans' bytes are copied");
    std::vector<WeightRef> moved = refs;
    dyc::detail::remap(moved, spans);
    std::vector<std::uint64_t> offsets;
    for (const WeightRef& r : moved) offsets.push_back(r.offset);
    expect_eq(offsets, std::vector<std::uint64_t>{277, 0, 50, 192, 150, 192, 0}, "remapped offsets");
    for (std::size_t i = 0; i < refs.size(); ++i) {
      expect_eq(buf.substr(moved[i].offset, moved[i].length), file.substr(refs[i].offset, refs[i].length),
                "bytes of " + refs[i].name + " at its remapped offset");
    }
    std::vector<WeightRef> outside = {ref("gap", 5000, 8)};
    expect_throw([&] { dyc::detail::remap(outside, spans); }, "outside the loaded spans", "remap: ref in a gap");
    std::vector<WeightRef> across = {ref("across", 8250, 16)};
    expect_throw([&] { dyc::detail::remap(across, spans); }, "outside the loaded spans", "remap: ref past a span");
    std::vector<WeightRef> before = {ref("before", 0, 8)};
    expect_throw([&] { dyc::detail::remap(before, spans); }, "outside the loaded spans", "remap: ref before all");
  }

  std::cout << (checks - failures) << " passed, " << failures << " failed\n";
  return failures ? 1 : 0;
}
