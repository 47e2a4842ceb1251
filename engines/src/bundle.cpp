// Loading and verifying a bundle: the checks of dyc/bundle.py (Bundle.load), in the same order and
// with the same messages where possible, so a bundle that Python refuses is refused here too.
#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "canonical_json.hpp"
#include "dyc/runtime.hpp"
#include "sha256.hpp"

namespace dyc {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kFormat = "dyc-bundle";
constexpr const char* kManifest = "manifest.json";

struct Architecture {
  std::vector<std::uint64_t> head, channel;  // bitmask per layer, bit h = unit h on
};

}  // namespace

std::string to_string(Dtype dtype) {
  switch (dtype) {
    case Dtype::fp32: return "fp32";
    case Dtype::fp16: return "fp16";
    case Dtype::bf16: return "bf16";
  }
  return "?";
}

struct Bundle::Impl {
  fs::path path;
  ModelConfig config;
  Dtype dtype = Dtype::fp32;
  std::vector<Group> groups;
  std::vector<Architecture> architectures;
  std::vector<int> arch_of_t;
  std::vector<int> group_of_t;  // t -> index into groups
  std::string manifest_sha256;
  std::map<std::string, Bundle::FileInfo> files;

  BundleError fail(const std::string& what) const {
    return BundleError((path / kManifest).string() + ": inconsistent manifest: " + what);
  }
};

namespace {

ModelConfig parse_config(const json& c) {
  static const std::set<std::string> known = {"input_size", "patch_size", "in_channels", "hidden_size",
                                              "depth",      "num_heads",  "mlp_ratio",   "num_classes",
                                              "learn_sigma", "dynamic",   "vae_scale",   "family",
                                              "qkv_bias",    "final_conv", "text_channels", "text_len"};
  std::vector<std::string> unknown;
  for (auto it = c.begin(); it != c.end(); ++it) {
    if (!known.count(it.key())) unknown.push_back(it.key());
  }
  if (!unknown.empty()) {
    std::string names;
    for (const auto& u : unknown) names += (names.empty() ? "'" : ", '") + u + "'";
    throw Error("unknown model config fields: [" + names + "]");
  }
  ModelConfig m;
  auto get = [&](const char* key, auto& field) {
    if (c.contains(key)) field = c.at(key).get<std::decay_t<decltype(field)>>();
  };
  get("input_size", m.input_size);
  get("patch_size", m.patch_size);
  get("in_channels", m.in_channels);
  get("hidden_size", m.hidden_size);
  get("depth", m.depth);
  get("num_heads", m.num_heads);
  get("mlp_ratio", m.mlp_ratio);
  get("num_classes", m.num_classes);
  get("learn_sigma", m.learn_sigma);
  get("dynamic", m.dynamic);
  // The C++ runtime runs the DiT family only (U-ViT and PixArt-alpha bundles: dyc run / dyc serve).
  const std::string family = c.value("family", std::string("dit"));
  if (family != "dit") {
    throw Error("a '" + family + "' bundle: the C++ runtime runs DiT-family bundles only (use `dyc run` for it)");
  }
  if (!c.value("qkv_bias", true) || c.value("final_conv", false) || c.value("text_channels", 0) != 0 ||
      c.value("text_len", 0) != 0) {
    throw Error("model config has U-ViT/PixArt fields on a DiT (qkv_bias=false, final_conv or text_*)");
  }
  if (m.num_heads <= 0 || m.num_heads > 63 || m.depth <= 0 || m.in_channels <= 0 || m.input_size <= 0 ||
      m.patch_size <= 0 || m.num_classes <= 0) {
    throw Error("model config has a non-positive size or more than 63 heads");
  }
  if (m.hidden_size % m.num_heads) throw Error("hidden size is not divisible by the head count");
  if (m.input_size % m.patch_size) throw Error("input size is not a multiple of the patch size");
  return m;
}

std::vector<std::vector<int>> int_lists(const json& j) { return j.get<std::vector<std::vector<int>>>(); }

}  // namespace

