"""No data loss, nothing silently wrong: bundle replacement, checked bytes, verify's reference, --num-heads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import random_model, tiny_config

import dyc.compiler.bundle as cb
from dyc import fileio
from dyc.backends.eager import EagerBackend
from dyc.bundle import MANIFEST, Bundle, manifest_checksum
from dyc.checkpoint import load_checkpoint, save_checkpoint
from dyc.cli import main
from dyc.compiler.compile import compile_checkpoint
from dyc.compiler.verify import FLOOR, verify_bundle
from dyc.config import ModelConfig
from dyc.errors import ChecksumMismatch, DycError
from dyc.model import DyDiT
from dyc.ort_session import bundle_session

FAST = {"calib": 1, "calib_steps": 2, "steps": 10}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """Official-layout checkpoints with random weights (conftest's: std 0.3, so badly conditioned)."""
    d = tmp_path_factory.mktemp("rel")
    ck = save_checkpoint(random_model(tiny_config(depth=3), seed=0, router_scale=3.0), d / "m.safetensors")
    fp32 = compile_checkpoint(ck, d / "m32.dyc", groups=2, **FAST).path
    fp16 = compile_checkpoint(ck, d / "m16.dyc", groups=1, dtype="fp16", **FAST).path
    return {"dir": d, "ck": ck, "fp32": fp32, "fp16": fp16}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(bundle: Path, name_part: str, fn) -> None:
    """Apply ``fn`` to one stored tensor of weights.bin and re-sign the manifest (a consistent bundle)."""
    b = Bundle.load(bundle)
    graph = onnx.load_model_from_string(b.graph_bytes(b.groups[0]))
    init = next(i for i in graph.graph.initializer if name_part in i.name)
    ext = {e.key: e.value for e in init.external_data}
    off, length = int(ext["offset"]), int(ext["length"])
    dtype = np.float16 if b.dtype == "fp16" else np.float32
    data = bytearray((bundle / "weights.bin").read_bytes())
    arr = np.frombuffer(bytes(data[off:off + length]), dtype=dtype).copy()
    data[off:off + length] = fn(arr).astype(dtype).tobytes()
    (bundle / "weights.bin").write_bytes(bytes(data))
    m = json.loads((bundle / MANIFEST).read_text())
    m["files"]["weights.bin"]["sha256"] = fileio.sha256_bytes(bytes(data))
    m["manifest_sha256"] = manifest_checksum(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


# ---- verify: float64 reference, dtype-argued tolerance, NaN --------------------------------------
def test_verify_random_weight_model_against_float64(made):
    """fp32 eager itself is well above 1e-5 off float64 here: that is no failure of the compiled graphs."""
    rep = verify_bundle(made["fp32"])
    assert rep.ok, rep.format()
    model_rel = max(g.eager_rel for g in rep.groups)  # the model's own fp32 error, pooled over the groups
    assert model_rel > 1e-5  # the model is that badly conditioned
    for g in rep.groups:
        assert g.tolerance == max(FLOOR["fp32"], 10 * model_rel) and g.max_rel <= g.tolerance
    assert "eager float64" in rep.format()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_verify_fails_on_nan_outputs(made, tmp_path, dtype):
    b = _copy(made[dtype], tmp_path / "nan.dyc")
    _rewrite_weights(b, "final_layer.linear.bias", lambda a: np.full_like(a, np.nan))
    rep = verify_bundle(b)
    assert not rep.ok and all(g.problem == "NaN or Inf in the output" for g in rep.groups)
    assert all(np.isinf(g.max_rel) for g in rep.groups)
    assert main(["verify", str(b)]) == 1


def test_verify_fails_on_wrong_weights(made, tmp_path):
    b = _copy(made["fp32"], tmp_path / "off.dyc")
    _rewrite_weights(b, "final_layer.linear.weight", lambda a: a * 1.05)
    rep = verify_bundle(b)
    assert not rep.ok and any(g.max_rel > g.tolerance for g in rep.groups), rep.format()


# ---- checked bytes: what was checked is what runs --------------------------------------------------
def test_sessions_are_built_from_the_checked_bytes(made, tmp_path):
    b = Bundle.load(_copy(made["fp32"], tmp_path / "c.dyc"))
    g = b.groups[0]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32),
             "t": np.array([g.t_lo] * 2), "y": np.array([1, 10]), **b.mask_inputs(g.t_lo, 2)}
    sess = bundle_session(b, g)
    before = sess.run(None, feeds)[0]
    (b.path / "weights.bin").write_bytes(b"\0" * (b.path / "weights.bin").stat().st_size)  # a concurrent rewrite
    np.testing.assert_array_equal(sess.run(None, feeds)[0], before)  # the session holds what was checked
    with pytest.raises(DycError, match="weights.bin was altered since the compile"):
        bundle_session(b, g)  # the loaded bundle's checks apply to every later read


