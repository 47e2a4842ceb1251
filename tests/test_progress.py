"""Progress on stderr: log lines (step i/n, elapsed, ETA) when it is not a terminal, a redrawn line when it is;
and the long commands (`dyc run`, `dyc bench`, `dyc compile`) report it."""

from __future__ import annotations

import io
import json
import re

from conftest import random_model, tiny_config

from dyc.checkpoint import save_checkpoint
from dyc.cli import main
from dyc.progress import PhaseLog, Progress

DURATION = r"[\d.:]+ (s|min|h)"
STEP_LINE = re.compile(rf"^(?P<label>.+): (?P<i>\d+)/(?P<n>\d+) \(\d+%\), {DURATION} elapsed(, ETA {DURATION})?$")


def test_log_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress(4, "ddim 4 steps", stream=out, every_s=0) as p:  # every update is due
        for _ in range(4):
            p.update()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [STEP_LINE.match(s)["i"] for s in lines] == ["0", "1", "2", "3", "4"]
    assert all(STEP_LINE.match(s)["n"] == "4" and STEP_LINE.match(s)["label"] == "ddim 4 steps" for s in lines)
    assert "ETA" in lines[2] and "ETA" not in lines[0] and "ETA" not in lines[-1]
    assert lines[-1].startswith("ddim 4 steps: 4/4 (100%)")


def test_log_lines_are_rate_limited():
    out = io.StringIO()
    with Progress(1000, "x", stream=out, every_s=3600) as p:
        for _ in range(1000):
            p.update()
    lines = out.getvalue().splitlines()
    assert [STEP_LINE.match(s)["i"] for s in lines] == ["0", "1000"]  # start and end only


def test_redrawn_line_on_a_terminal():
    out = io.StringIO()
    with Progress(3, "steps", stream=out, terminal=True) as p:
        for _ in range(3):
            p.update()
    text = out.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and text.count("\n") == 1  # start, 3 steps, close
    assert "[########################] steps: 3/3 (100%)" in text


def test_phase_log_elapsed_and_eta():
    out = io.StringIO()
    log = PhaseLog(out)
    for msg in ["loaded X", "export: group 1/4 (t 0-262)", "export: group 2/4 (t 263-660)",
                "export: group 4/4 (t 870-999)"]:
        log(msg)
    lines = out.getvalue().splitlines()
    assert all(re.match(r"^\[ *[\d.:]+ (s|min|h)\] ", s) for s in lines)
    assert lines[0].endswith("loaded X") and "ETA" in lines[2] and "ETA" not in lines[1] + lines[3]


def _ckpt(tmp_path):
    return save_checkpoint(random_model(tiny_config(depth=2), seed=0, router_scale=3.0), tmp_path / "m.safetensors")


def test_run_reports_steps_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DYC_PROGRESS_INTERVAL", "0")
    code = main(["run", str(_ckpt(tmp_path)), "--backend", "eager", "--steps", "5", "--classes", "1",
                 "-o", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    steps = [m for s in err.splitlines() if (m := STEP_LINE.match(s))]
    assert [m["i"] for m in steps] == ["0", "1", "2", "3", "4", "5"] and steps[0]["label"] == "ddim 5 steps"
    assert "\r" not in err


def test_bench_reports_progress_and_json_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DYC_PROGRESS_INTERVAL", "0")
    code = main(["bench", str(_ckpt(tmp_path)), "--backends", "eager", "--batch", "1", "--steps", "2",
                 "--repeats", "1", "--json", "-o", str(tmp_path / "r" / "b.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(out)  # --json: the report on stdout, nothing else
    assert rep["steps"] == 2 and [r["backend"] for r in rep["rows"]][:1] == ["eager"]
    assert json.loads((tmp_path / "r" / "b.json").read_text()) == rep  # -o: the same report in a file
    labels = {m["label"]: m["n"] for s in err.splitlines() if (m := STEP_LINE.match(s))}
    assert labels.get("eager: warm-up, check, 1 timed passes") == "4"  # 2 warm-up + 1 x 2 timed steps
    assert any(k.startswith("step inputs:") for k in labels)
    # without --json: the table on stdout
    code = main(["bench", str(tmp_path / "m.safetensors"), "--backends", "eager", "--batch", "1", "--steps", "2",
                 "--repeats", "1"])
    out, _ = capsys.readouterr()
    assert code == 0 and out.splitlines()[1].split()[:2] == ["backend", "ms/step"]


def test_compile_log_lines_carry_elapsed_time(tmp_path, capsys):
    code = main(["compile", str(_ckpt(tmp_path)), "--groups", "2", "--calib", "1", "--calib-steps", "3",
                 "-o", str(tmp_path / "m.dyc")])
    _, err = capsys.readouterr()
    assert code == 0, err
    lines = err.splitlines()
    assert lines and all(re.match(r"^\[ *[\d.:]+ (s|min|h)\] ", s) for s in lines), err
    assert any("calibration: step 2/3" in s and "ETA" in s for s in lines), err
