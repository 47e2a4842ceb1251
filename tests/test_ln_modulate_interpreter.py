"""The Triton LN+modulate kernels on the CPU, in Triton's interpreter (fp16 only: the interpreter's
bf16 is not usable), against float64: the plain kernel, the deferred residual add with a keep mask,
and with the token router's hidden layer (the kernel then finishes the router: ``dense-fold``).
tests/test_ln_modulate_gpu.py runs the same kernels compiled, on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dyc.kernels import token_router

ROOT = Path(__file__).resolve().parents[1]


def reference(h, y, gate, keep, shift, scale):
    from dyc.backends.torch_sliced import add_ln_modulate

    return add_ln_modulate(h.double(), y.double(), gate.double(), None if keep is None else keep.double(),
                           shift.double(), scale.double())


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def check(dtype=torch.float16, shape=(2, 17, 100), hidden=6) -> None:
    from dyc.kernels import ln_modulate as K

    b, n, c = shape
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(b, n, c, generator=g) * 2 + 0.5).to(dtype)
    y = torch.randn(b, n, c, generator=g).to(dtype)
    mods = torch.randn(b, 6, c, generator=g).to(dtype)
    gate, shift, scale = mods[:, 2], mods[:, 0], mods[:, 1]  # strided rows, as the model passes them
    want = reference(h, torch.zeros_like(y), gate, None, shift, scale)[1]
    assert rel(K.ln_modulate(h, shift, scale), want) < 2e-3
    keep = (torch.rand(b, n, generator=g) > 0.4).to(dtype)
    for k in (None, keep):
        want_h, want = reference(h, y, gate, k, shift, scale)
        got_h, got = K.add_ln_modulate(h.clone(), y, gate, k, shift, scale)
        assert rel(got_h, want_h) < 2e-3 and rel(got, want) < 2e-3
    # the router's hidden layer instead of a mask: the kernel's keep is the router's decision
    w0 = (torch.randn(hidden, c, generator=g) / c**0.5).to(dtype)
    b0 = (torch.randn(hidden, generator=g) * 0.1).to(dtype)
    w2 = torch.randn(1, hidden, generator=g).to(dtype)
    b2 = (torch.randn(1, generator=g) * 0.1).to(dtype)
    hid = F.linear(h.float(), w0.float(), b0.float()).to(dtype)  # as cuBLAS's GEMM with its bias epilogue
    logit = F.linear(F.relu(F.linear(h.double(), w0.double(), b0.double())), w2.double(), b2.double()).squeeze(-1)
    sure = logit.abs() > 0.05  # tokens within rounding of the threshold may go either way
    assert sure.float().mean() > 0.8 and 0 < (logit > 0).float().mean() < 1
    got_h, got = K.add_ln_modulate(h.clone(), y, gate, K.RouterHidden(hid, w2, b2), shift, scale)
    kept = (got_h != h).any(-1)
    assert torch.equal(kept[sure], (logit > 0)[sure])
    want_h, want = reference(h, y, gate, kept.to(dtype), shift, scale)  # the update and LN of that keep
    assert rel(got_h, want_h) < 2e-3 and rel(got, want) < 2e-3


@pytest.mark.skipif(not token_router._have_triton(), reason="Triton is not installed (its interpreter runs this)")
def test_cpu_interpreter():
    code = "import sys; sys.path.insert(0, 'tests'); import test_ln_modulate_interpreter as T; T.check()"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
