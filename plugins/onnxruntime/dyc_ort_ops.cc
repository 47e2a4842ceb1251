// ONNX Runtime custom-op library: dyc::SdtMlp, dyc::LnModulate, dyc::GatedResidual, dyc::TokenKeep.
//
//   session_options.register_custom_ops_library("libdyc_ort_ops.so")
//
// Node: domain "dyc", op "SdtMlp", inputs (x, shift, scale, gate, keep, fc1_w, fc1_b, fc2_w, fc2_b,
// [channel_mask]) all of one element type, output y (shape of x); attributes group_size (int,
// default: hidden / channel_mask groups, or hidden), eps (float, default 1e-6) and
// shared_channel_mask (int, default 0; 1: every row of channel_mask is the same, the row of the one
// timestep a sampler call runs, so only row 0 is read: DYC_SDT_MLP_FLAG_SHARED_CHANNEL_MASK).
//
// The CUDA kernel allocates nothing but its workspace, from ORT's allocator on ORT's compute
// stream, and never waits for the device: it runs inside ORT's CUDA graphs (enable_cuda_graph).
//
// CUDA EP: float, float16 and bfloat16 kernels, all through the C ABI of libdyc_plugins
// (dyc_sdt_mlp_forward) on ORT's compute stream with scratch from ORT's allocator.
// CPU EP: a float kernel with the same maths in plain C++ (small graphs, tests; the compiler's
// decomposed graph is the fast CPU route).
//
// dyc::LnModulate (x [B, N, C], shift [B, C], scale [B, C]; attribute eps, default 1e-6) -> y:
//   LayerNorm(x) (no affine) * (1 + scale[b]) + shift[b]. Attribute ones_column (int, default 0):
//   k > 0 appends a column of ones and zeros up to a width of a multiple of k, y [B, N, C'], so
//   that the GEMM after it takes its bias as a weight row (k = 8 keeps C' aligned for tensor cores).
// dyc::GatedResidual (x [B, N, C], gate [B, C], y [B, N, C], [bias [C]]) -> x + gate[b] * (y + bias).
// dyc::TokenKeep (h [..., H], b1 [H], w2 [1, H], b2 [1]) -> keep [...]: 1 where
//   sigmoid(relu(h + b1) . w2 + b2) > 0.5, else 0 (the SDT router after its bias-free first GEMM).
// They replace the stock LayerNormalization/Mul/Add chains and the GEMMs' bias broadcasts of the
// `cuda` graphs (one pass over [B, N, C] each; dyc_ort_elementwise.cu); float, float16, bfloat16 on
// CUDA, float on the CPU.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "dyc_ort_elementwise.h"
#include "dyc_sdt_mlp.h"

