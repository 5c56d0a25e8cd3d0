"""Segmentation heads: the official LinearHead's state-dict layout and init, output shapes for ViT-S/B/L on the meta
device, the FPN head's inputs and checks, and a few training steps per head. CPU, offline, seconds."""
from __future__ import annotations

import pytest
import torch
from meta_features import meta_pairs
import torch.nn.functional as F

from dinolab.hub import dinov3_vitb16, dinov3_vitl16, dinov3_vits16
from dinolab.seg_heads import FPNSegHead, LinearHead
from dinolab.train import fit

# official FOUR_EVEN_INTERVALS (dinov3/eval/segmentation/models/__init__.py): 24 blocks -> [4, 11, 17, 23]


# ------------------------------------------------------------------------------------------- official layouts


def official_linear_head_keys(channels, n_out, use_batchnorm=True):
    keys = {"conv.weight": (n_out, channels, 1, 1), "conv.bias": (n_out,)}
    if use_batchnorm:
        keys.update({f"batchnorm_layer.{n}": (channels,) for n in ("weight", "bias", "running_mean", "running_var")})
        keys["batchnorm_layer.num_batches_tracked"] = ()
    return keys


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("use_batchnorm,use_cls", [(True, False), (False, True)])
def test_linear_head_official_layout_and_init(use_batchnorm, use_cls):
    head = LinearHead([32, 32, 16], 7, use_batchnorm=use_batchnorm, use_cls_token=use_cls)
    ch = 80 * (2 if use_cls else 1)
    assert _shapes(head) == official_linear_head_keys(ch, 7, use_batchnorm)
    head.load_state_dict({k: torch.randn(s) if s else torch.tensor(3) for k, s in _shapes(head).items()}, strict=True)
    head = LinearHead([512] * 4, 150)
    assert abs(head.conv.weight.std().item() - 0.01) < 5e-4 and head.conv.bias.abs().max() == 0


# --------------------------------------------------------------------------------------- shapes for ViT-S/B/L


@pytest.mark.parametrize("build", [dinov3_vits16, dinov3_vitb16, dinov3_vitl16])
def test_seg_head_shapes_on_vit_configs_meta(build):
    B, S = 2, 512
    D, pairs = meta_pairs(build, B, S)
    with torch.device("meta"):
        linear = LinearHead([D] * 4, 150)
        fpn = FPNSegHead(D, 128, 6)
        adapter_like = {str(i + 1): torch.empty(B, D, S // s, S // s) for i, s in enumerate((4, 8, 16, 32))}
    maps = [p for p, _ in pairs]
    assert linear(maps).shape == (B, 150, 32, 32)
    assert linear.predict(maps, rescale_to=(S, S)).shape == (B, 150, S, S)
    assert fpn(adapter_like).shape == (B, 6, S, S)
    assert fpn.forward_features(adapter_like).shape == (B, 128, S // 4, S // 4)


def test_fpn_head_dict_list_and_validation():
    head = FPNSegHead([8, 12, 16, 20], 16, 3).eval()
    feats = {"1": torch.randn(2, 8, 16, 16), "2": torch.randn(2, 12, 8, 8), "3": torch.randn(2, 16, 4, 4),
             "4": torch.randn(2, 20, 2, 2)}
    out = head(feats)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(head(list(feats.values())), out)
    assert head(feats, output_size=(50, 70)).shape == (2, 3, 50, 70)
    with pytest.raises(ValueError, match="expected 4 levels"):
        head(list(feats.values())[:3])
    with pytest.raises(ValueError, match="level 2"):
        head(dict(feats, **{"3": torch.randn(2, 5, 4, 4)}))


# ------------------------------------------------------------------------------------------- each head trains


def _falls(hist, factor=0.7):
    return sum(hist[-3:]) / 3 < factor * sum(hist[:3]) / 3


def test_fpn_head_trains():
    torch.manual_seed(0)
    feats = {"1": torch.randn(4, 8, 8, 8), "2": torch.randn(4, 8, 4, 4), "3": torch.randn(4, 8, 2, 2),
             "4": torch.randn(4, 8, 1, 1)}
    # a learnable target: the class is a fixed linear read-out of the finest level, upsampled
    readout = torch.randn(3, 8)
    target = F.interpolate(torch.einsum("kc,bchw->bkhw", readout, feats["1"]), size=(32, 32), mode="nearest").argmax(1)
    head = FPNSegHead(8, 16, 3)
    hist = fit(head, None, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(feats, target)], steps=20, lr=1e-2,
               progress=False)
    assert _falls(hist), hist


def test_linear_head_trains():
    torch.manual_seed(0)
    maps = [torch.randn(4, 16, 4, 4), torch.randn(4, 16, 2, 2)]
    target = torch.randint(0, 3, (4, 4, 4))
    head = LinearHead([16, 16], 3, dropout=0.0)
    hist = fit(head, None, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(maps, target)], steps=20, lr=3e-2,
               progress=False)
    assert _falls(hist), hist
    assert head.predict(maps, rescale_to=(16, 16)).shape == (4, 3, 16, 16)
