// ONNX Runtime engine: one session per group, built when the engine is made, so a graph ONNX
// Runtime cannot load fails at start-up rather than in the middle of a sampling chain.
// Same settings as the Python backend (dyc/backends/onnxruntime.py): all graph optimisations;
// every graph and weights.bin read once and checked (sha256) on the bytes used; by default the
// weights are graph inputs bound to views of one copy of the parts of weights.bin the graphs
// reference (onnx_weights.hpp): host memory on the CPU, one device allocation on CUDA. On CUDA
// (DYC_WITH_CUDA builds) the inputs and the output are bound to static per-(group, batch) device
// buffers, ONNX Runtime captures one CUDA graph per (group, batch), and fp32 <-> bundle dtype
// conversions run on the device.
#include <onnxruntime_cxx_api.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>

#include "dyc/runtime.hpp"
#include "onnx_weights.hpp"

#ifdef DYC_WITH_CUDA
#include <cuda_runtime_api.h>
extern "C" int dyc_engine_from_float(const float* in, void* out, int dtype, std::size_t n, cudaStream_t stream);
extern "C" int dyc_engine_to_float(const void* in, float* out, int dtype, std::size_t n, cudaStream_t stream);
#endif

namespace dyc {

bool has_onnxruntime() { return true; }

namespace {

constexpr const char* kWeights = "weights.bin";

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// CUBLAS_WORKSPACE_CONFIG=config while a session creates its cuBLAS handle, unless config is empty or
// the user set it. cuBLAS reads it when the process's first handle is created (H200: it applies when
// these sessions are the first cuBLAS users, not after another handle; dyc/backends/onnxruntime.py).
class ScopedCublasWorkspace {
 public:
  explicit ScopedCublasWorkspace(const std::string& config)
      : set_(!config.empty() && std::getenv("CUBLAS_WORKSPACE_CONFIG") == nullptr) {
    if (set_) setenv("CUBLAS_WORKSPACE_CONFIG", config.c_str(), 1);
  }
  ~ScopedCublasWorkspace() {
    if (set_) unsetenv("CUBLAS_WORKSPACE_CONFIG");
  }
  ScopedCublasWorkspace(const ScopedCublasWorkspace&) = delete;
  ScopedCublasWorkspace& operator=(const ScopedCublasWorkspace&) = delete;

