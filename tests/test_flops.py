"""FLOPs in the MAC convention against the papers' figures and hand counts."""

import numpy as np
import pytest
from conftest import tiny_config

from dyc.config import parse_model_name
from dyc.flops import attn_flops_per_head, block_flops, flops_ratio, mlp_flops_per_group, static_gflops


@pytest.mark.parametrize("name,paper", [("DiT-S/2", 6.07), ("DiT-B/2", 23.02), ("DiT-XL/2", 118.69)])
def test_static_gflops_match_paper(name, paper):
    assert static_gflops(parse_model_name(name)) == pytest.approx(paper, rel=0.005)


def test_dit_xl_512_and_patch_sizes_match_dit_paper():
    # DiT paper Table 4: XL/2 at 512 px 524.6, XL/4 29.05, XL/8 7.39 (256 px)
    assert static_gflops(parse_model_name("DiT-XL/2", 512)) == pytest.approx(524.6, rel=0.005)
    assert static_gflops(parse_model_name("DiT-XL/4")) == pytest.approx(29.05, rel=0.005)
    assert static_gflops(parse_model_name("DiT-XL/8")) == pytest.approx(7.39, rel=0.005)


def test_per_head_and_group_counts_by_hand():
    cfg = tiny_config()  # N=16 tokens, C=64, H=4 -> Dh=16, group size 64
    n, c, d = 16, 64, 16
    assert attn_flops_per_head(cfg) == 3 * n * c * d + n * n * d * 2 + n * d * c
    assert mlp_flops_per_group(cfg) == 2 * n * c * 64


def test_ratio_of_masks_and_token_keep():
    cfg = tiny_config()
    a, m = attn_flops_per_head(cfg), mlp_flops_per_group(cfg)
    hm = np.zeros((2, 2, 4))
    cm = np.zeros((2, 2, 4))
    hm[0] = 1  # t=0: all on; t=1: head 0 and group 0 only
    cm[0] = 1
    hm[1, :, 0] = cm[1, :, 0] = 1
    full = 2 * 4 * (a + m)
    t1 = 2 * (a + 0.5 * m)  # one head, one group at half the tokens
    assert flops_ratio(cfg, hm, cm, 1.0, [0]) == pytest.approx(1.0)
    assert flops_ratio(cfg, hm, cm, 0.5, [1]) == pytest.approx(t1 / full)
    assert flops_ratio(cfg, hm, cm, 0.5) == pytest.approx((2 * 4 * (a + 0.5 * m) / full + t1 / full) / 2)
    attn, mlp = block_flops(cfg, hm, cm, np.array([1.0, 0.25]))  # per-layer keep
    assert mlp[0] == pytest.approx(4 * m * 1.25)
