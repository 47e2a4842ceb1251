// Included by sdt_mlp_sm90_gemm1{,_plain,_colmask}.cu and sdt_mlp_sm90_gemm2.cu (one GEMM per
// translation unit, so the CUTLASS instantiations compile in parallel).
//
// Hopper (sm_90a) GEMMs of the SDT MLP, built from CUTLASS 3.x collectives: TMA loads, wgmma,
// a warp-specialized producer/consumer pipeline and epilogue visitor trees (EVT) for the fusions.
//
// The number of kept tokens lives in device memory, so the host cannot size the grid by it. Two
// ways to do only the kept rows' work without a host sync:
//  * "tma": CUTLASS's non-persistent TMA kernel launched for all B*N rows through a thin wrapper
//    (gemm_kept_rows) that reads the count first; M-tiles at or past it return before any load.
//  * "coop": CUTLASS's persistent cooperative kernel with KeptRowsScheduler, the persistent tile
//    scheduler with the tiles past the count filtered out of every CTA's sequence.
// Either way the work is that of the kept tokens (rounded up to one M-tile).
//
// GEMM1 (fc1) with a per-image channel mask: the hidden dimension is batched by channel group (L = G batches
// of group_size columns; A is shared with batch stride 0, fc1_w and H advance by one group per
// batch), so the channel-group mask of a token is a per-row vector of batch l: a column broadcast
// in the EVT.   H = gelu_tanh(mask[l][m] * (acc + fc1_b[l*gs + n]))
// GEMM1 without a mask: one plain GEMM, H = gelu_tanh(acc + fc1_b[n]); with a mask shared by all
// images: the same GEMM, H = gelu_tanh(acc + fc1_b[n]) * colmask[n].
// GEMM2 (fc2): D = acc + fc2_b[n]; the gate, the residual and the scatter back to token order run
// in the finalize kernel (sdt_mlp.cu), which also copies the dropped rows.

#pragma once

#include "sdt_mlp_internal.h"

#if defined(DYC_HAVE_SM90)

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

// 144-wide wgmma atoms (tile N = group_size/2) are behind this switch in CuTe.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#endif
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_types.h"

namespace dyc {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// GELU, tanh approximation (PyTorch's gelu(approximate="tanh")): 0.5·x·(1 + tanh(u)) with the
// hardware tanh (tanh.approx.f32, one MUFU op, max relative error ~2^-11). The epilogue's GELU runs
// on every element of H; an IEEE reciprocal (__frcp_rn) there made GEMM1 twice as slow as the same
// GEMM without it (bench/RESULTS.md, GEMM1 sweep). Outputs are fp16/bf16, coarser than the error.
template <class T>
struct GeluTanh {
  CUTLASS_HOST_DEVICE T operator()(T const& x) const {
    const float xf = static_cast<float>(x);
    const float u = 0.7978845608028654f * (xf + 0.044715f * xf * xf * xf);
#if defined(__CUDA_ARCH__)
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(u));
#else
    const float t = std::tanh(u);
#endif
    return T(0.5f * xf * (1.0f + t));
  }
};
template <class T, int N>
struct GeluTanh<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x) const {
    cutlass::Array<T, N> y;
    GeluTanh<T> f;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = f(x[i]);
    return y;
  }
};

constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using ClusterShape = Shape<_1, _1, _1>;  // M-tiles exit independently: no cluster spans M

// ---------------------------------------------------------------------------------------------
// Persistent variant: CUTLASS's persistent tile scheduler, filtered by the device-side count.
// Every role of the kernel (producer, and each consumer warpgroup of the ping-pong kernel) walks
// the same per-CTA tile sequence; this scheduler drops the tiles whose M-block lies past the kept
// rows from that sequence, so all roles see the same filtered sequence and the work of dropped
// tokens is never scheduled. Grid: one CTA per SM, as sized by the host for all B*N rows.
template <int TileM>
struct KeptRowsTag {};

template <int TileM>
struct KeptRowsScheduler : cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90 {
  using Base = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90;
  using WorkTileInfo = typename Base::WorkTileInfo;
  struct Arguments : Base::Arguments {
    int const* count = nullptr;
    // the kernel works only when min_count < kept rows <= max_count (else another kernel does): schedule nothing
    int min_count = 0;
    int max_count = INT_MAX;
  };
  struct Params : Base::Params {
    int const* count = nullptr;
    int min_count = 0;
    int max_count = INT_MAX;
  };

