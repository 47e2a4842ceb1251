// The attention branch's glue for the ONNX Runtime `cuda` graphs, one kernel each (the stock ops
// take three to five passes over [B, N, C] and a broadcast copy of the bias per GEMM):
//   ln_modulate:     out = LayerNorm(x) * (1 + scale[b]) + shift[b]        (no affine, eps)
//                    [optionally followed by a column of ones and zero padding: the GEMM after it
//                    takes its bias as one more weight row]
//   gated_residual:  out = x + gate[b] * (y + bias)                       (bias may be null)
//   token_keep:      keep = sigmoid(relu(h + b1) . w2 + b2) > 0.5          (the SDT router's head after
//                    its first, bias-free GEMM: bias, ReLU, the one-output GEMM, sigmoid, threshold)
// float, half and bfloat16 storage; all arithmetic in float; one rounding at the store.
//
// Both move 16-byte vectors with 32-bit index arithmetic where the width and the pointers allow it
// (every DiT width does); a scalar kernel takes the rest. The scalar forms were ~3x off the H200's
// bandwidth (bench/RESULTS.md, issue 16).
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

// 16 bytes of T, loaded and stored as one uint4
template <class T>
struct alignas(16) Vec {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};
template <class T> __device__ __forceinline__ Vec<T> load(const T* p) {
  Vec<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}
template <class T> __device__ __forceinline__ void store(T* p, const Vec<T>& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (any multiple of 32 threads up to 1024); red holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // red is reused between the two sums
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < warps; ++w) s += red[w];
  return s;
}

// The ones column and its zero padding, columns [C, C_out) of a row.
template <class T>
__device__ __forceinline__ void ones_column(T* o, int C, int C_out) {
  for (int c = C + threadIdx.x; c < C_out; c += blockDim.x) o[c] = from_f<T>(c == C ? 1.f : 0.f);
}

// One block per row, the row in registers: VPT vectors of Vec<T>::kN per thread, two-pass
// mean/variance over registers.
template <class T, int VPT>
__global__ void __launch_bounds__(1024) ln_modulate_vec_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                                               const T* __restrict__ scale, T* __restrict__ out,
                                                               int rows_per_batch, int C, int C_out, float eps) {
  constexpr int kN = Vec<T>::kN;
  __shared__ float red[32];
  const int r = blockIdx.x, b = r / rows_per_batch, nvec = C / kN;
  const T* xr = x + static_cast<size_t>(r) * C;
  float v[VPT][kN];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
      const Vec<T> a = load(xr + i * kN);
#pragma unroll
      for (int j = 0; j < kN; ++j) s += (v[k][j] = to_f(a.v[j]));
    }
  }
  const float mean = block_sum(s, red) / C;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < VPT; ++k)
    if (threadIdx.x + k * blockDim.x < nvec)
#pragma unroll
      for (int j = 0; j < kN; ++j) q += (v[k][j] - mean) * (v[k][j] - mean);
  const float rstd = rsqrtf(block_sum(q, red) / C + eps);
  const T* sh = shift + static_cast<size_t>(b) * C;
  const T* sc = scale + static_cast<size_t>(b) * C;
  T* o = out + static_cast<size_t>(r) * C_out;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < nvec) {
      const Vec<T> hs = load(sh + i * kN), hc = load(sc + i * kN);
      Vec<T> res;
#pragma unroll
      for (int j = 0; j < kN; ++j)
        res.v[j] = from_f<T>((v[k][j] - mean) * rstd * (1.f + to_f(hc.v[j])) + to_f(hs.v[j]));
      store(o + i * kN, res);
    }
  }
  ones_column(o, C, C_out);
}

// Any width and alignment: one block per row, the row in shared memory as float.
template <class T>
__global__ void __launch_bounds__(256) ln_modulate_kernel(const T* __restrict__ x, const T* __restrict__ shift,
                                                          const T* __restrict__ scale, T* __restrict__ out,
                                                          int64_t rows_per_batch, int C, int C_out, float eps) {
  extern __shared__ float row[];
  __shared__ float red[32];
  const int64_t r = blockIdx.x;
  const int64_t b = r / rows_per_batch;
  const T* xr = x + r * C;
  float s = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = to_f(xr[c]);
    row[c] = v;
    s += v;
  }
  const float mean = block_sum(s, red) / C;
  float q = 0.f;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const float d = row[c] - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, red) / C + eps);
  const T* sh = shift + b * C;
  const T* sc = scale + b * C;
  T* o = out + r * C_out;
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    o[c] = from_f<T>((row[c] - mean) * rstd * (1.f + to_f(sc[c])) + to_f(sh[c]));
  ones_column(o, C, C_out);
}

