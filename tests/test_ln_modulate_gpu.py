"""The Triton LN+modulate kernel against the eager expression (CUDA only)."""

import pytest
import torch

from dyc.backends.torch_sliced import ln_modulate
from dyc.kernels import ln_modulate as K

pytestmark = pytest.mark.skipif(not K.available(), reason="needs a CUDA GPU and Triton")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(32, 256, 1152), (2, 17, 100), (1, 1, 384)])
def test_matches_eager(dtype, tol, shape):
    b, n, c = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(b, n, c, generator=g, device="cuda") * 2 + 0.5).to(dtype)
    mods = torch.randn(b, 6, c, generator=g, device="cuda").to(dtype)
    shift, scale = mods[:, 0], mods[:, 1]  # strided rows, as the model passes them
    got = K.ln_modulate(x, shift, scale)
    want = ln_modulate(x.float(), shift.float(), scale.float())
    assert got.dtype == dtype and got.shape == x.shape
    assert ((got.float() - want).norm() / want.norm()).item() < tol
