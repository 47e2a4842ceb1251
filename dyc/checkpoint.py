"""Checkpoint IO in the official DiT/DyDiT layout (DESIGN.md §1).

Reads ``.safetensors`` and ``.pt``/``.pth`` (``torch.load(weights_only=True)`` only: a pickle
that needs code to load is refused, never run). Every failure is a ``DycError`` that names
the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig, infer_config
from .errors import DycError
from .model import DyDiT

_WRAPPER_KEYS = ("ema", "model", "state_dict")  # in order of preference, as DiT's sample.py does


@dataclass
class Checkpoint:
    config: ModelConfig
    model: DyDiT
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.state_dict().values())


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK":
        return "pt"  # torch's zip format
    if head[:1] == b"\x80":
        return "pt"  # legacy pickle format
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"  # u64 header length, then the JSON header
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError is not importable across versions
        raise DycError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return sd, meta


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise DycError(
                f"{path}: refused: the pickle needs code to run to load (only tensors and plain containers "
                "are allowed; dyc never executes pickled code)"
            ) from None
        raise DycError(f"{path}: corrupt pickle ({str(e).splitlines()[0]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DycError(f"{path}: corrupt or truncated checkpoint ({msg})") from None
    if not isinstance(obj, Mapping):
        raise DycError(f"{path}: not a checkpoint: it holds a {type(obj).__name__}, not a state dict")
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return dict(obj)


def _clean(sd: Mapping, path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise DycError(f"{path}: not a checkpoint: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k.removeprefix("module.")] = v
    if not out:
        raise DycError(f"{path}: not a checkpoint: no tensors in it")
    return out


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The raw state dict (``module.`` stripped, wrapper unwrapped) and safetensors metadata."""
    path = Path(path)
    if not path.exists():
        raise DycError(f"{path}: no such file")
    if path.is_dir():
        raise DycError(f"{path}: is a directory, not a checkpoint file")
    kind = _sniff(path)
    if kind == "unknown":
        raise DycError(f"{path}: not a checkpoint (neither safetensors nor a torch file)")
    if kind == "safetensors":
        sd, meta = _read_safetensors(path)
    else:
        sd, meta = _read_pickle(path), {}
    return _clean(sd, path), meta


def _names(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(sd: Mapping[str, torch.Tensor], model: DyDiT, path: Path | str) -> None:
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing:
        raise DycError(f"{path}: missing keys for {model.config.name}: {_names(missing)}")
    if unexpected:
        raise DycError(f"{path}: unexpected keys for {model.config.name}: {_names(unexpected)}")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise DycError(
                f"{path}: shapes fit no DiT config: {k} is {tuple(sd[k].shape)}, expected {tuple(v.shape)} "
                f"for {model.config.name}"
            )


def model_from_state_dict(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, path: str | Path = "<state dict>",
    dtype: torch.dtype = torch.float32,
) -> tuple[ModelConfig, DyDiT]:
    try:
        cfg = infer_config(sd, metadata)
    except DycError as e:
        raise DycError(f"{path}: {e}") from None
    from .families import build_model

    with torch.device("meta"):
        model = build_model(cfg)  # DyDiT, or another family's model (dyc.families)
    check_keys(sd, model, path)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    model.pos_embed.requires_grad_(False)
    return cfg, model.eval()


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load a DiT or DyDiT checkpoint in the official layout; the config is inferred from shapes.

    >>> ck = load_checkpoint("DyDiT-XL-2.safetensors")   # doctest: +SKIP
    >>> out = ck.model(x, t, y)                          # official masked semantics
    """
    sd, meta = read_state_dict(path)
    cfg, model = model_from_state_dict(sd, meta, path=path, dtype=dtype)
    return Checkpoint(config=cfg, model=model, metadata=meta, path=Path(path))


def save_checkpoint(
    model_or_sd: DyDiT | Mapping[str, torch.Tensor], path: str | os.PathLike, *,
    metadata: Mapping[str, str] | None = None, config: ModelConfig | None = None, static: bool = False,
) -> Path:
    """Write a safetensors checkpoint in the official layout, atomically (temp file + rename).

    ``static=True`` drops the router and token-selection weights: the plain DiT of the same weights.
    """
    from safetensors.torch import save_file

    if isinstance(model_or_sd, torch.nn.Module):  # DyDiT or another family's model
        config = config or model_or_sd.config
        sd = model_or_sd.state_dict()
    else:
        sd = dict(model_or_sd)
    if static:
        router = (".attn_rate.", ".mlp_rate.", ".token_selection.")
        sd = {k: v for k, v in sd.items() if not any(s in k for s in router)}
    meta = dict(metadata or {})
    if config is not None:
        cfg = config.to_dict()
        cfg["dynamic"] = cfg["dynamic"] and not static
        meta["dyc.config"] = json.dumps(cfg)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise DycError(f"{path}: checkpoints are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
