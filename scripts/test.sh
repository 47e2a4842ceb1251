#!/usr/bin/env bash
# Install dyc with its test dependencies into .venv and run the test suite (CPU is enough).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# torch 2.13.0 is the CPU build this workplace keeps on disk; elsewhere any torch >= 2.4 works
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra "$@"
