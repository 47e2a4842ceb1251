"""The CLI: outputs of inspect/flops/synth, and one clear line for every bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from dyc.checkpoint import save_checkpoint
from dyc.cli import main


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def dydit_path(tmp_path_factory):
    model = random_model(tiny_config(depth=3), seed=0, router_scale=3.0)
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "tiny.safetensors")


def test_flops_json_named_model(capsys):
    code, out, _ = run(capsys, "flops", "--model", "DiT-XL/2", "--json")
    assert code == 0
    assert json.loads(out)["gflops"] == pytest.approx(118.69, rel=0.005)
    code, out, _ = run(capsys, "flops", "--model", "DiT-XL/2", "--image-size", "512")
    assert code == 0 and "524." in out


def test_inspect_masks_plot_and_json(capsys, dydit_path, tmp_path):
    code, out, err = run(capsys, "inspect", str(dydit_path), "--masks", str(tmp_path / "m.npz"),
                         "--plot", str(tmp_path / "p.png"), "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["config"]["depth"] == 3 and info["tdw"]["distinct_architectures"] > 1
    z = np.load(tmp_path / "m.npz")
    assert z["head"].shape == (1000, 3, 4) and z["channel"].shape == (1000, 3, 4)
    assert set(np.unique(z["head"])) <= {0, 1} and z["head"][:, :, 0].all()
    # the arrays are the model's own masks
    from dyc.checkpoint import load_checkpoint

    hm, _ = load_checkpoint(dydit_path).model.tdw_masks(torch.tensor([0, 500, 999]))
    np.testing.assert_array_equal(z["head"][[0, 500, 999]], hm.numpy())
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = run(capsys, "inspect", str(dydit_path))
    assert code == 0 and "distinct architectures" in out


def test_flops_dynamic_checkpoint(capsys, dydit_path):
    code, out, err = run(capsys, "flops", str(dydit_path), "--sampler", "ddim", "--steps", "10",
                         "--token-keep", "0.5", "--json")
    assert code == 0, err
    d = json.loads(out)["dynamic"]
    assert d["steps"] == 10 and len(d["gflops_per_t"]) == 10
    assert d["ratio"] < d["tdw_ratio"] <= 1.0
    assert d["gflops_mean"] == pytest.approx(np.mean(d["gflops_per_t"]), rel=1e-6)


def test_synth_cli(capsys, tmp_path):
    code, out, err = run(capsys, "synth", "--model", "DiT-S/4", "--lambda", "0.6", "--token-keep", "0.9",
                         "-o", str(tmp_path / "s.safetensors"))
    assert code == 0, err
    code, out, err = run(capsys, "flops", str(tmp_path / "s.safetensors"), "--json")
    assert json.loads(out)["dynamic"]["tdw_ratio"] > 0.6  # SDT pays the rest of the 0.6


def _one_line_error(code, out, err, expect: int = 1):
    assert code == expect  # dyc.errors: 1 bad input, 2 usage, 3 internal
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "pickle", "missing-key", "bad-shape"])
def test_bad_input_is_one_line(capsys, tmp_path, case):
    model = random_model(tiny_config(), seed=1)
    p = tmp_path / "x.pt"
    if case == "text":
        p.write_text("not a model")
    elif case == "truncated":
        save_checkpoint(model, tmp_path / "x.safetensors")
        data = (tmp_path / "x.safetensors").read_bytes()
        p = tmp_path / "y.safetensors"
        p.write_bytes(data[:1000])
    elif case == "pickle":
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("ran",))

        p.write_bytes(pickle.dumps({"ema": Evil()}))
    elif case == "missing-key":
        sd = model.state_dict()
        sd.pop("final_layer.linear.bias")
        torch.save(sd, p)
    elif case == "bad-shape":
        sd = model.state_dict()
        sd["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 64)
        torch.save(sd, p)
    for cmd in ("inspect", "flops"):
        line = _one_line_error(*run(capsys, cmd, str(p)))
        assert line.startswith("dyc: error:")
        assert str(p) in line or case == "missing"


def test_usage_errors(capsys, dydit_path):
    _one_line_error(*run(capsys, "flops"), expect=2)
    line = _one_line_error(*run(capsys, "flops", str(dydit_path), "--sampler", "euler"), expect=2)
    assert "unknown sampler" in line
    line = _one_line_error(*run(capsys, "flops", "--model", "DiT-XXL/2"))
    assert "unknown model" in line