def test_sessions_without_in_memory_external_files(made, monkeypatch):
    """Older onnxruntime: the initializers go in as OrtValues over the same checked bytes."""
    import onnxruntime as ort

    b = Bundle.load(made["fp32"])
    g = b.groups[-1]
    feeds = {"x": np.ones((1, 4, 8, 8), np.float32), "t": np.array([g.t_hi]), "y": np.array([3]),
             **b.mask_inputs(g.t_hi, 1)}
    want = bundle_session(b, g).run(None, feeds)[0]
    monkeypatch.delattr(ort.SessionOptions, "add_external_initializers_from_files_in_memory")
    assert not hasattr(ort.SessionOptions(), "add_external_initializers_from_files_in_memory")
    np.testing.assert_array_equal(bundle_session(b, g).run(None, feeds)[0], want)


def test_eager_backend_checks_the_source_sha256(made, tmp_path):
    b = Bundle.load(made["fp32"])
    EagerBackend(b)  # the recorded source, unchanged: fine
    other = save_checkpoint(random_model(tiny_config(depth=3), seed=5, router_scale=3.0), tmp_path / "o.safetensors")
    with pytest.raises(DycError, match="is not the checkpoint m32.dyc was compiled from"):
        EagerBackend(b, checkpoint=other)
    with pytest.raises(ChecksumMismatch):
        load_checkpoint(other, expect_sha256=b.manifest["source"]["sha256"])
    assert load_checkpoint(made["ck"]).sha256 == b.manifest["source"]["sha256"]


# ---- compile -o: never delete anything but a bundle; always a complete bundle in place -------------
def test_recompile_keeps_engines_dir_policy_and_refuses_foreign_files(made, tmp_path):
    out = _copy(made["fp32"], tmp_path / "r.dyc")
    (out / "engines").mkdir()
    (out / "engines" / "group0.plan").write_bytes(b"plan")
    compile_checkpoint(made["ck"], out, groups=1, **FAST)  # a bundle (engines included) is replaced
    assert len(Bundle.load(out).groups) == 1 and not (out / "engines").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.dyc"]  # nothing left beside it
    (out / "engines").mkdir()
    (out / "engines" / "my-notes.txt").write_text("keep")
    with pytest.raises(DycError, match="engines/my-notes.txt"):
        compile_checkpoint(made["ck"], out, groups=2, **FAST)
    assert (out / "engines" / "my-notes.txt").read_text() == "keep"


class _Killed(BaseException):
    """A kill -9 at this point: nothing after it runs (not even except blocks of the code under test)."""


@pytest.mark.parametrize("atomic", [True, False], ids=["rename-exchange", "two-renames"])
def test_replacing_a_bundle_is_never_without_a_bundle(made, tmp_path, monkeypatch, atomic):
    """Kill the swap before each of its steps: a complete bundle (old or new) is always loadable."""
    if not atomic:  # a system or file system without RENAME_EXCHANGE / RENAME_NOREPLACE
        monkeypatch.setattr(cb, "exchange_paths", lambda a, b: False)
        monkeypatch.setattr(cb, "rename_noreplace", lambda a, b: False)
    elif not fileio.exchange_paths(_copy(made["fp32"], tmp_path / "a"), _copy(made["fp16"], tmp_path / "b")):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    old_id = Bundle.load(made["fp32"]).manifest["manifest_sha256"]
    new_id = Bundle.load(made["fp16"]).manifest["manifest_sha256"]
    steps = ["exchange_paths", "rename_noreplace", "os.rename", "shutil.rmtree"]
    kill_before = 0
    while True:
        d = tmp_path / f"k{kill_before}"
        d.mkdir()
        out, tmp = _copy(made["fp32"], d / "x.dyc"), _copy(made["fp16"], d / f".x.dyc.partial-{2**22 + 1}-00ff")
        calls, seen = [0], []

        def step(fn, out=out, calls=calls, seen=seen, kill_before=kill_before):
            def wrapped(*a, **k):
                # before every step: a complete bundle, except in the two-renames path's one window
                seen.append(Bundle.load(out).manifest["manifest_sha256"] if out.exists() else None)
                if calls[0] == kill_before:
                    raise _Killed
                calls[0] += 1
                return fn(*a, **k)
            return wrapped

        with monkeypatch.context() as mp:
            for name in steps:
                owner, attr = (cb.os, "rename") if name == "os.rename" else \
                    (cb.shutil, "rmtree") if name == "shutil.rmtree" else (cb, name)
                mp.setattr(owner, attr, step(getattr(owner, attr)))
            try:
                cb._swap_in(tmp, out)
                finished = True
            except _Killed:
                finished = False
        assert set(seen) <= ({old_id, new_id} if atomic else {old_id, new_id, None}), seen
        if not out.exists():  # only the two-renames path has this window: the next compile restores it
            assert not atomic
            with pytest.raises(DycError, match="rename it back"):
                Bundle.load(out)
            with monkeypatch.context() as mp:
                mp.setattr(cb, "_pid_alive", lambda pid: False)  # the killed compile's process is gone
                cb.clean_stale(out)
            assert Bundle.load(out).manifest["manifest_sha256"] == old_id
        assert Bundle.load(out).manifest["manifest_sha256"] in {old_id, new_id}
        if finished:
            assert Bundle.load(out).manifest["manifest_sha256"] == new_id
            assert kill_before >= 2
            break
        kill_before += 1


