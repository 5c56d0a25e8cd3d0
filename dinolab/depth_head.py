"""Depth heads on top of the (frozen) backbone: the official DINOv3 depth evaluation (``dinov3/eval/depth``).

* ``DPTHead`` and its blocks (``dinov3/eval/depth/models/dpt_head.py``): reassemble the token maps of four
  layers into a pyramid, fuse it from coarse to fine, predict depth-bin logits;
* bins → metric depth: ``FeaturesToDepth`` (alias ``DepthBinsHead``), ``depth_bins``, ``bin_weights``
  (``dinov3/eval/depth/models/__init__.py``);
* the loss: ``SigLoss`` (scale-invariant log loss, ``dinov3/eval/depth/loss.py``);
* the linear depth head: the official builder's ``head_type="linear"`` is a linear head with the layout of
  the segmentation one, :class:`dinolab.seg_heads.LinearHead`, imported here so that it sits next to the DPT
  head; give it ``n_output_channels`` = the number of bins.

Official parameter names throughout, so official checkpoints load with ``strict=True``. The official uses
``SyncBatchNorm``; we use ``BatchNorm2d`` (same state dict, runs on a CPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .seg_heads import LinearHead

__all__ = [
    "DPTHead", "ReassembleBlocks", "FeatureFusionBlock", "PreActResidualConvUnit", "UpConvHead", "ConvModule",
    "Interpolate", "depth_bins", "bin_weights", "FeaturesToDepth", "DepthBinsHead", "SigLoss", "LinearHead",
]


# =================================================================================================================
# Depth: the official DPT head (dinov3/eval/depth/models/dpt_head.py)
# =================================================================================================================


class ConvModule(nn.Module):
    """mmcv's ConvModule as the official DPT file defines it: ``conv`` (+ ``bn``) (+ ``activate`` = ReLU), applied
    in ``order``. ``bias="auto"`` means bias unless there is a norm. Conv init: kaiming normal (fan_out, relu)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias="auto", norm: bool = False, act: bool = True,
                 order: tuple[str, str, str] = ("conv", "norm", "act")):
        super().__init__()
        if set(order) != {"conv", "norm", "act"} or len(order) != 3:
            raise ValueError(f"order must be a permutation of ('conv', 'norm', 'act'), got {order}")
        self.order = tuple(order)
        self.with_norm = norm
        self.with_activation = act
        if bias == "auto":
            bias = not norm
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bias)
        if norm:
            norm_channels = out_channels if order.index("norm") > order.index("conv") else in_channels
            self.bn = nn.BatchNorm2d(norm_channels)  # official: SyncBatchNorm (same state dict)
        if act:
            self.activate = nn.ReLU()
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.constant_(self.conv.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.order:
            if layer == "conv":
                x = self.conv(x)
            elif layer == "norm" and self.with_norm:
                x = self.bn(x)
            elif layer == "act" and self.with_activation:
                x = self.activate(x)
        return x


class Interpolate(nn.Module):
    def __init__(self, scale_factor: float, mode: str, align_corners: bool = False):
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


class UpConvHead(nn.Module):
    """``head``: Conv3×3 C→C/2, bilinear ×2 (align_corners=True), Conv3×3 C/2→hidden, ReLU,
    Conv1×1 → n_output_channels."""

    def __init__(self, features: int, n_output_channels: int, n_hidden_channels: int = 32):
        super().__init__()
        self.n_output_channels = n_output_channels
        self.head = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, stride=1, padding=1),
            Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, n_hidden_channels, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hidden_channels, n_output_channels, kernel_size=1, stride=1, padding=0),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


