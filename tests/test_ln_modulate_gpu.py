"""The Triton LN+modulate kernels and the fused fc1+GELU against eager expressions (CUDA only)."""

import pytest
import torch

from dyc.backends.torch_sliced import linear_gelu, ln_modulate
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


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(32, 256, 1152), (2, 17, 100), (1, 1, 384)])
def test_add_ln_modulate_matches_float64(dtype, tol, shape, keep):
    """h += gate·y(·keep) in place, then LN+modulate: against the same expression in float64."""
    b, n, c = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    h = (torch.randn(b, n, c, generator=g, device="cuda") * 2 + 0.5).to(dtype)
    y = torch.randn(b, n, c, generator=g, device="cuda").to(dtype)
    mods = torch.randn(b, 6, c, generator=g, device="cuda").to(dtype)
    gate, shift, scale = mods[:, 2], mods[:, 0], mods[:, 1]  # strided rows, as the model passes them
    k = (torch.rand(b, n, generator=g, device="cuda") > 0.4).to(dtype) if keep else None
    want_h = h.double() + gate.double()[:, None] * y.double() * (k.double()[..., None] if keep else 1.0)
    want = ln_modulate(want_h, shift.double(), scale.double())
    h_in = h.clone()
    got_h, got = K.add_ln_modulate(h_in, y, gate, k, shift, scale)
    assert got_h.data_ptr() == h_in.data_ptr()  # updated in place
    assert ((got_h.double() - want_h).norm() / want_h.norm()).item() < tol
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    if keep:  # a dropped token's residual stream is left exactly as it was
        dropped = k == 0
        assert torch.equal(got_h[dropped], h[dropped])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,hidden", [((32, 256, 1152), 72), ((2, 17, 100), 6)])
def test_add_ln_modulate_finishes_the_token_router(dtype, shape, hidden):
    """With the router's hidden layer instead of a keep mask, the kernel's keep is the router's: against
    a float64 router (tokens within rounding of the threshold may go either way) and the eager
    router's last steps in the same dtype; the update and LN are those of that keep."""
    import torch.nn.functional as F

    b, n, c = shape
    g = torch.Generator(device="cuda").manual_seed(3)
    h = (torch.randn(b, n, c, generator=g, device="cuda") * 2 + 0.5).to(dtype)
    y = torch.randn(b, n, c, generator=g, device="cuda").to(dtype)
    mods = torch.randn(b, 6, c, generator=g, device="cuda").to(dtype)
    gate, shift, scale = mods[:, 2], mods[:, 0], mods[:, 1]
    w0 = (torch.randn(hidden, c, generator=g, device="cuda") / c**0.5).to(dtype)
    b0 = (torch.randn(hidden, generator=g, device="cuda") * 0.1).to(dtype)
    w2 = torch.randn(1, hidden, generator=g, device="cuda").to(dtype)
    b2 = (torch.randn(1, generator=g, device="cuda") * 0.1).to(dtype)
    hid = F.linear(h, w0, b0)
    logit = F.linear(F.relu(F.linear(h.double(), w0.double(), b0.double())), w2.double(), b2.double()).squeeze(-1)
    sure = logit.abs() > 0.05
    assert sure.float().mean() > 0.8 and 0 < (logit > 0).float().mean() < 1
    eager_keep = K.router_keep_from_hidden(K.RouterHidden(hid, w2, b2))
    want_h = h.clone()
    want_h, want = K.add_ln_modulate(want_h, y, gate, eager_keep, shift, scale)
    got_h, got = K.add_ln_modulate(h.clone(), y, gate, K.RouterHidden(hid, w2, b2), shift, scale)
    kept = (got_h != h).any(-1)  # a token whose update was applied (y, gate nonzero almost surely)
    assert torch.equal(kept[sure], (logit > 0)[sure])
    same = (eager_keep > 0.5) == kept
    assert same.float().mean() > 0.995  # the eager path in this dtype: only near-threshold tokens differ
    rows = same.unsqueeze(-1).expand_as(got)
    assert torch.equal(got_h[rows], want_h[rows])  # the same elementwise update where the keeps agree
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-2, atol=1e-2)  # the LN's reduction may differ


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-2)])
def test_linear_gelu_is_the_tanh_form(dtype, tol):
    """cuBLASLt's GELU epilogue must be DiT's tanh GELU (the erf form differs by up to ~5e-4)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(512, 384, generator=g, device="cuda").to(dtype)
    w = (torch.randn(1536, 384, generator=g, device="cuda") / 20).to(dtype)
    b = torch.randn(1536, generator=g, device="cuda").to(dtype)
    got = linear_gelu(x, w, b).double()
    pre = x.double() @ w.double().t() + b.double()
    want = torch.nn.functional.gelu(pre, approximate="tanh")
    erf = torch.nn.functional.gelu(pre)
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol
    if dtype == torch.float32:
        assert err < ((erf - want).norm() / want.norm()).item() / 10  # closer to tanh than erf is
