"""Shared ONNX Runtime weights hold only the bytes of weights.bin the loaded graphs reference.

``spans_of`` merges the graphs' weight ranges into sorted, disjoint spans laid out back to back
(alignment modulo 64 kept), ``remap`` moves every weight's offset into that compacted buffer, and
``host_weights`` streams the whole file (hashing every byte) while keeping only the spans. Checked on
hand-made ranges, and end to end on a bundle whose weights.bin gained a tensor no graph references.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_fixtures import tame_config, tame_model

from dyc.backends.ort_weights import Span, WeightRef, host_weights, remap, spans_of, spans_size
from dyc.bundle import Bundle, manifest_checksum
from dyc.checkpoint import save_checkpoint
from dyc.errors import DycError


def _ref(name: str, offset: int, length: int) -> WeightRef:
    return WeightRef(name, 2, (length,), offset, length)  # uint8: one element per byte


# b overlaps a, c touches b's end, d after a gap (twice), f at a start that is not 64-aligned
REFS = [_ref("f", 10005, 20), _ref("a", 4096, 100), _ref("b", 4146, 100), _ref("d", 8192, 64),
        _ref("c", 4246, 10), _ref("d2", 8192, 64), _ref("empty", 9000, 0)]


def test_spans_merge_overlapping_and_adjacent_ranges_and_keep_alignment():
    spans = spans_of(REFS)
    # by hand: [4096, 4256) at 0; [8192, 8256) at round64(160) = 192; [10005, 10025) at 256 + 10005 % 64 = 277
    assert spans == [Span(4096, 0, 160), Span(8192, 192, 64), Span(10005, 277, 20)]
    assert spans_size(spans) == 297 and spans_size([]) == 0 and spans_of([]) == []
    assert all(s.dst % 64 == s.src % 64 for s in spans)
    assert [r.offset for r in remap(REFS, spans)] == [277, 0, 50, 192, 150, 192, 0]
    for bad in (_ref("gap", 5000, 8), _ref("across", 8250, 16), _ref("before", 0, 8)):
        with pytest.raises(DycError, match="outside the loaded spans"):
            remap([bad], spans)


class _Streamed:
    """Just what ``host_weights`` uses of a Bundle: the file table and ``stream_file``, in 37-byte chunks
    (so chunks cross every span boundary)."""

    def __init__(self, data: bytes):
        self.data, self.path = data, Path("stub.dyc")
        self.manifest = {"files": {"weights.bin": {"bytes": len(data)}}}

    def stream_file(self, name, sink, chunk):
        for off in range(0, len(self.data), 37):
            sink(off, memoryview(self.data)[off: off + 37])


def test_host_weights_keep_only_the_spans_at_their_remapped_offsets():
    data = bytes((i * 7 + 3) % 251 for i in range(11000))
    spans = spans_of(REFS)
    buf = host_weights(_Streamed(data), spans)  # type: ignore[arg-type]
    assert buf.dtype == np.uint8 and len(buf) == 297
    for r, m in zip(REFS, remap(REFS, spans), strict=True):
        assert buf[m.offset: m.offset + m.length].tobytes() == data[r.offset: r.offset + r.length], r.name
    assert host_weights(_Streamed(data)).tobytes() == data  # no spans: the whole file, as before


# ---- end to end: a bundle with a tensor no graph references ----------------------------------------

JUNK = 4096  # one store-aligned (ALIGN) tensor's worth: every later offset keeps its alignment


def _external(model) -> list:
    import onnx

    return [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]


def _range(init) -> tuple[int, int]:
    e = {x.key: x.value for x in init.external_data}
    return int(e.get("offset", 0)), int(e["length"])


def _with_unreferenced_tensor(src: Path, dst: Path) -> int:
    """A copy of bundle ``src`` whose weights.bin has JUNK bytes inserted at a tensor boundary in its
    middle, every graph's offsets past it shifted, and the manifest's sizes and checksums redone.
    Returns where the junk is."""
    import onnx

    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    models = {n: onnx.load(dst / n, load_external_data=False) for n in m["files"] if n.endswith(".onnx")}
    ranges = [_range(i) for model in models.values() for i in _external(model)]
    # a tensor's start that no range straddles (graphs may reference slices of a stored tensor)
    cuts = sorted({o for o, _ in ranges if not any(a < o < a + n for a, n in ranges)})
    at = cuts[len(cuts) // 2]
    raw = (dst / "weights.bin").read_bytes()
    junk = np.random.default_rng(0).standard_normal(JUNK // 4).astype(np.float32).tobytes()
    files = {"weights.bin": raw[:at] + junk + raw[at:]}
    for n, model in models.items():
        for init in _external(model):
            for e in init.external_data:
                if e.key == "offset" and int(e.value) >= at:
                    e.value = str(int(e.value) + JUNK)
        files[n] = model.SerializeToString()
    for n, data in files.items():
        (dst / n).write_bytes(data)
        m["files"][n] = {**m["files"][n], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    m["manifest_sha256"] = manifest_checksum(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return at


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path, int]:
    pytest.importorskip("onnxruntime")
    from dyc.compiler.compile import compile_checkpoint

    d = tmp_path_factory.mktemp("spans")
    torch.set_num_threads(1)
    # the tame DyDiT (bounded outputs): a random one amplifies the owned sessions' other GEMM kernels
    ck = save_checkpoint(tame_model(tame_config(), seed=2), d / "m.safetensors")
    plain = compile_checkpoint(ck, d / "m.dyc", groups=3, calib=1, calib_steps=2).path
    at = _with_unreferenced_tensor(plain, d / "junk.dyc")
    return plain, d / "junk.dyc", at


def _referenced(b: Bundle) -> tuple[int, int]:
    """Bytes of weights.bin the std graphs reference (overlaps counted once), and in how many disjoint
    runs: from the ONNX files' external_data, read with the onnx package."""
    import onnx

    cover = np.zeros(b.manifest["files"]["weights.bin"]["bytes"] + 1, dtype=bool)
    for g in b.groups:
        for init in _external(onnx.load(b.onnx_path(g, "std"), load_external_data=False)):
            o, n = _range(init)
            cover[o: o + n] = True
    return int(cover.sum()), int((np.diff(cover.astype(np.int8)) == 1).sum() + cover[0])


