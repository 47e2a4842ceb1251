"""Load a compiled ``NAME.dyc/`` bundle (format: docs/bundle.md).

Used by every consumer of a bundle (verify, the runtimes, the TensorRT backend, the C++
runtime's Python side). Loading refuses, with one clear ``DycError``, anything that is not
exactly what ``dyc compile`` wrote: a missing or altered file (size and sha256), an unknown
schema version, a hand-edited manifest (its self-checksum and its internal consistency).

>>> b = Bundle.load("dydit-xl.dyc")                    # doctest: +SKIP
>>> g = b.group_for_t(981)
>>> feeds = {"x": x, "t": t, "y": y, **b.mask_inputs(981, batch=x.shape[0])}
>>> onnxruntime.InferenceSession(b.onnx_path(g, "std")).run(None, feeds)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compiler.plan import NUM_T, Architecture, GroupPlan
from .config import ModelConfig
from .errors import DycError

FORMAT = "dyc-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VARIANTS = ("std", "trt", "cuda")
REQUIRED_VARIANTS = ("std", "trt")  # bundles of dyc before the cuda variant have only these
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}  # bf16 masks: see mask_inputs


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest without its own ``manifest_sha256`` field, in canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict
    config: ModelConfig
    dtype: str
    groups: list[GroupPlan]
    architectures: list[Architecture]
    arch_of_t: list[int]

    # ---- loading -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, *, verify_checksums: bool = True) -> Bundle:
        """Open and check a bundle. ``verify_checksums=False`` checks sizes only (fast for XL)."""
        path = Path(path)
        mpath = path / MANIFEST
        if not path.is_dir():
            raise DycError(f"{path}: no such bundle directory")
        if not mpath.is_file():
            raise DycError(f"{path}: not a dyc bundle (no {MANIFEST}; an interrupted compile leaves none)")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DycError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DycError(f"{mpath}: not a dyc bundle manifest (format is not {FORMAT!r})")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DycError(
                f"{mpath}: unknown schema version {version!r}: this dyc reads version {SCHEMA_VERSION}; "
                "recompile the bundle with this dyc"
            )
        if manifest.get("manifest_sha256") != manifest_checksum(manifest):
            raise DycError(
                f"{mpath}: the manifest was modified after compile (its checksum does not match its content); "
                "hand-edited manifests are refused: recompile instead"
            )
        try:
            b = cls._from_manifest(path, manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise DycError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})") from None
        b._check_consistency()
        b._check_files(verify_checksums)
        return b

    @classmethod
    def _from_manifest(cls, path: Path, m: dict) -> Bundle:
        cfg = ModelConfig.from_dict(m["model"]["config"])
        archs = [Architecture(head=list(a["head"]), channel=list(a["channel"])) for a in m["masks"]["architectures"]]
        groups = [GroupPlan.from_dict({k: v for k, v in g.items() if k in _GROUP_FIELDS}) for g in m["groups"]]
        return cls(path=path, manifest=m, config=cfg, dtype=m["dtype"], groups=groups, architectures=archs,
                   arch_of_t=list(m["masks"]["arch_of_t"]))

    def _fail(self, what: str) -> DycError:
        return DycError(f"{self.path / MANIFEST}: inconsistent manifest: {what}")

    def _check_consistency(self) -> None:
        cfg, h = self.config, self.config.num_heads
        if self.dtype not in NP_DTYPES:
            raise self._fail(f"unknown dtype {self.dtype!r}")
        if len(self.arch_of_t) != NUM_T or any(not (0 <= a < len(self.architectures)) for a in self.arch_of_t):
            raise self._fail(f"masks.arch_of_t must hold {NUM_T} indices into masks.architectures")
        for i, a in enumerate(self.architectures):
            for bits in (a.head, a.channel):
                if len(bits) != cfg.depth or any(not (0 <= int(b) < (1 << h)) or not (int(b) & 1) for b in bits):
                    raise self._fail(f"architecture {i}: one {h}-bit mask per layer with head/group 0 on")
        if not self.groups:
            raise self._fail("no groups")
        expect = 0
        for i, g in enumerate(self.groups):
            if g.index != i or g.t_lo != expect or g.t_hi < g.t_lo:
                raise self._fail(f"group {i}: groups must tile t = 0..{NUM_T - 1} in order (t_lo {g.t_lo})")
            expect = g.t_hi + 1
            members = sorted(set(self.arch_of_t[g.t_lo:g.t_hi + 1]))
            if sorted(g.architectures) != members:
                raise self._fail(f"group {i}: member architectures {g.architectures} != those of t {g.t_lo}..{g.t_hi}")
            for l in range(cfg.depth):
                for kind, units, vary in (("head", g.heads[l], g.vary_head[l]),
                                          ("channel", g.channels[l], g.vary_channel[l])):
                    masks = [int(getattr(self.architectures[a], kind)[l]) for a in members]
                    union = 0
                    for mbits in masks:
                        union |= mbits
                    if sorted(units) != [u for u in range(h) if union >> u & 1] or len(set(units)) != len(units):
                        raise self._fail(f"group {i} layer {l}: {kind}s {units} are not the union of its members")
                    if vary != any(mbits != union for mbits in masks):
                        raise self._fail(f"group {i} layer {l}: vary_{kind} flag is wrong")
            files = self.manifest["groups"][i].get("files", {})
            if not set(REQUIRED_VARIANTS) <= set(files) <= set(VARIANTS):
                raise self._fail(f"group {i}: files must name the variants {REQUIRED_VARIANTS} (and may name cuda)")
        if expect != NUM_T:
            raise self._fail(f"groups end at t={expect - 1}, not {NUM_T - 1}")

    def _check_files(self, verify_checksums: bool) -> None:
        table = self.manifest.get("files", {})
        named = {f for g in self.manifest["groups"] for f in g["files"].values()}
        if not named <= set(table):
            raise self._fail(f"group files missing from the file table: {sorted(named - set(table))}")
        for name, info in table.items():
            p = self.path / name
            if Path(name).name != name:
                raise self._fail(f"file name {name!r} is not a plain name inside the bundle")
            if not p.is_file():
                raise DycError(f"{self.path}: bundle file {name} is missing")
            if p.stat().st_size != info["bytes"]:
                raise DycError(
                    f"{self.path}: bundle file {name} has {p.stat().st_size} bytes, expected {info['bytes']}"
                )
            if verify_checksums and file_sha256(p) != info["sha256"]:
                raise DycError(f"{self.path}: bundle file {name} was altered (sha256 mismatch)")

    # ---- queries -----------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        return self.config.dynamic

    @property
    def threshold_offset(self) -> float:
        return float(self.manifest["threshold_offset"])

    @property
    def schedule(self) -> list[int]:
        return list(self.manifest["schedule"]["timesteps"])

    def _check_t(self, t: int) -> int:
        if isinstance(t, bool) or int(t) != t:
            raise DycError(f"timestep must be an integer, got {t!r}")
        t = int(t)
        if not 0 <= t < NUM_T:
            raise DycError(f"timestep {t} is outside every group of {self.path.name} (groups cover 0..{NUM_T - 1})")
        return t

    def group_for_t(self, t: int) -> GroupPlan:
        t = self._check_t(t)
        for g in self.groups:
            if g.contains(t):
                return g
        raise DycError(f"timestep {t} is outside every group of {self.path.name}")  # unreachable after checks

    def masks_for_t(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """TDW masks of timestep t: head and channel-group masks [L, H] bool."""
        a = self.architectures[self.arch_of_t[self._check_t(t)]]
        return a.masks(self.config.num_heads)

    def mask_inputs(self, t: int, batch: int) -> dict[str, np.ndarray]:
        """The mask inputs t's group engine takes (none when its members agree), [B, L, slots].

        For bf16 bundles the arrays are float32 0/1: convert them to bf16 for the runtime.
        """
        g = self.group_for_t(t)
        head, channel = self.masks_for_t(t)
        out = {}
        np_dtype = NP_DTYPES[self.dtype]
        for name, needed, units, mask, slots in (
            ("head_mask", g.needs_head_mask, g.heads, head, g.head_slots),
            ("channel_mask", g.needs_channel_mask, g.channels, channel, g.channel_slots),
        ):
            if not needed:
                continue
            m = np.ones((self.config.depth, slots), dtype=np_dtype)
            for l, us in enumerate(units):
                m[l, : len(us)] = mask[l, us]
            out[name] = np.broadcast_to(m, (batch, *m.shape)).copy()
        return out

    def onnx_path(self, group: GroupPlan | int, variant: str = "std") -> Path:
        """The ONNX file of a group: ``std`` (standard ops), ``trt`` (``dyc::SdtMlp``) or ``cuda`` (ORT CUDA EP)."""
        if variant not in VARIANTS:
            raise DycError(f"unknown ONNX variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        idx = group.index if isinstance(group, GroupPlan) else int(group)
        if not 0 <= idx < len(self.groups):
            raise DycError(f"{self.path.name} has no group {idx} (it has {len(self.groups)})")
        files = self.manifest["groups"][idx]["files"]
        if variant not in files:
            raise DycError(f"{self.path.name} has no {variant!r} graphs (compiled by an older dyc): recompile it")
        return self.path / files[variant]

    def has_variant(self, variant: str) -> bool:
        """Whether every group has a graph of this variant (``cuda`` is absent from older bundles)."""
        return all(variant in g["files"] for g in self.manifest["groups"])


_GROUP_FIELDS = {f for f in GroupPlan.__dataclass_fields__}
