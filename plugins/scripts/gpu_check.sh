#!/usr/bin/env bash
# Build libdyc_plugins for sm_90a, run the GPU tests, compute-sanitizer
# on small cases and the SdtMlp benchmark; logs go to $OUT (default ./out). On the H100 device
# machine the CUTLASS headers come carried in .cutlass/include.
#   STAGES=build,test,profile,sanitize,bench  ARCHS=90a  BENCH_ARGS=...  bash plugins/scripts/gpu_check.sh
# With a library built elsewhere (e.g. here on the CPU, then carried): leave out the build stage and
#   DYC_PLUGIN_LIB=build-sm90/lib/libdyc_plugins.so STAGES=test,sanitize,bench bash plugins/scripts/gpu_check.sh
# GEMM1_KERNELS="coop tma" runs the benchmark once per Hopper GEMM1 kernel (DYC_SM90_GEMM1).
set -u -o pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STAGES=${STAGES:-build,test,sanitize,bench}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

if [[ $STAGES == *build* ]]; then
  start=$(date +%s)
  { cmake -S . -B build -DDYC_CUDA_ARCHS="${ARCHS:-90a}" -DCUTLASS_DIR="$PWD/.cutlass" -DDYC_BUILD_ENGINES=OFF \
          -DPython3_EXECUTABLE="$(command -v python3)" && cmake --build build -j"$(nproc)"; } > "$OUT/build.log" 2>&1
  rc=$?
  grep -E "error|warning|dyc:" "$OUT/build.log" | head -40
  echo "build rc=$rc in $(( $(date +%s) - start )) s"
  [ $rc = 0 ] || exit 1
fi
if [[ $STAGES == *build* ]] || [ -z "${DYC_PLUGIN_LIB:-}" ]; then
  export DYC_PLUGIN_LIB=$PWD/build/lib/libdyc_plugins.so DYC_PLUGIN_BUILD_DIR=$PWD/build
  build_tests=tests/test_plugins_build.py  # reuses this build
fi
[ -f "$DYC_PLUGIN_LIB" ] || { echo "no library at DYC_PLUGIN_LIB=$DYC_PLUGIN_LIB" >&2; exit 2; }
export DYC_PLUGIN_LIB
python3 -c "from dyc.kernels import sdt_mlp as K; print(K.version())"

if [[ $STAGES == *test* ]]; then
  timeout 300 python3 -m pytest -q -rs -x tests/test_plugins_gpu.py tests/test_ln_modulate_gpu.py ${build_tests:-} \
    2>&1 | tail -n 25 | tee "$OUT/tests.log"
fi
if [[ $STAGES == *profile* ]]; then
  timeout 240 python3 plugins/scripts/profile_sdt_mlp.py --variants default,masked 2>&1 \
    | tee "$OUT/profile.log"
fi
if [[ $STAGES == *sanitize* ]]; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 python3 plugins/scripts/sanitize_case.py 2>&1 \
    | tail -n 12 | tee "$OUT/sanitizer.log"
fi
if [[ $STAGES == *bench* ]]; then
  for k in ${GEMM1_KERNELS:-coop}; do
    DYC_SM90_GEMM1=$k timeout 300 python3 bench/bench_sdt_mlp.py --json "$OUT/bench_sdt_mlp_$k.json" ${BENCH_ARGS:-} \
      2>&1 | tee "$OUT/bench_sdt_mlp_$k.log"
  done
fi
