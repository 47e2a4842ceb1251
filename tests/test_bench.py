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
                 "-o", str(tmp_path / "b.json")])
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


def test_bundle_row_is_checked_against_eager_in_its_own_dtype(tmp_path, monkeypatch):
    """An fp16 bundle row is compared with fp16 eager (not the benchmark's fp32): an exact fp16 twin scores 0."""
    import copy

    import torch

    from dyc import bench as B
    from dyc.checkpoint import load_checkpoint

    path = save_checkpoint(random_model(tiny_config(depth=2), seed=0, router_scale=3.0), tmp_path / "m.safetensors")
    model16 = copy.deepcopy(load_checkpoint(path).model).to(torch.float16)

    def fake_bundle_runner(name, bundle_path, ckpt, setup):
        def call(x, t, y):
            tt = torch.full((x.shape[0],), t)
            return model16(x.to(torch.float16), tt, y, tdw_masks=masks(t, x.shape[0]))

        def masks(t, b):
            hm, cm = model16.tdw_masks(torch.full((1,), t))
            return hm.float().expand(b, -1, -1), cm.float().expand(b, -1, -1)

        r = B._Runner(name, call, lambda t: 1.0)
        r.tdw_masks, r.dtype = masks, "fp16"
        return r

    monkeypatch.setattr(B, "_bundle_runner", fake_bundle_runner)
    rep = run_bench(path, backends=["eager", "onnxruntime"], batch=1, steps=4, repeats=1, dtype="fp32", bundle="x")
    row = {r["backend"]: r for r in rep["rows"]}["onnxruntime"]
    assert row["dtype"] == "fp16" and row["status"] == "ok"
    assert row["rel_l2_err"] == 0.0  # against fp32 eager this twin would be ~1e-3 off