def test_swap_never_clobbers_a_bundle_that_appeared_meanwhile(made, tmp_path):
    out = _copy(made["fp32"], tmp_path / "x.dyc")
    tmp = _copy(made["fp16"], tmp_path / ".x.dyc.partial-1-00")
    with pytest.raises(FileExistsError):
        fileio.rename_noreplace(tmp, out)
    assert Bundle.load(out).dtype == "fp32"


# ---- atomic outputs -----------------------------------------------------------------------------
def test_atomic_output_never_replaces_a_non_regular_file(tmp_path):
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    with pytest.raises(DycError, match="FIFO"):
        fileio.atomic_write_bytes(fifo, b"x")
    assert fifo.is_fifo()
    real = tmp_path / "real.txt"
    real.write_text("old")
    (tmp_path / "link.txt").symlink_to(real)
    fileio.atomic_write_text(tmp_path / "link.txt", "new")  # written through the link, the link kept
    assert (tmp_path / "link.txt").is_symlink() and real.read_text() == "new"
    with pytest.raises(ValueError), fileio.atomic_output(real) as f:
        f.write(b"half")
        raise ValueError
    assert real.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "p", "real.txt"]


def test_one_sha256_helper():
    import dyc.bundle
    import dyc.tensorrt.common

    assert dyc.bundle.file_sha256 is fileio.sha256_file is dyc.tensorrt.common.sha256_file
    root = Path(dyc.bundle.__file__).parent
    users = {p.relative_to(root).as_posix() for p in root.rglob("*.py") if "hashlib.sha256" in p.read_text()}
    assert users == {"fileio.py", "compiler/export.py"}  # export hashes weights.bin while writing it


# ---- --num-heads --------------------------------------------------------------------------------
def _plain(width: int, heads: int) -> DyDiT:
    torch.manual_seed(0)
    return DyDiT(ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=width, depth=2,
                             num_heads=heads, num_classes=10, dynamic=False)).eval()


def test_num_heads_for_a_plain_dit_of_custom_width(tmp_path, capsys):
    model = _plain(96, 3)
    ck = save_checkpoint(model.state_dict(), tmp_path / "p.safetensors")  # no dyc.config metadata
    with pytest.raises(DycError, match="--num-heads"):
        load_checkpoint(ck)
    loaded = load_checkpoint(ck, num_heads=3)
    assert loaded.config == model.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t, y), model(x, t, y), rtol=0, atol=0)
    with pytest.raises(DycError, match="does not divide the width 96"):
        load_checkpoint(ck, num_heads=5)
    with pytest.raises(DycError, match="contradicts the checkpoint's dyc.config"):
        load_checkpoint(save_checkpoint(model, tmp_path / "m.safetensors"), num_heads=6)
    # the commands: compile with --num-heads, then every later load takes the heads from the bundle
    out = tmp_path / "p.dyc"
    assert main(["compile", str(ck), "--num-heads", "3", "-o", str(out), "--calib", "1", "--calib-steps", "1",
                 "--steps", "5"]) == 0
    assert Bundle.load(out).config.num_heads == 3
    assert main(["verify", str(out)]) == 0
    assert main(["run", str(out), "--backend", "eager", "--steps", "2", "--classes", "1", "-o",
                 str(tmp_path / "s")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(ck), "--num-heads", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["num_heads"] == 3
