"""The DINOv3 Vision Transformer, readable top to bottom (``dinov3/models/vision_transformer.py``).

Token sequence: ``[cls, storage_0 .. storage_{n-1}, patch_0 .. patch_{HW-1}]`` (patches row-major).
There is no learned absolute position embedding: positions enter only through RoPE inside attention,
and only for the patch tokens. Constructor kwargs and parameter names are the official ones, so an
official checkpoint loads with ``load_state_dict(strict=True)``.

The released configurations and their ``dinov3_*`` factories are in :mod:`dinolab.hub`
(``dinov3/hub/backbones.py``).
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

from .block import Mlp, RMSNorm, SelfAttentionBlock, SwiGLUFFN
from .patch_embed import PatchEmbed
from .rope import RopePositionEmbedding

FFN_LAYERS = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFN,
    "swiglu32": partial(SwiGLUFFN, align_to=32),
    "swiglu64": partial(SwiGLUFFN, align_to=64),
    "swiglu128": partial(SwiGLUFFN, align_to=128),
}
NORM_LAYERS = {
    "layernorm": partial(nn.LayerNorm, eps=1e-6),
    "layernormbf16": partial(nn.LayerNorm, eps=1e-5),  # plain LayerNorm; only eps differs
    "rmsnorm": RMSNorm,
}


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "bf16",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {sorted(FFN_LAYERS)}")
        if norm_layer not in NORM_LAYERS:
            raise ValueError(f"unknown norm_layer {norm_layer!r}; expected one of {sorted(NORM_LAYERS)}")
        if num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"cannot split embed_dim={embed_dim} into num_heads={num_heads} equal heads")
        norm = NORM_LAYERS[norm_layer]
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_storage_tokens = n_storage_tokens
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm

        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim, flatten_embedding=False)
            self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
            if n_storage_tokens > 0:
                self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim))
            self.rope_embed = RopePositionEmbedding(
                embed_dim, num_heads=num_heads, base=pos_embed_rope_base,
                min_period=pos_embed_rope_min_period, max_period=pos_embed_rope_max_period,
                normalize_coords=pos_embed_rope_normalize_coords, shift_coords=pos_embed_rope_shift_coords,
                jitter_coords=pos_embed_rope_jitter_coords, rescale_coords=pos_embed_rope_rescale_coords,
                dtype=pos_embed_rope_dtype,
            )
            self.blocks = nn.ModuleList(
                SelfAttentionBlock(
                    dim=embed_dim, num_heads=num_heads, ffn_ratio=ffn_ratio, qkv_bias=qkv_bias,
                    proj_bias=proj_bias, ffn_bias=ffn_bias, drop_path=drop_path_rate, norm_layer=norm,
                    act_layer=nn.GELU, ffn_layer=FFN_LAYERS[ffn_layer], init_values=layerscale_init,
                    mask_k_bias=mask_k_bias,
                )
                for _ in range(depth)
            )
            self.norm = norm(embed_dim)
            if untie_cls_and_patch_norms:
                self.cls_norm = norm(embed_dim)
            if untie_global_and_local_cls_norm:
                self.local_cls_norm = norm(embed_dim)
            self.head = nn.Identity()
            self.mask_token = nn.Parameter(torch.empty(1, embed_dim))
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init: trunc-normal(0.02) Linears, N(0, 0.02) cls/storage tokens, zero mask token."""
        self.rope_embed._init_weights()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.n_storage_tokens > 0:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if hasattr(m, "reset_bias_mask") and m.bias is not None:
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, RMSNorm)) or hasattr(m, "gamma"):
                m.reset_parameters()
        self.patch_embed.reset_parameters()

    # ------------------------------------------------------------------ tokens
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        x = self.patch_embed(x)  # (B, h, w, D)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)  # (B, h*w, D)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must have shape (B, h*w) = {tuple(x.shape[:2])}, got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            cls_token = self.cls_token + 0 * self.mask_token  # keeps mask_token in the graph (DDP)
        prefix = [cls_token.expand(B, -1, -1)]
        if self.n_storage_tokens > 0:
            prefix.append(self.storage_tokens.expand(B, -1, -1))
        return torch.cat([*prefix, x], dim=1), (H, W)

    def _split_norm(self, x: Tensor, local_crops: bool = False) -> tuple[Tensor, Tensor]:
        """Final norm, returning (normed cls+storage tokens, normed patch tokens)."""
        p = self.n_storage_tokens + 1
        if local_crops and self.untie_global_and_local_cls_norm and self.training:
            head = self.local_cls_norm(x[:, :p])
        elif self.untie_cls_and_patch_norms:
            head = self.cls_norm(x[:, :p])
        else:  # one norm over all tokens (LayerNorm is per token, so this equals norming the parts)
            x = self.norm(x)
            return x[:, :p], x[:, p:]
        return head, self.norm(x[:, p:])

    def final_norm(self, tokens: Tensor) -> Tensor:
        """The final norm of a whole token sequence (B, 1 + n_storage + H*W, D), as
        ``get_intermediate_layers(norm=True)`` applies it."""
        return torch.cat(self._split_norm(tokens), dim=1)

    # ------------------------------------------------------------------ forward
    def rope_for(self, H: int, W: int) -> tuple[Tensor, Tensor]:
        """(sin, cos), each (H*W, D_head), for an H x W patch grid: what one block is given. Called once
        per block, as the official code does: in training each block then draws its own RoPE augmentation."""
        return self.rope_embed(H=H, W=W)

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | list | None = None):
        """A dict for a Tensor, a list of dicts for a list of crops (e.g. [global, local])."""
        if isinstance(x, Tensor):
            return self._forward_features_one(x, masks)
        masks = masks if masks is not None else [None] * len(x)
        return [self._forward_features_one(xi, mi, local_crops=(i == 1)) for i, (xi, mi) in enumerate(zip(x, masks))]

    def _forward_features_one(self, x: Tensor, masks: Tensor | None, local_crops: bool = False) -> dict:
        x, (H, W) = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x, self.rope_for(H, W))
        head, patches = self._split_norm(x, local_crops)
        return {
            "x_norm_clstoken": head[:, 0],
            "x_storage_tokens": head[:, 1:],
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(self, x: Tensor | list[Tensor], masks=None, is_training: bool = False):
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of some blocks (``n`` int: the last n; a sequence: those 0-based indices)."""
        depth = len(self.blocks)
        take = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        if not take or any(not 0 <= i < depth for i in take):
            raise ValueError(f"block indices {take} out of range for a {depth}-block model")
        B, _, h_img, w_img = x.shape
        tokens, (H, W) = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: max(take) + 1]):  # no need to run blocks after the last one taken
            tokens = blk(tokens, self.rope_for(H, W))
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.final_norm(o) for o in outputs]
        p = self.n_storage_tokens + 1
        cls = [o[:, 0] for o in outputs]
        extra = [o[:, 1:p] for o in outputs]
        patches = [o[:, p:] for o in outputs]
        if reshape:
            patches = [o.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        parts = [patches] + ([cls] if return_class_token else []) + ([extra] if return_extra_tokens else [])
        return tuple(parts[0]) if len(parts) == 1 else tuple(zip(*parts))
