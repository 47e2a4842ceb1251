"""dyc.Pipeline over a compiled bundle vs the eager reference loops over the uncompiled model.

The bundle is compiled once per module through the compiler's Python API (3 groups, so the
engines switch during sampling and take per-t mask inputs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from runtime_fixtures import CLASSES, compile_tame, reference, tame_config, tame_model

import dyc
from dyc.checkpoint import save_checkpoint
from dyc.errors import DycError
from dyc.runtime import pipeline as pipeline_mod
from dyc.timesteps import sampler_timesteps

TOL = 1e-4
# diffusers (the DPM-Solver++ reference) trips a numpy-2 copy= deprecation inside its scheduler
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_tame(tmp_path_factory.mktemp("rt"))


@pytest.fixture(scope="module")
def ort_pipe(compiled):
    pytest.importorskip("onnxruntime")
    return dyc.Pipeline.load(compiled["bundle"], backend="onnxruntime")


def test_bundle_switches_engines_with_mask_inputs(compiled):
    groups = compiled["manifest"]["groups"]
    assert len(groups) == 3
    assert any(g["inputs"]["head_mask"] or g["inputs"]["channel_mask"] for g in groups)
    # the DDIM-25 schedule crosses every group, so a run really switches engines
    sched = sampler_timesteps("ddim", 25)
    assert {next(g["index"] for g in groups if g["t_lo"] <= t <= g["t_hi"]) for t in sched} == {0, 1, 2}


@pytest.mark.parametrize("scale", [1.0, 4.0])
@pytest.mark.parametrize("sampler,steps", [("ddim", 25), ("ddpm", 50), ("dpm-solver++", 20)])
def test_onnxruntime_pipeline_matches_eager_loop(compiled, ort_pipe, sampler, steps, scale):
    out = ort_pipe(CLASSES, sampler=sampler, steps=steps, cfg=scale, seed=5, noise=compiled["noise"])
    ref = reference(compiled, sampler, steps, scale, seed=5)
    assert out.latents.shape == ref.shape
    assert (out.latents - ref).abs().max().item() <= TOL
    assert out.images is None  # a latent model (vae_scale 8)


def test_trace_follows_manifest_groups(compiled, ort_pipe):
    out = ort_pipe(CLASSES, sampler="ddim", steps=25, cfg=1.0, noise=compiled["noise"])
    groups = compiled["manifest"]["groups"]
    assert [s.t for s in out.trace] == sampler_timesteps("ddim", 25)
    for s in out.trace:
        g = groups[s.group]
        assert g["t_lo"] <= s.t <= g["t_hi"] and s.ms > 0
    assert out.total_ms >= sum(s.ms for s in out.trace) * 0.99


def test_batch_splits_engine_calls_only(compiled, ort_pipe):
    """--batch caps samples per engine call; the result (DDPM's noise included) does not depend on it."""
    a = ort_pipe(CLASSES, sampler="ddpm", steps=20, cfg=4.0, seed=2)
    b = ort_pipe(CLASSES, sampler="ddpm", steps=20, cfg=4.0, seed=2, batch=1)
    assert (a.latents - b.latents).abs().max().item() <= 1e-5
    c = ort_pipe(CLASSES, sampler="ddpm", steps=20, cfg=4.0, seed=3)
    assert (a.latents - c.latents).abs().max().item() > 1e-2  # the seed matters


def test_eager_backend_on_bundle_and_checkpoint(compiled, ort_pipe):
    ref = reference(compiled, "ddim", 25, 4.0, 0)
    eager = dyc.Pipeline.load(compiled["bundle"], backend="eager")  # source checkpoint from the manifest
    out = eager(CLASSES, sampler="ddim", steps=25, cfg=4.0, noise=compiled["noise"])
    assert (out.latents - ref).abs().max().item() <= 1e-6
    groups = [s.group for s in out.trace]
    assert groups == [s.group for s in ort_pipe(CLASSES, steps=25, noise=compiled["noise"]).trace]
    plain = dyc.Pipeline.load(compiled["ckpt"], backend="eager")  # uncompiled checkpoint: one engine
    out = plain(CLASSES, sampler="ddim", steps=25, cfg=4.0, noise=compiled["noise"])
    assert (out.latents - ref).abs().max().item() <= 1e-6
    assert {s.group for s in out.trace} == {0}


def test_eager_backend_needs_its_checkpoint(compiled, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere.safetensors"
    shutil.copy(compiled["ckpt"], moved)
    bundle = tmp_path / "b.dyc"
    shutil.copytree(compiled["bundle"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"]["path"] == str(compiled["ckpt"].resolve())
    # the recorded source exists here: fine; an explicit checkpoint overrides it
    pipe = dyc.Pipeline.load(bundle, backend="eager", checkpoint=moved)
    assert pipe([1], steps=2).latents.shape == (1, 4, 8, 8)


def test_checkpoint_is_compiled_once_into_cache(compiled, tmp_path, monkeypatch):
    """Without a bundle: the (default) checkpoint compiles into the cache ($XDG_CACHE_HOME/dyc when $DYC_CACHE
    is unset) on first use, then is reused."""
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("DYC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(pipeline_mod, "default_checkpoint", lambda: compiled["ckpt"])
    pipe = dyc.Pipeline.load(None, backend="onnxruntime")
    bundles = list((tmp_path / "xdg" / "dyc").glob("*.dyc"))
    assert len(bundles) == 1 and pipe.bundle.path == bundles[0]
    stamp = (bundles[0] / "manifest.json").stat().st_mtime_ns
    again = dyc.Pipeline.load(None, backend="onnxruntime")
    assert (bundles[0] / "manifest.json").stat().st_mtime_ns == stamp
    ref = reference(compiled, "ddim", 25, 1.0, 0)
    out = again(CLASSES, steps=25, noise=compiled["noise"])
    assert (out.latents - ref).abs().max().item() <= TOL


def test_cache_dir_precedence(tmp_path, monkeypatch):
    """$DYC_CACHE > $XDG_CACHE_HOME/dyc (absolute only, as the XDG spec says) > ~/.cache/dyc."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("DYC_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert pipeline_mod.cache_dir() == tmp_path / "home" / ".cache" / "dyc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored
    assert pipeline_mod.cache_dir() == tmp_path / "home" / ".cache" / "dyc"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pipeline_mod.cache_dir() == tmp_path / "xdg" / "dyc"
    monkeypatch.setenv("DYC_CACHE", str(tmp_path / "mine"))
    assert pipeline_mod.cache_dir() == tmp_path / "mine"


def test_pipeline_bad_input(compiled, ort_pipe):
    noise = compiled["noise"]
    with pytest.raises(DycError, match="out of range"):
        ort_pipe([3, 10])
    with pytest.raises(DycError, match="not an integer"):
        ort_pipe([1.5])
    with pytest.raises(DycError, match="steps must be positive"):
        ort_pipe([1], steps=0)
    with pytest.raises(DycError, match=r"noise has shape \[3, 4, 8, 8\], expected \[2, 4, 8, 8\]"):
        ort_pipe([1, 2], noise=noise)
    with pytest.raises(DycError, match="float32"):
        ort_pipe(CLASSES, noise=noise.double())
    with pytest.raises(DycError, match="float32"):
        ort_pipe(CLASSES, noise=noise.numpy().astype(np.float16))
    with pytest.raises(DycError, match="no such bundle"):
        dyc.Pipeline.load(compiled["dir"] / "missing.dyc")
    with pytest.raises(DycError, match="unknown backend"):
        dyc.Pipeline.load(compiled["bundle"], backend="nope")


def test_pixel_space_model_returns_images(tmp_path):
    """vae_scale 1: samples are images (uint8 HWC), here on the eager backend over a checkpoint."""
    cfg = tame_config(in_channels=3, vae_scale=1)
    ckpt = save_checkpoint(tame_model(cfg), tmp_path / "pix.safetensors")
    pipe = dyc.Pipeline.load(ckpt, backend="eager")
    out = pipe([0, 7], sampler="ddim", steps=5, cfg=2.0, seed=1)
    assert out.images.shape == (2, 8, 8, 3) and out.images.dtype == np.uint8
    expect = ((out.latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(out.images, expect)


def test_onnxruntime_shared_arena_changes_nothing(compiled, ort_pipe):
    """All group sessions on one CPU arena (the default) vs one arena each: identical samples."""
    own = dyc.Pipeline.load(compiled["bundle"], backend="onnxruntime", share_arena=False)
    a = ort_pipe(CLASSES, sampler="ddpm", steps=20, cfg=4.0, seed=1, noise=compiled["noise"])
    b = own(CLASSES, sampler="ddpm", steps=20, cfg=4.0, seed=1, noise=compiled["noise"])
    assert torch.equal(a.latents, b.latents)
    assert [s.group for s in a.trace] == [s.group for s in b.trace]


def test_low_precision_bundles(compiled, tmp_path):
    """fp16 runs on onnxruntime close to fp32; bf16 is refused there with a clear message."""
    from dyc.compiler.compile import compile_checkpoint

    ref = reference(compiled, "ddim", 10, 1.0, 0)
    for dtype in ("fp16", "bf16"):
        compile_checkpoint(compiled["ckpt"], tmp_path / f"{dtype}.dyc", groups=2, calib=1, calib_steps=2, dtype=dtype)
    out = dyc.Pipeline.load(tmp_path / "fp16.dyc")(CLASSES, steps=10, noise=compiled["noise"])
    assert out.info["dtype"] == "fp16" and out.latents.dtype == torch.float32
    assert (out.latents - ref).abs().max().item() < 0.05
    with pytest.raises(DycError, match="bf16 bundle, which the onnxruntime backend does not run"):
        dyc.Pipeline.load(tmp_path / "bf16.dyc")


def test_eager_backend_takes_the_bundles_masks(compiled):
    """Over a bundle the eager reference runs the bundle's per-t TDW masks (what the engines run);
    in fp32 they are exactly the routers' own decisions."""
    from dyc.backends.eager import EagerBackend
    from dyc.bundle import Bundle

    be = EagerBackend(Bundle.load(compiled["bundle"]))
    t = torch.tensor([999, 981, 500, 500, 37, 0])
    head, channel = be._bundle_masks(t)
    ref_head, ref_channel = compiled["model"].tdw_masks(t)
    assert torch.equal(head, ref_head) and torch.equal(channel, ref_channel)
    assert 0 < head.mean() < 1  # masks that actually switch heads off
