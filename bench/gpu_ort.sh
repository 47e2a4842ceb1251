#!/usr/bin/env bash
# Issue 16 on the GPU machine: ONNX Runtime CUDA EP with the cuda graphs (SdtMlp custom op, fused
# attention, IO binding, CUDA graphs, one weight buffer), Python and C++. Everything goes to $OUT;
# the summary table is printed last. Each step goes on past a failed one.
#
# Needs (carried / staged by the caller):
#   onnxruntime-gpu 1.31.1 in /tmp/site (../shared/tools/stage-wheels onnxruntime-gpu==1.31.1): PYTHONPATH
#   build/sm90/lib/{libdyc_plugins.so,libdyc_ort_ops.so}   (cmake -S . -B build/sm90 -DDYC_CUDA_ARCHS=90a ...)
#   build/engines-cuda/dyc_sample                           (cmake -S engines -B build/engines-cuda, nvcc found,
#                          -DONNXRUNTIME_ROOT=a folder with engines/.deps' include/ and lib/ holding the
#                          onnxruntime-gpu wheel's libonnxruntime.so.1.31.1: ORT versions its symbols, docs/cpp.md)
#   .wheels-dyc/ where the machine lacks dyc's Python dependencies (as for bench/gpu_dydit.sh)
# Knobs: DTYPES="fp16" (add bf16 for a second bundle), LAMBDA=0.5, BATCH=16, SKIP_BENCH=1, SKIP_CPP=1.
# Time: ~1 min smoke tests, ~2 min synth + compile (DiT-XL/2), ~1.5 min profile, ~2-3 min bench, ~1 min C++
# (about 7 min).
set -u -o pipefail
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1  # one log; at most 8 files come back: log, summary and a few JSON
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
LIBDIR=${LIBDIR:-$PWD/build/sm90/lib}
export DYC_PLUGIN_LIB=$LIBDIR/libdyc_plugins.so DYC_ORT_OPS_LIB=$LIBDIR/libdyc_ort_ops.so
DYC_SAMPLE=${DYC_SAMPLE:-$PWD/build/engines-cuda/dyc_sample}
DTYPES=${DTYPES:-fp16}; LAMBDA=${LAMBDA:-0.5}; BATCH=${BATCH:-16}
SUMMARY=$OUT/summary.txt; : > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
step() { echo; echo "==== $*"; }
dyc() { python3 -m dyc.cli "$@"; }

# ---- 0. fail fast: the pieces this script cannot work without --------------------------------------
step "0. environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# dyc's own Python dependencies (click, onnx, safetensors, ...), as bench/gpu_dydit.sh brings them
python3 -c "import click, onnx, safetensors" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site \
  --find-links .wheels-dyc click safetensors onnx protobuf ml_dtypes typing_extensions
for f in "$DYC_PLUGIN_LIB" "$DYC_ORT_OPS_LIB"; do
  [ -f "$f" ] || { echo "FATAL: $f missing: carry build/sm90/lib (built on the dev machine)" >&2; exit 2; }
done
python3 - <<'PY' || { echo "FATAL: no usable onnxruntime-gpu (stage it into /tmp/site)" >&2; exit 2; }
import os, torch, onnxruntime as ort
print("torch", torch.__version__, "onnxruntime", ort.__version__, ort.__file__)
assert "CUDAExecutionProvider" in ort.get_available_providers(), ort.get_available_providers()
so = ort.SessionOptions(); so.register_custom_ops_library(os.environ["DYC_ORT_OPS_LIB"])
from dyc.kernels import sdt_mlp
print("plugin", sdt_mlp.version())
PY
# C++: libonnxruntime.so.1 of the GPU wheel, and the CUDA libraries of torch's nvidia-* wheels
ORT_CAPI=$(python3 -c "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))")
NV_LIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages() + [site.getusersitepackages(), "/tmp/site"]:
    for so in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        dirs.add(os.path.dirname(so))
