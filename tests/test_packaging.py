"""The wheel: everything under the `dyc` package (the recipes as dyc.recipes, the default models), nothing
at the top level of site-packages but `dyc` itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):  # a copy: the build leaves build/ and *.egg-info behind
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "dyc", src / "dyc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "--disable-pip-version-check", "-w", str(out), str(src)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (whl,) = out.glob("dyc-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheel_files(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def test_wheel_installs_only_the_dyc_package(wheel_files):
    top = {f.split("/", 1)[0] for f in wheel_files}
    assert top == {"dyc", next(t for t in top if t.endswith(".dist-info"))}, top
    assert not any(f.startswith("recipes/") for f in wheel_files)


def test_wheel_carries_recipes_models_and_modules(wheel, wheel_files):
    files = set(wheel_files)
    for f in ("dyc/recipes/__init__.py", "dyc/recipes/finetune.py", "dyc/recipes/run_all.py",
              "dyc/models/dydit_digits.safetensors", "dyc/models/dit_digits.safetensors", "dyc/models/MODEL_CARD.md",
              "dyc/cli.py", "dyc/compiler/compile.py", "dyc/runtime/pipeline.py"):
        assert f in files, f
    entry = next(f for f in files if f.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as z:
        assert "dyc = dyc.cli:main" in z.read(entry).decode()


def test_recipes_run_as_modules_of_dyc():
    p = subprocess.run([sys.executable, "-m", "dyc.recipes.finetune", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 0 and "--lambda" in p.stdout, p.stderr
