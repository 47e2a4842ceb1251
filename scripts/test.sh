#!/usr/bin/env bash
# Install dyc with its test dependencies into .venv and run the test suite (CPU is enough).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch 2.13.0 is the CPU build this workplace keeps on disk; elsewhere any torch >= 2.4 works
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,tensorrt-rtx]'
# C++ runtime (engines/): a JSON library and ONNX Runtime headers + library
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq nlohmann-json3-dev >/dev/null
fi
PYTHON=.venv/bin/python bash engines/fetch_onnxruntime.sh
# the same headers build plugins/' ONNX Runtime custom-op library (tested on the CPU EP)
export ONNXRUNTIME_ROOT="$PWD/engines/.deps/onnxruntime"
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra "$@"
