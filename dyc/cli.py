"""The ``dyc`` command line. Every failure is one line on stderr and an exit code (see dyc.errors)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    DycError,
    UsageError,
    missing_dependency,
    os_error_message,
)
from .timesteps import NUM_TRAIN_TIMESTEPS, SAMPLERS

NUM_HEADS_HELP = ("Attention heads of a plain DiT of a non-official width without dyc.config metadata "
                  "(a DyDiT's routers give them).")
# torch and numpy are imported inside the commands that need them: `dyc --help` stays fast


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dyc")
def cli() -> None:
    """dyc: compile DyDiT checkpoints into per-timestep-group engines and run them."""


# ---------------------------------------------------------------------------------------------
# inspect
@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--masks", type=click.Path(path_type=Path), help="Write TDW masks (head, channel [1000, L, H]) to .npz.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw TDW activation (layer × timestep) to a PNG.")
@click.option("--sampler", default="ddim", show_default=True, help="Schedule of the λ figures (as dyc compile).")
@click.option("--steps", type=int, default=None, help="Its steps (default: the sampler's usual count).")
@click.option("--calib", type=int, default=2, show_default=True,
              help="Calibration samples for the SDT keep rates of λ_model/λ_engines, as dyc compile; 0 skips them.")
@click.option("--num-heads", type=int, default=None, help=NUM_HEADS_HELP)
def inspect(ckpt: Path, as_json: bool, masks: Path | None, plot: Path | None, sampler: str, steps: int | None,
            calib: int, num_heads: int | None) -> None:
    """Config, parameters, static GFLOPs and, for DyDiT, TDW activation over t = 0..999 and every λ figure.

    CKPT may also be a compiled bundle (NAME.dyc): its manifest's λ figures, under the same names.
    """
    import numpy as np

    from .checkpoint import load_checkpoint
    from .inspection import describe, format_description, lambda_figures, plot_activation, tdw_activation

    if ckpt.is_dir() and (ckpt / "manifest.json").exists():  # else load_checkpoint says what the directory is
        from .inspection import describe_bundle, format_bundle

        info = describe_bundle(ckpt)
        if as_json:
            _echo_json(info)
        else:
            click.echo(format_bundle(info))
        return
    if calib < 0:
        raise DycError(f"--calib must be 0 (skip) or positive, got {calib}")
    ck = load_checkpoint(ckpt, num_heads=num_heads)
    info = describe(ck)
    hm = cm = None
    if ck.config.dynamic:
        from .progress import PhaseLog

        hm, cm = tdw_activation(ck.model)
        info["lambda"] = lambda_figures(ck, sampler=sampler, steps=steps, calib=calib, progress=PhaseLog())
    if masks is not None:
        if hm is None:
            raise DycError(f"{ckpt}: a plain DiT has no TDW masks to write")
        _write_npz(masks, head=hm.astype(np.uint8), channel=cm.astype(np.uint8))
    if plot is not None:
        if hm is None:
            raise DycError(f"{ckpt}: a plain DiT has no TDW activation to plot")
        plot_activation(hm, cm, plot, title=f"{ck.config.name} — {ckpt.name}")
    if as_json:
        _echo_json(info)
        return
    click.echo(format_description(info))


def _write_npz(path: Path, **arrays) -> None:
    import numpy as np

    from .fileio import atomic_output

    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    with atomic_output(path, "masks file") as f:
        np.savez_compressed(f, **arrays)


# ---------------------------------------------------------------------------------------------
# flops
@cli.command()
@click.argument("ckpt", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_name",
              help="A named model instead of a checkpoint: DiT-XL/2, U-ViT-S/2, U-ViT-H/2, PixArt-XL/2, ...")
@click.option("--image-size", type=int, default=None,
              help="Pixels: 256 or 512 (DiT, U-ViT-H/2; default 256), 256/512/1024 (PixArt); U-ViT-S/2 is 32.")
@click.option("--sampler", default="ddim", show_default=True, help=f"Schedule to average over: {', '.join(SAMPLERS)}.")
@click.option("--steps", type=int, default=None, help="Sampler steps (default: the sampler's usual count).")
@click.option("--token-keep", type=float, default=None, help="SDT share of tokens the MLPs run on (0..1].")
@click.option("--per-t", is_flag=True, help="Also print the dynamic GFLOPs at every t of the schedule.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (key 'gflops': static).")
@click.option("--num-heads", type=int, default=None, help=NUM_HEADS_HELP)
def flops(ckpt, model_name, image_size, sampler, steps, token_keep, per_t, as_json, num_heads) -> None:
    """Static GFLOPs (MAC convention) and, for DyDiT, dynamic GFLOPs per t and over a schedule."""
    import torch

    from .config import parse_model_name
    from .flops import dynamic_flops, flops_ratio, fvcore_gflops, static_breakdown
    from .timesteps import sampler_timesteps

    if (ckpt is None) == (model_name is None):
        raise UsageError("give either a checkpoint or --model NAME (e.g. --model DiT-XL/2)")
    if token_keep is not None and not 0.0 < token_keep <= 1.0:
        raise UsageError(f"--token-keep must be in (0, 1], got {token_keep}")
    model = None
    if ckpt is not None:
        from .checkpoint import load_checkpoint

        ck = load_checkpoint(ckpt, num_heads=num_heads)
        cfg, model = ck.config, ck.model
    else:
        cfg = parse_model_name(model_name, image_size)
    static = static_breakdown(cfg)
    out: dict = {"model": cfg.name, "image_size": cfg.image_size, "gflops": static.total / 1e9,
                 "breakdown": static.to_dict(), "fvcore_gflops": fvcore_gflops(cfg)}
    if model is not None and cfg.dynamic:
        ts = sampler_timesteps(sampler, steps)
        hm, cm = (m.numpy() for m in model.tdw_masks(torch.arange(NUM_TRAIN_TIMESTEPS)))
        tdw = dynamic_flops(cfg, hm, cm, 1.0) / 1e9
        dyn = {
            "sampler": sampler, "steps": len(ts), "timesteps": ts,
            "tdw_gflops_per_t": [float(tdw[t]) for t in ts],
            "tdw_gflops_mean": float(tdw[ts].mean()),
            "tdw_ratio": flops_ratio(cfg, hm, cm, 1.0, ts),
        }
        if token_keep is not None:
            both = dynamic_flops(cfg, hm, cm, token_keep) / 1e9
            dyn.update(token_keep=token_keep, gflops_per_t=[float(both[t]) for t in ts],
                       gflops_mean=float(both[ts].mean()), ratio=flops_ratio(cfg, hm, cm, token_keep, ts))
        out["dynamic"] = dyn
    if as_json:
        _echo_json(out)
        return
    click.echo(f"{cfg.name} at {cfg.image_size}px: {out['gflops']:.2f} GFLOPs per forward (static, MACs)")
    b = out["breakdown"]
    click.echo(f"  attention {b['attn']:.2f}  mlp {b['mlp']:.2f}  adaLN {b['adaln']:.2f}  "
               f"embed {b['embed']:.3f}  final {b['final']:.3f}" + (f"  other {b['other']:.2f}" if b["other"] else ""))
    click.echo(f"  as fvcore counts the official code (the papers' tables): {out['fvcore_gflops']:.2f} GFLOPs")
    if "dynamic" in out:
        d = out["dynamic"]
        click.echo(f"dynamic over {d['sampler']}-{d['steps']}: TDW {d['tdw_gflops_mean']:.2f} GFLOPs per forward, "
                   f"λ_tdw = {d['tdw_ratio']:.3f} (MHSA+MLP, dynamic/static; every λ: dyc inspect)")
        if token_keep is not None:
            click.echo(f"  with SDT keeping {token_keep:.0%} of tokens: {d['gflops_mean']:.2f} GFLOPs, "
                       f"λ_model = {d['ratio']:.3f} at that keep rate")
        if per_t:
            key = "gflops_per_t" if token_keep is not None else "tdw_gflops_per_t"
            for t, g in zip(d["timesteps"], d[key], strict=True):
                click.echo(f"  t={t:4d}  {g:.3f}")
    elif ckpt is not None:
        click.echo("plain DiT: no dynamic width")


# ---------------------------------------------------------------------------------------------
# synth
@cli.command()
@click.option("--model", "model_name", default="DiT-XL/2", show_default=True,
              help="DiT-{S,B,L,XL}/{2,4,8}, U-ViT-S/2 (CIFAR-10), U-ViT-H/2 (ImageNet 256), PixArt-XL/2.")
@click.option("--image-size", type=int, default=None,
              help="Pixels: 256 or 512 (DiT, U-ViT-H/2; default 256), 256/512/1024 (PixArt); U-ViT-S/2 is 32.")
@click.option("--lambda", "lam", type=float, default=0.5, show_default=True, help="Target FLOPs ratio over t=0..999.")
@click.option("--token-keep", type=float, default=0.8, show_default=True, help="Share of tokens the SDT routers keep.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--static", is_flag=True, help="Write the plain DiT of the same weights (no routers).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
def synth(model_name, image_size, lam, token_keep, seed, static, output) -> None:
    """A DyDiT checkpoint with random weights whose routers reach a FLOPs target (untrained: for speed tests)."""
    from .checkpoint import save_checkpoint
    from .config import ModelConfig, parse_model_name
    from .synth import synth_metadata, synthesize

    if output.suffix != ".safetensors":
        raise UsageError(f"{output}: synth writes .safetensors files")
    cfg = parse_model_name(model_name, image_size)
    dyn_name = ModelConfig(**{**cfg.to_dict(), "dynamic": True}).name
    click.echo(f"building {dyn_name} "
               f"(seed {seed}) ...", err=True)
    model, info = synthesize(cfg, lam, token_keep, seed)
    save_checkpoint(model, output, metadata=synth_metadata(info), static=static)
    kind = "plain DiT (same weights)" if static else f"DyDiT, λ_model = {info['flops_ratio']:.3f} over t=0..999"
    click.echo(f"wrote {output}: {kind}")


# ---------------------------------------------------------------------------------------------
# bench
@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--backends", default="eager,eager-dydit,torch", show_default=True,
              help="Comma-separated rows: eager, eager-dydit, torch, onnxruntime, tensorrt.")
@click.option("--batch", type=int, default=16, show_default=True, help="Images per step (CFG doubles the rows).")
@click.option("--cfg/--no-cfg", default=True, show_default=True, help="Classifier-free guidance (doubles the batch).")
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="bf16", show_default=True)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed passes over the schedule.")
@click.option("--bundle", type=click.Path(path_type=Path),
              help="The bundle compiled from CKPT: measures the onnxruntime/tensorrt rows.")
@click.option("--groups", type=int, default=None,
              help="At most K engines for the torch row (default: the compiler's, smallest K ≤ 8 within 2%% "
                   "of one engine per architecture).")
@click.option("--deepcache", default=None,
              help="DeepCache intervals, e.g. 2,3: adds the extra speedup and output drift of DeepCache over the "
                   "torch rows (full sampling runs).")
@click.option("--deepcache-shallow", type=int, default=1, show_default=True,
              help="DeepCache: blocks run at each end of the network on cached steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of the table.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Also write the full report as JSON to a file.")
@click.option("--plot", type=click.Path(path_type=Path), help="Draw per-step latency by t to a PNG.")
def bench(ckpt, backends, batch, cfg, sampler, steps, dtype, device, repeats, bundle, groups, deepcache,
          deepcache_shallow, as_json, output, plot) -> None:
    """Per-step latency of each backend against eager PyTorch, measured side by side in one run."""
    from .bench import format_report, plot_report, run_bench, write_json
    from .devices import check_device

    check_device(device)
    rep = run_bench(ckpt, backends=[b.strip() for b in backends.split(",") if b.strip()], batch=batch,
                    cfg_scale=4.0 if cfg else None, sampler=sampler, steps=steps, dtype=dtype, device=device,
                    repeats=repeats, bundle=bundle, groups=groups,
                    deepcache=_int_list(deepcache, "--deepcache"), deepcache_shallow=deepcache_shallow)
    if as_json:
        _echo_json(rep)
    else:
        click.echo(format_report(rep))
    if output:
        write_json(rep, output)
    if plot:
        plot_report(rep, plot)


def _int_list(text: str | None, option: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DycError(f"{option}: give comma-separated integers, e.g. 2,3") from None


# ---------------------------------------------------------------------------------------------
def _register_subsystem_commands() -> None:
    """Commands that live beside their subsystems (imports stay light: heavy modules load on use)."""
    from .compiler.cli import compile_cmd, verify_cmd
    from .runtime.cli import run_cmd
    from .serve.cli import query_cmd, serve_cmd
    from .tensorrt.cli import build_engines_cmd

    cli.add_command(compile_cmd, "compile")
    cli.add_command(verify_cmd, "verify")
    cli.add_command(run_cmd, "run")
    cli.add_command(build_engines_cmd, "build-engines")
    cli.add_command(serve_cmd, "serve")
    cli.add_command(query_cmd, "query")


_register_subsystem_commands()


def _usage_line(e: click.UsageError) -> str:
    cmd = e.ctx.command_path if e.ctx is not None else "dyc"
    return f"dyc: error: {e.format_message()} (see '{cmd} --help')"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (dyc.errors: 1 input/environment, 2 usage, 3 internal)."""
    try:
        rv = cli.main(args=argv, prog_name="dyc", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("dyc: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.exceptions.NoArgsIsHelpError as e:  # `dyc` alone: the help is the answer
        click.echo(e.ctx.get_help(), err=True)
        return EXIT_USAGE
    except click.UsageError as e:
        click.echo(_usage_line(e), err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo(f"dyc: error: {e.format_message()}", err=True)
        return EXIT_INPUT
    except UsageError as e:  # an option value dyc itself checks (a DycError too)
        click.echo(f"dyc: error: {_one_line(str(e))}", err=True)
        return EXIT_USAGE
    except DycError as e:
        click.echo(f"dyc: error: {_one_line(str(e))}", err=True)
        return EXIT_INPUT
    except Exception as e:  # noqa: BLE001 - classified below: environment (exit 1) or a bug (exit 3)
        msg = _environment_message(e)
        if msg is not None:
            click.echo(f"dyc: error: {msg}", err=True)
            return EXIT_INPUT
        if os.environ.get("DYC_DEBUG"):
            raise
        click.echo(f"dyc: internal error: {type(e).__name__}: {_one_line(str(e))} "
                   "(a bug in dyc; set DYC_DEBUG=1 for the traceback)", err=True)
        return EXIT_INTERNAL
    return rv if isinstance(rv, int) else 0


def _one_line(msg: str) -> str:
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def _environment_message(e: Exception) -> str | None:
    """The one line for a failure the machine or the user's files caused, else None (a bug)."""
    if isinstance(e, OSError):
        return os_error_message(e)
    if isinstance(e, ImportError):
        missing = missing_dependency(e)
        return None if missing is None else str(missing)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e):
        return f"out of memory ({_one_line(str(e))[:200] or 'MemoryError'}): a smaller --batch, or more memory"
    return None


if __name__ == "__main__":
    sys.exit(main())