 private:
  bool set_;
};

// dyc_ort_ops_abi() of the custom-op library (1 for libraries from before the symbol), and what a
// serialized cuda graph needs: 2 where it uses TokenKeep or LnModulate's ones_column (their names
// appear verbatim in the protobuf; the weights are external) - as dyc/compiler/export_cuda.py.
int ops_library_abi(const std::filesystem::path& lib) {
  void* h = dlopen(lib.c_str(), RTLD_LAZY | RTLD_LOCAL);
  if (!h) throw Error(lib.string() + ": cannot load the custom-op library (" + dlerror() + ")");
  auto* fn = reinterpret_cast<int (*)()>(dlsym(h, "dyc_ort_ops_abi"));
  return fn ? fn() : 1;  // h stays open: ONNX Runtime loads the same library next (no unload/reload of its CUDA code)
}

int required_ops_abi(const std::string& model) {
  return model.find("TokenKeep") != std::string::npos || model.find("ones_column") != std::string::npos ? 2 : 1;
}

#ifdef DYC_WITH_CUDA
ONNXTensorElementDataType element_type(Dtype d) {
  switch (d) {
    case Dtype::fp32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case Dtype::fp16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case Dtype::bf16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

std::size_t dtype_size(Dtype d) { return d == Dtype::fp32 ? 4 : 2; }

void cuda_check(int err, const char* what) {
  if (err != 0) {
    throw Error(std::string("CUDA: ") + what + " failed (" + cudaGetErrorString(static_cast<cudaError_t>(err)) + ")");
  }
}

struct DeviceBuffer {
  void* p = nullptr;
  explicit DeviceBuffer(std::size_t bytes) { cuda_check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct HostBuffer {  // pinned: asynchronous copies
  void* p = nullptr;
  explicit HostBuffer(std::size_t bytes) { cuda_check(cudaMallocHost(&p, bytes ? bytes : 1), "cudaMallocHost"); }
  ~HostBuffer() { cudaFreeHost(p); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
};

// One (group, batch) on CUDA: its static device inputs/output, staging, and the binding. Every
// input and the output has its own region (offset) of the float staging on the device and of the
// pinned host staging, so the copies of one call need no wait between them.
struct CudaBound {
  std::map<std::string, std::unique_ptr<DeviceBuffer>> inputs;
  std::map<std::string, std::size_t> offset;  // bytes into `host` and `f32` ("out" included)
  std::unique_ptr<DeviceBuffer> out, f32;
  std::unique_ptr<HostBuffer> host;
  std::unique_ptr<Ort::IoBinding> binding;
  Ort::RunOptions run_options;
};
#endif

struct Session {
  Ort::Session session{nullptr};
  std::vector<std::string> inputs;  // the graph's own inputs (weights excluded)
  std::vector<detail::WeightRef> weights;
  std::vector<Ort::Value> weight_values;   // CPU: views of the host copy
  std::unique_ptr<Ort::IoBinding> binding;  // CPU: weights bound once
#ifdef DYC_WITH_CUDA
  std::map<std::int64_t, std::unique_ptr<CudaBound>> bound;
#endif
};

class OnnxRuntimeEngine final : public Engine {
 public:
  OnnxRuntimeEngine(const Bundle& bundle, const OnnxRuntimeOptions& opt)
      : env_(ORT_LOGGING_LEVEL_WARNING, "dyc"), dtype_(bundle.dtype()), cfg_(bundle.config()), opt_(opt) {
    const std::string bname = bundle.path().filename().string();
#ifndef DYC_WITH_CUDA
    if (opt.cuda) throw Error("this build of dyc_runtime has no CUDA support (configure engines/ with CUDA found)");
#endif
    std::string variant = opt.variant;
    const bool has_cuda_graphs = std::all_of(bundle.groups().begin(), bundle.groups().end(),
                                             [](const Group& g) { return !g.onnx_cuda.empty(); });
    if (variant.empty()) {
      if (opt.cuda && has_cuda_graphs && !opt.custom_op_library.empty()) variant = "cuda";
      else variant = opt.custom_op_library.empty() ? "std" : "trt";
    }
    if (variant != "std" && variant != "trt" && variant != "cuda") {
      throw Error("unknown ONNX variant '" + variant + "': choose std, trt or cuda");
    }
    if (variant == "cuda" && !has_cuda_graphs) throw Error(bname + " has no cuda graphs (compiled by an older dyc)");
    if (variant == "cuda" && !opt.cuda) throw Error("the cuda graphs run on CUDA only (OnnxRuntimeOptions::cuda)");
    if ((variant == "trt" || variant == "cuda") && opt.custom_op_library.empty()) {
      throw Error("the " + variant + " graphs need the custom-op library libdyc_ort_ops.so (custom_op_library)");
    }
    if (dtype_ == Dtype::bf16 && variant != "cuda") {
      throw Error(bname + " is a bf16 bundle: ONNX Runtime runs it only with the cuda graphs on CUDA; compile with "
                  "--dtype fp32 or fp16, or use another engine");
    }
    variant_ = variant;
    const int ops_abi = variant == "cuda" ? ops_library_abi(opt.custom_op_library) : 0;
    Ort::SessionOptions so;
    try {
      so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      if (opt.intra_op_threads > 0) so.SetIntraOpNumThreads(opt.intra_op_threads);
      if (variant != "std") so.RegisterCustomOpsLibrary(opt.custom_op_library.c_str());
      if (opt.share_weights && !opt.cuda) so.AddConfigEntry("session.disable_prepacking", "1");
      if (opt.share_arena) share_arena(so, opt);
#ifdef DYC_WITH_CUDA
      if (opt.cuda) {
        cuda_check(cudaSetDevice(opt.device), "cudaSetDevice");
        cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        const OrtApi& api = Ort::GetApi();
        OrtCUDAProviderOptionsV2* cuda = nullptr;
        Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
        std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> guard(
            cuda, api.ReleaseCUDAProviderOptions);
        const std::string dev = std::to_string(opt.device);
        const char* keys[] = {"device_id", "enable_cuda_graph", "arena_extend_strategy"};
        const char* values[] = {dev.c_str(), opt.cuda_graphs ? "1" : "0", "kSameAsRequested"};
        Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 3));
        Ort::ThrowOnError(api.UpdateCUDAProviderOptionsWithValue(cuda, "user_compute_stream", stream_));
        so.AppendExecutionProvider_CUDA_V2(*cuda);
        provider_ = "CUDAExecutionProvider";
      }
#endif
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime: cannot set up the session options (" + first_line(e.what()) + ")");
    }

    // weights: one checked copy (host or device, after the graphs say which bytes they use), or each
    // session's own from the checked bytes
    const std::uint64_t wbytes = bundle.file_info(kWeights).bytes;
    std::vector<char> owned_weights;  // share_weights = false: ORT copies from it per session
    if (!opt.share_weights) {
      owned_weights.resize(wbytes);
      detail::stream_checked(bundle, kWeights, [&](std::uint64_t off, const char* d, std::size_t k) {
        std::memcpy(owned_weights.data() + off, d, k);
      });
      std::vector<std::basic_string<ORTCHAR_T>> names = {kWeights};
      std::vector<char*> buffers = {owned_weights.data()};
      std::vector<std::size_t> lengths = {owned_weights.size()};
      so.AddExternalInitializersFromFilesInMemory(names, buffers, lengths);
    }

    for (const Group& g : bundle.groups()) {
      const std::filesystem::path& path = variant == "cuda" ? g.onnx_cuda : variant == "trt" ? g.onnx_trt : g.onnx_std;
      std::string model = detail::read_checked(bundle, path.filename().string());
      if (variant == "cuda" && required_ops_abi(model) > ops_abi) {  // else a run-time failure, or a silent one
        throw Error(opt.custom_op_library.string() + " is older than " + bname + "'s cuda graphs (op library ABI " +
                    std::to_string(ops_abi) + ", the graphs need " + std::to_string(required_ops_abi(model)) +
                    ": dyc::TokenKeep, LnModulate's ones_column): rebuild it (target dyc_ort_ops)");
      }
      Session s;
      if (opt.share_weights) model = detail::weights_as_inputs(model, kWeights, wbytes, s.weights, path.string());
      try {
        ScopedCublasWorkspace ws(opt.cuda ? opt.cublas_workspace : std::string());
        s.session = Ort::Session(env_, model.data(), model.size(), so);
      } catch (const Ort::Exception& e) {
        throw Error(path.string() + ": ONNX Runtime cannot load it (" + first_line(e.what()) + ")");
      }
      Ort::AllocatorWithDefaultOptions alloc;
      for (std::size_t i = 0; i < s.session.GetInputCount(); ++i) {
        std::string n = s.session.GetInputNameAllocated(i, alloc).get();
        const bool weight = std::any_of(s.weights.begin(), s.weights.end(), [&](const auto& r) { return r.name == n; });
        if (!weight) s.inputs.push_back(std::move(n));
      }
      if (!opt.cuda) s.binding = std::make_unique<Ort::IoBinding>(s.session);
      sessions_.push_back(std::move(s));
    }
    if (!opt.share_weights) return;

    // one copy of only the bytes these graphs reference (not the other variants' tensors), compacted;
    // every weight's offset then points into that copy
    std::vector<detail::WeightRef> all;
    for (const Session& s : sessions_) all.insert(all.end(), s.weights.begin(), s.weights.end());
    const std::vector<detail::WeightSpan> spans = detail::spans_of(all);
    load_shared_weights(bundle, spans);
    for (Session& s : sessions_) detail::remap(s.weights, spans);
    if (opt.cuda) return;  // bound per batch size (bind_cuda)
    const Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
    for (Session& s : sessions_) {
      for (const auto& r : s.weights) {  // views into the one host copy
        s.weight_values.push_back(Ort::Value::CreateTensor(
            mem, host_weights_.data() + r.offset, r.length, r.shape.data(), r.shape.size(),
            static_cast<ONNXTensorElementDataType>(r.onnx_type)));
        s.binding->BindInput(r.name.c_str(), s.weight_values.back());
      }
    }
  }

  // One arena in the environment for every session's activations: K sessions of groups that run one
  // after another would otherwise each keep an arena grown to its own peak (as dyc/backends/onnxruntime.py).
  void share_arena(Ort::SessionOptions& so, const OnnxRuntimeOptions& opt) {
    Ort::ArenaCfg arena(0, 1 /* kSameAsRequested */, -1, -1);
    try {
      if (opt.cuda) {
        Ort::MemoryInfo mem("Cuda", OrtArenaAllocator, opt.device, OrtMemTypeDefault);
        env_.CreateAndRegisterAllocatorV2("CUDAExecutionProvider", mem, {{"device_id", std::to_string(opt.device)}},
                                          arena);
      } else {
        Ort::MemoryInfo mem("Cpu", OrtArenaAllocator, 0, OrtMemTypeDefault);
        env_.CreateAndRegisterAllocator(mem, arena);
      }
    } catch (const Ort::Exception& e) {
      // the environment is one per process: another engine may have registered it already
      if (std::string(e.what()).find("already") == std::string::npos) throw;
    }
    so.AddConfigEntry("session.use_env_allocators", "1");
  }

  ~OnnxRuntimeEngine() override {
    sessions_.clear();  // sessions and bindings before the memory they point into
#ifdef DYC_WITH_CUDA
    device_weights_.reset();
    if (stream_) cudaStreamDestroy(stream_);
#endif
  }

  std::string name() const override { return "onnxruntime (" + provider_ + ", " + variant_ + " graphs)"; }

  Tensor run(const Group& group, const ModelInputs& in) override {
    const auto gi = static_cast<std::size_t>(group.index);
    if (gi >= sessions_.size()) throw Error("onnxruntime engine: no group " + std::to_string(group.index));
    if (in.x == nullptr || in.x->shape.size() != 4) throw Error("onnxruntime engine: x must be [B, C, S, S]");
    const std::int64_t batch = in.x->shape[0];
    if (static_cast<std::int64_t>(in.t.size()) != batch || static_cast<std::int64_t>(in.y.size()) != batch) {
      throw Error("onnxruntime engine: t and y need one entry per image of x");
    }
    for (const char* n : {"head_mask", "channel_mask"}) {
      const bool head = std::strcmp(n, "head_mask") == 0;
      const bool takes = std::find(sessions_[gi].inputs.begin(), sessions_[gi].inputs.end(), n) !=
                         sessions_[gi].inputs.end();
      const std::size_t want = static_cast<std::size_t>(batch * cfg_.depth * (head ? group.head_slots : group.channel_slots));
      if (takes && (head ? in.head_mask : in.channel_mask).size() != want) {
        throw Error("group " + std::to_string(group.index) + " takes " + n + " [" + std::to_string(batch) + ", " +
                    std::to_string(cfg_.depth) + ", " +
                    std::to_string(head ? group.head_slots : group.channel_slots) + "], but it was not given");
      }
    }
    for (const std::string& n : sessions_[gi].inputs) {
      if (n != "x" && n != "t" && n != "y" && n != "head_mask" && n != "channel_mask") {
        throw Error("group " + std::to_string(group.index) + "'s graph has an input '" + n +
                    "' this runtime does not know (a bundle of a newer dyc?)");
      }
    }
#ifdef DYC_WITH_CUDA
    if (opt_.cuda) return run_cuda(group, sessions_[gi], in, batch);
#endif
    return run_cpu(group, sessions_[gi], in, batch);
  }

 private:
  // The whole of weights.bin is streamed and hashed (the check covers every byte read); only the
  // bytes inside `spans` are kept, at their compacted offsets.
  void load_shared_weights(const Bundle& bundle, const std::vector<detail::WeightSpan>& spans) {
    const std::uint64_t bytes = detail::spans_size(spans);
#ifdef DYC_WITH_CUDA
    if (opt_.cuda) {  // streamed through a pinned chunk into one device allocation, checked at the end
      device_weights_ = std::make_unique<DeviceBuffer>(bytes);
      HostBuffer chunk(static_cast<std::size_t>(std::min<std::uint64_t>(bytes, std::uint64_t{1} << 26)));
      auto* dst = static_cast<char*>(device_weights_->p);
      detail::stream_checked(bundle, kWeights, [&](std::uint64_t off, const char* d, std::size_t k) {
        detail::copy_spans(spans, off, d, k, [&](std::uint64_t at, const char* p, std::size_t n) {
          std::memcpy(chunk.p, p, n);  // n <= min(k, bytes): fits the chunk
          cuda_check(cudaMemcpy(dst + at, chunk.p, n, cudaMemcpyHostToDevice), "cudaMemcpy (weights)");
        });
      });
      return;
    }
#endif
    host_weights_.resize(bytes);
    detail::stream_checked(bundle, kWeights, [&](std::uint64_t off, const char* d, std::size_t k) {
      detail::copy_spans(spans, off, d, k, [&](std::uint64_t at, const char* p, std::size_t n) {
        std::memcpy(host_weights_.data() + at, p, n);
      });
    });
  }

  Tensor run_cpu(const Group& group, Session& s, const ModelInputs& in, std::int64_t batch) {
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
    for (const std::string& n : s.inputs) {
      if (n == "x") {
        values.push_back(float_tensor(mem, x, in.x->shape, staging));
      } else if (n == "t") {
        values.push_back(Ort::Value::CreateTensor<std::int64_t>(mem, t.data(), t.size(), &batch, 1));
      } else if (n == "y") {
        values.push_back(Ort::Value::CreateTensor<std::int64_t>(mem, y.data(), y.size(), &batch, 1));
      } else {
        const bool h = n == "head_mask";
        const std::vector<std::int64_t> shape = {batch, cfg_.depth, h ? group.head_slots : group.channel_slots};
        values.push_back(float_tensor(mem, h ? head : channel, shape, staging));
      }
      names.push_back(n.c_str());
    }
    try {
      for (std::size_t i = 0; i < values.size(); ++i) s.binding->BindInput(names[i], values[i]);
      s.binding->BindOutput("out", mem);
      s.session.Run(Ort::RunOptions{nullptr}, *s.binding);
      std::vector<Ort::Value> outs = s.binding->GetOutputValues();
      return to_float(outs.at(0));
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime: group " + std::to_string(group.index) + " failed (" + first_line(e.what()) + ")");
    }
  }

#ifdef DYC_WITH_CUDA
  CudaBound& bind_cuda(Session& s, std::int64_t batch, const Group& group) {
    auto it = s.bound.find(batch);
    if (it != s.bound.end()) return *it->second;
    auto b = std::make_unique<CudaBound>();
    const Ort::MemoryInfo mem("Cuda", OrtDeviceAllocator, opt_.device, OrtMemTypeDefault);
    b->binding = std::make_unique<Ort::IoBinding>(s.session);
    for (const auto& r : s.weights) {
      auto v = Ort::Value::CreateTensor(mem, static_cast<char*>(device_weights_->p) + r.offset, r.length,
                                        r.shape.data(), r.shape.size(), static_cast<ONNXTensorElementDataType>(r.onnx_type));
      b->binding->BindInput(r.name.c_str(), v);
    }
    const std::int64_t S = cfg_.input_size;
    std::size_t staged = 0;  // bytes of staging so far (float or int64 per element: 8 bytes covers both)
    for (const std::string& n : s.inputs) {
      std::vector<std::int64_t> shape;
      ONNXTensorElementDataType type = element_type(dtype_);
      std::size_t es = dtype_size(dtype_);
      if (n == "x") shape = {batch, cfg_.in_channels, S, S};
      else if (n == "t" || n == "y") shape = {batch}, type = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, es = 8;
      else shape = {batch, cfg_.depth, n == "head_mask" ? group.head_slots : group.channel_slots};
      std::size_t numel = 1;
      for (auto d : shape) numel *= static_cast<std::size_t>(d);
      b->offset[n] = staged;
      staged += (numel * 8 + 255) / 256 * 256;
      auto buf = std::make_unique<DeviceBuffer>(numel * es);
      auto v = Ort::Value::CreateTensor(mem, buf->p, numel * es, shape.data(), shape.size(), type);
      b->binding->BindInput(n.c_str(), v);
      b->inputs[n] = std::move(buf);
    }
    const std::vector<std::int64_t> oshape = {batch, cfg_.out_channels(), S, S};
    const std::size_t onumel = static_cast<std::size_t>(batch * cfg_.out_channels() * S * S);
    b->offset["out"] = staged;
    staged += onumel * sizeof(float);
    b->out = std::make_unique<DeviceBuffer>(onumel * dtype_size(dtype_));
    auto ov = Ort::Value::CreateTensor(mem, b->out->p, onumel * dtype_size(dtype_), oshape.data(), oshape.size(),
                                       element_type(dtype_));
    b->binding->BindOutput("out", ov);
    b->f32 = std::make_unique<DeviceBuffer>(staged);
    b->host = std::make_unique<HostBuffer>(staged);
    b->run_options.AddConfigEntry("disable_synchronize_execution_providers", "1");  // ordered on our stream
    if (opt_.cuda_graphs) b->run_options.AddConfigEntry("gpu_graph_id", std::to_string(s.bound.size()).c_str());
    return *s.bound.emplace(batch, std::move(b)).first->second;
  }

  static char* at(const std::unique_ptr<HostBuffer>& p, std::size_t off) { return static_cast<char*>(p->p) + off; }
  static char* at(const std::unique_ptr<DeviceBuffer>& p, std::size_t off) { return static_cast<char*>(p->p) + off; }

  // host float data -> the bound device input (converted to the bundle dtype on the device)
  void upload_float(CudaBound& b, const std::string& name, const float* data, std::size_t n) {
    const std::size_t off = b.offset.at(name);
    std::memcpy(at(b.host, off), data, n * sizeof(float));
    cuda_check(cudaMemcpyAsync(at(b.f32, off), at(b.host, off), n * sizeof(float), cudaMemcpyHostToDevice, stream_),
               "H2D");
    const int dt = dtype_ == Dtype::fp32 ? 0 : dtype_ == Dtype::fp16 ? 1 : 2;
    cuda_check(dyc_engine_from_float(reinterpret_cast<const float*>(at(b.f32, off)), b.inputs.at(name)->p, dt, n,
                                     stream_),
               "convert");
  }

  Tensor run_cuda(const Group& group, Session& s, const ModelInputs& in, std::int64_t batch) {
    CudaBound& b = bind_cuda(s, batch, group);
    for (const std::string& n : s.inputs) {
      if (n == "x") {
        upload_float(b, n, in.x->data.data(), in.x->data.size());
      } else if (n == "t" || n == "y") {
        const auto& v = n == "t" ? in.t : in.y;
        char* h = at(b.host, b.offset.at(n));
        std::memcpy(h, v.data(), v.size() * 8);
        cuda_check(cudaMemcpyAsync(b.inputs.at(n)->p, h, v.size() * 8, cudaMemcpyHostToDevice, stream_), "H2D");
      } else {
        const auto& m = n == "head_mask" ? in.head_mask : in.channel_mask;
        upload_float(b, n, m.data(), m.size());
      }
    }
    try {
      s.session.Run(b.run_options, *b.binding);
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime: group " + std::to_string(group.index) + " failed (" + first_line(e.what()) + ")");
    }
    const std::int64_t S = cfg_.input_size;
    const std::size_t n = static_cast<std::size_t>(batch * cfg_.out_channels() * S * S);
    const int dt = dtype_ == Dtype::fp32 ? 0 : dtype_ == Dtype::fp16 ? 1 : 2;
    const std::size_t off = b.offset.at("out");
    cuda_check(dyc_engine_to_float(b.out->p, reinterpret_cast<float*>(at(b.f32, off)), dt, n, stream_), "convert");
    cuda_check(cudaMemcpyAsync(at(b.host, off), at(b.f32, off), n * sizeof(float), cudaMemcpyDeviceToHost, stream_),
               "D2H");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // also: staging free for the next call
    Tensor out;
    out.shape = {batch, cfg_.out_channels(), S, S};
    const auto* p = reinterpret_cast<const float*>(at(b.host, off));
    out.data.assign(p, p + n);
    return out;
  }
#endif

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
  OnnxRuntimeOptions opt_;
  std::string provider_ = "CPUExecutionProvider";
  std::string variant_;
  std::vector<char> host_weights_;  // CPU, shared: the one copy (referenced spans) all weight inputs view
#ifdef DYC_WITH_CUDA
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<DeviceBuffer> device_weights_;
#endif
  std::vector<Session> sessions_;
};

}  // namespace

std::unique_ptr<Engine> make_onnxruntime_engine(const Bundle& bundle, const OnnxRuntimeOptions& options) {
  return std::make_unique<OnnxRuntimeEngine>(bundle, options);
}

}  // namespace dyc
