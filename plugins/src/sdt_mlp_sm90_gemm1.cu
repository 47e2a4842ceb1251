// Hopper GEMM1 of the SDT MLP (see sdt_mlp_sm90_impl.cuh).
#define DYC_SM90_PART_GEMM1
#include "sdt_mlp_sm90_impl.cuh"
