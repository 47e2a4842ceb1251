// Element-type conversions on the device for the ONNX Runtime CUDA engine: the sampler keeps its
// latents in float32 on the host (the Python runtime's arithmetic), the graphs take and return the
// bundle's dtype; converting on the device keeps the host to two small copies per step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace {

template <class T>
__device__ T from_float(float v);
template <>
__device__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class T>
__global__ void to_dtype(const float* in, T* out, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = from_float<T>(in[i]);
  }
}

template <class T>
__global__ void to_float(const T* in, float* out, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<float>(in[i]);
  }
}

unsigned blocks(std::size_t n) {
  const std::size_t b = (n + 255) / 256;
  return static_cast<unsigned>(b < 4096 ? (b ? b : 1) : 4096);
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16. Return cudaError_t of the launch.
extern "C" int dyc_engine_from_float(const float* in, void* out, int dtype, std::size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case 0: return cudaMemcpyAsync(out, in, n * sizeof(float), cudaMemcpyDeviceToDevice, stream);
    case 1: to_dtype<<<blocks(n), 256, 0, stream>>>(in, static_cast<__half*>(out), n); break;
    case 2: to_dtype<<<blocks(n), 256, 0, stream>>>(in, static_cast<__nv_bfloat16*>(out), n); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" int dyc_engine_to_float(const void* in, float* out, int dtype, std::size_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case 0: return cudaMemcpyAsync(out, in, n * sizeof(float), cudaMemcpyDeviceToDevice, stream);
    case 1: to_float<<<blocks(n), 256, 0, stream>>>(static_cast<const __half*>(in), out, n); break;
    case 2: to_float<<<blocks(n), 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(in), out, n); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
