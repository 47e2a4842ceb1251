#!/usr/bin/env bash
# Issue 6 on the GPU machine with a prebuilt libdyc_plugins.so (DYC_PLUGIN_LIB): GPU tests, the
# sanitizer on small cases, the SdtMlp benchmark for each GEMM1 kernel, and the GEMM1 sweep if built.
# Logs go to $OUT.
set -u -o pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
: "${DYC_PLUGIN_LIB:?set DYC_PLUGIN_LIB to a libdyc_plugins.so built for sm_90a}"
export DYC_PLUGIN_LIB
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "from dyc.kernels import sdt_mlp as K; print(K.version())"
timeout 300 python3 -m pytest -q -rs -x tests/test_plugins_gpu.py 2>&1 | tail -n 8 | tee "$OUT/tests.log"
timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 plugins/scripts/sanitize_case.py 2>&1 \
  | tail -n 4 | tee "$OUT/sanitizer.log"
for k in ${GEMM1_KERNELS:-coop tma}; do
  DYC_SM90_GEMM1=$k timeout 200 python3 bench/bench_sdt_mlp.py --variants default,masked,shared --iters 50 \
    --json "$OUT/bench_sdt_mlp_$k.json" 2>&1 | tee "$OUT/bench_sdt_mlp_$k.log"
done
