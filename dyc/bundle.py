"""Load a compiled ``NAME.dyc/`` bundle (format: docs/bundle.md).

Used by every consumer of a bundle (verify, the runtimes, the TensorRT backend, the C++
runtime's Python side). Loading refuses, with one clear ``DycError``, anything that is not
exactly what ``dyc compile`` wrote: a missing or altered file (size and sha256), an unknown
schema version, a hand-edited manifest (its self-checksum and its internal consistency).

Consumers that build engines from the bundle's files take their bytes from ``Bundle.read_file``
(``graph_bytes``, ``weights_bytes``): each file is read once, its size and sha256 are checked on
those bytes, and the engine is built from those same bytes. Nothing is reopened by path after the
check, so a concurrent recompile or copy over the bundle cannot make it run unchecked weights.

>>> b = Bundle.load("dydit-xl.dyc")                    # doctest: +SKIP
>>> g = b.group_for_t(981)
>>> feeds = {"x": x, "t": t, "y": y, **b.mask_inputs(981, batch=x.shape[0])}
>>> dyc.ort_session.bundle_session(b, g).run(None, feeds)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compiler.plan import NUM_T, Architecture, GroupPlan
from .config import ModelConfig
from .errors import DycError
from .fileio import read_bytes, read_text, sha256_bytes, sha256_file, stream_sha256

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
    return sha256_bytes(canonical_json(body))


file_sha256 = sha256_file  # the project's one sha256 helper (dyc.fileio), under its older name here


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
            raise DycError(f"{path}: no such bundle directory{_aside_hint(path)}")
        if not mpath.exists():
            raise DycError(f"{path}: not a dyc bundle (no {MANIFEST}; an interrupted compile leaves none)")
        text = read_text(mpath, "bundle manifest")
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise DycError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DycError(f"{mpath}: not a dyc bundle manifest (format is not {FORMAT!r})")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DycError(
                f"{mpath}: unknown schema version {version!r}: this dyc reads version {SCHEMA_VERSION}; "
                "recompile the bundle with this dyc"
            )
        try:
            checksum = manifest_checksum(manifest)
        except (TypeError, ValueError) as e:  # e.g. a non-finite number: not canonical JSON
            raise DycError(f"{mpath}: malformed manifest ({e})") from None
        if manifest.get("manifest_sha256") != checksum:
            raise DycError(
                f"{mpath}: the manifest was modified after compile (its checksum does not match its content); "
                "hand-edited manifests are refused: recompile instead"
            )
        try:
            b = cls._from_manifest(path, manifest)
            b._check_consistency()
            b._check_file_table()
        except DycError as e:
            if str(e).startswith(str(mpath)):
                raise
            raise DycError(f"{mpath}: malformed manifest ({e})") from None
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise DycError(f"{mpath}: malformed manifest ({what})") from None
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

    def _check_file_table(self) -> None:
        """The manifest's file table: plain names inside the bundle, sizes and sha256 of the right types."""
        table = self.manifest["files"]
        if not isinstance(table, dict):
            raise self._fail("files must be an object {name: {bytes, sha256}}")
        for name, info in table.items():
            if Path(name).name != name or name in (".", ".."):
                raise self._fail(f"file name {name!r} is not a plain name inside the bundle")
            if not isinstance(info, dict) or isinstance(info.get("bytes"), bool) or \
                    not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
                raise self._fail(f"file {name!r}: needs an integer 'bytes' and a string 'sha256'")
        named = {f for g in self.manifest["groups"] for f in g["files"].values()}
        if not all(isinstance(f, str) for f in named) or not named <= set(table):
            raise self._fail(f"group files missing from the file table: {sorted(map(str, named - set(table)))}")
        weights = self.weights_file
        if weights not in table:
            raise self._fail(f"the weights file {weights!r} is not in the file table")

    def _check_files(self, verify_checksums: bool) -> None:
        for name, info in self.manifest["files"].items():
            p = self.path / name
            if not p.exists():
                raise DycError(f"{self.path}: bundle file {name} is missing")
            if not p.is_file():
                raise DycError(f"{self.path}: bundle file {name} is not a regular file")
            if p.stat().st_size != info["bytes"]:
                raise DycError(f"{self.path}: bundle file {name} has {p.stat().st_size} bytes, "
                               f"expected {info['bytes']}")
            if verify_checksums:
                self._checked_bytes(name, sha256_file, p)

    def _checked_bytes(self, name: str, digest, source) -> None:
        info = self.manifest["files"][name]
        got = digest(source)
        if got != info["sha256"]:
            raise DycError(f"{self.path}: bundle file {name} was altered since the compile (sha256 mismatch; a "
                           "concurrent recompile or copy over this bundle?): load it again, or recompile")

    # ---- verified bytes --------------------------------------------------------------
    @property
    def weights_file(self) -> str:
        onnx = self.manifest.get("onnx")
        return (onnx.get("weights_file") if isinstance(onnx, dict) else None) or "weights.bin"

    def read_file(self, name: str) -> bytes:
        """A file of the bundle, read once and checked (size, sha256) on the bytes returned.

        Build engines and sessions from these bytes, never by reopening the path: that is what
        makes the check cover what runs.
        """
        info = self.manifest["files"].get(name)
        if info is None:
            raise DycError(f"{self.path}: {name} is not a file of this bundle")
        data = read_bytes(self.path / name, "bundle file")
        if len(data) != info["bytes"]:
            raise DycError(f"{self.path}: bundle file {name} has {len(data)} bytes, expected {info['bytes']} "
                           "(changed since the compile: load it again, or recompile)")
        self._checked_bytes(name, sha256_bytes, data)
        return data

    def stream_file(self, name: str, sink, chunk: int = 1 << 26) -> None:
        """Feed a file of the bundle to ``sink(offset, memoryview)`` in chunks, then check size and sha256.

        For files too large to hold twice (weights.bin to a device buffer): the caller keeps only what
        ``sink`` stored, and uses it only after this returns (the check covers those very bytes).
        """
        info = self.manifest["files"].get(name)
        if info is None:
            raise DycError(f"{self.path}: {name} is not a file of this bundle")
        got, digest = stream_sha256(self.path / name, sink, info["bytes"], "bundle file", chunk)
        if got != info["bytes"]:
            raise DycError(f"{self.path}: bundle file {name} does not have the {info['bytes']} bytes the manifest "
                           "says (changed since the compile: load it again, or recompile)")
        self._checked_bytes(name, lambda _: digest, None)

    def graph_bytes(self, group: GroupPlan | int, variant: str = "std") -> bytes:
        """The checked ONNX graph of a group (its initializers are external data in ``weights_file``)."""
        return self.read_file(self.onnx_path(group, variant).name)

    def weights_bytes(self) -> bytes:
        """The checked ``weights.bin``: every graph's external data, one copy for all groups."""
        return self.read_file(self.weights_file)

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


# temp dirs of a compile into NAME.dyc (dyc/compiler/bundle.py): the new bundle being written, and
# (only where no atomic exchange exists) the previous one moved aside for a moment
TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def aside_copies(out: Path) -> list[Path]:
    """Previous bundles of ``out`` that an interrupted compile left moved aside (see dyc/compiler/bundle.py)."""
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if (m := TEMP_DIR.match(p.name)) and m.group("name") == out.name and m.group("kind") == "old")


def _aside_hint(path: Path) -> str:
    found = aside_copies(path)
    return f" (an interrupted compile moved the previous bundle to {found[-1]}: rename it back)" if found else ""
