"""Classification: the official LinearClassifier's state-dict layout, init and input features, its output shape for
ViT-S/B/L on the meta device, and a few training steps. CPU, offline, seconds."""
from __future__ import annotations

import pytest
import torch
from meta_features import meta_pairs
import torch.nn.functional as F

from dinolab.hub import dinov3_vitb16, dinov3_vitl16, dinov3_vits16
from dinolab.linear import LinearClassifier, create_linear_input
from dinolab.train import fit

# official FOUR_EVEN_INTERVALS (dinov3/eval/segmentation/models/__init__.py): 24 blocks -> [4, 11, 17, 23]


# -------------------------------------------------------------------------------------------- official layout


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_linear_classifier_layout_init_and_features():
    clf = LinearClassifier(8, 5)
    assert _shapes(clf) == {"linear.weight": (5, 16), "linear.bias": (5,)}
    big = LinearClassifier(1024, 1000)
    assert abs(big.linear.weight.std().item() - 0.01) < 5e-4 and big.linear.bias.abs().max() == 0
    # hand-made tokens: cls = 1..8, patch tokens average to 0.5
    patches = torch.stack([torch.zeros(2, 8), torch.ones(2, 8)], 1)  # [B=2, N=2, D=8]
    cls = torch.arange(1.0, 9.0).expand(2, 8)
    feats = create_linear_input([(patches, cls)], use_n_blocks=1, use_avgpool=True)
    torch.testing.assert_close(feats, torch.cat([cls, torch.full((2, 8), 0.5)], 1))
    torch.testing.assert_close(clf([(patches, cls)]), clf(feats))
    # patch maps [B, D, h, w] (reshape=True) give the same mean
    maps = patches.transpose(1, 2).reshape(2, 8, 1, 2)
    torch.testing.assert_close(create_linear_input([(maps, cls)]), feats)
    # last n blocks' cls tokens, then the last block's mean patch
    blocks = [(patches * 0, cls * 0), (patches, cls * 2), (patches * 3, cls * 3)]
    f2 = create_linear_input(blocks, use_n_blocks=2, use_avgpool=True)
    torch.testing.assert_close(f2, torch.cat([cls * 2, cls * 3, torch.full((2, 8), 1.5)], 1))
    assert LinearClassifier(8, 5, use_n_blocks=2).out_dim == 24
    assert LinearClassifier(8, 5, use_cls=False).out_dim == 8
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        clf(torch.randn(2, 15))


# --------------------------------------------------------------------------------------- shapes for ViT-S/B/L


@pytest.mark.parametrize("build", [dinov3_vits16, dinov3_vitb16, dinov3_vitl16])
def test_linear_classifier_shape_on_vit_configs_meta(build):
    B, S = 2, 512
    D, pairs = meta_pairs(build, B, S)
    with torch.device("meta"):
        clf = LinearClassifier(D, 10)
    assert clf([pairs[-1]]).shape == (B, 10)


# -------------------------------------------------------------------------------------- the classifier trains


def _falls(hist, factor=0.7):
    return sum(hist[-3:]) / 3 < factor * sum(hist[:3]) / 3


def test_linear_classifier_trains():
    torch.manual_seed(0)
    x = torch.randn(32, 24)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    clf = LinearClassifier(12, 3)
    hist = fit(clf, None, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], steps=30, lr=5e-2, progress=False)
    assert _falls(hist), hist
