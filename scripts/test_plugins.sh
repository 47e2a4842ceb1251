#!/usr/bin/env bash
# CI's second step: the tests that need the CUDA plugin build (nvcc + CUTLASS for sm_80/86/89/90a: 10-25 min
# on two cores, no GPU needed), kept out of the default suite (scripts/test.sh) by the `plugins_build` marker.
# They build the top-level CMake project once (plugins/ and engines/) and check the C ABI, the ONNX Runtime
# custom op on the CPU EP and the top-level ctest. Run after scripts/test.sh (it makes .venv and stages ONNX
# Runtime in engines/.deps). DYC_PLUGIN_BUILD_DIR=DIR reuses a finished build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export ONNXRUNTIME_ROOT="${ONNXRUNTIME_ROOT:-$PWD/engines/.deps/onnxruntime}"
.venv/bin/python -m pytest -q -ra -m plugins_build "$@"
