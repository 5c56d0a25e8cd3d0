"""The adapter's interaction blocks: SPM tokens and ViT tokens read each other with multi-scale deformable attention.

As in DINOv3's ``dinov3/eval/segmentation/models/backbone/dinov3_adapter.py`` (from ViT-Adapter's
``adapter_modules.py``):

* :func:`get_reference_points`, :func:`deform_inputs`: where every query samples from, for the two directions;
* the **extractor** (:class:`Extractor`): the SPM tokens read the ViT's patch tokens, then a :class:`ConvFFN`
  (a depthwise 3×3 conv over each SPM level, :class:`DWConv`) with stochastic depth (:class:`DropPath`);
* the **injector** (:class:`Injector`, original ViT-Adapter only): the ViT's patch tokens read the SPM tokens;
* :class:`InteractionBlockWithCls`: the official DINOv3 block, extractor(s) only (the injector is opt-in).

:class:`dinolab.adapter.DINOv3Adapter` stacks four of these blocks; notebook 08 builds them step by step.
Module and parameter names are the official ones. Two differences from the official file, both outside the
state dict: the official ``MSDeformAttn`` broadcasts ``[1, Lq, 1, 2]`` reference points over the batch (and
levels), :mod:`dinolab.msdeform` wants ``[B, Lq, L, 2]``, so the blocks expand them first (a view, no copy);
on the meta device, :func:`deform_inputs` keeps spatial shapes on the CPU (they must be read as numbers).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from .msdeform import MSDeformAttn

__all__ = [
    "drop_path", "DropPath", "get_reference_points", "deform_inputs", "DWConv", "ConvFFN", "Extractor", "Injector",
    "InteractionBlockWithCls",
]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------------------------


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Classic per-sample stochastic depth: zero the branch for a random subset of samples, rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (the adapter's own, not the ViT's batch-subset variant)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def get_reference_points(spatial_shapes: Sequence[tuple[int, int]], device=None) -> Tensor:
    """Pixel centres of every level, normalised to [0, 1], as (x, y): ``[1, ΣHW, 1, 2]``.

    Level by level, row-major (y outer) — the order of flattened feature maps. Pixel ``i`` of a side of
    length ``n`` sits at ``(i + 0.5) / n``. The trailing singleton is the level axis of MSDeformAttn's
    ``reference_points`` (one point, shared by all levels, as the official code does).
    At 512×512 for the SPM levels: ``[1, 64·64 + 32·32 + 16·16, 1, 2] = [1, 5376, 1, 2]``.
    """
    refs = []
    for h, w in spatial_shapes:
        h, w = int(h), int(w)
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1)[None])
    return torch.cat(refs, 1)[:, :, None]


def _shapes_and_starts(shapes: list[tuple[int, int]], device) -> tuple[Tensor, Tensor]:
    spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    return spatial_shapes, level_start_index


def deform_inputs(x: Tensor, patch_size: int = 16) -> tuple[list[Tensor], list[Tensor]]:
    """The two sets of MSDeformAttn inputs the adapter uses, each ``[reference_points, spatial_shapes,
    level_start_index]``, for an image ``x`` [B, C, H, W].

    * ``deform_inputs1`` — for the **injector** (ViT tokens read the SPM): queries are the ViT's patch tokens
      (reference points on the H/p × W/p grid, ``[1, HW/p², 1, 2]``), values are the three SPM levels
      ``[(H/8, W/8), (H/16, W/16), (H/32, W/32)]``, start indices ``[0, HW/64, HW/64 + HW/256]``.
    * ``deform_inputs2`` — for the **extractor** (SPM tokens read the ViT): queries are the SPM tokens of the
      three levels (``[1, 21·HW/1024, 1, 2]``), the value is the one ViT map ``[(H/p, W/p)]``, start ``[0]``.

    At 512×512, p=16: ``deform_inputs1`` = ([1,1024,1,2], [[64,64],[32,32],[16,16]], [0,4096,5120]);
    ``deform_inputs2`` = ([1,5376,1,2], [[32,32]], [0]).
    On the meta device the shapes and start indices stay on the CPU (MSDeformAttn must read their values).
    """
    _, _, h, w = x.shape
    device = x.device
    shape_device = torch.device("cpu") if device.type == "meta" else device
    spm_levels = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    vit_level = [(h // patch_size, w // patch_size)]

    spatial_shapes, level_start_index = _shapes_and_starts(spm_levels, shape_device)
    deform_inputs1 = [get_reference_points(vit_level, device), spatial_shapes, level_start_index]

    spatial_shapes, level_start_index = _shapes_and_starts(vit_level, shape_device)
    deform_inputs2 = [get_reference_points(spm_levels, device), spatial_shapes, level_start_index]
    return deform_inputs1, deform_inputs2


def _expand_reference_points(reference_points: Tensor, batch: int, n_levels: int) -> Tensor:
    """Official reference points are [1, Lq, 1, 2] and broadcast inside the official MSDeformAttn;
    dinolab's MSDeformAttn wants [B, Lq, L, 2]: expand (a view)."""
    return reference_points.expand(batch, reference_points.shape[1], n_levels, reference_points.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# ConvFFN, Extractor, Injector, InteractionBlockWithCls
# ---------------------------------------------------------------------------------------------------------------


class DWConv(nn.Module):
    """Depthwise 3×3 conv over the three SPM levels, each convolved as its own map (shared weights).

    ``forward(x [B, N, C], H, W)`` with ``H, W`` the stride-16 grid size (H/16 × W/16 of the image):
    the tokens are split into the three levels (2H × 2W, H × W, H/2 × W/2), each reshaped to a map,
    convolved, and flattened back. At 512×512 with ConvFFN hidden 256: x [4,5376,256] → split
    4096/1024/256 → maps [4,256,64,64], [4,256,32,32], [4,256,16,16] → [4,5376,256].
    (The official code splits N as 16n / 4n / n with n = N // 21, which is the same for even H, W.)
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, N, C = x.shape
        shapes = [(2 * H, 2 * W), (H, W), (H // 2, W // 2)]
        sizes = [h * w for h, w in shapes]
        if sum(sizes) != N:
            raise ValueError(
                f"DWConv expects the three SPM levels {shapes} = {sum(sizes)} tokens for H, W = {H}, {W}, got N = {N}"
            )
        out = []
        for part, (h, w) in zip(x.split(sizes, dim=1), shapes):
            part = part.transpose(1, 2).reshape(B, C, h, w)
            out.append(self.dwconv(part).flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    """fc1 → DWConv (per level) → GELU → dropout → fc2 → dropout. ``forward(x [B, N, C], H, W)``.

    In the adapter: ``ConvFFN(D, hidden_features=int(D * cffn_ratio))``, e.g. 1024 → 256 → 1024 for ViT-L.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        x = self.fc1(x)
        x = self.dwconv(x, H, W)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class Extractor(nn.Module):
    """SPM tokens read the ViT: ``c = c + MSDeformAttn(query_norm(c), ref, feat_norm(x))``, then
    ``c = c + drop_path(ConvFFN(ffn_norm(c), H, W))``.

    ``forward(query, reference_points, feat, spatial_shapes, level_start_index, H, W)``:
    query = SPM tokens [B, Nc, D] (5376 at 512²), feat = ViT patch tokens [B, HW/256, D] (1024 at 512²),
    reference_points = ``deform_inputs2[0]`` [1, Nc, 1, 2], one level ``[(H/16, W/16)]``; returns [B, Nc, D].
    With ``with_cp`` the whole step is gradient-checkpointed when the query requires grad.
    """

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, n_levels: int = 1, deform_ratio: float = 1.0,
                 with_cffn: bool = True, cffn_ratio: float = 0.25, drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer=_LayerNorm, with_cp: bool = False) -> None:
        super().__init__()
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points,
                                 ratio=deform_ratio)
        self.with_cffn = with_cffn
        self.with_cp = with_cp
        if with_cffn:
            self.ffn = ConvFFN(in_features=dim, hidden_features=int(dim * cffn_ratio), drop=drop)
            self.ffn_norm = norm_layer(dim)
            self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, query: Tensor, reference_points: Tensor, feat: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, H: int, W: int) -> Tensor:
        ref = _expand_reference_points(reference_points, query.shape[0], self.attn.n_levels)

        def _inner_forward(query: Tensor, feat: Tensor) -> Tensor:
            attn = self.attn(self.query_norm(query), ref, self.feat_norm(feat), spatial_shapes, level_start_index,
                             None)
            query = query + attn
            if self.with_cffn:
                query = query + self.drop_path(self.ffn(self.ffn_norm(query), H, W))
            return query

        if self.with_cp and query.requires_grad:
            return cp.checkpoint(_inner_forward, query, feat, use_reentrant=False)
        return _inner_forward(query, feat)


