"""`dyc inspect`: every λ of a DyDiT together, with one name each, equal to what flops / compile report."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_model, tiny_config

from dyc.checkpoint import save_checkpoint
from dyc.cli import main
from dyc.timesteps import sampler_timesteps


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = random_model(tiny_config(depth=3), seed=1, router_scale=3.0)
    meta = {"dyc.recipe": json.dumps({"stage": "finetune", "lambda": 0.6})}
    return save_checkpoint(model, tmp_path_factory.mktemp("lam") / "m.safetensors", metadata=meta)


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def _tdw_ratio_by_hand(model, cfg, ts) -> float:
    """MHSA+MLP MACs of the masks over the full width, written out (DESIGN.md §2's counts)."""
    n, c, d, h = cfg.num_tokens, cfg.hidden_size, cfg.hidden_size // cfg.num_heads, cfg.num_heads
    gs = int(cfg.mlp_ratio * c) // h
    per_head, per_group = 3 * n * c * d + 2 * n * n * d + n * d * c, 2 * n * c * gs
    hm, cm = model.tdw_masks(torch.tensor(ts))
    dyn = hm.sum((1, 2)).double() * per_head + cm.sum((1, 2)).double() * per_group
    return float((dyn / (cfg.depth * h * (per_head + per_group))).mean())


def test_inspect_lambda_figures_match_flops_and_compile(ckpt, tmp_path, capsys):
    from dyc.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    lam = json.loads(_run(capsys, "inspect", str(ckpt), "--json")[0])["lambda"]
    ddim50 = sampler_timesteps("ddim", 50)
    assert lam["schedule"] == "ddim-50"
    assert lam["tdw_all_t"] == pytest.approx(_tdw_ratio_by_hand(ck.model, ck.config, list(range(1000))), rel=1e-12)
    assert lam["tdw"] == pytest.approx(_tdw_ratio_by_hand(ck.model, ck.config, ddim50), rel=1e-12)
    assert lam["target"] == 0.6 and lam["target_from"] == "fine-tuning"
    # SDT only removes work; the engines' unions only add it back
    assert lam["model"] < lam["tdw"] and lam["model_all_t"] < lam["tdw_all_t"]
    assert lam["engines"] >= lam["model"] - 1e-12
    # the same figures under the same names elsewhere: dyc flops (λ_tdw) ...
    d = json.loads(_run(capsys, "flops", str(ckpt), "--json")[0])["dynamic"]
    assert d["tdw_ratio"] == pytest.approx(lam["tdw"], rel=1e-12)
    # ... and dyc compile with its defaults (λ_model = lambda.trained = lambda.model, λ_engines = lambda.realized)
    out, _ = _run(capsys, "compile", str(ckpt), "-o", str(tmp_path / "m.dyc"))
    m = json.loads((tmp_path / "m.dyc" / "manifest.json").read_text())["lambda"]
    assert m["trained"] == pytest.approx(lam["model"], rel=1e-12) and m["model"] == m["trained"]
    assert m["realized"] == pytest.approx(lam["engines"], rel=1e-12)
    assert f"λ_model {lam['model']:.4f}" in out and f"λ_engines {lam['engines']:.4f}" in out
    # inspect of the bundle: the manifest's figures, same names
    b = json.loads(_run(capsys, "inspect", str(tmp_path / "m.dyc"), "--json")[0])["lambda"]
    assert (b["model"], b["engines"], b["target"]) == (m["model"], m["realized"], None)
    text = _run(capsys, "inspect", str(tmp_path / "m.dyc"))[0]
    assert f"λ_model       {m['model']:.4f}" in text and f"λ_engines     {m['realized']:.4f}" in text


def test_inspect_prints_every_lambda_with_its_meaning(ckpt, capsys):
    out, err = _run(capsys, "inspect", str(ckpt))
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("λ_")}
    assert set(rows) == {"λ_tdw", "λ_model", "λ_engines", "λ_target"}
    assert rows["λ_engines"][1] == "-"  # no t=0..999 figure: the engines are built for the schedule
    assert rows["λ_target"][1] == "0.6000"
    assert "TDW alone" in out and "TDW + SDT" in out and "union" in out
    assert "calibration: step" in err  # the calibration reports its progress
    out, _ = _run(capsys, "inspect", str(ckpt), "--calib", "0", "--json")
    lam = json.loads(out)["lambda"]
    assert lam["model"] is None and lam["engines"] is None and lam["tdw"] is not None


def test_plain_dit_has_no_lambda(tmp_path, capsys):
    path = save_checkpoint(random_model(tiny_config(depth=2), seed=0), tmp_path / "s.safetensors", static=True)
    info = json.loads(_run(capsys, "inspect", str(path), "--json")[0])
    assert "lambda" not in info and "tdw" not in info
