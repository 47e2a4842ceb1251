import pytest
import torch

from dyc.config import ModelConfig
from dyc.model import DyDiT


def tiny_config(**kw) -> ModelConfig:
    base = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    base.update(kw)
    return ModelConfig(**base)


def random_model(cfg: ModelConfig, seed: int = 0, router_scale: float = 1.0) -> DyDiT:
    """A model whose every weight is random (adaLN included), so no path is trivially zero."""
    torch.manual_seed(seed)
    model = DyDiT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)
            if "_rate.router" in name:
                p.mul_(router_scale)
    return model


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def shared_dyc_cache(tmp_path_factory):
    """One bundle cache for the tests that run documented examples as written: the embedded default model
    compiles into it once per session instead of once per test."""
    return tmp_path_factory.mktemp("dyc_cache")
