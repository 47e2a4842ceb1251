"""README's Python examples run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def block(heading: str) -> str:
    section = README.read_text().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert m, f"README: no python block under {heading!r}"
    return m.group(1)


def test_model_example(capsys):
    from dyc.checkpoint import load_checkpoint
    from dyc.models import default_checkpoint

    exec(compile(block("Python API: the model"), str(README), "exec"), {})
    out = capsys.readouterr().out.strip()
    assert out.startswith("torch.Size([2, 2, 16, 16])")  # 1 pixel channel, learned sigma: 2 out
    heads_late, heads_early = map(int, out.split()[-2:])
    hm, _ = load_checkpoint(default_checkpoint()).model.tdw_masks(torch.tensor([999, 0]))
    assert (heads_late, heads_early) == (int(hm[0].sum()), int(hm[1].sum()))


def test_sampling_example(shared_dyc_cache, monkeypatch, capsys):
    """As written: the embedded default model, compiled on first use into the cache."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("DYC_CACHE", str(shared_dyc_cache))
    exec(compile(block("Python API: sampling"), str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "torch.Size([2, 1, 16, 16])"  # the digits model: 1 pixel channel, 16 px
    (bundle,) = shared_dyc_cache.glob("dydit_digits-*.dyc")  # compiled into the cache, as the comment says
    groups = json.loads((bundle / "manifest.json").read_text())["groups"]
    for line in lines[1:4]:  # per step: t, the group that ran it (as the manifest says), ms
        t, g = int(line.split()[0]), int(line.split()[1])
        assert groups[g]["t_lo"] <= t <= groups[g]["t_hi"]
