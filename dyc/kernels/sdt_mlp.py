"""dyc::SdtMlp — the fused SDT MLP of DyDiT — through the C ABI of ``libdyc_plugins.so``.

``sdt_mlp`` runs the CUDA kernels (plugins/src) on CUDA tensors: the kept-token count stays on the
device, so the call never synchronises with the host and can be captured in a CUDA graph.
``sdt_mlp_reference`` is the eager semantics in plain PyTorch (full MLP on every token, then the
token mask), the reference the kernels are tested against and the CPU path.

The library is found through ``$DYC_PLUGIN_LIB`` (a path to the .so), else in the CMake build
folders ``build/lib`` / ``build`` of this checkout (``cmake -S . -B build && cmake --build build``).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["PluginNotBuiltError", "available", "library_path", "sdt_mlp", "sdt_mlp_reference", "select_path",
           "version"]

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FLAG_FORCE_GENERIC = 1
FLAG_SHARED_CHANNEL_MASK = 2  # channel_mask is one row [1, G] for every image
PATHS = {0: "generic", 1: "sm90_cutlass"}
_LIB_NAME = "libdyc_plugins.so"
_lib: ctypes.CDLL | None = None


class PluginNotBuiltError(RuntimeError):
    """libdyc_plugins.so was not found or could not be loaded."""


def _candidates() -> list[Path]:
    env = os.environ.get("DYC_PLUGIN_LIB")
    if env:
        return [Path(env)]
    root = Path(__file__).resolve().parents[2]
    return [root / "build" / "lib" / _LIB_NAME, root / "build" / "plugins" / _LIB_NAME, root / "build" / _LIB_NAME]


def library_path() -> Path | None:
    """The library that would be loaded, or None if none is built."""
    return next((p for p in _candidates() if p.is_file()), None)


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if path is None:
        where = ", ".join(str(p) for p in _candidates())
        raise PluginNotBuiltError(
            f"{_LIB_NAME} is not built (looked in: {where}). Build it with "
            "`cmake -S . -B build && cmake --build build -j` or point DYC_PLUGIN_LIB at it.")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise PluginNotBuiltError(f"cannot load {path}: {e}") from e
    vp, i64, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32
    lib.dyc_sdt_mlp_version.restype = ctypes.c_char_p
    lib.dyc_sdt_mlp_version.argtypes = []
    lib.dyc_sdt_mlp_status_string.restype = ctypes.c_char_p
    lib.dyc_sdt_mlp_status_string.argtypes = [ctypes.c_int]
    lib.dyc_sdt_mlp_workspace_size.restype = ctypes.c_size_t
    lib.dyc_sdt_mlp_workspace_size.argtypes = [ctypes.c_int, i64, i64, i64, i64, i64]
    lib.dyc_sdt_mlp_select_path.restype = ctypes.c_int
    lib.dyc_sdt_mlp_select_path.argtypes = [ctypes.c_int, i64, i64, i64, ctypes.c_int, u32]
    lib.dyc_sdt_mlp_forward.restype = ctypes.c_int
    lib.dyc_sdt_mlp_forward.argtypes = [ctypes.c_int] + [vp] * 11 + [i64] * 6 + [ctypes.c_float, vp, ctypes.c_size_t,
                                                                               u32, vp]
    _lib = lib
    return lib


def available() -> bool:
    """True when the library loads (a GPU is still needed to run it)."""
    try:
        _load()
        return True
    except PluginNotBuiltError:
        return False


def version() -> str:
    return _load().dyc_sdt_mlp_version().decode()


def workspace_size(dtype: torch.dtype, batch: int, tokens: int, channels: int, hidden: int, group_size: int) -> int:
    return int(_load().dyc_sdt_mlp_workspace_size(_DTYPES[dtype], batch, tokens, channels, hidden, group_size))


def select_path(dtype: torch.dtype, channels: int, hidden: int, group_size: int, device: int = 0,
                force_generic: bool = False) -> str:
    """Which kernel path the library takes for these sizes on ``device`` ("sm90_cutlass" or "generic")."""
    flags = FLAG_FORCE_GENERIC if force_generic else 0
    return PATHS[_load().dyc_sdt_mlp_select_path(_DTYPES[dtype], channels, hidden, group_size, device, flags)]


def _group_size(hidden: int, channel_mask: torch.Tensor | None, group_size: int | None) -> int:
    if group_size is not None:
        return int(group_size)
    if channel_mask is not None:
        return hidden // channel_mask.shape[-1]
    return hidden


def sdt_mlp(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor, keep: torch.Tensor,
            fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor, fc2_b: torch.Tensor,
            channel_mask: torch.Tensor | None = None, group_size: int | None = None, eps: float = 1e-6, *,
            out: torch.Tensor | None = None, force_generic: bool = False) -> torch.Tensor:
    """The fused op on CUDA tensors. ``out`` may be ``x`` itself (in-place residual update).

    Shapes: x [B, N, C]; shift/scale/gate [B, C]; keep [B, N] (kept iff > 0.5); fc1_w [Hs, C];
    fc1_b [Hs]; fc2_w [C, Hs]; fc2_b [C]; channel_mask [B, Hs // group_size], or [1, Hs // group_size]
    for one mask shared by every image (a sampler call runs one timestep: faster GEMM1 on Hopper), or None.
    """
    if not x.is_cuda:
        raise ValueError("sdt_mlp runs on CUDA tensors; use sdt_mlp_reference on CPU")
    if x.dtype not in _DTYPES:
        raise TypeError(f"sdt_mlp: unsupported dtype {x.dtype} (float32, float16, bfloat16)")
    if x.dim() != 3:
        raise ValueError(f"sdt_mlp: x must be [B, N, C], got {tuple(x.shape)}")
    b, n, c = x.shape
    hidden = fc1_w.shape[0]
    gs = _group_size(hidden, channel_mask, group_size)
    expect = {"shift": (shift, (b, c)), "scale": (scale, (b, c)), "gate": (gate, (b, c)), "keep": (keep, (b, n)),
              "fc1_w": (fc1_w, (hidden, c)), "fc1_b": (fc1_b, (hidden,)), "fc2_w": (fc2_w, (c, hidden)),
              "fc2_b": (fc2_b, (c,))}
    shared = channel_mask is not None and channel_mask.dim() == 2 and channel_mask.shape[0] == 1
    if channel_mask is not None:
        expect["channel_mask"] = (channel_mask, (1 if shared else b, hidden // gs))
    if gs <= 0 or hidden % gs:
        raise ValueError(f"sdt_mlp: hidden {hidden} is not a multiple of group_size {gs}")
    # fc2_w may be a column slice of a wider matrix (weights shared between engines): read in place
    in_place = fc2_w.dim() == 2 and fc2_w.dtype == x.dtype and fc2_w.stride(1) == 1 and fc2_w.stride(0) >= hidden
    fc2_ld = fc2_w.stride(0) if in_place else 0
    args = {}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"sdt_mlp: {name} must be {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"sdt_mlp: {name} is on {t.device}, x on {x.device}")
        # masks may come as bool/float; all share x's dtype
        args[name] = t if (name == "fc2_w" and fc2_ld) else t.to(x.dtype).contiguous()
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError("sdt_mlp: out must be a contiguous tensor like x")
    lib = _load()
    dt = _DTYPES[x.dtype]
    ws_bytes = lib.dyc_sdt_mlp_workspace_size(dt, b, n, c, hidden, gs)
    ws = torch.empty(max(int(ws_bytes), 1), dtype=torch.uint8, device=x.device)  # stream-ordered, graph-safe
    cm = args.get("channel_mask")
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        status = lib.dyc_sdt_mlp_forward(
            dt, x.data_ptr(), args["shift"].data_ptr(), args["scale"].data_ptr(), args["gate"].data_ptr(),
            args["keep"].data_ptr(), args["fc1_w"].data_ptr(), args["fc1_b"].data_ptr(), args["fc2_w"].data_ptr(),
            args["fc2_b"].data_ptr(), cm.data_ptr() if cm is not None else None, out.data_ptr(), b, n, c, hidden, gs,
            fc2_ld, float(eps), ws.data_ptr(), int(ws_bytes),
            (FLAG_FORCE_GENERIC if force_generic else 0) | (FLAG_SHARED_CHANNEL_MASK if shared else 0), stream)
    if status != 0:
        raise RuntimeError(f"dyc_sdt_mlp_forward failed: {lib.dyc_sdt_mlp_status_string(status).decode()} "
                           f"(status {status})")
    return out


def sdt_mlp_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor,
                      keep: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor,
                      fc2_b: torch.Tensor, channel_mask: torch.Tensor | None = None, group_size: int | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """Eager semantics (official DyDiT): the MLP on every token, then multiply by the token mask."""
    c = x.shape[-1]
    hidden = fc1_w.shape[0]
    gs = _group_size(hidden, channel_mask, group_size)
    h = F.layer_norm(x, (c,), eps=eps)
    h = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    h = F.linear(h, fc1_w, fc1_b)
    if channel_mask is not None:
        b, n, d = h.shape
        h = (h.view(b, n, d // gs, gs) * channel_mask.to(h.dtype)[:, None, :, None]).view(b, n, d)
    y = gate.unsqueeze(1) * F.linear(F.gelu(h, approximate="tanh"), fc2_w, fc2_b)
    mt = (keep > 0.5).to(x.dtype)  # kept iff keep > 0.5, as the kernels decide
    return x + y * mt.unsqueeze(-1)
