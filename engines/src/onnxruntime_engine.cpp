// ONNX Runtime engine: one session per group, built when the engine is made, so a graph ONNX
// Runtime cannot load fails at start-up rather than in the middle of a sampling chain.
// Same session settings as the Python backend (dyc/backends/onnxruntime.py): all graph
// optimisations, the `std` graphs (SDT as standard ops) unless a custom-op library is given.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <map>

#include "dyc/runtime.hpp"

namespace dyc {

bool has_onnxruntime() { return true; }

namespace {

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

class OnnxRuntimeEngine final : public Engine {
 public:
  OnnxRuntimeEngine(const Bundle& bundle, const OnnxRuntimeOptions& opt)
      : env_(ORT_LOGGING_LEVEL_WARNING, "dyc"), dtype_(bundle.dtype()), cfg_(bundle.config()) {
    if (dtype_ == Dtype::bf16 && !opt.cuda) {
      throw Error(bundle.path().filename().string() +
                  " is a bf16 bundle: ONNX Runtime's CPU execution provider lacks bf16 kernels; compile with "
                  "--dtype fp32 or fp16, or use another engine");
    }
    Ort::SessionOptions so;
    try {
      so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      if (opt.intra_op_threads > 0) so.SetIntraOpNumThreads(opt.intra_op_threads);
      if (!opt.custom_op_library.empty()) so.RegisterCustomOpsLibrary(opt.custom_op_library.c_str());
      if (opt.cuda) {
        OrtCUDAProviderOptions cuda{};
        so.AppendExecutionProvider_CUDA(cuda);
        provider_ = "CUDAExecutionProvider";
      }
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime: cannot set up the session options (" + first_line(e.what()) + ")");
    }
    const bool trt_graphs = !opt.custom_op_library.empty();
    for (const Group& g : bundle.groups()) {
      const std::filesystem::path& path = trt_graphs ? g.onnx_trt : g.onnx_std;
      try {
        sessions_.emplace_back(env_, path.c_str(), so);
      } catch (const Ort::Exception& e) {
        throw Error(path.string() + ": ONNX Runtime cannot load it (" + first_line(e.what()) + ")");
      }
      Ort::AllocatorWithDefaultOptions alloc;
      std::vector<std::string> names;
      for (std::size_t i = 0; i < sessions_.back().GetInputCount(); ++i) {
        names.push_back(sessions_.back().GetInputNameAllocated(i, alloc).get());
      }
      input_names_.push_back(std::move(names));
      output_names_.push_back(sessions_.back().GetOutputNameAllocated(0, alloc).get());
    }
  }

  std::string name() const override { return "onnxruntime (" + provider_ + ")"; }

