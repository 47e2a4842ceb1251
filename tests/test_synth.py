"""Synthetic checkpoints reach their FLOPs target with the paper's pattern over t."""

import json

import numpy as np
import pytest
import torch

from dyc.checkpoint import load_checkpoint, save_checkpoint
from dyc.config import parse_model_name
from dyc.errors import DycError
from dyc.flops import flops_ratio
from dyc.synth import synth_metadata, synthesize


@pytest.fixture(scope="module")
def synth_s(tmp_path_factory):
    cfg = parse_model_name("DiT-S/2")
    model, info = synthesize(cfg, 0.5, token_keep=0.7, seed=3)
    path = save_checkpoint(model, tmp_path_factory.mktemp("s") / "s.safetensors", metadata=synth_metadata(info))
    return path, info


def test_reaches_lambda_and_token_keep(synth_s):
    path, info = synth_s
    ck = load_checkpoint(path)
    assert ck.metadata["dyc.untrained"] == "true"
    hm, cm = (m.numpy() for m in ck.model.tdw_masks(torch.arange(1000)))
    # measure keep independently: run the loaded model on fresh typical inputs
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    y = torch.randint(0, 1000, (4,), generator=g)
    with torch.no_grad():
        _, m = ck.model(x, t, y, return_masks=True)
    keep = m["token"].mean(dim=(0, 2)).numpy()  # per layer
    assert keep.mean() == pytest.approx(0.7, abs=0.08)
    assert flops_ratio(ck.config, hm, cm, keep) == pytest.approx(0.5, abs=0.03)
    assert json.loads(ck.metadata["dyc.synth"])["lambda_target"] == 0.5


def test_more_width_as_t_goes_to_zero(synth_s):
    ck = load_checkpoint(synth_s[0])
    hm, cm = (m.numpy() for m in ck.model.tdw_masks(torch.arange(1000)))
    active = hm.sum((1, 2)) + cm.sum((1, 2))
    assert np.all(np.diff(active) <= 0)  # non-increasing in t
    assert active[0] > active[999]
    assert len(np.unique(np.concatenate([hm, cm], -1).reshape(1000, -1), axis=0)) > 20


def test_static_variant_shares_weights(synth_s, tmp_path):
    cfg = parse_model_name("DiT-S/2")
    model, _ = synthesize(cfg, 0.5, token_keep=0.7, seed=3)
    static = load_checkpoint(save_checkpoint(model, tmp_path / "d.safetensors", static=True))
    dyn = load_checkpoint(synth_s[0])
    assert not static.config.dynamic
    for k, v in static.model.state_dict().items():
        assert torch.equal(v, dyn.model.state_dict()[k]), k


def test_bad_targets():
    cfg = parse_model_name("DiT-S/2")
    with pytest.raises(DycError, match="lambda"):
        synthesize(cfg, 1.5)
    with pytest.raises(DycError, match="floor"):
        synthesize(cfg, 0.05, token_keep=1.0)