// One thread per 16-byte vector of the output.
template <class T>
__global__ void gated_residual_vec_kernel(const T* __restrict__ x, const T* __restrict__ gate, const T* __restrict__ y,
                                          const T* __restrict__ bias, T* __restrict__ out, int nvec, int row_vecs,
                                          int rows_per_batch) {
  constexpr int kN = Vec<T>::kN;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nvec) return;
  const int row = i / row_vecs, cv = i - row * row_vecs, b = row / rows_per_batch;
  const Vec<T> xv = load(x + static_cast<size_t>(i) * kN), yv = load(y + static_cast<size_t>(i) * kN);
  const Vec<T> gv = load(gate + (static_cast<size_t>(b) * row_vecs + cv) * kN);
  Vec<T> bv;
  if (bias) bv = load(bias + cv * kN);
  Vec<T> res;
#pragma unroll
  for (int j = 0; j < kN; ++j)
    res.v[j] = from_f<T>(to_f(xv.v[j]) + to_f(gv.v[j]) * (to_f(yv.v[j]) + (bias ? to_f(bv.v[j]) : 0.f)));
  store(out + static_cast<size_t>(i) * kN, res);
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

// One warp per token: keep = sigmoid(relu(h + b1) . w2 + b2) > 0.5, all in float (the eager
// model's maths), stored as 1 or 0.
template <class T>
__global__ void token_keep_kernel(const T* __restrict__ h, const T* __restrict__ b1, const T* __restrict__ w2,
                                  const T* __restrict__ b2, T* __restrict__ keep, int64_t M, int H) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= M) return;
  const int lane = threadIdx.x & 31;
  const T* hr = h + row * H;
  float z = 0.f;
  for (int j = lane; j < H; j += 32) z += fmaxf(to_f(hr[j]) + to_f(b1[j]), 0.f) * to_f(w2[j]);
  z = warp_sum(z) + to_f(b2[0]);
  if (lane == 0) keep[row] = from_f<T>(1.f / (1.f + __expf(-z)) > 0.5f ? 1.f : 0.f);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <class T, int VPT>
int launch_ln_vec(const void* x, const void* shift, const void* scale, void* out, int64_t B, int64_t N, int C,
                  int C_out, float eps, cudaStream_t stream) {
  const int nvec = C / Vec<T>::kN;
  const int threads = ((nvec + VPT - 1) / VPT + 31) / 32 * 32;
  ln_modulate_vec_kernel<T, VPT><<<static_cast<unsigned>(B * N), threads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(scale), static_cast<T*>(out),
      static_cast<int>(N), C, C_out, eps);
  return cudaGetLastError() == cudaSuccess ? DYC_EW_OK : DYC_EW_LAUNCH_FAILED;
}

template <class T>
int launch_ln(const void* x, const void* shift, const void* scale, void* out, int64_t B, int64_t N, int C, int C_out,
              float eps, cudaStream_t stream) {
  constexpr int kN = Vec<T>::kN;
  const int nvec = C / kN;
  if (C % kN == 0 && C_out % kN == 0 && aligned16(x) && aligned16(shift) && aligned16(scale) && aligned16(out)) {
    if (nvec <= 1024) return launch_ln_vec<T, 1>(x, shift, scale, out, B, N, C, C_out, eps, stream);
    if (nvec <= 2048) return launch_ln_vec<T, 2>(x, shift, scale, out, B, N, C, C_out, eps, stream);
    if (nvec <= 4096) return launch_ln_vec<T, 4>(x, shift, scale, out, B, N, C, C_out, eps, stream);
  }
  const size_t smem = static_cast<size_t>(C) * sizeof(float);
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(ln_modulate_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess)
      return DYC_EW_LAUNCH_FAILED;
  }
  ln_modulate_kernel<T><<<static_cast<unsigned>(B * N), 256, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(shift), static_cast<const T*>(scale), static_cast<T*>(out), N, C,
      C_out, eps);
  return cudaGetLastError() == cudaSuccess ? DYC_EW_OK : DYC_EW_LAUNCH_FAILED;
}

