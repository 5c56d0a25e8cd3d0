"""Tests of dinolab.dino_head: DINOHead names, shapes, init and normalisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dinolab.dino_head import DINOHead


def test_dino_head_names_shapes_and_init():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    names = [n for n, _ in head.named_parameters()]
    assert names == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                     "mlp.4.weight", "mlp.4.bias", "last_layer.weight"]
    assert isinstance(head.mlp[1], nn.GELU) and isinstance(head.mlp[3], nn.GELU)
    assert head.last_layer.bias is None
    assert head.last_layer.weight.shape == (100, 16)
    for n, p in head.named_parameters():
        if n.endswith("bias"):
            assert torch.all(p == 0)
        else:  # trunc_normal(std=0.02) truncated at ±2 (absolute): all small, std close to 0.02
            assert p.abs().max() <= 2.0 and abs(p.std().item() - 0.02) < 0.004
    x = torch.randn(5, 7, 32)
    assert head(x).shape == (5, 7, 100)
    assert head(x, no_last_layer=True).shape == (5, 7, 16)
    assert DINOHead(8, 10, nlayers=1, bottleneck_dim=4).mlp.weight.shape == (4, 8)


def test_dino_head_normalises_bottleneck_before_last_layer():
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=20, hidden_dim=24, bottleneck_dim=6)
    x = torch.randn(9, 12)
    z = head(x, no_last_layer=True)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(9))
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.t())
    torch.testing.assert_close(head(x), head(z, only_last_layer=True))
    # scaling the raw bottleneck (last MLP layer) does not change the output
    with torch.no_grad():
        head.mlp[4].weight.mul_(5.0)
        head.mlp[4].bias.mul_(5.0)
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.t())


def test_dino_head_bad_inputs():
    with pytest.raises(ValueError):
        DINOHead(0)
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    with pytest.raises(ValueError, match="expects"):
        head(torch.randn(2, 9))
    with pytest.raises(ValueError):
        head(torch.randn(2, 8), no_last_layer=True, only_last_layer=True)
