// Timestep respacing and the DDIM / DPM-Solver++ (2M) samplers, ported from dyc/timesteps.py and
// dyc/runtime/samplers.py. The step coefficients are computed in double from float64 tables and
// rounded to float once, then applied to float32 latents in the same operation order as the
// Python runtime (which casts each float64 coefficient to the latents' dtype), so a C++ chain and
// a Python chain fed the same model outputs give the same latents up to float rounding.
// This file is compiled with -ffp-contract=off: a fused multiply-add would round differently.
#include <algorithm>
#include <cctype>
#include <cmath>
#include <string>
#include <utility>

#include "dyc/runtime.hpp"

namespace dyc {
namespace {

// len(range(0, n, stride)) in Python
int range_len(int n, int stride) { return (n + stride - 1) / stride; }

int parse_int(const std::string& s, const std::string& what) {
  std::size_t used = 0;
  int v = 0;
  try {
    v = std::stoi(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || s.empty()) throw Error(what + ": '" + s + "' is not an integer");
  return v;
}

}  // namespace

std::vector<int> space_timesteps(int num_timesteps, const std::string& section_counts) {
  const int T = num_timesteps;
  std::vector<int> steps;
  if (section_counts.rfind("ddim", 0) == 0) {
    const int desired = parse_int(section_counts.substr(4), "timestep respacing");
    for (int stride = 1; stride < T; ++stride) {
      if (range_len(T, stride) == desired) {
        for (int t = 0; t < T; t += stride) steps.push_back(t);
        return steps;
      }
    }
    throw Error("cannot take exactly " + std::to_string(desired) + " DDIM steps from " + std::to_string(T) +
                " with an integer stride");
  }
  std::vector<int> counts;
  std::size_t pos = 0;
  while (true) {
    const std::size_t comma = section_counts.find(',', pos);
    counts.push_back(parse_int(section_counts.substr(pos, comma - pos), "timestep respacing"));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  const int n = static_cast<int>(counts.size());
  const int size_per = T / n, extra = T % n;
  int start = 0;
  for (int i = 0; i < n; ++i) {
    const int size = size_per + (i < extra ? 1 : 0), count = counts[i];
    if (size < count) {
      throw Error("cannot take " + std::to_string(count) + " steps from a section of " + std::to_string(size) +
                  " timesteps");
    }
    const double stride = count <= 1 ? 1.0 : double(size - 1) / double(count - 1);
    double cur = 0.0;
    for (int k = 0; k < count; ++k) {
      // Python's round() rounds half to even, as nearbyint does in the default rounding mode
      steps.push_back(start + static_cast<int>(std::nearbyint(cur)));
      cur += stride;
    }
    start += size;
  }
  std::sort(steps.begin(), steps.end());
  steps.erase(std::unique(steps.begin(), steps.end()), steps.end());  // Python returns a set
  return steps;
}

std::vector<int> sampler_timesteps(SamplerKind kind, int steps, int num_timesteps) {
  if (steps <= 0) throw Error("steps must be positive, got " + std::to_string(steps));
  if (steps > num_timesteps) {
    throw Error("steps must be at most " + std::to_string(num_timesteps) + ", got " + std::to_string(steps));
  }
  std::string spec = std::to_string(steps);
  if (kind == SamplerKind::ddim) {
    for (int s = 1; s < num_timesteps; ++s) {
      if (range_len(num_timesteps, s) == steps) {
        spec = "ddim" + spec;
        break;
      }
    }
  }
  std::vector<int> ts = space_timesteps(num_timesteps, spec);
  std::reverse(ts.begin(), ts.end());
  return ts;
}

std::vector<double> linear_alphas_cumprod(int num_timesteps) {
  // numpy.linspace(start, stop, n): i * step + start, the last element exactly stop
  const double scale = 1000.0 / num_timesteps, start = scale * 1e-4, stop = scale * 0.02;
  const int n = num_timesteps;
  std::vector<double> acp(static_cast<std::size_t>(n));
  const double step = n > 1 ? (stop - start) / double(n - 1) : 0.0;
  double prod = 1.0;
  for (int i = 0; i < n; ++i) {
    const double beta = (n > 1 && i == n - 1) ? stop : double(i) * step + start;
    prod *= 1.0 - beta;
    acp[static_cast<std::size_t>(i)] = prod;
  }
  return acp;
}

SamplerKind parse_sampler(const std::string& name) {
  std::string s = name;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  if (s == "ddim") return SamplerKind::ddim;
  if (s == "dpm-solver++" || s == "dpmsolver++" || s == "dpm++" || s == "dpmpp") return SamplerKind::dpm_solver_pp;
  if (s == "ddpm") {
    throw Error("sampler 'ddpm' draws noise from torch's generator and is not offered in C++: "
                "choose ddim or dpm-solver++");
  }
  throw Error("unknown sampler '" + name + "': choose one of ddim, dpm-solver++");
}

std::string to_string(SamplerKind kind) { return kind == SamplerKind::ddim ? "ddim" : "dpm-solver++"; }

Sampler::Sampler(std::vector<int> timesteps) : timesteps_(std::move(timesteps)) {
  if (timesteps_.empty()) throw Error("a sampler needs at least one step");
  for (std::size_t i = 1; i < timesteps_.size(); ++i) {
    if (timesteps_[i - 1] <= timesteps_[i]) throw Error("sampler timesteps must be strictly decreasing");
  }
  const std::vector<double> acp = linear_alphas_cumprod();
  if (timesteps_.front() >= static_cast<int>(acp.size()) || timesteps_.back() < 0) {
    throw Error("sampler timesteps must lie in 0.." + std::to_string(acp.size() - 1));
  }
  for (int t : timesteps_) acp_.push_back(acp[static_cast<std::size_t>(t)]);
  acp_next_.assign(acp_.begin() + 1, acp_.end());
  acp_next_.push_back(1.0);
}

namespace {

inline float f32(double v) { return static_cast<float>(v); }

void check_sizes(const std::vector<float>& x, const std::vector<float>& eps) {
  if (x.size() != eps.size()) {
    throw Error("sampler step: eps has " + std::to_string(eps.size()) + " values for " + std::to_string(x.size()) +
                " latents");
  }
}

class DdimSampler final : public Sampler {
 public:
  explicit DdimSampler(std::vector<int> ts) : Sampler(std::move(ts)) {}

  void step(std::size_t i, std::vector<float>& x, const std::vector<float>& eps) override {
    check_sizes(x, eps);
    const double a = acp_.at(i), ap = acp_next_.at(i);
    const float c_x = f32(std::sqrt(1.0 / a)), c_eps = f32(std::sqrt(1.0 / a - 1.0));
    // alpha-bar_prev is rounded to float first and its roots taken in float, as the Python runtime
    // (and improved-DDPM's reference, which casts its tables to the latents' dtype) does
    const float apf = f32(ap);
    const float c_x0 = std::sqrt(apf), c_dir = std::sqrt(1.0f - apf);
    for (std::size_t k = 0; k < x.size(); ++k) {
      const float x0 = c_x * x[k] - c_eps * eps[k];
      // eps re-derived from x0, as improved-DDPM's ddim_sample (and the Python runtime) do
      const float e = (c_x * x[k] - x0) / c_eps;
      x[k] = x0 * c_x0 + c_dir * e;
    }
  }
};

class DpmSolverPPSampler final : public Sampler {
 public:
  explicit DpmSolverPPSampler(std::vector<int> ts) : Sampler(std::move(ts)) {
    for (double a : acp_) {
      alpha_.push_back(std::sqrt(a));
      sigma_.push_back(std::sqrt(1.0 - a));
      lam_.push_back(std::log(alpha_.back()) - std::log(sigma_.back()));
    }
  }

  // Call i goes from t_i to t_{i+1}; the first call is first order (no history), the last goes to
  // sigma = 0 and returns the data prediction; in between the 2M midpoint correction.
  void step(std::size_t i, std::vector<float>& x, const std::vector<float>& eps) override {
    check_sizes(x, eps);
    const float c_sigma = f32(sigma_.at(i)), c_alpha = f32(alpha_.at(i));
    std::vector<float> x0(x.size());
    for (std::size_t k = 0; k < x.size(); ++k) x0[k] = (x[k] - c_sigma * eps[k]) / c_alpha;
    std::vector<float> prev = std::move(prev_x0_);
    prev_x0_ = x0;
    if (i == 0) prev.clear();
    if (i + 1 == timesteps_.size()) {
      prev_x0_.clear();
      x = std::move(x0);
      return;
    }
    const double h = lam_[i + 1] - lam_[i];
    const double phi = std::expm1(-h);
    const float c_x = f32(sigma_[i + 1] / sigma_[i]), c_x0 = f32(alpha_[i + 1] * phi);
    if (prev.empty()) {
      for (std::size_t k = 0; k < x.size(); ++k) x[k] = c_x * x[k] - c_x0 * x0[k];
      return;
    }
    if (prev.size() != x.size()) throw Error("dpm-solver++: the batch changed between steps");
    const float c_r = f32((lam_[i] - lam_[i - 1]) / h), c_d = f32(0.5 * alpha_[i + 1] * phi);
    for (std::size_t k = 0; k < x.size(); ++k) {
      const float xn = c_x * x[k] - c_x0 * x0[k];
      const float d1 = (x0[k] - prev[k]) / c_r;
      x[k] = xn - c_d * d1;
    }
  }

 private:
  std::vector<double> alpha_, sigma_, lam_;
  std::vector<float> prev_x0_;
};

}  // namespace

std::unique_ptr<Sampler> make_sampler(SamplerKind kind, int steps) {
  std::vector<int> ts = sampler_timesteps(kind, steps);
  if (kind == SamplerKind::ddim) return std::make_unique<DdimSampler>(std::move(ts));
  return std::make_unique<DpmSolverPPSampler>(std::move(ts));
}

// ---- the sampling loop -----------------------------------------------------------------------

namespace {

// [L, slots] per-t mask -> [B, L, slots]: every image of the batch runs the same t
std::vector<float> broadcast_batch(const std::vector<float>& m, std::size_t batch) {
  std::vector<float> out;
  out.reserve(m.size() * batch);
  for (std::size_t b = 0; b < batch; ++b) out.insert(out.end(), m.begin(), m.end());
  return out;
}

}  // namespace

Tensor sample(Engine& engine, const Bundle& bundle, const Tensor& noise, const std::vector<std::int64_t>& classes,
              const SampleOptions& options) {
  const ModelConfig& cfg = bundle.config();
  const auto& s = noise.shape;
  if (s.size() != 4 || s[1] != cfg.in_channels || s[2] != cfg.input_size || s[3] != cfg.input_size) {
    std::string got;
    for (auto d : s) got += (got.empty() ? "" : ", ") + std::to_string(d);
    throw Error("noise must have shape [B, " + std::to_string(cfg.in_channels) + ", " +
                std::to_string(cfg.input_size) + ", " + std::to_string(cfg.input_size) + "] for this bundle, got [" +
                got + "]");
  }
  const std::size_t batch = static_cast<std::size_t>(s[0]);
  if (batch == 0) throw Error("noise has an empty batch");
  if (classes.size() != batch) {
    throw Error(std::to_string(classes.size()) + " class ids for a batch of " + std::to_string(batch) +
                " noise samples: give one class per sample");
  }
  for (auto c : classes) {
    // as the Python pipeline: the null class is for guidance only, never a requested class
    if (c < 0 || c >= cfg.num_classes) {
      throw Error("class id " + std::to_string(c) + " is out of range: this model has classes 0.." +
                  std::to_string(cfg.num_classes - 1));
    }
  }
  if (!(options.cfg_scale >= 0.0f) || !std::isfinite(options.cfg_scale)) {
    throw Error("cfg scale must be a finite number >= 0");
  }
  std::unique_ptr<Sampler> sampler = make_sampler(options.sampler, options.steps);
  const bool guided = options.cfg_scale != 1.0f;
  // check the whole schedule before the first (possibly long) model call
  for (int t : sampler->timesteps()) bundle.group_for_t(t);

  const std::size_t per_image = noise.numel() / batch;
  const std::size_t c_in = static_cast<std::size_t>(cfg.in_channels);
  const std::size_t hw = per_image / c_in;
  const std::size_t c_out = static_cast<std::size_t>(cfg.out_channels());
  const std::size_t model_batch = guided ? 2 * batch : batch;

  std::vector<float> x = noise.data;
  Tensor xin({static_cast<std::int64_t>(model_batch), s[1], s[2], s[3]});
  std::vector<float> eps(x.size());
  ModelInputs in;
  in.x = &xin;
  in.y = classes;
  if (guided) in.y.insert(in.y.end(), batch, static_cast<std::int64_t>(cfg.null_class()));  // cond half first

  for (std::size_t i = 0; i < sampler->timesteps().size(); ++i) {
    const int t = sampler->timesteps()[i];
    const Group& g = bundle.group_for_t(t);
    std::copy(x.begin(), x.end(), xin.data.begin());
    if (guided) std::copy(x.begin(), x.end(), xin.data.begin() + static_cast<std::ptrdiff_t>(x.size()));
    in.t.assign(model_batch, t);
    in.head_mask = g.needs_head_mask ? broadcast_batch(bundle.head_mask(t), model_batch) : std::vector<float>{};
    in.channel_mask =
        g.needs_channel_mask ? broadcast_batch(bundle.channel_mask(t), model_batch) : std::vector<float>{};

    const Tensor out = engine.run(g, in);
    if (out.numel() != model_batch * c_out * hw) {
      throw Error(engine.name() + ": group " + std::to_string(g.index) + " returned " +
                  std::to_string(out.numel()) + " values, expected " + std::to_string(model_batch * c_out * hw));
    }
    // the eps channels of the (guided) output; variance channels are not used by these samplers
    const std::size_t guided_ch = options.official_cfg ? std::min<std::size_t>(3, c_in) : c_in;
    const float scale = options.cfg_scale;
    for (std::size_t b = 0; b < batch; ++b) {
      for (std::size_t c = 0; c < c_in; ++c) {
        const float* cond = out.data.data() + (b * c_out + c) * hw;
        float* e = eps.data() + (b * c_in + c) * hw;
        if (!guided || c >= guided_ch) {
          std::copy(cond, cond + hw, e);
          continue;
        }
        const float* uncond = out.data.data() + ((batch + b) * c_out + c) * hw;
        for (std::size_t k = 0; k < hw; ++k) e[k] = uncond[k] + scale * (cond[k] - uncond[k]);
      }
    }
    sampler->step(i, x, eps);
    if (options.on_step) options.on_step(i, t, g.index);
  }
  Tensor result;
  result.shape = s;
  result.data = std::move(x);
  return result;
}

}  // namespace dyc
