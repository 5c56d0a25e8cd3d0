"""What a resumable training run needs around its loop: the device, the RNG states, and the small fp16 checkpoint
with its JSON sidecar. Used by ``dinolab.pretrain`` and ``dinolab.supervised``."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .pretrain import PretrainConfig

__all__ = ["pick_device", "save_fp16", "save_checkpoint"]


def pick_device(device: str = "auto") -> torch.device:
    """"auto" -> CUDA when available, else the CPU; "cpu" / "cuda" as given (cuda must exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    return torch.device(device)


def _rng_state(gens: dict) -> dict:
    state = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in gens.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(gens: dict, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in gens.items():
        g.set_state(state[k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_fp16(backbone: nn.Module, out: str | Path, meta: dict) -> str:
    """A backbone's state dict in fp16 (RoPE periods kept fp32), plus a JSON sidecar: ``meta`` and the sha256 of the
    weights file, which is returned."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() and k != "rope_embed.periods" else v).contiguous()
          for k, v in backbone.state_dict().items()}
    torch.save(sd, out)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    out.with_suffix(".json").write_text(json.dumps({**meta, "sha256": sha}, indent=1))
    return sha


def compact_history(history: list[dict], max_records: int = 1000) -> tuple[list[dict], int]:
    """At most ``max_records`` records: the means of consecutive windows of ``every`` steps (each record keeps the
    ``step`` of its window's first step). Returns (records, every); ``every`` is 1 when nothing was merged."""
    every = max(1, math.ceil(len(history) / max_records))
    if every == 1:
        return list(history), 1
    out = []
    for i in range(0, len(history), every):
        chunk = history[i:i + every]
        keys = [k for k, v in chunk[0].items() if k != "step" and isinstance(v, (int, float))]
        out.append({"step": chunk[0]["step"], **{k: sum(h[k] for h in chunk) / len(chunk) for k in keys}})
    return out, every


def save_checkpoint(backbone: nn.Module, out: str | Path, cfg: PretrainConfig, history: list, seconds: float,
                    world: int = 1, evals: list | None = None, extra: dict | None = None) -> str:
    """A pretraining run's teacher backbone (``save_fp16``) with the recipe, the loss history and the evaluations.
    Histories longer than 1,000 steps are stored as means over windows of ``history_every`` steps (a small sidecar)."""
    records, every = compact_history(history)
    return save_fp16(backbone, out, {
        "config": asdict(cfg), "world_size": world, "seconds": round(seconds, 1), "evals": evals or [],
        "torch": torch.__version__, **(extra or {}), "history_every": every,
        "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()} for h in records]})
