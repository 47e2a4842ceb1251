"""Every user-caused fault through the real CLI: one error line on stderr, the right exit code, no traceback.

Exit codes (dyc.errors): 1 bad input or environment, 2 usage, 3 internal error. Each case builds its
bad input in a temp directory, runs ``dyc.cli.main``, and checks the code, that stderr is exactly one
line naming the problem, and that nothing says "internal error". Faults a root-run CI cannot cause
for real (disk full, read-only file system) are raised by the OS-level call they would come from.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import random_model, tiny_config

from dyc.bundle import MANIFEST, manifest_checksum
from dyc.checkpoint import save_checkpoint
from dyc.cli import main
from dyc.compiler.compile import compile_checkpoint
from dyc.config import ModelConfig
from dyc.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE
from dyc.model import DyDiT


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("faults")
    model = random_model(tiny_config(depth=2), seed=0, router_scale=3.0)
    ck = save_checkpoint(model, d / "m.safetensors")
    other = save_checkpoint(random_model(tiny_config(depth=2), seed=1, router_scale=3.0), d / "other.safetensors")
    bundle = compile_checkpoint(ck, d / "m.dyc", groups=2, calib=1, calib_steps=2).path
    torch.manual_seed(0)
    plain = DyDiT(ModelConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=3,
                              num_classes=10, dynamic=False))
    custom = save_checkpoint(plain.state_dict(), d / "custom.safetensors")  # no dyc.config metadata
    return {"dir": d, "ck": ck, "other": other, "bundle": bundle, "custom": custom, "sd": model.state_dict()}


def _safetensors_with(env, tmp: Path, meta, name: str = "meta.safetensors") -> Path:
    """The checkpoint's bytes with another ``__metadata__`` in its header."""
    data = env["ck"].read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p = tmp / name
    p.write_bytes(struct.pack("<Q", len(h)) + h + data[8 + n:])
    return p


def _fifo(tmp: Path, name: str = "fifo") -> Path:
    p = tmp / name
    os.mkfifo(p)
    return p


def _bundle_copy(env, tmp: Path) -> Path:
    dst = tmp / "b.dyc"
    shutil.copytree(env["bundle"], dst)
    return dst


def _edited(env, tmp: Path, fn: Callable[[dict], None], fix: bool = True) -> Path:
    b = _bundle_copy(env, tmp)
    m = json.loads((b / MANIFEST).read_text())
    fn(m)
    if fix:
        m["manifest_sha256"] = manifest_checksum(m)
    (b / MANIFEST).write_text(json.dumps(m))
    return b


def _truncated(path, size: int) -> Path:
    path = Path(path)
    path.write_bytes(path.read_bytes()[:size])
    return path


def _torch_file(tmp: Path, obj, name: str = "x.pt") -> Path:
    p = tmp / name
    torch.save(obj, p)
    return p


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _replace_file(b: Path, name: str, how: str) -> Path:
    p = b / name
    if how == "fifo":
        p.unlink()
        os.mkfifo(p)
    elif how == "truncate":
        p.write_bytes(p.read_bytes()[:-7])
    elif how == "flip":
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    return b


def _os_error(monkeypatch, target, name: str, err: int, when: Callable[..., bool] = lambda *a, **k: True):
    """Make ``target.name`` raise the OSError ``err`` (what a full or read-only disk would raise)."""
    orig = getattr(target, name)

    def failing(*a, **k):
        if when(*a, **k):
            raise OSError(err, os.strerror(err), str(a[0]) if a else None)
        return orig(*a, **k)

    monkeypatch.setattr(target, name, failing)


@dataclass
class Case:
    id: str
    args: Callable  # (env, tmp, monkeypatch) -> argv
    needle: str
    code: int = EXIT_INPUT


def _run_args(bundle_or_ck, tmp, *extra):
    return ["run", bundle_or_ck, "--backend", "eager", "--steps", "2", "--classes", "1", "-o", tmp / "out", *extra]


