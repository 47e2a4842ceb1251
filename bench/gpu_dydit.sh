#!/usr/bin/env bash
# Issue 8 on the GPU machine: the SdtMlp plugin, DiT-XL/2 synth checkpoints, `dyc bench` and a
# per-kernel profile. Results (JSON, plots, logs) go to $OUT.
#   RUNS="LAMBDA:IMAGES ..."  LAMBDAS="0.5 0.7"  BACKENDS=eager,eager-dydit,torch,onnxruntime,tensorrt
#   PROFILE=1 (bench/profile_dydit.py on the first λ; PROFILE_BATCHES="1 16" images, default 16;
#   PROFILE_MODES="sdt dense" MLP forms of the DyDiT engines, default the engine's own)
#   ENGINES=K (at most K engines for the torch row; default the compiler's, K <= 8)
#   BOUND=1 (bench/gemm_bound.py first: the ratio these kernels allow at each RUNS batch, same machine)
#   DYC_PLUGIN_LIB=path/to/libdyc_plugins.so (prebuilt for sm_90a) or CUTLASS headers in .cutlass/include
#   (the plugin is then built here; plugins/README.md).
# With onnxruntime in BACKENDS, each λ is also compiled to an fp16 bundle for the ONNX Runtime row.
set -u -o pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ -n "${DYC_PLUGIN_LIB:-}" ] && [ ! -f "$DYC_PLUGIN_LIB" ]; then
  echo "DYC_PLUGIN_LIB=$DYC_PLUGIN_LIB does not exist (carried?)" >&2; exit 2
fi
LIB=${DYC_PLUGIN_LIB:-$PWD/build/lib/libdyc_plugins.so}
if [ ! -f "$LIB" ]; then
  LIB=$PWD/build/lib/libdyc_plugins.so
  STAGES=build bash plugins/scripts/gpu_check.sh > "$OUT/plugin_build.log" 2>&1 \
    || { echo "plugin build failed: SDT runs the all-token fallback"; tail -20 "$OUT/plugin_build.log"; }
fi
[ -f "$LIB" ] && export DYC_PLUGIN_LIB=$LIB
# the library says whether its Hopper (CUTLASS) path was built; without it SDT runs the portable GEMMs
python3 -c "from dyc.kernels import sdt_mlp as K; v = K.version(); print('plugin', v)
if 'cutlass' not in v: print('WARNING: plugin built without the Hopper CUTLASS path: timings are not representative')" \
  2>&1 | tee "$OUT/plugin.txt"
python3 -c "import click, safetensors" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site \
  --find-links .wheels-dyc click safetensors onnx protobuf ml_dtypes typing_extensions
export PYTHONPATH=$PYTHONPATH:/tmp/site
dyc() { python3 -m dyc.cli "$@"; }
BACKENDS=${BACKENDS:-eager,eager-dydit,torch,onnxruntime,tensorrt}
for lam in ${LAMBDAS:-0.5}; do
  [ -f /tmp/xl_$lam.safetensors ] || dyc synth --model DiT-XL/2 --lambda "$lam" --seed 0 -o /tmp/xl_$lam.safetensors
  if [[ $BACKENDS == *onnxruntime* ]] && [ ! -d /tmp/xl_$lam.dyc ]; then
    dyc compile /tmp/xl_$lam.safetensors --dtype fp16 -o /tmp/xl_$lam.dyc 2>&1 | tail -3
  fi
done
if [ "${PROFILE:-0}" = 1 ]; then
  lam=${LAMBDAS:-0.5}; lam=${lam%% *}
  for pb in ${PROFILE_BATCHES:-16}; do
    for pm in ${PROFILE_MODES:-default}; do
      mode=(); [ "$pm" != default ] && mode=(--mlp-mode "$pm")
      python3 bench/profile_dydit.py /tmp/xl_$lam.safetensors --batch "$pb" ${ENGINES:+--groups $ENGINES} "${mode[@]}" \
        --json "$OUT/profile_lam${lam}_b${pb}_$pm.json" 2>&1 | tee "$OUT/profile_lam${lam}_b${pb}_$pm.log" \
        | grep -E "^#|^## " 
    done
  done
fi
if [ "${BOUND:-0}" = 1 ]; then
  for lam in ${LAMBDAS:-0.5}; do
    batches=$(for spec in ${RUNS:-0.5:16}; do [ "${spec%%:*}" = "$lam" ] && echo "${spec##*:}"; done)
    [ -n "$batches" ] && python3 bench/gemm_bound.py /tmp/xl_$lam.safetensors --batch $batches \
      --json "$OUT/gemm_bound_lam$lam.json" 2> "$OUT/gemm_bound_lam$lam.log"
  done
fi
for spec in ${RUNS:-0.5:16}; do
  lam=${spec%%:*}; b=${spec##*:}
  bundle=(); [ -d /tmp/xl_$lam.dyc ] && bundle=(--bundle /tmp/xl_$lam.dyc)
  tag=xl_lam${lam}_b$b${ENGINES:+_k$ENGINES}
  dyc bench /tmp/xl_$lam.safetensors --batch "$b" --steps 50 --sampler ddim --dtype bf16 --backends "$BACKENDS" \
    ${ENGINES:+--groups $ENGINES} "${bundle[@]}" -o "$OUT/$tag.json" --plot "$OUT/$tag.png" 2>&1 | tee "$OUT/$tag.log"
done
