"""Checkpoint loading: every file form, config inference, and every bad-input case."""

import pickle

import pytest
import torch
from conftest import random_model, tiny_config

from dyc.checkpoint import load_checkpoint, save_checkpoint
from dyc.config import infer_config, parse_model_name
from dyc.errors import DycError
from dyc.model import DyDiT


def _same_outputs(a: DyDiT, b: DyDiT):
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([3, 4])
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=0, atol=0)


@pytest.fixture(params=[True, False], ids=["dydit", "dit"])
def model(request):
    # an official width (DiT-S's 384/6 heads): a plain DiT's head count is inferred from it
    cfg = tiny_config(dynamic=request.param, hidden_size=384, num_heads=6)
    return random_model(cfg, seed=7, router_scale=3.0)


@pytest.mark.parametrize("form", ["safetensors", "bare", "ema", "model", "state_dict", "module-prefix"])
def test_round_trip(tmp_path, model, form):
    sd = model.state_dict()
    if form == "safetensors":
        path = save_checkpoint(model, tmp_path / "m.safetensors")
    else:
        if form == "module-prefix":
            obj = {"ema": {f"module.{k}": v for k, v in sd.items()}}
        elif form == "bare":
            obj = sd
        else:  # DiT's training checkpoints hold several entries; ema is preferred
            obj = {form: sd, "opt": {"lr": torch.tensor(1e-4)}, "args": {"depth": 2}}
        path = tmp_path / "m.pt"
        torch.save(obj, path)
    ck = load_checkpoint(path)
    assert ck.config == model.config if form == "safetensors" else ck.config.dynamic == model.config.dynamic
    assert not ck.model.training
    _same_outputs(ck.model, model)


def test_ema_preferred_over_model(tmp_path, model):
    other = random_model(model.config, seed=99)
    torch.save({"model": other.state_dict(), "ema": model.state_dict()}, tmp_path / "m.pt")
    _same_outputs(load_checkpoint(tmp_path / "m.pt").model, model)


@pytest.mark.parametrize("name,image", [("DiT-S/2", 256), ("DiT-B/4", 256), ("DiT-L/8", 512), ("DiT-XL/2", 512)])
def test_infer_official_configs_from_shapes(name, image):
    cfg = parse_model_name(name, image)
    with torch.device("meta"):
        for dynamic in (False, True):
            c = type(cfg)(**{**cfg.to_dict(), "dynamic": dynamic})
            got = infer_config(DyDiT(c).state_dict())
            assert got == c


def test_static_save_is_plain_dit_of_same_weights(tmp_path):
    dyn = random_model(tiny_config(), seed=1)
    path = save_checkpoint(dyn, tmp_path / "s.safetensors", static=True)
    ck = load_checkpoint(path)
    assert not ck.config.dynamic
    with torch.no_grad():
        x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([2])
        ref = dyn(x, t, y, complete_model=True)
        # Same forward code on bit-identical weights; only BLAS blocking differs (mmap'd weights are not
        # 64-byte aligned), so fp32 rounding relative to the output's scale.
        torch.testing.assert_close(ck.model(x, t, y), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    static_keys = set(ck.model.state_dict())
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, dyn.state_dict()[k]), k
    assert not any("token_selection" in k or "_rate" in k for k in static_keys)


# ---- bad input: one DycError naming the problem -------------------------------------------------
def _err(path) -> str:
    with pytest.raises(DycError) as e:
        load_checkpoint(path)
    return str(e.value)


def test_missing_file(tmp_path):
    assert "no such file" in _err(tmp_path / "nope.safetensors")


def test_plain_dit_of_unofficial_width_needs_metadata(tmp_path):
    model = random_model(tiny_config(dynamic=False), seed=2)
    torch.save(model.state_dict(), tmp_path / "a.pt")
    assert "head count" in _err(tmp_path / "a.pt")
    _same_outputs(load_checkpoint(save_checkpoint(model, tmp_path / "a.safetensors")).model, model)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "a.pt").write_text("hello, I am text\n")
    assert "not a checkpoint" in _err(tmp_path / "a.pt")
    torch.save([1, 2, 3], tmp_path / "b.pt")
    assert "not a checkpoint" in _err(tmp_path / "b.pt")
    assert "directory" in _err(tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file(tmp_path, model, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_checkpoint(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _err(path)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/dyc-pwned-by-pickle",))


def test_pickle_needing_code_is_refused_not_run(tmp_path):
    import os

    marker = "/tmp/dyc-pwned-by-pickle"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"ema": _Evil()}, f)
    assert "needs code to run" in _err(path)
    torch.save({"model": _Evil()}, tmp_path / "evil2.pt")
    assert "needs code to run" in _err(tmp_path / "evil2.pt")
    assert not os.path.exists(marker)


def test_missing_and_unexpected_keys_are_named(tmp_path, model):
    sd = dict(model.state_dict())
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "a.pt")
    msg = _err(tmp_path / "a.pt")
    assert "missing keys" in msg and "blocks.1.mlp.fc2.bias" in msg
    sd = dict(model.state_dict(), **{"blocks.0.extra.weight": torch.zeros(3)})
    torch.save(sd, tmp_path / "b.pt")
    msg = _err(tmp_path / "b.pt")
    assert "unexpected keys" in msg and "blocks.0.extra.weight" in msg
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("x_embedder")}
    torch.save(sd, tmp_path / "c.pt")
    assert "x_embedder.proj.weight" in _err(tmp_path / "c.pt")


def test_shapes_that_fit_no_config(tmp_path, model):
    sd = dict(model.state_dict())
    sd["pos_embed"] = torch.zeros(1, 15, 384)  # not a square grid
    torch.save(sd, tmp_path / "a.pt")
    assert "fit no DiT config" in _err(tmp_path / "a.pt")
    sd = dict(model.state_dict())
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(100, 384)
    torch.save(sd, tmp_path / "b.pt")
    msg = _err(tmp_path / "b.pt")
    assert "fit no DiT config" in msg and "blocks.1.attn.qkv.weight" in msg