class Injector(nn.Module):
    """ViT tokens read the SPM (original ViT-Adapter only): ``x = x + gamma * MSDeformAttn(query_norm(x), ref,
    feat_norm(c))`` with a LayerScale ``gamma`` initialised to ``init_values`` (0 ⇒ starts as the identity).

    ``forward(query, reference_points, feat, spatial_shapes, level_start_index)``: query = ViT patch tokens
    [B, HW/256, D], feat = SPM tokens [B, Nc, D] over three levels, reference_points = ``deform_inputs1[0]``.
    Not used by DINOv3 (its backbone is frozen and run once); see :class:`DINOv3Adapter`.
    """

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, n_levels: int = 3, deform_ratio: float = 1.0,
                 norm_layer=_LayerNorm, init_values: float = 0.0, with_cp: bool = False) -> None:
        super().__init__()
        self.with_cp = with_cp
        self.query_norm = norm_layer(dim)
        self.feat_norm = norm_layer(dim)
        self.attn = MSDeformAttn(d_model=dim, n_levels=n_levels, n_heads=num_heads, n_points=n_points,
                                 ratio=deform_ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query: Tensor, reference_points: Tensor, feat: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor) -> Tensor:
        ref = _expand_reference_points(reference_points, query.shape[0], self.attn.n_levels)

        def _inner_forward(query: Tensor, feat: Tensor) -> Tensor:
            attn = self.attn(self.query_norm(query), ref, self.feat_norm(feat), spatial_shapes, level_start_index,
                             None)
            return query + self.gamma * attn

        if self.with_cp and query.requires_grad:
            return cp.checkpoint(_inner_forward, query, feat, use_reentrant=False)
        return _inner_forward(query, feat)