Bundle::Bundle(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Bundle Bundle::load(const fs::path& dir, bool verify_checksums) {
  auto b = std::make_shared<Impl>();
  b->path = dir;
  const fs::path mpath = dir / kManifest;
  const std::string mname = mpath.string();
  if (!fs::is_directory(dir)) throw BundleError(dir.string() + ": no such bundle directory");
  if (!fs::is_regular_file(mpath)) {
    throw BundleError(dir.string() + ": not a dyc bundle (no " + kManifest +
                      "; an interrupted compile leaves none)");
  }
  json m;
  try {
    std::ifstream f(mpath);
    m = json::parse(f);
  } catch (const json::exception& e) {
    throw BundleError(mname + ": not valid JSON (" + e.what() + ")");
  }
  if (!m.is_object() || !m.contains("format") || m["format"] != kFormat) {
    throw BundleError(mname + ": not a dyc bundle manifest (format is not '" + kFormat + "')");
  }
  if (!m.contains("schema_version") || !m["schema_version"].is_number() ||
      m["schema_version"].get<double>() != kBundleSchemaVersion) {
    throw BundleError(mname + ": unknown schema version " + (m.contains("schema_version") ? m["schema_version"].dump() : "None") +
                      ": this runtime reads version " + std::to_string(kBundleSchemaVersion) +
                      "; recompile the bundle with a matching dyc");
  }
  {
    json body = m;
    body.erase("manifest_sha256");
    const std::string expect = detail::sha256_hex(detail::canonical_json(body));
    if (!m.contains("manifest_sha256") || !m["manifest_sha256"].is_string() || m["manifest_sha256"] != expect) {
      throw BundleError(mname + ": the manifest was modified after compile (its checksum does not match its "
                        "content); hand-edited manifests are refused: recompile instead");
    }
    b->manifest_sha256 = expect;
  }

  std::vector<std::string> group_files;
  try {
    b->config = parse_config(m.at("model").at("config"));
    const std::string dt = m.at("dtype").get<std::string>();
    if (dt == "fp32") b->dtype = Dtype::fp32;
    else if (dt == "fp16") b->dtype = Dtype::fp16;
    else if (dt == "bf16") b->dtype = Dtype::bf16;
    else throw b->fail("unknown dtype '" + dt + "'");
    for (const json& a : m.at("masks").at("architectures")) {
      b->architectures.push_back({a.at("head").get<std::vector<std::uint64_t>>(),
                                  a.at("channel").get<std::vector<std::uint64_t>>()});
    }
    b->arch_of_t = m.at("masks").at("arch_of_t").get<std::vector<int>>();
    for (const json& g : m.at("groups")) {
      Group out;
      out.index = g.at("index").get<int>();
      out.t_lo = g.at("t_lo").get<int>();
      out.t_hi = g.at("t_hi").get<int>();
      out.heads = int_lists(g.at("heads"));
      out.channels = int_lists(g.at("channels"));
      out.vary_head = g.at("vary_head").get<std::vector<bool>>();
      out.vary_channel = g.at("vary_channel").get<std::vector<bool>>();
      for (const auto& h : out.heads) out.head_slots = std::max(out.head_slots, static_cast<int>(h.size()));
      for (const auto& c : out.channels) out.channel_slots = std::max(out.channel_slots, static_cast<int>(c.size()));
      // which mask inputs the graph takes: the manifest's `inputs` when it declares them, else
      // whether the members differ in some layer (as the Python scheduler decides)
      const json inputs = g.value("inputs", json::object());
      auto takes = [&](const char* name, const std::vector<bool>& vary) {
        if (inputs.is_object() && inputs.contains(name)) return !inputs.at(name).is_null();
        return std::any_of(vary.begin(), vary.end(), [](bool v) { return v; });
      };
      out.needs_head_mask = takes("head_mask", out.vary_head);
      out.needs_channel_mask = takes("channel_mask", out.vary_channel);
      const json& files = g.at("files");
      for (auto it = files.begin(); it != files.end(); ++it) group_files.push_back(it.value().get<std::string>());
      // std and trt always; cuda in bundles of a dyc that writes it (as dyc/bundle.py)
      const bool extra_ok = files.size() == 2 || (files.size() == 3 && files.contains("cuda"));
      if (!extra_ok || !files.contains("std") || !files.contains("trt")) {
        throw b->fail("group " + std::to_string(b->groups.size()) +
                      ": files must name the variants ('std', 'trt') (and may name cuda)");
      }
      out.onnx_std = dir / files.at("std").get<std::string>();
      out.onnx_trt = dir / files.at("trt").get<std::string>();
      if (files.contains("cuda")) out.onnx_cuda = dir / files.at("cuda").get<std::string>();
      b->groups.push_back(std::move(out));
    }
  } catch (const json::exception& e) {
    throw BundleError(mname + ": malformed manifest (" + e.what() + ")");
  } catch (const BundleError&) {
    throw;
  } catch (const Error& e) {
    throw BundleError(mname + ": malformed manifest (" + e.what() + ")");
  }

  // ---- consistency: the same rules as dyc/bundle.py's _check_consistency ----
  const ModelConfig& cfg = b->config;
  const int H = cfg.num_heads, L = cfg.depth;
  if (b->arch_of_t.size() != static_cast<std::size_t>(kNumTrainTimesteps) ||
      std::any_of(b->arch_of_t.begin(), b->arch_of_t.end(),
                  [&](int a) { return a < 0 || a >= static_cast<int>(b->architectures.size()); })) {
    throw b->fail("masks.arch_of_t must hold " + std::to_string(kNumTrainTimesteps) +
                  " indices into masks.architectures");
  }
  for (std::size_t i = 0; i < b->architectures.size(); ++i) {
    for (const auto* bits : {&b->architectures[i].head, &b->architectures[i].channel}) {
      const bool ok = bits->size() == static_cast<std::size_t>(L) &&
                      std::all_of(bits->begin(), bits->end(),
                                  [&](std::uint64_t v) { return v < (std::uint64_t{1} << H) && (v & 1); });
      if (!ok) {
        throw b->fail("architecture " + std::to_string(i) + ": one " + std::to_string(H) +
                      "-bit mask per layer with head/group 0 on");
      }
    }
  }
  if (b->groups.empty()) throw b->fail("no groups");
  int expect = 0;
  for (std::size_t i = 0; i < b->groups.size(); ++i) {
    const Group& g = b->groups[i];
    const std::string gname = "group " + std::to_string(i);
    if (g.index != static_cast<int>(i) || g.t_lo != expect || g.t_hi < g.t_lo || g.t_hi >= kNumTrainTimesteps) {
      throw b->fail(gname + ": groups must tile t = 0.." + std::to_string(kNumTrainTimesteps - 1) +
                    " in order (t_lo " + std::to_string(g.t_lo) + ")");
    }
    expect = g.t_hi + 1;
    std::set<int> members(b->arch_of_t.begin() + g.t_lo, b->arch_of_t.begin() + g.t_hi + 1);
    if (g.heads.size() != static_cast<std::size_t>(L) || g.channels.size() != static_cast<std::size_t>(L) ||
        g.vary_head.size() != static_cast<std::size_t>(L) || g.vary_channel.size() != static_cast<std::size_t>(L)) {
      throw b->fail(gname + ": heads, channels and vary flags need one entry per layer");
    }
    for (int l = 0; l < L; ++l) {
      for (int kind = 0; kind < 2; ++kind) {
        const auto& units = kind == 0 ? g.heads[l] : g.channels[l];
        const bool vary = kind == 0 ? g.vary_head[l] : g.vary_channel[l];
        std::uint64_t uni = 0;
        bool differ = false;
        std::uint64_t first = 0;
        bool have_first = false;
        for (int a : members) {
          const std::uint64_t bits = (kind == 0 ? b->architectures[a].head : b->architectures[a].channel)[l];
          uni |= bits;
          if (have_first && bits != first) differ = true;
          if (!have_first) first = bits, have_first = true;
        }
        std::vector<int> expect_units;
        for (int u = 0; u < H; ++u) {
          if (uni >> u & 1) expect_units.push_back(u);
        }
        const char* what = kind == 0 ? "head" : "channel";
        // slot order is the sliced weights' order (the compiler may sort units, e.g. by use), so
        // compare as sets, and refuse duplicates
        std::vector<int> sorted_units = units;
        std::sort(sorted_units.begin(), sorted_units.end());
        if (sorted_units != expect_units ||
            std::adjacent_find(sorted_units.begin(), sorted_units.end()) != sorted_units.end()) {
          throw b->fail(gname + " layer " + std::to_string(l) + ": " + what + "s are not the union of its members");
        }
        if (vary != differ) throw b->fail(gname + " layer " + std::to_string(l) + ": vary_" + what + " flag is wrong");
      }
    }
  }
  if (expect != kNumTrainTimesteps) {
    throw b->fail("groups end at t=" + std::to_string(expect - 1) + ", not " + std::to_string(kNumTrainTimesteps - 1));
  }
  b->group_of_t.assign(kNumTrainTimesteps, -1);
  for (const Group& g : b->groups) {
    std::fill(b->group_of_t.begin() + g.t_lo, b->group_of_t.begin() + g.t_hi + 1, g.index);
  }

  // ---- files: present, of the recorded size, and (by default) of the recorded sha256 ----
  try {
    const json& table = m.at("files");
    std::vector<std::string> missing;
    for (const auto& f : group_files) {
      if (!table.contains(f)) missing.push_back(f);
    }
    if (!missing.empty()) {
      std::string names;
      for (const auto& f : missing) names += (names.empty() ? "" : ", ") + f;
      throw b->fail("group files missing from the file table: " + names);
    }
    for (auto it = table.begin(); it != table.end(); ++it) {
      const std::string& name = it.key();
      const fs::path p = dir / name;
      if (fs::path(name).filename().string() != name || name == "." || name == "..") {
        throw b->fail("file name '" + name + "' is not a plain name inside the bundle");
      }
      if (!fs::is_regular_file(p)) throw BundleError(dir.string() + ": bundle file " + name + " is missing");
      const auto size = fs::file_size(p);
      const auto want = it.value().at("bytes").get<std::uint64_t>();
      if (size != want) {
        throw BundleError(dir.string() + ": bundle file " + name + " has " + std::to_string(size) +
                          " bytes, expected " + std::to_string(want));
      }
      const std::string sha = it.value().at("sha256").get<std::string>();
      if (verify_checksums && detail::sha256_file(p) != sha) {
        throw BundleError(dir.string() + ": bundle file " + name + " was altered (sha256 mismatch)");
      }
      b->files[name] = {want, sha};
    }
  } catch (const json::exception& e) {
    throw BundleError(mname + ": malformed manifest (" + e.what() + ")");
  }
  return Bundle(std::move(b));
}

const fs::path& Bundle::path() const { return impl_->path; }
const ModelConfig& Bundle::config() const { return impl_->config; }
Dtype Bundle::dtype() const { return impl_->dtype; }
const std::vector<Group>& Bundle::groups() const { return impl_->groups; }
const std::string& Bundle::manifest_sha256() const { return impl_->manifest_sha256; }

Bundle::FileInfo Bundle::file_info(const std::string& name) const {
  const auto it = impl_->files.find(name);
  if (it == impl_->files.end()) {
    throw BundleError(impl_->path.string() + ": " + name + " is not in the manifest's file table");
  }
  return it->second;
}

const Group& Bundle::group_for_t(int t) const {
  if (t < 0 || t >= kNumTrainTimesteps) {
    throw Error("timestep " + std::to_string(t) + " is outside every group of " + impl_->path.filename().string() +
                " (groups cover 0.." + std::to_string(kNumTrainTimesteps - 1) + ")");
  }
  return impl_->groups[static_cast<std::size_t>(impl_->group_of_t[static_cast<std::size_t>(t)])];
}

namespace {

// [L, slots]: slot j of layer l = t's bit of unit layout[l][j]; unused slots 0 (ignored by the graph)
std::vector<float> slot_masks(const std::vector<std::uint64_t>& bits, const std::vector<std::vector<int>>& layout,
                              int slots) {
  std::vector<float> out(layout.size() * static_cast<std::size_t>(slots), 0.0f);
  for (std::size_t l = 0; l < layout.size(); ++l) {
    for (std::size_t j = 0; j < layout[l].size(); ++j) {
      out[l * static_cast<std::size_t>(slots) + j] = static_cast<float>((bits[l] >> layout[l][j]) & 1);
    }
  }
  return out;
}

}  // namespace

std::vector<float> Bundle::head_mask(int t) const {
  const Group& g = group_for_t(t);
  if (!g.needs_head_mask) return {};
  const auto& a = impl_->architectures[static_cast<std::size_t>(impl_->arch_of_t[static_cast<std::size_t>(t)])];
  return slot_masks(a.head, g.heads, g.head_slots);
}

std::vector<float> Bundle::channel_mask(int t) const {
  const Group& g = group_for_t(t);
  if (!g.needs_channel_mask) return {};
  const auto& a = impl_->architectures[static_cast<std::size_t>(impl_->arch_of_t[static_cast<std::size_t>(t)])];
  return slot_masks(a.channel, g.channels, g.channel_slots);
}

}  // namespace dyc