print(":".join(sorted(dirs)))
PY
)
CPP_LD="$ORT_CAPI:$NV_LIBS"
[ -e "$ORT_CAPI/libonnxruntime.so.1" ] || ln -sf "$(ls "$ORT_CAPI"/libonnxruntime.so.1.* | head -1)" "$ORT_CAPI/libonnxruntime.so.1" 2>/dev/null

# ---- 1. smoke: the cuda graphs against eager, CUDA-graph replays, one device weight copy (small models) --
step "1. GPU tests (tests/test_ort_cuda_gpu.py)"
python3 -m pytest tests/test_ort_cuda_gpu.py -q -rs 2>&1 | tee /tmp/pytest_gpu.log
note "gpu tests: $(tail -1 /tmp/pytest_gpu.log)"

# ---- 2. DiT-XL/2 synth + bundles ----------------------------------------------------------------
step "2. synth + compile DiT-XL/2 lambda $LAMBDA"
CK=/tmp/xl_$LAMBDA.safetensors
[ -f "$CK" ] || dyc synth --model DiT-XL/2 --lambda "$LAMBDA" --seed 0 -o "$CK" 2>&1 | tail -2
for dt in $DTYPES; do
  B=/tmp/xl_${LAMBDA}_$dt.dyc
  [ -d "$B" ] || { /usr/bin/time -f "compile $dt: %e s, peak RSS %M KB" python3 -m dyc.cli compile "$CK" --lambda "$LAMBDA" \
    --dtype "$dt" -o "$B" 2>&1 | tail -4; } 2>&1
done
B=/tmp/xl_${LAMBDA}_${DTYPES%% *}.dyc

# ---- 3. where the time and the memory go: kernels by category, CUDA-graph replay per call, device
#         memory (and host RSS) of the group sessions with per-session arenas and with the shared one
step "3. profile: kernels and memory (bench/profile_ort.py)"
python3 bench/profile_ort.py "$B" --batch "$BATCH" --memory --json "$OUT/profile_ort.json" 2>&1 \
  | grep -v "plugin EP" | grep -A8 "mean over the schedule\|^CUDA-graph\|^memory"
python3 - "$OUT/profile_ort.json" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json, sys
p = json.load(open(sys.argv[1]))
cats = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(p["mean"]["categories"].items(), key=lambda kv: -kv[1]))
print(f"profile: {p['mean']['total_us'] / 1e3:.2f} ms of kernels per call ({cats} ms); graph replay {p['graph_ms_mean']:.2f} ms")
for m in p.get("memory", []):
    if "load_x" not in m:
        print(f"memory ({m['config']}): {m.get('error', '?')}")
        continue
    mb = [round(x / 2**20) for x in m["session_bytes"]]
    print(f"memory ({m['config']}): {m['groups']} sessions over {m['weights_used_bytes'] / 2**30:.2f} GiB of weights used "
          f"({m['weights_bytes'] / 2**30:.2f} GiB weights.bin): device {m['load_x_used']:.2f}x the weights used at load "
          f"({m['load_x']:.2f}x weights.bin), {m['after_calls_x_used']:.2f}x after a {p['rows']}-row call per group; "
          f"upload {m['weights_upload_bytes'] / 2**20:.0f} MiB, sessions {mb} MiB; host RSS {m['host_rss_load_x']:.2f}x at load; "
          f"graph replay {m['graph_ms_mean']:.2f} ms per call")
PY

# ---- 4. verify the cuda graphs against eager on the GPU (every group, every schedule t) ---------
step "4. dyc verify --variant cuda --device cuda"
# SKIP_VERIFY=1: the float64/fp16 eager references of XL run on the CPU (minutes); bench's rows are checked anyway
for dt in $( [ "${SKIP_VERIFY:-0}" = 1 ] || echo "$DTYPES" ); do
  dyc verify /tmp/xl_${LAMBDA}_$dt.dyc --variant cuda --device cuda 2>&1 | tee /tmp/verify_$dt.log | tail -10
  note "verify $dt (max-relative metric; SDT flips near the threshold count fully): $(tail -1 /tmp/verify_$dt.log)"
