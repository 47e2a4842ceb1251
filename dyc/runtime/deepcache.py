"""DeepCache (Ma et al., 2023) for DiT-family transformers, as the DyDiT paper combines it (B.10, Table 18).

DeepCache skips a U-Net's deep branch on most steps: every N-th step runs the whole network and
caches the deep features, the steps between run only the shallow layers and reuse them. A DiT has
no U-Net branches; its analogue is the residual stream: with ``shallow`` = k,

* a refresh step (step index i with i % N == 0) runs all L blocks and caches the deep blocks'
  contribution Δ = h_{L−k} − h_k (the residual that blocks k..L−k−1 add);
* a cached step runs blocks 0..k−1, sets h_{L−k} = h_k + Δ, and runs blocks L−k..L−1 and the final
  layer — 2k of L blocks.

So the first and last k blocks (and the embeddings, adaLN and the final layer) always see the
current latents, timestep and condition; only the middle of the network is reused. ``interval`` 1
is the plain model, exactly. A cache belongs to one sampling run and one engine call's rows (CFG
doubles them; ``batch`` splits them into chunks, each with its own cache); it carries across group
switches (Δ is a [B, N, C] residual whatever engine made it).

Backends: eager (the masked model) and torch (the sliced engines; on CUDA each (group, batch) of
each kind is a CUDA graph). DiT-family models only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DycError, UsageError
from ..model import timestep_embedding


@dataclass(frozen=True)
class DeepCache:
    """``interval`` N ≥ 1 (1: no caching); ``shallow`` k: blocks run at both ends on cached steps."""

    interval: int
    shallow: int = 1

    def check(self, cfg) -> DeepCache:
        if isinstance(self.interval, bool) or int(self.interval) != self.interval or self.interval < 1:
            raise UsageError(f"DeepCache interval must be a positive integer, got {self.interval!r}")
        if cfg.family != "dit":
            raise DycError(f"DeepCache is implemented for DiT-family models, not {cfg.name}")
        if not 1 <= self.shallow or 2 * self.shallow >= cfg.depth:
            raise UsageError(f"DeepCache shallow blocks must be in 1..{(cfg.depth - 1) // 2} for {cfg.depth} blocks, "
                           f"got {self.shallow}")
        return self

    def refresh(self, step: int) -> bool:
        return step % self.interval == 0


def deep_range(depth: int, shallow: int) -> tuple[int, int]:
    """Blocks [lo, hi) whose contribution is cached."""
    return shallow, depth - shallow


# ---- eager: the masked model ---------------------------------------------------------------------
@torch.no_grad()
def eager_forward(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, shallow: int,
                  delta: torch.Tensor | None, *, threshold_offset: float = 0.0,
                  tdw_masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``DyDiT.forward`` with DeepCache: ``delta`` None refreshes (all blocks; returns the new Δ), else
    the deep blocks' contribution is ``delta``. Returns (output, Δ)."""
    h, c, temb = model.embed(x, t, y)
    lo, hi = deep_range(len(model.blocks), shallow)

    def run(l: int, h: torch.Tensor) -> torch.Tensor:
        masks = None if tdw_masks is None else (tdw_masks[0][:, l], tdw_masks[1][:, l])
        return model.blocks[l](h, c, temb, complete=False, gate=model.gate, offset=threshold_offset, masks=masks)

    for l in range(lo):
        h = run(l, h)
    if delta is None:
        h_lo = h
        for l in range(lo, hi):
            h = run(l, h)
        delta = h - h_lo
    else:
        h = h + delta
    for l in range(hi, len(model.blocks)):
        h = run(l, h)
    return model.unpatchify(model.final_layer(h, c)), delta


