"""The TensorRT runtime's own code path, with only engine deserialisation/execution stood in for.

No TensorRT in this workplace can execute a plan (TensorRT-RTX refuses CPUs and compute capability
9.0; the GPU machine has no datacenter TensorRT). So ``FakeTrt`` below provides the few TensorRT
runtime objects the backend talks to, driven by the real plans and the real engine manifest that
TensorRT-RTX built: ``deserialize_cuda_engine`` finds a plan by its sha256 in the manifest and
reports the IO tensors and profiles the real parser recorded; ``execute_async_v3`` (the ``execute``
boundary) runs a per-group stand-in computation on the memory the backend bound, through the
activation buffer it was given. Everything of dyc's is real: manifest checks, one context per engine,
the shared activation buffer, binding torch memory, CUDA-graph capture and replay (on a CUDA device),
and switching engines along a sampler's schedule.

On the CPU the backend runs with ``DYC_EXECUTES_ON_HOST`` set by the stand-in (graphs are CUDA-only);
on a CUDA device everything including capture/replay runs. Engines: built here with TensorRT-RTX,
or, where it is not installed (the GPU machine), a bundle with engines at ``$DYC_TRT_TEST_BUNDLE``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorrt_helpers import compile_tiny, copy_bundle

from dyc.bundle import Bundle
from dyc.errors import DycError
from dyc.tensorrt.common import import_trt, read_trt_manifest, trt_manifest_path, write_trt_manifest
from dyc.tensorrt.runtime import TensorRTBackend, rtx_runs_on

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
_CT = {torch.float32: ctypes.c_float, torch.float16: ctypes.c_uint16, torch.int64: ctypes.c_int64,
       torch.int32: ctypes.c_int32}
_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.int64: "<i8", torch.int32: "<i4"}
_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "INT64": torch.int64, "INT32": torch.int32}


# ---- the stand-in for TensorRT's runtime objects ------------------------------------------------
def view(ptr: int, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor over memory the backend bound by address (zero-copy), as an engine would see it."""
    shape = tuple(int(s) for s in shape)
    if device.type == "cuda":
        cai = SimpleNamespace(__cuda_array_interface__={"data": (ptr, False), "shape": shape,
                                                        "typestr": _TYPESTR[dtype], "version": 3, "strides": None})
        return torch.as_tensor(cai, device=device)
    arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(_CT[dtype])), shape)
    if dtype == torch.float16:
        arr = arr.view(np.float16)
    return torch.from_numpy(arr)


