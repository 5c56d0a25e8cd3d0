"""The released DINOv3 ViT configurations and their factories, as in ``dinov3/hub/backbones.py``.

``build(name)`` = ``DinoVisionTransformer(**HUB_COMMON, **CONFIGS[name])``; each ``dinov3_*`` factory is
``build`` with its name, and ``weights=`` (a path or a state dict, official or transformers layout) is
loaded with strict=True by :func:`dinolab.weights.load_into`. Parameter counts equal the official ones
exactly (tests/test_vit.py). ``device="meta"`` builds any of them, the 6.7B-parameter one included,
without allocating memory.
"""
from __future__ import annotations

from pathlib import Path

from .vit import DinoVisionTransformer
from .weights import load_into

# Settings shared by every released ViT.
HUB_COMMON = dict(
    img_size=224, patch_size=16, in_chans=3, pos_embed_rope_base=100.0, pos_embed_rope_min_period=None,
    pos_embed_rope_max_period=None, pos_embed_rope_normalize_coords="separate", pos_embed_rope_shift_coords=None,
    pos_embed_rope_jitter_coords=None, pos_embed_rope_rescale_coords=2, pos_embed_rope_dtype="fp32",
    layerscale_init=1.0e-05, norm_layer="layernormbf16", ffn_bias=True, proj_bias=True, n_storage_tokens=4,
    mask_k_bias=True, drop_path_rate=0.0, untie_cls_and_patch_norms=False,
)
CONFIGS = {
    "dinov3_vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6, ffn_layer="swiglu"),
    "dinov3_vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vitl16": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4, ffn_layer="mlp"),
    "dinov3_vitl16plus": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vit7b16": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3, ffn_layer="swiglu64",
                           qkv_bias=False, untie_global_and_local_cls_norm=True),
    # Not released: the small model the notebooks pretrain on ShapesWorld on a CPU (notebook 05).
    "dinov3_vittiny16": dict(embed_dim=192, depth=6, num_heads=3, ffn_ratio=4, ffn_layer="mlp"),
}
RELEASED = [n for n in CONFIGS if n != "dinov3_vittiny16"]


def build(name: str, *, weights: str | Path | dict | None = None, device=None, **overrides) -> DinoVisionTransformer:
    """Build a named configuration; ``weights`` (path or state dict) is loaded with strict=True."""
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; expected one of {sorted(CONFIGS)}")
    model = DinoVisionTransformer(device=device, **{**HUB_COMMON, **CONFIGS[name], **overrides})
    if weights is not None:
        load_into(model, weights)
    return model


def dinov3_vits16(*, weights=None, device=None, **kw):
    return build("dinov3_vits16", weights=weights, device=device, **kw)


def dinov3_vits16plus(*, weights=None, device=None, **kw):
    return build("dinov3_vits16plus", weights=weights, device=device, **kw)


def dinov3_vitb16(*, weights=None, device=None, **kw):
    return build("dinov3_vitb16", weights=weights, device=device, **kw)


def dinov3_vitl16(*, weights=None, device=None, **kw):
    return build("dinov3_vitl16", weights=weights, device=device, **kw)


def dinov3_vitl16plus(*, weights=None, device=None, **kw):
    return build("dinov3_vitl16plus", weights=weights, device=device, **kw)


def dinov3_vith16plus(*, weights=None, device=None, **kw):
    return build("dinov3_vith16plus", weights=weights, device=device, **kw)


def dinov3_vit7b16(*, weights=None, device=None, **kw):
    return build("dinov3_vit7b16", weights=weights, device=device, **kw)


def dinov3_vittiny16(*, weights=None, device=None, **kw):
    """The tiny model of the notebooks: D=192, 6 blocks, 3 heads, 4 storage tokens (2,820,672 parameters)."""
    return build("dinov3_vittiny16", weights=weights, device=device, **kw)