CASES = [
    # ---- checkpoint files -----------------------------------------------------------------------
    Case("ckpt-missing", lambda e, t, m: ["inspect", t / "nope.safetensors"], "no such file"),
    Case("ckpt-directory", lambda e, t, m: ["inspect", t], "is a directory"),
    Case("ckpt-fifo", lambda e, t, m: ["inspect", _fifo(t)], "FIFO"),
    Case("ckpt-device", lambda e, t, m: ["flops", "/dev/null"], "is a device"),
    Case("ckpt-empty", lambda e, t, m: ["inspect", (t / "e.pt").write_bytes(b"") and t / "e.pt" or t / "e.pt"],
         "not a checkpoint"),
    Case("ckpt-text", lambda e, t, m: ["inspect", (t / "x.pt").write_text("weights") and t / "x.pt"],
         "not a checkpoint"),
    Case("ckpt-truncated-safetensors", lambda e, t, m: ["inspect", _truncated(shutil.copy(e["ck"], t), 3000)],
         "corrupt or truncated"),
    Case("ckpt-truncated-pt", lambda e, t, m: ["inspect", _truncated(_torch_file(t, e["sd"]), 5000)],
         "corrupt or truncated"),
    Case("ckpt-pickle-with-code", lambda e, t, m: ["inspect", (t / "x.pt").write_bytes(pickle.dumps({"ema": _Evil()}))
                                                   and t / "x.pt"], "refused"),
    Case("ckpt-a-list", lambda e, t, m: ["inspect", _torch_file(t, [1, 2])], "holds a list"),
    Case("ckpt-non-tensor", lambda e, t, m: ["inspect", _torch_file(t, {"ema": {"w": 1}})], "not a tensor"),
    Case("ckpt-missing-key", lambda e, t, m: ["inspect", _torch_file(
        t, {k: v for k, v in e["sd"].items() if k != "final_layer.linear.bias"})], "missing keys"),
    Case("ckpt-bad-shape", lambda e, t, m: ["inspect", _torch_file(
        t, {**e["sd"], "blocks.0.mlp.fc1.weight": torch.zeros(7, 64)})], "shapes fit no DiT"),
    Case("ckpt-header-length", lambda e, t, m: ["inspect", (t / "x.safetensors").write_bytes(
        struct.pack("<Q", 1 << 40) + b"{}") and t / "x.safetensors"], "corrupt or truncated"),
    Case("meta-not-json", lambda e, t, m: ["inspect", _safetensors_with(e, t, {"dyc.config": "{"})], "not valid JSON"),
    Case("meta-a-list", lambda e, t, m: ["inspect", _safetensors_with(e, t, {"dyc.config": "[1]"})],
         "must be a JSON object"),
    Case("meta-heads-type", lambda e, t, m: ["inspect", _safetensors_with(
        e, t, {"dyc.config": json.dumps({"num_heads": "four"})})], "num_heads must be a positive integer"),
    Case("meta-vae-scale", lambda e, t, m: ["inspect", _safetensors_with(
        e, t, {"dyc.config": json.dumps({"vae_scale": -3})})], "vae_scale must be a positive integer"),
    Case("meta-not-strings", lambda e, t, m: ["inspect", _safetensors_with(e, t, {"a": 1})],
         "bad safetensors metadata"),
    Case("plain-custom-width", lambda e, t, m: ["inspect", e["custom"]], "--num-heads"),
    Case("num-heads-not-dividing", lambda e, t, m: ["inspect", e["custom"], "--num-heads", "5"],
         "does not divide the width 96"),
    Case("num-heads-zero", lambda e, t, m: ["flops", e["custom"], "--num-heads", "0"], "positive integer", EXIT_USAGE),
    Case("num-heads-vs-routers", lambda e, t, m: ["inspect", e["ck"], "--num-heads", "8"], "contradicts"),
    Case("compile-fifo", lambda e, t, m: ["compile", _fifo(t), "-o", t / "o.dyc"], "FIFO"),
    Case("run-fifo", lambda e, t, m: _run_args(_fifo(t), t), "FIFO"),
    # ---- bundles --------------------------------------------------------------------------------
    Case("bundle-missing", lambda e, t, m: ["verify", t / "nope.dyc"], "no such bundle directory"),
    Case("bundle-a-file", lambda e, t, m: ["verify", e["ck"]], "no such bundle directory"),
    Case("bundle-empty-dir", lambda e, t, m: ["verify", (t / "e.dyc").mkdir() or t / "e.dyc"], "not a dyc bundle"),
    Case("manifest-fifo", lambda e, t, m: ["verify", _replace_file(_bundle_copy(e, t), MANIFEST, "fifo")], "FIFO"),
    Case("manifest-not-json", lambda e, t, m: ["verify", (_bundle_copy(e, t) / MANIFEST).write_text("{")
                                               and t / "b.dyc"], "not valid JSON"),
    Case("manifest-hand-edited", lambda e, t, m: ["verify", _edited(e, t, lambda d: d.update(dtype="fp16"), False)],
         "modified after compile"),
    Case("manifest-schema", lambda e, t, m: ["verify", _edited(e, t, lambda d: d.update(schema_version=9))],
         "unknown schema version 9"),
    Case("manifest-groups-type", lambda e, t, m: ["verify", _edited(e, t, lambda d: d.update(groups=5))],
         "malformed manifest"),
    Case("manifest-model-type", lambda e, t, m: ["verify", _edited(e, t, lambda d: d.update(model=[]))],
         "malformed manifest"),
    Case("manifest-missing-key", lambda e, t, m: ["verify", _edited(e, t, lambda d: d.pop("masks"))],
         "missing key 'masks'"),
    Case("manifest-files-type", lambda e, t, m: ["verify", _edited(e, t, lambda d: d.update(files=[]))],
         "files must be an object"),
    Case("manifest-bytes-type", lambda e, t, m: ["verify", _edited(
        e, t, lambda d: d["files"]["weights.bin"].update(bytes="many"))], "needs an integer 'bytes'"),
    Case("manifest-zero-heads", lambda e, t, m: ["verify", _edited(
        e, t, lambda d: d["model"]["config"].update(num_heads=0))], "num_heads must be a positive integer"),
    Case("manifest-mask-bits", lambda e, t, m: ["verify", _edited(
        e, t, lambda d: d["masks"]["architectures"][0].update(head=["x", "y"]))], "malformed manifest"),
    Case("manifest-file-outside", lambda e, t, m: ["verify", _edited(
        e, t, lambda d: d["files"].update({"../m.safetensors": {"bytes": 1, "sha256": "0"}}))], "not a plain name"),
    Case("weights-fifo", lambda e, t, m: ["verify", _replace_file(_bundle_copy(e, t), "weights.bin", "fifo")],
         "not a regular file"),
    Case("weights-truncated", lambda e, t, m: ["verify", _replace_file(_bundle_copy(e, t), "weights.bin",
                                                                       "truncate")], "bytes, expected"),
    Case("graph-corrupt-but-signed", lambda e, t, m: ["verify", _resigned(_replace_file(
        _bundle_copy(e, t), "group0.onnx", "truncate"), "group0.onnx")], "ONNX Runtime cannot load it"),
    Case("graph-altered", lambda e, t, m: ["verify", _replace_file(_bundle_copy(e, t), "group0.onnx", "flip")],
         "was altered"),
    Case("verify-checkpoint-fifo", lambda e, t, m: ["verify", e["bundle"], "--checkpoint", _fifo(t)], "FIFO"),
    Case("verify-other-checkpoint", lambda e, t, m: ["verify", e["bundle"], "--checkpoint", e["other"]],
         "is not the checkpoint"),
    Case("verify-tolerance", lambda e, t, m: ["verify", e["bundle"], "--tolerance", "-1"], "--tolerance must be",
         EXIT_USAGE),
    Case("verify-batch", lambda e, t, m: ["verify", e["bundle"], "--batch", "0"], "--batch must be", EXIT_USAGE),
    Case("eager-other-checkpoint", lambda e, t, m: _run_args(e["bundle"], t, "--checkpoint", e["other"]),
         "is not the checkpoint"),
    Case("run-num-heads-vs-bundle", lambda e, t, m: _run_args(e["bundle"], t, "--num-heads", "2"), "contradicts"),
    # ---- outputs --------------------------------------------------------------------------------
    Case("compile-into-foreign-dir", lambda e, t, m: ["compile", e["ck"], "-o", _dir_with(t / "o.dyc", "notes.txt")],
         "holds notes.txt"),
    Case("compile-into-plain-dir", lambda e, t, m: ["compile", e["ck"], "-o", (t / "o.dyc").mkdir() or t / "o.dyc"],
         "not a dyc bundle"),
    Case("compile-over-own-input", lambda e, t, m: _over_own_input(e, t), "its own input"),
    Case("compile-over-file", lambda e, t, m: ["compile", e["ck"], "-o", (t / "o.dyc").write_text("x") and t / "o.dyc"],
         "not a bundle directory"),
    Case("compile-name", lambda e, t, m: ["compile", e["ck"], "-o", t / "o.bundle"], "must end in .dyc", EXIT_USAGE),
    Case("compile-symlink", lambda e, t, m: ["compile", e["ck"], "-o", _symlink(t)], "symbolic link"),
    Case("compile-under-file", lambda e, t, m: ["compile", e["ck"], "-o", (t / "f").write_text("x") and t / "f/o.dyc"],
         "is not a directory"),
    Case("compile-read-only", lambda e, t, m: _compile_with_os_error(e, t, m, errno.EROFS, "mkdir"),
         "read-only file system"),
    Case("compile-disk-full", lambda e, t, m: _compile_with_os_error(e, t, m, errno.ENOSPC, "write"),
         "no space left"),
    Case("run-output-is-file", lambda e, t, m: _run_args(e["bundle"], (t / "f").write_text("x") and t / "f")
         [:-1] + [t / "f"], "not a directory"),
    Case("run-latents-fifo", lambda e, t, m: _run_args(e["bundle"], t, "--save-latents", _fifo(t, "l.npy")), "FIFO"),
    Case("run-disk-full", lambda e, t, m: _run_disk_full(e, t, m), "no space left"),
    Case("run-noise-fifo", lambda e, t, m: _run_args(e["bundle"], t, "--noise", _fifo(t, "n.npy")), "FIFO"),
    Case("inspect-masks-dir", lambda e, t, m: ["inspect", e["ck"], "--masks", (t / "m.npz").mkdir() or t / "m.npz"],
         "is a directory"),
    Case("inspect-masks-no-dir", lambda e, t, m: ["inspect", e["ck"], "--masks", t / "no" / "m.npz"],
         "no such directory"),
    Case("inspect-plot-fifo", lambda e, t, m: ["inspect", e["ck"], "--plot", _fifo(t, "p.png")], "FIFO"),
    # ---- usage (exit 2) -------------------------------------------------------------------------
    Case("usage-choice", lambda e, t, m: ["compile", e["ck"], "--dtype", "fp8"], "'fp8' is not one of", EXIT_USAGE),
    Case("usage-option", lambda e, t, m: ["verify", e["bundle"], "--fast"], "No such option", EXIT_USAGE),
    Case("usage-argument", lambda e, t, m: ["compile"], "Missing argument", EXIT_USAGE),
    Case("usage-int", lambda e, t, m: ["run", "--steps", "ten"], "'ten' is not a valid integer", EXIT_USAGE),
    Case("usage-command", lambda e, t, m: ["compil"], "No such command", EXIT_USAGE),
    Case("usage-seed", lambda e, t, m: _run_args(e["bundle"], t, "--seed", str(2**70)), "--seed", EXIT_USAGE),
    Case("usage-device", lambda e, t, m: _run_args(e["bundle"], t, "--device", "gpu0"), "unknown device 'gpu0'",
         EXIT_USAGE),
    Case("usage-repeats", lambda e, t, m: ["bench", e["ck"], "--repeats", "0"], "--repeats", EXIT_USAGE),
    Case("usage-synth-seed", lambda e, t, m: ["synth", "--seed", "-1", "-o", t / "s.safetensors"], "--seed",
         EXIT_USAGE),
    # ---- missing optional packages --------------------------------------------------------------
    Case("no-onnx", lambda e, t, m: _without(m, "onnx", ["compile", e["ck"], "-o", t / "o.dyc"]),
         "pip install 'dyc[onnx]'"),
    Case("no-matplotlib", lambda e, t, m: _without(m, "matplotlib", ["inspect", e["ck"], "--plot", t / "p.png"]),
         "pip install 'dyc[plot]'"),
    Case("no-onnxruntime", lambda e, t, m: _without(m, "onnxruntime", ["verify", e["bundle"]]),
         "pip install 'dyc[onnx]'"),
]


