"""The torch backend: each group as a sliced PyTorch module, replayed from CUDA graphs.

Weights are sliced once at load (no masked zeros); attention runs through SDPA on the group's
heads only; SDT runs through the plugins/ kernel (gather kept tokens -> MLP -> gated
scatter-add) via its C ABI. On CUDA every (group, batch) is captured once into a CUDA graph,
all graphs drawing on one memory pool, since groups run one after another.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..errors import DycError
from ..kernels import ln_modulate as ln_kernels
from ..kernels import token_router
from ..kernels.ln_modulate import RouterHidden, router_keep_from_hidden
from ..model import modulate, timestep_embedding
from .base import Backend

if TYPE_CHECKING:
    from ..bundle import Bundle

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GroupLayout:
    """Which original heads / channel groups each layer of one engine keeps, and where it takes masks."""

    heads: list[list[int]]
    channels: list[list[int]]
    vary_head: list[bool]
    vary_channel: list[bool]


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6, fp32 statistics) then adaLN modulate."""
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf = F.layer_norm(x.to(wide), x.shape[-1:], eps=1e-6)
    return (xf * (1 + scale.to(wide).unsqueeze(1)) + shift.to(wide).unsqueeze(1)).to(x.dtype)


def gate_residual(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return h + gate.unsqueeze(1) * y


def add_ln_modulate(h: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, keep: torch.Tensor | RouterHidden | None,
                    shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's deferred gated residual ``h + gate·y (·keep)``, then LN+modulate of the result.

    ``keep`` may be the token router's hidden layer (``RouterHidden``), whose last steps then run here.
    Returns (new h, normalised); the CUDA kernel (dyc.kernels.ln_modulate) updates h in place.
    """
    if isinstance(keep, RouterHidden):
        keep = router_keep_from_hidden(keep)
    upd = gate.unsqueeze(1) * y
    if keep is not None:
        upd = upd * keep.unsqueeze(-1)
    h = h + upd
    return h, ln_modulate(h, shift, scale)


def patch_tokens(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, patch: int) -> torch.Tensor:
    """The patch embedding (a stride-``patch`` conv) as tokens [B, N, C] in w's dtype (a view).

    On CUDA the input goes in channels-last: cuDNN computes this conv in NHWC anyway, and its NHWC output
    is the [B, N, C] layout the blocks read, where the NCHW output made the position add a transposed,
    uncoalesced pass and a copy after it (~160 µs a step at 32 x 256 tokens, H200). The arithmetic is
    the same conv's; the CPU keeps the eager model's exact call."""
    x = x.to(w.dtype)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, w, b, stride=patch).flatten(2).transpose(1, 2)


def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GELU(tanh)(x·wᵀ + b). On CUDA one cuBLASLt GEMM with GELU in its epilogue (tanh form, as DiT's
    MLP); on the CPU ``_addmm_activation`` applies the erf form, so the CPU takes the two steps."""
    if x.is_cuda:
        return torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True).view(
            *x.shape[:-1], w.shape[0])
    return F.gelu(F.linear(x, w, b), approximate="tanh")


_FUSED: dict[str, Callable] = {}


def _fused(fn: Callable) -> Callable:
    """``fn`` compiled by inductor into one kernel (elementwise passes dominate at these widths).

    Shapes do not depend on the group, so each batch size compiles once for every group.
    """
    if fn.__name__ not in _FUSED:
        _FUSED[fn.__name__] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _FUSED[fn.__name__]


MLP_MODES = ("sdt", "dense", "dense-fold", "hybrid", "hybrid-fold")


def _fast_ln_modulate() -> tuple[Callable, Callable]:
    """The Triton LN+modulate kernels on CUDA (one read, one write per row; the second after the
    deferred residual add), else inductor's fusions."""
    from ..kernels import ln_modulate as k

    if k.available():
        return k.ln_modulate, k.add_ln_modulate
    return _fused(ln_modulate), _fused(add_ln_modulate)


def _fast_router(device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The token router as one Triton kernel (its skinny GEMM with ReLU, the second layer and the
    gate in the epilogue) where it runs (CUDA, fp16/bf16), else None (unfused PyTorch)."""
    if dtype not in (torch.float16, torch.bfloat16) or not token_router.available(device):
        return None
    return token_router.router_keep


def _sdt_mlp_op():
    """The fused kernel when its library is built and we are on CUDA, else the reference maths."""
    try:
        from ..kernels import sdt_mlp as k
    except ImportError:
        return None, None
    return (k.sdt_mlp if k.available() else None), k.sdt_mlp_reference


def sdt_mlp_torch(x, shift, scale, gate, keep, w1, b1, w2, b2, channel_mask, group_size: int):
    """Eager semantics of dyc::SdtMlp on all tokens (the CPU path and the fallback)."""
    h = F.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale), w1, b1)
    if channel_mask is not None:
        b, n, d = h.shape
        h = (h.view(b, n, d // group_size, group_size) * channel_mask[:, None, :, None]).view(b, n, d)
    y = F.linear(F.gelu(h, approximate="tanh"), w2, b2)
    return x + keep.unsqueeze(-1) * gate.unsqueeze(1) * y


def unit_order(sets: Sequence[Sequence[int]], n: int) -> list[int]:
    """Units used by any group, most-used first (nested sets become prefixes)."""
    count = [0] * n
    for s in sets:
        for u in s:
            count[u] += 1
    return sorted((u for u in range(n) if count[u]), key=lambda u: (-count[u], u))


class SharedWeights:
    """One copy of the model's weights on the device, shared by every group's engine.

    Per layer, heads and channel groups are stored in one order: by how many groups use them,
    most first. A group whose units of a layer are a prefix of that order takes views (qkv is
    stored head-major, so a prefix of heads is a prefix of rows; proj/fc2 take column slices,
    which GEMMs read in place); any other layer gets a sliced copy.
    """

    def __init__(self, cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layouts: Sequence[GroupLayout],
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.sd = sd
        h, c, dh, gs = cfg.num_heads, cfg.hidden_size, cfg.head_dim, cfg.group_size

        def w(name: str) -> torch.Tensor:
            return sd[name].to(device=self.device, dtype=dtype).contiguous()

        self.common = {k: w(k) for k in (
            "x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight", "final_layer.adaLN_modulation.1.weight",
            "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight", "final_layer.linear.bias")}
        # all adaLN modulations in one GEMM: c -> [B, L * 6C]
        self.common["ada_w"] = torch.cat([w(f"blocks.{l}.adaLN_modulation.1.weight") for l in range(cfg.depth)])
        self.common["ada_b"] = torch.cat([w(f"blocks.{l}.adaLN_modulation.1.bias") for l in range(cfg.depth)])
        self.head_order: list[list[int]] = []
        self.group_order: list[list[int]] = []
        self.layers: list[dict[str, torch.Tensor]] = []
        self.copies: list[torch.Tensor] = []  # sliced copies made for layers that are not prefixes
        for l in range(cfg.depth):
            p = f"blocks.{l}."
            ho = unit_order([lay.heads[l] for lay in layouts], h)
            go = unit_order([lay.channels[l] for lay in layouts], h)
            self.head_order.append(ho)
            self.group_order.append(go)
            hi, gi = torch.tensor(ho), torch.tensor(go)
            qkv_w = sd[p + "attn.qkv.weight"].view(3, h, dh, c).permute(1, 0, 2, 3)[hi].reshape(-1, c)
            qkv_b = sd[p + "attn.qkv.bias"].view(3, h, dh).permute(1, 0, 2)[hi].reshape(-1)
            layer = {
                "qkv_w": qkv_w, "qkv_b": qkv_b,
                "proj_w": sd[p + "attn.proj.weight"].view(c, h, dh)[:, hi].reshape(c, -1),
                "proj_b": sd[p + "attn.proj.bias"],
                "fc1_w": sd[p + "mlp.fc1.weight"].view(h, gs, c)[gi].reshape(-1, c),
                "fc1_b": sd[p + "mlp.fc1.bias"].view(h, gs)[gi].reshape(-1),
                "fc2_w": sd[p + "mlp.fc2.weight"].view(c, h, gs)[:, gi].reshape(c, -1),
                "fc2_b": sd[p + "mlp.fc2.bias"],
            }
            if cfg.dynamic:
                for i in (0, 2):
                    layer[f"tok{i}_w"] = sd[f"{p}token_selection.mlp_head.{i}.weight"]
                    layer[f"tok{i}_b"] = sd[f"{p}token_selection.mlp_head.{i}.bias"]
            self.layers.append({k: v.to(device=self.device, dtype=dtype).contiguous() for k, v in layer.items()})

    def layer_views(self, l: int, heads: Sequence[int], groups: Sequence[int]):
        """Weights of layer l for these units (views where they lead the shared order), and the unit
        order they come in."""
        cfg, base = self.cfg, self.layers[l]
        dh, gs = cfg.head_dim, cfg.group_size
        ho, go = self.head_order[l], self.group_order[l]
        sliced = ("qkv_w", "qkv_b", "proj_w", "fc1_w", "fc1_b", "fc2_w")
        out = {k: v for k, v in base.items() if k not in sliced}
        qkv_b = base.get("qkv_b")
        if set(heads) == set(ho[: len(heads)]):
            k = len(heads)
            out.update(qkv_w=base["qkv_w"][: 3 * dh * k], proj_w=base["proj_w"][:, : dh * k])
            out["qkv_b"] = None if qkv_b is None else qkv_b[: 3 * dh * k]
            head_units = ho[:k]
        else:
            idx = torch.tensor([ho.index(u) for u in heads], device=self.device)
            rows = (idx[:, None] * 3 * dh + torch.arange(3 * dh, device=self.device)).reshape(-1)
            cols = (idx[:, None] * dh + torch.arange(dh, device=self.device)).reshape(-1)
            out.update(qkv_w=base["qkv_w"][rows].contiguous(), proj_w=base["proj_w"][:, cols].contiguous())
            out["qkv_b"] = None if qkv_b is None else qkv_b[rows].contiguous()
            self.copies += [v for v in (out["qkv_w"], out["qkv_b"], out["proj_w"]) if v is not None]
            head_units = list(heads)
        if set(groups) == set(go[: len(groups)]):
            k = len(groups)
            out.update(fc1_w=base["fc1_w"][: gs * k], fc1_b=base["fc1_b"][: gs * k], fc2_w=base["fc2_w"][:, : gs * k])
            group_units = go[:k]
        else:
            idx = torch.tensor([go.index(u) for u in groups], device=self.device)
            units = (idx[:, None] * gs + torch.arange(gs, device=self.device)).reshape(-1)
            out.update(fc1_w=base["fc1_w"][units].contiguous(), fc1_b=base["fc1_b"][units].contiguous(),
                       fc2_w=base["fc2_w"][:, units].contiguous())
            self.copies += [out["fc1_w"], out["fc1_b"], out["fc2_w"]]
            group_units = list(groups)
        return out, head_units, group_units

    def tensors(self) -> list[torch.Tensor]:
        return list(self.common.values()) + [v for layer in self.layers for v in layer.values()] + self.copies


class SlicedDiT(nn.Module):
    """One group's engine: the DiT with only its union of heads and channel groups.

    Inputs follow the group ONNX graphs: ``x``, ``t``, ``y`` and, where the group's members
    differ, ``head_mask`` [B, L, head_slots] / ``channel_mask`` [B, L, channel_slots] whose
    slot s of layer l is the mask of ``layout.heads[l][s]`` (``layout.channels[l][s]``).
    A mask left out (None) means all ones: the engine then runs without that masking work.
    Weights are views into ``shared`` wherever the layout allows.
    """

    def __init__(self, cfg: ModelConfig, sd: Mapping[str, torch.Tensor] | None, layout: GroupLayout,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", use_kernel: bool = True,
                 fuse: bool | None = None, shared: SharedWeights | None = None, shared_masks: bool = False):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        # shared_masks: every row of a call has the same t, so row 0's head and channel masks serve
        # all (the runtime's case: the scheduler picks the group by t, one t per call); lets the kernel
        # run GEMM1 as one plain GEMM and the head mask scale proj's weights. Off, each row keeps its own.
        self.shared_masks = shared_masks
        dev = torch.device(device)
        if shared is None:
            shared = SharedWeights(cfg, sd, [layout], dtype, dev)
        self.shared = shared
        cm = shared.common
        self.patch_w, self.patch_b = cm["x_embedder.proj.weight"], cm["x_embedder.proj.bias"]
        self.pos = cm["pos_embed"]
        self.t_w1, self.t_b1 = cm["t_embedder.mlp.0.weight"], cm["t_embedder.mlp.0.bias"]
        self.t_w2, self.t_b2 = cm["t_embedder.mlp.2.weight"], cm["t_embedder.mlp.2.bias"]
        self.y_table = cm["y_embedder.embedding_table.weight"]
        self.ada_w, self.ada_b = cm["ada_w"], cm["ada_b"]
        self.f_ada_w = cm["final_layer.adaLN_modulation.1.weight"]
        self.f_ada_b = cm["final_layer.adaLN_modulation.1.bias"]
        self.f_w, self.f_b = cm["final_layer.linear.weight"], cm["final_layer.linear.bias"]
        self.layers = []
        self.head_pick: list[torch.Tensor | None] = []  # mask slot of each stored head, where not identity
        self.group_pick: list[torch.Tensor | None] = []
        for l in range(cfg.depth):
            layer, hu, gu = shared.layer_views(l, layout.heads[l], layout.channels[l])
            self.layers.append(layer)
            hp = [list(layout.heads[l]).index(u) for u in hu]
            gp = [list(layout.channels[l]).index(u) for u in gu]
            self.head_pick.append(None if hp == sorted(hp) else torch.tensor(hp, device=dev))
            self.group_pick.append(None if gp == sorted(gp) else torch.tensor(gp, device=dev))
        kernel, _ = _sdt_mlp_op()
        self.kernel = kernel if (use_kernel and dev.type == "cuda") else None
        fuse = dev.type == "cuda" if fuse is None else fuse
        self.ln_mod, self.add_ln_mod = _fast_ln_modulate() if fuse else (ln_modulate, add_ln_modulate)
        self.gate_res = _fused(gate_residual) if fuse else gate_residual
        self.router = _fast_router(dev, dtype) if (fuse and cfg.dynamic) else None
        # How a DyDiT block runs its MLP (DESIGN.md's SDT): "sdt" gathers the kept tokens through the
        # SdtMlp kernel; "dense" runs every token through cuBLAS (GELU in fc1's epilogue) and lets the
        # token mask scale the residual add. Both compute the official semantics; which is faster
        # depends on the rows per call (few rows: dense), so GraphRunner times both at capture.
        # "hybrid" runs dense the layers whose expected keep rate (``keep_rates``, from the bundle's
        # calibration) is at least HYBRID_KEEP, where gathering saves too few rows to pay for itself.
        # "dense-fold" is the dense form with the router folded: its first layer one cuBLAS GEMM (bias
        # epilogue) in stream order, its ReLU / second layer / gate inside the LayerNorm kernel that
        # applies the deferred residual add (dyc.kernels.ln_modulate.RouterHidden): one kernel less per
        # layer than the router kernel, and no side stream (cuBLAS's persistent GEMMs leave it no SMs).
        # "hybrid-fold" is "hybrid" whose dense layers fold the router so.
        self.fold_router = bool(fuse and cfg.dynamic and dev.type == "cuda" and ln_kernels.available())
        self.mlp_mode = "sdt" if self.kernel is not None else "dense"
        self.keep_rates: list[float] | None = None
        self._side: torch.cuda.Stream | None = None  # the dense form's router stream (CUDA)

    HYBRID_KEEP = 0.7

    def mlp_modes(self) -> tuple[str, ...]:
        """The MLP forms worth timing for this engine (a plain DiT, or no kernel: only dense)."""
        fold = ("dense-fold",) if self.fold_router else ()
        if not (self.cfg.dynamic and self.kernel is not None):
            return ("dense", *fold)
        if not 0 < len(self._dense_layers("hybrid")) < self.cfg.depth:
            return ("sdt", "dense", *fold)
        return ("sdt", "dense", *fold, "hybrid", *(("hybrid-fold",) if fold else ()))

    def _dense_layers(self, mode: str) -> frozenset[int]:
        rule = mode.removesuffix("-fold")  # a "-fold" form differs only in how its dense layers run the router
        if rule == "dense" or not self.cfg.dynamic:
            return frozenset(range(self.cfg.depth))
        if rule == "hybrid" and self.keep_rates is not None:
            return frozenset(l for l, k in enumerate(self.keep_rates) if k >= self.HYBRID_KEEP)
        return frozenset()

    def weight_tensors(self) -> list[torch.Tensor]:
        return self.shared.tensors()

    def _mlp(self, x, shift, scale, gate, keep, layer, cmask):
        args = (x, shift, scale, gate, keep, layer["fc1_w"], layer["fc1_b"], layer["fc2_w"], layer["fc2_b"])
        if self.kernel is not None:  # in place (h is contiguous): only kept rows are written
            return self.kernel(*args, channel_mask=cmask, group_size=self.cfg.group_size, out=x)
        return sdt_mlp_torch(*args, cmask, self.cfg.group_size)

    def _keep(self, h: torch.Tensor, layer: dict[str, torch.Tensor]) -> torch.Tensor:
        """SDT token mask [B, N] (0/1 in h's dtype) from the residual stream after attention."""
        router = (layer["tok0_w"], layer["tok0_b"], layer["tok2_w"], layer["tok2_b"])
        if self.router is not None:
            return self.router(h, *router)
        return router_keep_from_hidden(RouterHidden(F.linear(h, router[0], router[1]), router[2], router[3]))

    def _keep_beside(self, h: torch.Tensor, layer: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Callable | None]:
        """The token mask for a dense MLP, which needs it only at the deferred residual add: on CUDA
        the router runs on a side stream beside fc1/fc2 (few rows leave most of the GPU idle, and
        CUDA graphs capture the fork), and the returned ``join`` makes the current stream wait for it."""
        if not h.is_cuda or self.router is None:
            return self._keep(h, layer), None
        main = torch.cuda.current_stream(h.device)
        if self._side is None:
            self._side = torch.cuda.Stream(h.device)
        keep = torch.empty(h.shape[:2], dtype=h.dtype, device=h.device)  # owned by the main stream
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            self.router(h, layer["tok0_w"], layer["tok0_b"], layer["tok2_w"], layer["tok2_b"], out=keep)
        return keep, lambda: main.wait_stream(self._side)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                head_mask: torch.Tensor | None = None, channel_mask: torch.Tensor | None = None, *,
                mlp_mode: str | None = None) -> torch.Tensor:
        cfg, lay = self.cfg, self.layout
        mode = mlp_mode or self.mlp_mode
        if mode not in MLP_MODES:
            raise ValueError(f"mlp_mode must be one of {', '.join(MLP_MODES)}, got {mode!r}")
        dense_layers = self._dense_layers(mode)
        b = x.shape[0]
        dt = self.patch_w.dtype
        h = (patch_tokens(x, self.patch_w, self.patch_b, cfg.patch_size) + self.pos).contiguous()
        temb = F.linear(F.silu(F.linear(timestep_embedding(t).to(dt), self.t_w1, self.t_b1)), self.t_w2, self.t_b2)
        c = temb + self.y_table[y]
        # [L, 6, B, C]: every layer's shift/scale/gate is a contiguous [B, C] (the kernels take them as is)
        mods = F.linear(F.silu(c), self.ada_w, self.ada_b).view(b, cfg.depth, 6, cfg.hidden_size)
        mods = mods.permute(1, 2, 0, 3).contiguous()
        dh, gs = cfg.head_dim, cfg.group_size
        # A dense MLP's residual add (y, gate, keep) is deferred into the LayerNorm that follows it
        # (the next block's, or the final layer's): one kernel instead of two.
        pending: tuple | None = None
        for l, layer in enumerate(self.layers):
            sh1, sc1, g1, sh2, sc2, g2 = mods[l].unbind(0)
            nh = len(lay.heads[l])
            if pending is None:
                a = self.ln_mod(h, sh1, sc1)
            else:
                h, a = self.add_ln_mod(h, *pending, sh1, sc1)
                pending = None
            qkv = F.linear(a, layer["qkv_w"], layer["qkv_b"])  # head-major: [B, N, nh, 3, Dh]
            q, k, v = qkv.view(b, -1, nh, 3, dh).permute(3, 0, 2, 1, 4).unbind(0)
            # SDPA returns [B, nh, N, Dh] as a view of [B, N, nh, Dh] memory: masking after the
            # transpose keeps that layout, so the reshape below is free (no extra copy).
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
            proj_w = layer["proj_w"]
            if lay.vary_head[l] and head_mask is not None:
                hm = head_mask[:, l, :nh] if self.head_pick[l] is None else head_mask[:, l, self.head_pick[l]]
                if self.shared_masks:  # one mask for all rows: zero the off heads' proj columns (weights
                    # are ~8x smaller than the attention output at 32 x 256 tokens)
                    proj_w = proj_w * hm[0].to(dt).repeat_interleave(dh)
                else:
                    o = o * hm[:, None, :, None].to(dt)
            o = F.linear(o.reshape(b, -1, nh * dh), proj_w, layer["proj_b"])
            ng = len(lay.channels[l])
            cmask = None
            if lay.vary_channel[l] and channel_mask is not None:
                rows = slice(0, 1) if self.shared_masks else slice(None)
                pick = self.group_pick[l]
                cmask = (channel_mask[rows, l, :ng] if pick is None else channel_mask[rows, l, pick]).to(dt)
            if l not in dense_layers:
                h = self.gate_res(h, g1, o)
                h = self._mlp(h, sh2, sc2, g2, self._keep(h, layer), layer, cmask)
                continue
            # dense: every token through the (sliced) MLP; SDT's mask scales the deferred residual add
            h, m = self.add_ln_mod(h, o, g1, None, sh2, sc2)
            keep, join = None, None
            if cfg.dynamic and mode.endswith("-fold"):
                keep = RouterHidden(F.linear(h, layer["tok0_w"], layer["tok0_b"]), layer["tok2_w"], layer["tok2_b"])
            elif cfg.dynamic:
                keep, join = self._keep_beside(h, layer)
            u = linear_gelu(m, layer["fc1_w"], layer["fc1_b"])
            fc2_w = layer["fc2_w"]
            if cmask is not None:  # GELU(0) = 0: masking fc2's columns equals masking the groups of u
                if self.shared_masks:
                    fc2_w = fc2_w * cmask[0].repeat_interleave(gs)
                else:
                    u = (u.unflatten(-1, (ng, -1)) * cmask[:, None, :, None]).flatten(-2)
            y2 = F.linear(u, fc2_w, layer["fc2_b"])
            if join is not None:
                join()
            pending = (y2, g2, keep)
        shift, scale = F.linear(F.silu(c), self.f_ada_w, self.f_ada_b).chunk(2, dim=1)
        if pending is None:
            a = self.ln_mod(h, shift, scale)
        else:
            h, a = self.add_ln_mod(h, *pending, shift, scale)
        out = F.linear(a, self.f_w, self.f_b)
        p, oc, g = cfg.patch_size, cfg.out_channels, cfg.input_size // cfg.patch_size
        out = out.view(b, g, g, p, p, oc)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, oc, g * p, g * p)


def group_keep_rates(bundle: Bundle) -> list[list[float]] | None:
    """Each group's expected SDT keep rate per layer (the calibration's, averaged over the group's
    steps of the bundle's schedule), or None where the bundle records no calibration."""
    cal = bundle.manifest.get("calibration") or {}
    if not bundle.config.dynamic or not cal.get("timesteps") or not cal.get("keep_rates"):
        return None
    from ..compiler.analyse import keep_rates_per_t

    per_t = keep_rates_per_t(cal["timesteps"], np.asarray(cal["keep_rates"], dtype=np.float64))
    schedule = bundle.schedule
    out = []
    for g in bundle.groups:
        ts = [t for t in schedule if g.t_lo <= t <= g.t_hi] or list(range(g.t_lo, g.t_hi + 1))
        out.append(per_t[ts].mean(0).tolist())
    return out


class GraphRunner:
    """Replays one CUDA graph per (group, batch) from a shared memory pool (TensorRT demo's Engine idea).

    The first call of a (group, batch) warms up and captures; where the engine has several MLP
    forms (``SlicedDiT.mlp_modes``) it captures each, times their replays on that call's inputs and
    keeps the fastest (``modes`` records the choice; ``$DYC_MLP_MODE`` = one of ``MLP_MODES`` forces it).
    Later calls copy the inputs into the graph's static buffers, replay, and clone the output out
    of the pool (the next group's replay reuses that memory). Every graph draws on one pool and
    warms up on one side stream: groups run one after another, and cuBLAS keeps a workspace per
    stream it has run on (a stream per capture grew memory with the number of engines).
    """

    def __init__(self, modules: Sequence[SlicedDiT]):
        self.modules = list(modules)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.modes: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}  # ms per replay of each form, where several

    def _capture(self, mod: SlicedDiT, static: dict, mode: str) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for _ in range(2):
                mod(**static, mlp_mode=mode)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = mod(**static, mlp_mode=mode)
        return graph, out

    @staticmethod
    def _replay_ms(graph: torch.cuda.CUDAGraph, n: int = 7) -> float:
        graph.replay()
        times = []
        for _ in range(n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[n // 2]

    @torch.no_grad()
    def __call__(self, group: int, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        key = (group, inputs["x"].shape[0], tuple(sorted(inputs)))  # a step without masks: the mask-free form
        if key not in self.graphs:
            static = {k: v.clone() for k, v in inputs.items()}
            mod = self.modules[group]
            forced = os.environ.get("DYC_MLP_MODE")
            modes = (forced,) if forced else mod.mlp_modes()
            if len(modes) == 1:
                graph, out = self._capture(mod, static, modes[0])
            else:
                best = None
                times = {}
                for mode in modes:
                    cand = self._capture(mod, static, mode)
                    times[mode] = self._replay_ms(cand[0])
                    if best is None or times[mode] < times[best[0]]:
                        best = (mode, cand)
                    del cand
                self.timings[key] = times
                graph, out = best[1]
                modes = (best[0],)
                del best
            self.modes[key] = modes[0]
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return out.clone()


class TorchBackend(Backend):
    """``TorchBackend(bundle, device=None, checkpoint=None, dtype=None, cuda_graphs=True, per_row_masks=False)``.

    The bundle's groups as sliced modules over one shared weight store; weights come from the
    bundle's source checkpoint (as the eager backend's do) or ``checkpoint``. On CUDA each
    (group, batch) is replayed from a CUDA graph; on the CPU the same modules run eagerly (the
    reference maths, no kernel). ``per_row_masks``: every row takes its own head/channel masks, so
    one call may mix timesteps of a group (the server's step-level batching); by default row 0's
    masks serve all rows (one t per call, as ``Pipeline`` calls it), which is faster.
    """

    name = "torch"
    optional_masks = True  # a step whose masks are all ones runs the group without its masking
    mixed_timesteps = False  # unless per_row_masks: row 0's masks serve the whole call

    def __init__(self, bundle: Bundle, *, device: str | torch.device | None = None,
                 checkpoint: str | os.PathLike | None = None, dtype: str | None = None, cuda_graphs: bool = True,
                 per_row_masks: bool = False):
        from .eager import EagerBackend

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or bundle.dtype
        if dtype not in _TORCH_DTYPES:
            raise DycError(f"unknown dtype {dtype!r}: choose one of {', '.join(_TORCH_DTYPES)}")
        model = EagerBackend._load(bundle, checkpoint)
        if model.config.to_dict() != bundle.config.to_dict():
            raise DycError(f"the checkpoint is a {model.config.name}, the bundle {bundle.config.name}: "
                           "they do not match")
        cfg, dt = bundle.config, _TORCH_DTYPES[dtype]
        layouts = [GroupLayout(g.heads, g.channels, g.vary_head, g.vary_channel) for g in bundle.groups]
        if cfg.family != "dit":  # U-ViT / PixArt-α engines (dyc.families)
            from .torch_family import build_modules

            if per_row_masks:
                raise DycError(f"per-request masks (mixed timesteps in one call) are for DiT bundles, not {cfg.name}")
            self.shared, self.modules = build_modules(cfg, model.state_dict(), layouts, dt, self._device)
        else:
            self.shared = SharedWeights(cfg, model.state_dict(), layouts, dtype=dt, device=self._device)
            self.modules = [SlicedDiT(cfg, None, lay, dtype=dt, device=self._device, shared=self.shared,
                                      shared_masks=not per_row_masks) for lay in layouts]  # else one t per call
            for mod, rates in zip(self.modules, group_keep_rates(bundle) or [], strict=False):
                mod.keep_rates = rates
        self.mixed_timesteps = per_row_masks
        self.graphs = GraphRunner(self.modules) if (cuda_graphs and self._device.type == "cuda") else None
        self.dtype = dt

    @property
    def device(self) -> torch.device:
        return self._device

    @torch.no_grad()
    def run_group(self, group: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {k: torch.as_tensor(v).to(self._device) for k, v in inputs.items()}
        feeds["x"] = feeds["x"].to(self.dtype)
        if self.graphs is not None:
            return self.graphs(group, feeds)
        return self.modules[group](**feeds)

    def close(self) -> None:
        self.graphs = None
        self.modules = []
