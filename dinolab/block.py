"""The transformer block and its parts, as in ``dinov3/layers/{block,ffn_layers,layer_scale,rms_norm}.py``.

Pre-norm residual block::

    x = x + ls1(attn(norm1(x), rope))
    x = x + ls2(mlp(norm2(x)))

LayerScale multiplies each residual branch by a learned per-channel ``gamma`` initialised tiny
(1e-5 in every released model), so a freshly initialised deep network starts close to identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SelfAttention


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> GELU -> fc2 (hidden -> D)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True, device=None) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden_dim(hidden_features: int, align_to: int = 8) -> int:
    """SwiGLU has 3 matrices instead of 2, so it keeps 2/3 of the width (same parameter count),
    rounded *up* to a multiple of ``align_to`` (friendlier matmul shapes)."""
    d = int(hidden_features * 2 / 3)
    return d + (-d % align_to)


class SwiGLUFFN(nn.Module):
    """out = w3(silu(w1 x) * w2 x). ``act_layer`` is accepted and ignored, as in the official code."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=None, drop: float = 0.0, bias: bool = True, align_to: int = 8, device=None) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden = swiglu_hidden_dim(hidden_features or in_features, align_to)
        self.w1 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden, bias=bias, device=device)
        self.w3 = nn.Linear(hidden, out_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False, device=None) -> None:
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean subtraction and the bias.
    Computed in fp32 whatever the input dtype (as the official layer)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class SelfAttentionBlock(nn.Module):
    """Pre-norm block. Stochastic depth follows the official "batch-subset" form: in training,
    each residual branch is computed for a random subset of ``max(int(B * (1 - p)), 1)`` samples
    only, and added back scaled by B / subset (saves compute, unlike a per-sample mask)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer=nn.LayerNorm,
        attn_class: type[nn.Module] = SelfAttention,
        ffn_layer=Mlp,
        mask_k_bias: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                               attn_drop=attn_drop, proj_drop=drop, mask_k_bias=mask_k_bias, device=device)
        self.ls1 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * ffn_ratio), act_layer=act_layer,
                             drop=drop, bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if self.training and self.sample_drop_ratio > 0.0:
            b = x.shape[0]
            keep = max(int(b * (1 - self.sample_drop_ratio)), 1)
            scale = b / keep
            idx1 = torch.randperm(b, device=x.device)[:keep]
            r1 = self.ls1(self.attn(self.norm1(x[idx1]), rope=rope))
            x = torch.index_add(x, 0, idx1, r1.to(x.dtype), alpha=scale)
            idx2 = torch.randperm(b, device=x.device)[:keep]
            r2 = self.ls2(self.mlp(self.norm2(x[idx2])))
            return torch.index_add(x, 0, idx2, r2.to(x.dtype), alpha=scale)
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))
