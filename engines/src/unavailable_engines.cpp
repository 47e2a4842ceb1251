// Factories of the engines this build was configured without: they say how to get them.
#include "dyc/runtime.hpp"

namespace dyc {

#ifndef DYC_WITH_ONNXRUNTIME
bool has_onnxruntime() { return false; }
std::unique_ptr<Engine> make_onnxruntime_engine(const Bundle&, const OnnxRuntimeOptions&) {
  throw Error("this dyc runtime was built without ONNX Runtime: run engines/fetch_onnxruntime.sh (or set "
              "ONNXRUNTIME_ROOT to an ONNX Runtime with include/ and lib/) and reconfigure");
}
#endif

#ifndef DYC_WITH_TENSORRT
bool has_tensorrt() { return false; }
std::unique_ptr<Engine> make_tensorrt_engine(const Bundle&, const TensorRTOptions&) {
  throw Error("this dyc runtime was built without TensorRT: install TensorRT (NvInfer.h, libnvinfer) and the "
              "CUDA toolkit, then reconfigure with -DTENSORRT_ROOT=...");
}
#endif

}  // namespace dyc