def _resigned(b: Path, name: str) -> Path:
    """Record a damaged file's new size and sha256 in the manifest, and re-sign it: every check passes."""
    from dyc.fileio import sha256_file

    m = json.loads((b / MANIFEST).read_text())
    m["files"][name] = {"bytes": (b / name).stat().st_size, "sha256": sha256_file(b / name)}
    m["manifest_sha256"] = manifest_checksum(m)
    (b / MANIFEST).write_text(json.dumps(m))
    return b


def _dir_with(path: Path, name: str) -> Path:
    path.mkdir()
    (path / name).write_text("mine")
    (path / MANIFEST).write_text("{}")
    return path


def _over_own_input(env, tmp: Path) -> list:
    out = tmp / "o.dyc"
    shutil.copytree(env["bundle"], out)
    shutil.copy(env["ck"], out / "m.safetensors")  # `dyc compile o.dyc/m.safetensors -o o.dyc`
    return ["compile", out / "m.safetensors", "-o", out]


def _symlink(tmp: Path) -> Path:
    (tmp / "real.dyc").mkdir()
    (tmp / "o.dyc").symlink_to(tmp / "real.dyc")
    return tmp / "o.dyc"


def _compile_with_os_error(env, tmp: Path, mp, err: int, where: str) -> list:
    import dyc.compiler.export as export

    if where == "mkdir":  # the bundle's temp directory cannot be created
        _os_error(mp, os, "mkdir", err, when=lambda p, *a, **k: ".partial-" in str(p))
    else:  # the weights file runs out of space
        _os_error(mp, export.WeightStore, "_write", err)
    return ["compile", env["ck"], "-o", tmp / "o.dyc", "--groups", "1", "--calib", "1", "--calib-steps", "1"]


