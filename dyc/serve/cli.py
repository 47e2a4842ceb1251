"""``dyc serve`` (a bundle behind Triton Inference Server) and ``dyc query`` (ask it for samples)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from ..backends import backend_names
from ..errors import DycError, UsageError
from ..timesteps import SAMPLERS


@click.command("serve")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--backend", default="onnxruntime", show_default=True, help=f"One of {', '.join(backend_names())}.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's own).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the HTTP and gRPC services bind to.")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Triton's Prometheus metrics.")
@click.option("--max-batch", type=int, default=64, show_default=True,
              help="Rows per engine call at most (CFG takes two rows per image).")
@click.option("--deadline-ms", type=float, default=50.0, show_default=True,
              help="A ready step waits at most this long while other groups' steps run.")
@click.option("--max-inflight", type=int, default=16, show_default=True,
              help="Requests batched at once (Triton model instances); later ones wait in Triton's queue.")
@click.option("--pad-batches/--no-pad-batches", default=None,
              help="Pad engine calls to powers of two (default: on for the torch backend on CUDA: few CUDA graphs).")
@click.option("--warm-up", "warm_up", is_flag=True, help="Run every group at every padded size before serving.")
@click.option("--one-t-per-call", is_flag=True,
              help="torch backend: its shared-mask engines; only requests at the same t share a call.")
@click.option("--stub-numpy", type=click.Path(path_type=Path), envvar="DYC_STUB_NUMPY", default=None,
              help="A directory with numpy<2 for Triton's Python-backend stub, where this Python has numpy 2 "
                   "(pip install --target DIR 'numpy<2'; env DYC_STUB_NUMPY).")
def serve_cmd(bundle, backend, device, host, http_port, grpc_port, metrics_port, max_batch, deadline_ms,
              max_inflight, pad_batches, warm_up, one_t_per_call, stub_numpy) -> None:
    """Serve BUNDLE (default: the embedded model) over HTTP and gRPC with step-level batching."""
    from .server import serve

    if max_batch < 1:
        raise UsageError(f"--max-batch must be at least 1, got {max_batch}")
    if deadline_ms < 0:
        raise UsageError(f"--deadline-ms must be ≥ 0, got {deadline_ms}")
    serve(bundle, backend=backend, device=device, host=host, http_port=http_port, grpc_port=grpc_port,
          metrics_port=metrics_port, max_batch=max_batch, deadline_ms=deadline_ms, max_inflight=max_inflight,
          pad_batches=pad_batches, warm_up=warm_up, one_t_per_call=one_t_per_call, stub_numpy=stub_numpy,
          log=lambda m: click.echo(f"dyc serve: {m}", err=True))


@click.command("query")
@click.option("--url", default="localhost:8000", show_default=True,
              help="host:port (HTTP), http://host:port or grpc://host:port.")
@click.option("--classes", required=True, help="Class ids, e.g. 3,7: one image each.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the sampler's).")
@click.option("--sampler", type=click.Choice(SAMPLERS, case_sensitive=False), default="ddim", show_default=True)
@click.option("--cfg", "cfg_scale", type=float, default=4.0, show_default=True, help="Guidance scale (1 = off).")
@click.option("--format", "fmt", type=click.Choice(["png", "latents"]), default="png", show_default=True,
              help="png: one PNG per image (pixel models); latents: latents.npy.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True, help="Seconds per request.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Directory to write to.")
def query_cmd(url, classes, seed, steps, sampler, cfg_scale, fmt, timeout_s, output) -> None:
    """Ask a running `dyc serve` for one sample per class id and write them to a directory."""
    from ..runtime.cli import parse_classes
    from .client import Client

    ids = parse_classes(classes)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DycError(f"{output}: cannot create the directory ({e.strerror})") from None
    t0 = time.perf_counter()
    with Client(url, timeout_s=timeout_s) as c:
        out = c.generate(ids, seed=seed, steps=steps, sampler=sampler, cfg=cfg_scale, format=fmt)
    ms = (time.perf_counter() - t0) * 1e3
    written = []
    if fmt == "png":
        for i, (label, data) in enumerate(zip(ids, out, strict=True)):
            name = f"{i:04d}_class{label}.png"
            _write_atomic(output / name, data)
            written.append(name)
    else:
        import io

        import numpy as np

        buf = io.BytesIO()
        np.save(buf, out)
        _write_atomic(output / "latents.npy", buf.getvalue())
        written.append("latents.npy")
    meta = {"url": url, "classes": ids, "seed": seed, "steps": steps, "sampler": sampler, "cfg": cfg_scale,
            "format": fmt, "ms": round(ms, 1), "files": written}
    _write_atomic(output / "query.json", (json.dumps(meta, indent=2) + "\n").encode())
    click.echo(f"wrote {len(written)} file(s) to {output} in {ms / 1e3:.2f} s: {', '.join(written[:4])}"
               f"{' …' if len(written) > 4 else ''}")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise DycError(f"{path}: cannot write it ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)

