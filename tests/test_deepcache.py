"""DeepCache over the runtime (dyc.runtime.deepcache): exactness at interval 1, the formulation, bounded drift,
torch engines vs the eager model, errors, the bench rows."""

from __future__ import annotations

import pytest
import torch
from runtime_fixtures import tame_config, tame_model

from dyc.bench import run_bench
from dyc.checkpoint import save_checkpoint
from dyc.cli import main
from dyc.compiler.compile import compile_checkpoint
from dyc.errors import DycError
from dyc.runtime.deepcache import DeepCache, eager_forward
from dyc.runtime.pipeline import Pipeline

CLASSES = [1, 5, 9]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("deepcache")
    torch.manual_seed(0)
    model = tame_model(tame_config(depth=5))
    with torch.no_grad():  # features that change slowly with t, as a trained model's (DeepCache's premise): the
        w = model.t_embedder.mlp[0].weight  # timestep MLP reads only the sinusoids of period > 3000 steps
        half = w.shape[1] // 2
        w[:, :100] = 0
        w[:, half:half + 100] = 0
    ckpt = save_checkpoint(model, d / "m.safetensors")
    return model, ckpt, compile_checkpoint(ckpt, d / "m.dyc", groups=3, calib=1, calib_steps=3).path


def test_formulation_refresh_then_reuse_at_the_same_step(bundle):
    """Δ cached from a refresh and reused at the same inputs gives the refresh's output back."""
    model = bundle[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t, y = torch.tensor([400, 400]), torch.tensor([1, 10])
    with torch.no_grad():
        full = model(x, t, y)
        out, delta = eager_forward(model, x, t, y, 1, None)
        again, _ = eager_forward(model, x, t, y, 1, delta)
        zero, _ = eager_forward(model, x, t, y, 1, torch.zeros_like(delta))
    assert torch.equal(out, full)
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(zero, full, atol=1e-3)  # the deep blocks' residual does matter


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_interval_one_is_exact_and_two_drifts_boundedly(bundle, backend):
    pipe = Pipeline.load(bundle[2], backend=backend, device="cpu")
    kw = dict(steps=12, cfg=4.0, seed=0, batch=2)  # two chunks, each its own cache
    base = pipe(CLASSES, **kw).latents
    assert torch.equal(pipe(CLASSES, deepcache=1, **kw).latents, base)
    drift = {}
    for n in (2, 3):
        out = pipe(CLASSES, deepcache=n, **kw)
        assert out.info["deepcache"] == {"interval": n, "shallow": 1}
        drift[n] = float((out.latents - base).norm() / base.norm())
    assert 1e-4 < drift[2] < 0.1 and 1e-4 < drift[3] < 0.1


def test_torch_engines_match_eager_with_deepcache(bundle):
    kw = dict(steps=12, cfg=4.0, seed=0, deepcache=2, deepcache_shallow=2)
    eager = Pipeline.load(bundle[2], backend="eager")(CLASSES, **kw).latents
    sliced = Pipeline.load(bundle[2], backend="torch", device="cpu")(CLASSES, **kw).latents
    assert (sliced - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_errors_are_one_line(bundle, capsys, tmp_path):
    path = str(bundle[2])
    assert main(["run", path, "--deepcache", "2", "-o", str(tmp_path)]) == 2  # default backend: onnxruntime
    assert "eager and torch backends" in capsys.readouterr().err
    assert main(["run", path, "--deepcache", "2", "--deepcache-shallow", "3", "--backend", "eager",
                 "-o", str(tmp_path)]) == 2
    assert "shallow blocks must be in 1..2" in capsys.readouterr().err
    assert main(["run", path, "--deepcache", "0", "--backend", "eager", "-o", str(tmp_path)]) == 2
    with pytest.raises(DycError, match="DiT-family"):
        from test_families import uvit_config

        DeepCache(2).check(uvit_config())


def test_bench_reports_extra_speedup_and_drift(bundle):
    rep = run_bench(bundle[1], backends=["torch"], batch=2, steps=6, dtype="fp32", device="cpu", repeats=1,
                    deepcache=[1, 2])
    rows = {(r["row"], r["interval"]): r for r in rep["deepcache"]}
    assert set(rows) == {("torch-static", 1), ("torch-static", 2), ("torch", 1), ("torch", 2)}
    assert rows[("torch", 1)]["drift_rel_l2"] == 0.0
    assert rows[("torch", 2)]["drift_rel_l2"] > 0.0
    assert all(r["s_per_image"] > 0 and r["extra_speedup"] > 0 for r in rows.values())
