// One copy of a bundle's weights for all ONNX Runtime sessions (the C++ side of
// dyc/backends/ort_weights.py).
//
// ONNX Runtime keeps its own copy of every initializer per session (on the CPU also pre-packed
// GEMM weights), so K group sessions would hold K copies of weights.bin. Instead each group graph
// is rewritten in memory so that its initializers stored in weights.bin become graph inputs of the
// same name and shape, and every session is bound to views into one buffer (host memory, or one
// device allocation on CUDA) that holds only the byte ranges the loaded graphs reference. The
// rewrite edits the protobuf wire format directly: no protobuf or ONNX library is needed.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dyc/runtime.hpp"

namespace dyc::detail {

/// A graph input that is a tensor of the weights file.
struct WeightRef {
  std::string name;
  int onnx_type = 0;  // onnx.TensorProto.DataType
  std::vector<std::int64_t> shape;
  std::uint64_t offset = 0, length = 0;
};

/// The ONNX model `model` with every initializer whose external data lives in `weights_file`
/// turned into a graph input; `refs` receives where each one's bytes are. Throws Error on a
/// malformed model or an initializer that does not fit `weights_size` bytes (`what` names it).
std::string weights_as_inputs(const std::string& model, const std::string& weights_file, std::uint64_t weights_size,
                              std::vector<WeightRef>& refs, const std::string& what);

/// Bytes [src, src + length) of the weights file, held at [dst, dst + length) of the compacted buffer.
struct WeightSpan {
  std::uint64_t src = 0, dst = 0, length = 0;
};

/// A compacted span keeps its start's offset modulo this (cache lines, vector loads).
constexpr std::uint64_t kSpanAlign = 64;

/// The byte ranges of the weights file that `refs` use, sorted, merged where they overlap or touch,
/// and laid out back to back: the shared buffer holds only what the loaded graphs read, not the
/// other variants' tensors. Each span lands at a destination congruent to its source modulo
/// kSpanAlign (a multiple of it, as the store aligns every tensor), so views keep their alignment.
std::vector<WeightSpan> spans_of(const std::vector<WeightRef>& refs);

/// Bytes of the compacted buffer that `spans` lay out.
std::uint64_t spans_size(const std::vector<WeightSpan>& spans);

/// Moves every ref's offset into the compacted buffer of `spans` (throws Error when none holds it).
void remap(std::vector<WeightRef>& refs, const std::vector<WeightSpan>& spans);

/// Hands `put(dst, data, size)` the parts of the streamed chunk [off, off + size) that lie inside
/// `spans`, at their compacted offsets (a chunk may cross span boundaries).
void copy_spans(const std::vector<WeightSpan>& spans, std::uint64_t off, const char* data, std::size_t size,
                const std::function<void(std::uint64_t, const char*, std::size_t)>& put);

/// A whole bundle file, read once and checked against the manifest's size and sha256.
std::string read_checked(const Bundle& bundle, const std::string& name);

/// Streams a bundle file to `sink(offset, data, size)` in chunks, checking size and sha256 at the end
/// (throws BundleError on a mismatch: the caller must not use what it received).
void stream_checked(const Bundle& bundle, const std::string& name,
                    const std::function<void(std::uint64_t, const char*, std::size_t)>& sink);

}  // namespace dyc::detail
