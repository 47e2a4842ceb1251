"""Checkpoint IO in the official DiT/DyDiT layout (DESIGN.md §1).

Reads ``.safetensors`` and ``.pt``/``.pth`` (``torch.load(weights_only=True)`` only: a pickle
that needs code to load is refused, never run). Every failure is a ``DycError`` that names
the file and what is wrong with it. The file is read once (a regular file only: a FIFO or device
is refused, not waited on); its sha256 is computed on those bytes and the weights are parsed from
them, so a checksum check (``expect_sha256``) covers exactly the weights that are used.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import diffusers_format
from .config import ModelConfig, infer_config
from .errors import ChecksumMismatch, DycError, os_error_reason
from .fileio import make_output_dir, output_target, read_bytes, sha256_bytes
from .model import DyDiT

_WRAPPER_KEYS = ("ema", "model", "state_dict")  # in order of preference, as DiT's sample.py does


@dataclass
class Checkpoint:
    config: ModelConfig
    model: DyDiT
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None  # of the bytes the weights were read from
    size: int | None = None  # bytes

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.state_dict().values())


def _sniff(head: bytes) -> str:
    if head[:2] == b"PK":
        return "pt"  # torch's zip format
    if head[:1] == b"\x80":
        return "pt"  # legacy pickle format
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # u64 header length, then the JSON header
    return "unknown"


def _safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The header's ``__metadata__`` (safetensors.torch.load reads the tensors but drops it)."""
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise DycError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file of {len(data)})")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DycError(f"{path}: corrupt safetensors file (header is not JSON: {e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise DycError(f"{path}: bad safetensors metadata: __metadata__ must map strings to strings")
    return meta


def _read_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    meta = _safetensors_metadata(data, path)
    try:
        sd = load(data)
    except Exception as e:  # SafetensorError is not importable across versions
        raise DycError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]})") from None
    return sd, meta


def _read_pickle(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise DycError(
                f"{path}: refused: the pickle needs code to run to load (only tensors and plain containers "
                "are allowed; dyc never executes pickled code)"
            ) from None
        raise DycError(f"{path}: corrupt pickle ({str(e).splitlines()[0]})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, KeyError,
            IndexError, AttributeError) as e:
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


@dataclass
class RawCheckpoint:
    """A checkpoint file as read: its state dict, safetensors metadata, and the bytes' sha256 and size."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str
    size: int


def read_checkpoint_file(path: str | os.PathLike, *, expect_sha256: str | None = None) -> RawCheckpoint:
    """Read a checkpoint file once: state dict (``module.`` stripped, wrapper unwrapped), metadata, sha256.

    ``expect_sha256``: refuse (``ChecksumMismatch``) unless the bytes read have this sha256.
    """
    path = Path(path)
    if path.is_dir():
        raise DycError(diffusers_format.directory_hint(path) or f"{path}: is a directory, not a checkpoint file")
    data = read_bytes(path, "checkpoint file")
    digest = sha256_bytes(data)
    if expect_sha256 is not None and digest != expect_sha256:
        raise ChecksumMismatch(f"{path}: sha256 {digest[:16]}… is not the expected {expect_sha256[:16]}…",
                               str(path), expect_sha256, digest)
    kind = _sniff(data[:9])
    if kind == "unknown":
        raise DycError(f"{path}: not a checkpoint (neither safetensors nor a torch file)")
    if kind == "safetensors":
        sd, meta = _read_safetensors(data, path)
    else:
        sd, meta = _read_pickle(data, path), {}
    sd = _clean(sd, path)
    if diffusers_format.is_diffusers_dit(sd):  # diffusers' DiTTransformer2DModel: renamed to the official layout
        sd, meta = diffusers_format.to_official_layout(sd, meta, path)
    return RawCheckpoint(sd, meta, digest, len(data))


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The raw state dict (``module.`` stripped, wrapper unwrapped, diffusers names mapped) and safetensors metadata."""
    raw = read_checkpoint_file(path)
    return raw.state_dict, raw.metadata


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
    dtype: torch.dtype = torch.float32, num_heads: int | None = None,
) -> tuple[ModelConfig, DyDiT]:
    try:
        cfg = infer_config(sd, metadata, num_heads=num_heads)
    except DycError as e:
        raise type(e)(f"{path}: {e}") from None  # a UsageError (--num-heads 0) stays one
    from .families import build_model

    with torch.device("meta"):
        model = build_model(cfg)  # DyDiT, or another family's model (dyc.families)
    check_keys(sd, model, path)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    model.pos_embed.requires_grad_(False)
    return cfg, model.eval()


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, num_heads: int | None = None,
                    expect_sha256: str | None = None) -> Checkpoint:
    """Load a DiT or DyDiT checkpoint in the official layout; the config is inferred from shapes.

    ``num_heads``: the head count of a plain DiT of a non-official width that carries no ``dyc.config``
    metadata (a DyDiT's routers give it; a contradicting value is an error). ``expect_sha256``: refuse
    the file unless its bytes have this sha256 (``ChecksumMismatch``).

    >>> ck = load_checkpoint("DyDiT-XL-2.safetensors")   # doctest: +SKIP
    >>> out = ck.model(x, t, y)                          # official masked semantics
    """
    raw = read_checkpoint_file(path, expect_sha256=expect_sha256)
    cfg, model = model_from_state_dict(raw.state_dict, raw.metadata, path=path, dtype=dtype, num_heads=num_heads)
    return Checkpoint(config=cfg, model=model, metadata=raw.metadata, path=Path(path), sha256=raw.sha256,
                      size=raw.size)


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
    make_output_dir(path.parent)
    target = output_target(path, "checkpoint")  # never replaces a directory, FIFO or device
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata=meta)
        os.replace(tmp, target)
    except OSError as e:
        raise DycError(f"{path}: cannot write the checkpoint ({os_error_reason(e)}); nothing was changed there"
                       ) from None
    except Exception as e:  # safetensors reports IO errors as its own exception type
        if "No space left" in str(e) or "Read-only" in str(e) or "Permission denied" in str(e):
            raise DycError(f"{path}: cannot write the checkpoint ({str(e).splitlines()[0]}); "
                           "nothing was changed there") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path