def _feeds(b: Bundle, t: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    feeds = {"x": x, "t": torch.full((x.shape[0],), t), "y": torch.tensor([3, 10])}
    feeds.update({k: torch.from_numpy(v) for k, v in b.mask_inputs(t, x.shape[0]).items()})
    return feeds


def test_shared_weights_hold_only_the_referenced_bytes(bundles):
    from dyc.backends.onnxruntime import OnnxRuntimeBackend

    plain_path, junk_path, at = bundles
    plain, junk = Bundle.load(plain_path), Bundle.load(junk_path)
    size = junk.manifest["files"]["weights.bin"]["bytes"]
    assert size == plain.manifest["files"]["weights.bin"]["bytes"] + JUNK
    referenced, runs = _referenced(junk)
    shared, owned = OnnxRuntimeBackend(junk, threads=1), OnnxRuntimeBackend(junk, share_weights=False, threads=1)
    base = OnnxRuntimeBackend(plain, threads=1)
    held = shared.weight_bytes()
    # the referenced bytes, plus under 64 bytes of alignment padding per run; never the junk tensor
    assert referenced <= held < referenced + 64 * runs, (held, referenced, runs)
    assert held <= size - JUNK and held == base.weight_bytes()
    assert owned.weight_bytes() == 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for g in junk.groups:
        for t in (g.t_lo, g.t_hi):
            a, o, p = (be.run_group(g.index, _feeds(junk, t, x)) for be in (shared, owned, base))
            assert torch.equal(a, p)  # same graphs, same kernels: the compacted copy reads the same bytes
            # sessions owning their weights pre-pack GEMMs (other kernels): relative 1e-5
            assert ((a - o).abs().max() / o.abs().max()).item() < 1e-5


def test_bytes_outside_the_spans_are_still_checked(tmp_path, bundles):
    """The whole file's sha256 is checked on the bytes streamed, not only on the ones kept."""
    from dyc.backends.onnxruntime import OnnxRuntimeBackend

    _, junk_path, at = bundles
    copy = tmp_path / "c.dyc"
    shutil.copytree(junk_path, copy)
    b = Bundle.load(copy)
    with open(copy / "weights.bin", "r+b") as f:  # one flipped bit inside the unreferenced tensor
        f.seek(at + 100)
        v = f.read(1)[0]
        f.seek(at + 100)
        f.write(bytes([v ^ 1]))
    with pytest.raises(DycError, match="weights.bin was altered"):
        OnnxRuntimeBackend(b, threads=1)