def _run_disk_full(env, tmp: Path, mp) -> list:
    import numpy as np

    _os_error(mp, np, "save", errno.ENOSPC)  # writing latents.npy (the tiny model is a latent model)
    return _run_args(env["ck"], tmp)


def _without(mp, module: str, argv: list) -> list:
    """As if ``module`` were not installed: its import fails, and dyc modules import it afresh."""
    mp.setitem(sys.modules, module, None)
    for name in [n for n in sys.modules if n.startswith(("dyc.compiler", "dyc.ort_session"))]:
        mp.delitem(sys.modules, name)
    return argv


@pytest.fixture
def alarm():
    """A regression that blocks (a FIFO opened for reading) fails the test instead of hanging CI."""
    def fire(*_):
        raise TimeoutError("blocked: a FIFO or device was opened without checking it is a regular file")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_fault_is_one_clear_line(case, env, tmp_path, monkeypatch, capsys, alarm):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    argv = [str(a) for a in case.args(env, tmp_path, monkeypatch)]
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == case.code, err
    # progress lines of the work done before the fault may come first; the error is one line, the last
    assert [line for line in lines if line.startswith("dyc")] == lines[-1:], err
    assert lines[-1].startswith("dyc: error: "), err
    assert "internal error" not in err and "Traceback" not in err
    assert case.needle in lines[-1], lines[-1]
    assert "pickled code ran" not in out


