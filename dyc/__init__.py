"""dyc: a deployment compiler for Dynamic Diffusion Transformers (DyDiT)."""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import ModelConfig, parse_model_name
from .errors import DycError
from .model import DyDiT
from .runtime import Pipeline as Pipeline

__version__ = "0.1.0"
__all__ = ["Checkpoint", "DyDiT", "DycError", "ModelConfig", "load_checkpoint", "parse_model_name", "save_checkpoint"]
