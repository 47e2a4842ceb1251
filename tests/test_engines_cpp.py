"""The C++ runtime (engines/): configure, build and run its ctest suite in a temporary build dir.

ctest runs the unit tests (sha256, canonical manifest JSON, timesteps, .npy) and the end-to-end
cases: ``dyc_sample`` on a tiny compiled bundle gives the final latents of ``dyc run`` with the
same noise file (max |diff| <= 1e-5, float32 rounding) for DDIM / DPM-Solver++ with and without CFG, and damaged
bundles fail with clear errors. Skipped, with the reason, where the toolchain or ONNX Runtime's
headers/library are absent (CI stages them: ``engines/fetch_onnxruntime.sh``, docs/cpp.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINES = REPO / "engines"


def _ort_root() -> Path | None:
    """The ONNX Runtime the CMake build will find: $ONNXRUNTIME_ROOT, else engines/.deps/onnxruntime."""
    for root in (os.environ.get("ONNXRUNTIME_ROOT"), ENGINES / ".deps" / "onnxruntime"):
        if not root:
            continue
        root = Path(root)
        has_h = any((root / d / "onnxruntime_cxx_api.h").is_file() for d in ("include/onnxruntime", "include"))
        has_lib = any(root.glob("lib*/libonnxruntime.so*"))
        if has_h and has_lib:
            return root
    return None


def _skip_reason() -> str | None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH"
    if not any(Path(p, "nlohmann", "json.hpp").is_file() for p in ("/usr/include", "/usr/local/include")):
        return "nlohmann-json headers absent (apt-get install -y nlohmann-json3-dev)"
    if _ort_root() is None:
        return "ONNX Runtime headers/library absent (run engines/fetch_onnxruntime.sh or set ONNXRUNTIME_ROOT)"
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return "the Python reference needs onnx and onnxruntime"
    return None


def _run(cmd: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_engines_ctest(tmp_path: Path) -> None:
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(ENGINES), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
          f"-DONNXRUNTIME_ROOT={_ort_root()}", f"-DDYC_PYTHON={sys.executable}"], REPO, 300)
    # two jobs: the build machine's two cores are shared
    _run(["cmake", "--build", str(build), "-j2"], REPO, 1200)
    p = _run(["ctest", "--test-dir", str(build), "--output-on-failure"], REPO, 1200)
    assert "100% tests passed" in p.stdout, p.stdout
    # the end-to-end cases ran (not silently configured away)
    assert "dyc_e2e_ddim_cfg" in p.stdout and "dyc_e2e_bad_checksum" in p.stdout, p.stdout


@pytest.mark.skipif(_skip_reason() is not None or shutil.which("nvcc") is None,
                    reason=_skip_reason() or "the top-level project needs nvcc (CUDA toolkit) to configure")
def test_top_level_ctest_lists_the_engine_tests(tmp_path: Path) -> None:
    """`include(CTest)` at the top of the repository: `ctest --test-dir BUILD` finds engines/' tests (configure
    only: the build and the unit test run in the plugin step, tests/test_plugins_build.py)."""
    build = tmp_path / "build"
    _run(["cmake", "-S", str(REPO), "-B", str(build), "-DDYC_CUDA_ARCHS=80", f"-DONNXRUNTIME_ROOT={_ort_root()}",
          f"-DDYC_PYTHON={sys.executable}"], REPO, 300)
    listed = _run(["ctest", "--test-dir", str(build), "-N"], REPO, 60).stdout
    assert "dyc_unit" in listed and "dyc_e2e_ddim_cfg" in listed, listed
