"""Load DINOv3 weights from official ``.pth`` files, transformers folders or safetensors, offline.

Two key layouts exist for the same network:

* official (facebookresearch/dinov3): ``blocks.{i}.attn.qkv`` fused, ``storage_tokens``,
  ``ls1.gamma``, ``mlp.fc1``/``mlp.w1..w3``, ``rope_embed.periods`` and ``attn.qkv.bias_mask`` buffers;
* transformers (``DINOv3ViTModel``): ``model.layer.{i}.attention.{q,k,v,o}_proj`` separate, no k
  bias, ``embeddings.register_tokens``, ``layer_scale1.lambda1``, ``mlp.{up,down,gate}_proj``.
  (``save_pretrained`` writes ``layer.{i}`` without the ``model.`` prefix; both are accepted.)

``hf_to_official`` / ``official_to_hf`` convert between them (pure key and shape changes), and
``load_backbone`` builds a :class:`~dinolab.vit.DinoVisionTransformer` whose configuration is read
off the tensors (and config.json when there is one). Nothing is ever unpickled as code
(``torch.load(weights_only=True)``), and nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .block import swiglu_hidden_dim
from .vit import DinoVisionTransformer

StateDict = dict[str, Tensor]


TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "data" / "dinov3_tiny_shapesworld.pth"


def tiny_checkpoint() -> Path:
    """Path of the tiny ShapesWorld-pretrained ``dinov3_vittiny16`` the downstream notebooks start from.

    ``data/dinov3_tiny_shapesworld.pth`` of this repository, or the file the environment variable
    ``DINOLAB_CKPT`` names. Raises ``FileNotFoundError`` (naming the file and how to rebuild it) when it is absent.
    """
    path = Path(os.environ.get("DINOLAB_CKPT", TINY_CHECKPOINT))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: make it with `python -m dinolab.pretrain --out "
                                "data/dinov3_tiny_shapesworld.pth` from the repository root (recipe and sha256 in "
                                "data/README.md), or point DINOLAB_CKPT at a dinov3_vittiny16 checkpoint")
    return path


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists the offending keys."""


# ---------------------------------------------------------------------- reading files
def read_state_dict(source: str | Path | Mapping[str, Tensor]) -> tuple[StateDict, dict | None]:
    """Return (state dict, transformers config dict or None) from a path or a dict."""
    if isinstance(source, Mapping):
        return _unwrap(dict(source)), None
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        cfg_file = path / "config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.exists() else None
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth")) or sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .safetensors, .pth or .bin weights")
        sd: StateDict = {}
        for f in files:
            sd.update(_read_file(f))
        return _unwrap(sd), config
    return _unwrap(_read_file(path)), None


def _read_file(path: Path) -> StateDict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def _unwrap(sd: dict) -> StateDict:
    """Accept {'model': sd}, {'state_dict': sd}, {'teacher': sd} and a 'backbone.' prefix."""
    for key in ("model", "state_dict", "teacher"):
        if len(sd) <= 3 and isinstance(sd.get(key), Mapping):
            sd = dict(sd[key])
            break
    if sd and all(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"non-tensor entries in the state dict: {bad[:10]}")
    return sd


def is_hf_state_dict(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("embeddings.") for k in sd)


# ---------------------------------------------------------------------- key conversion
_HF_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
_HF_TO_OFF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.gate_proj": "mlp.w1",  # up_proj / down_proj are fc1 / fc2, or w2 / w3 when gated
}


