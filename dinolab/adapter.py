"""The DINOv3 segmentation adapter (``dinov3/eval/segmentation/models/backbone/dinov3_adapter.py``).

Turns a frozen ViT (read at four blocks) and a small conv stem (the Spatial Prior Module) into a feature pyramid
at strides 4/8/16/32 for dense heads; the stem's tokens read the ViT's with deformable attention (the extractor).
DINOv3 has no injector (the backbone is frozen and run once); ``use_injector=True`` builds ViT-Adapter's original
variant for comparison. Notebooks 06 and 08 explain why.

The official file holds everything; here it is three files, one per part: the SPM is
:mod:`dinolab.spatial_prior`, the interaction blocks (extractor, injector) and their deformable-attention inputs
are :mod:`dinolab.adapter_interaction`, and this file assembles them with the backbone into :class:`DINOv3Adapter`
(all their names can still be imported from here).

Shapes for the seed's setting — B=4, 512×512, ViT-L (D=1024, blocks [4, 11, 17, 23]); token grid 32×32::

    SPM     c1 [4,1024,128,128] (map), c2 [4,4096,1024], c3 [4,1024,1024], c4 [4,256,1024] (tokens)
    ViT     4 × (patch tokens [4,1024,1024], cls [4,1024])
    c       cat(c2, c3, c4) = [4,5376,1024]    (the extractor's queries)
    out     f1 [4,1024,128,128], f2 [4,1024,64,64], f3 [4,1024,32,32], f4 [4,1024,16,16]

Module and parameter names are the official ones (``spm.stem.0.weight``, ``interactions.3.extra_extractors.1
.attn.value_proj.weight``, ``norm1.running_mean``, ...), so the official adapter state dict — the backbone's
keys prefixed ``backbone.`` — loads with ``strict=True``. ``SyncBatchNorm`` is replaced by ``nn.BatchNorm2d``
(same keys, same single-process behaviour).

Differences from the official file, all outside the state dict (documented where they happen):

* inputs whose sides are not multiples of 32 (and of the patch size), or with the wrong channel count, raise
  a ``ValueError`` (the official code then mis-splits or mis-reshapes tokens, or fails deep inside a view);
* the official ``MSDeformAttn`` broadcasts ``[1, Lq, 1, 2]`` reference points over the batch (and levels);
  :mod:`dinolab.msdeform` wants ``[B, Lq, L, 2]``, so the adapter expands them first (a view, no copy);
* the backbone outputs are cast to the SPM's dtype (a no-op on CPU / fp32; the official code relies on an
  outer bf16 autocast on CUDA);
* with the backbone frozen, ``adapter.train()`` leaves the backbone in eval mode (the hub ViTs have a
  training-only RoPE rescale augmentation, which a frozen feature extractor should not apply);
* on the meta device, ``deform_inputs`` keeps spatial shapes on the CPU (they must be read as numbers).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter_interaction import (  # noqa: F401 (re-exported: the notebooks and tests import them from here)
    ConvFFN,
    DropPath,
    DWConv,
    Extractor,
    Injector,
    InteractionBlockWithCls,
    _LayerNorm,
    deform_inputs,
    drop_path,
    get_reference_points,
)
from .msdeform import MSDeformAttn
from .spatial_prior import SpatialPriorModule

__all__ = [
    "drop_path", "DropPath", "get_reference_points", "deform_inputs", "DWConv", "ConvFFN", "Extractor", "Injector",
    "InteractionBlockWithCls", "SpatialPriorModule", "DINOv3Adapter", "DINOv3_Adapter",
]


class DINOv3Adapter(nn.Module):
    """DINOv3's dense-prediction adapter: frozen ViT + SPM + extractor-only interactions → 4-level pyramid.

    Args (official names and defaults):
        backbone: a :class:`dinolab.vit.DinoVisionTransformer` (or anything with ``embed_dim``, ``patch_size``
            and ``get_intermediate_layers``). Frozen here (``requires_grad_(False)``).
        interaction_indexes: the 0-based ViT blocks read by the 4 interaction blocks (official default
            ``[9, 19, 29, 39]``, for the 40-block 7B; ViT-L uses ``[4, 11, 17, 23]``). Strictly increasing.
        pretrain_size: kept as ``self.pretrain_size`` (only the official's unused ``_get_pos_embed`` reads it).
        conv_inplane: SPM width (64). ``conv_inplanes=`` is accepted as an alias.
        n_points, deform_num_heads, deform_ratio: the extractors' MSDeformAttn (4 points, 16 heads, value
            width D·0.5). ``int(D * deform_ratio)`` must be divisible by ``deform_num_heads``.
        drop_path_rate: DropPath of every extractor's ConvFFN branch (the same 0.3 everywhere).
        init_values: unused by the official block; the injectors' gamma init here (``use_injector=True``).
        with_cffn, cffn_ratio: the extractors' ConvFFN (hidden ``int(D * 0.25)``).
        add_vit_feature: add the 4 ViT maps, bilinearly resized to strides 4/8/16/32, to c1..c4.
        use_extra_extractor: two more extractors in the last interaction block.
        with_cp: gradient checkpointing of the extractors (when training).

    Extra (not official, no effect on the default state dict):
        use_injector: build the original ViT-Adapter's injectors (keys ``interactions.{i}.injector.*``). The
            backbone is then *not* run once under ``no_grad``: each injector rewrites the ViT's patch tokens
            before the blocks of its interaction, so the adapter runs the ViT itself in chunks —
            blocks ``[0, i0]``, ``(i0, i1]``, ... — with autograd on (the gradient of the injectors flows
            back through the frozen blocks), and reads the final-normed tokens after each chunk exactly as
            ``get_intermediate_layers(norm=True)`` would. The cls and storage tokens are not injected (the
            original injects patch tokens only). With ``init_values=0`` (gamma = 0) it starts out equal to
            the extractor-only adapter. Costs the ViT's activations in memory, which DINOv3 avoids.
        freeze_backbone: ``True`` (official): ``requires_grad_(False)`` and the backbone stays in eval mode when
            the adapter trains. ``False`` leaves it trainable (meaningful with ``use_injector=True``; without
            injectors the official forward runs the backbone under ``no_grad`` anyway).
        device: build the adapter's own parameters on this device (e.g. ``"meta"`` for shape tables).

    ``forward(x [B, C, H, W]) -> {"1": f1, "2": f2, "3": f3, "4": f4}``, all with D channels, at strides
    4/8/16/32. H and W must be multiples of 32 (and of the patch size); C must match the SPM and the backbone.
    For B=4, 512×512, ViT-L: f1 [4,1024,128,128], f2 [4,1024,64,64], f3 [4,1024,32,32], f4 [4,1024,16,16].
    """

    def __init__(
        self,
        backbone: nn.Module,
        interaction_indexes: Sequence[int] = (9, 19, 29, 39),
        pretrain_size: int = 512,
        conv_inplane: int = 64,
        n_points: int = 4,
        deform_num_heads: int = 16,
        drop_path_rate: float = 0.3,
        init_values: float = 0.0,
        with_cffn: bool = True,
        cffn_ratio: float = 0.25,
        deform_ratio: float = 0.5,
        add_vit_feature: bool = True,
        use_extra_extractor: bool = True,
        with_cp: bool = True,
        *,
        use_injector: bool = False,
        freeze_backbone: bool = True,
        conv_inplanes: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if conv_inplanes is not None:
            if conv_inplane != 64 and conv_inplane != conv_inplanes:
                raise ValueError(f"conv_inplane={conv_inplane} and its alias conv_inplanes={conv_inplanes} disagree")
            conv_inplane = conv_inplanes
        indexes = [int(i) for i in interaction_indexes]
        depth = len(backbone.blocks) if hasattr(backbone, "blocks") else None
        if not indexes:
            raise ValueError("interaction_indexes is empty")
        if any(b <= a for a, b in zip(indexes, indexes[1:])):
            raise ValueError(f"interaction_indexes must be strictly increasing, got {indexes}")
        if indexes[0] < 0 or (depth is not None and indexes[-1] >= depth):
            raise ValueError(f"interaction_indexes {indexes} out of range for a {depth}-block backbone")
        if add_vit_feature and len(indexes) != 4:
            raise ValueError(f"add_vit_feature adds 4 ViT maps to c1..c4: need 4 interaction_indexes, got {indexes}")

        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)  # Important: the backbone is frozen (official)
        self.pretrain_size = (pretrain_size, pretrain_size)
        self.interaction_indexes = indexes
        self.add_vit_feature = add_vit_feature
        self.use_injector = use_injector
        embed_dim = backbone.embed_dim
        self.patch_size = backbone.patch_size
        in_chans = _backbone_in_chans(backbone)
        self.in_chans = in_chans if in_chans is not None else 3

        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
            self.spm = SpatialPriorModule(inplanes=conv_inplane, embed_dim=embed_dim, with_cp=False,
                                          in_chans=self.in_chans)
            n = len(indexes)
            self.interactions = nn.Sequential(*[
                InteractionBlockWithCls(
                    dim=embed_dim, num_heads=deform_num_heads, n_points=n_points, init_values=init_values,
                    drop_path=drop_path_rate, norm_layer=_LayerNorm, with_cffn=with_cffn, cffn_ratio=cffn_ratio,
                    deform_ratio=deform_ratio, extra_extractor=(i == n - 1) and use_extra_extractor,
                    with_cp=with_cp, with_injector=use_injector,
                )
                for i in range(n)
            ])
            self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
            self.norm1 = nn.BatchNorm2d(embed_dim)
            self.norm2 = nn.BatchNorm2d(embed_dim)
            self.norm3 = nn.BatchNorm2d(embed_dim)
            self.norm4 = nn.BatchNorm2d(embed_dim)

            self.up.apply(self._init_weights)
            self.spm.apply(self._init_weights)
            self.interactions.apply(self._init_weights)
            self.apply(self._init_deform_weights)
            nn.init.normal_(self.level_embed)
        if freeze_backbone:
            self.backbone.eval()

    # ------------------------------------------------------------------ init (official)
    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @staticmethod
    def _init_deform_weights(m: nn.Module) -> None:
        if isinstance(m, MSDeformAttn):
            m._reset_parameters()

    def train(self, mode: bool = True) -> "DINOv3Adapter":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen feature extractor: no training-time RoPE augmentation
        return self

    def _add_level_embed(self, c2: Tensor, c3: Tensor, c4: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]

    # ------------------------------------------------------------------ checks
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"DINOv3Adapter expects images [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"DINOv3Adapter expects {self.in_chans} input channels, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        H, W = x.shape[-2:]
        m = math.lcm(32, int(self.patch_size))
        if H % m or W % m:
            raise ValueError(
                f"DINOv3Adapter needs H and W divisible by {m} (SPM stride 32, patch size {self.patch_size}); "
                f"got {H}x{W}. Resize or pad to e.g. {math.ceil(H / m) * m}x{math.ceil(W / m) * m}."
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self._check_input(x)
        deform_inputs1, deform_inputs2 = deform_inputs(x, self.patch_size)

        # SPM: c1 [B,D,H/4,W/4]; c2, c3, c4 tokens at strides 8/16/32, tagged by level, concatenated.
        c1, c2, c3, c4 = self.spm(x)
        c2, c3, c4 = self._add_level_embed(c2, c3, c4)
        c = torch.cat([c2, c3, c4], dim=1)  # [B, 21·HW/1024, D]

        H_c, W_c = x.shape[2] // 16, x.shape[3] // 16
        H_toks, W_toks = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        bs = x.shape[0]

        if self.use_injector:
            outs, c = self._forward_with_injector(x, c, deform_inputs1, deform_inputs2, H_c, W_c, H_toks, W_toks)
        else:
            # The frozen ViT, once: 4 × (patch tokens [B, HW/p², D], cls [B, D]), final norm applied.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                with torch.no_grad():
                    all_layers = self.backbone.get_intermediate_layers(
                        x, n=self.interaction_indexes, return_class_token=True
                    )
            outs = []
            for i, layer in enumerate(self.interactions):
                x_i, cls_i = (t.to(c.dtype) for t in all_layers[i])
                _, c, _ = layer(x_i, c, cls_i, deform_inputs1, deform_inputs2, H_c, W_c, H_toks, W_toks)
                outs.append(x_i.transpose(1, 2).reshape(bs, -1, H_toks, W_toks))  # [B, D, H/p, W/p]

        # Split c back into the three levels and reshape to maps.
        n2, n3 = c2.shape[1], c3.shape[1]
        dim = c.shape[-1]
        c2 = c[:, :n2].transpose(1, 2).reshape(bs, dim, H_c * 2, W_c * 2)
        c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(bs, dim, H_c, W_c)
        c4 = c[:, n2 + n3:].transpose(1, 2).reshape(bs, dim, H_c // 2, W_c // 2)
        c1 = self.up(c2) + c1

        if self.add_vit_feature:
            x1, x2, x3, x4 = outs
            x1 = F.interpolate(x1, size=(4 * H_c, 4 * W_c), mode="bilinear", align_corners=False)
            x2 = F.interpolate(x2, size=(2 * H_c, 2 * W_c), mode="bilinear", align_corners=False)
            x3 = F.interpolate(x3, size=(H_c, W_c), mode="bilinear", align_corners=False)
            x4 = F.interpolate(x4, size=(H_c // 2, W_c // 2), mode="bilinear", align_corners=False)
            c1, c2, c3, c4 = c1 + x1, c2 + x2, c3 + x3, c4 + x4

        return {"1": self.norm1(c1), "2": self.norm2(c2), "3": self.norm3(c3), "4": self.norm4(c4)}

    def _forward_with_injector(self, x, c, deform_inputs1, deform_inputs2, H_c, W_c, H_toks, W_toks):
        """The original ViT-Adapter flow: before the ViT blocks of interaction i, the injector writes the SPM
        into the patch tokens; after them, the extractor reads the (final-normed) patch tokens."""
        bb = self.backbone
        tokens, (h, w) = bb.prepare_tokens_with_masks(x)
        p = 1 + int(getattr(bb, "n_storage_tokens", 0))
        bs = x.shape[0]
        outs, start = [], 0
        for layer, idx in zip(self.interactions, self.interaction_indexes):
            ref, shapes, starts = deform_inputs1
            patches = layer.injector(query=tokens[:, p:], reference_points=ref, feat=c, spatial_shapes=shapes,
                                     level_start_index=starts)
            tokens = torch.cat([tokens[:, :p], patches], dim=1)
            for blk in bb.blocks[start:idx + 1]:
                tokens = blk(tokens, _rope(bb, h, w))
            start = idx + 1
            normed = _final_norm(bb, tokens)
            x_i, cls_i = normed[:, p:], normed[:, 0]
            _, c, _ = layer(x_i, c, cls_i, deform_inputs1, deform_inputs2, H_c, W_c, H_toks, W_toks)
            outs.append(x_i.transpose(1, 2).reshape(bs, -1, H_toks, W_toks))
        return outs, c


DINOv3_Adapter = DINOv3Adapter  # the official class name


def _backbone_in_chans(backbone: nn.Module) -> int | None:
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    return getattr(proj, "in_channels", None)


def _rope(bb: nn.Module, h: int, w: int):
    if hasattr(bb, "rope_for"):  # dinolab's ViT
        return bb.rope_for(h, w)
    return bb.rope_embed(H=h, W=w) if getattr(bb, "rope_embed", None) is not None else None


def _final_norm(bb: nn.Module, tokens: Tensor) -> Tensor:
    """The final norm as ``get_intermediate_layers(norm=True)`` applies it."""
    if hasattr(bb, "final_norm"):  # dinolab's ViT (untied cls/patch norms included)
        return bb.final_norm(tokens)
    return bb.norm(tokens)
