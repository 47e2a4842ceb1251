"""Click commands ``compile`` and ``verify`` (registered on ``dyc.cli.main`` by the CLI module)."""

from __future__ import annotations

import json

import click

NUM_HEADS_HELP = ("attention heads of a plain DiT of a non-official width without dyc.config metadata "
                  "(a DyDiT's routers give them)")


def _progress_log():
    """Log lines on stderr with the time elapsed (and, for ``phase: unit i/n`` lines, the phase's ETA)."""
    from ..progress import PhaseLog

    return PhaseLog()


@click.command("compile")
@click.argument("checkpoint", type=click.Path())
@click.option("--lambda", "lambda_", type=float, default=None,
              help="target FLOPs ratio λ in (0, 1] over the schedule; raises router thresholds if needed")
@click.option("--groups", "groups", type=int, default=None,
              help="at most K engines (default: smallest K ≤ 8 within 2% of one per architecture)")
@click.option("--sampler", default="ddim", show_default=True, help="schedule to group for: ddim, ddpm, dpm-solver++")
@click.option("--steps", type=int, default=None, help="sampling steps (default: 50 ddim, 250 ddpm, 20 dpm-solver++)")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--calib", type=int, default=2, show_default=True,
              help="calibration samples for SDT keep rates (each also run with the null class)")
@click.option("--calib-steps", type=int, default=10, show_default=True,
              help="timesteps of the calibration trajectory (picked from the schedule)")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("-o", "--output", "output", default=None, help="bundle directory NAME.dyc (default: checkpoint name)")
@click.option("--backend", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: the bundle's ONNX graphs (ONNX Runtime, torch); tensorrt: also build one engine per group")
@click.option("--batch-sizes", default="1,16,32", show_default=True,
              help="with --backend tensorrt: images per sampler call the engines cover (CFG doubles them)")
@click.option("--trt-flavor", type=click.Choice(["auto", "tensorrt", "tensorrt_rtx"]), default="auto",
              show_default=True, help="with --backend tensorrt: datacenter TensorRT or TensorRT-RTX")
@click.option("--num-heads", type=int, default=None, help=NUM_HEADS_HELP)
def compile_cmd(checkpoint: str, lambda_: float | None, groups: int | None, sampler: str, steps: int | None,
                dtype: str, calib: int, calib_steps: int, seed: int, output: str | None, backend: str,
                batch_sizes: str, trt_flavor: str, num_heads: int | None) -> None:
    """Compile a DiT/DyDiT CHECKPOINT into a bundle of sliced per-group ONNX graphs."""
    from pathlib import Path

    from .compile import compile_checkpoint

    out = output or str(Path(checkpoint).with_suffix(".dyc").name)
    log = _progress_log()
    # DycError propagates: dyc.cli.main prints it as one line and exits non-zero
    r = compile_checkpoint(checkpoint, out, lambda_target=lambda_, groups=groups, sampler=sampler, steps=steps,
                           dtype=dtype, calib=calib, calib_steps=calib_steps, seed=seed, progress=log,
                           num_heads=num_heads)
    p, m = r.plan, r.manifest
    lam = m["lambda"]
    size = sum(f["bytes"] for f in m["files"].values())
    click.echo(f"{m['model']['name']} -> {r.path}  ({len(p.groups)} group(s), {p.dtype}, {size / 2**20:.1f} MiB, "
               f"{r.seconds:.1f} s)")
    click.echo(f"schedule: {p.sampler} {p.steps} steps; {len(p.architectures)} distinct architectures over t=0..999")
    tgt = "none (trained thresholds)" if lam["target"] is None else f"{lam['target']:g}"
    # the names of `dyc inspect` (which defines each); the manifest keeps its keys: model, trained, realized
    click.echo(f"λ over {p.sampler}-{p.steps}: λ_model {lam['model']:.4f} (at the trained thresholds "
               f"{lam['trained']:.4f}), λ_engines {lam['realized']:.4f} (ONNX-counted {lam['onnx_counted']:.4f}), "
               f"λ_target {tgt}")
    for note in m["notes"]:
        click.echo(f"WARNING: {note}")
    click.echo(r.table)
    if backend == "tensorrt":  # engines are a separate, rebuildable step: `dyc build-engines` redoes it alone
        from ..tensorrt.build import build_engines

        em = build_engines(r.path, batch_sizes, trt_flavor, progress=log)
        click.echo(f"engines: {len(em['engines'])} plan(s), {em['flavor']} {em['tensorrt_version']}, "
                   f"SDT {em['sdt_form']} -> {r.path}/engines/")


@click.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--checkpoint", default=None, type=click.Path(),
              help="source checkpoint (default: the path recorded in the manifest)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--tolerance", type=float, default=None,
              help="fixed relative error bound (default: max(1e-5 fp32 / 1e-2 fp16, 10 × the eager model's own "
                   "error in the bundle dtype), against the eager model in float64)")
@click.option("--variant", type=click.Choice(["std", "trt", "cuda"]), default="std", show_default=True,
              help="which graphs: std (standard ops), trt (dyc::SdtMlp), cuda (ONNX Runtime CUDA EP graphs)")
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda[:i] (onnxruntime-gpu)")
def verify_cmd(bundle: str, checkpoint: str | None, as_json: bool, batch: int, seed: int,
               tolerance: float | None, variant: str, device: str) -> None:
    """Run every group's ONNX through ONNX Runtime against the float64 eager model; exit 1 above tolerance."""
    from .verify import verify_bundle

    log = _progress_log()
    rep = verify_bundle(bundle, checkpoint, batch=batch, seed=seed, tolerance=tolerance,
                        progress=None if as_json else log, variant=variant, device=device)
    click.echo(json.dumps(rep.to_dict(), indent=1) if as_json else rep.format())
    if not rep.ok:  # out of tolerance: exit 1, like any other bad input
        click.get_current_context().exit(1)
