// Hopper GEMM1 without channel mask of the SDT MLP (see sdt_mlp_sm90_impl.cuh).
#define DYC_SM90_PART_GEMM1_PLAIN
#include "sdt_mlp_sm90_impl.cuh"
