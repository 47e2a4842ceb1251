// dyc C++ runtime: run a compiled DyDiT bundle (`NAME.dyc/`, docs/bundle.md) from C++.
//
//   dyc::Bundle bundle = dyc::Bundle::load("dydit-xl.dyc");          // verifies schema + sha256
//   auto engine = dyc::make_onnxruntime_engine(bundle);               // or make_tensorrt_engine
//   dyc::SampleOptions opt;  opt.sampler = dyc::SamplerKind::ddim;  opt.steps = 50;  opt.cfg_scale = 4.0f;
//   dyc::Tensor latents = dyc::sample(*engine, bundle, noise, {207, 360}, opt);
//
// The maths matches the Python runtime (`dyc run`): DiT's linear betas (1e-4..0.02, T = 1000),
// DiT's timestep respacing, the model always called with the original t, DDIM (eta = 0) and
// DPM-Solver++ (2M) on the eps channels, CFG over one doubled batch (conditional half first, the
// null class = num_classes). Every sampling step maps t -> the group whose t-interval holds it,
// feeds that group's per-t head / channel masks, and runs that group's engine.
//
// Errors: every function throws dyc::Error (or BundleError for a bad bundle) with a one-line
// message that names the file or the argument at fault. Nothing here prints.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace dyc {

// ---- errors --------------------------------------------------------------------------------

/// Base of every exception the library throws; what() is one line meant for a user.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The bundle is missing, altered, of another schema, or inconsistent.
class BundleError : public Error {
 public:
  using Error::Error;
};

inline constexpr int kNumTrainTimesteps = 1000;
/// The bundle schema version this runtime reads (the Python loader's SCHEMA_VERSION).
inline constexpr int kBundleSchemaVersion = 1;

// ---- tensors -------------------------------------------------------------------------------

/// A dense row-major float32 tensor: the latents, the noise and the model outputs.
struct Tensor {
  std::vector<std::int64_t> shape;
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::vector<std::int64_t> shape_, float fill = 0.0f);
  std::size_t numel() const { return data.size(); }
};

/// Reads a float32 (or float64, converted) C-order .npy file (numpy's format 1.0/2.0/3.0).
Tensor read_npy(const std::filesystem::path& path);
/// Writes a float32 C-order .npy file (format 1.0), readable by numpy.load.
void write_npy(const std::filesystem::path& path, const Tensor& tensor);

// ---- the bundle ----------------------------------------------------------------------------

/// The model configuration stored in the manifest (`model.config`).
struct ModelConfig {
  int input_size = 32;
  int patch_size = 2;
  int in_channels = 4;
  int hidden_size = 1152;
  int depth = 28;
  int num_heads = 16;
  double mlp_ratio = 4.0;
  int num_classes = 1000;
  bool learn_sigma = true;
  bool dynamic = true;

  int out_channels() const { return learn_sigma ? 2 * in_channels : in_channels; }
  /// The class id of the unconditional (null) embedding used by classifier-free guidance.
  int null_class() const { return num_classes; }
};

enum class Dtype { fp32, fp16, bf16 };
std::string to_string(Dtype dtype);

/// One engine of the bundle: a contiguous t-interval computing the union of its members' heads.
struct Group {
  int index = 0;
  int t_lo = 0;  ///< first timestep served (inclusive)
  int t_hi = 0;  ///< last timestep served (inclusive)
  /// Per layer: the original indices of the heads / channel groups the engine keeps, in the
  /// order of its sliced weights (slot j of the mask input is unit heads[l][j]).
  std::vector<std::vector<int>> heads, channels;
  std::vector<bool> vary_head, vary_channel;  ///< per layer: members differ -> mask input used
  bool needs_head_mask = false;               ///< the graph takes `head_mask` [B, L, head_slots]
  bool needs_channel_mask = false;            ///< the graph takes `channel_mask` [B, L, channel_slots]
  int head_slots = 0, channel_slots = 0;
  std::filesystem::path onnx_std;   ///< ONNX with standard ops only (SDT decomposed)
  std::filesystem::path onnx_trt;   ///< ONNX with the dyc::SdtMlp custom op
  std::filesystem::path onnx_cuda;  ///< ONNX Runtime CUDA EP graph (empty in bundles of older dyc)

