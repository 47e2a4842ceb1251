// C entry points of the `cuda` graphs' fused glue kernels (dyc_ort_elementwise.cu).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

enum { DYC_EW_FLOAT32 = 0, DYC_EW_FLOAT16 = 1, DYC_EW_BFLOAT16 = 2 };
enum { DYC_EW_OK = 0, DYC_EW_BAD_SHAPE = 1, DYC_EW_BAD_DTYPE = 2, DYC_EW_LAUNCH_FAILED = 3 };

extern "C" {
// out[b, n, :] = LayerNorm(x[b, n, :]) * (1 + scale[b, :]) + shift[b, :]   (no affine)
int dyc_ln_modulate(int dtype, const void* x, const void* shift, const void* scale, void* out, int64_t B, int64_t N,
                    int64_t C, float eps, cudaStream_t stream);
// out[b, n, c] = x[b, n, c] + gate[b, c] * (y[b, n, c] + bias[c])   (bias may be null)
int dyc_gated_residual(int dtype, const void* x, const void* gate, const void* y, const void* bias, void* out,
                       int64_t B, int64_t N, int64_t C, cudaStream_t stream);
}