namespace {

constexpr const char* kDomain = "dyc";

struct Attrs {
  int64_t group_size = 0;  // 0: derive from the inputs
  float eps = 1e-6f;
  bool shared_mask = false;  // channel_mask rows are all equal: read row 0
};

Attrs read_attrs(const OrtKernelInfo* info) {
  Ort::ConstKernelInfo ki(info);
  Attrs a;
  try {
    a.group_size = ki.GetAttribute<int64_t>("group_size");
  } catch (const Ort::Exception&) {
  }
  try {
    a.eps = ki.GetAttribute<float>("eps");
  } catch (const Ort::Exception&) {
  }
  try {
    a.shared_mask = ki.GetAttribute<int64_t>("shared_channel_mask") != 0;
  } catch (const Ort::Exception&) {
  }
  return a;
}

struct Dims {
  int64_t B, N, C, Hs, gs;
  bool has_mask;
};

// Shapes of the inputs against each other; throws Ort::Exception on mismatch.
Dims check_shapes(Ort::KernelContext& ctx, const Attrs& at) {
  auto shape = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape(); };
  const auto xs = shape(0);
  if (xs.size() != 3) ORT_CXX_API_THROW("SdtMlp: x must be [B, N, C]", ORT_INVALID_ARGUMENT);
  Dims d{xs[0], xs[1], xs[2], 0, 0, false};
  const auto w1 = shape(5);
  if (w1.size() != 2 || w1[1] != d.C) ORT_CXX_API_THROW("SdtMlp: fc1_w must be [Hs, C]", ORT_INVALID_ARGUMENT);
  d.Hs = w1[0];
  const size_t n_in = ctx.GetInputCount();
  d.has_mask = n_in > 9 && static_cast<const OrtValue*>(ctx.GetInput(9)) != nullptr;
  int64_t groups = 0;
  if (d.has_mask) {
    const auto m = shape(9);
    if (m.size() != 2 || m[0] != d.B) ORT_CXX_API_THROW("SdtMlp: channel_mask must be [B, G]", ORT_INVALID_ARGUMENT);
    groups = m[1];
  }
  d.gs = at.group_size > 0 ? at.group_size : (groups > 0 ? d.Hs / groups : d.Hs);
  if (d.gs <= 0 || d.Hs % d.gs || (groups > 0 && groups * d.gs != d.Hs))
    ORT_CXX_API_THROW("SdtMlp: hidden is not channel_mask groups x group_size", ORT_INVALID_ARGUMENT);
  const std::vector<std::vector<int64_t>> want = {
      {d.B, d.C}, {d.B, d.C}, {d.B, d.C}, {d.B, d.N}, {d.Hs, d.C}, {d.Hs}, {d.C, d.Hs}, {d.C}};
  for (size_t i = 1; i <= 8; ++i)
    if (shape(i) != want[i - 1])
      ORT_CXX_API_THROW("SdtMlp: input " + std::to_string(i) + " has the wrong shape", ORT_INVALID_ARGUMENT);
  return d;
}

// ------------------------------------------------------------------------------------------------
// CUDA EP kernel: one implementation, the C ABI.
struct SdtMlpCudaKernel {
  Attrs at;
  SdtMlpCudaKernel(const OrtKernelInfo* info, bool /*cuda*/) : at(read_attrs(info)) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Dims d = check_shapes(ctx, at);
    auto x = ctx.GetInput(0);
    const auto et = x.GetTensorTypeAndShapeInfo().GetElementType();
    int dtype;
    switch (et) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: dtype = DYC_DTYPE_FLOAT32; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: dtype = DYC_DTYPE_FLOAT16; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: dtype = DYC_DTYPE_BFLOAT16; break;
      default: ORT_CXX_API_THROW("SdtMlp: x must be float, float16 or bfloat16", ORT_INVALID_ARGUMENT);
    }
    auto y = ctx.GetOutput(0, {d.B, d.N, d.C});
    auto ptr = [&](size_t i) { return ctx.GetInput(i).GetTensorRawData(); };
    const size_t ws_bytes = dyc_sdt_mlp_workspace_size(dtype, d.B, d.N, d.C, d.Hs, d.gs);
    const int device = x.GetTensorMemoryInfo().GetDeviceId();
    Ort::MemoryInfo mem("Cuda", OrtArenaAllocator, device, OrtMemTypeDefault);
    OrtAllocator* alloc = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(mem));
    if (!alloc) ORT_CXX_API_THROW("SdtMlp: no CUDA allocator for the workspace", ORT_FAIL);
    // ORT's CUDA arena hands out stream-ordered memory on this compute stream, so freeing right
    // after the asynchronous launch is safe; the extra 256 bytes let us align the base.
    void* raw = ws_bytes ? alloc->Alloc(alloc, ws_bytes + 256) : nullptr;
    void* ws = raw ? reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw) + 255) & ~uintptr_t(255)) : nullptr;
    auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    const int st = dyc_sdt_mlp_forward(dtype, ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5), ptr(6), ptr(7), ptr(8),
                                       d.has_mask ? ptr(9) : nullptr, y.GetTensorMutableRawData(), d.B, d.N, d.C,
                                       d.Hs, d.gs, 0, at.eps, ws, ws_bytes,
                                       d.has_mask && at.shared_mask ? DYC_SDT_MLP_FLAG_SHARED_CHANNEL_MASK : 0u,
                                       stream);
    if (raw) alloc->Free(alloc, raw);
    if (st != DYC_STATUS_OK)
      ORT_CXX_API_THROW(std::string("SdtMlp: dyc_sdt_mlp_forward: ") + dyc_sdt_mlp_status_string(st), ORT_FAIL);
  }
};