class ReassembleBlocks(nn.Module):
    """DPT "reassemble": token maps at 1/16 → a 4-level pyramid at 1/4, 1/8, 1/16, 1/32.

    Per level i: readout (cls handling) → ``batchnorm_layers[i]`` → ``projects[i]`` (1×1 conv D_i → pp_i) →
    ``resize_layers[i]``: ConvTranspose k4 s4 (×4), ConvTranspose k2 s2 (×2), Identity, Conv3×3 s2 (÷2).
    Readout: "ignore" (cls unused), "add" (patch + cls), "project" (``readout_projects[i]`` = Linear(2D → D) + GELU
    on [patch ‖ cls]).
    """

    def __init__(self, in_channels=(1024, 1024, 1024, 1024), out_channels=(128, 256, 512, 1024),
                 readout_type: str = "project", use_batchnorm: bool = False):
        super().__init__()
        if readout_type not in ("ignore", "add", "project"):
            raise ValueError(f"readout_type must be 'ignore', 'add' or 'project', got {readout_type!r}")
        if len(in_channels) != 4 or len(out_channels) != 4:
            raise ValueError(f"DPT reassembles exactly 4 levels, got in_channels={list(in_channels)}, "
                             f"post_process_channels={list(out_channels)}")
        self.readout_type = readout_type
        self.projects = nn.ModuleList(
            ConvModule(in_channels[i], out_channels[i], kernel_size=1, act=False) for i in range(4)
        )
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4, padding=0),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2, padding=0),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
        ])
        if readout_type == "project":
            self.readout_projects = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * c, c), nn.GELU()) for c in in_channels
            )
        self.batchnorm_layers = nn.ModuleList(
            nn.BatchNorm2d(c) if use_batchnorm else nn.Identity() for c in in_channels
        )

    def forward(self, inputs: list) -> list[Tensor]:
        out = []
        for i, x in enumerate(inputs):
            if isinstance(x, (list, tuple)):
                if len(x) != 2:
                    raise ValueError(f"input {i} must be a (patch map, cls token) pair, got {len(x)} items")
                x, cls_token = x
            elif self.readout_type == "ignore":
                cls_token = None
            else:
                raise ValueError(f"readout_type={self.readout_type!r} needs (patch map, cls token) pairs")
            shape = x.shape
            if self.readout_type == "project":
                x = x.flatten(2).permute(0, 2, 1)  # [B, hw, D]
                readout = cls_token.unsqueeze(1).expand_as(x)
                x = self.readout_projects[i](torch.cat((x, readout), -1))
                x = x.permute(0, 2, 1).reshape(shape)
            elif self.readout_type == "add":
                x = (x.flatten(2) + cls_token.unsqueeze(-1)).reshape(shape)
            x = self.batchnorm_layers[i](x)
            x = self.projects[i](x)
            x = self.resize_layers[i](x)
            out.append(x)
        return out


class PreActResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))) with 3×3 convs without bias (no norm in the official DPT)."""

    def __init__(self, in_channels: int, stride: int = 1, dilation: int = 1, norm: bool = False):
        super().__init__()
        self.conv1 = ConvModule(in_channels, in_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                                bias=False, norm=norm, order=("act", "conv", "norm"))
        self.conv2 = ConvModule(in_channels, in_channels, 3, padding=1, bias=False, norm=norm,
                                order=("act", "conv", "norm"))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.conv2(self.conv1(inputs)) + inputs


class FeatureFusionBlock(nn.Module):
    """``x = x + res_conv_unit1(skip)`` (skip resized to x if needed), ``res_conv_unit2``, bilinear ×2
    (align_corners=True), ``project`` (1×1 conv with bias)."""

    def __init__(self, in_channels: int, expand: bool = False, align_corners: bool = True, norm: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.expand = expand
        self.align_corners = align_corners
        self.out_channels = in_channels // 2 if expand else in_channels
        self.project = ConvModule(self.in_channels, self.out_channels, kernel_size=1, act=False, bias=True)
        self.res_conv_unit1 = PreActResidualConvUnit(in_channels, norm=norm)
        self.res_conv_unit2 = PreActResidualConvUnit(in_channels, norm=norm)

    def forward(self, *inputs: Tensor) -> Tensor:
        x = inputs[0]
        if len(inputs) == 2:
            res = inputs[1]
            if x.shape != res.shape:
                res = F.interpolate(res, size=x.shape[2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(res)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        return self.project(x)


class DPTHead(nn.Module):
    """Official DINOv3 DPT depth head ("Vision Transformers for Dense Prediction", Ranftl et al. 2021).

    Input: 4 × (patch map [B, D_i, h, w], cls [B, D_i]) as from
    ``get_intermediate_layers(x, n=4 layers, reshape=True, return_class_token=True)`` (with readout "ignore"
    plain maps are accepted too). Output: [B, n_output_channels, 16h, 16w] (the input image size for patch 16):

    reassemble → pyramid 4h, 2h, h, h/2 with pp_i channels → ``convs[i]`` 3×3 → ``channels`` → fusion from the
    coarsest (``fusion_blocks[0]`` has no skip) up, each ×2 → [B, channels, 8h, 8w] → ``project`` 3×3 + ReLU →
    ``conv_depth`` (UpConvHead, ×2) → bins logits. Turn them into depth with :class:`FeaturesToDepth`.
    With an odd token grid the output is 32·ceil(h/2) (the ÷2 level rounds up and the fusion grows from it),
    larger than the image: use ``predict(inputs, rescale_to)``.

    Args (official names and defaults): in_channels (4 backbone widths), channels (256), post_process_channels
    ([128, 256, 512, 1024]), readout_type ("project"; the depth builder uses "ignore" unless use_cls_token),
    expand_channels (False), n_output_channels (256 bins), use_batchnorm (False: BN on the backbone maps before
    the projections). ``n_hidden_channels`` (32) is UpConvHead's hidden width (the CHMv2 head uses 128).
    The DINOv3 ViT-7B depth head (``dinov3_vit7b16_dd``): channels 512, post_process_channels [2048]*4,
    use_batchnorm True, readout "ignore", 256 bins.
    """

    def __init__(self, in_channels=(1024, 1024, 1024, 1024), channels: int = 256,
                 post_process_channels=(128, 256, 512, 1024), readout_type: str = "project",
                 expand_channels: bool = False, n_output_channels: int = 256, use_batchnorm: bool = False,
                 n_hidden_channels: int = 32):
        super().__init__()
        if expand_channels:
            # The official multiplies the channels of ``convs`` by 2**i but not the reassemble outputs, so a
            # forward with expand_channels=True fails there too; refuse early instead.
            raise ValueError("expand_channels=True does not work in the official DPTHead either "
                             "(convs expect pp_i·2**i channels, reassemble gives pp_i)")
        self.in_channels = list(in_channels)
        self.channels = channels
        self.n_output_channels = n_output_channels
        self.expand_channels = expand_channels
        self.reassemble_blocks = ReassembleBlocks(in_channels, post_process_channels, readout_type, use_batchnorm)
        self.post_process_channels = list(post_process_channels)
        self.convs = nn.ModuleList(
            ConvModule(c, channels, kernel_size=3, padding=1, act=False, bias=False) for c in self.post_process_channels
        )
        self.fusion_blocks = nn.ModuleList(FeatureFusionBlock(channels) for _ in self.convs)
        self.fusion_blocks[0].res_conv_unit1 = None  # the coarsest block has no skip input
        self.project = ConvModule(channels, channels, kernel_size=3, padding=1)  # conv (bias) + ReLU
        self.num_fusion_blocks = len(self.fusion_blocks)
        self.num_reassemble_blocks = len(self.reassemble_blocks.resize_layers)
        self.num_post_process_channels = len(self.post_process_channels)
        self.conv_depth = UpConvHead(channels, n_output_channels, n_hidden_channels)

    def forward_features(self, inputs) -> Tensor:
        inputs = list(inputs)
        if len(inputs) != self.num_reassemble_blocks:
            raise ValueError(f"Expected {self.num_reassemble_blocks} inputs, got {len(inputs)}.")
        for i, x in enumerate(inputs):
            m = x[0] if isinstance(x, (list, tuple)) else x
            if m.dim() != 4 or m.shape[1] != self.in_channels[i]:
                raise ValueError(f"input {i}: patch map must be [B, {self.in_channels[i]}, h, w], got {tuple(m.shape)}"
                                 " (use get_intermediate_layers(..., reshape=True))")
        x = self.reassemble_blocks(inputs)
        x = [conv(f) for conv, f in zip(self.convs, x)]
        out = self.fusion_blocks[0](x[-1])
        for i in range(1, len(self.fusion_blocks)):
            out = self.fusion_blocks[i](out, x[-(i + 1)])
        return self.project(out)

    def forward(self, inputs) -> Tensor:
        return self.conv_depth(self.forward_features(inputs))

    def predict(self, inputs, rescale_to=(512, 512)) -> Tensor:
        """Logits bilinearly resized to ``rescale_to`` (the official ``predict`` calls a method UpConvHead
        lacks; this is what it evidently means)."""
        out = self.forward(inputs)
        return F.interpolate(out, size=tuple(rescale_to), mode="bilinear", align_corners=False)


# =================================================================================================================
# Depth: bins → depth, and the loss (dinov3/eval/depth/models/__init__.py, loss.py)
# =================================================================================================================


def depth_bins(n_bins: int, min_depth: float, max_depth: float, strategy: str = "linear", device=None,
               dtype=torch.float32) -> Tensor:
    """Bin centres: ``linspace(min, max, n)`` ("linear") or ``exp(linspace(log min, log max, n))`` ("log",
    uniform in log depth: finer bins near the camera)."""
    if strategy == "linear":
        return torch.linspace(min_depth, max_depth, n_bins, device=device, dtype=dtype)
    if strategy == "log":
        return torch.linspace(math.log(min_depth), math.log(max_depth), n_bins, device=device, dtype=dtype).exp()
    raise ValueError(f"bins_strategy must be 'linear' or 'log', got {strategy!r}")


def bin_weights(logits: Tensor, norm_strategy: str = "linear") -> Tensor:
    """Per-pixel bin weights summing to 1 over dim 1.

    "linear" (default, AdaBins): ``(relu(x) + 0.1) / Σ_k (relu(x_k) + 0.1)``; "softmax": ``softmax(x)``;
    "sigmoid": ``sigmoid(x) / Σ_k sigmoid(x_k)``.
    """
    if norm_strategy == "linear":
        w = torch.relu(logits) + 0.1
        return w / w.sum(dim=1, keepdim=True)
    if norm_strategy == "softmax":
        return torch.softmax(logits, dim=1)
    if norm_strategy == "sigmoid":
        w = torch.sigmoid(logits)
        return w / w.sum(dim=1, keepdim=True)
    raise ValueError(f"norm_strategy must be 'linear', 'softmax' or 'sigmoid', got {norm_strategy!r}")


class FeaturesToDepth(nn.Module):
    """Official head output → metric depth [B, 1, H, W].

    * C > 1 channels ("classification-regression", AdaBins): depth = Σ_k w_k · bin_k with ``bin_weights`` and
      ``depth_bins`` (so depth always lies in [min_depth, max_depth]).
    * C == 1 ("regression"): ``relu(x) + min_depth``.
    """

    def __init__(self, min_depth: float = 0.001, max_depth: float = 80, bins_strategy: str = "linear",
                 norm_strategy: str = "linear"):
        super().__init__()
        if bins_strategy not in ("linear", "log"):
            raise ValueError(f"bins_strategy must be 'linear' or 'log', got {bins_strategy!r}")
        if norm_strategy not in ("linear", "softmax", "sigmoid"):
            raise ValueError(f"norm_strategy must be 'linear', 'softmax' or 'sigmoid', got {norm_strategy!r}")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.bins_strategy = bins_strategy
        self.norm_strategy = norm_strategy

    def bins(self, n_bins: int, device=None, dtype=torch.float32) -> Tensor:
        return depth_bins(n_bins, self.min_depth, self.max_depth, self.bins_strategy, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        n_bins = x.shape[1]
        if n_bins > 1:
            w = bin_weights(x, self.norm_strategy)
            return torch.einsum("bkhw,k->bhw", w, self.bins(n_bins, x.device, x.dtype)).unsqueeze(1)
        return torch.relu(x) + self.min_depth


DepthBinsHead = FeaturesToDepth  # the name the notebooks' outline uses


class SigLoss(nn.Module):
    """Official DINOv3 depth loss (scale-invariant log loss, Eigen et al. 2014, via AdaBins/BinsFormer).

    On valid pixels, ``g = log(pred + eps) − log(gt + eps)`` (eps = 1e-3) and
    ``D = var(g) + 0.15 · mean(g)²`` (``torch.var``: unbiased); loss = ``sqrt(D)`` (``|D|`` if D ≤ 0, which avoids
    sqrt's infinite gradient at 0). This is Eigen's ``mean(g²) − λ mean(g)²`` with λ = 0.85, up to the n/(n−1)
    of the unbiased variance: a global scale error ``pred = s·gt`` is *discounted*, not ignored — it costs
    ``sqrt(0.15)·|log s|`` (for eps → 0) instead of ``|log s|``, and the variance part does not change at all.

    ``warm_up``: the first ``warm_iter`` calls (every call counts, as in the official) use only the mean term;
    the official default is True, 100. ``valid_mask`` (bool, same shape as gt) selects the pixels; None = all.
    Extras (not official, neutral by default): ``eps``; ``loss_weight`` multiplies the loss; ``max_depth`` also
    drops pixels with gt > max_depth. A [B, 1, H, W] prediction is accepted against a [B, H, W] target.
    """

    def __init__(self, warm_up: bool = True, warm_iter: int = 100, eps: float = 1e-3, loss_weight: float = 1.0,
                 max_depth: float | None = None):
        super().__init__()
        self.loss_name = "SigLoss"
        self.eps = eps
        self.warm_up = warm_up
        self.warm_iter = warm_iter
        self.warm_up_counter = 0
        self.loss_weight = loss_weight
        self.max_depth = max_depth

    def sigloss(self, input: Tensor, target: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        if input.shape != target.shape:
            if input.dim() == target.dim() + 1 and input.shape[1] == 1:
                input = input.squeeze(1)
            elif target.dim() == input.dim() + 1 and target.shape[1] == 1:
                target = target.squeeze(1)
        if input.shape != target.shape:
            raise ValueError(f"prediction {tuple(input.shape)} and target {tuple(target.shape)} differ")
        if valid_mask is None:
            valid_mask = torch.ones_like(target, dtype=torch.bool)
        else:
            valid_mask = valid_mask.reshape(target.shape).bool()
        if self.max_depth is not None:
            valid_mask = valid_mask & (target <= self.max_depth)
        input = input[valid_mask]
        target = target[valid_mask]
        g = torch.log(input + self.eps) - torch.log(target + self.eps)
        Dg = 0.15 * torch.pow(torch.mean(g), 2)
        if self.warm_up and self.warm_up_counter < self.warm_iter:
            self.warm_up_counter += 1
        else:
            Dg = Dg + torch.var(g)
        if Dg <= 0:
            return torch.abs(Dg)
        return torch.sqrt(Dg)

    def forward(self, depth_pred: Tensor, depth_gt: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        return self.loss_weight * self.sigloss(depth_pred, depth_gt, valid_mask)