# ---- torch backend: the sliced engines ------------------------------------------------------------
def sliced_forward(mod, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, head_mask: torch.Tensor | None,
                   channel_mask: torch.Tensor | None, shallow: int, delta: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``SlicedDiT.forward``'s maths, block by block, with DeepCache; returns (output, Δ).

    DyDiT blocks run the SDT form (``SlicedDiT``'s ``mlp_mode="sdt"``: the SdtMlp kernel on CUDA), plain
    ones every token; the engine's other MLP forms (dense, hybrid: faster at few rows) are not used
    here, so ``dyc bench`` measures DeepCache's extra speedup against this same code without caching.
    """
    cfg, lay = mod.cfg, mod.layout
    b = x.shape[0]
    dt = mod.patch_w.dtype
    h = (F.conv2d(x.to(dt), mod.patch_w, mod.patch_b, stride=cfg.patch_size).flatten(2).transpose(1, 2)
         + mod.pos).contiguous()
    temb = F.linear(F.silu(F.linear(timestep_embedding(t).to(dt), mod.t_w1, mod.t_b1)), mod.t_w2, mod.t_b2)
    c = temb + mod.y_table[y]
    mods = F.linear(F.silu(c), mod.ada_w, mod.ada_b).view(b, cfg.depth, 6, cfg.hidden_size)
    mods = mods.permute(1, 2, 0, 3).contiguous()
    dh = cfg.head_dim

    def block(l: int, h: torch.Tensor) -> torch.Tensor:
        layer = mod.layers[l]
        sh1, sc1, g1, sh2, sc2, g2 = mods[l].unbind(0)
        nh = len(lay.heads[l])
        qkv = F.linear(mod.ln_mod(h, sh1, sc1), layer["qkv_w"], layer["qkv_b"])
        q, k, v = qkv.view(b, -1, nh, 3, dh).permute(3, 0, 2, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        proj_w = layer["proj_w"]
        if lay.vary_head[l] and head_mask is not None:
            hm = head_mask[:, l, :nh] if mod.head_pick[l] is None else head_mask[:, l, mod.head_pick[l]]
            if mod.shared_masks:
                proj_w = proj_w * hm[0].to(dt).repeat_interleave(dh)
            else:
                o = o * hm[:, None, :, None].to(dt)
        h = mod.gate_res(h, g1, F.linear(o.reshape(b, -1, nh * dh), proj_w, layer["proj_b"]))
        ng = len(lay.channels[l])
        cmask = None
        if lay.vary_channel[l] and channel_mask is not None:
            rows = slice(0, 1) if mod.shared_masks else slice(None)
            pick = mod.group_pick[l]
            cmask = (channel_mask[rows, l, :ng] if pick is None else channel_mask[rows, l, pick]).to(dt)
        if cfg.dynamic:  # the SDT form (the kernel on CUDA)
            return mod._mlp(h, sh2, sc2, g2, mod._keep(h, layer), layer, cmask)
        u = F.linear(mod.ln_mod(h, sh2, sc2), layer["fc1_w"], layer["fc1_b"])
        if cmask is not None:
            u = (u.unflatten(-1, (ng, -1)) * cmask[:, None, :, None]).flatten(-2)
        return mod.gate_res(h, g2, F.linear(F.gelu(u, approximate="tanh"), layer["fc2_w"], layer["fc2_b"]))

    lo, hi = deep_range(cfg.depth, shallow)
    for l in range(lo):
        h = block(l, h)
    if delta is None:
        h_lo = h.clone()  # the kernel updates h in place
        for l in range(lo, hi):
            h = block(l, h)
        delta = h - h_lo
    else:
        h = h + delta
    for l in range(hi, cfg.depth):
        h = block(l, h)
    shift, scale = F.linear(F.silu(c), mod.f_ada_w, mod.f_ada_b).chunk(2, dim=1)
    out = F.linear(mod.ln_mod(h, shift, scale), mod.f_w, mod.f_b)
    p, oc, g = cfg.patch_size, cfg.out_channels, cfg.input_size // cfg.patch_size
    out = torch.einsum("nhwpqc->nchpwq", out.view(b, g, g, p, p, oc)).reshape(b, oc, g * p, g * p)
    return out, delta


class _Refresh(nn.Module):
    """A refresh call as one tensor output (``GraphRunner`` captures single outputs): out ‖ Δ, flat."""

    def __init__(self, mod, shallow: int):
        super().__init__()
        self.mod, self.shallow = mod, shallow

    def mlp_modes(self) -> tuple[str, ...]:
        return ("sdt",)  # one form (see sliced_forward): GraphRunner captures it alone

    def forward(self, x, t, y, head_mask=None, channel_mask=None, mlp_mode=None):
        out, delta = sliced_forward(self.mod, x, t, y, head_mask, channel_mask, self.shallow, None)
        return torch.cat([out.flatten(1), delta.flatten(1)], dim=1)


class _Cached(nn.Module):
    def __init__(self, mod, shallow: int):
        super().__init__()
        self.mod, self.shallow = mod, shallow

    def mlp_modes(self) -> tuple[str, ...]:
        return ("sdt",)

    def forward(self, x, t, y, delta, head_mask=None, channel_mask=None, mlp_mode=None):
        return sliced_forward(self.mod, x, t, y, head_mask, channel_mask, self.shallow, delta)[0]


class SlicedDeepCache:
    """DeepCache calls over a torch backend's sliced engines (``modules``), in CUDA graphs on CUDA."""

    def __init__(self, modules, shallow: int, cuda_graphs: bool):
        from ..backends.torch_sliced import GraphRunner

        self.shallow = shallow
        self.refresh_mods = [_Refresh(m, shallow) for m in modules]
        self.cached_mods = [_Cached(m, shallow) for m in modules]
        self.graphs = (GraphRunner(self.refresh_mods), GraphRunner(self.cached_mods)) if cuda_graphs else None
        cfg = modules[0].cfg
        self._out = (cfg.out_channels, cfg.input_size, cfg.input_size)
        self._delta = (cfg.num_tokens, cfg.hidden_size)

    @torch.no_grad()
    def __call__(self, group: int, feeds: Mapping[str, torch.Tensor], delta: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if delta is None:
            flat = self.graphs[0](group, feeds) if self.graphs else self.refresh_mods[group](**feeds)
            b, n_out = flat.shape[0], self._out[0] * self._out[1] * self._out[2]
            return flat[:, :n_out].reshape(b, *self._out), flat[:, n_out:].reshape(b, *self._delta)
        feeds = {**feeds, "delta": delta}
        out = self.graphs[1](group, feeds) if self.graphs else self.cached_mods[group](**feeds)
        return out, delta


def torch_backend_caller(backend, shallow: int) -> Callable:
    """``(group, feeds, delta) -> (out, Δ)`` over a ``TorchBackend``'s engines."""
    from ..backends.torch_sliced import SlicedDiT

    if not backend.modules or not isinstance(backend.modules[0], SlicedDiT):
        raise DycError("DeepCache is implemented for DiT-family models")
    key = ("deepcache", shallow)
    cache = getattr(backend, "_deepcache", {})
    if key not in cache:
        cache[key] = SlicedDeepCache(backend.modules, shallow, backend.graphs is not None)
        backend._deepcache = cache
    return cache[key]


def backend_caller(backend, shallow: int) -> Callable:
    """``(group, feeds, delta) -> (out, Δ)`` DeepCache calls of a backend: eager or torch."""
    if backend.name == "torch":
        return torch_backend_caller(backend, shallow)
    if backend.name != "eager":
        raise DycError(f"DeepCache runs on the eager and torch backends, not {backend.name}")
    if backend.model.config.family != "dit":
        raise DycError("DeepCache is implemented for DiT-family models")

    @torch.no_grad()
    def call(group: int, feeds: Mapping[str, torch.Tensor], delta: torch.Tensor | None):
        # as EagerBackend.run_group: the bundle's fp32-decided masks of each t, else the routers decide
        x = feeds["x"].to(device=backend.device, dtype=backend.dtype)
        t = feeds["t"].to(backend.device)
        masks = backend._bundle_masks(t) if backend.bundle is not None else None
        return eager_forward(backend.model, x, t, feeds["y"].to(backend.device), shallow, delta,
                             threshold_offset=backend.offset, tdw_masks=masks)

    return call


# ---- dyc bench: the extra speedup and the drift ------------------------------------------------
@torch.no_grad()
def sample_loop(call: Callable, setup, x: torch.Tensor, y: torch.Tensor, cache: DeepCache | None) -> torch.Tensor:
    """One guided sampling run as ``dyc.bench._sample`` makes it, ``call(x, t, y, delta) -> (out, Δ)``
    (``delta`` None: a refresh); returns the final latents (float32)."""
    from .cfg import cfg_combine
    from .samplers import make_sampler

    sampler = make_sampler(setup.sampler, len(setup.schedule))
    guided = setup.rows_batch != setup.images
    gen = torch.Generator().manual_seed(0) if sampler.needs_generator else None
    xt = x[: setup.images].float()
    delta = None
    for i, t in enumerate(sampler.timesteps):
        xin = (torch.cat([xt, xt]) if guided else xt).to(x.dtype)
        out, delta = call(xin, t, y, None if cache is None or cache.refresh(i) else delta)
        out = out.float()
        if guided:
            out = cfg_combine(out, setup.cfg.in_channels, setup.cfg_scale)
        xt = sampler.step(i, xt, out, gen)
    return xt


def bench_deepcache(name: str, modules, feeds_of: Callable, setup, x: torch.Tensor, y: torch.Tensor,
                    intervals: list[int], shallow: int, repeats: int) -> list[dict]:
    """Per interval: seconds per image of full sampling runs with DeepCache against the same engines
    without it (interval 1: every step a refresh, the plain computation), and the drift: relative L2
    of the final latents against the run without caching, same noise."""
    import statistics
    import time

    dev = setup.device
    engine = SlicedDeepCache(modules, shallow, cuda_graphs=dev.type == "cuda")

    def call(xx, t, yy, delta):
        group, feeds = feeds_of(xx, t, yy)
        return engine(group, feeds, delta)

    def timed(cache: DeepCache | None) -> tuple[float, torch.Tensor]:
        sample_loop(call, setup, x, y, cache)  # warm-up: graphs of both kinds captured
        times, last = [], None
        for _ in range(max(1, repeats)):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            last = sample_loop(call, setup, x, y, cache)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / setup.images, last

    base_s, base = timed(None)
    rows = []
    for n in intervals:
        dc = DeepCache(n, shallow).check(setup.cfg)
        s, lat = timed(dc)
        rows.append({"row": name, "interval": n, "shallow": shallow, "s_per_image": s, "s_per_image_no_cache": base_s,
                     "extra_speedup": base_s / s, "drift_rel_l2": float((lat - base).norm() / base.norm()),
                     "blocks_per_cached_step": 2 * shallow, "blocks": setup.cfg.depth})
    return rows


def format_rows(rows: list[dict]) -> list[str]:
    lines = ["DeepCache (shallow k: 2k of L blocks on cached steps; drift: rel. L2 of final latents vs no cache)",
             f"{'row':<13} {'interval':>8} {'k':>3} {'s/image':>9} {'no cache':>9} {'extra':>7} {'vs static':>9} "
             f"{'drift':>8}"]
    for r in rows:
        vs = f"{r['speedup_vs_static']:>8.2f}x" if r.get("speedup_vs_static") else f"{'-':>9}"
        lines.append(f"{r['row']:<13} {r['interval']:>8} {r['shallow']:>3} {r['s_per_image']:>9.4f} "
                     f"{r['s_per_image_no_cache']:>9.4f} {r['extra_speedup']:>6.2f}x {vs} {r['drift_rel_l2']:>8.2e}")
    return lines