// ------------------------------------------------------------------------------------------------
// CPU EP kernel (float): the same maths, token by token, skipping dropped tokens.
struct SdtMlpCpuKernel {
  Attrs at;
  SdtMlpCpuKernel(const OrtKernelInfo* info, bool /*cuda*/) : at(read_attrs(info)) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Dims d = check_shapes(ctx, at);
    auto in = [&](size_t i) { return ctx.GetInput(i).GetTensorData<float>(); };
    const float *x = in(0), *shift = in(1), *scale = in(2), *gate = in(3), *keep = in(4);
    const float *w1 = in(5), *b1 = in(6), *w2 = in(7), *b2 = in(8);
    const float* cm = d.has_mask ? in(9) : nullptr;
    float* y = ctx.GetOutput(0, {d.B, d.N, d.C}).GetTensorMutableData<float>();
    const int64_t G = d.Hs / d.gs;
    std::vector<float> a(d.C), h(d.Hs);
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t n = 0; n < d.N; ++n) {
        const float* xr = x + (b * d.N + n) * d.C;
        float* yr = y + (b * d.N + n) * d.C;
        for (int64_t c = 0; c < d.C; ++c) yr[c] = xr[c];
        if (!(keep[b * d.N + n] > 0.5f)) continue;
        double mean = 0, var = 0;
        for (int64_t c = 0; c < d.C; ++c) mean += xr[c];
        mean /= d.C;
        for (int64_t c = 0; c < d.C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
        const double rstd = 1.0 / std::sqrt(var / d.C + at.eps);
        for (int64_t c = 0; c < d.C; ++c)
          a[c] = static_cast<float>((xr[c] - mean) * rstd) * (1.f + scale[b * d.C + c]) + shift[b * d.C + c];
        for (int64_t j = 0; j < d.Hs; ++j) {
          double s = b1[j];
          for (int64_t c = 0; c < d.C; ++c) s += static_cast<double>(w1[j * d.C + c]) * a[c];
          const double m = cm ? cm[(at.shared_mask ? 0 : b) * G + j / d.gs] : 1.0;
          const double v = s * m;
          h[j] = static_cast<float>(0.5 * v * (1.0 + std::tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))));
        }
        for (int64_t c = 0; c < d.C; ++c) {
          double s = b2[c];
          for (int64_t j = 0; j < d.Hs; ++j) s += static_cast<double>(w2[c * d.Hs + j]) * h[j];
          yr[c] = xr[c] + gate[b * d.C + c] * static_cast<float>(s);
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// dyc::LnModulate and dyc::GatedResidual

std::vector<int64_t> in_shape(Ort::KernelContext& ctx, size_t i) {
  return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetShape();
}

int ew_dtype(ONNXTensorElementDataType et, const char* op) {
  switch (et) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return DYC_EW_FLOAT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return DYC_EW_FLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return DYC_EW_BFLOAT16;
    default: ORT_CXX_API_THROW(std::string(op) + ": inputs must be float, float16 or bfloat16", ORT_INVALID_ARGUMENT);
  }
}

const char* ew_status(int st) {
  switch (st) {
    case DYC_EW_BAD_SHAPE: return "unsupported shape";
    case DYC_EW_BAD_DTYPE: return "unsupported element type";
    default: return "kernel launch failed";
  }
}

// x [B, N, C] and the per-row [B, C] inputs at `rows`, the [B, N, C] ones at `full`
std::vector<int64_t> check_bnc(Ort::KernelContext& ctx, const char* op, std::initializer_list<size_t> rows,
                               std::initializer_list<size_t> full) {
  const auto xs = in_shape(ctx, 0);
  if (xs.size() != 3) ORT_CXX_API_THROW(std::string(op) + ": x must be [B, N, C]", ORT_INVALID_ARGUMENT);
  for (size_t i : rows)
    if (in_shape(ctx, i) != std::vector<int64_t>{xs[0], xs[2]})
      ORT_CXX_API_THROW(std::string(op) + ": input " + std::to_string(i) + " must be [B, C]", ORT_INVALID_ARGUMENT);
  for (size_t i : full)
    if (in_shape(ctx, i) != xs)
      ORT_CXX_API_THROW(std::string(op) + ": input " + std::to_string(i) + " must have x's shape", ORT_INVALID_ARGUMENT);
  return xs;
}

