// TensorRT engine: deserializes the bundle's per-group plans with the standard TensorRT 10 runtime
// API. The plans and what they were built for are described by the sidecar engines/trt_manifest.json
// that `dyc build-engines` writes (dyc/tensorrt/build.py); the checks are those of the Python
// TensorRT backend (dyc/tensorrt/runtime.py). Written against NvInfer.h's public API only, so it builds with
// datacenter TensorRT (and TensorRT-RTX, whose runtime API is the same for these calls).
//
// Groups run one after another, so every execution context uses one shared activation buffer
// (kUSER_MANAGED allocation, sized for the largest plan), as DESIGN.md §5 asks.
#include <NvInfer.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>

#include <cstdlib>

#include <nlohmann/json.hpp>

#include "dyc/runtime.hpp"
#include "half.hpp"
#include "sha256.hpp"

namespace dyc {

bool has_tensorrt() { return true; }

namespace {

void cuda_check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw Error(std::string("CUDA: ") + what + " failed (" + cudaGetErrorString(rc) + ")");
}

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    // keep the last error: it becomes part of the exception message when a call fails
    if (severity <= Severity::kERROR) last_error = msg;
  }
  std::string last_error;
};

// RAII device allocation
struct DeviceBuffer {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { if (ptr) cudaFree(ptr); }
  void reserve(std::size_t n) {
    if (n <= bytes) return;
    if (ptr) cudaFree(ptr);
    ptr = nullptr;
    cuda_check(cudaMalloc(&ptr, n), "cudaMalloc");
    bytes = n;
  }
};

struct StreamDeleter {
  void operator()(CUstream_st* s) const { cudaStreamDestroy(s); }
};

struct LibraryCloser {
  void operator()(void* h) const { dlclose(h); }
};

std::size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kINT64: return 8;
    default: throw Error("TensorRT: a plan I/O tensor has a data type this runtime does not feed");
  }
}

