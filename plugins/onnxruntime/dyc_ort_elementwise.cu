// The attention branch's glue for the ONNX Runtime `cuda` graphs, one kernel each (the stock ops
// take three to five passes over [B, N, C] and a broadcast copy of the bias per GEMM):
//   ln_modulate:     out = LayerNorm(x) * (1 + scale[b]) + shift[b]        (no affine, eps)
//   gated_residual:  out = x + gate[b] * (y + bias)                       (bias may be null)
// float, half and bfloat16 storage; all arithmetic in float; one rounding at the store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dyc_ort_elementwise.h"

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

constexpr int kThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red is reused between the two sums
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) s += red[w];
  return s;
}

// One block per row of C; the row is held in shared memory as float (two-pass mean/variance).
template <class T>
__global__ void __launch_bounds__(kThreads) ln_modulate_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                                               const T* __restrict__ scale, T* __restrict__ out,
                                                               int64_t rows_per_batch, int C, float eps) {
  extern __shared__ float row[];
  __shared__ float red[kThreads / 32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / rows_per_batch;
  const T* xr = x + r * C;
  float s = 0.f;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    const float v = to_f(xr[c]);
    row[c] = v;
    s += v;
  }
  const float mean = block_sum(s, red) / C;
  float q = 0.f;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    const float d = row[c] - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, red) / C + eps);
  const T* sh = shift + b * C;
  const T* sc = scale + b * C;
  T* o = out + r * C;
  for (int c = threadIdx.x; c < C; c += kThreads)
    o[c] = from_f<T>((row[c] - mean) * rstd * (1.f + to_f(sc[c])) + to_f(sh[c]));
}

template <class T>
__global__ void gated_residual_kernel(const T* __restrict__ x, const T* __restrict__ gate, const T* __restrict__ y,
                                      const T* __restrict__ bias, T* __restrict__ out, int64_t n, int64_t per_batch,
                                      int C) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % C);
    const int64_t b = i / per_batch;
    const float yv = to_f(y[i]) + (bias ? to_f(bias[c]) : 0.f);
    out[i] = from_f<T>(to_f(x[i]) + to_f(gate[b * C + c]) * yv);
  }
}

template <class T>
int launch_ln(const void* x, const void* shift, const void* scale, void* out, int64_t B, int64_t N, int C, float eps,
              cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(C) * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(ln_modulate_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess)
      return DYC_EW_LAUNCH_FAILED;
  }
  ln_modulate_kernel<T><<<static_cast<unsigned>(B * N), kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(scale), static_cast<T*>(out), N, C,
      eps);
  return cudaGetLastError() == cudaSuccess ? DYC_EW_OK : DYC_EW_LAUNCH_FAILED;
}

template <class T>
int launch_gr(const void* x, const void* gate, const void* y, const void* bias, void* out, int64_t B, int64_t N, int C,
              cudaStream_t stream) {
  const int64_t n = B * N * C;
  const int64_t blocks = (n + 255) / 256;
  gated_residual_kernel<T><<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), 256, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(gate), static_cast<const T*>(y), static_cast<const T*>(bias),
      static_cast<T*>(out), n, N * C, C);
  return cudaGetLastError() == cudaSuccess ? DYC_EW_OK : DYC_EW_LAUNCH_FAILED;
}

}  // namespace

extern "C" int dyc_ln_modulate(int dtype, const void* x, const void* shift, const void* scale, void* out, int64_t B,
                               int64_t N, int64_t C, float eps, cudaStream_t stream) {
  if (B <= 0 || N <= 0 || C <= 0 || C > 32768 || B * N > 0x7fffffffLL) return DYC_EW_BAD_SHAPE;
  switch (dtype) {
    case DYC_EW_FLOAT32: return launch_ln<float>(x, shift, scale, out, B, N, static_cast<int>(C), eps, stream);
    case DYC_EW_FLOAT16: return launch_ln<__half>(x, shift, scale, out, B, N, static_cast<int>(C), eps, stream);
    case DYC_EW_BFLOAT16: return launch_ln<__nv_bfloat16>(x, shift, scale, out, B, N, static_cast<int>(C), eps, stream);
  }
  return DYC_EW_BAD_DTYPE;
}

extern "C" int dyc_gated_residual(int dtype, const void* x, const void* gate, const void* y, const void* bias, void* out,
                                  int64_t B, int64_t N, int64_t C, cudaStream_t stream) {
  if (B <= 0 || N <= 0 || C <= 0 || C > 0x7fffffffLL) return DYC_EW_BAD_SHAPE;
  switch (dtype) {
    case DYC_EW_FLOAT32: return launch_gr<float>(x, gate, y, bias, out, B, N, static_cast<int>(C), stream);
    case DYC_EW_FLOAT16: return launch_gr<__half>(x, gate, y, bias, out, B, N, static_cast<int>(C), stream);
    case DYC_EW_BFLOAT16: return launch_gr<__nv_bfloat16>(x, gate, y, bias, out, B, N, static_cast<int>(C), stream);
  }
  return DYC_EW_BAD_DTYPE;
}
