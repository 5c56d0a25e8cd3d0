"""DINOHead: the projection head of the DINO and iBOT objectives, (..., in_dim) -> (..., out_dim).

MLP -> L2-normalise -> ``last_layer`` (prototype scores). Official: ``dinov3/layers/dino_head.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead"]


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> ``last_layer`` (prototype scores, no bias).

    ``nlayers=3``: ``mlp.0`` Linear(in, hidden), ``mlp.1`` GELU, ``mlp.2`` Linear(hidden, hidden),
    ``mlp.3`` GELU, ``mlp.4`` Linear(hidden, bottleneck); ``nlayers=1``: ``mlp`` is a single
    Linear(in, bottleneck). ``last_layer`` = Linear(bottleneck, out_dim, bias=False). Unlike DINO v1/v2
    there is no weight norm on ``last_layer`` in DINOv3. All Linear weights ~ trunc_normal(std 0.02),
    biases 0. Parameter names match ``dinov3/layers/dino_head.py``.

    ``forward(x, no_last_layer=False, only_last_layer=False)``: (..., in_dim) -> (..., out_dim);
    ``no_last_layer`` returns the normalised bottleneck (..., bottleneck_dim); ``only_last_layer``
    applies ``last_layer`` alone (the input is then the bottleneck).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(_init_linear)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        if no_last_layer and only_last_layer:
            raise ValueError("no_last_layer and only_last_layer are mutually exclusive")
        if not only_last_layer:
            if x.shape[-1] != self.in_dim:
                raise ValueError(f"DINOHead expects (..., {self.in_dim}), got shape {tuple(x.shape)}")
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = F.normalize(x, dim=-1, p=2, eps=eps)
            if no_last_layer:
                return x
        return self.last_layer(x)
