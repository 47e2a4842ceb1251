"""``dyc run``: final latents vs the eager loops, run.json's trace vs the manifest, outputs, bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from runtime_fixtures import CLASSES, compile_tame, reference, tame_config, tame_model

from dyc.checkpoint import save_checkpoint
from dyc.cli import main
from dyc.runtime import pipeline as pipeline_mod
from dyc.timesteps import sampler_timesteps

TOL = 1e-4
# diffusers (the DPM-Solver++ reference) trips a numpy-2 copy= deprecation inside its scheduler
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    c = compile_tame(tmp_path_factory.mktemp("rtcli"))
    np.save(c["dir"] / "noise.npy", c["noise"].numpy())
    return c


def dyc_run(capsys, *args) -> tuple[int, str, str]:
    rc = main(["run", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("scale", ["1", "4"])
@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", 20), ("dpm-solver++", 10)])
def test_run_noise_matches_eager_loop(compiled, tmp_path, capsys, sampler, steps, scale):
    out = tmp_path / "out"
    rc, _, err = dyc_run(capsys, compiled["bundle"], "--noise", compiled["dir"] / "noise.npy", "--sampler", sampler,
                         "--steps", steps, "--cfg", scale, "--classes", ",".join(map(str, CLASSES)), "--seed", 4,
                         "-o", out)
    assert rc == 0, err
    lat = np.load(out / "latents.npy")
    ref = reference(compiled, sampler, steps, float(scale), seed=4).numpy()
    assert lat.shape == ref.shape and lat.dtype == np.float32
    assert np.abs(lat - ref).max() <= TOL

    run = json.loads((out / "run.json").read_text())
    assert run["bundle"] == str(compiled["bundle"].resolve())
    assert (run["backend"], run["sampler"], run["steps"], run["seed"]) == ("onnxruntime", sampler, steps, 4)
    assert run["classes"] == CLASSES and run["total_s"] > 0
    # per step: t in sampling order, and the group whose t-interval in the manifest holds it
    groups = compiled["manifest"]["groups"]
    assert [s["t"] for s in run["trace"]] == sampler_timesteps(sampler, steps)
    for s in run["trace"]:
        assert groups[s["group"]]["t_lo"] <= s["t"] <= groups[s["group"]]["t_hi"] and s["ms"] > 0
    assert len({s["group"] for s in run["trace"]}) > 1  # engines switched during the run


def test_run_cfg_official_and_save_latents(compiled, tmp_path, capsys):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    noise = compiled["dir"] / "noise.npy"
    assert dyc_run(capsys, compiled["bundle"], "--noise", noise, "--steps", 5, "--classes", "1,5,9",
                   "--save-latents", a, "-o", tmp_path / "o1")[0] == 0
    assert dyc_run(capsys, compiled["bundle"], "--noise", noise, "--steps", 5, "--classes", "1,5,9", "--cfg-official",
                   "--save-latents", b, "-o", tmp_path / "o2")[0] == 0
    assert np.array_equal(np.load(a), np.load(tmp_path / "o1" / "latents.npy"))
    assert np.abs(np.load(a) - np.load(b)).max() > 1e-3
    assert json.loads((tmp_path / "o2" / "run.json").read_text())["cfg_official"] is True


def test_run_classes_cycle_to_num_samples(compiled, tmp_path, capsys):
    rc, out, err = dyc_run(capsys, compiled["bundle"], "--steps", 3, "--classes", "2,7", "--num-samples", 5,
                           "--batch", 2, "-o", tmp_path)
    assert rc == 0, err
    assert json.loads((tmp_path / "run.json").read_text())["classes"] == [2, 7, 2, 7, 2]
    assert np.load(tmp_path / "latents.npy").shape == (5, 4, 8, 8)
    assert "5 sample(s)" in out


def test_run_pixel_space_writes_pngs(tmp_path, capsys):
    from PIL import Image

    cfg = tame_config(in_channels=3, vae_scale=1)
    ckpt = save_checkpoint(tame_model(cfg), tmp_path / "pix.safetensors")
    out = tmp_path / "out"
    rc, _, err = dyc_run(capsys, ckpt, "--backend", "eager", "--steps", 4, "--classes", "3,0,8", "-o", out)
    assert rc == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_class3.png", "0001_class0.png", "0002_class8.png", "grid.png", "run.json"]
    im = Image.open(out / "0001_class0.png")
    assert im.size == (8, 8) and im.mode == "RGB"
    assert Image.open(out / "grid.png").size == (2 + 2 * 10, 2 + 2 * 10)  # 2 columns, 2 px gaps


def test_run_vae_decodes_latents(compiled, tmp_path, capsys):
    """--vae DIR: a tiny, randomly initialised AutoencoderKL saved locally; no network."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "out"
    rc, _, err = dyc_run(capsys, compiled["bundle"], "--steps", 3, "--classes", "1,2", "--vae", tmp_path / "vae",
                         "-o", out)
    assert rc == 0, err
    assert {"latents.npy", "0000_class1.png", "0001_class2.png", "grid.png", "run.json"} <= {p.name for p in
                                                                                            out.iterdir()}
    lat = torch.from_numpy(np.load(out / "latents.npy"))
    with torch.no_grad():
        img = vae.decode(lat / 0.18215).sample
    expect = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "0001_class2.png")), expect[1])