  Tensor run(const Group& group, const ModelInputs& in) override {
    const auto gi = static_cast<std::size_t>(group.index);
    if (gi >= sessions_.size()) throw Error("onnxruntime engine: no group " + std::to_string(group.index));
    if (in.x == nullptr || in.x->shape.size() != 4) throw Error("onnxruntime engine: x must be [B, C, S, S]");
    const std::int64_t batch = in.x->shape[0];
    if (static_cast<std::int64_t>(in.t.size()) != batch || static_cast<std::int64_t>(in.y.size()) != batch) {
      throw Error("onnxruntime engine: t and y need one entry per image of x");
    }
    const Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    // Graph inputs: build exactly the ones the session declares; the converted float data lives in
    // `staging` until Run returns (Ort::Value::CreateTensor does not copy).
    std::vector<std::vector<std::uint16_t>> staging;
    staging.reserve(3);
    std::vector<Ort::Value> values;
    std::vector<const char*> names;
    std::vector<std::int64_t> t = in.t, y = in.y;  // CreateTensor takes non-const pointers
    std::vector<float> head = in.head_mask, channel = in.channel_mask;
    std::vector<float> x = in.x->data;
    for (const std::string& n : input_names_[gi]) {
      if (n == "x") {
        values.push_back(float_tensor(mem, x, in.x->shape, staging));
      } else if (n == "t") {
        values.push_back(Ort::Value::CreateTensor<std::int64_t>(mem, t.data(), t.size(), &batch, 1));
      } else if (n == "y") {
        values.push_back(Ort::Value::CreateTensor<std::int64_t>(mem, y.data(), y.size(), &batch, 1));
      } else if (n == "head_mask" || n == "channel_mask") {
        std::vector<float>& m = n == "head_mask" ? head : channel;
        const std::int64_t slots = n == "head_mask" ? group.head_slots : group.channel_slots;
        const std::vector<std::int64_t> shape = {batch, cfg_.depth, slots};
        if (m.size() != static_cast<std::size_t>(batch * cfg_.depth * slots)) {
          throw Error("group " + std::to_string(group.index) + " takes " + n + " [" + std::to_string(batch) + ", " +
                      std::to_string(cfg_.depth) + ", " + std::to_string(slots) + "], but it was not given");
        }
        values.push_back(float_tensor(mem, m, shape, staging));
      } else {
        throw Error("group " + std::to_string(group.index) + "'s graph has an input '" + n +
                    "' this runtime does not know (a bundle of a newer dyc?)");
      }
      names.push_back(n.c_str());
    }
    const char* out_name = output_names_[gi].c_str();
    std::vector<Ort::Value> outs;
    try {
      outs = sessions_[gi].Run(Ort::RunOptions{nullptr}, names.data(), values.data(), values.size(), &out_name, 1);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime: group " + std::to_string(group.index) + " failed (" + first_line(e.what()) + ")");
    }
    return to_float(outs.at(0));
  }

 private:
  // float32 data -> an Ort::Value of the bundle's dtype (fp16/bf16 round to nearest even, as torch)
  Ort::Value float_tensor(const Ort::MemoryInfo& mem, std::vector<float>& data, const std::vector<std::int64_t>& shape,
                          std::vector<std::vector<std::uint16_t>>& staging) const {
    if (dtype_ == Dtype::fp32) {
      return Ort::Value::CreateTensor<float>(mem, data.data(), data.size(), shape.data(), shape.size());
    }
    staging.emplace_back(data.size());
    std::vector<std::uint16_t>& s = staging.back();
    if (dtype_ == Dtype::fp16) {
      for (std::size_t i = 0; i < data.size(); ++i) s[i] = Ort::Float16_t(data[i]).val;
      return Ort::Value::CreateTensor(mem, s.data(), s.size() * 2, shape.data(), shape.size(),
                                      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
    }
    for (std::size_t i = 0; i < data.size(); ++i) s[i] = Ort::BFloat16_t(data[i]).val;
    return Ort::Value::CreateTensor(mem, s.data(), s.size() * 2, shape.data(), shape.size(),
                                    ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16);
  }

  static Tensor to_float(Ort::Value& v) {
    const auto info = v.GetTensorTypeAndShapeInfo();
    Tensor out;
    out.shape = info.GetShape();
    const std::size_t n = info.GetElementCount();
    out.data.resize(n);
    switch (info.GetElementType()) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: {
        const float* p = v.GetTensorData<float>();
        std::copy(p, p + n, out.data.begin());
        break;
      }
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: {
        const auto* p = v.GetTensorData<Ort::Float16_t>();
        for (std::size_t i = 0; i < n; ++i) out.data[i] = p[i].ToFloat();
        break;
      }
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: {
        const auto* p = v.GetTensorData<Ort::BFloat16_t>();
        for (std::size_t i = 0; i < n; ++i) out.data[i] = p[i].ToFloat();
        break;
      }
      default:
        throw Error("ONNX Runtime: the model output has an element type this runtime does not read");
    }
    return out;
  }

  Ort::Env env_;
  Dtype dtype_;
  ModelConfig cfg_;
  std::string provider_ = "CPUExecutionProvider";
  std::vector<Ort::Session> sessions_;
  std::vector<std::vector<std::string>> input_names_;
  std::vector<std::string> output_names_;
};

}  // namespace

std::unique_ptr<Engine> make_onnxruntime_engine(const Bundle& bundle, const OnnxRuntimeOptions& options) {
  return std::make_unique<OnnxRuntimeEngine>(bundle, options);
}

}  // namespace dyc
