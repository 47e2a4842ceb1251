"""``dyc run``: sample from a bundle (or a checkpoint, or the embedded default model) and write the results."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..backends import backend_names
from ..errors import DycError, UsageError
from ..fileio import atomic_output, atomic_write_text, make_output_dir, output_target, read_bytes
from ..timesteps import SAMPLERS

if TYPE_CHECKING:  # numpy and torch load inside the functions: `dyc --help` does not import them
    import numpy as np
    import torch


def parse_classes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise UsageError(f"--classes: {part!r} is not a class id (give integers, e.g. 207,360)") from None
    if not out:
        raise UsageError("--classes is empty: give class ids, e.g. 207,360")
    return out


def load_noise(path: Path, option: str = "--noise") -> np.ndarray:
    """A float32 .npy array (``option`` names the flag in errors)."""
    import io

    import numpy as np

    data = read_bytes(path, f"{option} .npy file")  # a FIFO or device is refused, not waited on
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DycError(f"{option} {path}: not a .npy array ({str(e).splitlines()[0] if str(e) else 'unreadable'})"
                       ) from None
    if not isinstance(arr, np.ndarray):
        raise DycError(f"{option} {path}: holds several arrays (.npz); give one .npy array")
    if arr.dtype != np.float32:
        raise DycError(f"{option} {path}: dtype is {arr.dtype}, expected float32")
    return arr


def resolve_classes(classes: str | None, num_samples: int | None, noise: np.ndarray | None,
                    num_classes: int) -> list[int]:
    """Class label per sample: --classes cycled to --num-samples; defaults 0, 1, 2, … (at most 8)."""
    given = parse_classes(classes) if classes is not None else None
    if num_samples is not None and num_samples < 1:
        raise UsageError(f"--num-samples must be positive, got {num_samples}")
    m = num_samples
    if m is None:
        m = len(given) if given else (noise.shape[0] if noise is not None and noise.ndim == 4 else min(8, num_classes))
    if given is None:
        return [i % num_classes for i in range(m)]
    if m < len(given):
        raise UsageError(f"--num-samples {m} is fewer than the {len(given)} --classes given")
    return [given[i % len(given)] for i in range(m)]


def grid_image(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """[M, H, W, C] uint8 -> one image, ⌈√M⌉ columns, ``pad`` px gaps (torchvision's save_image layout)."""
    import numpy as np

    m, h, w, c = images.shape
    cols = math.ceil(math.sqrt(m))
    rows = math.ceil(m / cols)
    out = np.zeros((pad + rows * (h + pad), pad + cols * (w + pad), c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = im
    return out


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (temp file + rename: a failed or killed write leaves no half image)."""
    import numpy as np
    from PIL import Image

    # uint8 [H, W] -> mode L, [H, W, 3] -> RGB (Pillow infers the mode from the array)
    if array.shape[-1] == 1:
        img = Image.fromarray(np.ascontiguousarray(array[..., 0]))
    elif array.shape[-1] == 3:
        img = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise DycError(f"cannot write a PNG of {array.shape[-1]} channels (1 or 3)")
    with atomic_output(path, "image") as f:
        img.save(f, format="PNG")


def save_npy(array: np.ndarray, path: Path) -> None:
    import numpy as np

    with atomic_output(path, "latents file") as f:
        np.save(f, array)


def decode_vae(vae_dir: Path, latents: torch.Tensor, in_channels: int) -> np.ndarray:
    """Latents -> uint8 images with a local diffusers AutoencoderKL (DiT's decode: latents / scaling)."""
    import torch

    from .pipeline import to_images

    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise DycError("--vae needs the diffusers package (pip install diffusers)") from None
    if not (vae_dir / "config.json").is_file():
        raise DycError(f"--vae {vae_dir}: not a diffusers AutoencoderKL directory (no config.json)")
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError variants
        raise DycError(f"--vae {vae_dir}: cannot load it ({str(e).splitlines()[0]})") from None
    if vae.config.latent_channels != in_channels:
        raise DycError(f"--vae {vae_dir}: {vae.config.latent_channels} latent channels, the model has {in_channels}")
    scale = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
    with torch.no_grad():
        x = vae.decode(latents.to(vae.dtype) / scale).sample
    return to_images(x)


@click.command("run")
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--sampler", type=click.Choice(SAMPLERS, case_sensitive=False), default="ddim", show_default=True)
@click.option("--steps", type=int, default=None, help="Sampling steps (default: 250 ddpm, 50 ddim, 20 dpm-solver++).")
@click.option("--cfg", "cfg_scale", type=float, default=4.0, show_default=True,
              help="Classifier-free guidance scale (1 = off).")
@click.option("--cfg-official", is_flag=True, help="Guide only the first 3 channels, as DiT's forward_with_cfg.")
@click.option("--classes", default=None, help="Class ids, e.g. 207,360 (cycled to --num-samples).")
@click.option("--num-samples", type=int, default=None, help="Samples to draw (default: one per class).")
@click.option("--batch", type=int, default=None, help="Samples per engine call (default: all).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True)
@click.option("--noise", type=click.Path(path_type=Path), default=None,
              help="Initial latents, float32 .npy [num_samples, C, H, W] (reproducible across backends).")
@click.option("--deepcache", type=int, default=None,
              help="DeepCache interval N: every N-th step runs the whole model, the others reuse its deep blocks' "
                   "residual (eager and torch backends, DiT-family models).")
@click.option("--deepcache-shallow", type=int, default=1, show_default=True,
              help="DeepCache: blocks run at each end of the network on the cached steps.")
@click.option("--text-emb", "text_emb", type=click.Path(path_type=Path), default=None,
              help="Text-to-image models (PixArt-α): the prompts' text-encoder embeddings, float32 .npy "
                   "[num_samples, T, C] (T5-XXL: [n, 120, 4096]).")
@click.option("--backend", default="onnxruntime", show_default=True, help=f"One of {', '.join(backend_names())}.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's own: cpu for eager and "
              "onnxruntime, cuda for torch and tensorrt).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Eager backend: the bundle's source checkpoint, when the manifest's path is not on this machine.")
@click.option("--vae", "vae_dir", type=click.Path(path_type=Path), default=None,
              help="Local diffusers AutoencoderKL directory: decode latents to PNGs.")
@click.option("--save-latents", type=click.Path(path_type=Path), default=None,
              help="Also write the final latents here (.npy).")
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path), default=Path("samples"), show_default=True)
@click.option("--num-heads", type=int, default=None,
              help="Attention heads of a plain DiT checkpoint of a non-official width without dyc.config metadata.")
def run_cmd(bundle, sampler, steps, cfg_scale, cfg_official, classes, num_samples, batch, seed, noise, deepcache,
            deepcache_shallow, text_emb, backend, device, checkpoint, vae_dir, save_latents, outdir, num_heads) -> None:
    """Sample class-conditional images from BUNDLE (default: the embedded model, compiled on first use)."""
    import numpy as np

    from .pipeline import Pipeline

    if steps is not None and steps <= 0:  # checked before any loading or compiling
        raise UsageError(f"--steps must be positive, got {steps}")
    if batch is not None and batch <= 0:
        raise UsageError(f"--batch must be positive, got {batch}")
    if seed < 0:
        raise UsageError(f"--seed must be non-negative, got {seed}")
    if deepcache is not None and backend not in ("eager", "torch"):
        raise UsageError(f"--deepcache runs on the eager and torch backends, not {backend}")
    if classes is not None:
        parse_classes(classes)
    noise_arr = load_noise(noise) if noise is not None else None
    if vae_dir is not None and not vae_dir.is_dir():
        raise DycError(f"--vae {vae_dir}: no such directory")
    # where the results go: checked before sampling (minutes), and never a file or device replaced
    if outdir.exists() and not outdir.is_dir():
        raise DycError(f"-o {outdir}: exists and is not a directory")
    if save_latents is not None and save_latents.parent.is_dir():
        output_target(save_latents, "latents file")
    pipe = Pipeline.load(bundle, backend=backend, device=device, checkpoint=checkpoint, num_heads=num_heads,
                         progress=lambda m: click.echo(m, err=True))
    cfg = pipe.config
    if vae_dir is not None and cfg.vae_scale == 1:
        raise DycError("--vae: this is a pixel-space model; its samples are images already")
    text_arr = load_noise(text_emb, "--text-emb") if text_emb is not None else None
    if cfg.family == "pixart" or not cfg.conditional:  # text embeddings, or nothing, instead of class ids
        if classes is not None:
            raise UsageError(f"--classes: {cfg.name} takes no class ids"
                             + (" (give --text-emb)" if cfg.family == "pixart" else " (it is unconditional)"))
        labels = None
        count = (text_arr.shape[0] if text_arr is not None and text_arr.ndim == 3 else num_samples
                 or (noise_arr.shape[0] if noise_arr is not None and noise_arr.ndim == 4 else 8))
        if num_samples is not None and num_samples != count:
            raise UsageError(f"--num-samples {num_samples} differs from the {count} text embeddings given")
    else:
        if text_arr is not None:
            raise UsageError(f"--text-emb: {cfg.name} is not a text-to-image model")
        labels = resolve_classes(classes, num_samples, noise_arr, cfg.num_classes)
        pipe.check_classes(labels)
        count = len(labels)
    if noise_arr is not None:
        pipe.check_noise(noise_arr, count)

    from ..progress import Progress
    from .samplers import make_sampler

    # a redrawn bar on a terminal, log lines (step i/n, elapsed, ETA) every few seconds elsewhere
    n = len(make_sampler(sampler, steps))
    t0 = time.perf_counter()
    with Progress(n, f"{sampler} {n} steps") as bar:
        out = pipe(labels, sampler=sampler, steps=steps, cfg=cfg_scale, cfg_official=cfg_official, seed=seed,
                   noise=noise_arr, batch=batch, progress=lambda i, n: bar.update(1),
                   text_emb=text_arr, num_samples=count if labels is None else None, deepcache=deepcache,
                   deepcache_shallow=deepcache_shallow)
    wall = time.perf_counter() - t0

    # every file is written to a temp name and renamed into place: a full disk or a kill never leaves
    # a truncated image or run.json (and run.json, written last, lists only complete outputs)
    make_output_dir(outdir)
    written = []
    lat = out.latents.numpy().astype(np.float32)
    if cfg.vae_scale != 1:
        save_npy(lat, outdir / "latents.npy")
        written.append("latents.npy")
    if save_latents is not None:
        make_output_dir(save_latents.parent)
        save_npy(lat, save_latents)
    images = out.images
    if images is None and vae_dir is not None:
        images = decode_vae(vae_dir, out.latents, cfg.in_channels)
    if images is not None:
        for i, im in enumerate(images):
            name = f"{i:04d}_class{labels[i]}.png" if labels else f"{i:04d}.png"
            save_png(im, outdir / name)
            written.append(name)
        save_png(grid_image(images), outdir / "grid.png")
        written.append("grid.png")
    record = {
        "bundle": out.info.get("bundle"), "backend": out.info.get("backend"), "device": out.info.get("device"),
        "model": cfg.name, "dtype": out.info.get("dtype"), "sampler": out.sampler, "steps": out.steps,
        "seed": seed, "noise": str(noise) if noise is not None else None, "cfg": out.cfg,
        "cfg_official": out.cfg_official, "classes": labels, "batch": batch or count,
        "trace": [s.to_dict() for s in out.trace], "sampling_ms": round(out.total_ms, 3),
        "total_s": round(wall, 4), "outputs": written,
        **({"deepcache": out.info["deepcache"]} if "deepcache" in out.info else {}),
    }
    atomic_write_text(outdir / "run.json", json.dumps(record, indent=1) + "\n", "run record")
    written.append("run.json")
    per_step = out.total_ms / max(1, out.steps)
    click.echo(f"{cfg.name}: {count} sample(s), {out.sampler} {out.steps} steps, cfg {out.cfg:g} on "
               f"{out.info.get('backend')} ({out.info.get('device')}): {wall:.2f} s, {per_step:.1f} ms/step "
               f"-> {outdir}/")
