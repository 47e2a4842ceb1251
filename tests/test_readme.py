"""README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from runtime_fixtures import compile_tame

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


def test_sampling_example(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    c = compile_tame(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dydit.dyc").symlink_to(c["bundle"])  # the name the example uses
    exec(compile(block("Python API: sampling"), str(README), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("torch.Size([2,")
    groups = c["manifest"]["groups"]
    for line in lines[1:4]:  # per step: t, the group that ran it (as the manifest says), ms
        t, g = int(line.split()[0]), int(line.split()[1])
        assert groups[g]["t_lo"] <= t <= groups[g]["t_hi"]
