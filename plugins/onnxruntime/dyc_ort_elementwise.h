// C entry points of the `cuda` graphs' fused glue kernels (dyc_ort_elementwise.cu).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

enum { DYC_EW_FLOAT32 = 0, DYC_EW_FLOAT16 = 1, DYC_EW_BFLOAT16 = 2 };
enum { DYC_EW_OK = 0, DYC_EW_BAD_SHAPE = 1, DYC_EW_BAD_DTYPE = 2, DYC_EW_LAUNCH_FAILED = 3 };

extern "C" {
// out[b, n, :C] = LayerNorm(x[b, n, :]) * (1 + scale[b, :]) + shift[b, :]   (no affine);
// out rows are C_out >= C wide: out[b, n, C] = 1 and the rest 0 (the next GEMM's bias row)
int dyc_ln_modulate(int dtype, const void* x, const void* shift, const void* scale, void* out, int64_t B, int64_t N,
                    int64_t C, int64_t C_out, float eps, cudaStream_t stream);
// out[b, n, c] = x[b, n, c] + gate[b, c] * (y[b, n, c] + bias[c])   (bias may be null)
int dyc_gated_residual(int dtype, const void* x, const void* gate, const void* y, const void* bias, void* out,
                       int64_t B, int64_t N, int64_t C, cudaStream_t stream);
// keep[m] = sigmoid(relu(h[m, :] + b1) . w2 + b2[0]) > 0.5 ? 1 : 0   (h [M, H], b1 [H], w2 [H], b2 [1])
int dyc_token_keep(int dtype, const void* h, const void* b1, const void* w2, const void* b2, void* keep, int64_t M,
                   int64_t H, cudaStream_t stream);
}