def test_faults_change_nothing(env, tmp_path, monkeypatch, capsys):
    """A refused or failed compile or run leaves every existing file as it was, and no temp files."""
    foreign = _dir_with(tmp_path / "o.dyc", "notes.txt")
    assert main(["compile", str(env["ck"]), "-o", str(foreign)]) == EXIT_INPUT
    assert (foreign / "notes.txt").read_text() == "mine"
    out = tmp_path / "b.dyc"
    shutil.copytree(env["bundle"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _compile_with_os_error({**env, "dir": tmp_path}, tmp_path, monkeypatch, errno.ENOSPC, "write")
    assert main(["compile", str(env["ck"]), "-o", str(out), "--groups", "1", "--calib", "1",
                 "--calib-steps", "1"]) == EXIT_INPUT
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous bundle, untouched
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("previous")
    _run_disk_full(env, tmp_path, monkeypatch)
    assert main(_run_args(str(env["ck"]), tmp_path)[:-1] + [str(tmp_path / "run")]) == EXIT_INPUT
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.json"]  # no half PNG, no temp file
    assert (tmp_path / "run" / "run.json").read_text() == "previous"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    capsys.readouterr()


def test_internal_error_is_exit_3_with_one_line(env, monkeypatch, capsys):
    import dyc.inspection

    def bug(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(dyc.inspection, "describe", bug)
    monkeypatch.delenv("DYC_DEBUG", raising=False)
    assert main(["inspect", str(env["ck"])]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: a bug" in err and "DYC_DEBUG=1" in err
    monkeypatch.setenv("DYC_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", str(env["ck"])])


def test_verify_out_of_tolerance_and_help_exit_codes(env, capsys):
    assert main(["verify", str(env["bundle"]), "--tolerance", "1e-30"]) == EXIT_INPUT
    assert "ERRORS ABOVE" in capsys.readouterr().out
    assert main(["--help"]) == 0 and main(["compile", "--help"]) == 0
    assert main([]) == EXIT_USAGE  # the help, on stderr
    assert "Commands:" in capsys.readouterr().err
