/*
 * dyc_sdt_mlp.h — C ABI of the SDT MLP op of DyDiT (Spatial-wise Dynamic Token MLP).
 *
 * One implementation of the maths, called by every backend: the Python binding
 * (dyc/kernels/sdt_mlp.py, ctypes), the ONNX Runtime custom op (plugins/onnxruntime) and
 * the TensorRT plugin (plugins/tensorrt).
 *
 *   y = x + keep[:, :, None] * gate[:, None, :] *
 *           (fc2_b + fc2_w @ gelu_tanh(chmask ⊙ (fc1_w @ (LN(x)·(1+scale)+shift) + fc1_b)))
 *
 * LN: LayerNorm over C, no affine, computed in fp32. A token is kept iff keep > 0.5; rows that
 * are not kept are exactly x. chmask is [B, G] (G = hidden / group_size), applied per channel
 * group of fc1's output before GELU; NULL means all ones.
 *
 * All tensors are contiguous row-major device tensors of one dtype (x's):
 *   x, y [B, N, C]; shift, scale, gate [B, C]; keep [B, N]; fc1_w [Hs, C]; fc1_b [Hs];
 *   fc2_w [C, Hs]; fc2_b [C]; channel_mask [B, Hs / group_size] or NULL.
 * y may alias x (in-place residual update).
 *
 * The kept-token count is computed on the device and never read back by the host: the call
 * is asynchronous on `stream` and can be captured into a CUDA graph. It allocates nothing;
 * callers pass `workspace` of at least dyc_sdt_mlp_workspace_size(...) bytes, 256-byte aligned.
 */
#ifndef DYC_SDT_MLP_H_
#define DYC_SDT_MLP_H_

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#if defined(_WIN32)
#define DYC_API __declspec(dllexport)
#else
#define DYC_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define DYC_SDT_MLP_ABI_VERSION 2

typedef enum dyc_dtype {
  DYC_DTYPE_FLOAT32 = 0,
  DYC_DTYPE_FLOAT16 = 1,
  DYC_DTYPE_BFLOAT16 = 2
} dyc_dtype_t;

typedef enum dyc_status {
  DYC_STATUS_OK = 0,
  DYC_STATUS_INVALID_ARGUMENT = 1, /* null pointer, bad size, hidden % group_size != 0, bad dtype */
  DYC_STATUS_WORKSPACE_TOO_SMALL = 2, /* workspace NULL, misaligned or smaller than required */
  DYC_STATUS_UNSUPPORTED = 3,      /* no kernel for this device / dtype */
  DYC_STATUS_CUDA_ERROR = 4        /* a CUDA call or launch failed (see cudaGetLastError) */
} dyc_status_t;

/* Flags for dyc_sdt_mlp_forward. */
#define DYC_SDT_MLP_FLAG_NONE 0u
/* Use the portable tiled kernels even where the Hopper (CUTLASS/wgmma) path applies; for tests. */
#define DYC_SDT_MLP_FLAG_FORCE_GENERIC 1u
/* channel_mask holds one row [G] that applies to every image (a sampler call runs one timestep, so
   its TDW masks are the same for all rows). Lets the Hopper path run GEMM1 as one plain GEMM whose
   epilogue multiplies by a per-column mask, instead of one GEMM batch per channel group. */
#define DYC_SDT_MLP_FLAG_SHARED_CHANNEL_MASK 2u

/* Kernel paths, as reported by dyc_sdt_mlp_select_path. */
#define DYC_SDT_MLP_PATH_GENERIC 0
#define DYC_SDT_MLP_PATH_SM90_CUTLASS 1

/* "MAJOR.MINOR.PATCH+abiN (archs)" of the built library. */
DYC_API const char* dyc_sdt_mlp_version(void);

/* Human-readable name of a status code. */
DYC_API const char* dyc_sdt_mlp_status_string(int status);

/* Bytes of scratch memory the forward call needs for these sizes; 0 on invalid sizes. */
DYC_API size_t dyc_sdt_mlp_workspace_size(int dtype, int64_t batch, int64_t tokens, int64_t channels,
                                          int64_t hidden, int64_t group_size);

/* Which kernel path forward would take on `device` for these sizes and flags (host-only query). */
DYC_API int dyc_sdt_mlp_select_path(int dtype, int64_t channels, int64_t hidden, int64_t group_size,
                                    int device, uint32_t flags);

/* Enqueue the op on `stream`. Returns a dyc_status_t; launches nothing unless it returns OK.
   fc2_w_ld: elements between rows of fc2_w [channels, hidden]; 0 means hidden (contiguous). A
   larger value reads a column slice of a wider matrix in place (weights shared between engines). */
DYC_API int dyc_sdt_mlp_forward(int dtype, const void* x, const void* shift, const void* scale,
                                const void* gate, const void* keep, const void* fc1_w, const void* fc1_b,
                                const void* fc2_w, const void* fc2_b, const void* channel_mask, void* y,
                                int64_t batch, int64_t tokens, int64_t channels, int64_t hidden,
                                int64_t group_size, int64_t fc2_w_ld, float eps, void* workspace,
                                size_t workspace_size, uint32_t flags, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* DYC_SDT_MLP_H_ */