class InteractionBlockWithCls(nn.Module):
    """The official DINOv3 interaction block: an extractor (plus two ``extra_extractors`` in the last block).

    ``forward(x, c, cls, deform_inputs1, deform_inputs2, H_c, W_c, H_toks, W_toks) -> (x, c, cls)``:
    x = ViT patch tokens [B, HW/256, D] and cls [B, D] pass through unchanged (the official block takes the
    cls token only to return it); c = SPM tokens [B, Nc, D] is updated by the extractor(s), which read x at
    ``deform_inputs2``. ``deform_inputs1``, ``H_toks``, ``W_toks`` and ``init_values`` are accepted, as in
    the official signature, and unused.

    ``with_injector=True`` (not official) also builds ``self.injector`` (:class:`Injector`, ``init_values`` as
    its gamma); :class:`DINOv3Adapter` calls it itself *before* running the ViT blocks of this interaction.
    """

    def __init__(self, dim: int, num_heads: int = 6, n_points: int = 4, norm_layer=_LayerNorm, drop: float = 0.0,
                 drop_path: float = 0.0, with_cffn: bool = True, cffn_ratio: float = 0.25, init_values: float = 0.0,
                 deform_ratio: float = 1.0, extra_extractor: bool = False, with_cp: bool = False,
                 with_injector: bool = False) -> None:
        super().__init__()
        if with_injector:
            self.injector = Injector(dim=dim, n_levels=3, num_heads=num_heads, n_points=n_points,
                                     norm_layer=norm_layer, deform_ratio=deform_ratio, init_values=init_values,
                                     with_cp=with_cp)
        else:
            self.injector = None
        kw = dict(dim=dim, num_heads=num_heads, n_points=n_points, norm_layer=norm_layer, deform_ratio=deform_ratio,
                  with_cffn=with_cffn, cffn_ratio=cffn_ratio, drop=drop, drop_path=drop_path, with_cp=with_cp)
        self.extractor = Extractor(n_levels=1, **kw)
        if extra_extractor:
            self.extra_extractors = nn.Sequential(*[Extractor(**kw) for _ in range(2)])
        else:
            self.extra_extractors = None

    def forward(self, x: Tensor, c: Tensor, cls: Tensor, deform_inputs1, deform_inputs2, H_c: int, W_c: int,
                H_toks: int, W_toks: int) -> tuple[Tensor, Tensor, Tensor]:
        ref, shapes, starts = deform_inputs2
        c = self.extractor(query=c, reference_points=ref, feat=x, spatial_shapes=shapes, level_start_index=starts,
                           H=H_c, W=W_c)
        if self.extra_extractors is not None:
            for extractor in self.extra_extractors:
                c = extractor(query=c, reference_points=ref, feat=x, spatial_shapes=shapes,
                              level_start_index=starts, H=H_c, W=W_c)
        return x, c, cls
