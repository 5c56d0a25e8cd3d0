"""dinolab: DINOv3 and its dense-prediction stack, rebuilt in plain PyTorch for the notebooks.

One file per component (see the README's map). Submodules are imported lazily so that
``import dinolab`` stays fast and a reader can open any single file on its own.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "patch_embed", "rope", "attention", "block", "vit", "hub", "weights", "trace", "utils", "data",
    "msdeform", "msdeform_fused", "spatial_prior", "adapter_interaction", "adapter", "position_encoding",
    "msdeform_encoder", "pixel_decoder", "seg_heads", "depth_head", "linear", "metrics", "lora", "train",
    "viz", "pretrain", "ssl_meta_arch", "run_state", "dino_head", "losses", "masking", "augment", "schedules", "evaluate", "supervised",
    "mask2former", "set_loss", "panoptic", "eomt", "detection",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dinolab' has no attribute {name!r}")