done

# ---- 5. dyc bench, side by side: eager, torch-static, torch, onnxruntime -------------------------
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step "5. dyc bench batch $BATCH + CFG"
  for dt in $DTYPES; do
    dyc bench "$CK" --batch "$BATCH" --steps 50 --sampler ddim --dtype bf16 \
      --backends eager,torch-static,torch,onnxruntime --bundle /tmp/xl_${LAMBDA}_$dt.dyc \
      -o "$OUT/bench_ort_$dt.json" 2>&1 | tail -12
    python3 - "$OUT/bench_ort_$dt.json" "$dt" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json, sys
rows = {r["backend"]: r for r in json.load(open(sys.argv[1]))["rows"]}
o, s, t = rows.get("onnxruntime", {}), rows.get("torch-static", {}), rows.get("torch", {})
if o.get("step_ms") and s.get("step_ms"):
    print(f"bench ({sys.argv[2]} bundle): onnxruntime {o['step_ms']:.2f} ms/step = {s['step_ms'] / o['step_ms']:.2f}x "
          f"torch-static ({s['step_ms']:.2f}); torch {t.get('step_ms') or float('nan'):.2f}; "
          f"ort rel L2 {o.get('rel_l2_err')}; status {o.get('status')}")
else:
    print(f"bench ({sys.argv[2]}): onnxruntime row: {o.get('status')}; torch-static: {s.get('status')}")
PY
  done
fi

# ---- 6. C++ dyc_sample --device cuda vs dyc run --backend onnxruntime --device cuda --------------
if [ "${SKIP_CPP:-0}" != 1 ]; then
  step "6. C++ runtime on the GPU"
  if [ ! -x "$DYC_SAMPLE" ]; then
    note "c++: $DYC_SAMPLE missing (carry build/engines-cuda)"
  else
    python3 -c "import numpy as np; np.save('/tmp/noise16.npy', np.random.default_rng(0).standard_normal(($BATCH, 4, 32, 32)).astype(np.float32))"
    CLASSES=$(python3 -c "print(','.join(str(i * 61 % 1000) for i in range($BATCH)))")
    dyc run "$B" --backend onnxruntime --device cuda --sampler ddim --steps 50 --cfg 4 --classes "$CLASSES" \
      --noise /tmp/noise16.npy --save-latents /tmp/py_latents.npy -o /tmp/pyrun 2>&1 | tail -3
    LD_LIBRARY_PATH="$CPP_LD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$DYC_SAMPLE" "$B" --device cuda \
      --custom-op-library "$DYC_ORT_OPS_LIB" --no-verify --sampler ddim --steps 50 --cfg 4 --classes "$CLASSES" \
      --noise /tmp/noise16.npy --out /tmp/cpp_latents.npy --timing /tmp/cpp_timing.json 2>&1 | tail -3
    python3 - <<'PY' 2>&1 | tail -1 | tee -a "$SUMMARY"
import json, statistics, numpy as np
a, b = np.load("/tmp/py_latents.npy"), np.load("/tmp/cpp_latents.npy")
rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
py = [s["ms"] for s in json.load(open("/tmp/pyrun/run.json"))["trace"]]
cpp = json.load(open("/tmp/cpp_timing.json"))
mp, mc = statistics.median(py), statistics.median(cpp["step_ms"])
print(f"c++ vs dyc run (onnxruntime cuda): latents rel L2 {rel:.2e} ({'ok' if rel < 1e-2 else 'ABOVE 1e-2'}); "
      f"median step {mc:.2f} ms vs {mp:.2f} ms ({(mc / mp - 1) * 100:+.1f}%); {cpp['engine']}")
PY
    cp /tmp/cpp_timing.json "$OUT/cpp_timing.json" 2>/dev/null
  fi
fi

echo; echo "==== summary"; cat "$SUMMARY"
sleep 1  # let the log tee finish
