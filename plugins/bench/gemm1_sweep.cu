// Tile/cluster/schedule sweep for SdtMlp's GEMM1 (fc1 + bias + GELU-tanh) on Hopper. Plain
// host-sized GEMMs: this measures what each CUTLASS configuration reaches at the shape, not the
// kept-row logic. The cuBLAS figure for the same fused op comes from PyTorch in the same run
// (bench/gemm1_cublas.py: torch._addmm_activation, cuBLASLt's GELU_BIAS epilogue).
//
//   nvcc -std=c++17 -O3 -DNDEBUG -arch=sm_90a --expt-relaxed-constexpr -I.cutlass/include -Iplugins/src \
//        -DSWEEP_PART=P -c plugins/bench/gemm1_sweep.cu  (P = 0, 1, 2; link the three objects)
//   ./gemm1_sweep [M=4096] [N=4608] [K=1152]
#define DYC_HAVE_SM90 1
#include "sdt_mlp_sm90_impl.cuh"

#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "cutlass/gemm/device/gemm_universal_adapter.h"

using namespace cute;
using Bf = cutlass::bfloat16_t;

struct Case {
  std::string name;
  std::function<float(int, int, int, const Bf*, const Bf*, const Bf*, Bf*, int)> run;  // µs per call
};
inline std::vector<Case>& cases() {
  static std::vector<Case> c;
  return c;
}

template <class Tile, class Cluster, class MainSchedule, class EpiSchedule, class EpiTile, bool Gelu>
struct Config {
  using EVT = cute::conditional_t<Gelu, dyc::Gemm1PlainEVT<Bf, Tile>,
                                  dyc::Gemm2EVT<Bf, Tile>>;  // Gemm2EVT: acc + bias only
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster, EpiTile, float, float, void,
      cutlass::layout::RowMajor, 8, Bf, cutlass::layout::RowMajor, 8, EpiSchedule, EVT>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf, cutlass::layout::RowMajor, 8, Bf,
      cutlass::layout::ColumnMajor, 8, float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static float run(int M, int N, int K, const Bf* A, const Bf* W, const Bf* bias, Bf* D, int iters) {
    typename Kernel::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = make_shape(M, N, K, 1);
    args.mainloop = {A, make_stride(int64_t(K), _1{}, int64_t(0)), W, make_stride(int64_t(K), _1{}, int64_t(0))};
    if constexpr (Gelu)
      args.epilogue.thread = {{{}, {bias, Bf(0), {}}, {}}, {}};
    else
      args.epilogue.thread = {{}, {bias, Bf(0), {}}, {}};
    args.epilogue.ptr_C = nullptr;
    args.epilogue.ptr_D = D;
    args.epilogue.dD = make_stride(int64_t(N), _1{}, int64_t(0));
    args.hw_info.sm_count = dyc::sm_count();
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -1.f;
    size_t ws = Gemm::get_workspace_size(args);
    void* w = nullptr;
    if (ws) cudaMalloc(&w, ws);
    if (gemm.initialize(args, w) != cutlass::Status::kSuccess) return -2.f;
    for (int i = 0; i < 5; ++i) gemm.run();
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < iters; ++i) gemm.run();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    if (w) cudaFree(w);
    return cudaGetLastError() == cudaSuccess ? 1e3f * ms / iters : -3.f;
  }
};

#define ADD(NAME, ...) \
  static int reg_##NAME = (cases().push_back({#NAME, &Config<__VA_ARGS__>::run}), 0);

using TmaWS = cutlass::gemm::KernelTmaWarpSpecialized;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpiWS = cutlass::epilogue::TmaWarpSpecialized;
using EpiCoop = cutlass::epilogue::TmaWarpSpecializedCooperative;
using EAuto = cutlass::epilogue::collective::EpilogueTileAuto;

#if SWEEP_PART == 0
ADD(ws_128x144_1x1_current, Shape<_128, _144, _64>, Shape<_1, _1, _1>, TmaWS, EpiWS, Shape<_64, _48>, true)
ADD(ws_128x144_1x1_nogelu, Shape<_128, _144, _64>, Shape<_1, _1, _1>, TmaWS, EpiWS, Shape<_64, _48>, false)
ADD(ws_128x256_1x1, Shape<_128, _256, _64>, Shape<_1, _1, _1>, TmaWS, EpiWS, EAuto, true)
ADD(ws_128x256_1x2, Shape<_128, _256, _64>, Shape<_1, _2, _1>, TmaWS, EpiWS, EAuto, true)
#elif SWEEP_PART == 1
ADD(coop_256x128_1x1, Shape<_256, _128, _64>, Shape<_1, _1, _1>, Coop, EpiCoop, EAuto, true)
ADD(coop_256x128_2x1, Shape<_256, _128, _64>, Shape<_2, _1, _1>, Coop, EpiCoop, EAuto, true)
ADD(coop_128x256_1x2, Shape<_128, _256, _64>, Shape<_1, _2, _1>, Coop, EpiCoop, EAuto, true)
ADD(coop_256x128_1x1_nogelu, Shape<_256, _128, _64>, Shape<_1, _1, _1>, Coop, EpiCoop, EAuto, false)
#elif SWEEP_PART == 2
ADD(ping_128x128_1x1, Shape<_128, _128, _64>, Shape<_1, _1, _1>, Ping, EpiWS, EAuto, true)
ADD(ping_128x128_1x2, Shape<_128, _128, _64>, Shape<_1, _2, _1>, Ping, EpiWS, EAuto, true)
ADD(ping_64x256_1x1, Shape<_64, _256, _64>, Shape<_1, _1, _1>, Ping, EpiWS, EAuto, true)
ADD(coop_256x144_1x1, Shape<_256, _144, _64>, Shape<_1, _1, _1>, Coop, EpiCoop, Shape<_128, _48>, true)
#endif

#if SWEEP_PART == 0
__global__ void fill(Bf* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    p[i] = Bf(scale * ((x & 0xffff) / 32768.f - 1.f));
  }
}

int main(int argc, char** argv) {
  const int M = argc > 1 ? atoi(argv[1]) : 4096, N = argc > 2 ? atoi(argv[2]) : 4608,
            K = argc > 3 ? atoi(argv[3]) : 1152, iters = 50;
  Bf *A, *W, *bias, *D;
  cudaMalloc(&A, sizeof(Bf) * M * K);
  cudaMalloc(&W, sizeof(Bf) * N * K);
  cudaMalloc(&bias, sizeof(Bf) * N);
  cudaMalloc(&D, sizeof(Bf) * M * N);
  fill<<<1024, 256>>>(A, size_t(M) * K, 1, 1.f);
  fill<<<1024, 256>>>(W, size_t(N) * K, 2, 0.03f);
  fill<<<256, 256>>>(bias, N, 3, 0.1f);
  cudaDeviceSynchronize();
  const double flop = 2.0 * M * N * K;
  cudaDeviceProp p;
  cudaGetDeviceProperties(&p, 0);
  printf("# %s  M=%d N=%d K=%d bf16, fp32 accumulate; us per call (mean of %d), TFLOP/s\n", p.name, M, N, K, iters);
  float t;
  for (auto& c : cases()) {
    t = c.run(M, N, K, A, W, bias, D, iters);
    if (t < 0)
      printf("%-28s   failed (%g)\n", c.name.c_str(), t);
    else
      printf("%-28s %8.1f us %7.1f TFLOP/s\n", c.name.c_str(), t, flop / t * 1e-6);
  }
  return 0;
}
#endif
