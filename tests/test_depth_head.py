"""Depth heads: the official DPTHead's state-dict layout (and the ViT-7B head's size), output shapes for ViT-S/B/L on
the meta device, readout modes, depth bins and SigLoss against hand-computed values, and a few training steps.
CPU, offline, seconds."""
from __future__ import annotations

import math

import pytest
import torch
from meta_features import meta_pairs

from dinolab.depth_head import DPTHead, FeaturesToDepth, SigLoss, bin_weights, depth_bins
from dinolab.hub import dinov3_vitb16, dinov3_vitl16, dinov3_vits16
from dinolab.train import fit

# official FOUR_EVEN_INTERVALS (dinov3/eval/segmentation/models/__init__.py): 24 blocks -> [4, 11, 17, 23]


# ------------------------------------------------------------------------------------------- official layouts


def official_dpt_keys(in_channels, channels, pp, n_out, readout="ignore", use_batchnorm=False, hidden=32):
    """name -> shape of the official DPTHead state dict, written out from dinov3/eval/depth/models/dpt_head.py."""
    C, k = channels, {}
    for i, (d, p) in enumerate(zip(in_channels, pp)):
        k[f"reassemble_blocks.projects.{i}.conv.weight"] = (p, d, 1, 1)
        k[f"reassemble_blocks.projects.{i}.conv.bias"] = (p,)
        if readout == "project":
            k[f"reassemble_blocks.readout_projects.{i}.0.weight"] = (d, 2 * d)
            k[f"reassemble_blocks.readout_projects.{i}.0.bias"] = (d,)
        if use_batchnorm:
            for n in ("weight", "bias", "running_mean", "running_var"):
                k[f"reassemble_blocks.batchnorm_layers.{i}.{n}"] = (d,)
            k[f"reassemble_blocks.batchnorm_layers.{i}.num_batches_tracked"] = ()
        k[f"convs.{i}.conv.weight"] = (C, p, 3, 3)
        k[f"fusion_blocks.{i}.project.conv.weight"] = (C, C, 1, 1)
        k[f"fusion_blocks.{i}.project.conv.bias"] = (C,)
        units = ["res_conv_unit2"] if i == 0 else ["res_conv_unit1", "res_conv_unit2"]
        for u in units:
            for c in ("conv1", "conv2"):
                k[f"fusion_blocks.{i}.{u}.{c}.conv.weight"] = (C, C, 3, 3)
    for i, (ks, w) in {0: (4, pp[0]), 1: (2, pp[1]), 3: (3, pp[3])}.items():
        k[f"reassemble_blocks.resize_layers.{i}.weight"] = (w, w, ks, ks)
        k[f"reassemble_blocks.resize_layers.{i}.bias"] = (w,)
    k["project.conv.weight"] = (C, C, 3, 3)
    k["project.conv.bias"] = (C,)
    k["conv_depth.head.0.weight"] = (C // 2, C, 3, 3)
    k["conv_depth.head.0.bias"] = (C // 2,)
    k["conv_depth.head.2.weight"] = (hidden, C // 2, 3, 3)
    k["conv_depth.head.2.bias"] = (hidden,)
    k["conv_depth.head.4.weight"] = (n_out, hidden, 1, 1)
    k["conv_depth.head.4.bias"] = (n_out,)
    return k


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("readout,use_bn", [("ignore", False), ("ignore", True), ("add", False), ("project", True)])
def test_dpt_official_layout_loads_strict(readout, use_bn):
    ic, pp = [16, 16, 24, 24], [8, 8, 16, 16]
    head = DPTHead(ic, channels=16, post_process_channels=pp, readout_type=readout, n_output_channels=5,
                   use_batchnorm=use_bn)
    assert _shapes(head) == official_dpt_keys(ic, 16, pp, 5, readout, use_bn)
    head.load_state_dict({k: torch.randn(s) if s else torch.tensor(3) for k, s in _shapes(head).items()}, strict=True)


def test_dpt_vit7b_head_param_count_meta():
    """Hub dinov3_vit7b16_dd: [2048]*4 post-process channels, 512 channels, BN, readout ignore, 256 bins:
    ≈230.7M parameters (reference §5.1); [B, 256, 512, 512] at 512² (32×32 tokens)."""
    with torch.device("meta"):
        head = DPTHead([4096] * 4, channels=512, post_process_channels=[2048] * 4, readout_type="ignore",
                       n_output_channels=256, use_batchnorm=True)
        x = [(torch.empty(1, 4096, 32, 32), torch.empty(1, 4096)) for _ in range(4)]
    assert round(sum(p.numel() for p in head.parameters()) / 1e6, 1) == 230.7
    assert head(x).shape == (1, 256, 512, 512)


# --------------------------------------------------------------------------------------- shapes for ViT-S/B/L


@pytest.mark.parametrize("build", [dinov3_vits16, dinov3_vitb16, dinov3_vitl16])
def test_depth_head_shapes_on_vit_configs_meta(build):
    B, S = 2, 512
    D, pairs = meta_pairs(build, B, S)
    with torch.device("meta"):
        dpt = DPTHead([D] * 4, channels=256, post_process_channels=[D] * 4, readout_type="project",
                      n_output_channels=256)
    bins = dpt(list(pairs))
    assert bins.shape == (B, 256, S, S)
    assert FeaturesToDepth(0.001, 10.0)(bins).shape == (B, 1, S, S)


def test_dpt_readout_modes_and_validation():
    ic = [16] * 4
    maps = [torch.randn(2, 16, 4, 4) for _ in range(4)]
    cls = [torch.randn(2, 16) for _ in range(4)]
    ign = DPTHead(ic, channels=16, post_process_channels=[8] * 4, readout_type="ignore", n_output_channels=3).eval()
    # readout "ignore": the cls token is unused, plain maps are accepted too
    torch.testing.assert_close(ign(list(zip(maps, cls))), ign(maps))
    assert ign(maps).shape == (2, 3, 64, 64)
    add = DPTHead(ic, channels=16, post_process_channels=[8] * 4, readout_type="add", n_output_channels=3).eval()
    add.load_state_dict(ign.state_dict())
    # "add" = "ignore" on (patch + cls)
    torch.testing.assert_close(add(list(zip(maps, cls))), ign([m + c[:, :, None, None] for m, c in zip(maps, cls)]))
    with pytest.raises(ValueError, match="pairs"):
        add(maps)
    with pytest.raises(ValueError, match="Expected 4 inputs"):
        ign(maps[:3])
    with pytest.raises(ValueError, match="reshape=True"):
        ign([m.flatten(2).transpose(1, 2) for m in maps])
    with pytest.raises(ValueError, match="expand_channels"):
        DPTHead(ic, expand_channels=True)
    # odd token grids run too, but come out bigger: the stride-2 conv rounds 5×3 up to 3×2, and the fusion then
    # grows *that* ×2 per block (skips are resized to it), so the output is 32·ceil(h/2) = 96×64, not 80×48.
    # Same in the official; predict(..., rescale_to) resizes to the image.
    odd = [torch.randn(1, 16, 5, 3) for _ in range(4)]
    assert ign(odd).shape == (1, 3, 96, 64)
    assert ign.predict(odd, rescale_to=(80, 48)).shape == (1, 3, 80, 48)


# ------------------------------------------------------------------------------------------------- depth bins


def test_depth_bins_linear_and_log():
    torch.testing.assert_close(depth_bins(3, 1.0, 3.0, "linear"), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(depth_bins(3, 1.0, 100.0, "log"), torch.tensor([1.0, 10.0, 100.0]))
    with pytest.raises(ValueError):
        depth_bins(3, 1.0, 3.0, "chmv2_mixlog")


def test_bins_to_depth_by_hand():
    # logits for 3 bins at one pixel, bins [1, 2, 3]
    x = torch.tensor([1.9, -5.0, 0.0]).view(1, 3, 1, 1)
    f = FeaturesToDepth(1.0, 3.0, "linear", "linear")
    # linear: relu(x) + 0.1 = [2.0, 0.1, 0.1] -> weights [2/2.2, .1/2.2, .1/2.2] -> depth (2 + .2 + .3) / 2.2
    torch.testing.assert_close(f(x), torch.tensor(2.5 / 2.2).view(1, 1, 1, 1))
    w = torch.softmax(torch.tensor([1.9, -5.0, 0.0]), 0)
    torch.testing.assert_close(FeaturesToDepth(1.0, 3.0, "linear", "softmax")(x).flatten(),
                               (w * torch.tensor([1.0, 2.0, 3.0])).sum().view(1))
    s = torch.sigmoid(torch.tensor([1.9, -5.0, 0.0]))
    torch.testing.assert_close(FeaturesToDepth(1.0, 3.0, "linear", "sigmoid")(x).flatten(),
                               (s / s.sum() * torch.tensor([1.0, 2.0, 3.0])).sum().view(1))
    # equal logits -> the mean bin; log bins [1, 10, 100]
    torch.testing.assert_close(FeaturesToDepth(1.0, 100.0, "log")(torch.zeros(1, 3, 1, 1)).flatten(),
                               torch.tensor([37.0]))
    # one channel = regression: relu(x) + min_depth
    torch.testing.assert_close(FeaturesToDepth(0.5, 3.0)(torch.tensor([-1.0, 2.0]).view(1, 1, 2, 1)).flatten(),
                               torch.tensor([0.5, 2.5]))
    assert torch.allclose(bin_weights(torch.randn(2, 7, 3, 3)).sum(1), torch.ones(2, 3, 3))
    with pytest.raises(ValueError):
        FeaturesToDepth(norm_strategy="relu")


# ---------------------------------------------------------------------------------------------------- SigLoss


def test_sigloss_zero_for_perfect_prediction():
    gt = torch.rand(2, 1, 8, 8) * 5 + 0.5
    assert SigLoss(warm_up=False)(gt.clone(), gt).item() == 0.0
    assert SigLoss(warm_up=True)(gt.clone(), gt).item() == 0.0


def test_sigloss_global_scale_is_discounted_not_ignored():
    """D = var(g) + 0.15·mean(g)² with g = log pred − log gt: a global scale s adds log s to every g, so the
    variance term is unchanged and only the mean term moves. For pred = s·gt: loss = sqrt(0.15)·|log s|."""
    torch.manual_seed(0)
    gt = torch.rand(2, 8, 8, dtype=torch.float64) * 5 + 0.5
    loss = SigLoss(warm_up=False, eps=0.0)
    for s in (0.5, 2.0, 3.0):
        torch.testing.assert_close(loss(s * gt, gt).item(), math.sqrt(0.15) * abs(math.log(s)))
    # with the official eps = 1e-3 it is approximately so
    assert abs(SigLoss(warm_up=False)(2 * gt, gt).item() - math.sqrt(0.15) * math.log(2)) < 1e-3
    # the variance part is scale invariant: D(s·pred) − 0.15·mean(g + log s)² = D(pred) − 0.15·mean(g)²
    pred = gt * torch.exp(0.3 * torch.randn_like(gt))
    g = pred.log() - gt.log()
    for s in (0.25, 4.0):
        d1, d2 = loss(pred, gt) ** 2, loss(s * pred, gt) ** 2
        torch.testing.assert_close(d2 - 0.15 * (g.mean() + math.log(s)) ** 2, d1 - 0.15 * g.mean() ** 2)
        torch.testing.assert_close(d1 - 0.15 * g.mean() ** 2, g.var())


def test_sigloss_positive_otherwise_warmup_and_mask():
    torch.manual_seed(0)
    gt = torch.rand(1, 6, 6) * 5 + 0.5
    pred = gt * torch.exp(0.2 * torch.randn_like(gt))
    pred = pred * torch.exp(-(pred.log() - gt.log()).mean())  # mean(g) = 0 exactly, var(g) > 0
    assert SigLoss(warm_up=False, eps=0.0)(pred, gt).item() > 0
    warm = SigLoss(warm_up=True, warm_iter=2, eps=0.0)
    # the first warm_iter calls use the mean term only, which is 0 here; then the variance term counts
    assert [round(warm(pred, gt).item(), 6) for _ in range(2)] == [0.0, 0.0]
    assert warm(pred, gt).item() > 0 and warm.warm_up_counter == 2
    # the valid mask selects pixels; [B, 1, H, W] prediction vs [B, H, W] target
    mask = torch.zeros_like(gt, dtype=torch.bool)
    mask[:, :3] = True
    bad = torch.where(mask, gt, gt * 10)
    assert SigLoss(warm_up=False)(bad[:, None], gt, mask).item() == 0.0
    assert SigLoss(warm_up=False)(bad, gt).item() > 0
    far = torch.where(mask, gt, torch.full_like(gt, 100.0))
    assert SigLoss(warm_up=False, max_depth=50.0)(torch.where(mask, gt, gt * 10), far).item() == 0.0
    assert SigLoss(warm_up=False, loss_weight=2.0)(bad, gt).item() == pytest.approx(
        2 * SigLoss(warm_up=False)(bad, gt).item())


# -------------------------------------------------------------------------------------------- the head trains


def _falls(hist, factor=0.7):
    return sum(hist[-3:]) / 3 < factor * sum(hist[:3]) / 3


def test_dpt_head_with_bins_and_sigloss_trains():
    torch.manual_seed(0)
    pairs = [(torch.randn(2, 16, 2, 2), torch.randn(2, 16)) for _ in range(4)]
    ramp = torch.linspace(0, 1, 32)
    gt = torch.stack([1 + 4 * ramp.expand(32, 32), 1 + 4 * ramp[:, None].expand(32, 32)])  # left→right, top→bottom
    head = DPTHead([16] * 4, channels=16, post_process_channels=[8] * 4, readout_type="project",
                   n_output_channels=16)
    to_depth = FeaturesToDepth(0.5, 6.0, "linear", "softmax")
    loss = SigLoss(warm_up=False)
    hist = fit(head, None, lambda m, b: loss(to_depth(m(b[0])), b[1]), [(pairs, gt)], steps=25, lr=3e-3,
               progress=False)
    assert _falls(hist, 0.8), hist