def stand_in(group: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, masks: list[torch.Tensor],
             scratch: torch.Tensor) -> torch.Tensor:
    """What a group's stand-in engine computes: different per group, depends on every input."""
    scratch[: x.numel()].copy_(x.reshape(-1).float())  # through the activation memory it was given
    base = scratch[: x.numel()].view(x.shape)
    msum = sum((m.float().sum(dim=(1, 2)) for m in masks), torch.zeros_like(t, dtype=torch.float32))
    eps = base * (group + 1) + (t.float() / 1000)[:, None, None, None]
    var = base * 0 + (y.float() + msum)[:, None, None, None]
    return torch.cat([eps, var], dim=1)


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy):
        self.engine, self.strategy = engine, strategy
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, ptr: int, size: int) -> None:
        assert size >= self.engine.device_memory_size_v2
        self.memory = (ptr, size)

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        assert lo[0] <= shape[0] <= hi[0] and list(shape[1:]) == list(hi[1:]), (name, shape)
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str):
        out = next(o for o in self.engine.entry["outputs"] if o["name"] == name)
        return (self.shapes["x"][0], *out["shape"][1:])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def is_stream_capturable(self, stream: int) -> bool:
        return self.engine.group not in self.engine.trt.uncapturable

    def execute_async_v3(self, stream: int) -> bool:
        """The execute boundary: the only thing that stands in for TensorRT's work."""
        e, trt = self.engine, self.engine.trt
        trt.executed.append(e.group)
        dev = trt.device
        b = self.shapes["x"][0]
        ins = {n: view(self.addresses[n], self.shapes[n], _TORCH[d], dev) for n, d in e.input_dtypes.items()}
        out = view(self.addresses["out"], self.get_tensor_shape("out"), _TORCH[e.output_dtype], dev)
        scratch = view(self.memory[0], (self.memory[1] // 4,), torch.float32, dev)
        ctx = torch.cuda.stream(torch.cuda.ExternalStream(stream)) if dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            masks = [ins[n] for n in ("head_mask", "channel_mask") if n in ins]
            out.copy_(stand_in(e.group, ins["x"], ins["t"], ins["y"], masks, scratch).to(out.dtype))
        assert out.shape[0] == b
        return True


class FakeEngine:
    def __init__(self, trt: FakeTrt, entry: dict):
        self.trt, self.entry, self.group = trt, entry, int(entry["group"])
        self.io = [(i["name"], "INPUT") for i in entry["inputs"]] + [(o["name"], "OUTPUT") for o in entry["outputs"]]
        self.input_dtypes = {i["name"]: i["dtype"] for i in entry["inputs"]}
        self.output_dtype = entry["outputs"][0]["dtype"]
        x = next(i for i in entry["inputs"] if i["name"] == "x")
        per_sample = int(np.prod(x["shape"][1:]))
        # distinct sizes per engine, each enough for the stand-in's use of it at the largest batch
        self.device_memory_size_v2 = 4 * per_sample * x["profile"]["max"][0] * (1 + self.group)
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def get_tensor_mode(self, name: str):
        return dict(self.io)[name]

    def get_tensor_dtype(self, name: str):
        d = {**self.input_dtypes, **{o["name"]: o["dtype"] for o in self.entry["outputs"]}}[name]
        return SimpleNamespace(name=d)

    def get_tensor_profile_shape(self, name: str, profile: int):
        p = next(i for i in self.entry["inputs"] if i["name"] == name)["profile"]
        return p["min"], p["opt"], p["max"]

    def create_execution_context(self, strategy):
        ctx = FakeContext(self, strategy)
        self.trt.contexts.append(ctx)
        return ctx


class FakeTrt:
    """Just the TensorRT runtime API the backend uses; plans are looked up by sha256 in the manifest."""

    DYC_EXECUTES_ON_HOST = True
    TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    ExecutionContextAllocationStrategy = SimpleNamespace(STATIC="STATIC", USER_MANAGED="USER_MANAGED")

    class ILogger:
        Severity = SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3)

        def __init__(self):
            pass

    def __init__(self, manifest: dict, device: torch.device, uncapturable: tuple[int, ...] = ()):
        import hashlib

        self.__version__ = manifest["tensorrt_version"]
        self.entries = {e["sha256"]: e for e in manifest["engines"]}
        self._sha = hashlib.sha256
        self.device = device
        self.uncapturable = set(uncapturable)
        self.contexts: list[FakeContext] = []
        self.executed: list[int] = []

    def Runtime(self, logger):  # noqa: N802 - TensorRT's name
        trt = self

        class R:
            def deserialize_cuda_engine(self, plan: bytes):
                entry = trt.entries.get(trt._sha(plan).hexdigest())
                return None if entry is None else FakeEngine(trt, entry)

        return R()


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines_bundle(tmp_path_factory) -> Path:
    """A tiny fp16 bundle with engines built by TensorRT-RTX (here, or prebuilt elsewhere)."""
    pre = os.environ.get("DYC_TRT_TEST_BUNDLE")
    try:
        import_trt("tensorrt_rtx")
    except DycError:
        if not pre:
            pytest.skip("needs TensorRT-RTX to build engines, or $DYC_TRT_TEST_BUNDLE with prebuilt ones")
        return copy_bundle(Path(pre), tmp_path_factory.mktemp("pre"))
    from dyc.tensorrt.build import build_engines

    path = compile_tiny(tmp_path_factory.mktemp("rt"), "fp16")
    build_engines(path, batch_sizes="1,4", flavor="tensorrt_rtx")
    return path


def as_datacenter(path: Path, fake_version: str, device: torch.device) -> dict:
    """Relabel the engines as datacenter TensorRT ones built for this GPU (the stand-in executes them)."""
    m = read_trt_manifest(path)
    m["flavor"], m["tensorrt_version"] = "tensorrt", fake_version
    m["target_compute_capabilities"] = (["{}.{}".format(*torch.cuda.get_device_capability(device))]
                                        if device.type == "cuda" else None)
    write_trt_manifest(path, m)
    return m


@pytest.fixture
def fake_bundle(engines_bundle, tmp_path, request):
    device = torch.device(request.param)
    path = copy_bundle(engines_bundle, tmp_path)
    m = as_datacenter(path, "10.99.0-fake", device)
    return Bundle.load(path), m, device


def feeds_for(bundle: Bundle, t: int, batch: int, device, gen: torch.Generator) -> tuple[int, dict]:
    g = bundle.group_for_t(t)
    f = {"x": torch.randn(batch, 4, 8, 8, generator=gen).to(torch.float16),
         "t": torch.full((batch,), t, dtype=torch.int64), "y": torch.randint(0, 11, (batch,), generator=gen)}
    f.update({k: torch.from_numpy(v).to(torch.float16) for k, v in bundle.mask_inputs(t, batch).items()})
    return g.index, {k: v.to(device) for k, v in f.items()}


def expected(group: int, f: dict) -> torch.Tensor:
    x = f["x"].float().cpu()
    masks = [f[n].cpu() for n in ("head_mask", "channel_mask") if n in f]
    scratch = torch.empty(x.numel())
    return stand_in(group, x, f["t"].cpu(), f["y"].cpu(), masks, scratch).to(torch.float16)


# ---- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fake_bundle", DEVICES, indirect=True)
def test_contexts_share_one_activation_buffer(fake_bundle):
    bundle, m, device = fake_bundle
    trt = FakeTrt(m, device)
    be = TensorRTBackend(bundle, device=device, trt=trt)
    assert len(be.engines) == len(trt.contexts) == len(bundle.groups)  # one context per engine
    assert {c.strategy for c in trt.contexts} == {"USER_MANAGED"}
    sizes = [c.engine.device_memory_size_v2 for c in trt.contexts]
    assert len(set(sizes)) == len(sizes) > 1
    assert be.activation_bytes == max(sizes) and be.activations.numel() == max(sizes)
    assert {c.memory for c in trt.contexts} == {(be.activations.data_ptr(), max(sizes))}
    be.close()


@pytest.mark.parametrize("fake_bundle", DEVICES, indirect=True)
def test_switches_engines_along_a_schedule(fake_bundle):
    bundle, m, device = fake_bundle
    trt = FakeTrt(m, device)
    be = TensorRTBackend(bundle, device=device, trt=trt, warmup=1)
    gen = torch.Generator().manual_seed(0)
    groups_seen, calls, eager = [], {}, []
    for t in reversed(bundle.schedule):  # sampling order: t high -> low
        for batch in (4, 8):  # a sampler batch and its CFG double
            gi, f = feeds_for(bundle, t, batch, device, gen)
            out = be.run_group(gi, f)
            torch.testing.assert_close(out.cpu(), expected(gi, f), rtol=1e-3, atol=1e-3)
            groups_seen.append(gi)
            calls[(gi, batch)] = calls.get((gi, batch), 0) + 1
            n = calls[(gi, batch)]
            # CUDA: 1st call warm-up; 2nd runs once more and is recorded into the graph (the capture calls
            # execute too); later calls replay the graph without executing the engine
            eager += [gi] if device.type != "cuda" or n == 1 else [gi, gi] if n == 2 else []
    assert set(groups_seen) == {g.index for g in bundle.groups}  # the schedule visits every group
    assert groups_seen == [bundle.group_for_t(t).index for t in reversed(bundle.schedule) for _ in (4, 8)]
    if device.type == "cuda":
        # the engine is executed 3 times per (group, batch), yet every replayed step above gave the right
        # output for its new inputs: the graph replays the recorded kernels on the static buffers
        assert be.stats["captures"] == sum(1 for n in calls.values() if n >= 2)
        assert be.stats["replays"] == sum(max(n - 2, 0) for n in calls.values()) > 0
        assert all(v == (calls[k] >= 2) for k, v in be.graph_status().items())
    else:
        assert be.stats["replays"] == 0  # no graphs on the CPU
    assert trt.executed == eager and be.stats["executes"] == len(eager)
    be.close()


@pytest.mark.parametrize("fake_bundle", DEVICES, indirect=True)
def test_pipeline_switches_engines_as_the_scheduler_says(fake_bundle):
    """dyc.Pipeline's scheduler drives the backend: DDIM with CFG, engine per step as the manifest says."""
    from dyc.runtime.pipeline import Pipeline, bundle_scheduler

    bundle, m, device = fake_bundle
    trt = FakeTrt(m, device)
    be = TensorRTBackend(bundle, device=device, trt=trt)
    pipe = Pipeline(be, bundle_scheduler(bundle), bundle.config, dtype=bundle.dtype, bundle=bundle)
    out = pipe([1, 7], sampler="ddim", steps=20, cfg=4.0, seed=0)
    groups = [bundle.group_for_t(s.t).index for s in out.trace]
    assert [s.group for s in out.trace] == groups and len(set(groups)) == len(bundle.groups)
    assert {b for (_, b) in be.graph_status()} == {4}  # 2 images, doubled by CFG
    if device.type == "cpu":
        assert trt.executed == groups
    else:  # each engine runs eagerly twice and is recorded once; the rest of its steps are graph replays
        assert be.stats["replays"] == sum(max(groups.count(g) - 2, 0) for g in set(groups))
    be.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("fake_bundle", ["cuda"], indirect=True)
def test_graph_replay_reads_new_inputs_and_uncapturable_stays_eager(fake_bundle):
    bundle, m, device = fake_bundle
    trt = FakeTrt(m, device, uncapturable=(0,))
    be = TensorRTBackend(bundle, device=device, trt=trt, warmup=1)
    gen = torch.Generator().manual_seed(1)
    g1 = bundle.groups[-1]
    for _ in range(5):
        gi, f = feeds_for(bundle, g1.t_lo, 4, device, gen)
        torch.testing.assert_close(be.run_group(gi, f).cpu(), expected(gi, f), rtol=1e-3, atol=1e-3)
    # warm-up, pre-capture run, capture; the three replays executed nothing yet gave fresh outputs
    assert be.graph_status()[(g1.index, 4)] and trt.executed.count(g1.index) == 3 and be.stats["replays"] == 3
    for _ in range(4):
        gi, f = feeds_for(bundle, bundle.groups[0].t_lo, 4, device, gen)
        torch.testing.assert_close(be.run_group(gi, f).cpu(), expected(gi, f), rtol=1e-3, atol=1e-3)
    assert not be.graph_status()[(0, 4)] and trt.executed.count(0) == 4
    assert "not stream-capturable" in be.engines[0].graph_note
    be.close()


@pytest.mark.parametrize("fake_bundle", ["cpu"], indirect=True)
def test_batch_outside_profile_and_missing_inputs(fake_bundle):
    bundle, m, device = fake_bundle
    be = TensorRTBackend(bundle, device=device, trt=FakeTrt(m, device))
    gen = torch.Generator().manual_seed(0)
    gi, f = feeds_for(bundle, 500, 9, device, gen)  # engines cover 1..8 (batch sizes 1,4 with CFG)
    with pytest.raises(DycError, match=r"batch 9 is outside .*1\.\.8.*dyc build-engines"):
        be.run_group(gi, f)
    gi, f = feeds_for(bundle, 500, 2, device, gen)
    del f["y"]
    with pytest.raises(DycError, match="needs inputs"):
        be.run_group(gi, f)


# ---- refusing plans that cannot load ------------------------------------------------------------
@pytest.mark.parametrize("fake_bundle", ["cpu"], indirect=True)
def test_refuses_incompatible_or_altered_engines(fake_bundle):
    bundle, m, device = fake_bundle
    path = bundle.path

    def load(**kw):
        return TensorRTBackend(Bundle.load(path), device=device, trt=FakeTrt(m, device), **kw)

    other = dict(m, tensorrt_version="10.0.0")
    write_trt_manifest(path, other)
    with pytest.raises(DycError, match=r"built with tensorrt 10\.0\.0 but this is tensorrt 10\.99.*dyc build-engines"):
        load()
    write_trt_manifest(path, dict(m, bundle_manifest_sha256="0" * 64))
    with pytest.raises(DycError, match="earlier compile of this bundle.*dyc build-engines"):
        load()
    write_trt_manifest(path, m)
    with pytest.raises(DycError, match="built with tensorrt, not tensorrt_rtx"):
        load(flavor="tensorrt_rtx")
    plan = path / m["engines"][1]["plan"]
    data = bytearray(plan.read_bytes())
    data[-1] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(DycError, match="does not match its engine manifest.*dyc build-engines"):
        load()
    trt_manifest_path(path).unlink()
    with pytest.raises(DycError, match="has no TensorRT engines.*dyc build-engines"):
        load()


def test_refuses_cpu_with_a_real_tensorrt(engines_bundle, tmp_path):
    try:
        trt, _ = import_trt("tensorrt_rtx")
    except DycError:
        pytest.skip("TensorRT-RTX is not installed")
    b = Bundle.load(copy_bundle(engines_bundle, tmp_path))
    with pytest.raises(DycError, match="run on CUDA devices, not cpu"):
        TensorRTBackend(b, device="cpu")


def test_real_rtx_validity_check_refuses_here(engines_bundle, tmp_path):
    """TensorRT-RTX's header check on this machine (no GPU): the load stops with a rebuild hint."""
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU refusal")
    try:
        trt, _ = import_trt("tensorrt_rtx")
    except DycError:
        pytest.skip("TensorRT-RTX is not installed")
    path = copy_bundle(engines_bundle, tmp_path)
    b = Bundle.load(path)
    m = read_trt_manifest(path)
    be = TensorRTBackend.__new__(TensorRTBackend)
    be.bundle, be.manifest, be.trt, be._logger_errors = b, m, trt, []
    be._runtime = trt.Runtime(be._make_logger())
    with pytest.raises(DycError, match="cannot run here: .*dyc build-engines"):
        be._load_engine(0, m["engines"][0], "rebuild: dyc build-engines", True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with this GPU's compute capability")
def test_rtx_plans_refused_on_this_gpu_when_unsupported(engines_bundle, tmp_path):
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    path = copy_bundle(engines_bundle, tmp_path)
    m = read_trt_manifest(path)
    fake = FakeTrt(m, torch.device("cuda"))
    if rtx_runs_on(cc, m["target_compute_capabilities"]):
        pytest.skip(f"TensorRT-RTX's default targets include this GPU ({cc})")
    with pytest.raises(DycError, match=rf"this GPU .* is {cc}.*dyc build-engines"):
        TensorRTBackend(Bundle.load(path), device="cuda", trt=fake)


def test_rtx_target_rules():
    assert rtx_runs_on("8.6", None) and rtx_runs_on("12.0", None) and rtx_runs_on("8.0", None)
    assert not rtx_runs_on("9.0", None) and not rtx_runs_on("7.5", None)
    assert rtx_runs_on("7.5", ["7.5"]) and not rtx_runs_on("8.9", ["8.6"])


def test_backend_registry_reports_why_not(monkeypatch):
    from dyc.backends import get_backend

    ok, why = TensorRTBackend.available()
    if ok:
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(DycError, match="cannot run here|needs"):
        get_backend("tensorrt")
    assert why


def test_manifest_roundtrip_is_atomic(tmp_path):
    m = {"schema_version": 1, "flavor": "tensorrt_rtx", "engines": []}
    p = write_trt_manifest(tmp_path, m)
    assert json.loads(p.read_text()) == m and oct(p.stat().st_mode & 0o777) == "0o644"
    assert [q.name for q in p.parent.iterdir()] == ["trt_manifest.json"]
    p.write_text("{")
    with pytest.raises(DycError, match="not valid JSON"):
        read_trt_manifest(tmp_path)
    shutil.rmtree(p.parent)


@pytest.mark.parametrize("fake_bundle", ["cpu"], indirect=True)
def test_plans_are_read_once_and_deserialised_as_checked(fake_bundle, monkeypatch):
    """A rebuild that replaces a plan right after its check cannot slip in: the engine comes from the
    very bytes whose sha256 was checked (the stand-in resolves engines by the sha256 of what it gets)."""
    import dyc.tensorrt.runtime as rt

    bundle, m, device = fake_bundle
    reads = []
    read = rt.read_bytes

    def read_then_replace(path, what="file"):
        data = read(path, what)
        reads.append(Path(path).name)
        Path(path).write_bytes(b"rebuilt meanwhile")  # a concurrent rebuild, just after the read
        return data

    monkeypatch.setattr(rt, "read_bytes", read_then_replace)
    be = TensorRTBackend(bundle, device=device, trt=FakeTrt(m, device))
    assert sorted(reads) == sorted(Path(e["plan"]).name for e in m["engines"])  # each plan read once
    assert len(be.engines) == len(bundle.groups)