  bool contains(int t) const { return t_lo <= t && t <= t_hi; }
};

/// A loaded and verified bundle. Cheap to copy (shares its immutable state).
class Bundle {
 public:
  /// Opens `dir`/manifest.json and checks it as the Python loader does: the format tag, the
  /// schema version, the manifest's self-checksum, its internal consistency (groups tile
  /// t = 0..999, unions and vary flags match the per-t masks) and every file's size and, when
  /// `verify_checksums`, sha256. Throws BundleError naming the first problem found.
  static Bundle load(const std::filesystem::path& dir, bool verify_checksums = true);

  const std::filesystem::path& path() const;
  const ModelConfig& config() const;
  Dtype dtype() const;
  const std::vector<Group>& groups() const;
  /// The manifest's self-checksum: identifies this compile (TensorRT plans record it).
  const std::string& manifest_sha256() const;

  /// A file of the manifest's file table: its size and sha256 (throws BundleError if not listed).
  struct FileInfo {
    std::uint64_t bytes = 0;
    std::string sha256;
  };
  FileInfo file_info(const std::string& name) const;

  /// The group whose t-interval holds original timestep t (0..999); throws Error otherwise.
  const Group& group_for_t(int t) const;
  /// t's head mask input of its group: [L, head_slots] row-major 0/1 (empty if not needed).
  std::vector<float> head_mask(int t) const;
  /// t's channel-group mask input of its group: [L, channel_slots] (empty if not needed).
  std::vector<float> channel_mask(int t) const;

