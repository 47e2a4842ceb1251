// Shared between the portable kernels (sdt_mlp.cu) and the Hopper GEMMs (sdt_mlp_sm90_impl.cuh).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace dyc {

constexpr size_t kAlign = 256;

inline size_t align_up(size_t v, size_t a = kAlign) { return (v + a - 1) / a * a; }

// Rows of the per-group mask table are padded so every group's column starts 16-byte aligned.
inline int64_t pad_rows(int64_t rows) { return (rows + 7) / 8 * 8; }

// Scratch layout, in order; every buffer starts 256-byte aligned.
struct Workspace {
  int* idx = nullptr;       // [rows] compact position -> flat token row (b*N + n)
  int* pos = nullptr;       // [rows] flat token row -> compact position, -1 if dropped
  int* count = nullptr;     // [1] number of kept tokens (device-side only)
  float* mask = nullptr;    // [G, rows_pad] channel-group mask of each compact row
  float* colmask = nullptr; // [Hs] shared channel mask expanded to columns (FLAG_SHARED_CHANNEL_MASK)
  void* a = nullptr;        // [rows, C] LN+modulated kept tokens
  void* h = nullptr;        // [rows, Hs] GELU(fc1) of kept tokens
  void* d = nullptr;        // [rows, C] fc2 output of kept tokens
  size_t bytes = 0;
};

inline Workspace carve_workspace(void* base, size_t elem, int64_t rows, int64_t channels, int64_t hidden,
                                 int64_t groups) {
  Workspace w;
  size_t off = 0;
  auto take = [&](size_t n) {
    size_t at = off;
    off = align_up(off + n);
    return base ? static_cast<char*>(base) + at : nullptr;
  };
  w.idx = reinterpret_cast<int*>(take(sizeof(int) * rows));
  w.pos = reinterpret_cast<int*>(take(sizeof(int) * rows));
  w.count = reinterpret_cast<int*>(take(sizeof(int)));
  w.mask = reinterpret_cast<float*>(take(sizeof(float) * groups * pad_rows(rows)));
  w.colmask = reinterpret_cast<float*>(take(sizeof(float) * hidden));
  w.a = take(elem * rows * channels);
  w.h = take(elem * rows * hidden);
  w.d = take(elem * rows * channels);
  w.bytes = off;
  return w;
}

// Hopper path (sdt_mlp_sm90_*.cu, compiled for sm_90a only when DYC_HAVE_SM90 is defined).
// Sized for all `rows`; M-tiles at or beyond *count exit at once or are never scheduled.
// dtype: 1 = fp16, 2 = bf16. Return cudaSuccess or the launch error.
struct Sm90Args {
  int dtype;
  int64_t rows, channels, hidden, group_size;
  int64_t fc2_ld;  // row stride of fc2_w (>= hidden)
  const void* fc1_w;
  const void* fc1_b;
  const void* fc2_w;
  const void* fc2_b;
  Workspace ws;
  cudaStream_t stream;
};
bool sm90_compiled();
cudaError_t sm90_gemm1(const Sm90Args& a);  // ws.h = gelu(mask * (ws.a @ fc1_w^T + fc1_b))
cudaError_t sm90_gemm1_plain(const Sm90Args& a);  // ws.h = gelu(ws.a @ fc1_w^T + fc1_b), no channel mask
cudaError_t sm90_gemm1_colmask(const Sm90Args& a);  // ws.h = gelu(ws.a @ fc1_w^T + fc1_b) * ws.colmask[n]
cudaError_t sm90_gemm2(const Sm90Args& a);  // ws.d = ws.h @ fc2_w^T + fc2_b

}  // namespace dyc
