"""The torch backend: each group as a sliced PyTorch module, replayed from CUDA graphs.

Weights are sliced once at load (no masked zeros); attention runs through SDPA on the group's
heads only; SDT runs through the plugins/ kernel (gather kept tokens -> MLP -> gated
scatter-add) via its C ABI. On CUDA every (group, batch) is captured once into a CUDA graph,
all graphs drawing on one memory pool, since groups run one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import modulate, timestep_embedding


@dataclass(frozen=True)
class GroupLayout:
    """Which original heads / channel groups each layer of one engine keeps, and where it takes masks."""

    heads: list[list[int]]
    channels: list[list[int]]
    vary_head: list[bool]
    vary_channel: list[bool]


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine, eps 1e-6, fp32 statistics) then adaLN modulate."""
    xf = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)
    return (xf * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)).to(x.dtype)


def gate_residual(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return h + gate.unsqueeze(1) * y


_FUSED: dict[str, Callable] = {}


def _fused(fn: Callable) -> Callable:
    """``fn`` compiled by inductor into one kernel (elementwise passes dominate at these widths).

    Shapes do not depend on the group, so each batch size compiles once for every group.
    """
    if fn.__name__ not in _FUSED:
        _FUSED[fn.__name__] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _FUSED[fn.__name__]


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


class SlicedDiT(nn.Module):
    """One group's engine: the DiT with only its union of heads and channel groups.

    Inputs follow the group ONNX graphs: ``x``, ``t``, ``y`` and, where the group's members
    differ, ``head_mask`` [B, L, head_slots] / ``channel_mask`` [B, L, channel_slots] whose
    slot s of layer l is the mask of ``layout.heads[l][s]``.
    """

    def __init__(self, cfg: ModelConfig, sd: Mapping[str, torch.Tensor], layout: GroupLayout,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", use_kernel: bool = True,
                 fuse: bool | None = None):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        dev = torch.device(device)

        def w(name: str) -> torch.Tensor:
            return sd[name].to(device=dev, dtype=dtype).contiguous()

        from ..compiler.slice import slice_layer

        self.patch_w, self.patch_b = w("x_embedder.proj.weight"), w("x_embedder.proj.bias")
        self.pos = w("pos_embed")
        self.t_w1, self.t_b1 = w("t_embedder.mlp.0.weight"), w("t_embedder.mlp.0.bias")
        self.t_w2, self.t_b2 = w("t_embedder.mlp.2.weight"), w("t_embedder.mlp.2.bias")
        self.y_table = w("y_embedder.embedding_table.weight")
        # all adaLN modulations in one GEMM: c -> [B, L * 6C]
        self.ada_w = torch.cat([w(f"blocks.{l}.adaLN_modulation.1.weight") for l in range(cfg.depth)], 0)
        self.ada_b = torch.cat([w(f"blocks.{l}.adaLN_modulation.1.bias") for l in range(cfg.depth)], 0)
        self.layers = []
        for l in range(cfg.depth):
            s = slice_layer(cfg, sd, l, layout.heads[l], layout.channels[l])
            p = f"blocks.{l}."
            layer = {k.removeprefix(p): v.to(device=dev, dtype=dtype).contiguous() for k, v in s.items()}
            if cfg.dynamic:
                for i in (0, 2):
                    layer[f"tok{i}.weight"] = w(f"{p}token_selection.mlp_head.{i}.weight")
                    layer[f"tok{i}.bias"] = w(f"{p}token_selection.mlp_head.{i}.bias")
            self.layers.append(layer)
        self.f_ada_w = w("final_layer.adaLN_modulation.1.weight")
        self.f_ada_b = w("final_layer.adaLN_modulation.1.bias")
        self.f_w, self.f_b = w("final_layer.linear.weight"), w("final_layer.linear.bias")
        kernel, _ = _sdt_mlp_op()
        self.kernel = kernel if (use_kernel and dev.type == "cuda") else None
        fuse = dev.type == "cuda" if fuse is None else fuse
        self.ln_mod = _fused(ln_modulate) if fuse else ln_modulate
        self.gate_res = _fused(gate_residual) if fuse else gate_residual

    def weight_tensors(self) -> list[torch.Tensor]:
        ts = [self.patch_w, self.patch_b, self.pos, self.t_w1, self.t_b1, self.t_w2, self.t_b2, self.y_table,
              self.ada_w, self.ada_b, self.f_ada_w, self.f_ada_b, self.f_w, self.f_b]
        return ts + [v for layer in self.layers for v in layer.values()]

    def _mlp(self, x, shift, scale, gate, keep, layer, cmask):
        args = (x, shift, scale, gate, keep, layer["mlp.fc1.weight"], layer["mlp.fc1.bias"],
                layer["mlp.fc2.weight"], layer["mlp.fc2.bias"])
        if self.kernel is not None:
            return self.kernel(*args, channel_mask=cmask, group_size=self.cfg.group_size)
        return sdt_mlp_torch(*args, cmask, self.cfg.group_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                head_mask: torch.Tensor | None = None, channel_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg, lay = self.cfg, self.layout
        b = x.shape[0]
        dt = self.patch_w.dtype
        h = F.conv2d(x.to(dt), self.patch_w, self.patch_b, stride=cfg.patch_size).flatten(2).transpose(1, 2) + self.pos
        temb = F.linear(F.silu(F.linear(timestep_embedding(t).to(dt), self.t_w1, self.t_b1)), self.t_w2, self.t_b2)
        c = temb + self.y_table[y]
        mods = F.linear(F.silu(c), self.ada_w, self.ada_b).view(b, cfg.depth, 6, cfg.hidden_size)
        dh = cfg.head_dim
        for l, layer in enumerate(self.layers):
            sh1, sc1, g1, sh2, sc2, g2 = mods[:, l].unbind(1)
            nh = len(lay.heads[l])
            a = self.ln_mod(h, sh1, sc1)
            qkv = F.linear(a, layer["attn.qkv.weight"], layer["attn.qkv.bias"])
            q, k, v = qkv.view(b, -1, 3, nh, dh).permute(2, 0, 3, 1, 4).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v)  # [B, nh, N, Dh]
            if lay.vary_head[l]:
                o = o * head_mask[:, l, :nh, None, None].to(dt)
            o = o.transpose(1, 2).reshape(b, -1, nh * dh)
            h = self.gate_res(h, g1, F.linear(o, layer["attn.proj.weight"], layer["attn.proj.bias"]))
            ng = len(lay.channels[l])
            cmask = channel_mask[:, l, :ng].to(dt) if lay.vary_channel[l] else None
            if cfg.dynamic:
                logit = F.linear(F.relu(F.linear(h, layer["tok0.weight"], layer["tok0.bias"])),
                                 layer["tok2.weight"], layer["tok2.bias"]).squeeze(-1)
                keep = (torch.sigmoid(logit) > 0.5).to(dt)
                h = self._mlp(h, sh2, sc2, g2, keep, layer, cmask)
            else:  # a plain DiT: every token, no gather/scatter
                m = self.ln_mod(h, sh2, sc2)
                u = F.linear(m, layer["mlp.fc1.weight"], layer["mlp.fc1.bias"])
                if cmask is not None:
                    u = (u.unflatten(-1, (ng, -1)) * cmask[:, None, :, None]).flatten(-2)
                u = F.linear(F.gelu(u, approximate="tanh"), layer["mlp.fc2.weight"], layer["mlp.fc2.bias"])
                h = self.gate_res(h, g2, u)
        shift, scale = F.linear(F.silu(c), self.f_ada_w, self.f_ada_b).chunk(2, dim=1)
        out = F.linear(self.ln_mod(h, shift, scale), self.f_w, self.f_b)
        p, oc, g = cfg.patch_size, cfg.out_channels, cfg.input_size // cfg.patch_size
        out = out.view(b, g, g, p, p, oc)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, oc, g * p, g * p)


class GraphRunner:
    """Replays one CUDA graph per (group, batch) from a shared memory pool (TensorRT demo's Engine idea).

    The first call of a (group, batch) warms up on a side stream and captures; later calls copy
    the inputs into the graph's static buffers, replay, and clone the output out of the pool
    (the next group's replay reuses that memory).
    """

    def __init__(self, modules: Sequence[SlicedDiT]):
        self.modules = list(modules)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, group: int, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        key = (group, inputs["x"].shape[0])
        if key not in self.graphs:
            static = {k: v.clone() for k, v in inputs.items()}
            mod = self.modules[group]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    mod(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = mod(**static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return out.clone()
