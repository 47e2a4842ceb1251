"""``dyc build-engines BUNDLE``: TensorRT engines for every group of a compiled bundle.

The lead wires the same function into ``dyc compile --backend tensorrt``; ``build_engines_cmd`` is the
stand-alone command (rebuilding engines needs no recompile: plans are specific to a TensorRT version
and GPU, the bundle is not).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

# common.FLAVORS, spelled out: importing .common loads numpy, and `dyc --help` should not (a test keeps them equal)
FLAVORS = ("tensorrt", "tensorrt_rtx")


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@click.command("build-engines")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,16,32", show_default=True,
              help="Images per sampler call to cover; with CFG (default) the engines also cover twice each.")
@click.option("--trt-flavor", type=click.Choice(["auto", *FLAVORS]), default="auto", show_default=True,
              help="Datacenter TensorRT or TensorRT-RTX (auto: the installed one, datacenter first).")
@click.option("--plugin", "plugin_lib", type=click.Path(path_type=Path, dir_okay=False),
              help="SdtMlp TensorRT plugin library (default: $DYC_TRT_PLUGIN or a CMake build under plugins/).")
@click.option("--sdt", type=click.Choice(["auto", "plugin", "gather", "dense"]), default="auto", show_default=True,
              help="How engines compute SDT: plugin (fused op), gather (NonZero/GatherND/ScatterND), dense "
                   "(every token, masked residual). auto: plugin when found, else gather (TensorRT) / dense (RTX).")
@click.option("--cfg-batch/--no-cfg-batch", default=True, show_default=True,
              help="Cover the doubled batch that classifier-free guidance runs.")
@click.option("--compute-capability", "ccs", multiple=True,
              help="TensorRT-RTX target(s), e.g. 8.6,8.9,12.0 (default: its portable set).")
@click.option("--verbose", is_flag=True, help="Show TensorRT's warnings.")
@click.option("--json", "as_json", is_flag=True, help="Print the engine manifest as JSON.")
def build_engines_cmd(bundle: Path, batch_sizes: str, trt_flavor: str, plugin_lib: Path | None, sdt: str,
                      cfg_batch: bool, ccs: tuple[str, ...], verbose: bool, as_json: bool) -> None:
    """Build one TensorRT engine per group of BUNDLE into BUNDLE/engines/."""
    from .build import build_engines

    m = build_engines(bundle, batch_sizes, trt_flavor, plugin_lib, sdt=sdt, cfg_batch=cfg_batch,
                      compute_capabilities=_split(ccs) or None, verbose=verbose,
                      progress=lambda msg: click.echo(msg, err=True))
    if as_json:
        click.echo(json.dumps(m, indent=1))
        return
    targets = ", ".join(m["target_compute_capabilities"] or []) or m["target_note"]
    opts = m["options"]
    click.echo(f"{bundle}: {len(m['engines'])} engine(s), {m['flavor']} {m['tensorrt_version']}, "
               f"SDT {m['sdt_form']}, dtype {m['dtype']}")
    click.echo(f"  engine batch {opts['profile']['min']}..{opts['profile']['max']} (opt {opts['profile']['opt']}; "
               f"sampler batches {','.join(map(str, opts['batch_sizes']))}{' with CFG' if opts['cfg_batch'] else ''})")
    click.echo(f"  targets: {targets}")
    for e in m["engines"]:
        click.echo(f"  group {e['group']}: {e['plan']}  {e['bytes'] / 2**20:.1f} MiB  {e['network_layers']} layers  "
                   f"{e['build_seconds']:.1f} s")
