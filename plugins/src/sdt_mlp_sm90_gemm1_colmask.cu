// Hopper GEMM1 with a channel mask shared by all images (see sdt_mlp_sm90_impl.cuh).
#define DYC_SM90_PART_GEMM1_COLMASK
#include "sdt_mlp_sm90_impl.cuh"
