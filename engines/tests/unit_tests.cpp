// Unit tests of what needs no model: sha256, the manifest's canonical JSON (Python's bytes),
// timestep respacing, the noise schedule, 16-bit conversions, .npy IO. Expected values were
// printed by Python (hashlib, json.dumps, dyc.timesteps, dyc.runtime.samplers).
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <string>

#include "canonical_json.hpp"
#include "dyc/runtime.hpp"
#include "half.hpp"
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

  std::cout << (checks - failures) << " passed, " << failures << " failed\n";
  return failures ? 1 : 0;
}
