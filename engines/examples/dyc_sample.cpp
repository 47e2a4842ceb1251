// dyc_sample: class-conditional sampling from a compiled bundle, the C++ counterpart of `dyc run`.
//
//   dyc_sample BUNDLE --sampler ddim --steps 50 --cfg 4 --classes 207,360 --noise noise.npy --out latents.npy
//
// With the same noise file, the final latents equal those of
//   dyc run BUNDLE --sampler ddim --steps 50 --cfg 4 --classes 207,360 --noise noise.npy --save-latents ...
// Errors are one line on stderr and exit status 1 (2 for a bad command line).
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <string>

#include <unistd.h>

#include "dyc/runtime.hpp"

namespace {

// Peak resident set of this process (Linux: VmHWM, which starts afresh at exec), -1 elsewhere.
long long peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  }
  return -1;
}

constexpr const char* kUsage =
    "usage: dyc_sample BUNDLE [--sampler ddim|dpm-solver++] [--steps N] [--cfg S] [--cfg-official]\n"
    "                  --classes C1,C2,... [--noise NOISE.npy | --seed N] --out LATENTS.npy\n"
    "                  [--engine onnxruntime|tensorrt] [--threads N] [--no-verify]\n"
    "                  [--custom-op-library LIB.so] [--plugin-library LIB.so] [--quiet]\n"
    "                  [--device cpu|cuda[:I]] [--variant std|trt|cuda] [--no-cuda-graphs] [--no-share-weights]\n"
    "                  [--no-share-arena] [--timing TIMES.json]\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::vector<std::int64_t> parse_classes(const std::string& s) {
  std::vector<std::int64_t> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = s.find(',', pos);
    const std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(tok, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (tok.empty() || used != tok.size()) throw UsageError("--classes: '" + tok + "' is not an integer");
    out.push_back(v);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

int to_int(const std::string& flag, const std::string& v) {
  std::size_t used = 0;
  int r = 0;
  try {
    r = std::stoi(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (v.empty() || used != v.size()) throw UsageError(flag + ": '" + v + "' is not an integer");
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string bundle_dir, noise_path, out_path, engine_name = "onnxruntime", classes_arg, timing_path;
  dyc::SampleOptions opt;
  opt.cfg_scale = 4.0f;  // the defaults of `dyc run`: cfg 4, 50 DDIM / 20 DPM-Solver++ steps
  int steps = 0;
  dyc::OnnxRuntimeOptions ort;
  dyc::TensorRTOptions trt;
  std::vector<std::int64_t> classes;
  bool verify = true, quiet = false, have_seed = false, progress_shown = false;
  unsigned seed = 0;
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    for (std::size_t i = 0; i < args.size(); ++i) {
      const std::string& a = args[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= args.size()) throw UsageError(a + " needs a value");
        return args[++i];
      };
      if (a == "-h" || a == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (a == "--sampler") {
        opt.sampler = dyc::parse_sampler(value());
      } else if (a == "--steps") {
        steps = to_int(a, value());
        if (steps <= 0) throw UsageError("--steps must be positive, got " + std::to_string(steps));
      } else if (a == "--cfg") {
        const std::string v = value();
        try {
          std::size_t used = 0;
          opt.cfg_scale = std::stof(v, &used);
          if (used != v.size()) throw std::invalid_argument(v);
        } catch (const std::exception&) {
          throw UsageError("--cfg: '" + v + "' is not a number");
        }
      } else if (a == "--cfg-official" || a == "--official-cfg") {
        opt.official_cfg = true;
      } else if (a == "--classes") {
        classes_arg = value();
      } else if (a == "--noise") {
        noise_path = value();
      } else if (a == "--seed") {
        seed = static_cast<unsigned>(to_int(a, value()));
        have_seed = true;
      } else if (a == "--out") {
        out_path = value();
      } else if (a == "--engine") {
        engine_name = value();
      } else if (a == "--threads") {
        ort.intra_op_threads = to_int(a, value());
      } else if (a == "--no-verify") {
        verify = false;
      } else if (a == "--custom-op-library") {
        ort.custom_op_library = value();
      } else if (a == "--plugin-library") {
        trt.plugin_library = value();
      } else if (a == "--device") {
        const std::string d = value();
        if (d == "cpu") {
          ort.cuda = false;
        } else if (d.rfind("cuda", 0) == 0) {
          ort.cuda = true;
          if (d.size() > 4) {
            if (d[4] != ':') throw UsageError("--device: '" + d + "' is not cpu or cuda[:I]");
            try {
              ort.device = std::stoi(d.substr(5));
            } catch (const std::exception&) {
              throw UsageError("--device: '" + d + "' is not cpu or cuda[:I]");
            }
          }
        } else {
          throw UsageError("--device: '" + d + "' is not cpu or cuda[:I]");
        }
      } else if (a == "--variant") {
        ort.variant = value();
      } else if (a == "--no-cuda-graphs") {
        ort.cuda_graphs = false;
      } else if (a == "--no-share-weights") {
        ort.share_weights = false;
      } else if (a == "--no-share-arena") {
        ort.share_arena = false;
      } else if (a == "--timing") {
        timing_path = value();
      } else if (a == "--quiet") {
        quiet = true;
      } else if (!a.empty() && a[0] == '-') {
        throw UsageError("unknown option " + a);
      } else if (bundle_dir.empty()) {
        bundle_dir = a;
      } else {
        throw UsageError("unexpected argument " + a);
      }
    }
    opt.steps = steps > 0 ? steps : (opt.sampler == dyc::SamplerKind::ddim ? 50 : 20);
    if (bundle_dir.empty()) throw UsageError("give the BUNDLE directory");
    if (classes_arg.empty()) throw UsageError("give --classes");
    classes = parse_classes(classes_arg);
    if (out_path.empty()) throw UsageError("give --out LATENTS.npy");
    if (!noise_path.empty() && have_seed) throw UsageError("give --noise or --seed, not both");
    if (engine_name != "onnxruntime" && engine_name != "tensorrt") {
      throw UsageError("--engine: choose onnxruntime or tensorrt, not '" + engine_name + "'");
    }
  } catch (const UsageError& e) {
    std::cerr << "dyc_sample: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const dyc::Error& e) {
    std::cerr << "dyc_sample: " << e.what() << "\n";
    return 2;
  }

  try {
    const auto t0 = std::chrono::steady_clock::now();
    const dyc::Bundle bundle = dyc::Bundle::load(bundle_dir, verify);
    dyc::Tensor noise;
    if (!noise_path.empty()) {
      noise = dyc::read_npy(noise_path);
    } else {
      const auto& c = bundle.config();
      noise = dyc::Tensor({static_cast<std::int64_t>(classes.size()), c.in_channels, c.input_size, c.input_size});
      std::mt19937 gen(seed);
      std::normal_distribution<float> normal;
      for (float& v : noise.data) v = normal(gen);
    }
    std::unique_ptr<dyc::Engine> engine =
        engine_name == "tensorrt" ? dyc::make_tensorrt_engine(bundle, trt) : dyc::make_onnxruntime_engine(bundle, ort);
    const bool show = !quiet && isatty(STDERR_FILENO);  // a progress line for people, nothing in logs
    std::vector<double> step_ms;  // wall time of each step: engine call(s) and sampler update
    auto last = std::chrono::steady_clock::now();
    const auto load_ms = std::chrono::duration<double, std::milli>(last - t0).count();
    opt.on_step = [&](std::size_t i, int t, int group) {
      const auto now = std::chrono::steady_clock::now();
      step_ms.push_back(std::chrono::duration<double, std::milli>(now - last).count());
      last = now;
      if (show) {
        std::cerr << "\rstep " << (i + 1) << "/" << opt.steps << " t=" << t << " group " << group << "   " << std::flush;
        progress_shown = true;
      }
    };
    const dyc::Tensor latents = dyc::sample(*engine, bundle, noise, classes, opt);
    if (!timing_path.empty()) {
      std::ofstream f(timing_path);
      f << "{\"engine\": \"" << engine->name() << "\", \"load_ms\": " << load_ms
        << ", \"peak_rss_bytes\": " << peak_rss_bytes() << ", \"step_ms\": [";
      for (std::size_t i = 0; i < step_ms.size(); ++i) f << (i ? ", " : "") << step_ms[i];
      f << "]}\n";
      if (!f) throw dyc::Error("cannot write " + timing_path);
    }
    dyc::write_npy(out_path, latents);
    if (!quiet) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cerr << (progress_shown ? "\n" : "") << bundle.groups().size() << " group(s), " << engine->name() << ", "
                << dyc::to_string(opt.sampler) << " " << opt.steps << " steps, cfg " << opt.cfg_scale << ": wrote "
                << out_path << " (" << s << " s)\n";
    }
  } catch (const dyc::Error& e) {
    if (progress_shown) std::cerr << "\n";
    std::cerr << "dyc_sample: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "dyc_sample: internal error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