def hf_to_official(sd: Mapping[str, Tensor]) -> StateDict:
    """transformers DINOv3ViTModel keys -> official keys. The k bias, absent in transformers, is
    written as zeros with a ``bias_mask`` that zeroes it, exactly what the official model does."""
    out: StateDict = {}
    layers: dict[int, dict[str, Tensor]] = {}
    for k, v in sd.items():
        m = _HF_LAYER.match(k)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.mask_token":
            out["mask_token"] = v.reshape(1, -1)  # (1, 1, D) -> (1, D)
        elif k == "embeddings.register_tokens":
            if v.numel():  # transformers keeps a (1, 0, D) tensor when there are no registers
                out["storage_tokens"] = v
        elif k.startswith("embeddings.patch_embeddings."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("norm."):
            out[k] = v
        elif k.startswith("rope_embeddings."):
            continue  # non-persistent in transformers; our periods are recomputed
        else:
            raise CheckpointError(f"unexpected key in a transformers DINOv3 state dict: {k!r}")
    for i, p in sorted(layers.items()):
        pre = f"blocks.{i}."
        gated = "mlp.gate_proj.weight" in p
        q, k_, v = (p.pop(f"attention.{n}_proj.weight") for n in "qkv")
        out[pre + "attn.qkv.weight"] = torch.cat([q, k_, v], 0)
        if "attention.q_proj.bias" in p:
            qb, vb = p.pop("attention.q_proj.bias"), p.pop("attention.v_proj.bias")
            kb = p.pop("attention.k_proj.bias", None)
            if kb is None:
                out[pre + "attn.qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb])
                out[pre + "attn.qkv.bias_mask"] = torch.cat(
                    [torch.ones_like(qb), torch.zeros_like(qb), torch.ones_like(vb)])
            else:
                out[pre + "attn.qkv.bias"] = torch.cat([qb, kb, vb])
        for name, t in p.items():
            if name.endswith("lambda1"):
                out[pre + _HF_TO_OFF_BLOCK[name]] = t
                continue
            mod, param = name.rsplit(".", 1)
            if mod == "mlp.up_proj":
                target = "mlp.w2" if gated else "mlp.fc1"
            elif mod == "mlp.down_proj":
                target = "mlp.w3" if gated else "mlp.fc2"
            elif mod in _HF_TO_OFF_BLOCK:
                target = _HF_TO_OFF_BLOCK[mod]
            else:
                raise CheckpointError(f"unexpected key in a transformers DINOv3 state dict: layer.{i}.{name}")
            out[f"{pre}{target}.{param}"] = t
    return out


def official_to_hf(sd: Mapping[str, Tensor], prefix: str = "model.") -> StateDict:
    """Official keys -> transformers keys (``prefix="model."``: the in-memory DINOv3ViTModel layout;
    ``prefix=""``: the save_pretrained layout). Dropped: ``rope_embed.periods`` (recomputed by
    transformers), ``bias_mask`` and a masked k bias (transformers has no k bias), and
    ``local_cls_norm`` (used only on local crops in training)."""
    out: StateDict = {}
    block = re.compile(r"^blocks\.(\d+)\.(.+)$")
    for k, v in sd.items():
        m = block.match(k)
        if not m:
            simple = {"cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
                      "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
                      "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
                      "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
            if k == "mask_token":
                out["embeddings.mask_token"] = v.reshape(1, 1, -1)
            elif k in simple:
                out[simple[k]] = v
            elif k == "rope_embed.periods" or k.startswith("local_cls_norm."):
                continue
            else:
                raise CheckpointError(f"official key {k!r} has no transformers counterpart")
            continue
        i, name = int(m.group(1)), m.group(2)
        pre = f"{prefix}layer.{i}."
        if name == "attn.qkv.weight":
            for n, t in zip("qkv", v.chunk(3, 0)):
                out[f"{pre}attention.{n}_proj.weight"] = t
        elif name == "attn.qkv.bias":
            mask = sd.get(f"blocks.{i}.attn.qkv.bias_mask")
            # the bias the official model actually adds (its forward uses bias * bias_mask)
            qb, kb, vb = (v * mask.to(v.dtype) if mask is not None else v).chunk(3, 0)
            out[f"{pre}attention.q_proj.bias"] = qb
            out[f"{pre}attention.v_proj.bias"] = vb
            if mask is None or bool(kb.any()):  # a k bias that acts: needs DINOv3ViTConfig(key_bias=True)
                out[f"{pre}attention.k_proj.bias"] = kb
        elif name == "attn.qkv.bias_mask":
            continue
        else:
            mod, param = name.rsplit(".", 1)
            table = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj",
                     "ls1": "layer_scale1", "ls2": "layer_scale2", "mlp.fc1": "mlp.up_proj",
                     "mlp.fc2": "mlp.down_proj", "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj",
                     "mlp.w3": "mlp.down_proj"}
            if mod not in table:
                raise CheckpointError(f"official key {k!r} has no transformers counterpart")
            out[f"{pre}{table[mod]}.{'lambda1' if param == 'gamma' else param}"] = v
    if "cls_token" in sd and "storage_tokens" not in sd:  # transformers always has the tensor
        out["embeddings.register_tokens"] = sd["cls_token"].new_zeros(1, 0, sd["cls_token"].shape[-1])
    return out


# ---------------------------------------------------------------------- config inference
def infer_config(sd: Mapping[str, Tensor], hf_config: dict | None = None) -> dict:
    """DinoVisionTransformer kwargs read off an official-layout state dict.

    What tensors cannot tell: the norm eps (layernormbf16, eps 1e-5, as every released model,
    unless a transformers config says otherwise) and, without a ``rope_embed.periods`` buffer or a
    config, the number of heads (D_head = 64 as every released model but the 7B, whose is 128).
    """
    required = ["cls_token", "patch_embed.proj.weight", "norm.weight", "blocks.0.attn.qkv.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(f"not a DINOv3 ViT state dict: missing {missing}")
    D = sd["cls_token"].shape[-1]
    w = sd["patch_embed.proj.weight"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg: dict = dict(embed_dim=D, depth=depth, patch_size=w.shape[-1], in_chans=w.shape[1],
                     n_storage_tokens=sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
                     qkv_bias="blocks.0.attn.qkv.bias" in sd, mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd,
                     layerscale_init=1e-5 if "blocks.0.ls1.gamma" in sd else None,
                     proj_bias="blocks.0.attn.proj.bias" in sd,
                     untie_cls_and_patch_norms="cls_norm.weight" in sd,
                     untie_global_and_local_cls_norm="local_cls_norm.weight" in sd,
                     norm_layer="layernormbf16" if "norm.bias" in sd else "rmsnorm",
                     pos_embed_rope_base=100.0, pos_embed_rope_dtype="fp32")
    if "rope_embed.periods" in sd:
        d_head = 4 * sd["rope_embed.periods"].numel()
    elif hf_config and "num_attention_heads" in hf_config:
        d_head = D // hf_config["num_attention_heads"]
    else:
        d_head = 128 if D == 4096 else 64
    if D % d_head:
        raise CheckpointError(f"embed_dim {D} is not a multiple of the head dim {d_head}")
    cfg["num_heads"] = D // d_head
    if "blocks.0.mlp.fc1.weight" in sd:
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        cfg.update(ffn_layer="mlp", ffn_ratio=hidden / D, ffn_bias="blocks.0.mlp.fc1.bias" in sd)
    elif "blocks.0.mlp.w1.weight" in sd:
        h = sd["blocks.0.mlp.w1.weight"].shape[0]
        ratio = h * 1.5 / D  # inverse of hidden = int(int(D * ratio) * 2 / 3), then rounded up
        for name, align in (("swiglu", 8), ("swiglu32", 32), ("swiglu64", 64), ("swiglu128", 128)):
            if swiglu_hidden_dim(int(D * ratio), align) == h:
                break
        else:
            raise CheckpointError(f"SwiGLU hidden size {h} is not reachable with align_to 8/32/64/128 (D={D})")
        # the 7B uses swiglu64 although align 8 reaches its size too; prefer the official name
        if D == 4096 and h == 8192:
            name = "swiglu64"
        cfg.update(ffn_layer=name, ffn_ratio=ratio, ffn_bias="blocks.0.mlp.w1.bias" in sd)
    else:
        raise CheckpointError("no MLP weights found (expected blocks.0.mlp.fc1 or blocks.0.mlp.w1)")
    if hf_config:
        cfg["pos_embed_rope_base"] = float(hf_config.get("rope_theta", 100.0))
        eps = hf_config.get("layer_norm_eps", 1e-5)
        cfg["norm_layer"] = "layernormbf16" if eps == 1e-5 else "layernorm" if eps == 1e-6 else cfg["norm_layer"]
        if eps not in (1e-5, 1e-6):
            raise CheckpointError(f"layer_norm_eps={eps} is neither 1e-5 nor 1e-6 (the two official norms)")
        for key, ours in (("pos_embed_shift", "pos_embed_rope_shift_coords"),
                          ("pos_embed_jitter", "pos_embed_rope_jitter_coords"),
                          ("pos_embed_rescale", "pos_embed_rope_rescale_coords")):
            if hf_config.get(key) is not None:
                cfg[ours] = hf_config[key]
    return cfg


# ---------------------------------------------------------------------- loading
def load_into(model: torch.nn.Module, source, *, strict: bool = True) -> torch.nn.Module:
    """Load ``source`` (path, or official/transformers state dict) into ``model``.

    Every problem is reported at once, before anything is copied: missing keys, unexpected keys and
    mismatched shapes, each listed. On error the model is left untouched."""
    sd, _ = read_state_dict(source)
    if is_hf_state_dict(sd):
        sd = hf_to_official(sd)
    own = model.state_dict()
    if "rope_embed.periods" in own and "rope_embed.periods" not in sd:
        sd["rope_embed.periods"] = own["rope_embed.periods"]  # transformers recomputes it; so do we
    check_state_dict(own, sd, strict=strict)
    model.load_state_dict(sd, strict=strict)
    return model


def check_state_dict(own: Mapping[str, Tensor], sd: Mapping[str, Tensor], *, strict: bool = True) -> None:
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} mismatched shape(s):\n  " + "\n  ".join(shapes))
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s):\n  " + "\n  ".join(missing))
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s):\n  " + "\n  ".join(unexpected))
    if problems:
        raise CheckpointError("checkpoint does not fit the model; " + "\n".join(problems))


def load_backbone(source, *, device=None, **overrides):
    """Build a DinoVisionTransformer from an official ``.pth``, a transformers folder (config.json +
    safetensors, as save_pretrained writes it), a ``.safetensors`` file, or a state dict.
    ``overrides`` fix what tensors cannot tell (e.g. ``norm_layer``, ``num_heads``)."""
    sd, hf_config = read_state_dict(source)
    if is_hf_state_dict(sd):
        sd = hf_to_official(sd)
    cfg = {**infer_config(sd, hf_config), **overrides}
    model = DinoVisionTransformer(**cfg)
    load_into(model, sd)
    model.eval()
    return model.to(device) if device is not None else model
