"""`dyc --help` (and every command's --help) starts without torch or numpy: imports are lazy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "safetensors", "dyc.model", "dyc.bundle")

PROBE = """
import sys
import dyc.cli
sys.argv = ["dyc", *{args!r}]
try:
    rc = dyc.cli.main({args!r})
finally:
    heavy = [m for m in {heavy!r} if m in sys.modules]
    print("HEAVY", ",".join(heavy), file=sys.stderr)
sys.exit(rc)
"""


def _probe(*args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args), heavy=HEAVY)], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=120)
    heavy = p.stderr.rsplit("HEAVY", 1)[1].strip()
    return p.returncode, p.stdout, heavy


def test_help_imports_no_heavy_module():
    code, out, heavy = _probe("--help")
    assert code == 0 and "compile" in out and "run" in out and "bench" in out
    assert heavy == "", f"`dyc --help` imported {heavy}"


def test_every_command_help_imports_no_heavy_module():
    import dyc.cli

    for name in dyc.cli.cli.commands:
        code, out, heavy = _probe(name, "--help")
        assert code == 0 and "Usage: dyc" in out, (name, out)
        assert heavy == "", f"`dyc {name} --help` imported {heavy}"


def test_lazy_package_attributes_resolve():
    import dyc
    from dyc.checkpoint import load_checkpoint
    from dyc.runtime.pipeline import Pipeline

    assert dyc.load_checkpoint is load_checkpoint and dyc.Pipeline is Pipeline
    assert set(dyc.__all__) <= set(dir(dyc))
    for name in dyc.__all__:
        assert getattr(dyc, name) is not None
    import dyc.runtime
    import dyc.tensorrt

    for mod in (dyc.runtime, dyc.tensorrt):
        for name in mod.__all__:
            assert getattr(mod, name) is not None, (mod.__name__, name)


def test_build_engines_flavours_match_the_tensorrt_module():
    from dyc.tensorrt import cli, common

    assert cli.FLAVORS == common.FLAVORS