template <class T>
int launch_gr(const void* x, const void* gate, const void* y, const void* bias, void* out, int64_t B, int64_t N, int C,
              cudaStream_t stream) {
  constexpr int kN = Vec<T>::kN;
  const int64_t n = B * N * C;
  if (C % kN == 0 && n / kN < 0x7fffffffLL && aligned16(x) && aligned16(gate) && aligned16(y) &&
      (!bias || aligned16(bias)) && aligned16(out)) {
    const int nvec = static_cast<int>(n / kN);
    gated_residual_vec_kernel<T><<<static_cast<unsigned>((nvec + 255) / 256), 256, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(gate), static_cast<const T*>(y), static_cast<const T*>(bias),
        static_cast<T*>(out), nvec, C / kN, static_cast<int>(N));
    return cudaGetLastError() == cudaSuccess ? DYC_EW_OK : DYC_EW_LAUNCH_FAILED;
  }
  const int64_t blocks = (n + 255) / 256;
  gated_residual_kernel<T><<<static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8), 256, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(gate), static_cast<const T*>(y), static_cast<const T*>(bias),
      static_cast<T*>(out), n, N * C, C);
  return cudaGetLastError() == cudaSuccess ? DYC_EW_OK : DYC_EW_LAUNCH_FAILED;
}

template <class T>
int launch_tk(const void* h, const void* b1, const void* w2, const void* b2, void* keep, int64_t M, int H,
              cudaStream_t stream) {
  token_keep_kernel<T><<<static_cast<unsigned>((M + 7) / 8), 256, 0, stream>>>(  // 8 warps: 8 tokens per block
      static_cast<const T*>(h), static_cast<const T*>(b1), static_cast<const T*>(w2), static_cast<const T*>(b2),
      static_cast<T*>(keep), M, H);
  return cudaGetLastError() == cudaSuccess ? DYC_EW_OK : DYC_EW_LAUNCH_FAILED;
}

}  // namespace

extern "C" int dyc_ln_modulate(int dtype, const void* x, const void* shift, const void* scale, void* out, int64_t B,
                               int64_t N, int64_t C, int64_t C_out, float eps, cudaStream_t stream) {
  if (B <= 0 || N <= 0 || C <= 0 || C > 32768 || C_out < C || C_out > C + 1024 || B * N > 0x7fffffffLL)
    return DYC_EW_BAD_SHAPE;
  const int c = static_cast<int>(C), co = static_cast<int>(C_out);
  switch (dtype) {
    case DYC_EW_FLOAT32: return launch_ln<float>(x, shift, scale, out, B, N, c, co, eps, stream);
    case DYC_EW_FLOAT16: return launch_ln<__half>(x, shift, scale, out, B, N, c, co, eps, stream);
    case DYC_EW_BFLOAT16: return launch_ln<__nv_bfloat16>(x, shift, scale, out, B, N, c, co, eps, stream);
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

extern "C" int dyc_token_keep(int dtype, const void* h, const void* b1, const void* w2, const void* b2, void* keep,
                              int64_t M, int64_t H, cudaStream_t stream) {
  if (M <= 0 || H <= 0 || H > 65536 || M > 0x7fffffffLL) return DYC_EW_BAD_SHAPE;
  switch (dtype) {
    case DYC_EW_FLOAT32: return launch_tk<float>(h, b1, w2, b2, keep, M, static_cast<int>(H), stream);
    case DYC_EW_FLOAT16: return launch_tk<__half>(h, b1, w2, b2, keep, M, static_cast<int>(H), stream);
    case DYC_EW_BFLOAT16: return launch_tk<__nv_bfloat16>(h, b1, w2, b2, keep, M, static_cast<int>(H), stream);
  }
  return DYC_EW_BAD_DTYPE;
}
