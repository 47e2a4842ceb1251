"""What a pipeline conditions each sample on, per model family (``dyc.families``).

Class ids for DiT and class-conditional U-ViT (null: the class ``num_classes``); nothing for an
unconditional U-ViT (its graphs ignore ``y``: zeros are fed, guidance is off); text embeddings
[n, T, C_text] float32 for PixArt-α (null: the model's ``y_embedding``, which ``dyc compile``
stores in the bundle as ``null_text.npy``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import DycError

NULL_TEXT_FILE = "null_text.npy"


def check_text_embeddings(text_emb, cfg: ModelConfig) -> torch.Tensor:
    """[n, T, C_text] float32, finite, with the model's T and C_text."""
    if isinstance(text_emb, np.ndarray):
        if text_emb.dtype != np.float32:
            raise DycError(f"text embeddings must be float32, got {text_emb.dtype}")
        text_emb = torch.from_numpy(np.ascontiguousarray(text_emb))
    if not isinstance(text_emb, torch.Tensor) or text_emb.dtype != torch.float32:
        raise DycError("text embeddings must be a float32 tensor or numpy array")
    want = (cfg.text_len, cfg.text_channels)
    if text_emb.dim() != 3 or tuple(text_emb.shape[1:]) != want or text_emb.shape[0] < 1:
        raise DycError(f"text embeddings have shape {list(text_emb.shape)}, expected [num_samples, {want[0]}, "
                       f"{want[1]}] (the text encoder's output, e.g. T5-XXL padded to {want[0]} tokens)")
    if not torch.isfinite(text_emb).all():
        raise DycError("text embeddings have NaN or infinite values")
    return text_emb


def conditions(cfg: ModelConfig, classes: Sequence[int] | None, text_emb, num_samples: int | None = None,
               check_classes=None) -> tuple[torch.Tensor, list[int]]:
    """The condition tensor per sample and the class ids to record (empty for text / unconditional)."""
    if cfg.family == "pixart":
        if text_emb is None:
            raise DycError(f"{cfg.name} is a text-to-image model: give text embeddings (--text-emb F.npy, "
                           f"[n, {cfg.text_len}, {cfg.text_channels}] float32)")
        if classes is not None:
            raise DycError(f"{cfg.name} takes text embeddings, not class ids")
        return check_text_embeddings(text_emb, cfg), []
    if text_emb is not None:
        raise DycError(f"{cfg.name} is not a text-to-image model: it takes no text embeddings")
    if not cfg.conditional:  # unconditional U-ViT: one placeholder per sample, the ids (if any) unused
        if num_samples is None and classes is not None:
            num_samples = 1 if isinstance(classes, int) else len(list(classes))
        if num_samples is None or num_samples < 1:
            raise DycError(f"{cfg.name} is unconditional: give the number of samples")
        return torch.zeros(num_samples, dtype=torch.int64), []
    ids = check_classes(classes)
    return torch.tensor(ids, dtype=torch.int64), ids


def null_text(bundle=None, model: torch.nn.Module | None = None) -> torch.Tensor:
    """PixArt-α's null text embedding [T, C_text] float32: from the bundle's file, else the model."""
    if bundle is not None:
        if NULL_TEXT_FILE not in bundle.manifest.get("files", {}):
            raise DycError(f"{bundle.path}: a PixArt bundle without {NULL_TEXT_FILE}: recompile it with this dyc")
        data = bundle.read_file(NULL_TEXT_FILE)  # size and sha256 checked on the bytes used
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)).float()
    if model is None:
        raise DycError("the null text embedding needs the bundle or the model")
    return model.null_embedding.detach().float().cpu()


def bundle_files(cfg: ModelConfig, sd) -> dict[str, bytes]:
    """Files a family adds to a bundle beside the graphs (PixArt-α: the null text for guidance)."""
    if cfg.family != "pixart":
        return {}
    import io

    buf = io.BytesIO()
    np.save(buf, sd["y_embedder.y_embedding"].detach().float().cpu().numpy(), allow_pickle=False)
    return {NULL_TEXT_FILE: buf.getvalue()}