 private:
  struct Impl;
  explicit Bundle(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// ---- engines -------------------------------------------------------------------------------

/// One model call: the graph inputs of a group for a batch of B latents.
struct ModelInputs {
  const Tensor* x = nullptr;                 ///< [B, C_in, S, S]
  std::vector<std::int64_t> t;               ///< [B] original timesteps
  std::vector<std::int64_t> y;               ///< [B] class ids (null_class() for unconditional)
  std::vector<float> head_mask;              ///< [B, L, head_slots] when the group needs it
  std::vector<float> channel_mask;           ///< [B, L, channel_slots] when the group needs it
};

/// Runs the group engines of one bundle. Groups run one after another, so an implementation
/// may share activation memory between them. Not thread-safe: use one Engine per thread.
class Engine {
 public:
  virtual ~Engine() = default;
  /// e.g. "onnxruntime (CPUExecutionProvider)".
  virtual std::string name() const = 0;
  /// The model output [B, C_out, S, S] (eps, then the variance channels when learn_sigma).
  virtual Tensor run(const Group& group, const ModelInputs& inputs) = 0;
};

/// Whether this build of the library has the ONNX Runtime / TensorRT engine compiled in.
bool has_onnxruntime();
bool has_tensorrt();

struct OnnxRuntimeOptions {
  int intra_op_threads = 0;  ///< 0: ONNX Runtime's default
  /// libdyc_ort_ops.so (custom ops dyc::SdtMlp, dyc::LnModulate, dyc::GatedResidual, dyc::TokenKeep): needed by the
  /// `trt` and the `cuda` graphs.
  std::filesystem::path custom_op_library;
  /// "std", "trt" or "cuda"; empty: "cuda" on CUDA when the bundle has it and the library is
  /// given, "trt" when a custom-op library is given, else "std".
  std::string variant;
  bool cuda = false;  ///< the CUDA execution provider (needs an onnxruntime-gpu build and a CUDA build of dyc)
  int device = 0;     ///< CUDA device
  bool cuda_graphs = true;  ///< CUDA: ONNX Runtime captures one CUDA graph per (group, batch) and replays it
  /// One copy of weights.bin for every group session (the weights become graph inputs bound to
  /// views of it); false: each session owns its weights (K copies; on the CPU, pre-packed GEMMs).
  bool share_weights = true;
  /// One activation arena for every group session (groups never run at once), registered with the
  /// engine's ONNX Runtime environment (CPU, or the CUDA device); false: one arena per session.
  bool share_arena = true;
  /// CUDA: the CUBLAS_WORKSPACE_CONFIG each session's cuBLAS handle is created with (cuBLAS gives
  /// every handle its own default workspace, ~60 MB on an H200; groups run one at a time on one
  /// stream, so one 4 MiB pool is enough); empty: cuBLAS's default. One already in the environment
  /// wins. cuBLAS reads it when the process's first handle is created: it applies when these
  /// sessions are the process's first cuBLAS users (else set it at the process's start).
  std::string cublas_workspace = ":4096:1";
};
/// Opens one ONNX Runtime session per group (throws Error if built without ONNX Runtime). Every
/// graph and weights.bin are read once and checked against the manifest's sha256 on the bytes used.
std::unique_ptr<Engine> make_onnxruntime_engine(const Bundle& bundle, const OnnxRuntimeOptions& options = {});

struct TensorRTOptions {
  int device = 0;
  /// Library that registers the SdtMlp plugin, for plans built with it; empty: $DYC_TRT_PLUGIN,
  /// else the path recorded at build time.
  std::filesystem::path plugin_library;
  bool verify_plans = true;  ///< check each plan's sha256 against the engine manifest
};
/// Deserializes the bundle's TensorRT plans, described by `engines/trt_manifest.json` (written by
/// `dyc build-engines`). Throws Error if built without TensorRT, if the bundle has no plans, if
/// they were built for an earlier compile, another TensorRT version or another GPU, or if a plan
/// is missing or altered.
std::unique_ptr<Engine> make_tensorrt_engine(const Bundle& bundle, const TensorRTOptions& options = {});

// ---- timesteps and samplers ----------------------------------------------------------------

enum class SamplerKind { ddim, dpm_solver_pp };
/// "ddim", "dpm-solver++" (aliases dpmsolver++, dpm++, dpmpp); throws Error otherwise.
SamplerKind parse_sampler(const std::string& name);
std::string to_string(SamplerKind kind);

/// DiT's respacing: "250" -> 0, 4, ..., 995, 999; "ddim50" -> 0, 20, ..., 980 (ascending).
std::vector<int> space_timesteps(int num_timesteps, const std::string& section_counts);
/// The original timesteps a sampler visits, in sampling order (descending), as dyc.timesteps.
std::vector<int> sampler_timesteps(SamplerKind kind, int steps, int num_timesteps = kNumTrainTimesteps);
/// alpha-bar of DiT's linear beta schedule (1e-4 .. 0.02 at T = 1000), in double.
std::vector<double> linear_alphas_cumprod(int num_timesteps = kNumTrainTimesteps);

/// One sampling chain, driven one model call at a time: for i, t = timesteps()[i]:
/// x = step(i, x, eps(x, t)). Step coefficients are double, the latents float32, in the
/// operation order of the Python runtime so both give the same latents.
class Sampler {
 public:
  virtual ~Sampler() = default;
  const std::vector<int>& timesteps() const { return timesteps_; }
  /// Advances x (C-order, any shape) in place given the eps prediction at call i.
  virtual void step(std::size_t i, std::vector<float>& x, const std::vector<float>& eps) = 0;

 protected:
  explicit Sampler(std::vector<int> timesteps);
  std::vector<int> timesteps_;
  std::vector<double> acp_, acp_next_;  // alpha-bar at each call and at the call after (1 at the end)
};
std::unique_ptr<Sampler> make_sampler(SamplerKind kind, int steps);

struct SampleOptions {
  SamplerKind sampler = SamplerKind::ddim;
  int steps = 50;
  float cfg_scale = 1.0f;     ///< 1: no guidance (and no doubled batch)
  bool official_cfg = false;  ///< DiT's forward_with_cfg quirk: guide only the first 3 channels
  /// Called after each step (i, t, group index): progress reporting, cancellation by throwing.
  std::function<void(std::size_t, int, int)> on_step;
};

/// Samples latents from `noise` [B, C_in, S, S] for class ids `classes` (size B, each in
/// 0..num_classes-1). Returns the final latents [B, C_in, S, S].
Tensor sample(Engine& engine, const Bundle& bundle, const Tensor& noise, const std::vector<std::int64_t>& classes,
              const SampleOptions& options);

}  // namespace dyc