class TensorRTEngine final : public Engine {
 public:
  TensorRTEngine(const Bundle& bundle, const TensorRTOptions& opt) : cfg_(bundle.config()) {
    namespace fs = std::filesystem;
    const std::string where = bundle.path().string();
    const std::string hint = "rebuild them with: dyc build-engines " + where;
    const fs::path side = bundle.path() / "engines" / "trt_manifest.json";
    if (!fs::is_regular_file(side)) {
      throw Error(where + ": has no TensorRT engines (engines/trt_manifest.json is missing); build them with: "
                  "dyc build-engines " + where);
    }
    nlohmann::json m;
    try {
      std::ifstream f(side);
      m = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      throw Error(side.string() + ": not valid JSON (" + e.what() + "); " + hint);
    }
    std::vector<fs::path> plans(bundle.groups().size());
    std::vector<nlohmann::json> entries(bundle.groups().size());
    std::string sdt_form, recorded_plugin;
    try {
      if (m.value("schema_version", 0) != 1) throw Error(side.string() + ": unknown engine manifest schema; " + hint);
      if (m.value("bundle_manifest_sha256", std::string()) != bundle.manifest_sha256()) {
        throw Error(where + ": its TensorRT engines were built for an earlier compile of this bundle; " + hint);
      }
      const std::string flavor = m.value("flavor", std::string());
      const std::string built = m.value("tensorrt_version", std::string());
      const std::string here = std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) + "." +
                               std::to_string(NV_TENSORRT_PATCH);
      // plans load only in the TensorRT that built them; the recorded version may add a build number
      if (built != here && built.rfind(here + ".", 0) != 0) {
        throw Error(where + ": its engines were built with " + flavor + " " + built + " but this runtime links " +
                    "TensorRT " + here + "; TensorRT plans load only in the version that built them: " + hint);
      }
      cuda_check(cudaSetDevice(opt.device), "cudaSetDevice");
      cudaDeviceProp prop{};
      cuda_check(cudaGetDeviceProperties(&prop, opt.device), "cudaGetDeviceProperties");
      const std::string cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
      std::vector<std::string> targets;
      if (m.contains("target_compute_capabilities") && m["target_compute_capabilities"].is_array()) {
        targets = m["target_compute_capabilities"].get<std::vector<std::string>>();
      } else if (flavor == "tensorrt" && m.contains("built_on") && m["built_on"].is_object() &&
                 m["built_on"].value("gpu_compute_capability", nlohmann::json()).is_string()) {
        targets = {m["built_on"]["gpu_compute_capability"].get<std::string>()};
      }
      if (flavor == "tensorrt_rtx" && cc == "9.0") {
        throw Error(where + ": its engines were built with TensorRT-RTX, which does not run on compute capability "
                    "9.0 (" + std::string(prop.name) + "): rebuild them with --trt-flavor tensorrt");
      }
      if (!targets.empty() && std::find(targets.begin(), targets.end(), cc) == targets.end()) {
        std::string list;
        for (const auto& t : targets) list += (list.empty() ? "" : ", ") + t;
        throw Error(where + ": its TensorRT engines were built for compute capability " + list + "; this GPU (" +
                    prop.name + ") is " + cc + "; " + hint);
      }
      sdt_form = m.value("sdt_form", std::string());
      if (m.contains("plugin") && m["plugin"].is_object()) recorded_plugin = m["plugin"].value("library", std::string());
      for (const auto& e : m.at("engines")) {
        const int gi = e.at("group").get<int>();
        if (gi < 0 || gi >= static_cast<int>(plans.size())) continue;
        plans[static_cast<std::size_t>(gi)] = bundle.path() / e.at("plan").get<std::string>();
        entries[static_cast<std::size_t>(gi)] = e;
      }
    } catch (const nlohmann::json::exception& e) {
      throw Error(side.string() + ": malformed engine manifest (" + e.what() + "); " + hint);
    }
    for (std::size_t gi = 0; gi < plans.size(); ++gi) {
      if (plans[gi].empty()) throw Error(where + ": no TensorRT engine for group " + std::to_string(gi) + "; " + hint);
      if (!fs::is_regular_file(plans[gi])) throw Error(where + ": TensorRT plan " + plans[gi].string() + " is missing; " + hint);
      if (opt.verify_plans && detail::sha256_file(plans[gi]) != entries[gi].value("sha256", std::string())) {
        throw Error(where + ": TensorRT plan " + plans[gi].string() + " does not match its engine manifest (altered?); " + hint);
      }
    }
    if (sdt_form == "plugin") {
      // the plugin library registers the SdtMlp creator from a static initialiser
      fs::path lib = opt.plugin_library;
      if (lib.empty() && std::getenv("DYC_TRT_PLUGIN")) lib = std::getenv("DYC_TRT_PLUGIN");
      if (lib.empty() && !recorded_plugin.empty() && fs::is_regular_file(recorded_plugin)) lib = recorded_plugin;
      if (lib.empty()) {
        throw Error(where + ": its engines use the SdtMlp TensorRT plugin, built at " + recorded_plugin +
                    ", which is not here: set TensorRTOptions::plugin_library (or $DYC_TRT_PLUGIN), or rebuild the "
                    "engines with --sdt dense");
      }
      plugins_.reset(dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL));
      if (!plugins_) throw Error(lib.string() + ": cannot load the TensorRT plugin library (" + dlerror() + ")");
    }
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error("TensorRT: cannot create the runtime (" + logger_.last_error + ")");
    CUstream_st* s = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    stream_.reset(s);

    std::size_t activation = 0;
    for (const fs::path& plan : plans) {
      std::ifstream f(plan, std::ios::binary);
      const std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
      if (!engine) {
        throw Error(plan.string() + ": TensorRT cannot deserialize it (" + logger_.last_error +
                    "); a plan only runs with the TensorRT version and GPU it was built for");
      }
      activation = std::max<std::size_t>(activation, static_cast<std::size_t>(engine->getDeviceMemorySizeV2()));
      std::unique_ptr<nvinfer1::IExecutionContext> ctx(
          engine->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
      if (!ctx) throw Error("TensorRT: cannot create an execution context (" + logger_.last_error + ")");
      engines_.push_back(std::move(engine));
      contexts_.push_back(std::move(ctx));
    }
    activations_.reserve(std::max<std::size_t>(activation, 1));
    for (auto& ctx : contexts_) ctx->setDeviceMemoryV2(activations_.ptr, static_cast<std::int64_t>(activations_.bytes));
  }

  std::string name() const override { return "tensorrt"; }

  Tensor run(const Group& group, const ModelInputs& in) override {
    const auto gi = static_cast<std::size_t>(group.index);
    if (gi >= engines_.size()) throw Error("tensorrt engine: no group " + std::to_string(group.index));
    if (in.x == nullptr || in.x->shape.size() != 4) throw Error("tensorrt engine: x must be [B, C, S, S]");
    nvinfer1::ICudaEngine& engine = *engines_[gi];
    nvinfer1::IExecutionContext& ctx = *contexts_[gi];
    const std::int64_t batch = in.x->shape[0];
    const auto shape_of = [&](const std::string& n) -> std::vector<std::int64_t> {
      if (n == "x") return in.x->shape;
      if (n == "t" || n == "y") return {batch};
      if (n == "head_mask") return {batch, cfg_.depth, group.head_slots};
      if (n == "channel_mask") return {batch, cfg_.depth, group.channel_slots};
      throw Error("group " + std::to_string(group.index) + "'s plan has an input '" + n + "' this runtime does not know");
    };
    std::string out_name;
    for (std::int32_t i = 0; i < engine.getNbIOTensors(); ++i) {
      const std::string n = engine.getIOTensorName(i);
      if (engine.getTensorIOMode(n.c_str()) != nvinfer1::TensorIOMode::kINPUT) {
        out_name = n;
        continue;
      }
      const std::vector<std::int64_t> shape = shape_of(n);
      nvinfer1::Dims dims{};
      dims.nbDims = static_cast<std::int32_t>(shape.size());
      for (std::size_t k = 0; k < shape.size(); ++k) dims.d[k] = shape[k];
      if (!ctx.setInputShape(n.c_str(), dims)) {
        throw Error("TensorRT: group " + std::to_string(group.index) + " rejects input " + n + " of batch " +
                    std::to_string(batch) + " (" + logger_.last_error + "); the plan's optimisation profile "
                    "fixes the batch sizes it runs");
      }
      upload(n, engine.getTensorDataType(n.c_str()), in);
      ctx.setTensorAddress(n.c_str(), buffers_[n].ptr);
    }
    const nvinfer1::DataType out_type = engine.getTensorDataType(out_name.c_str());
    const std::size_t count = static_cast<std::size_t>(batch) * cfg_.out_channels() * cfg_.input_size * cfg_.input_size;
    DeviceBuffer& out = buffers_[out_name];
    out.reserve(count * element_size(out_type));
    ctx.setTensorAddress(out_name.c_str(), out.ptr);
    if (!ctx.enqueueV3(stream_.get())) {
      throw Error("TensorRT: group " + std::to_string(group.index) + " failed to run (" + logger_.last_error + ")");
    }
    std::vector<unsigned char> host(count * element_size(out_type));
    cuda_check(cudaMemcpyAsync(host.data(), out.ptr, host.size(), cudaMemcpyDeviceToHost, stream_.get()), "copy out");
    cuda_check(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
    Tensor result({batch, cfg_.out_channels(), cfg_.input_size, cfg_.input_size});
    for (std::size_t k = 0; k < count; ++k) {
      std::uint16_t h;
      switch (out_type) {
        case nvinfer1::DataType::kFLOAT: std::memcpy(&result.data[k], host.data() + 4 * k, 4); break;
        case nvinfer1::DataType::kHALF: std::memcpy(&h, host.data() + 2 * k, 2); result.data[k] = detail::half_to_float(h); break;
        case nvinfer1::DataType::kBF16: std::memcpy(&h, host.data() + 2 * k, 2); result.data[k] = detail::bf16_to_float(h); break;
        default: throw Error("TensorRT: the plan's output is not a float tensor");
      }
    }
    return result;
  }

 private:
  // host input -> the plan's input type on the device (synchronously ordered on the stream)
  void upload(const std::string& n, nvinfer1::DataType type, const ModelInputs& in) {
    std::vector<unsigned char> host;
    auto put_floats = [&](const std::vector<float>& v) {
      host.resize(v.size() * element_size(type));
      for (std::size_t k = 0; k < v.size(); ++k) {
        if (type == nvinfer1::DataType::kFLOAT) {
          std::memcpy(host.data() + 4 * k, &v[k], 4);
        } else {
          const std::uint16_t h = type == nvinfer1::DataType::kHALF ? detail::float_to_half(v[k]) : detail::float_to_bf16(v[k]);
          std::memcpy(host.data() + 2 * k, &h, 2);
        }
      }
    };
    auto put_ints = [&](const std::vector<std::int64_t>& v) {
      host.resize(v.size() * element_size(type));
      for (std::size_t k = 0; k < v.size(); ++k) {
        if (type == nvinfer1::DataType::kINT64) {
          std::memcpy(host.data() + 8 * k, &v[k], 8);
        } else {
          const auto i32 = static_cast<std::int32_t>(v[k]);
          std::memcpy(host.data() + 4 * k, &i32, 4);
        }
      }
    };
    if (n == "x") put_floats(in.x->data);
    else if (n == "t") put_ints(in.t);
    else if (n == "y") put_ints(in.y);
    else if (n == "head_mask") put_floats(in.head_mask);
    else put_floats(in.channel_mask);
    DeviceBuffer& buf = buffers_[n];
    buf.reserve(host.size());
    cuda_check(cudaMemcpyAsync(buf.ptr, host.data(), host.size(), cudaMemcpyHostToDevice, stream_.get()), "copy in");
    // the host staging vector dies at return: wait for the copy
    cuda_check(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
  }

  ModelConfig cfg_;
  Logger logger_;
  std::unique_ptr<void, LibraryCloser> plugins_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<CUstream_st, StreamDeleter> stream_;
  std::vector<std::unique_ptr<nvinfer1::ICudaEngine>> engines_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;
  DeviceBuffer activations_;
  std::map<std::string, DeviceBuffer> buffers_;
};

}  // namespace

std::unique_ptr<Engine> make_tensorrt_engine(const Bundle& bundle, const TensorRTOptions& options) {
  return std::make_unique<TensorRTEngine>(bundle, options);
}

}  // namespace dyc