float read_eps(const OrtKernelInfo* info) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<float>("eps");
  } catch (const Ort::Exception&) {
    return 1e-6f;
  }
}

int64_t read_ones_column(const OrtKernelInfo* info) {
  int64_t k = 0;
  try {
    k = Ort::ConstKernelInfo(info).GetAttribute<int64_t>("ones_column");
  } catch (const Ort::Exception&) {
  }
  if (k < 0 || k > 1024) ORT_CXX_API_THROW("LnModulate: ones_column must be in [0, 1024]", ORT_INVALID_ARGUMENT);
  return k;
}

struct LnModulateKernel {
  float eps;
  int64_t ones;  // ones_column: 0, or the multiple the augmented width is rounded up to
  bool cuda;
  LnModulateKernel(const OrtKernelInfo* info, bool cuda_) : eps(read_eps(info)), ones(read_ones_column(info)),
                                                            cuda(cuda_) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto xs = check_bnc(ctx, "LnModulate", {1, 2}, {});
    const int64_t B = xs[0], N = xs[1], C = xs[2];
    const int64_t Co = ones ? (C + ones) / ones * ones : C;  // round_up(C + 1, ones)
    auto out = ctx.GetOutput(0, {B, N, Co});
    if (cuda) {
      auto x = ctx.GetInput(0);
      const int st = dyc_ln_modulate(ew_dtype(x.GetTensorTypeAndShapeInfo().GetElementType(), "LnModulate"),
                                     x.GetTensorRawData(), ctx.GetInput(1).GetTensorRawData(),
                                     ctx.GetInput(2).GetTensorRawData(), out.GetTensorMutableRawData(), B, N, C, Co,
                                     eps, static_cast<cudaStream_t>(ctx.GetGPUComputeStream()));
      if (st != DYC_EW_OK) ORT_CXX_API_THROW(std::string("LnModulate: ") + ew_status(st), ORT_FAIL);
      return;
    }
    const float *x = ctx.GetInput(0).GetTensorData<float>(), *shift = ctx.GetInput(1).GetTensorData<float>(),
                *scale = ctx.GetInput(2).GetTensorData<float>();
    float* y = out.GetTensorMutableData<float>();
    for (int64_t r = 0; r < B * N; ++r) {
      const float* xr = x + r * C;
      float* yr = y + r * Co;
      const int64_t b = r / N;
      double mean = 0, var = 0;
      for (int64_t c = 0; c < C; ++c) mean += xr[c];
      mean /= C;
      for (int64_t c = 0; c < C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
      const double rstd = 1.0 / std::sqrt(var / C + eps);
      for (int64_t c = 0; c < C; ++c)
        yr[c] = static_cast<float>((xr[c] - mean) * rstd * (1.0 + scale[b * C + c]) + shift[b * C + c]);
      for (int64_t c = C; c < Co; ++c) yr[c] = c == C ? 1.f : 0.f;
    }
  }
};

