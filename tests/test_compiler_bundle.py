"""Bundle format: loading, refusal of tampered/incomplete bundles, atomic writes, CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from dyc.bundle import MANIFEST, Bundle, manifest_checksum
from dyc.checkpoint import save_checkpoint
from dyc.cli import main
from dyc.compiler.compile import compile_checkpoint
from dyc.errors import DycError
from dyc.model import DyDiT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    m = DyDiT(tiny_config(depth=2)).eval()
    with torch.no_grad():
        for b in m.blocks:
            b.attn_rate.router.weight.mul_(20.0)
            b.mlp_rate.router.weight.mul_(20.0)
    ckpt = save_checkpoint(m, d / "m.safetensors")
    r = compile_checkpoint(ckpt, d / "m.dyc", groups=3, calib=1, calib_steps=3)
    return m, ckpt, r.path


@pytest.fixture
def copy(compiled, tmp_path):
    """A private copy of the compiled bundle to damage."""
    dst = tmp_path / "c.dyc"
    shutil.copytree(compiled[2], dst)
    return dst


def _edit_manifest(path: Path, fn, fix_checksum: bool) -> None:
    m = json.loads((path / MANIFEST).read_text())
    fn(m)
    if fix_checksum:
        m["manifest_sha256"] = manifest_checksum(m)
    (path / MANIFEST).write_text(json.dumps(m))


def test_load_and_queries(compiled):
    m, _, path = compiled
    b = Bundle.load(path)
    assert b.config == m.config and b.dtype == "fp32" and len(b.groups) <= 3
    head, channel = m.tdw_masks(torch.arange(1000))
    for t in (0, 250, 999):
        h, c = b.masks_for_t(t)
        assert (h == (head[t].numpy() > 0.5)).all() and (c == (channel[t].numpy() > 0.5)).all()
        g = b.group_for_t(t)
        feeds = b.mask_inputs(t, batch=2)
        assert set(feeds) == {n for n, need in (("head_mask", g.needs_head_mask),
                                                ("channel_mask", g.needs_channel_mask)) if need}
        for arr in feeds.values():
            assert arr.shape[0] == 2 and arr.dtype == np.float32
    assert b.onnx_path(b.groups[0], "trt").name == "group0.trt.onnx"
    with pytest.raises(DycError, match="outside every group"):
        b.group_for_t(1000)
    with pytest.raises(DycError, match="outside every group"):
        b.group_for_t(-1)
    with pytest.raises(DycError, match="variant"):
        b.onnx_path(0, "tensorrt")
    with pytest.raises(DycError, match="no group 7"):
        b.onnx_path(7)


def test_manifest_records(compiled):
    m = json.loads((compiled[2] / MANIFEST).read_text())
    for key in ("schema_version", "model", "dtype", "lambda", "threshold_offset", "offset_forced", "schedule",
                "groups", "masks", "files", "tools", "calibration", "source"):
        assert key in m
    assert len(m["masks"]["arch_of_t"]) == 1000
    assert m["schedule"]["sampler"] == "ddim" and m["schedule"]["steps"] == 50
    assert all(f["sha256"] and f["bytes"] > 0 for f in m["files"].values())


def test_altered_file(copy):
    w = copy / "weights.bin"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(DycError, match="weights.bin was altered"):
        Bundle.load(copy)
    Bundle.load(copy, verify_checksums=False)  # the fast path checks sizes only


def test_truncated_and_missing_files(copy):
    with open(copy / "group0.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(DycError, match="group0.onnx has .* bytes"):
        Bundle.load(copy)
    (copy / "group1.trt.onnx").unlink(missing_ok=True)
    (copy / "group0.onnx").unlink()
    with pytest.raises(DycError, match="is missing"):
        Bundle.load(copy)


def test_unknown_schema(copy):
    _edit_manifest(copy, lambda m: m.update(schema_version=99), fix_checksum=True)
    with pytest.raises(DycError, match="unknown schema version 99"):
        Bundle.load(copy)


def test_hand_edited_manifest(copy):
    _edit_manifest(copy, lambda m: m.update(threshold_offset=0.5), fix_checksum=False)
    with pytest.raises(DycError, match="modified after compile"):
        Bundle.load(copy)


def test_hand_edited_manifest_with_recomputed_checksum_is_inconsistent(copy):
    def shrink(m):
        m["groups"][0]["t_hi"] -= 1

    _edit_manifest(copy, shrink, fix_checksum=True)
    with pytest.raises(DycError, match="inconsistent manifest"):
        Bundle.load(copy)


def test_inconsistent_masks(copy):
    def drop_head(m):
        m["groups"][0]["heads"][0] = m["groups"][0]["heads"][0][:1]

    _edit_manifest(copy, drop_head, fix_checksum=True)
    with pytest.raises(DycError, match="not the union"):
        Bundle.load(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(DycError, match="no such bundle"):
        Bundle.load(tmp_path / "nope.dyc")
    (tmp_path / "empty.dyc").mkdir()
    with pytest.raises(DycError, match="not a dyc bundle"):
        Bundle.load(tmp_path / "empty.dyc")
    (tmp_path / "bad.dyc").mkdir()
    (tmp_path / "bad.dyc" / MANIFEST).write_text("{")
    with pytest.raises(DycError, match="not valid JSON"):
        Bundle.load(tmp_path / "bad.dyc")


_KILL_BEFORE_RENAME = """
import os, signal, sys
import dyc.compiler.bundle as B
from dyc.compiler.compile import compile_checkpoint
orig = B._write_manifest
def write_then_die(tmp, manifest):
    orig(tmp, manifest)  # everything is written, only the rename into place is left
    os.kill(os.getpid(), signal.SIGKILL)
