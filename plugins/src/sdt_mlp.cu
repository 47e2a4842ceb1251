// SDT MLP of DyDiT: compaction of kept tokens, gather + LayerNorm + modulate, two GEMMs with
// fused epilogues, and the gated residual scatter. Everything stays on the device: the number
// of kept tokens is written by the compaction kernel and read by the later kernels, so the op
// never synchronises with the host and can be captured in a CUDA graph.
//
// Paths:
//  * sm_90 (Hopper), fp16/bf16: CUTLASS 3.x wgmma/TMA GEMMs (sdt_mlp_sm90_impl.cuh).
//  * otherwise (sm_80/86/89, fp32, odd sizes): the portable tiled GEMM below.
// Grids are sized for all B*N tokens; tiles past the device-side count exit at once or, in the
// persistent Hopper GEMM, are never scheduled.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <cstring>
#include <algorithm>

#include "dyc_sdt_mlp.h"
#include "sdt_mlp_internal.h"

#ifndef DYC_VERSION_STRING
#define DYC_VERSION_STRING "0.1.0"
#endif
#ifndef DYC_ARCH_STRING
#define DYC_ARCH_STRING "unknown"
#endif

namespace dyc {
namespace {

template <class T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 0.5·x·(1 + tanh(u)) == x·sigmoid(2u): one exp instead of tanh; exact 0 for very negative x.
__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.0f + __expf(-2.0f * u));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// ---------------------------------------------------------------------------------------------
// 1. Compaction: each block scans 1024 of the 0/1 keep flags (cub::BlockScan) and takes its slice
//    of the compact order with one atomicAdd on the count (zeroed just before), writing the
//    compact->row map and the row->compact map. Blocks claim their slices in any order, so the
//    compact order of rows can change from call to call; every row's result does not (the GEMMs
//    treat rows independently, and nothing reduces over them). One block for all rows took
//    ~11 us per call at 8192 rows on an H200 (bench/RESULTS.md).
constexpr int kScanThreads = 256;
constexpr int kScanItems = 4;  // 1024 rows per block

template <class T>
__global__ void __launch_bounds__(kScanThreads) compact_kernel(const T* __restrict__ keep, int rows,
                                                              int* __restrict__ idx, int* __restrict__ pos,
                                                              int* __restrict__ count) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage tmp;
  __shared__ int base;
  const int first = blockIdx.x * kScanThreads * kScanItems + threadIdx.x * kScanItems;
  int flag[kScanItems], excl[kScanItems];
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int r = first + i;
    flag[i] = (r < rows && to_f(keep[r]) > 0.5f) ? 1 : 0;
  }
  int total = 0;
  BlockScan(tmp).ExclusiveSum(flag, excl, total);
  if (threadIdx.x == 0) base = total ? atomicAdd(count, total) : 0;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kScanItems; ++i) {
    const int r = first + i;
    if (r < rows) {
      const int p = base + excl[i];
      pos[r] = flag[i] ? p : -1;
      if (flag[i]) idx[p] = r;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Gather + LayerNorm (fp32, two-pass, no affine) + modulate, one warp per kept token; also
//    expands the per-batch channel-group mask to one value per compact row (GEMM1's epilogue
//    reads it as a per-row vector for each group).
constexpr int kLnWarps = 8;

template <class T, int VEC>
__global__ void __launch_bounds__(kLnWarps * 32)
    gather_ln_kernel(const T* __restrict__ x, const T* __restrict__ shift, const T* __restrict__ scale,
                     const T* __restrict__ chmask, const int* __restrict__ idx, const int* __restrict__ count,
                     int rows, int tokens, int C, int G, float eps, T* __restrict__ a, float* __restrict__ mask,
                     int64_t ldm, int mask_stride, float* __restrict__ colmask, int gs) {
  const int m = blockIdx.x * kLnWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (colmask && blockIdx.x == 0)  // shared mask: one value per hidden column, for GEMM1's epilogue
    for (int n = threadIdx.x; n < G * gs; n += blockDim.x) colmask[n] = to_f(chmask[n / gs]);
  if (m >= rows || m >= *count) return;
  const int r = idx[m];
  const int b = r / tokens;
  const T* xr = x + static_cast<size_t>(r) * C;
  using V = Vec<T, VEC>;

  float s = 0.f;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    const V v = *reinterpret_cast<const V*>(xr + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += to_f(v.v[i]);
  }
  const float mean = warp_sum(s) / C;
  float q = 0.f;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {  // second read hits L1
    const V v = *reinterpret_cast<const V*>(xr + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float d = to_f(v.v[i]) - mean;
      q += d * d;
    }
  }
  const float rstd = rsqrtf(warp_sum(q) / C + eps);
  const T* sh = shift + static_cast<size_t>(b) * C;
  const T* sc = scale + static_cast<size_t>(b) * C;
  T* out = a + static_cast<size_t>(m) * C;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    const V v = *reinterpret_cast<const V*>(xr + c);
    const V vs = *reinterpret_cast<const V*>(sc + c);
    const V vh = *reinterpret_cast<const V*>(sh + c);
    V o;
#pragma unroll
    for (int i = 0; i < VEC; ++i)
      o.v[i] = from_f<T>((to_f(v.v[i]) - mean) * rstd * (1.f + to_f(vs.v[i])) + to_f(vh.v[i]));
    *reinterpret_cast<V*>(out + c) = o;
  }
  if (mask)
    for (int g = lane; g < G; g += 32)
      mask[g * ldm + m] = chmask ? to_f(chmask[static_cast<size_t>(b) * mask_stride + g]) : 1.f;
}

// ---------------------------------------------------------------------------------------------
// 3. Portable GEMM  out[m, n] = epilogue(sum_k A[m, k] * B[n, k])  (both operands K-major, as
//    PyTorch Linear weights are), fp32 accumulation, 64x64x16 tiles, 4x4 per thread.
//    Used for fp32 (exact reference precision), pre-Hopper GPUs and sizes TMA cannot take.
constexpr int kBM = 64, kBN = 64, kBK = 16, kGemmThreads = 256;

enum class Epi { kFc1, kFc2 };

template <class T, Epi E>
__global__ void __launch_bounds__(kGemmThreads)
    generic_gemm_kernel(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ bias,
                        const float* __restrict__ mask, int64_t ldm, int group_size, const int* __restrict__ count,
                        int rows, int N, int K, int64_t ldb, T* __restrict__ out) {
  const int cnt = min(*count, rows);
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  if (m0 >= cnt) return;  // tiles past the device-side token count do nothing

  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16x16 threads, 4x4 outputs each
  const int lr = threadIdx.x / 4, lk = (threadIdx.x % 4) * 4;  // loader: one row, 4 consecutive k
  float acc[4][4] = {};

  for (int k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int k = k0 + lk + i;
      const int am = m0 + lr, bn = n0 + lr;
      As[lk + i][lr] = (am < cnt && k < K) ? to_f(A[static_cast<size_t>(am) * K + k]) : 0.f;
      Bs[lk + i][lr] = (bn < N && k < K) ? to_f(B[static_cast<size_t>(bn) * ldb + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty * 4 + i;
    if (m >= cnt) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx * 4 + j;
      if (n >= N) continue;
      float v = acc[i][j] + to_f(bias[n]);
      if constexpr (E == Epi::kFc1) v = gelu_tanh(v * mask[(n / group_size) * ldm + m]);
      out[static_cast<size_t>(m) * N + n] = from_f<T>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 4. y = x + gate * fc2_out for kept rows, y = x elsewhere (all B*N rows; y may alias x).
template <class T, int VEC>
__global__ void finalize_kernel(const T* x, const T* __restrict__ gate, const T* __restrict__ d,
                                const int* __restrict__ pos, int64_t total_vec, int tokens, int C, T* y) {
  using V = Vec<T, VEC>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total_vec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC;
    const int64_t r = e / C;
    const int c = static_cast<int>(e - r * C);
    const int p = pos[r];
    V v = *reinterpret_cast<const V*>(x + e);
    if (p >= 0) {
      const int b = static_cast<int>(r / tokens);
      const V g = *reinterpret_cast<const V*>(gate + static_cast<size_t>(b) * C + c);
      const V o = *reinterpret_cast<const V*>(d + static_cast<size_t>(p) * C + c);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = from_f<T>(to_f(v.v[j]) + to_f(g.v[j]) * to_f(o.v[j]));
    }
    *reinterpret_cast<V*>(y + e) = v;
  }
}

// In place (y == x): only kept rows change, one warp per compact row.
template <class T, int VEC>
__global__ void finalize_kept_kernel(T* y, const T* __restrict__ gate, const T* __restrict__ d,
                                     const int* __restrict__ idx, const int* __restrict__ count, int rows,
                                     int tokens, int C) {
  using V = Vec<T, VEC>;
  const int m = blockIdx.x * kLnWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (m >= rows || m >= *count) return;
  const int r = idx[m];
  const int b = r / tokens;
  T* yr = y + static_cast<size_t>(r) * C;
  const T* g = gate + static_cast<size_t>(b) * C;
  const T* dr = d + static_cast<size_t>(m) * C;
  for (int c = lane * VEC; c < C; c += 32 * VEC) {
    V v = *reinterpret_cast<const V*>(yr + c);
    const V gv = *reinterpret_cast<const V*>(g + c);
    const V o = *reinterpret_cast<const V*>(dr + c);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_f<T>(to_f(v.v[j]) + to_f(gv.v[j]) * to_f(o.v[j]));
    *reinterpret_cast<V*>(yr + c) = v;
  }
}

// ---------------------------------------------------------------------------------------------
size_t elem_size(int dtype) {
  switch (dtype) {
    case DYC_DTYPE_FLOAT32: return 4;
    case DYC_DTYPE_FLOAT16:
    case DYC_DTYPE_BFLOAT16: return 2;
    default: return 0;
  }
}

bool sizes_ok(int64_t batch, int64_t tokens, int64_t channels, int64_t hidden, int64_t group_size) {
  if (batch < 0 || tokens < 0 || channels < 1 || hidden < 1 || group_size < 1) return false;
  if (hidden % group_size != 0) return false;
  // 32-bit row/element indices inside the kernels.
  const int64_t rows = batch * tokens;
  return rows < (int64_t(1) << 31) && rows * hidden < (int64_t(1) << 40) && channels < (1 << 20);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int device_cc(int device) {
  static int cache[64] = {};
  if (device >= 0 && device < 64 && cache[device]) return cache[device];
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // host query only: do not leave the error sticky for the caller
    return 0;
  }
  const int cc = major * 10 + minor;
  if (device >= 0 && device < 64) cache[device] = cc;
  return cc;
}

int select_path(int dtype, int64_t channels, int64_t hidden, int64_t group_size, int device, uint32_t flags) {
  if (flags & DYC_SDT_MLP_FLAG_FORCE_GENERIC) return DYC_SDT_MLP_PATH_GENERIC;
  if (dtype != DYC_DTYPE_FLOAT16 && dtype != DYC_DTYPE_BFLOAT16) return DYC_SDT_MLP_PATH_GENERIC;
  if (!sm90_compiled() || device_cc(device) != 90) return DYC_SDT_MLP_PATH_GENERIC;
  // TMA needs 16-byte strides; the per-group batching of GEMM1 needs 16-byte group offsets.
  if (channels % 8 || hidden % 8 || group_size % 8) return DYC_SDT_MLP_PATH_GENERIC;
  return DYC_SDT_MLP_PATH_SM90_CUTLASS;
}

template <class T>
int run(const void* x_, const void* shift_, const void* scale_, const void* gate_, const void* keep_,
        const void* fc1_w_, const void* fc1_b_, const void* fc2_w_, const void* fc2_b_, const void* chmask_,
        void* y_, int64_t batch, int64_t tokens, int64_t C, int64_t Hs, int64_t gs, int64_t fc2_ld, float eps,
        const Workspace& ws,
        int path, int dtype, bool shared_mask, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_);
  const T* gate = static_cast<const T*>(gate_);
  T* y = static_cast<T*>(y_);
  const int rows = static_cast<int>(batch * tokens);
  const int G = static_cast<int>(Hs / gs);
  const int64_t ldm = pad_rows(rows);

  if (cudaMemsetAsync(ws.count, 0, sizeof(int), stream) != cudaSuccess) return DYC_STATUS_CUDA_ERROR;
  const unsigned scan_blocks = static_cast<unsigned>((rows + kScanThreads * kScanItems - 1) / (kScanThreads * kScanItems));
  compact_kernel<T><<<scan_blocks, kScanThreads, 0, stream>>>(static_cast<const T*>(keep_), rows, ws.idx, ws.pos,
                                                              ws.count);

  // 16-byte vectors where every row and pointer allows it.
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = C % kVec == 0 && aligned16(x_) && aligned16(shift_) && aligned16(scale_) &&
                      aligned16(gate_) && aligned16(y_);
  const unsigned ln_blocks = static_cast<unsigned>((rows + kLnWarps - 1) / kLnWarps);
  // Hopper with a shared mask: GEMM1's epilogue reads a per-column mask, no per-row table.
  const bool sm90 = path == DYC_SDT_MLP_PATH_SM90_CUTLASS;
  float* colmask = chmask_ && shared_mask && sm90 ? ws.colmask : nullptr;
  float* rowmask = colmask || (sm90 && !chmask_) ? nullptr : ws.mask;
  const int mask_stride = shared_mask ? 0 : G;
  if (vec_ok)
    gather_ln_kernel<T, kVec><<<ln_blocks, kLnWarps * 32, 0, stream>>>(
        x, static_cast<const T*>(shift_), static_cast<const T*>(scale_), static_cast<const T*>(chmask_), ws.idx,
        ws.count, rows, static_cast<int>(tokens), static_cast<int>(C), G, eps, static_cast<T*>(ws.a), rowmask, ldm,
        mask_stride, colmask, static_cast<int>(gs));
  else
    gather_ln_kernel<T, 1><<<ln_blocks, kLnWarps * 32, 0, stream>>>(
        x, static_cast<const T*>(shift_), static_cast<const T*>(scale_), static_cast<const T*>(chmask_), ws.idx,
        ws.count, rows, static_cast<int>(tokens), static_cast<int>(C), G, eps, static_cast<T*>(ws.a), rowmask, ldm,
        mask_stride, colmask, static_cast<int>(gs));
  if (cudaGetLastError() != cudaSuccess) return DYC_STATUS_CUDA_ERROR;

  if (sm90) {
    Sm90Args a{dtype, rows, C, Hs, gs, fc2_ld, fc1_w_, fc1_b_, fc2_w_, fc2_b_, ws, stream};
    // a per-image channel mask: GEMM1 batches the channel groups so the mask is a per-row vector;
    // a shared one: one plain GEMM with a per-column mask in the epilogue
    const cudaError_t e1 = !chmask_ ? sm90_gemm1_plain(a) : colmask ? sm90_gemm1_colmask(a) : sm90_gemm1(a);
    if (e1 != cudaSuccess || sm90_gemm2(a) != cudaSuccess) return DYC_STATUS_CUDA_ERROR;
  } else {
    const dim3 g1(static_cast<unsigned>((Hs + kBN - 1) / kBN), static_cast<unsigned>((rows + kBM - 1) / kBM));
    generic_gemm_kernel<T, Epi::kFc1><<<g1, kGemmThreads, 0, stream>>>(
        static_cast<const T*>(ws.a), static_cast<const T*>(fc1_w_), static_cast<const T*>(fc1_b_), ws.mask, ldm,
        static_cast<int>(gs), ws.count, rows, static_cast<int>(Hs), static_cast<int>(C), C, static_cast<T*>(ws.h));
    const dim3 g2(static_cast<unsigned>((C + kBN - 1) / kBN), static_cast<unsigned>((rows + kBM - 1) / kBM));
    generic_gemm_kernel<T, Epi::kFc2><<<g2, kGemmThreads, 0, stream>>>(
        static_cast<const T*>(ws.h), static_cast<const T*>(fc2_w_), static_cast<const T*>(fc2_b_), nullptr, 0, 1,
        ws.count, rows, static_cast<int>(C), static_cast<int>(Hs), fc2_ld, static_cast<T*>(ws.d));
    if (cudaGetLastError() != cudaSuccess) return DYC_STATUS_CUDA_ERROR;
  }

  if (y_ == x_) {  // in place: dropped rows already hold x
    if (vec_ok)
      finalize_kept_kernel<T, kVec><<<ln_blocks, kLnWarps * 32, 0, stream>>>(
          y, gate, static_cast<const T*>(ws.d), ws.idx, ws.count, rows, static_cast<int>(tokens), static_cast<int>(C));
    else
      finalize_kept_kernel<T, 1><<<ln_blocks, kLnWarps * 32, 0, stream>>>(
          y, gate, static_cast<const T*>(ws.d), ws.idx, ws.count, rows, static_cast<int>(tokens), static_cast<int>(C));
    return cudaGetLastError() == cudaSuccess ? DYC_STATUS_OK : DYC_STATUS_CUDA_ERROR;
  }
  const int64_t total = static_cast<int64_t>(rows) * C;
  const int threads = 256;
  if (vec_ok) {
    const int64_t nv = total / kVec;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((nv + threads - 1) / threads, 65535 * 8));
    finalize_kernel<T, kVec><<<blocks, threads, 0, stream>>>(x, gate, static_cast<const T*>(ws.d), ws.pos, nv,
                                                             static_cast<int>(tokens), static_cast<int>(C), y);
  } else {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, 65535 * 8));
    finalize_kernel<T, 1><<<blocks, threads, 0, stream>>>(x, gate, static_cast<const T*>(ws.d), ws.pos, total,
                                                          static_cast<int>(tokens), static_cast<int>(C), y);
  }
  return cudaGetLastError() == cudaSuccess ? DYC_STATUS_OK : DYC_STATUS_CUDA_ERROR;
}

}  // namespace
}  // namespace dyc

