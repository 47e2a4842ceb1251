// Hopper GEMM2 of the SDT MLP (see sdt_mlp_sm90_impl.cuh).
#define DYC_SM90_PART_GEMM2
#include "sdt_mlp_sm90_impl.cuh"