struct GatedResidualKernel {
  bool cuda;
  GatedResidualKernel(const OrtKernelInfo*, bool cuda_) : cuda(cuda_) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto xs = check_bnc(ctx, "GatedResidual", {1}, {2});
    const int64_t B = xs[0], N = xs[1], C = xs[2];
    const bool has_bias = ctx.GetInputCount() > 3 && static_cast<const OrtValue*>(ctx.GetInput(3)) != nullptr;
    if (has_bias && in_shape(ctx, 3) != std::vector<int64_t>{C})
      ORT_CXX_API_THROW("GatedResidual: bias must be [C]", ORT_INVALID_ARGUMENT);
    auto out = ctx.GetOutput(0, xs);
    if (cuda) {
      auto x = ctx.GetInput(0);
      const int st = dyc_gated_residual(ew_dtype(x.GetTensorTypeAndShapeInfo().GetElementType(), "GatedResidual"),
                                        x.GetTensorRawData(), ctx.GetInput(1).GetTensorRawData(),
                                        ctx.GetInput(2).GetTensorRawData(),
                                        has_bias ? ctx.GetInput(3).GetTensorRawData() : nullptr,
                                        out.GetTensorMutableRawData(), B, N, C,
                                        static_cast<cudaStream_t>(ctx.GetGPUComputeStream()));
      if (st != DYC_EW_OK) ORT_CXX_API_THROW(std::string("GatedResidual: ") + ew_status(st), ORT_FAIL);
      return;
    }
    const float *x = ctx.GetInput(0).GetTensorData<float>(), *gate = ctx.GetInput(1).GetTensorData<float>(),
                *y = ctx.GetInput(2).GetTensorData<float>();
    const float* bias = has_bias ? ctx.GetInput(3).GetTensorData<float>() : nullptr;
    float* o = out.GetTensorMutableData<float>();
    for (int64_t i = 0; i < B * N * C; ++i) {
      const int64_t c = i % C, b = i / (N * C);
      o[i] = x[i] + gate[b * C + c] * (y[i] + (bias ? bias[c] : 0.f));
    }
  }
};

struct TokenKeepKernel {
  bool cuda;
  TokenKeepKernel(const OrtKernelInfo*, bool cuda_) : cuda(cuda_) {}

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const auto hs = in_shape(ctx, 0);
    if (hs.empty()) ORT_CXX_API_THROW("TokenKeep: h must be [..., H]", ORT_INVALID_ARGUMENT);
    const int64_t H = hs.back();
    int64_t M = 1;
    for (size_t i = 0; i + 1 < hs.size(); ++i) M *= hs[i];
    auto numel = [&](size_t i) { return ctx.GetInput(i).GetTensorTypeAndShapeInfo().GetElementCount(); };
    if (numel(1) != static_cast<size_t>(H) || numel(2) != static_cast<size_t>(H) || numel(3) != 1)
      ORT_CXX_API_THROW("TokenKeep: b1 and w2 must hold H values and b2 one", ORT_INVALID_ARGUMENT);
    auto keep = ctx.GetOutput(0, std::vector<int64_t>(hs.begin(), hs.end() - 1));
    if (M == 0) return;
    if (cuda) {
      auto h = ctx.GetInput(0);
      const int st = dyc_token_keep(ew_dtype(h.GetTensorTypeAndShapeInfo().GetElementType(), "TokenKeep"),
                                    h.GetTensorRawData(), ctx.GetInput(1).GetTensorRawData(),
                                    ctx.GetInput(2).GetTensorRawData(), ctx.GetInput(3).GetTensorRawData(),
                                    keep.GetTensorMutableRawData(), M, H,
                                    static_cast<cudaStream_t>(ctx.GetGPUComputeStream()));
      if (st != DYC_EW_OK) ORT_CXX_API_THROW(std::string("TokenKeep: ") + ew_status(st), ORT_FAIL);
      return;
    }
    const float *h = ctx.GetInput(0).GetTensorData<float>(), *b1 = ctx.GetInput(1).GetTensorData<float>(),
                *w2 = ctx.GetInput(2).GetTensorData<float>(), *b2 = ctx.GetInput(3).GetTensorData<float>();
    float* k = keep.GetTensorMutableData<float>();
    for (int64_t m = 0; m < M; ++m) {
      float z = 0.f;
      for (int64_t j = 0; j < H; ++j) z += std::max(h[m * H + j] + b1[j], 0.f) * w2[j];
      z += b2[0];
      k[m] = 1.f / (1.f + std::exp(-z)) > 0.5f ? 1.f : 0.f;
    }
  }
};

