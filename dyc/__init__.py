"""dyc: a deployment compiler for Dynamic Diffusion Transformers (DyDiT).

The public names load on first use (PEP 562), so ``import dyc`` and the ``dyc`` command start without
importing torch; ``dyc.load_checkpoint`` etc. work as plain attributes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Checkpoint": ".checkpoint", "load_checkpoint": ".checkpoint", "save_checkpoint": ".checkpoint",
    "ModelConfig": ".config", "parse_model_name": ".config",
    "DycError": ".errors",
    "DyDiT": ".model",
    "Pipeline": ".runtime",
}
__all__ = ["Checkpoint", "DyDiT", "DycError", "ModelConfig", "Pipeline", "load_checkpoint", "parse_model_name",
           "save_checkpoint"]

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from .config import ModelConfig, parse_model_name
    from .errors import DycError
    from .model import DyDiT
    from .runtime import Pipeline


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
