"""The sliced torch modules (torch backend) against the eager masked model, on CPU."""

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from dyc.backends.torch_sliced import GroupLayout, SlicedDiT


def _layout_for(hm: np.ndarray, cm: np.ndarray) -> tuple[GroupLayout, np.ndarray, np.ndarray]:
    """Union layout of several timesteps' masks [T, L, H], plus each t's slot masks."""
    heads = [sorted(set(np.nonzero(hm[:, l].any(0))[0].tolist())) for l in range(hm.shape[1])]
    chans = [sorted(set(np.nonzero(cm[:, l].any(0))[0].tolist())) for l in range(cm.shape[1])]
    vary_h = [bool((hm[:, l] != hm[:1, l]).any()) for l in range(hm.shape[1])]
    vary_c = [bool((cm[:, l] != cm[:1, l]).any()) for l in range(cm.shape[1])]
    slots_h = max(map(len, heads))
    slots_c = max(map(len, chans))
    hslot = np.zeros((hm.shape[0], hm.shape[1], slots_h), np.float32)
    cslot = np.zeros((cm.shape[0], cm.shape[1], slots_c), np.float32)
    for l in range(hm.shape[1]):
        hslot[:, l, : len(heads[l])] = hm[:, l, heads[l]]
        cslot[:, l, : len(chans[l])] = cm[:, l, chans[l]]
    return GroupLayout(heads, chans, vary_h, vary_c), hslot, cslot


@pytest.mark.parametrize("dynamic", [True, False])
def test_sliced_union_matches_eager_at_every_member_t(dynamic):
    cfg = tiny_config(depth=3, dynamic=dynamic)
    model = random_model(cfg, seed=5, router_scale=3.0)
    ts = torch.tensor([100, 400, 700])
    hm, cm = (m.numpy() > 0.5 for m in model.tdw_masks(ts))
    layout, hslot, cslot = _layout_for(hm, cm)
    if dynamic:  # a union narrower than the full model, with per-t masks where members differ
        assert sum(map(len, layout.heads)) < cfg.depth * cfg.num_heads and any(layout.vary_head)
    sliced = SlicedDiT(cfg, model.state_dict(), layout)
    x = torch.randn(3, 4, 8, 8)
    y = torch.tensor([1, 2, 10])
    with torch.no_grad():
        want = model(x, ts, y)
        got = sliced(x, ts, y, head_mask=torch.from_numpy(hslot), channel_mask=torch.from_numpy(cslot))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the sliced weights really are narrower: no zero head is materialised
    qkv = sum(layer["attn.qkv.weight"].shape[0] for layer in sliced.layers)
    assert qkv == 3 * cfg.head_dim * sum(map(len, layout.heads))
