// TensorRT plugin "SdtMlp" (IPluginV3: OneCore + OneBuild + OneRuntime) for the compiler's ONNX op
// dyc::SdtMlp. The maths is the C ABI of libdyc_plugins (dyc_sdt_mlp_forward); this file only
// adapts it to TensorRT.
//
//   name "SdtMlp", version "1", namespace "" (the ONNX parser's plugin fallback looks the node's
//   op_type up with version "1" in the default namespace; a creator namespace can be set with
//   setPluginNamespace for other registries).
//   inputs: x [B,N,C], shift, scale, gate [B,C], keep [B,N], fc1_w [Hs,C], fc1_b [Hs],
//           fc2_w [C,Hs], fc2_b [C], optional channel_mask [B,G]; all float, half or bf16 (one type)
//   output: y, shape and type of x. Batch and tokens are dynamic.
//   fields (serialised): group_size (int32 or int64; 0 = Hs / G, or Hs), eps (float32, 1e-6).
//
// Load it as a dynamic plugin library (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins, or
// builder config setPluginsToSerialize): it exports getCreators and setLoggerFinder.

#include <NvInferRuntime.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "dyc_sdt_mlp.h"

using namespace nvinfer1;

namespace {

constexpr char const* kName = "SdtMlp";
constexpr char const* kVersion = "1";

std::mutex gLogMutex;
ILoggerFinder* gLoggerFinder = nullptr;

void logError(std::string const& msg) {
  std::lock_guard<std::mutex> lock(gLogMutex);
  ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
  if (logger) logger->log(ILogger::Severity::kERROR, ("SdtMlp: " + msg).c_str());
}

int toDycDtype(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return DYC_DTYPE_FLOAT32;
    case DataType::kHALF: return DYC_DTYPE_FLOAT16;
    case DataType::kBF16: return DYC_DTYPE_BFLOAT16;
    default: return -1;
  }
}

int64_t groupSizeFor(int32_t attr, int64_t hidden, int64_t groups) {
  if (attr > 0) return attr;
  return groups > 0 ? hidden / groups : hidden;
}

class SdtMlpPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  SdtMlpPlugin(int32_t groupSize, float eps, std::string ns) : mGroupSize(groupSize), mEps(eps), mNamespace(std::move(ns)) {
    initFields();
  }
  SdtMlpPlugin(SdtMlpPlugin const& o) : SdtMlpPlugin(o.mGroupSize, o.mEps, o.mNamespace) {}
  ~SdtMlpPlugin() override = default;

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override {
    try {
      return new SdtMlpPlugin(*this);
    } catch (...) {
      return nullptr;
    }
  }

  // IPluginV3OneCore
  AsciiChar const* getPluginName() const noexcept override { return kName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 1; }

  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
    if ((nbInputs != 9 && nbInputs != 10) || nbOutputs != 1) return -1;
    if (in[0].desc.dims.nbDims != 3 || in[5].desc.dims.nbDims != 2) return -1;
    mNbInputs = nbInputs;
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (pos < 0 || pos >= nbInputs + nbOutputs) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR || toDycDtype(d.type) < 0) return false;
    return pos == 0 || d.type == inOut[0].desc.type;  // one element type for all tensors
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs < 1) return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs < 9 || nbOutputs != 1 || inputs[0].nbDims != 3) return -1;
    outputs[0] = inputs[0];
    return 0;
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    // Sized for the profile's largest batch and token count; +256 to align the base ourselves.
    Dims const& x = inputs[0].max;
    Dims const& w1 = inputs[5].max;
    const int64_t groups = nbInputs > 9 ? inputs[9].max.d[1] : 0;
    const int64_t gs = groupSizeFor(mGroupSize, w1.d[0], groups);
    const size_t n = dyc_sdt_mlp_workspace_size(toDycDtype(inputs[0].desc.type), x.d[0], x.d[1], x.d[2], w1.d[0], gs);
    return n ? n + 256 : 0;
  }

  // IPluginV3OneRuntime
  // Called before the first enqueue and on every shape change: where the runtime learns whether
  // the optional channel_mask is wired.
  int32_t onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*,
                        int32_t nbOutputs) noexcept override {
    if ((nbInputs != 9 && nbInputs != 10) || nbOutputs != 1) return -1;
    mNbInputs = nbInputs;
    return 0;
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    Dims const& x = inputDesc[0].dims;
    const int64_t hidden = inputDesc[5].dims.d[0];
    const int dtype = toDycDtype(inputDesc[0].type);
    const int64_t groups = mNbInputs == 10 ? inputDesc[9].dims.d[1] : 0;
    const int64_t gs = groupSizeFor(mGroupSize, hidden, groups);
    const size_t need = dyc_sdt_mlp_workspace_size(dtype, x.d[0], x.d[1], x.d[2], hidden, gs);
    void* ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(workspace) + 255) & ~uintptr_t(255));
    const int st = dyc_sdt_mlp_forward(dtype, inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5],
                                       inputs[6], inputs[7], inputs[8], mNbInputs == 10 ? inputs[9] : nullptr,
                                       outputs[0], x.d[0], x.d[1], x.d[2], hidden, gs, 0, mEps, ws, need, 0u, stream);
    if (st != DYC_STATUS_OK) {
      logError(std::string("dyc_sdt_mlp_forward: ") + dyc_sdt_mlp_status_string(st));
      return -1;
    }
    return 0;
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    initFields();
    return &mFc;
  }

 private:
  void initFields() {
    mFields.clear();
    mFields.emplace_back("group_size", &mGroupSize, PluginFieldType::kINT32, 1);
    mFields.emplace_back("eps", &mEps, PluginFieldType::kFLOAT32, 1);
    mFc.nbFields = static_cast<int32_t>(mFields.size());
    mFc.fields = mFields.data();
  }

  int32_t mGroupSize;
  float mEps;
  int32_t mNbInputs = 10;  // 9 when channel_mask is absent
  std::string mNamespace;
  std::vector<PluginField> mFields;
  PluginFieldCollection mFc{};
};

