"""Model configuration: the DiT family's sizes, and inference of a config from weight shapes.

Other model families (U-ViT, PixArt-α: ``dyc.families``) share this config; ``family`` names which,
and their own fields default to values that leave a DiT unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import DycError, UsageError

# name -> (hidden C, depth L, heads H), DESIGN.md §1
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
_HEADS_BY_WIDTH = {c: h for c, _, h in MODEL_SIZES.values()}
FAMILIES = ("dit", "uvit", "pixart")
# U-ViT (github.com/baofff/U-ViT): name -> (C, blocks = in + mid + out, H); the configs' ``depth`` is
# in + out, so depth 12 is 13 blocks
UVIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (512, 13, 8),
    "M": (768, 17, 12),
    "L": (1024, 21, 16),
    "H": (1152, 29, 16),
}
PIXART_SIZES: dict[str, tuple[int, int, int]] = {"XL": (1152, 28, 16)}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a DiT/DyDiT. Plain data: JSON round-trips via to_dict/from_dict."""

    input_size: int = 32  # latent (or pixel) side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    dynamic: bool = True  # DyDiT (routers present) or plain DiT
    # pixels per latent cell: 8 for the SD VAE latents DiT uses, 1 for pixel-space models
    vae_scale: int = 8
    # model family (dyc.families): "dit", "uvit" (U-ViT: long skips, time/class as tokens) or
    # "pixart" (PixArt-α: cross-attention to text embeddings, adaLN-single)
    family: str = "dit"
    qkv_bias: bool = True  # U-ViT's official configs have none
    final_conv: bool = False  # U-ViT: a 3x3 conv after unpatchify (its pixel-space configs)
    text_channels: int = 0  # PixArt-α: width of the text-encoder embeddings (T5-XXL: 4096)
    text_len: int = 0  # PixArt-α: text tokens per prompt (120)

    # ---- derived -------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def extra_tokens(self) -> int:
        """Tokens besides the patches: U-ViT's time token (and label token when class-conditional)."""
        if self.family == "uvit":
            return 2 if self.num_classes > 0 else 1
        return 0

    @property
    def num_tokens(self) -> int:
        """Tokens every block sees (patches, plus U-ViT's time/label tokens)."""
        return self.num_patches + self.extra_tokens

    @property
    def conditional(self) -> bool:
        """Whether the model takes a condition (class id or text) and so supports guidance."""
        return self.family == "pixart" or self.num_classes > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def group_size(self) -> int:
        """MLP hidden units per channel group: the 4C units form H equal groups."""
        return self.mlp_hidden // self.num_heads

    @property
    def token_hidden(self) -> int:
        return self.hidden_size // 16

    @property
    def image_size(self) -> int:
        return self.input_size * self.vae_scale

    @property
    def size_name(self) -> str | None:
        sizes = {"dit": MODEL_SIZES, "uvit": UVIT_SIZES, "pixart": PIXART_SIZES}.get(self.family, {})
        for name, (c, l, h) in sizes.items():
            if (c, l, h) == (self.hidden_size, self.depth, self.num_heads):
                return name
        return None

    @property
    def name(self) -> str:
        size = self.size_name
        plain = {"dit": "DiT", "uvit": "U-ViT", "pixart": "PixArt"}.get(self.family, self.family)
        base = f"Dy{plain}" if self.dynamic else plain
        if size is None:
            return f"{base}-C{self.hidden_size}L{self.depth}H{self.num_heads}/{self.patch_size}"
        return f"{base}-{size}/{self.patch_size}"

    def validate(self) -> ModelConfig:
        if self.family not in FAMILIES:
            raise DycError(f"unknown model family {self.family!r}: one of {', '.join(FAMILIES)}")
        if self.family == "pixart" and (self.text_channels <= 0 or self.text_len <= 0):
            raise DycError("a PixArt model needs text_channels and text_len")
        if self.family == "uvit" and self.depth % 2 == 0:
            raise DycError(f"a U-ViT has an odd number of blocks (in, mid, out), got {self.depth}")
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "vae_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DycError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, int | float) or not self.mlp_ratio > 0:
            raise DycError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        for name in ("learn_sigma", "dynamic"):
            if not isinstance(getattr(self, name), bool):
                raise DycError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0 or (
                self.family == "dit" and self.num_classes < 1):
            raise DycError(f"num_classes must be a {'positive' if self.family == 'dit' else 'non-negative'} integer, "
                           f"got {self.num_classes!r}")
        if self.hidden_size % self.num_heads:
            raise DycError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.mlp_hidden % self.num_heads:
            raise DycError(f"MLP width {self.mlp_hidden} does not split into {self.num_heads} equal groups")
        if self.input_size % self.patch_size:
            raise DycError(f"input size {self.input_size} is not a multiple of patch size {self.patch_size}")
        if self.dynamic and self.hidden_size < 16:
            raise DycError("DyDiT needs hidden size >= 16 (token router width C/16)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DycError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**d).validate()


def parse_model_name(name: str, image_size: int | None = None) -> ModelConfig:
    """'DiT-XL/2' (or 'DyDiT-S/4', 'XL/2') at 256 or 512 px -> config of the latent model.

    Also the other families' official configs: 'U-ViT-S/2' (CIFAR-10), 'U-ViT-H/2' (ImageNet 256),
    'PixArt-XL/2' (PixArt-α; 256, 512 or 1024 px) and their 'Dy' forms (``dyc.families``).
    """
    from .families import parse_family_name

    cfg = parse_family_name(name, image_size)
    if cfg is not None:
        return cfg
    image_size = 256 if image_size is None else image_size
    m = re.fullmatch(r"(?:(Dy)?DiT-)?(S|B|L|XL)/(2|4|8)", name.strip(), flags=re.IGNORECASE)
    if not m:
        raise DycError(f"unknown model {name!r}: expected DiT-{{S,B,L,XL}}/{{2,4,8}} (e.g. DiT-XL/2), "
                       "U-ViT-{S,M,L,H}/2 or PixArt-XL/2")
    if image_size not in (256, 512):
        raise DycError(f"image size {image_size} is not supported: use 256 or 512")
    c, l, h = MODEL_SIZES[m.group(2).upper()]
    return ModelConfig(
        input_size=image_size // 8, patch_size=int(m.group(3)), hidden_size=c, depth=l, num_heads=h,
        dynamic=bool(m.group(1)),
    )


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    return tuple(sd[key].shape)


def _metadata_config(metadata: Mapping[str, str] | None) -> dict:
    """The ``dyc.config`` metadata entry, checked: a JSON object whose fields have the right types."""
    if not metadata or "dyc.config" not in metadata:
        return {}
    try:
        meta_cfg = json.loads(metadata["dyc.config"])
    except (TypeError, json.JSONDecodeError) as e:
        raise DycError(f"checkpoint metadata 'dyc.config' is not valid JSON: {e}") from None
    if not isinstance(meta_cfg, dict):
        raise DycError(f"checkpoint metadata 'dyc.config' must be a JSON object, got {type(meta_cfg).__name__}")
    for key in ("num_heads", "vae_scale"):
        v = meta_cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise DycError(f"checkpoint metadata 'dyc.config': {key} must be a positive integer, got {v!r}")
    return meta_cfg


def _check_num_heads(num_heads: int, width: int, what: str) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise (UsageError if what.startswith("--") else DycError)(f"{what} must be a positive integer, "
                                                                  f"got {num_heads!r}")
    if width % num_heads:
        raise DycError(f"{what} {num_heads} does not divide the width {width} of this model")
    return num_heads


def infer_config(sd: Mapping, metadata: Mapping[str, str] | None = None, num_heads: int | None = None) -> ModelConfig:
    """Infer the config from the shapes of an official-layout state dict.

    Heads are read from the routers (H-1 rows) for DyDiT; for a plain DiT they come from
    ``num_heads``, else from ``dyc.config`` metadata written by this project, else from the width
    (the four official sizes). A ``num_heads`` that the routers or the metadata contradict is an error.
    """
    from .families import detect_family, family_module

    family = detect_family(sd)
    if family != "dit":
        return family_module(family).infer_config(sd, metadata)
    meta_cfg = _metadata_config(metadata)
    try:
        c, in_ch, p, p2 = _shape(sd, "x_embedder.proj.weight")
        n = _shape(sd, "pos_embed")[1]
        rows, c_y = _shape(sd, "y_embedder.embedding_table.weight")
        fc1_out, _ = _shape(sd, "blocks.0.mlp.fc1.weight")
        out_rows, _ = _shape(sd, "final_layer.linear.weight")
    except KeyError as e:
        raise DycError(f"not a DiT checkpoint: missing key {e.args[0]!r}") from None
    except (ValueError, IndexError):
        raise DycError("not a DiT checkpoint: embedding weights have unexpected ranks") from None
    if p != p2 or c_y != c:
        raise DycError("shapes fit no DiT config: patch embedding is not square or widths disagree")
    grid = math.isqrt(n)
    if grid * grid != n:
        raise DycError(f"shapes fit no DiT config: {n} position embeddings is not a square grid")
    depth = 0
    while f"blocks.{depth}.attn.qkv.weight" in sd:
        depth += 1
    dynamic = "blocks.0.attn_rate.router.weight" in sd
    if num_heads is not None:
        _check_num_heads(num_heads, c, "--num-heads")
    if dynamic:
        heads = _shape(sd, "blocks.0.attn_rate.router.weight")[0] + 1
        if num_heads is not None and num_heads != heads:
            raise DycError(f"--num-heads {num_heads} contradicts the checkpoint: its routers give {heads} heads")
    elif num_heads is not None:
        if "num_heads" in meta_cfg and meta_cfg["num_heads"] != num_heads:
            raise DycError(f"--num-heads {num_heads} contradicts the checkpoint's dyc.config metadata "
                           f"({meta_cfg['num_heads']} heads)")
        heads = num_heads
    elif "num_heads" in meta_cfg:
        heads = _check_num_heads(meta_cfg["num_heads"], c, "the dyc.config metadata's num_heads")
    elif c in _HEADS_BY_WIDTH:
        heads = _HEADS_BY_WIDTH[c]
    else:
        raise DycError(
            f"cannot infer the head count of a plain DiT of width {c}: it is none of the official sizes "
            "and the file carries no 'dyc.config' metadata; give it with --num-heads "
            "(load_checkpoint(path, num_heads=...))"
        )
    out_ch, rem = divmod(out_rows, p * p)
    if rem or out_ch not in (in_ch, 2 * in_ch):
        raise DycError(f"shapes fit no DiT config: final layer has {out_rows} rows for patch {p}, {in_ch} channels")
    # DiT keeps one extra embedding row (the null class) when trained with label dropout
    num_classes = rows - 1
    vae_scale = int(meta_cfg.get("vae_scale", 8 if in_ch == 4 else 1))
    cfg = ModelConfig(
        input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=c, depth=depth, num_heads=heads,
        mlp_ratio=fc1_out / c, num_classes=num_classes, learn_sigma=out_ch == 2 * in_ch, dynamic=dynamic,
        vae_scale=vae_scale,
    )
    try:
        return cfg.validate()
    except DycError as e:
        raise DycError(f"shapes fit no DiT config: {e}") from None
