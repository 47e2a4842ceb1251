#!/usr/bin/env bash
# Issue 19 on the GPU machine: the DyDiT paper's other systems through `dyc bench` (bf16), each compiled
# DyDiT-family model against its compiled static model (the same family's plain model, torch backend),
# every row checked against eager first; DeepCache's extra speedup and drift over DiT-XL/2 256.
#   DiT-XL/2 512 px λ 0.7 (Table 12), U-ViT-H/2 λ 0.5 (Table 10), U-ViT-S/2 λ 0.4 (Table 9),
#   PixArt-α 256 px λ 0.7 (Table 13, random text embeddings), DiT-XL/2 256 λ 0.5 + DeepCache 2,3 (Table 18).
# Short DDIM runs (STEPS, default 20) keep the whole script near 5 minutes on an H200.
#   DYC_PLUGIN_LIB=path/to/libdyc_plugins.so (prebuilt for sm_90a; without it SDT runs PyTorch maths)
#   STEPS=20 REPEATS=2 BATCH=16 UVITS_BATCH=128 RUNS="dit512 uvith uvits pixart dc256" (a subset to run)
# Writes $OUT/<run>.json, $OUT/families.log and, last, $OUT/summary.txt (also printed).
set -u -o pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/families.log; : > "$LOG"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
if [ -n "${DYC_PLUGIN_LIB:-}" ] && [ ! -f "$DYC_PLUGIN_LIB" ]; then
  echo "DYC_PLUGIN_LIB=$DYC_PLUGIN_LIB does not exist (carried?): SDT runs PyTorch maths" | tee -a "$LOG"
  unset DYC_PLUGIN_LIB
fi
python3 -c "from dyc.kernels import sdt_mlp as K; print('plugin', K.version() if K.available() else 'not built')" \
  2>&1 | tee -a "$LOG"
python3 -c "import click, safetensors" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site \
  --find-links .wheels-dyc click safetensors onnx protobuf ml_dtypes typing_extensions
export PYTHONPATH=$PYTHONPATH:/tmp/site
dyc() { python3 -m dyc.cli "$@"; }
STEPS=${STEPS:-20}; REPEATS=${REPEATS:-2}; BATCH=${BATCH:-16}
W=/tmp/dyc_families; mkdir -p "$W"

# name | synth args | bench args
run() {
  local name=$1 synth=$2 extra=$3 t0=$SECONDS
  echo "=== $name: synth $synth" | tee -a "$LOG"
  if [ ! -f "$W/$name.safetensors" ]; then
    # shellcheck disable=SC2086
    dyc synth $synth --seed 0 -o "$W/$name.safetensors" >> "$LOG" 2>&1 || { echo "$name: synth FAILED" | tee -a "$LOG"; return; }
  fi
  # shellcheck disable=SC2086
  timeout 540 python3 -m dyc.cli bench "$W/$name.safetensors" --backends torch --dtype bf16 --sampler ddim \
    --steps "$STEPS" --repeats "$REPEATS" $extra -o "$OUT/$name.json" >> "$LOG" 2>&1 \
    || echo "$name: bench FAILED (rc $?)" | tee -a "$LOG"
  echo "=== $name: $((SECONDS - t0)) s" | tee -a "$LOG"
}
for r in ${RUNS:-dit512 uvith uvits pixart dc256}; do
  case $r in
    dit512) run dit512 "--model DiT-XL/2 --image-size 512 --lambda 0.7" "--batch $BATCH" ;;
    uvith)  run uvith "--model U-ViT-H/2 --lambda 0.5" "--batch $BATCH" ;;
    uvits)  run uvits "--model U-ViT-S/2 --lambda 0.4" "--batch ${UVITS_BATCH:-128} --no-cfg" ;;
    pixart) run pixart "--model PixArt-XL/2 --lambda 0.7" "--batch $BATCH" ;;
    dc256)  run dc256 "--model DiT-XL/2 --lambda 0.5" "--batch $BATCH --deepcache 2,3" ;;
  esac
done

python3 - "$OUT" <<'EOF' 2>&1 | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':<8} {'model':<16} {'rows':>5} {'static ms':>10} {'dydit ms':>9} {'vs static':>9} {'GFLOPs st/dy':>14} "
      f"{'L2 err':>8}  status")
for name in ("dit512", "uvith", "uvits", "pixart", "dc256"):
    p = out / f"{name}.json"
    if not p.is_file():
        print(f"{name:<8} (no result: see families.log)")
        continue
    rep = json.loads(p.read_text())
    rows = {r["backend"]: r for r in rep["rows"]}
    st, dy = rows.get("torch-static", {}), rows.get("torch", {})
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"
    print(f"{name:<8} {rep['model']:<16} {rep['model_batch']:>5} {f(st.get('step_ms'), '10.3f')} "
          f"{f(dy.get('step_ms'), '9.3f')} {f(dy.get('speedup_vs_static'), '8.2f')}x "
          f"{f(st.get('gflops_per_step'), '6.1f')}/{f(dy.get('gflops_per_step'), '6.1f')} "
          f"{f(dy.get('rel_l2_err'), '8.1e')}  {dy.get('status', '-')}; static {st.get('status', '-')}")
    for r in rep.get("deepcache", []):
        print(f"   DeepCache {r['row']:<12} interval {r['interval']} k {r['shallow']}: {r['s_per_image']:.4f} s/image, "
              f"extra {r['extra_speedup']:.2f}x, vs static {f(r.get('speedup_vs_static'), '.2f')}x, "
              f"drift {r['drift_rel_l2']:.2e}")
EOF