class SdtMlpPluginCreator : public IPluginCreatorV3One {
 public:
  SdtMlpPluginCreator() {
    mFields.emplace_back("group_size", nullptr, PluginFieldType::kINT32, 1);
    mFields.emplace_back("eps", nullptr, PluginFieldType::kFLOAT32, 1);
    mFc.nbFields = static_cast<int32_t>(mFields.size());
    mFc.fields = mFields.data();
  }

  AsciiChar const* getPluginName() const noexcept override { return kName; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return mNamespace.c_str(); }
  void setPluginNamespace(AsciiChar const* ns) noexcept { mNamespace = ns ? ns : ""; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mFc; }

  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    try {
      int32_t groupSize = 0;
      float eps = 1e-6f;
      for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (!f.name || !f.data || f.length < 1) continue;
        const std::string name(f.name);
        auto asInt = [&]() -> int64_t {
          switch (f.type) {
            case PluginFieldType::kINT32: return *static_cast<int32_t const*>(f.data);
            case PluginFieldType::kINT64: return *static_cast<int64_t const*>(f.data);  // ONNX ints
            case PluginFieldType::kINT8: return *static_cast<int8_t const*>(f.data);
            default: return -1;
          }
        };
        if (name == "group_size") {
          groupSize = static_cast<int32_t>(asInt());
        } else if (name == "eps") {
          if (f.type == PluginFieldType::kFLOAT32) eps = *static_cast<float const*>(f.data);
          else if (f.type == PluginFieldType::kFLOAT64) eps = static_cast<float>(*static_cast<double const*>(f.data));
        }
      }
      if (groupSize < 0 || !(eps >= 0.f)) {
        logError("invalid fields (group_size >= 0, eps >= 0)");
        return nullptr;
      }
      return new SdtMlpPlugin(groupSize, eps, mNamespace);
    } catch (...) {
      return nullptr;
    }
  }

 private:
  std::string mNamespace;
  std::vector<PluginField> mFields;
  PluginFieldCollection mFc{};
};

}  // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) {
  std::lock_guard<std::mutex> lock(gLogMutex);
  gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static SdtMlpPluginCreator creator;
  static IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
