"""The "Python API: sampling" example of docs/runtime.md (copied into README) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from runtime_fixtures import compile_tame

DOC = Path(__file__).resolve().parents[1] / "docs" / "runtime.md"


def example_code() -> str:
    text = DOC.read_text()
    section = text.split("## Python API: sampling", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert m, "docs/runtime.md: no python block under 'Python API: sampling'"
    return m.group(1)


def test_readme_sampling_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    c = compile_tame(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dydit.dyc").symlink_to(c["bundle"])  # the name the example uses
    code = example_code()
    assert 'dyc.Pipeline.load("dydit.dyc"' in code
    exec(compile(code, str(DOC), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "torch.Size([2, 4, 8, 8])"
    first = lines[1].split()
    assert first[0] == "980" and first[3] == "ms"  # DDIM-50 starts at t = 980 (DiT's ddim50 stride)
    groups = c["manifest"]["groups"]
    for line in lines[1:4]:
        t, g = int(line.split()[0]), int(line.split()[1])
        assert groups[g]["t_lo"] <= t <= groups[g]["t_hi"]
