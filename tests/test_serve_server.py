"""``dyc serve`` for real: Triton Inference Server (PyTriton's binary) on free ports, driven by tritonclient.

Many concurrent HTTP and gRPC clients; every result against ``dyc.Pipeline`` on that request alone.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from serve_fixtures import (
    ServerProcess,
    assert_matches,
    digits_bundle,
    free_ports,
    numpy_dir,
    reference,
    stub_processes,
)

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]")
pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")

from dyc.errors import DycError  # noqa: E402
from dyc.serve.client import Client  # noqa: E402

MAX_BATCH = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    # --stub-numpy: the stub takes numpy from its own folder (what a numpy-2 machine needs; here the
    # folder links this environment's numpy 1, and the test checks that the stubs loaded it from there)
    srv = ServerProcess(digits_bundle(), d / "serve.log", "--max-batch", str(MAX_BATCH), "--deadline-ms", "30",
                        "--max-inflight", "6", "--stub-numpy", str(numpy_dir(d / "np1")))
    try:
        srv.wait_ready()
        srv.stub_numpy = d / "np1"
        yield srv
    finally:
        rc = srv.stop()
        # a clean stop on SIGTERM: "stopping" logged, exit 0 (None: it had to be killed)
        assert rc == 0, f"dyc serve did not stop cleanly (exit {rc}):\n{srv.log_tail()}"


def run_threads(fns):
    """Run each callable in its own thread at once; their results (or exceptions) in order."""
    out = [None] * len(fns)
    start = threading.Barrier(len(fns))

    def go(i):
        start.wait()
        try:
            out[i] = fns[i]()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            out[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return out


# (classes, seed, steps, sampler, cfg): few steps, mixed samplers and guidance
JOBS = [((3, 7), 0, 8, "ddim", 4.0), ((1,), 5, 6, "dpm-solver++", 4.0), ((0, 2, 4), 9, 10, "ddim", 1.0),
        ((9,), 1, 7, "ddpm", 2.5), ((5,), 2, 8, "ddim", 4.0), ((6, 6), 3, 9, "dpm-solver++", 1.0),
        ((8,), 4, 6, "ddim", 4.0), ((2, 3), 6, 10, "ddpm", 4.0), ((4,), 7, 8, "dpm-solver++", 3.0),
        ((7,), 8, 9, "ddim", 1.5), ((1, 1), 10, 7, "ddim", 4.0), ((0,), 11, 8, "ddpm", 1.0)]


def ask(url, job):
    classes, seed, steps, sampler, cfg = job
    with Client(url, timeout_s=120) as c:
        return c.generate(classes, seed=seed, steps=steps, sampler=sampler, cfg=cfg)


def test_concurrent_clients_get_their_own_results(server):
    with Client(server.http_url) as c:
        before = c.stats()
    urls = [server.http_url if i % 2 else server.grpc_url for i in range(len(JOBS))]
    results = run_threads([lambda u=u, j=j: ask(u, j) for u, j in zip(urls, JOBS, strict=True)])
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors
    for job, got in zip(JOBS, results, strict=True):  # none lost, each its own
        classes, seed, steps, sampler, cfg = job
        assert_matches(got, reference(classes, seed=seed, steps=steps, sampler=sampler, cfg=cfg))
    with Client(server.grpc_url) as c:
        stats = c.stats()
    assert stats["requests_done"] - before["requests_done"] == len(JOBS)
    assert stats["requests_failed"] == before["requests_failed"]
    # the batcher really batched: engine calls carried rows of several requests, at several t
    assert stats["multi_request_calls"] > before["multi_request_calls"]
    assert stats["calls"] - before["calls"] < sum(j[2] for j in JOBS)
    assert stats["max_requests_per_call"] >= 2


def test_stubs_take_numpy_from_the_stub_folder(server):
    stubs = stub_processes(server.proc.pid)
    assert len(stubs) >= 7  # 6 instances of dyc, 1 of dyc_stats
    for pid in stubs:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert f"{server.stub_numpy}/numpy/" in maps, pid


def test_png_output_is_the_pipelines_image(server):
    from PIL import Image

    from dyc.runtime.pipeline import to_images

    with Client(server.grpc_url) as c:
        pngs = c.generate([3, 8], seed=4, steps=6, cfg=4.0, format="png")
    want = to_images(reference((3, 8), seed=4, steps=6))
    assert len(pngs) == 2
    for data, im in zip(pngs, want, strict=True):
        got = np.asarray(Image.open(io.BytesIO(data)))
        assert got.shape == im.shape[:2] and got.dtype == np.uint8
        assert np.abs(got.astype(int) - im[..., 0].astype(int)).max() <= 1  # rounding of ≤ 1e-5 differences


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_a_clear_error_and_the_server_goes_on(server, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    cases = [
        (dict(classes=[12]), "the server refused the request: class id 12 is out of range: this model has classes"),
        (dict(classes=[1], steps=0), "steps must be positive"),
        (dict(classes=[1], sampler="euler"), "unknown sampler 'euler'"),
        (dict(classes=[1], cfg=float("nan")), "cfg must be a finite number"),
        (dict(classes=[1], format="jpeg"), "format 'jpeg' is not one of latents, png"),
        (dict(classes=list(range(9))), f"more than this server's --max-batch {MAX_BATCH}"),
        (dict(classes=[]), "class_ids must be a non-empty"),
    ]
    with Client(url, timeout_s=60) as c:
        for kw, message in cases:
            classes = kw.pop("classes")
            with pytest.raises(DycError) as e:
                c.generate(classes, **{"steps": 5, **kw})
            text = str(e.value)
            assert message in text and "\n" not in text, text
        assert_matches(c.generate([2], seed=3, steps=5), reference((2,), seed=3, steps=5))  # still serving


def test_raw_tritonclient_sees_the_message(server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    with th.InferenceServerClient(server.http_url) as c:
        i = th.InferInput("class_ids", [1], "INT64")
        i.set_data_from_numpy(np.array([42], dtype=np.int64))
        with pytest.raises(InferenceServerException) as e:
            c.infer("dyc", [i])
        assert "BadRequest: class id 42 is out of range" in e.value.message()
        j = th.InferInput("class_ids", [1], "FP32")  # a wrong type never reaches dyc: Triton refuses it
        j.set_data_from_numpy(np.array([1.0], dtype=np.float32))
        with pytest.raises(InferenceServerException, match="class_ids"):
            c.infer("dyc", [j])


def test_disconnecting_clients_do_not_hurt_others(server):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    def long_inputs(mod):
        ins = []
        for name, arr, dt in (("class_ids", np.array([1, 2], np.int64), "INT64"),
                              ("steps", np.array([300], np.int32), "INT32")):
            i = mod.InferInput(name, list(arr.shape), dt)
            i.set_data_from_numpy(arr)
            ins.append(i)
        return ins

    def http_gives_up():  # the client times out and closes its connection mid-request
        c = th.InferenceServerClient(server.http_url, network_timeout=0.5, connection_timeout=0.5)
        try:
            c.infer("dyc", long_inputs(th))
        finally:
            c.close()

    def grpc_gives_up():  # the gRPC deadline passes: the call is cancelled
        with tg.InferenceServerClient(server.grpc_url.removeprefix("grpc://")) as c:
            c.infer("dyc", long_inputs(tg), client_timeout=0.5)

    jobs = JOBS[:4]
    fns = [http_gives_up, grpc_gives_up] + [lambda j=j, k=k: ask(server.http_url if k % 2 else server.grpc_url, j)
                                            for k, j in enumerate(jobs)]
    t0 = time.monotonic()
    results = run_threads(fns)
    assert all(isinstance(r, Exception) for r in results[:2]), results[:2]  # both gave up
    assert time.monotonic() - t0 < 120
    for job, got in zip(jobs, results[2:], strict=True):
        assert not isinstance(got, Exception), got
        classes, seed, steps, sampler, cfg = job
        assert_matches(got, reference(classes, seed=seed, steps=steps, sampler=sampler, cfg=cfg))
    # the server keeps serving, over both protocols
    assert_matches(ask(server.http_url, JOBS[4]), reference((5,), seed=2, steps=8))
    assert_matches(ask(server.grpc_url, JOBS[6]), reference((8,), seed=4, steps=6))


def test_query_command_writes_the_images(server, tmp_path, capsys):
    from PIL import Image

    from dyc.cli import main
    from dyc.runtime.pipeline import to_images

    out = tmp_path / "q"
    assert main(["query", "--url", f"http://{server.http_url}", "--classes", "3,7", "--seed", "0", "--steps", "6",
                 "-o", str(out)]) == 0, capsys.readouterr().err
    meta = json.loads((out / "query.json").read_text())
    assert meta["files"] == ["0000_class3.png", "0001_class7.png"]
    want = to_images(reference((3, 7), seed=0, steps=6))
    for name, im in zip(meta["files"], want, strict=True):
        got = np.asarray(Image.open(out / name))
        assert np.abs(got.astype(int) - im[..., 0].astype(int)).max() <= 1
    assert main(["query", "--url", server.grpc_url, "--classes", "5", "--steps", "5", "--format", "latents",
                 "-o", str(out)]) == 0
    assert_matches(np.load(out / "latents.npy"), reference((5,), seed=0, steps=5))


def test_query_errors_are_one_line(server, tmp_path, capsys):
    from dyc.cli import main

    out = str(tmp_path / "q")
    assert main(["query", "--url", server.http_url, "--classes", "3,99", "--steps", "5", "-o", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused the request: class id 99 is out of range" in err, err
    assert main(["query", "--url", "127.0.0.1:1", "--classes", "3", "--steps", "5", "-o", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach dyc serve at 127.0.0.1:1" in err, err


def test_serve_refuses_bad_options_before_starting(tmp_path, capsys):
    import socket

    from dyc.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(digits_bundle()), "--host", "127.0.0.1", "--http-port", str(port)]) == 1
        assert f"--http-port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    # exit 2: a bad option value; 1: input or environment (README's exit codes)
    for args, message, code in ((["--max-batch", "0"], "--max-batch must be at least 1", 2),
                                (["--grpc-port", "8000", "--http-port", "8000"], "must differ", 2),
                                ([str(tmp_path / "missing.dyc")], "missing.dyc: no such bundle or checkpoint", 1),
                                (["--stub-numpy", str(tmp_path)], "no numpy in it", 1)):
        ports = [f"--{k}-port={v}" for k, v in zip(("http", "grpc", "metrics"), free_ports(3), strict=True)]
        assert main(["serve", "--host", "127.0.0.1", *ports, *args]) == code, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


# ---- starting Triton: PyTriton's stub handshake race is retried, other load failures are clear --------
RACE = ("load failed for model 'dyc': Model initialize error: File \"model.py\", line 425, in initialize "
        "get_config_from_handshake_server(handshake_socket) ConnectionRefusedError: [Errno 111] Connection refused")


class FakeTriton:
    """Stands in for pytriton.triton.Triton: run() raises the next scripted failure, if any."""

    def __init__(self, script: list, made: list):
        self.script, self.stopped = script, False
        made.append(self)

    def run(self):
        if self.script:
            raise self.script.pop(0)

    def stop(self):
        self.stopped = True


def test_start_retries_the_stub_handshake_race_only():
    from tritonclient.utils import InferenceServerException

    from dyc.serve.server import start_triton

    made, logs = [], []
    script = [InferenceServerException(RACE), InferenceServerException(RACE)]
    t = start_triton(lambda: FakeTriton(script, made), logs.append, attempts=3)
    assert t is made[-1] and len(made) == 3 and not t.stopped
    assert all(m.stopped for m in made[:-1]) and len(logs) == 2 and "handshake race" in logs[0]

    made.clear()
    script = [InferenceServerException(RACE)] * 3
    with pytest.raises(DycError, match="could not load the model: .*Connection refused"):
        start_triton(lambda: FakeTriton(script, made), logs.append, attempts=3)
    assert len(made) == 3 and all(m.stopped for m in made)

    made.clear()  # any other load failure: no retry, one clear line
    script = [InferenceServerException("load failed for model 'dyc': version 1 is at UNAVAILABLE state\n  detail")]
    with pytest.raises(DycError, match=r"^Triton Inference Server could not load the model: load failed .* detail$"):
        start_triton(lambda: FakeTriton(script, made), logs.append)
    assert len(made) == 1 and made[0].stopped