  template <class ProblemShapeMNKL, class TileShape, class ClusterShape>
  static Params to_underlying_arguments(ProblemShapeMNKL problem_shape_mnkl, TileShape tile_shape,
                                        ClusterShape cluster_shape, cutlass::KernelHardwareInfo const& hw_info,
                                        Arguments const& arguments, void* workspace = nullptr,
                                        const uint32_t epilogue_subtile = 1, uint32_t ktile_start_alignment = 1u) {
    Params p;
    static_cast<Base::Params&>(p) = Base::to_underlying_arguments(
        problem_shape_mnkl, tile_shape, cluster_shape, hw_info, arguments, workspace, epilogue_subtile,
        ktile_start_alignment);
    p.count = arguments.count;
    p.min_count = arguments.min_count;
    p.max_count = arguments.max_count;
    return p;
  }

  CUTLASS_HOST_DEVICE KeptRowsScheduler() {}

  CUTLASS_DEVICE explicit KeptRowsScheduler(Params const& params) : Base(params) {
    const int kept = *params.count;
    m_limit_ = kept > params.min_count && kept <= params.max_count ? (kept + TileM - 1) / TileM : 0;
    skip_dropped();
  }

  template <class ClusterShape>
  CUTLASS_DEVICE WorkTileInfo initial_work_tile_info(ClusterShape) {
    return Base::get_current_work();
  }

  CUTLASS_DEVICE void advance_to_next_work(uint32_t advance_count = 1) {
    for (uint32_t i = 0; i < advance_count; ++i) {
      Base::advance_to_next_work(1);
      skip_dropped();
    }
  }

  CUTLASS_DEVICE bool is_last_tile(WorkTileInfo&, uint32_t advance_count = 1) const {
    KeptRowsScheduler next = *this;
    next.advance_to_next_work(advance_count);
    return !next.get_current_work().is_valid();
  }

  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo work_tile_info) {
    if (Base::continue_current_work(work_tile_info)) return cute::make_tuple(work_tile_info, true);
    advance_to_next_work();
    return cute::make_tuple(Base::get_current_work(), true);
  }

  template <class TileSchedulerPipeline, class TileSchedulerPipelineState>
  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo work_tile_info, TileSchedulerPipeline&,
                                      TileSchedulerPipelineState) {
    return fetch_next_work(work_tile_info);
  }

 private:
  CUTLASS_DEVICE void skip_dropped() {
    for (WorkTileInfo w = Base::get_current_work(); w.is_valid() && w.M_idx >= m_limit_; w = Base::get_current_work())
      Base::advance_to_next_work(1);
  }
  int m_limit_ = 0;
};

}  // namespace
}  // namespace dyc

namespace cutlass::gemm::kernel::detail {
template <int TileM, class TileShape, class ClusterShape, uint32_t Stages>
struct TileSchedulerSelector<dyc::KeptRowsTag<TileM>, arch::Sm90, TileShape, ClusterShape, Stages> {
  using Scheduler = dyc::KeptRowsScheduler<TileM>;
};
}  // namespace cutlass::gemm::kernel::detail