B._write_manifest = write_then_die
compile_checkpoint(sys.argv[1], sys.argv[2], groups=2, calib=1, calib_steps=2)
"""


def test_interrupted_compile_leaves_nothing_loadable(compiled, tmp_path):
    _, ckpt, _ = compiled
    out = tmp_path / "k.dyc"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _KILL_BEFORE_RENAME, str(ckpt), str(out)], env=env, cwd=ROOT)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(DycError):
        Bundle.load(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".k.dyc.partial-")]
    assert leftovers  # the killed compile's temp dir ...
    compile_checkpoint(ckpt, out, groups=2, calib=1, calib_steps=2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".k.dyc.")]  # ... is cleaned by the next
    Bundle.load(out)


def test_recompile_replaces_bundle(compiled, tmp_path):
    _, ckpt, _ = compiled
    out = tmp_path / "r.dyc"
    compile_checkpoint(ckpt, out, groups=1, calib=1, calib_steps=2)
    compile_checkpoint(ckpt, out, groups=2, calib=1, calib_steps=2)
    assert len(Bundle.load(out).groups) <= 2
    assert [p.name for p in tmp_path.iterdir() if p.name != "r.dyc"] == []


@pytest.mark.parametrize("args, msg", [
    (["--groups", "0"], "--groups must be at least 1"),
    (["--lambda", "1.5"], "λ target must be in (0, 1]"),
    (["--lambda", "0"], "λ target must be in (0, 1]"),
    (["--sampler", "euler"], "unknown sampler 'euler'"),
    (["--calib", "0"], "--calib must be at least 1"),
    (["--calib-steps", "0"], "--calib-steps must be at least 1"),
    (["--steps", "0"], "steps must be positive"),
])
def test_cli_compile_errors(compiled, tmp_path, capsys, args, msg):
    _, ckpt, _ = compiled
    rc = main(["compile", str(ckpt), "-o", str(tmp_path / "e.dyc"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err  # bad option values: usage (dyc.errors)
    assert not (tmp_path / "e.dyc").exists()


def test_cli_compile_and_verify(compiled, tmp_path, capsys):
    _, ckpt, _ = compiled
    out = tmp_path / "cli.dyc"
    assert main(["compile", str(ckpt), "-o", str(out), "--groups", "2", "--calib", "1", "--calib-steps", "2"]) == 0
    cap = capsys.readouterr()
    assert "t-range" in cap.out and "λ" in cap.out and "calibration" in cap.err
    assert main(["verify", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and len(rep["groups"]) <= 2
    _edit_manifest(out, lambda m: m.update(dtype="fp16"), fix_checksum=False)
    assert main(["verify", str(out)]) == 1
    assert "modified after compile" in capsys.readouterr().err
