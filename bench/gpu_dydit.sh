#!/usr/bin/env bash
# Issue 8 on the GPU machine: build the plugin, make DiT-XL/2 synth checkpoints, run `dyc bench`.
# Results (JSON, plots, logs) go to $OUT. Needs CUTLASS headers in .cutlass/include (see plugins/README.md).
set -u -o pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ ! -f build/lib/libdyc_plugins.so ]; then
  STAGES=build bash plugins/scripts/gpu_check.sh > "$OUT/plugin_build.log" 2>&1 \
    || { echo "plugin build failed: SDT runs the all-token fallback"; tail -20 "$OUT/plugin_build.log"; }
fi
[ -f build/lib/libdyc_plugins.so ] && export DYC_PLUGIN_LIB=$PWD/build/lib/libdyc_plugins.so
python3 -c "import click" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .wheels-dyc/*.whl
export PYTHONPATH=$PYTHONPATH:/tmp/site
dyc() { python3 -m dyc.cli "$@"; }
for lam in ${LAMBDAS:-0.5}; do
  [ -f /tmp/xl_$lam.safetensors ] || dyc synth --model DiT-XL/2 --lambda "$lam" --seed 0 -o /tmp/xl_$lam.safetensors
done
for spec in ${RUNS:-0.5:16}; do
  lam=${spec%%:*}; b=${spec##*:}
  dyc bench /tmp/xl_$lam.safetensors --batch "$b" --steps 50 --sampler ddim --dtype bf16 \
    --backends "${BACKENDS:-eager,eager-dydit,torch,onnxruntime,tensorrt}" \
    --json "$OUT/xl_lam${lam}_b$b.json" --plot "$OUT/xl_lam${lam}_b$b.png" 2>&1 | tee "$OUT/xl_lam${lam}_b$b.log"
done
