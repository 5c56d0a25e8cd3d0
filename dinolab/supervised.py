"""The supervised control: the tiny DINOv3 ViT trained *with* labels, ``python -m dinolab.supervised``.

Same architecture as the self-supervised checkpoint (``dinov3_vittiny16``), so the downstream notebooks can
put three backbones side by side: random init (the floor), self-distillation, and this one (the ceiling
that self-supervision is measured against). Two linear heads are trained with the backbone and thrown
away afterwards:

* a patch head on every normed patch token, against the fraction of each class in that 16-px patch (soft
  cross-entropy, classes weighted by inverse frequency so that the background does not win): dense
  masks give 64 labels per 128-px image;
* an image head on [CLS ‖ mean patch], against the image label.

Each batch mixes the standard cluttered scenes and the object-centric split (one object at
``evaluate.OBJECT_SCALE``), and every image is drawn in a random appearance (``ShapesWorld.batch(...,
appearance=...)``), so colour never predicts the class. Fresh scenes every step (no epochs). The run is
resumable like pretraining (``--resume``; state on SIGTERM), and the backbone is saved in fp16 with a JSON
sidecar (recipe, curves, time, sha256).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hub
from .data import NUM_CLASSES, ShapesWorld
from .evaluate import OBJECT_SCALE
from .run_state import save_fp16
from .utils import normalize


@dataclass
class SupervisedConfig:
    steps: int = 3000
    batch_size: int = 32  # half standard scenes, half object-centric
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.05
    layerscale_init: float = 0.1
    image_weight: float = 1.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500


class SupervisedViT(nn.Module):
    def __init__(self, cfg: SupervisedConfig):
        super().__init__()
        self.backbone = hub.build("dinov3_vittiny16", layerscale_init=cfg.layerscale_init)
        D = self.backbone.embed_dim
        self.patch_head = nn.Linear(D, NUM_CLASSES)
        self.image_head = nn.Linear(2 * D, NUM_CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(patch logits (B, C, h, w), image logits (B, C))."""
        o = self.backbone.forward_features(x)
        p = o["x_norm_patchtokens"]
        B, N, _ = p.shape
        h = x.shape[-2] // self.backbone.patch_size
        patch_logits = self.patch_head(p).transpose(1, 2).reshape(B, NUM_CLASSES, h, N // h)
        return patch_logits, self.image_head(torch.cat([o["x_norm_clstoken"], p.mean(1)], 1))


def _lr(cfg: SupervisedConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + torch.cos(torch.tensor(t * torch.pi)).item())


def _batch(scenes: ShapesWorld, objects: ShapesWorld, step: int, B: int) -> dict[str, Tensor]:
    half = B // 2
    idx = torch.arange(step * half, (step + 1) * half)
    a = scenes.batch(idx, appearance=idx + 1)
    b = objects.batch(idx, appearance=idx + 1)
    return {k: torch.cat([a[k], b[k]]) for k in ("image", "mask", "label")}


def train(cfg: SupervisedConfig, out: str | Path | None = None, *, resume: str | Path | None = None,
          state_path: str | Path | None = None, save_every: int = 200, stop_after: int | None = None,
          evaluate=None, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    model = SupervisedViT(cfg)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scenes = ShapesWorld("train", num_samples=1 << 30, seed=cfg.seed)
    objects = ShapesWorld("train", n_objects=(1, 1), object_scale=OBJECT_SCALE, num_samples=1 << 30,
                          seed=cfg.seed + 1)
    history, evals, start, seconds_before = [], [], 0, 0.0
    if resume is not None:
        st = torch.load(resume, weights_only=False)  # our own file: optimizer state, RNG
        if st["config"] != asdict(cfg):
            raise ValueError(f"{resume} was written with another configuration; pass the same one to resume")
        model.load_state_dict(st["model"]), opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng"])
        history, evals, start, seconds_before = st["history"], st["evals"], st["step"], st["seconds"]
        log(f"resumed from {resume} at step {start}")
    t0 = time.time()

    def save_state(step: int) -> None:
        if state_path is not None:
            st = {"config": asdict(cfg), "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                  "rng": torch.get_rng_state(), "history": history, "evals": evals,
                  "seconds": seconds_before + time.time() - t0}
            Path(state_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(st, str(state_path) + ".tmp")
            os.replace(str(state_path) + ".tmp", state_path)

    stop = {"flag": False}
    old = signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    step = start
    try:
        for step in range(start, end):
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step)
            b = _batch(scenes, objects, step, cfg.batch_size)
            model.train()
            patch_logits, image_logits = model(normalize(b["image"]))
            p = model.backbone.patch_size
            target = F.avg_pool2d(F.one_hot(b["mask"], NUM_CLASSES).permute(0, 3, 1, 2).float(), p)  # (B, C, h, w)
            w = 1.0 / target.mean((0, 2, 3)).clamp_min(1e-3)  # inverse class frequency in this batch
            w = w / w.sum() * NUM_CLASSES
            wt = target * w.view(1, -1, 1, 1)  # as F.cross_entropy(weight=w): a weighted mean over the patches
            l_patch = -(wt * F.log_softmax(patch_logits, 1)).sum() / wt.sum()
            l_image = F.cross_entropy(image_logits, b["label"])
            loss = l_patch + cfg.image_weight * l_image
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            opt.step()
            rec = {"step": step, "loss": round(loss.item(), 5), "patch": round(l_patch.item(), 5),
                   "image": round(l_image.item(), 5), "seconds": round(seconds_before + time.time() - t0, 1)}
            history.append(rec)
            if step % cfg.log_every == 0:
                log(f"step {step:5d}/{cfg.steps}  loss {rec['loss']:.3f}  patch {rec['patch']:.3f}  "
                    f"image {rec['image']:.3f}  ({rec['seconds']:.0f} s)")
            done = step + 1
            if evaluate is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                evals.append({"step": done, **evaluate(model.backbone)})
                log("eval " + json.dumps(evals[-1]))
            if save_every and done % save_every == 0:
                save_state(done)
            if stop["flag"]:
                save_state(done)
                log(f"stopped by a signal after step {step}; state saved")
                break
        else:
            step = end
            save_state(end)
    finally:
        signal.signal(signal.SIGTERM, old)
    seconds = seconds_before + time.time() - t0
    backbone = model.backbone.eval()
    if out is not None and len(history) == cfg.steps:
        save_backbone(backbone, out, {"config": asdict(cfg), "seconds": round(seconds, 1), "evals": evals,
                                      "torch": torch.__version__, "history": history})
    return {"backbone": backbone, "history": history, "evals": evals, "seconds": seconds, "step": len(history)}


def save_backbone(backbone: nn.Module, out: str | Path, meta: dict) -> str:
    """fp16 state dict (RoPE periods fp32) + a JSON sidecar with ``meta`` and the sha256 (``run_state.save_fp16``)."""
    return save_fp16(backbone, out, meta)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/dinov3_tiny_supervised.pth")
    for name, typ in (("steps", int), ("batch_size", int), ("lr", float), ("eval_every", int), ("seed", int),
                      ("warmup_steps", int), ("log_every", int)):
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--state", default=None, help="training-state file (default: runs/<OUT stem>.state.pt)")
    ap.add_argument("--resume", default=None, help="a state file, or 'auto' (--state if it exists)")
    ap.add_argument("--stop-after", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SupervisedConfig(**{k: v for k, v in vars(args).items()
                              if k in SupervisedConfig.__dataclass_fields__ and v is not None})
    state = args.state or str(Path("runs") / (Path(args.out).stem + ".state.pt"))  # runs/ is git-ignored
    resume = state if args.resume == "auto" and Path(state).exists() else (
        None if args.resume == "auto" else args.resume)
    from .evaluate import ObjectKNN

    train(cfg, out=args.out, resume=resume, state_path=state, stop_after=args.stop_after,
          evaluate=ObjectKNN(), log=lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    main()