extern "C" {

const char* dyc_sdt_mlp_version(void) {
  return DYC_VERSION_STRING "+abi2 (" DYC_ARCH_STRING ")";
}

const char* dyc_sdt_mlp_status_string(int status) {
  switch (status) {
    case DYC_STATUS_OK: return "ok";
    case DYC_STATUS_INVALID_ARGUMENT: return "invalid argument";
    case DYC_STATUS_WORKSPACE_TOO_SMALL: return "workspace missing, misaligned or too small";
    case DYC_STATUS_UNSUPPORTED: return "unsupported device or dtype";
    case DYC_STATUS_CUDA_ERROR: return "CUDA error";
    default: return "unknown status";
  }
}

size_t dyc_sdt_mlp_workspace_size(int dtype, int64_t batch, int64_t tokens, int64_t channels, int64_t hidden,
                                  int64_t group_size) {
  const size_t es = dyc::elem_size(dtype);
  if (!es || !dyc::sizes_ok(batch, tokens, channels, hidden, group_size)) return 0;
  return dyc::carve_workspace(nullptr, es, batch * tokens, channels, hidden, hidden / group_size).bytes;
}

int dyc_sdt_mlp_select_path(int dtype, int64_t channels, int64_t hidden, int64_t group_size, int device,
                            uint32_t flags) {
  return dyc::select_path(dtype, channels, hidden, group_size, device, flags);
}

int dyc_sdt_mlp_forward(int dtype, const void* x, const void* shift, const void* scale, const void* gate,
                        const void* keep, const void* fc1_w, const void* fc1_b, const void* fc2_w, const void* fc2_b,
                        const void* channel_mask, void* y, int64_t batch, int64_t tokens, int64_t channels,
                        int64_t hidden, int64_t group_size, int64_t fc2_w_ld, float eps, void* workspace,
                        size_t workspace_size, uint32_t flags, cudaStream_t stream) {
  const size_t es = dyc::elem_size(dtype);
  if (!es || !dyc::sizes_ok(batch, tokens, channels, hidden, group_size) || !(eps >= 0.f))
    return DYC_STATUS_INVALID_ARGUMENT;
  const int64_t fc2_ld = fc2_w_ld ? fc2_w_ld : hidden;
  if (fc2_ld < hidden) return DYC_STATUS_INVALID_ARGUMENT;
  if (batch * tokens == 0) return DYC_STATUS_OK;  // empty batch: nothing to do
  if (!x || !shift || !scale || !gate || !keep || !fc1_w || !fc1_b || !fc2_w || !fc2_b || !y)
    return DYC_STATUS_INVALID_ARGUMENT;
  const int64_t rows = batch * tokens;
  const dyc::Workspace ws = dyc::carve_workspace(workspace, es, rows, channels, hidden, hidden / group_size);
  if (!workspace || workspace_size < ws.bytes || (reinterpret_cast<uintptr_t>(workspace) % dyc::kAlign))
    return DYC_STATUS_WORKSPACE_TOO_SMALL;

  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return DYC_STATUS_CUDA_ERROR;
  int path = dyc::select_path(dtype, channels, hidden, group_size, device, flags);
  if (path == DYC_SDT_MLP_PATH_SM90_CUTLASS &&
      !(dyc::aligned16(fc1_w) && dyc::aligned16(fc1_b) && dyc::aligned16(fc2_w) && dyc::aligned16(fc2_b) &&
        fc2_ld % 8 == 0))
    path = DYC_SDT_MLP_PATH_GENERIC;  // TMA and the vectorised bias loads need 16-byte alignment
  const bool shared = (flags & DYC_SDT_MLP_FLAG_SHARED_CHANNEL_MASK) != 0;

  switch (dtype) {
    case DYC_DTYPE_FLOAT32:
      return dyc::run<float>(x, shift, scale, gate, keep, fc1_w, fc1_b, fc2_w, fc2_b, channel_mask, y, batch, tokens,
                             channels, hidden, group_size, fc2_ld, eps, ws, path, dtype, shared, stream);
    case DYC_DTYPE_FLOAT16:
      return dyc::run<__half>(x, shift, scale, gate, keep, fc1_w, fc1_b, fc2_w, fc2_b, channel_mask, y, batch,
                              tokens, channels, hidden, group_size, fc2_ld, eps, ws, path, dtype, shared, stream);
    case DYC_DTYPE_BFLOAT16:
      return dyc::run<__nv_bfloat16>(x, shift, scale, gate, keep, fc1_w, fc1_b, fc2_w, fc2_b, channel_mask, y,
                                     batch, tokens, channels, hidden, group_size, fc2_ld, eps, ws, path, dtype,
                                     shared, stream);
    default: return DYC_STATUS_INVALID_ARGUMENT;
  }
}

}  // extern "C"
