"""The recipe's data set: scikit-learn's 8×8 handwritten digits (1797 images, 10 classes).

It ships inside scikit-learn, so the recipe needs no download. Pixels 0..16 are scaled to
[-1, 1] and upsampled to ``size``×``size`` (bilinear) so that a patch-2 DiT sees one token
per original pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dyc.errors import DycError

NUM_CLASSES = 10
RAW_SIZE = 8


def load_digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """Images [1797, 8, 8] in 0..16 (float64) and labels [1797]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DycError("the digits recipe needs scikit-learn: pip install 'dyc[recipes]'") from None

    d = load_digits()
    return d.images.astype(np.float64), d.target.astype(np.int64)


def to_model_space(images: np.ndarray | torch.Tensor, size: int = 16) -> torch.Tensor:
    """8×8 pixels in 0..16 -> [B, 1, size, size] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, RAW_SIZE, RAW_SIZE)
    x = x / 8.0 - 1.0
    if size != RAW_SIZE:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1)


def to_raw_space(x: torch.Tensor) -> np.ndarray:
    """[B, 1, S, S] in [-1, 1] -> [B, 64] in 0..16: area-downsampled back to the digits' 8×8 grid."""
    x = x.detach().float().clamp(-1, 1)
    if x.shape[-1] != RAW_SIZE:
        x = F.adaptive_avg_pool2d(x, RAW_SIZE)
    return ((x + 1.0) * 8.0).reshape(x.shape[0], -1).cpu().numpy().astype(np.float64)


def digits_dataset(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set in model space: images [1797, 1, size, size], labels [1797]."""
    images, labels = load_digits_raw()
    return to_model_space(images, size), torch.from_numpy(labels)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless shuffled mini-batches (reshuffled every epoch)."""
    n = x.shape[0]
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]
