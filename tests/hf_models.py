"""Tiny transformers DINOv3ViTModel builders shared by the parity tests (random, offline)."""
from __future__ import annotations

import torch


def tiny_hf_model(gated: bool = False, registers: int = 4, hidden: int = 64, heads: int = 4, layers: int = 2,
                  scale: float = 0.1, seed: int = 0):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    cfg = DINOv3ViTConfig(
        hidden_size=hidden, intermediate_size=(hidden * 4 if not gated else hidden * 4 * 2 // 3 // 8 * 8),
        num_hidden_layers=layers, num_attention_heads=heads, patch_size=16, image_size=64,
        num_register_tokens=registers, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        layerscale_value=1e-5,
    )
    model = DINOv3ViTModel(cfg).eval()
    with torch.no_grad():  # every tensor random (LayerScale, norms, biases too), so no part hides
        for p in model.parameters():
            p.normal_(0, scale)
    return model


def hf_tokens(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def our_tokens(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model.forward_features(x)
    return torch.cat([o["x_norm_clstoken"][:, None], o["x_storage_tokens"], o["x_norm_patchtokens"]], 1)
