"""The embedded default models: a tiny pixel-space DiT and its DyDiT (λ=0.5) on scikit-learn's digits.

Made by ``python -m dyc.recipes.run_all --out-dir dyc/models`` (see MODEL_CARD.md beside this file);
``dyc`` uses them when no checkpoint is given, so a fresh machine has a real model to run.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DycError

MODELS_DIR = Path(__file__).resolve().parent
DIT_FILE = "dit_digits.safetensors"
DYDIT_FILE = "dydit_digits.safetensors"


def default_checkpoint(dynamic: bool = True) -> Path:
    """Path of the shipped DyDiT (``dynamic=True``) or of the DiT it was fine-tuned from."""
    path = MODELS_DIR / (DYDIT_FILE if dynamic else DIT_FILE)
    if not path.is_file():
        raise DycError(
            f"the default model {path.name} is missing from {MODELS_DIR}: reinstall dyc, or rebuild it with "
            "'python -m dyc.recipes.run_all --out-dir dyc/models'"
        )
    return path
