"""The Spatial Prior Module (SPM): the DINOv3 adapter's conv stem (``dinov3_adapter.py``; ViT-Adapter's
``adapter_modules.py``).

A small ResNet-like stem that sees the image at full resolution and gives c1..c4 at strides 4/8/16/32: the
local detail that a ViT's 16×16 patches never had. :class:`dinolab.adapter.DINOv3Adapter` builds one as
``self.spm``; notebook 06 builds it step by step. Module and parameter names are the official ones
(``spm.stem.0.weight``, ...); ``SyncBatchNorm`` is ``nn.BatchNorm2d`` here (same keys).
"""
from __future__ import annotations

import torch.utils.checkpoint as cp
from torch import Tensor, nn

__all__ = ["SpatialPriorModule"]


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class SpatialPriorModule(nn.Module):
    """A ResNet-like conv stem giving the adapter's local detail at strides 4/8/16/32.

    ``stem``: conv3×3 s2 (in_chans→64) → conv3×3 → conv3×3 → maxpool3×3 s2 (each conv + BN + ReLU, no bias),
    ``conv2``/``conv3``/``conv4``: conv3×3 s2 to 128 / 256 / 256 channels (``inplanes`` = 64 → ×2, ×4, ×4),
    ``fc1``..``fc4``: 1×1 convs (with bias) to ``embed_dim``.

    ``forward(x [B, in_chans, H, W]) -> (c1, c2, c3, c4)``: c1 stays a map [B, D, H/4, W/4]; c2, c3, c4 are
    flattened to tokens [B, HW/64, D], [B, HW/256, D], [B, HW/1024, D]. For B=4, 512×512, D=1024:
    c1 [4,1024,128,128], c2 [4,4096,1024], c3 [4,1024,1024], c4 [4,256,1024].

    ``in_chans`` (not an official argument; default 3 as there) allows e.g. RGB-D input; it changes only the
    shape of ``stem.0.weight``. ``with_cp`` checkpoints the whole stem when the input requires grad (as the
    official; the adapter builds it with ``with_cp=False``).
    """

    def __init__(self, inplanes: int = 64, embed_dim: int = 384, with_cp: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.stem = nn.Sequential(
            *_conv_bn_relu(in_chans, inplanes, 2),
            *_conv_bn_relu(inplanes, inplanes, 1),
            *_conv_bn_relu(inplanes, inplanes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_bn_relu(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*_conv_bn_relu(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*_conv_bn_relu(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, kernel_size=1, stride=1, padding=0, bias=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        in_chans = self.stem[0].in_channels
        if x.dim() != 4 or x.shape[1] != in_chans:
            raise ValueError(f"SpatialPriorModule expects images [B, {in_chans}, H, W], got {tuple(x.shape)}")

        def _inner_forward(x: Tensor):
            c1 = self.stem(x)
            c2 = self.conv2(c1)
            c3 = self.conv3(c2)
            c4 = self.conv4(c3)
            c1, c2, c3, c4 = self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)
            bs, dim = c1.shape[:2]
            c2 = c2.view(bs, dim, -1).transpose(1, 2)  # stride 8
            c3 = c3.view(bs, dim, -1).transpose(1, 2)  # stride 16
            c4 = c4.view(bs, dim, -1).transpose(1, 2)  # stride 32
            return c1, c2, c3, c4

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)

