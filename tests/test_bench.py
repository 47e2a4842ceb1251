"""dyc bench on the CPU: every requested row is reported, compiled rows are checked before timing."""

import json

from conftest import random_model, tiny_config

from dyc.bench import format_report, run_bench
from dyc.checkpoint import save_checkpoint
from dyc.cli import main


def test_bench_reports_every_row(tmp_path, capsys):
    path = save_checkpoint(random_model(tiny_config(depth=2), seed=0, router_scale=3.0), tmp_path / "m.safetensors")
    rep = run_bench(path, backends=["eager", "eager-dydit", "torch", "onnxruntime", "tensorrt"], batch=1,
                    steps=4, repeats=1, calib=1)
    rows = {r["backend"]: r for r in rep["rows"]}
    assert set(rows) == {"eager", "eager-dydit", "torch-static", "torch", "onnxruntime", "tensorrt"}
    assert rows["torch"]["status"] == "ok"
    assert rows["torch"]["max_rel_err"] < 1e-4 and rows["torch"]["rel_l2_err"] < 1e-4
    assert rows["torch"]["gflops_per_step"] < rep["static_gflops"]  # sliced groups do less work
    assert rows["torch"]["flops_ideal"] > 1.0
    assert len(rows["eager"]["step_ms_per_t"]) == 4
    assert rows["tensorrt"]["status"] != "ok"  # reported with its reason, not dropped
    assert "tensorrt" in format_report(rep)
    code = main(["bench", str(path), "--backends", "eager,torch", "--batch", "1", "--steps", "2", "--repeats", "1",
                 "--json", str(tmp_path / "b.json")])
    assert code == 0
    assert json.loads((tmp_path / "b.json").read_text())["steps"] == 2
    capsys.readouterr()


def test_bench_bundle_rows_run_through_the_runtime_backends(tmp_path):
    from dyc.compiler.compile import compile_checkpoint

    path = save_checkpoint(random_model(tiny_config(depth=2), seed=0, router_scale=3.0), tmp_path / "m.safetensors")
    b = compile_checkpoint(path, tmp_path / "m.dyc", groups=2, calib=1, calib_steps=2).path
    rep = run_bench(path, backends=["eager", "onnxruntime", "tensorrt"], batch=1, steps=4, repeats=1, calib=1,
                    bundle=b)
    rows = {r["backend"]: r for r in rep["rows"]}
    assert rows["onnxruntime"]["status"] == "ok" and rows["onnxruntime"]["rel_l2_err"] < 1e-4
    assert rows["onnxruntime"]["gflops_per_step"] < rep["static_gflops"]
    assert rows["tensorrt"]["step_ms"] is None and rows["tensorrt"]["status"]  # no GPU: reported, with why
