"""The "Python API: sampling" example of docs/runtime.md (the same as README's) runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "runtime.md"
README = DOC.parents[1] / "README.md"


def readme_code() -> str:
    section = README.read_text().split("## Python API: sampling", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def example_code() -> str:
    text = DOC.read_text()
    section = text.split("## Python API: sampling", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert m, "docs/runtime.md: no python block under 'Python API: sampling'"
    return m.group(1)


def test_runtime_doc_sampling_example_runs(shared_dyc_cache, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("DYC_CACHE", str(shared_dyc_cache))
    code = example_code()
    assert code == readme_code(), "docs/runtime.md and README.md show the same example"
    exec(compile(code, str(DOC), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "torch.Size([2, 1, 16, 16])"
    first = lines[1].split()
    assert first[0] == "980" and first[3] == "ms"  # DDIM-50 starts at t = 980 (DiT's ddim50 stride)
    (bundle,) = shared_dyc_cache.glob("dydit_digits-*.dyc")
    groups = json.loads((bundle / "manifest.json").read_text())["groups"]
    for line in lines[1:4]:
        t, g = int(line.split()[0]), int(line.split()[1])
        assert groups[g]["t_lo"] <= t <= groups[g]["t_hi"]
