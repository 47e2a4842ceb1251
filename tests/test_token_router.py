"""The Triton token-router kernel against an independent float64 computation of the router.

On a GPU it runs directly (fp16 and bf16); on a CPU with Triton installed it runs in Triton's
interpreter in a subprocess (fp16 only: the interpreter's bf16 matmul is not usable).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dyc.kernels import token_router as K

ROOT = Path(__file__).resolve().parents[1]


def check(device: str, dtype: torch.dtype, shape=(2, 37, 96), hidden: int = 6) -> None:
    b, n, c = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, n, c, generator=g).to(device, dtype)
    w0 = (torch.randn(hidden, c, generator=g) / c**0.5).to(device, dtype)
    b0 = (torch.randn(hidden, generator=g) * 0.1).to(device, dtype)
    w2 = torch.randn(1, hidden, generator=g).to(device, dtype)
    b2 = (torch.randn(1, generator=g) * 0.1).to(device, dtype)
    keep = K.router_keep(h, w0, b0, w2, b2)
    assert keep.shape == (b, n) and keep.dtype == dtype
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    # float64 decision; tokens whose logit is within rounding of the threshold may go either way
    logit = F.linear(F.relu(F.linear(h.double(), w0.double(), b0.double())), w2.double(), b2.double()).squeeze(-1)
    sure = logit.abs() > 0.05
    assert sure.float().mean() > 0.8 and 0 < (logit > 0).float().mean() < 1
    assert torch.equal((keep > 0.5)[sure], (logit > 0)[sure])
    # and the unfused path in the same dtype (what the eager model computes) agrees on all of them
    unfused = torch.sigmoid(F.linear(F.relu(F.linear(h, w0, b0)), w2, b2).squeeze(-1)) > 0.5
    assert (unfused == (keep > 0.5))[sure].all()


@pytest.mark.skipif(not K.available("cuda"), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,hidden", [((2, 37, 96), 6), ((32, 256, 1152), 72), ((1, 5, 1152), 72)])
def test_gpu(dtype, shape, hidden):
    check("cuda", dtype, shape, hidden)


@pytest.mark.skipif(not K._have_triton(), reason="Triton is not installed (its interpreter runs this on the CPU)")
def test_cpu_interpreter():
    code = ("import torch, sys; sys.path.insert(0, 'tests'); from test_token_router import check; "
            "check('cpu', torch.float16)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_rejects_fp32():
    h = torch.zeros(1, 4, 8, dtype=torch.float32)
    with pytest.raises((TypeError, ImportError)):
        K.router_keep(h, h[0, :2], h[0, 0, :2], h[0, :1, :2], h[0, 0, :1])