// Every op of the library: name, execution provider, inputs (the last `optional` of them
// optional), all of element type T, and one output of type T. Kernel(info, on_cuda).
template <class Kernel, ONNXTensorElementDataType T>
struct Op : Ort::CustomOpBase<Op<Kernel, T>, Kernel> {
  const char* ep;
  const char* name;
  size_t inputs, optional;
  Op(const char* ep_, const char* name_, size_t inputs_, size_t optional_)
      : ep(ep_), name(name_), inputs(inputs_), optional(optional_) {}
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const {
    return new Kernel(info, std::string(ep) == "CUDAExecutionProvider");
  }
  const char* GetName() const { return name; }
  const char* GetExecutionProviderType() const { return ep; }
  size_t GetInputTypeCount() const { return inputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return T; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i + optional >= inputs ? OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
                                  : OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return T; }
};

}  // namespace

// What the ops take, for runtimes to check before they load graphs that need more (a library
// without this symbol is 1): 1 = SdtMlp, LnModulate, GatedResidual; 2 = + TokenKeep and
// LnModulate's ones_column (an older library would ignore the attribute and give a narrower output).
extern "C" __attribute__((visibility("default"))) int dyc_ort_ops_abi() { return 2; }

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  // Ops and domain live as long as the process: sessions keep pointers to them.
  constexpr auto F32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, F16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                 BF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  constexpr const char *kCuda = "CUDAExecutionProvider", *kCpu = "CPUExecutionProvider";
  // SdtMlp: 10 inputs, channel_mask optional; LnModulate: 3; GatedResidual: 4, bias optional; TokenKeep: 4
  static Op<SdtMlpCudaKernel, F32> sdt_cuda_f32(kCuda, "SdtMlp", 10, 1);
  static Op<SdtMlpCudaKernel, F16> sdt_cuda_f16(kCuda, "SdtMlp", 10, 1);
  static Op<SdtMlpCudaKernel, BF16> sdt_cuda_bf16(kCuda, "SdtMlp", 10, 1);
  static Op<SdtMlpCpuKernel, F32> sdt_cpu_f32(kCpu, "SdtMlp", 10, 1);
  static Op<LnModulateKernel, F32> ln_cuda_f32(kCuda, "LnModulate", 3, 0), ln_cpu_f32(kCpu, "LnModulate", 3, 0);
  static Op<LnModulateKernel, F16> ln_cuda_f16(kCuda, "LnModulate", 3, 0);
  static Op<LnModulateKernel, BF16> ln_cuda_bf16(kCuda, "LnModulate", 3, 0);
  static Op<GatedResidualKernel, F32> gr_cuda_f32(kCuda, "GatedResidual", 4, 1),
      gr_cpu_f32(kCpu, "GatedResidual", 4, 1);
  static Op<GatedResidualKernel, F16> gr_cuda_f16(kCuda, "GatedResidual", 4, 1);
  static Op<GatedResidualKernel, BF16> gr_cuda_bf16(kCuda, "GatedResidual", 4, 1);
  static Op<TokenKeepKernel, F32> tk_cuda_f32(kCuda, "TokenKeep", 4, 0), tk_cpu_f32(kCpu, "TokenKeep", 4, 0);
  static Op<TokenKeepKernel, F16> tk_cuda_f16(kCuda, "TokenKeep", 4, 0);
  static Op<TokenKeepKernel, BF16> tk_cuda_bf16(kCuda, "TokenKeep", 4, 0);
  static std::vector<Ort::CustomOpDomain> domains;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  try {
    Ort::CustomOpDomain domain(kDomain);
    for (auto* op : std::initializer_list<OrtCustomOp*>{&sdt_cuda_f32, &sdt_cuda_f16, &sdt_cuda_bf16, &sdt_cpu_f32,
                                                        &ln_cuda_f32, &ln_cpu_f32, &ln_cuda_f16, &ln_cuda_bf16,
                                                        &gr_cuda_f32, &gr_cpu_f32, &gr_cuda_f16, &gr_cuda_bf16,
                                                        &tk_cuda_f32, &tk_cpu_f32, &tk_cuda_f16, &tk_cuda_bf16})
      domain.Add(op);
    Ort::UnownedSessionOptions(options).Add(domain);
    domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}