namespace dyc {
namespace {

// Kernel variants V: 0 "tma": CUTLASS's one-tile-per-CTA TMA kernel behind gemm_kept_rows (early
// exit), 128-row tiles; 1 "pingpong": persistent ping-pong kernel with KeptRowsScheduler; 2 "coop":
// persistent cooperative kernel (two warpgroups share a 256-row tile) with KeptRowsScheduler.
// Only the measured-best variant of each GEMM is instantiated (run_gemm* below).
template <int V>
using TileFor = Shape<cute::conditional_t<V == 2, _256, _128>, _144, _64>;
// GEMM2 for few kept rows (persistent ping-pong): 64-row tiles, 144 wide (8 across C = 1152), so
// that few kept rows still make enough tiles for the 132 SMs: 1024 rows are 16 x 8 = 128 tiles, one
// wave, where the 128 x 64 tiles used before made 8 x 18 = 144, two waves (fc2 at 1024 kept rows,
// Hs 4608: 23.0 us against 34.9; H200 sweep of 128 x 64, 128 x 80, 64 x 144 and 64 x 80, RESULTS.md).
using TileFewRows2 = Shape<_64, _144, _64>;

template <class Element, class TileShape, class EVT, int V>
struct KernelFor {
  static constexpr int kAlign = 16 / sizeof(Element);
  using EpiSchedule = cute::conditional_t<V == 2, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                          cutlass::epilogue::TmaWarpSpecialized>;
  using MainSchedule = cute::conditional_t<
      V == 0, cutlass::gemm::KernelTmaWarpSpecialized,
      cute::conditional_t<V == 1, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                          cutlass::gemm::KernelTmaWarpSpecializedCooperative>>;
  // Epilogue subtiles of 48 columns (3 per 144-wide tile) rather than the automatic gcd(32, 144) =
  // 16: a third of the TMA stores per tile. (Measured neutral for GEMM1's speed; see RESULTS.md.)
  using EpiTile = Shape<cute::conditional_t<V == 2, _128, _64>,
                        cute::conditional_t<size<1>(TileShape{}) % 48 == 0, _48, _32>>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpiTile, float, float, void,
      cutlass::layout::RowMajor, kAlign,
      Element, cutlass::layout::RowMajor, kAlign, EpiSchedule, EVT>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, kAlign, Element,
      cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, Mainloop, Epilogue,
      cute::conditional_t<V != 0, KeptRowsTag<size<0>(TileShape{})>, void>>;
};

// GEMM1: 144 = group_size(288)/2 columns per tile, so every tile lies in one channel group.
template <class Element, class Tile>
using Gemm1EVT = fusion::Sm90EVT<
    fusion::Sm90Compute<GeluTanh, Element, float, kRound>,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
                    fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>>,
                    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>, fusion::Sm90AccFetch,
                                    fusion::Sm90RowBroadcast<0, Tile, Element, float, Stride<_0, _1, int64_t>>>>>;
template <class Element, int V>
using Gemm1 = typename KernelFor<Element, TileFor<V>, Gemm1EVT<Element, TileFor<V>>, V>::Kernel;

// GEMM1 without a channel mask: one plain GEMM over all Hs columns, gelu(acc + fc1_b).
template <class Element, class Tile>
using Gemm1PlainEVT = fusion::Sm90EVT<
    fusion::Sm90Compute<GeluTanh, Element, float, kRound>,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>, fusion::Sm90AccFetch,
                    fusion::Sm90RowBroadcast<0, Tile, Element, float, Stride<_0, _1, _0>>>>;
template <class Element, int V>
using Gemm1Plain = typename KernelFor<Element, TileFor<V>, Gemm1PlainEVT<Element, TileFor<V>>, V>::Kernel;

// GEMM1 with a channel mask shared by all images: gelu(acc + fc1_b[n]) * colmask[n] (masks are 0/1,
// so this equals gelu(mask * (acc + b)) of the per-row form).
template <class Element, class Tile>
using Gemm1ColMaskEVT = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::multiplies, Element, float, kRound>,
    fusion::Sm90EVT<fusion::Sm90Compute<GeluTanh, float, float, kRound>,
                    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>, fusion::Sm90AccFetch,
                                    fusion::Sm90RowBroadcast<0, Tile, Element, float, Stride<_0, _1, _0>>>>,
    fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, _0>>>;
template <class Element, int V>
using Gemm1ColMask = typename KernelFor<Element, TileFor<V>, Gemm1ColMaskEVT<Element, TileFor<V>>, V>::Kernel;

// GEMM2: C = 1152 = 8 x 144, so the M-tile count (a multiple of 16 at XL shapes) times 8 N-tiles
// fills the 132 SMs in nearly whole waves; 128-wide tiles (9 per row) leave a 2.2-wave tail.
template <class Element, class Tile>
using Gemm2EVT = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, Element, float, kRound>, fusion::Sm90AccFetch,
                                 fusion::Sm90RowBroadcast<0, Tile, Element, float, Stride<_0, _1, _0>>>;
template <class Element, int V>
using Gemm2 = typename KernelFor<Element, TileFor<V>, Gemm2EVT<Element, TileFor<V>>, V>::Kernel;
template <class Element>
using Gemm2FewRows = typename KernelFor<Element, TileFewRows2, Gemm2EVT<Element, TileFewRows2>, 1>::Kernel;

// cutlass::device_kernel plus the early exit on the device-side token count (and on more than
// max_count kept rows: the persistent kernel launched next to this one does those).
template <class Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
    gemm_kept_rows(CUTLASS_GRID_CONSTANT typename Kernel::Params const params, int const* count, int max_count) {
  constexpr int kTileM = size<0>(typename Kernel::TileShape{});
  const int kept = *count;
  if (kept > max_count || static_cast<int>(blockIdx.x) * kTileM >= kept) return;
  extern __shared__ char smem[];
  Kernel op;
  op(params, smem);
}

int sm_count() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n;
}

template <class Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
    gemm_persistent(CUTLASS_GRID_CONSTANT typename Kernel::Params const params) {
  extern __shared__ char smem[];
  Kernel op;
  op(params, smem);
}

// The launch works only when lo < kept rows <= hi (the one-CTA-per-tile kernel (V = 0) takes lo = 0).
template <int V, class Kernel>
cudaError_t launch(typename Kernel::Arguments& args, int const* count, cudaStream_t stream, int lo, int hi) {
  if constexpr (V != 0) {
    args.scheduler.count = count;
    args.scheduler.min_count = lo;
    args.scheduler.max_count = hi;
    // N fastest: the tiles below the count are then a prefix of the linear tile order, so every
    // CTA gets an equal share (with M fastest and few M-tiles, some CTAs got 3 tiles, others 1)
    using RasterOptions = decltype(args.scheduler.raster_order);
    args.scheduler.raster_order = RasterOptions::AlongN;
  }
  if (!Kernel::can_implement(args)) return cudaErrorInvalidValue;
  // The persistent scheduler needs no workspace without split-K / stream-K; checked here.
  if (Kernel::get_workspace_size(args) != 0) return cudaErrorInvalidValue;
  // Builds the TMA descriptors on the host (no stream work, so graph capture is unaffected).
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  const int smem = Kernel::SharedStorageSize;
  const dim3 grid = Kernel::get_grid_shape(params);
  const dim3 block = Kernel::get_block_shape();
  cudaError_t e;
  if constexpr (V != 0) {
    e = cudaFuncSetAttribute(gemm_persistent<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    gemm_persistent<Kernel><<<grid, block, smem, stream>>>(params);
  } else {
    e = cudaFuncSetAttribute(gemm_kept_rows<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    gemm_kept_rows<Kernel><<<grid, block, smem, stream>>>(params, count, hi);
  }
  return cudaGetLastError();
}

template <class Element, int V>
cudaError_t gemm1(const Sm90Args& a) {
  using K = Gemm1<Element, V>;
  const int M = static_cast<int>(a.rows), N = static_cast<int>(a.group_size), Kd = static_cast<int>(a.channels);
  const int L = static_cast<int>(a.hidden / a.group_size);
  typename K::StrideA sA = make_stride(int64_t(a.channels), _1{}, int64_t(0));  // A shared by all groups
  typename K::StrideB sB = make_stride(int64_t(a.channels), _1{}, int64_t(a.group_size * a.channels));
  typename K::StrideD sD = make_stride(int64_t(a.hidden), _1{}, int64_t(a.group_size));
  typename K::StrideC sC{};
  typename K::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kBatched;
  args.problem_shape = make_shape(M, N, Kd, L);
  args.mainloop = {static_cast<Element const*>(a.ws.a), sA, static_cast<Element const*>(a.fc1_w), sB};
  auto& fz = args.epilogue.thread;  // {mul-node {mask, plus-node {acc, bias, op}, op}, gelu op}
  fz = {{{a.ws.mask, 0.f, make_stride(_1{}, _0{}, int64_t(pad_rows(a.rows)))},
         {{}, {static_cast<Element const*>(a.fc1_b), Element(0), make_stride(_0{}, _1{}, int64_t(a.group_size))}, {}},
         {}},
        {}};
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = sC;
  args.epilogue.ptr_D = static_cast<Element*>(a.ws.h);
  args.epilogue.dD = sD;
  args.hw_info.sm_count = sm_count();
  return launch<V, K>(args, a.ws.count, a.stream, 0, INT_MAX);
}

// One unbatched GEMM D[M, N] = epilogue(A[M, K] · B[N, K]ᵀ) over the first M rows (tiles past the
// kept count do nothing; lo, hi as in launch); set_fusion fills the kernel's epilogue (EVT) arguments.
template <class Element, int V, class K, class SetFusion>
cudaError_t flat_gemm(const Sm90Args& a, int64_t M, int lo, int hi, int N, int Kd, const void* A, int64_t lda,
                      const void* B, int64_t ldb, void* D, SetFusion set_fusion) {
  typename K::StrideA sA = make_stride(lda, _1{}, int64_t(0));
  typename K::StrideB sB = make_stride(ldb, _1{}, int64_t(0));
  typename K::StrideD sD = make_stride(int64_t(N), _1{}, int64_t(0));
  typename K::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = make_shape(static_cast<int>(M), N, Kd, 1);
  args.mainloop = {static_cast<Element const*>(A), sA, static_cast<Element const*>(B), sB};
  set_fusion(args.epilogue.thread);
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = typename K::StrideC{};
  args.epilogue.ptr_D = static_cast<Element*>(D);
  args.epilogue.dD = sD;
  args.hw_info.sm_count = sm_count();
  return launch<V, K>(args, a.ws.count, a.stream, lo, hi);
}

template <class Element, int V>
cudaError_t gemm1_plain(const Sm90Args& a, int64_t M, int lo, int hi) {
  const auto* bias = static_cast<Element const*>(a.fc1_b);
  return flat_gemm<Element, V, Gemm1Plain<Element, V>>(
      a, M, lo, hi, static_cast<int>(a.hidden), static_cast<int>(a.channels), a.ws.a, a.channels, a.fc1_w, a.channels, a.ws.h,
      [&](auto& t) { t = {{{}, {bias, Element(0), {}}, {}}, {}}; });  // {gelu-node {plus-node {acc, bias, op}}}
}

template <class Element, int V>
cudaError_t gemm1_colmask(const Sm90Args& a, int64_t M, int lo, int hi) {
  const auto* bias = static_cast<Element const*>(a.fc1_b);
  return flat_gemm<Element, V, Gemm1ColMask<Element, V>>(
      a, M, lo, hi, static_cast<int>(a.hidden), static_cast<int>(a.channels), a.ws.a, a.channels, a.fc1_w, a.channels, a.ws.h,
      // {mul-node {gelu-node {plus-node {acc, bias, op}, op}, colmask, op}}
      [&](auto& t) { t = {{{{}, {bias, Element(0), {}}, {}}, {}}, {a.ws.colmask, 0.f, {}}, {}}; });
}

template <class Element, int V, class K>
cudaError_t gemm2(const Sm90Args& a, int64_t M, int lo, int hi) {
  const auto* bias = static_cast<Element const*>(a.fc2_b);
  return flat_gemm<Element, V, K>(
      a, M, lo, hi, static_cast<int>(a.channels), static_cast<int>(a.hidden), a.ws.h, a.hidden, a.fc2_w, a.fc2_ld, a.ws.d,
      [&](auto& t) { t = {{}, {bias, Element(0), {}}, {}}; });  // {plus-node {acc, bias, op}}
}

// Kernels per GEMM (bench/RESULTS.md, bench/sweep_sdt_rows.py). The kept-row count is known on the
// device only, and no one tile shape suits every count: the persistent cooperative kernels (256-row
// tiles) reach ~85-95 % of cuBLAS from ~4000 rows up, but below ~2000 rows their few tiles leave
// most SMs idle (fc2 at 32 kept rows: 52 us, cuBLAS 4 us; H200). GEMM2 therefore launches two
// persistent kernels and the tile scheduler of one of them schedules nothing: ping-pong with
// 64 x 144 tiles (TileFewRows2) over the first `few_rows` rows when at most that many are kept,
// cooperative with 256 x 144 tiles otherwise (threshold 2048 from an H200 sweep). GEMM1 runs the
// ping-pong kernel with 128 x 144 tiles for every count: as fast as or faster than the
// cooperative one from 32 to 8192 rows but for a few counts, and one launch instead of two (the
// idle one cost ~3 us; H100: 8.75 vs 8.89 ms per DiT-XL step). (One-CTA-per-tile kernels for the
// small side lost ~10 us to launching the CTAs that exit.) DYC_SM90_FEW_ROWS1 / _2 set the
// thresholds (0: cooperative only); DYC_SM90_GEMM1=tma runs GEMM1 one CTA per tile for every
// count. The per-image-mask GEMM1 (group-batched) is one CTA per tile always.
inline int env_int(const char* name, int fallback) {
  const char* e = std::getenv(name);
  return e && *e ? std::atoi(e) : fallback;
}
inline bool gemm1_tma() {
  static const bool v = [] {
    const char* e = std::getenv("DYC_SM90_GEMM1");
    return e && std::strcmp(e, "tma") == 0;
  }();
  return v;
}
inline int few_rows_gemm1() {
  static const int v = env_int("DYC_SM90_FEW_ROWS1", INT_MAX);
  return v;
}
inline int few_rows_gemm2() {
  static const int v = env_int("DYC_SM90_FEW_ROWS2", 2048);
  return v;
}

// The few-rows launch (counts <= few) and the other (counts > few), as a.rows allows.
template <class Small, class Large>
cudaError_t two_kernels(const Sm90Args& a, int few, Small small, Large large) {
  if (few > 0) {
    const cudaError_t e = small(std::min<int64_t>(a.rows, few), 0, few);
    if (e != cudaSuccess || a.rows <= few) return e;
  }
  return large(a.rows, std::max(few, 0), INT_MAX);
}

template <class E>
cudaError_t run_gemm1(const Sm90Args& a) { return gemm1<E, 0>(a); }
template <class E>
cudaError_t run_gemm1_plain(const Sm90Args& a) {
  if (gemm1_tma()) return gemm1_plain<E, 0>(a, a.rows, 0, INT_MAX);
  return two_kernels(a, few_rows_gemm1(), [&](int64_t m, int lo, int hi) { return gemm1_plain<E, 1>(a, m, lo, hi); },
                     [&](int64_t m, int lo, int hi) { return gemm1_plain<E, 2>(a, m, lo, hi); });
}
template <class E>
cudaError_t run_gemm1_colmask(const Sm90Args& a) {
  if (gemm1_tma()) return gemm1_colmask<E, 0>(a, a.rows, 0, INT_MAX);
  return two_kernels(a, few_rows_gemm1(),
                     [&](int64_t m, int lo, int hi) { return gemm1_colmask<E, 1>(a, m, lo, hi); },
                     [&](int64_t m, int lo, int hi) { return gemm1_colmask<E, 2>(a, m, lo, hi); });
}
template <class E>
cudaError_t run_gemm2(const Sm90Args& a) {
  return two_kernels(a, few_rows_gemm2(),
                     [&](int64_t m, int lo, int hi) { return gemm2<E, 1, Gemm2FewRows<E>>(a, m, lo, hi); },
                     [&](int64_t m, int lo, int hi) { return gemm2<E, 2, Gemm2<E, 2>>(a, m, lo, hi); });
}

}  // namespace

#if defined(DYC_SM90_PART_GEMM1)
bool sm90_compiled() { return true; }

cudaError_t sm90_gemm1(const Sm90Args& a) {
  return a.dtype == 1 ? run_gemm1<cutlass::half_t>(a) : run_gemm1<cutlass::bfloat16_t>(a);
}

#endif
#if defined(DYC_SM90_PART_GEMM1_PLAIN)
cudaError_t sm90_gemm1_plain(const Sm90Args& a) {
  return a.dtype == 1 ? run_gemm1_plain<cutlass::half_t>(a) : run_gemm1_plain<cutlass::bfloat16_t>(a);
}
#endif
#if defined(DYC_SM90_PART_GEMM1_COLMASK)
cudaError_t sm90_gemm1_colmask(const Sm90Args& a) {
  return a.dtype == 1 ? run_gemm1_colmask<cutlass::half_t>(a) : run_gemm1_colmask<cutlass::bfloat16_t>(a);
}
#endif
#if defined(DYC_SM90_PART_GEMM2)
cudaError_t sm90_gemm2(const Sm90Args& a) {
  return a.dtype == 1 ? run_gemm2<cutlass::half_t>(a) : run_gemm2<cutlass::bfloat16_t>(a);
}
#endif

}  // namespace dyc

#else  // !DYC_HAVE_SM90: built without an sm_90a target

namespace dyc {
#if defined(DYC_SM90_PART_GEMM1)
bool sm90_compiled() { return false; }
cudaError_t sm90_gemm1(const Sm90Args&) { return cudaErrorNotSupported; }
#endif
#if defined(DYC_SM90_PART_GEMM1_PLAIN)
cudaError_t sm90_gemm1_plain(const Sm90Args&) { return cudaErrorNotSupported; }
#endif
#if defined(DYC_SM90_PART_GEMM1_COLMASK)
cudaError_t sm90_gemm1_colmask(const Sm90Args&) { return cudaErrorNotSupported; }
#endif
#if defined(DYC_SM90_PART_GEMM2)
cudaError_t sm90_gemm2(const Sm90Args&) { return cudaErrorNotSupported; }
#endif
}  // namespace dyc

#endif
