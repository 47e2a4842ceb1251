"""Serving throughput and latency: ``dyc serve`` with step-level batching against one request at a time.

    python bench/bench_serve.py BUNDLE --backend torch --concurrency 1,8,32 --duration 15 --out $OUT

1. baseline: ``dyc.Pipeline`` in this process, one request after another (no server), for ``--duration`` s;
2. ``dyc serve BUNDLE`` in a subprocess (``--warm-up``: CUDA graphs/compiles happen before timing), then
   per concurrency C: C client threads, each a closed loop of requests (one image, ``--sampler``/
   ``--steps``/``--cfg``, a new seed each) over gRPC, ``--warmup-s`` untimed then ``--duration`` timed.
   Images/s counts requests that finished inside the timed window; latency is per request
   (send to result) of those that started in it. The server's batcher counters give rows per call.
3. ``--unbatched``: the same clients against a second server whose ``--max-batch`` is one request's
   rows (every engine call serves one request: step-interleaved, no batching).

One served result is first checked against the Pipeline's for the same seed (max abs difference
recorded: bf16 batched GEMMs round differently from single-request ones). JSON to ``--out``
(bench_serve.json, serve*.log); a table last. Every phase is timed by ``--duration``/``--warmup-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# ---- 1. one request at a time, no server ---------------------------------------------------------
def pipeline_baseline(args) -> dict:
    import torch

    import dyc

    pipe = dyc.Pipeline.load(args.bundle, backend=args.backend, device=args.device)
    rng = np.random.default_rng(0)
    n_classes = pipe.config.num_classes

    def one(seed):
        t0 = time.perf_counter()
        pipe([int(rng.integers(n_classes))], sampler=args.sampler, steps=args.steps, cfg=args.cfg, seed=seed)
        return (time.perf_counter() - t0) * 1e3

    seed, end = 0, time.perf_counter() + args.warmup_s
    while time.perf_counter() < end or seed < 2:  # at least two: CUDA graphs / compiles on the first
        one(seed)
        seed += 1
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < args.duration:
        lat.append(one(seed))
        seed += 1
    wall = time.perf_counter() - t0
    ref = pipe([3], sampler=args.sampler, steps=args.steps, cfg=args.cfg, seed=12345).latents.numpy()
    pipe.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"mode": "pipeline, one at a time", "concurrency": 1, "requests": len(lat),
            "images_per_s": round(len(lat) / wall, 3), **percentiles(lat), "_ref": ref}


# ---- 2. the server -------------------------------------------------------------------------------
class Server:
    def __init__(self, args, max_batch: int, log: Path):
        self.http, self.grpc, self.metrics = free_ports(3)
        cmd = [sys.executable, "-m", "dyc.cli", "serve", str(args.bundle), "--backend", args.backend,
               "--host", "127.0.0.1", "--http-port", str(self.http), "--grpc-port", str(self.grpc),
               "--metrics-port", str(self.metrics), "--max-batch", str(max_batch), "--deadline-ms",
               str(args.deadline_ms), "--max-inflight", str(max(args.concurrency)), *args.serve_args]
        if args.device:
            cmd += ["--device", args.device]
        if args.warm_up:
            cmd.append("--warm-up")
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        self.log = log
        self._f = open(log, "wb")  # noqa: SIM115 - closed in stop()
        print(f"starting: {' '.join(cmd)}", flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self._f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"grpc://127.0.0.1:{self.grpc}"

    def wait_ready(self, timeout_s: float) -> float:
        from dyc.serve.client import Client

        t0 = time.perf_counter()
        with Client(self.url, timeout_s=5) as c:
            while time.perf_counter() - t0 < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dyc serve exited with {self.proc.returncode}; see {self.log}")
                if c.ready():
                    return time.perf_counter() - t0
                time.sleep(0.5)
        raise RuntimeError(f"dyc serve not ready after {timeout_s} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # tritonserver and its stubs, whatever is left
        except ProcessLookupError:
            pass
        self._f.close()


def drive(url: str, args, concurrency: int, n_classes: int, seed0: int) -> dict:
    """``concurrency`` closed-loop clients: untimed warm-up, then the timed window."""
    from dyc.serve.client import Client

    records: list[tuple[float, float, int]] = []  # (start, end, images)
    errors: list[str] = []
    lock = threading.Lock()
    t_start = time.perf_counter()
    t_measure = t_start + args.warmup_s
    t_end = t_measure + args.duration

    def client(k: int) -> None:
        rng = np.random.default_rng(seed0 + k)
        seed = seed0 * 1000 + k * 100000
        with Client(url, timeout_s=300) as c:
            while time.perf_counter() < t_end:
                s = time.perf_counter()
                try:
                    c.generate([int(rng.integers(n_classes))], seed=seed, steps=args.steps, sampler=args.sampler,
                               cfg=args.cfg)
                except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                    with lock:
                        errors.append(str(e))
                    continue
                e_ = time.perf_counter()
                seed += 1
                with lock:
                    records.append((s, e_, 1))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in records if t_measure <= r[1] <= t_end]
    lat = [(e - s) * 1e3 for s, e, _ in records if s >= t_measure]
    return {"concurrency": concurrency, "requests": len(done), "images_per_s": round(sum(r[2] for r in done)
                                                                                     / args.duration, 3),
            **percentiles(lat), "errors": len(errors), "first_error": errors[0] if errors else None}


def serve_phase(args, tag: str, max_batch: int, concurrencies: list[int], n_classes: int, ref, out: Path) -> list:
    from dyc.serve.client import Client

    rows = []
    srv = Server(args, max_batch, out / f"serve_{tag}.log")
    try:
        ready_s = srv.wait_ready(args.start_timeout)
        print(f"[{tag}] server ready in {ready_s:.1f} s", flush=True)
        check = None
        with Client(srv.url, timeout_s=300) as c:
            if ref is not None:
                got = c.generate([3], seed=12345, steps=args.steps, sampler=args.sampler, cfg=args.cfg)
                check = float(np.abs(got - ref).max())
                print(f"[{tag}] served result vs Pipeline (same seed): max abs diff {check:.3g}", flush=True)
            before = c.stats()
        for i, conc in enumerate(concurrencies):
            r = drive(srv.url, args, conc, n_classes, seed0=i + 1)
            with Client(srv.url) as c:
                after = c.stats()
            calls = after["calls"] - before["calls"]
            r.update(mode=f"serve ({tag})", rows_per_call=round((after["rows"] - before["rows"]) / max(calls, 1), 2),
                     engine_calls=calls, server_ready_s=round(ready_s, 1), check_max_abs_diff=check)
            before = after
            rows.append(r)
            print(f"[{tag}] c={conc}: {r['images_per_s']} img/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                  f"{r['rows_per_call']} rows/call, {r['errors']} errors", flush=True)
    except Exception as e:  # noqa: BLE001 - keep going: report what ran
        print(f"[{tag}] FAILED: {type(e).__name__}: {e}", flush=True)
        rows.append({"mode": f"serve ({tag})", "error": f"{type(e).__name__}: {e}"})
    finally:
        srv.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", help="A bundle directory (or checkpoint: compiled into the cache on first use).")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default=None)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=15.0, help="Timed seconds per point.")
    ap.add_argument("--warmup-s", type=float, default=4.0, help="Untimed seconds before each point.")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--max-batch", type=int, default=64, help="Rows per engine call (CFG: two per image).")
    ap.add_argument("--deadline-ms", type=float, default=50.0)
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false", help="Do not pass --warm-up to dyc serve.")
    ap.add_argument("--unbatched", action="store_true",
                    help="Also a server whose max batch is one request's rows (no cross-request batching).")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false", help="Skip the in-process Pipeline loop.")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="Seconds to wait for the server (warm-up).")
    ap.add_argument("--serve-args", default="", help="More options for dyc serve, e.g. '--one-t-per-call'.")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.serve_args = args.serve_args.split()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from dyc.bundle import Bundle

    n_classes = (Bundle.load(args.bundle, verify_checksums=False).config.num_classes if Path(args.bundle).is_dir()
                 else 1000)
    rows, ref = [], None
    t_all = time.perf_counter()
    if args.baseline:
        try:
            base = pipeline_baseline(args)
            ref = base.pop("_ref")
            rows.append(base)
            print(f"[pipeline] {base['images_per_s']} img/s, p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"[pipeline] FAILED: {type(e).__name__}: {e}", flush=True)
            rows.append({"mode": "pipeline, one at a time", "error": f"{type(e).__name__}: {e}"})
    rows += serve_phase(args, "batched", args.max_batch, args.concurrency, n_classes, ref, out)
    if args.unbatched:
        one_request = 2 if args.cfg != 1.0 else 1
        rows += serve_phase(args, "unbatched", one_request, [c for c in args.concurrency if c > 1] or [1], n_classes,
                            None, out)
    report = {"bundle": str(args.bundle), "backend": args.backend, "sampler": args.sampler, "steps": args.steps,
              "cfg": args.cfg, "max_batch": args.max_batch, "deadline_ms": args.deadline_ms,
              "duration_s": args.duration, "warmup_s": args.warmup_s, "total_s": round(time.perf_counter() - t_all, 1),
              "rows": rows}
    try:
        import torch

        if torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    (out / "bench_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    base = next((r["images_per_s"] for r in rows if r.get("mode", "").startswith("pipeline") and "error" not in r),
                None)
    print(f"\n{args.sampler}-{args.steps}, cfg {args.cfg}, 1 image/request, backend {args.backend}"
          f"{', ' + report['gpu'] if 'gpu' in report else ''}; {report['total_s']} s in all")
    print(f"{'mode':<28} {'clients':>7} {'img/s':>8} {'vs 1-at-a-time':>14} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'rows/call':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<28} {'':>7} FAILED: {r['error'][:80]}")
            continue
        gain = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        print(f"{r['mode']:<28} {r['concurrency']:>7} {r['images_per_s']:>8.2f} {gain:>14} {r['p50_ms']!s:>9} "
              f"{r['p99_ms']!s:>9} {r.get('rows_per_call', '-')!s:>9}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