def test_run_without_bundle_uses_default_model(compiled, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DYC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline_mod, "default_checkpoint", lambda: compiled["ckpt"])
    rc, _, err = dyc_run(capsys, "--steps", 3, "--classes", "4", "-o", tmp_path / "out")
    assert rc == 0, err
    assert "compiling" in err and len(list((tmp_path / "cache").glob("*.dyc"))) == 1
    rc, _, err = dyc_run(capsys, "--steps", 3, "--classes", "4", "-o", tmp_path / "out")
    assert rc == 0 and "compiling" not in err  # cached


def test_run_without_default_model_fails_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dyc.models", None)  # as if recipes/ had not shipped the model
    rc, _, err = dyc_run(capsys, "-o", tmp_path)
    assert rc == 1 and err.strip().count("\n") == 0
    assert "no embedded default model" in err


@pytest.fixture
def bad_noise(compiled, tmp_path):
    n = compiled["noise"].numpy()
    files = {
        "shape": n[:2], "dtype": n.astype(np.float64), "rank": n[0],
    }
    for k, v in files.items():
        np.save(tmp_path / f"{k}.npy", v)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    return tmp_path


@pytest.mark.parametrize("args,message,code", [  # code: 1 bad input, 2 bad option value (dyc.errors)
    (["--classes", "1,10"], "class id 10 is out of range: this model has classes 0..9", 1),
    (["--classes", "-1"], "class id -1 is out of range", 1),
    (["--classes", "1,cat"], "'cat' is not a class id", 2),
    (["--steps", "0"], "--steps must be positive, got 0", 2),
    (["--steps", "-3"], "--steps must be positive", 2),
    (["--noise", "{noise}/shape.npy"], "noise has shape [2, 4, 8, 8], expected [3, 4, 8, 8]", 1),
    (["--noise", "{noise}/rank.npy"], "noise has shape [4, 8, 8], expected [3, 4, 8, 8]", 1),
    (["--noise", "{noise}/dtype.npy"], "dtype is float64, expected float32", 1),
    (["--noise", "{noise}/junk.npy"], "not a .npy array", 1),
    (["--noise", "{noise}/absent.npy"], "no such file", 1),
    (["--backend", "tensorrtx"], "unknown backend 'tensorrtx'", 2),
    (["--batch", "0"], "--batch must be positive", 2),
    (["--num-samples", "2"], "--num-samples 2 is fewer than the 3 --classes given", 2),
    (["--vae", "{noise}/novae"], "no such directory", 1),
])
def test_run_bad_input_is_one_line(compiled, bad_noise, capsys, args, message, code):
    args = [a.format(noise=bad_noise) for a in args]
    if "--classes" not in args:
        args += ["--classes", "1,5,9"]
    rc, out, err = dyc_run(capsys, compiled["bundle"], *args, "-o", bad_noise / "out")
    assert rc == code
    assert err.startswith("dyc: error: ") and err.strip().count("\n") == 0, err
    assert message in err, err


def test_run_missing_bundle(tmp_path, capsys):
    rc, _, err = dyc_run(capsys, tmp_path / "nope.dyc", "-o", tmp_path)
    assert rc == 1 and err.strip().count("\n") == 0 and "nope.dyc: no such bundle or checkpoint" in err


def test_run_backend_not_installed_names_package(compiled, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    rc, _, err = dyc_run(capsys, compiled["bundle"], "-o", tmp_path)
    assert rc == 1 and err.strip().count("\n") == 0
    assert "pip install onnxruntime" in err and "backend 'onnxruntime'" in err


def test_run_alone_uses_the_embedded_model(tmp_path, capsys, monkeypatch):
    """`dyc run` with no BUNDLE on a fresh machine: the shipped digits DyDiT, compiled into the cache."""
    from PIL import Image

    from dyc.models import default_checkpoint

    monkeypatch.setenv("DYC_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    out = tmp_path / "out"
    rc, _, err = dyc_run(capsys, "--steps", 5, "--num-samples", 3, "-o", out)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["bundle"].startswith(str(tmp_path / "cache" / default_checkpoint().stem))
    assert run["classes"] == [0, 1, 2] and run["model"].startswith("DyDiT")
    assert sorted(run["outputs"]) == ["0000_class0.png", "0001_class1.png", "0002_class2.png", "grid.png"]
    im = Image.open(out / "0002_class2.png")  # pixel space, 1 channel: grey 16×16 digits
    assert im.mode == "L" and im.size == (16, 16)
