#!/usr/bin/env bash
# Issue 17 on the GPU machine: `dyc serve` (torch backend, step-level batching) on a DiT-XL/2 synth
# bundle, driven by 1, 8 and 32 closed-loop gRPC clients, against one request at a time.
# Results (bench_serve.json, bench_serve.log, serve_*.log) go to $OUT; a table is printed last.
#   WHEELS=.wheels-serve  the carried wheels (README's Serving section lists them); numpy<2 goes to
#                         its own folder for Triton's Python-backend stub (dyc serve --stub-numpy)
#   DURATION=10 WARMUP_S=3 CONCURRENCY=1,8,32 UNBATCHED=0 (1: also a server without cross-request batching)
#   DYC_PLUGIN_LIB=path/to/libdyc_plugins.so (prebuilt for sm_90a; else SDT runs the all-token fallback)
# Expected: ~1.5 min synth + compile, ~1 min server start and warm-up, ~1 min timed points.
# The warm-up captures a CUDA graph per group x mask form x padded size (1..64), and the torch backend
# times each of its MLP forms at every capture: DYC_MLP_MODE=sdt|dense (inherited) skips that timing.
set -u -o pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WHEELS=${WHEELS:-.wheels-serve}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
ldd --version | head -1 | tee -a "$OUT/gpu.txt"  # tritonserver needs glibc >= 2.35
if ! python3 -c "import pytriton, tritonclient.grpc, tritonclient.http" 2>/dev/null; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no PyTriton here and no wheels in $WHEELS" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    $(ls "$WHEELS"/*.whl | grep -v '/numpy-') || exit 2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
SERVE_ARGS=""
if python3 -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) < 2)"; then
  # numpy 2 here: the stub gets numpy 1 from its own folder (dyc/serve/stub_env.py says why)
  np1=$(ls "$WHEELS"/numpy-1.*.whl 2>/dev/null | head -1)
  [ -n "$np1" ] || { echo "numpy 2 here: carry a numpy<2 wheel in $WHEELS for the stub" >&2; exit 2; }
  [ -d /tmp/np1/numpy ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/np1 "$np1" || exit 2
  SERVE_ARGS="--stub-numpy /tmp/np1"
fi
[ -n "${DYC_PLUGIN_LIB:-}" ] && [ ! -f "$DYC_PLUGIN_LIB" ] && { echo "DYC_PLUGIN_LIB=$DYC_PLUGIN_LIB missing" >&2; exit 2; }
[ -z "${DYC_PLUGIN_LIB:-}" ] && [ -f build/lib/libdyc_plugins.so ] && export DYC_PLUGIN_LIB=$PWD/build/lib/libdyc_plugins.so
python3 -c "from dyc.kernels import sdt_mlp as K; print('plugin', K.version() if K.available() else 'not built: SDT fallback')" \
  2>&1 | tee "$OUT/plugin.txt"
dyc() { python3 -m dyc.cli "$@"; }
[ -f /tmp/xl.safetensors ] || dyc synth --model DiT-XL/2 --lambda 0.5 --seed 0 -o /tmp/xl.safetensors
if [ ! -d /tmp/xl_bf16.dyc ]; then
  t0=$SECONDS; dyc compile /tmp/xl.safetensors --dtype bf16 -o /tmp/xl_bf16.dyc 2>&1 | tail -3
  echo "compile: $((SECONDS - t0)) s"
fi
python3 bench/bench_serve.py /tmp/xl_bf16.dyc --backend torch --concurrency "${CONCURRENCY:-1,8,32}" \
  --duration "${DURATION:-10}" --warmup-s "${WARMUP_S:-3}" --steps 50 --sampler ddim --cfg 4.0 --max-batch 64 \
  $( [ "${UNBATCHED:-0}" = 1 ] && echo --unbatched ) --serve-args="$SERVE_ARGS" --out "$OUT" 2>&1 \
  | tee "$OUT/bench_serve.log"
