"""``dyc.Pipeline``: class-conditional sampling over a compiled bundle, one engine switch per step.

>>> pipe = dyc.Pipeline.load("dydit.dyc", backend="onnxruntime")            # doctest: +SKIP
>>> out = pipe([207, 360], sampler="ddim", steps=50, cfg=4.0, seed=0)      # doctest: +SKIP
>>> out.latents.shape, [(s.t, s.group, s.ms) for s in out.trace][:2]       # doctest: +SKIP

Per step: the sampler gives the original t, the scheduler t's group and its mask inputs, the
backend runs that group's engine (on the CFG-doubled batch), the sampler updates the latents.
The latents and the sampler maths stay float32 whatever the bundle's dtype; only the engine
inputs are cast. Randomness is all on one CPU ``torch.Generator`` seeded with ``seed``: first
the initial noise (unless ``noise`` is given), then DDPM's per-step noise over the whole set of
samples, so results do not depend on ``batch`` (which only splits the engine calls).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backends import get_backend
from ..backends.base import Backend
from ..config import ModelConfig
from ..devices import check_device
from ..errors import DycError, UsageError
from ..fileio import sha256_file
from .cfg import cfg_combine, cfg_inputs
from .samplers import make_sampler
from .scheduler import GroupSpec, Scheduler

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Progress = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class StepTrace:
    step: int
    t: int  # original timestep the model was called with
    group: int  # engine (bundle group) that ran it
    ms: float  # time of the step, engine call(s) and sampler update (on CUDA: between its end and the last's)

    def to_dict(self) -> dict:
        return {"step": self.step, "t": self.t, "group": self.group, "ms": round(self.ms, 4)}


class StepClock:
    """Per-step times of a loop that does not wait for the GPU: ``tick()`` at the end of each step;
    ``step_ms()`` after the loop. On CUDA each tick records an event (the time between two ends on the
    GPU's timeline is the step's share of the run, its wall time when the GPU is the bottleneck);
    elsewhere the host's clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.tick()

    def tick(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
            if len(self.marks) > 3:  # at most two steps in flight: progress stays honest, the GPU stays fed
                self.marks[-3].synchronize()
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [(b - a) * 1e3 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


@dataclass
class PipelineOutput:
    """``latents`` [M, C, S, S] float32 (CPU); ``images`` [M, H, W, C] uint8 for pixel-space models."""

    latents: torch.Tensor
    classes: list[int]
    trace: list[StepTrace]
    total_ms: float
    sampler: str
    steps: int
    cfg: float
    cfg_official: bool
    seed: int | None
    images: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What ``run.json`` records of the run."""
        return {"sampler": self.sampler, "steps": self.steps, "cfg": self.cfg, "cfg_official": self.cfg_official,
                "seed": self.seed, "classes": self.classes, "trace": [s.to_dict() for s in self.trace],
                "total_ms": round(self.total_ms, 3), **self.info}


def to_images(x: torch.Tensor) -> np.ndarray:
    """Pixel-space samples in [-1, 1], [M, C, H, W] -> uint8 [M, H, W, C] (DiT's save convention)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def cache_dir() -> Path:
    """Where bundles compiled on first use live: ``$DYC_CACHE``, else ``$XDG_CACHE_HOME/dyc``, else ``~/.cache/dyc``.

    As the XDG base directory spec asks, an empty or relative ``$XDG_CACHE_HOME`` is ignored.
    """
    if os.environ.get("DYC_CACHE"):
        return Path(os.environ["DYC_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "dyc"


def compiled_bundle(checkpoint: str | os.PathLike, *, progress: Callable[[str], None] | None = None,
                    num_heads: int | None = None):
    """The bundle of ``checkpoint`` in the cache, compiled (compiler defaults) on first use.

    Keyed by the checkpoint's sha256 and the dyc version: a changed file or a new dyc compiles
    again; a cached bundle that no longer loads (interrupted, altered) is rebuilt.
    """
    from .. import __version__
    from ..bundle import Bundle
    from ..compiler.compile import compile_checkpoint

    ckpt = Path(checkpoint)
    heads = "" if num_heads is None else f"-h{num_heads}"
    digest = sha256_file(ckpt)
    out = cache_dir() / f"{ckpt.stem}-{digest[:16]}{heads}-dyc{__version__}.dyc"

    def of_this_checkpoint(b: Bundle) -> bool:  # the entry holds what its name says
        return b.manifest["source"]["sha256"] == digest

    if (out / "manifest.json").is_file():
        try:
            b = Bundle.load(out)
            if of_this_checkpoint(b):
                return b
        except DycError:
            pass  # damaged cache entry: compile again (the write is atomic)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DycError(f"cannot create the cache directory {out.parent} ({e.strerror}); set DYC_CACHE") from None
    if progress:
        progress(f"compiling {ckpt.name} into {out} (first use; cached for next time)")
    compile_checkpoint(ckpt, out, progress=progress, num_heads=num_heads)
    b = Bundle.load(out)
    if not of_this_checkpoint(b):
        raise DycError(f"{ckpt} changed while it was being compiled; run again")
    return b


def default_checkpoint() -> Path:
    """The embedded default model (dyc/recipes/ ships it in dyc/models/)."""
    try:
        from ..models import default_checkpoint as _default
    except ImportError:
        raise DycError("this dyc build has no embedded default model (dyc/models); give a BUNDLE or checkpoint"
                       ) from None
    return Path(_default())


def _checkpoint_scheduler() -> Scheduler:
    """An uncompiled checkpoint run eagerly is one engine for every t (group 0, no mask inputs)."""
    return Scheduler([GroupSpec(index=0, t_lo=0, t_hi=999, heads=[], channels=[])])


def bundle_scheduler(bundle) -> Scheduler:
    """The scheduler of a loaded ``dyc.bundle.Bundle``: its groups, mask inputs and per-t masks."""
    specs = []
    for g, raw in zip(bundle.groups, bundle.manifest["groups"], strict=True):
        declared = raw.get("inputs") or {}
        takes = tuple(n for n in ("head_mask", "channel_mask")
                      if declared.get(n) is not None or (n not in declared and getattr(g, f"needs_{n}")))
        specs.append(GroupSpec(index=g.index, t_lo=g.t_lo, t_hi=g.t_hi, heads=g.heads, channels=g.channels,
                               inputs=("x", "t", "y", *takes)))
    hm = cm = None
    if bundle.config.dynamic:
        per_arch = [a.masks(bundle.config.num_heads) for a in bundle.architectures]
        hm = np.stack([per_arch[a][0] for a in bundle.arch_of_t]).astype(np.float32)
        cm = np.stack([per_arch[a][1] for a in bundle.arch_of_t]).astype(np.float32)
    return Scheduler(specs, hm, cm, num_timesteps=len(bundle.arch_of_t))


class Pipeline:
    """Sampling over one backend. Build it with ``Pipeline.load``."""

    def __init__(self, backend: Backend, scheduler: Scheduler, config: ModelConfig, *, dtype: str = "fp32",
                 bundle=None, source: str | None = None):
        self.backend = backend
        self.scheduler = scheduler
        self.config = config
        self.dtype = dtype
        self.bundle = bundle
        self.source = source

    @classmethod
    def load(
        cls, bundle_or_checkpoint: str | os.PathLike | None = None, backend: str = "onnxruntime", *,
        device: str | torch.device | None = None, checkpoint: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None, num_heads: int | None = None, **backend_options: Any,
    ) -> Pipeline:
        """A pipeline over a bundle directory, a checkpoint file, or (None) the embedded default model.

        A checkpoint runs as-is on the eager backend; for any other backend it is compiled into the
        cache on first use. ``checkpoint`` gives the eager backend the weights when a bundle does not
        record (or this machine lacks) its source checkpoint. ``device`` None: the backend's default
        (cpu for eager and onnxruntime, cuda for the GPU backends). ``num_heads``: for a checkpoint of a
        plain DiT of a non-official width (see ``dyc.load_checkpoint``).
        """
        from ..bundle import Bundle

        backend_cls = get_backend(backend)  # fails first, naming the missing package
        check_device(device)
        if device is not None:
            backend_options["device"] = device
        path = default_checkpoint() if bundle_or_checkpoint is None else Path(bundle_or_checkpoint)
        if not path.exists():
            raise DycError(f"{path}: no such bundle or checkpoint")
        if path.is_dir():
            bundle = Bundle.load(path)
            if num_heads is not None and num_heads != bundle.config.num_heads:
                raise DycError(f"--num-heads {num_heads} contradicts the bundle {path.name} "
                               f"({bundle.config.num_heads} heads)")
        elif backend == "eager":
            from ..checkpoint import load_checkpoint

            ck = load_checkpoint(path, num_heads=num_heads)
            be = backend_cls(None, model=ck.model, **backend_options)
            return cls(be, _checkpoint_scheduler(), ck.config, source=str(path.resolve()))
        else:
            bundle = compiled_bundle(path, progress=progress, num_heads=num_heads)
        if backend == "eager":
            backend_options.setdefault("checkpoint", checkpoint)
        elif checkpoint is not None:
            raise UsageError(f"checkpoint= is for the eager backend only (backend {backend!r} runs the bundle)")
        be = backend_cls(bundle, **backend_options)
        return cls(be, bundle_scheduler(bundle), bundle.config, dtype=bundle.dtype, bundle=bundle,
                   source=str(bundle.path.resolve()))

    # ---- checks ------------------------------------------------------------------------------
    def check_classes(self, classes: Sequence[int] | int | torch.Tensor) -> list[int]:
        if classes is None:
            raise DycError("give at least one class id")
        if isinstance(classes, torch.Tensor | np.ndarray):
            classes = classes.tolist()
        if isinstance(classes, int):
            classes = [classes]
        classes = list(classes)
        if not classes:
            raise DycError("give at least one class id")
        n = self.config.num_classes
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, int | np.integer):
                raise DycError(f"class id {c!r} is not an integer")
            if not 0 <= int(c) < n:
                raise DycError(f"class id {c} is out of range: this model has classes 0..{n - 1}")
        return [int(c) for c in classes]

    def latent_shape(self, num: int) -> tuple[int, int, int, int]:
        c = self.config
        return (num, c.in_channels, c.input_size, c.input_size)

    def check_noise(self, noise: torch.Tensor | np.ndarray, num: int) -> torch.Tensor:
        want = self.latent_shape(num)
        if isinstance(noise, np.ndarray):
            if noise.dtype != np.float32:
                raise DycError(f"noise must be float32, got {noise.dtype}")
            noise = torch.from_numpy(np.ascontiguousarray(noise))
        if not isinstance(noise, torch.Tensor):
            raise DycError(f"noise must be a tensor or numpy array, got {type(noise).__name__}")
        if noise.dtype != torch.float32:
            raise DycError(f"noise must be float32, got {str(noise.dtype).removeprefix('torch.')}")
        if tuple(noise.shape) != want:
            raise DycError(f"noise has shape {list(noise.shape)}, expected {list(want)} "
                           "[num_samples, channels, size, size]")
        if not torch.isfinite(noise).all():
            raise DycError("noise has NaN or infinite values")
        return noise

    # ---- sampling ----------------------------------------------------------------------------
    def null_condition(self) -> int | torch.Tensor:
        """The null condition for guidance: the null class id, or PixArt-α's null text embedding."""
        if self.config.family != "pixart":
            return self.config.num_classes
        if getattr(self, "_null_text", None) is None:
            from .conditions import null_text

            self._null_text = null_text(self.bundle, None if self.bundle else getattr(self.backend, "model", None))
        return self._null_text

    def _model(self, t: int, x: torch.Tensor, y: torch.Tensor, cfg: float, official: bool) -> tuple[int, torch.Tensor]:
        if cfg != 1.0:
            x, y = cfg_inputs(x, y, self.null_condition())
        g, feeds = self.scheduler.inputs(t, x, y, dtype=_TORCH_DTYPES[self.dtype],
                                         omit_full_masks=self.backend.optional_masks)
        out = self.backend.run_group(g.index, feeds).to(device=x.device, dtype=torch.float32)
        if cfg != 1.0:
            out = cfg_combine(out, self.config.in_channels, cfg, official)
        return g.index, out

    def _model_cached(self, t: int, x: torch.Tensor, y: torch.Tensor, cfg: float, official: bool, call,
                      cache: dict, key: int, refresh: bool) -> tuple[int, torch.Tensor]:
        """``_model`` with DeepCache (dyc.runtime.deepcache): ``cache[key]`` holds this chunk's Δ."""
        if cfg != 1.0:
            x, y = cfg_inputs(x, y, self.null_condition())
        g, feeds = self.scheduler.inputs(t, x, y, dtype=_TORCH_DTYPES[self.dtype],
                                         omit_full_masks=self.backend.optional_masks)
        out, cache[key] = call(g.index, feeds, None if refresh else cache[key])
        out = out.to(device=x.device, dtype=torch.float32)
        if cfg != 1.0:
            out = cfg_combine(out, self.config.in_channels, cfg, official)
        return g.index, out

    @torch.no_grad()
    def __call__(
        self, classes: Sequence[int] | int | torch.Tensor | None = None, *, sampler: str = "ddim",
        steps: int | None = None, cfg: float = 1.0, cfg_official: bool = False, seed: int | None = 0,
        noise: torch.Tensor | np.ndarray | None = None, batch: int | None = None,
        progress: Progress | None = None, text_emb: torch.Tensor | np.ndarray | None = None,
        num_samples: int | None = None, deepcache: int | None = None, deepcache_shallow: int = 1,
    ) -> PipelineOutput:
        """Sample one image (latent) per class id.

        ``cfg`` > 1 (or any value ≠ 1) turns on classifier-free guidance with the null class;
        ``cfg_official`` guides only the first three channels as DiT's ``forward_with_cfg``.
        ``noise`` [M, C, S, S] float32 fixes the initial latents; ``batch`` caps samples per engine call.
        ``deepcache`` N: DeepCache with interval N, ``deepcache_shallow`` blocks run at each end on the
        cached steps (dyc.runtime.deepcache; eager and torch backends, DiT-family models).
        """
        from .conditions import conditions

        # class ids; text embeddings [n, T, C_text] (``text_emb``, PixArt-α); an unconditional model
        # takes ``num_samples`` (dyc.runtime.conditions)
        y_all, classes = conditions(self.config, classes, text_emb, num_samples, self.check_classes)
        m = y_all.shape[0]
        s = make_sampler(sampler, steps)
        cfg = float(cfg)
        if not np.isfinite(cfg) or cfg < 0:
            raise DycError(f"cfg scale must be a finite number ≥ 0, got {cfg}")
        if not self.config.conditional:
            cfg = 1.0  # nothing to guide by
        if batch is None:
            batch = m
        if isinstance(batch, bool) or int(batch) != batch or batch < 1:
            raise DycError(f"batch must be a positive integer, got {batch!r}")
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
            raise DycError(f"seed must be a non-negative integer, got {seed!r}")
        self.scheduler.check_schedule(s.timesteps)  # fail before any work if a t has no group
        dc = dc_call = None
        if deepcache is not None:
            from .deepcache import DeepCache, backend_caller

            dc = DeepCache(deepcache, deepcache_shallow).check(self.config)
            dc_call, dc_cache = backend_caller(self.backend, dc.shallow), {}
        if seed is None:  # a fresh seed, recorded in the output so the run can be repeated
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        gen = torch.Generator().manual_seed(int(seed))
        if noise is None:
            noise = torch.randn(self.latent_shape(m), generator=gen)
        else:
            noise = self.check_noise(noise, m)
        dev = self.backend.device
        x = noise.to(dev)
        y = y_all.to(dev)
        # On CUDA the host runs ahead of the GPU (nothing in a step waits for it), so it prepares the
        # next step while the GPU computes this one; each step's time is read from an event recorded
        # at its end, once the loop is done. Synchronising every step instead left the GPU idle for
        # the host's share of each step (~0.4 ms at batch 1).
        t_start = time.perf_counter()
        ends = StepClock(dev)
        groups: list[int] = []
        for i, t in enumerate(s.timesteps):
            outs, group = [], -1
            for lo in range(0, m, int(batch)):
                if dc is not None:
                    group, o = self._model_cached(t, x[lo:lo + batch], y[lo:lo + batch], cfg, cfg_official, dc_call,
                                                  dc_cache, lo, dc.refresh(i))
                else:
                    group, o = self._model(t, x[lo:lo + batch], y[lo:lo + batch], cfg, cfg_official)
                outs.append(o)
            x = s.step(i, x, torch.cat(outs), gen)
            ends.tick()
            groups.append(group)
            if progress:
                progress(i + 1, len(s))
        latents = x.float().cpu()
        total = (time.perf_counter() - t_start) * 1e3
        trace = [StepTrace(i, t, g, ms) for i, (t, g, ms) in enumerate(zip(s.timesteps, groups, ends.step_ms(),
                                                                          strict=True))]
        images = to_images(latents) if self.config.vae_scale == 1 else None
        return PipelineOutput(
            latents=latents, classes=classes, trace=trace, total_ms=total, sampler=s.name, steps=len(s), cfg=cfg,
            cfg_official=cfg_official, seed=seed, images=images,
            info={"bundle": self.source, "backend": self.backend.name, "device": str(dev), "dtype": self.dtype,
                  **({"deepcache": {"interval": dc.interval, "shallow": dc.shallow}} if dc else {})},
        )

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
