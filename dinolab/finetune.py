"""One resumable command per downstream task: ``python -m dinolab.finetune TASK --backbone ssl|supervised|random``.

Tasks (each in its own small file, which holds the recipe of its notebook and reuses the library's heads):

* ``segmentation`` (:mod:`dinolab.finetune_segmentation`, notebook 10): head ``linear`` (the official linear head on
  the patch maps of four blocks) or ``fpn`` (adapter → pixel decoder → FPN head); held-out mIoU;
* ``depth`` (:mod:`dinolab.finetune_depth`, notebook 11): head ``dpt`` or ``linear`` (bins + SigLoss); held-out
  AbsRel, δ1, RMSE, and the per-row prior's AbsRel / δ1 for reference;
* ``classification`` (:mod:`dinolab.finetune_classification`, notebook 12): the linear probe on [CLS ‖ mean patch]
  (``linear``) or CLS alone (``cls``), on the object-centric split; held-out accuracy;
* ``lora`` (:mod:`dinolab.finetune_lora`, notebook 13): foreground segmentation on the shifted domain with LoRA on q
  and v (``lora``), full fine-tuning (``full``) or the frozen linear probe (``linear``); held-out foreground IoU.

Backbones: ``ssl`` (data/dinov3_tiny_shapesworld.pth, or $DINOLAB_CKPT), ``supervised``
(data/dinov3_tiny_supervised.pth), ``random`` (the same architecture, seeded random init). The backbone is frozen
(except LoRA / full fine-tuning); a frozen backbone's features are computed once and cached
(``train.extract_features``).
As :mod:`dinolab.pretrain`: a dataclass recipe (``--config JSON``), ``--device auto``, a state file under runs/
(written every ``--save-every`` steps, at the end and on SIGTERM / Ctrl-C; ``--resume auto``), ``--stop-after``,
held-out evaluation every ``--eval-every`` steps (curves), and at the end the trained part only (fp16) with a JSON
sidecar (recipe, curves, final metrics, seconds, sha256). :func:`load` rebuilds a trained model from those files.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from . import hub
from .run_state import pick_device
from .train import cosine_lr_factor, extract_features, to_device
from .utils import count_params

TASKS = {"segmentation": "seg", "depth": "depth", "classification": "cls", "lora": "lora"}  # name -> file prefix
DATA = Path(__file__).resolve().parent.parent / "data"
BACKBONES = {"ssl": None, "supervised": DATA / "dinov3_tiny_supervised.pth", "random": None}  # ssl: tiny_checkpoint()
RANDOM_INIT_SEED = 0  # the random backbone is always this init (notebooks 10-13 draw theirs after seed_everything(0))


@dataclass
class FinetuneConfig:
    """The recipe. Fields a task does not use are ignored by it; :meth:`for_task` fills in the task's defaults."""
    task: str = "segmentation"
    backbone: str = "ssl"
    head: str = ""  # "" = the task's first head
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3  # the head's (the trainable part's) learning rate
    backbone_lr: float = 0.0  # LoRA / full fine-tuning only
    optimizer: str = "adamw"  # or "sgd" (momentum, the official linear classifier)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 0  # linear warm-up, then cosine to lr * min_lr_factor (train.cosine_lr_factor)
    min_lr_factor: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    n_train: int = 256  # a fixed set of ShapesWorld training scenes, sampled with replacement
    n_val: int = 128  # held-out scenes (the val split)
    image_size: int = 128
    zoom: int = 1  # segmentation: render at zoom × size and keep the window around the floor (notebook 10)
    layers: tuple = (5,)  # backbone blocks the head reads
    n_bins: int = 32  # depth bins
    lora_rank: int = 4
    lora_alpha: float = 8.0
    class_weighted: bool = True  # cross-entropy weighted by 1/sqrt(pixel share): no collapse to background
    seed: int = 0  # head init and batch order
    log_every: int = 20
    eval_every: int = 50  # 0 = only at the end

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {list(BACKBONES)}")
        heads = get_task(self.task).HEADS  # ValueError for an unknown task
        self.head = self.head or heads[0]
        if self.head not in heads:
            raise ValueError(f"unknown head {self.head!r} for task {self.task!r}; expected one of {list(heads)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected 'adamw' or 'sgd'")
        self.layers = tuple(int(i) for i in self.layers)

    @classmethod
    def for_task(cls, task: str, backbone: str = "ssl", head: str = "", **overrides) -> "FinetuneConfig":
        """The task's recipe for ``head`` (its notebook's settings), then ``overrides``."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown FinetuneConfig field(s) {unknown}")
        t = get_task(task)
        head = head or t.HEADS[0]
        recipe = t.recipe(head) if head in t.HEADS else {}  # an unknown head is refused by __post_init__
        return cls(**{**recipe, **overrides, "task": task, "backbone": backbone, "head": head})


def get_task(name: str):
    """The module that implements a task: ``HEADS`` (the first is the default), ``recipe(head)`` (config defaults),
    ``data(cfg)`` ({"train", "val"}: "x" normalised images + targets; shared extras), ``build(cfg, backbone)`` (a
    :class:`BackboneHead`), ``loss``, ``predict``, ``score`` and, optionally, ``param_groups``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASKS)}")
    return importlib.import_module(f"dinolab.finetune_{name}")


def backbone_path(name: str) -> Path | None:
    """The weights file of a named backbone (None for ``random``); FileNotFoundError when it is missing."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {list(BACKBONES)}")
    if name == "random":
        return None
    if name == "ssl" and BACKBONES["ssl"] is None:
        from .weights import tiny_checkpoint

        return tiny_checkpoint()  # raises FileNotFoundError naming the file and how to make it
    path = Path(BACKBONES[name])
    if not path.exists():
        raise FileNotFoundError(f"backbone {name!r}: {path} is missing" + (
            "; make it with `python -m dinolab.supervised`" if name == "supervised" else ""))
    return path


def load_backbone(name: str) -> nn.Module:
    path = backbone_path(name)
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return hub.dinov3_vittiny16().eval()
    return hub.dinov3_vittiny16(weights=path).eval()  # strict load, torch.load(weights_only=True)


# ---------------------------------------------------------------------------------------------- shared by the tasks
class BackboneHead(nn.Module):
    """backbone + head. ``feature_kw`` (``extract_features`` arguments) set: the backbone is frozen and its features
    can be cached, ``head_forward(features)`` trains; None: ``head_forward(images)`` runs the backbone too (LoRA, full
    fine-tuning, the adapter). The backbone always runs in eval mode (no training-time RoPE augmentation)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature_kw: dict | None):
        super().__init__()
        self.backbone, self.head, self.feature_kw = backbone, head, feature_kw
        if feature_kw is not None:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, x: Tensor):
        if self.feature_kw is None:
            return x
        kw = dict(self.feature_kw)
        with torch.no_grad():
            return self.backbone.get_intermediate_layers(x, n=kw.pop("layers"), **kw)

    def head_forward(self, inputs):
        raise NotImplementedError

    def forward(self, x: Tensor):
        return self.head_forward(self.features(x))


def class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """1/sqrt(pixel share) normalised to mean 1 (notebook 10); absent classes get the largest present weight."""
    share = torch.bincount(labels.flatten(), minlength=num_classes).double() / labels.numel()
    w = share.clamp_min(1e-12) ** -0.5
    w = torch.where(share > 0, w, w[share > 0].max())
    return (w / w.mean()).float()


def take(tree, idx):
    """Index every tensor of a nested tuple / list / dict along dim 0."""
    if isinstance(tree, Tensor):
        return tree[idx]
    if isinstance(tree, dict):
        return {k: take(v, idx) for k, v in tree.items()}
    return type(tree)(take(v, idx) for v in tree)


def trained_state_dict(model: BackboneHead) -> dict[str, Tensor]:
    """The trained part: everything but the frozen backbone (wherever it is registered), plus the backbone's
    trainable parameters (LoRA); the whole model when every backbone parameter trains (full fine-tuning)."""
    bb = model.backbone
    prefixes = tuple(n + "." for n, m in model.named_modules(remove_duplicate=False) if m is bb)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    full = all(p.requires_grad for p in bb.parameters())
    return {k: v for k, v in model.state_dict().items() if full or k in trainable or not k.startswith(prefixes)}


# ---------------------------------------------------------------------------------------------- training
def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def batch_indices(cfg: FinetuneConfig, step: int) -> Tensor:
    """The training scenes of ``step``: a pure function of (seed, step), so a resumed run draws the same."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, cfg.n_train, (cfg.batch_size,), generator=g)


def _inputs(model: BackboneHead, x: Tensor, dev: torch.device):
    """What head_forward reads: the cached frozen features, or the images themselves."""
    if model.feature_kw is None:
        return x.to(dev)
    return to_device(extract_features(model.backbone, x, batch_size=64, device=dev, **model.feature_kw), dev)


@torch.no_grad()
def evaluate(task, model: BackboneHead, inputs, data: dict, cfg: FinetuneConfig, chunk: int = 64) -> dict:
    """The task's held-out metrics (predictions in chunks, the model in eval mode)."""
    model.eval()
    n = len(data["val"]["x"])
    pred = torch.cat([task.predict(model, take(inputs, slice(i, i + chunk)), cfg).cpu() for i in range(0, n, chunk)])
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in task.score(pred, data, cfg).items()}


def train(cfg: FinetuneConfig, out: str | Path | None = None, log=print, *, device: str = "auto",
          resume: str | Path | None = None, state_path: str | Path | None = None, save_every: int = 0,
          stop_after: int | None = None) -> dict:
    """Train the recipe ``cfg``; return {"model", "history", "evals", "final", "step", "seconds", "trainable"}.

    ``state_path``: the training state (model, optimizer, step, RNG states, history, curves), written every
    ``save_every`` steps, at the end and on SIGTERM / Ctrl-C; ``resume``: such a file (the run then equals an
    uninterrupted one); ``stop_after``: stop (state saved) after this many steps in total. ``out``: written once
    all ``cfg.steps`` are done (:func:`save`)."""
    task = get_task(cfg.task)
    backbone = load_backbone(cfg.backbone)  # a missing weights file fails here, before any work
    dev = pick_device(device)
    data = task.data(cfg)
    torch.manual_seed(cfg.seed)
    model = task.build(cfg, backbone).to(dev)
    inputs = {s: _inputs(model, data[s]["x"], dev) for s in ("train", "val")}
    targets = to_device({k: v for k, v in data["train"].items() if k != "x"}, dev)
    groups = task.param_groups(model, cfg) if hasattr(task, "param_groups") else [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    for g in groups:
        g["base_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in opt.param_groups for p in g["params"]]
    history, evals, start, seconds_before = [], [], 0, 0.0
    if resume is not None:
        st = torch.load(resume, map_location="cpu", weights_only=False)  # our own file; RNG states stay on the CPU
        if st["config"] != asdict(cfg):
            raise ValueError(f"{resume} was written with another configuration; pass the same one to resume")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        _set_rng_state(st["rng"])
        history, evals, start, seconds_before = st["history"], st["evals"], st["step"], st["seconds"]
        log(f"resumed from {resume} at step {start}")
    t0 = time.time()

    def save_state(step: int) -> None:
        if state_path is None:
            return
        st = {"config": asdict(cfg), "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
              "rng": _rng_state(), "history": history, "evals": evals, "seconds": seconds_before + time.time() - t0}
        tmp = Path(str(state_path) + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.save(st, tmp)
        os.replace(tmp, state_path)  # never a half-written state file

    stop = {"flag": False}
    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, lambda *_: stop.update(flag=True)) for s in (signal.SIGTERM, signal.SIGINT)}
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    n_trainable = count_params(model, trainable_only=True)
    log(f"{cfg.task} / {cfg.head} on the {cfg.backbone} backbone ({dev.type}): {n_trainable:,} trainable "
        f"parameters, {cfg.steps} steps of {cfg.batch_size}")
    try:
        for step in range(start, end):
            factor = cosine_lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_factor)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            idx = batch_indices(cfg, step)
            model.train()
            loss = task.loss(model, take(inputs["train"], idx.to(dev)), take(targets, idx.to(dev)), data, cfg, step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            history.append({"step": step, "loss": loss.item()})
            done = step + 1
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                recent = [h["loss"] for h in history[-cfg.log_every:]]
                log(f"step {done:5d}/{cfg.steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"lr {opt.param_groups[0]['lr']:.2e}  ({seconds_before + time.time() - t0:.0f} s)")
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                evals.append({"step": done, **evaluate(task, model, inputs["val"], data, cfg)})
                log("eval " + json.dumps(evals[-1]))
            if save_every and done % save_every == 0:
                save_state(done)
            if stop["flag"]:
                save_state(done)
                log(f"stopped by a signal after step {done}; state saved")
                break
        else:
            save_state(end)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    seconds = seconds_before + time.time() - t0
    model.eval()
    res = {"model": model, "history": history, "evals": evals, "step": len(history), "seconds": seconds,
           "trainable": n_trainable, "final": evals[-1] if len(history) == cfg.steps and evals else None}
    if out is not None and res["final"] is not None:
        save(model, out, cfg, res, dev)
        log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB) and {Path(out).with_suffix('.json')}")
    return res


def save(model: BackboneHead, out: str | Path, cfg: FinetuneConfig, res: dict, dev: torch.device) -> str:
    """The trained part in fp16 (RoPE periods fp32) + a JSON sidecar (recipe, curves, final metrics, sha256)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.half() if v.is_floating_point() and not k.endswith("rope_embed.periods") else v).cpu().contiguous()
          for k, v in trained_state_dict(model).items()}
    torch.save(sd, out)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    meta = {"task": cfg.task, "backbone": cfg.backbone, "head": cfg.head, "config": asdict(cfg),
            "final": {k: v for k, v in res["final"].items() if k != "step"}, "curves": res["evals"],
            "trainable_params": res["trainable"], "saved_tensors": len(sd), "seconds": round(res["seconds"], 1),
            "device": dev.type, "torch": torch.__version__,
            "history": [{"step": h["step"], "loss": round(h["loss"], 5)} for h in res["history"]], "sha256": sha}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return sha


def load(path: str | Path, device=None) -> BackboneHead:
    """Rebuild a model written by :func:`save`: the backbone named in the sidecar plus the saved tensors (checked
    against the sidecar's sha256; every key must fit, only frozen backbone keys may be left out)."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
        raise ValueError(f"{path} does not match the sha256 in {path.with_suffix('.json')}")
    cfg = FinetuneConfig(**meta["config"])
    torch.manual_seed(cfg.seed)
    model = get_task(cfg.task).build(cfg, load_backbone(cfg.backbone))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    frozen = set(model.state_dict()) - set(trained_state_dict(model))
    if unexpected or set(missing) - frozen:
        raise ValueError(f"{path} does not fit the {cfg.task}/{cfg.head} model: unexpected {unexpected}, "
                         f"missing {sorted(set(missing) - frozen)}")
    return model.eval().to(device) if device is not None else model.eval()


@torch.no_grad()
def predict_in_batches(model: nn.Module, x: Tensor, batch_size: int = 64) -> Tensor:
    """``model(x)`` in batches of ``batch_size`` on the model's device, without autograd, gathered on the CPU (the
    notebooks score shipped heads this way on their own validation scenes)."""
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------------------------------------- command line
def default_out(cfg: FinetuneConfig) -> str:
    prefix = TASKS[cfg.task]
    return f"data/{prefix}_{cfg.backbone}.pth" if cfg.head == prefix else f"data/{prefix}_{cfg.head}_{cfg.backbone}.pth"


def main(argv: list[str] | None = None) -> dict:
    heads = ", ".join(f"{t}: {'|'.join(get_task(t).HEADS)}" for t in TASKS)
    ap = argparse.ArgumentParser(
        prog="python -m dinolab.finetune", description="Train a head (or LoRA / the whole backbone) for one "
        "downstream task on ShapesWorld, resumably; write the trained part (fp16) and a JSON sidecar.",
        epilog=f"heads (first = default) - {heads}. Default --out: data/<seg|depth|cls|lora>_<head>_<backbone>.pth; "
               "default --state: runs/<out stem>.state.pt.")
    ap.add_argument("task", help="segmentation | depth | classification | lora")
    ap.add_argument("--backbone", default=None, help="ssl | supervised | random (default ssl)")
    ap.add_argument("--head", default=None, help="see below (default: the task's first)")
    ap.add_argument("--config", default=None, help="a JSON object of FinetuneConfig fields (flags override it)")
    for name, typ in (("steps", int), ("batch_size", int), ("lr", float), ("backbone_lr", float), ("n_train", int),
                      ("n_val", int), ("image_size", int), ("seed", int), ("eval_every", int), ("log_every", int)):
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    ap.add_argument("--no-class-weights", action="store_true", help="plain cross-entropy (segmentation, lora)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--out", default=None, help="trained weights (fp16) + .json sidecar")
    ap.add_argument("--state", default=None, help="training-state file")
    ap.add_argument("--resume", default=None, help="a state file, or 'auto' (--state if it exists)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (state saved) after this many steps in total")
    ap.add_argument("--save-every", type=int, default=50, help="write the state every N steps (0: only at the end)")
    args = ap.parse_args(argv)
    fields_ = json.loads(args.config) if args.config else {}
    given = {k: fields_.pop(k, None) for k in ("task", "backbone", "head")}  # the positional task wins over "task"
    backbone, head = args.backbone or given["backbone"] or "ssl", args.head or given["head"] or ""
    fields_.update({k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__
                    and k not in ("task", "backbone", "head") and v is not None})
    if args.no_class_weights:
        fields_["class_weighted"] = False
    try:
        cfg = FinetuneConfig.for_task(args.task, backbone, head, **fields_)
        backbone_path(cfg.backbone)
        pick_device(args.device)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or default_out(cfg)
    state = args.state or str(Path("runs") / (Path(out).stem + ".state.pt"))  # runs/ is git-ignored
    resume = (state if Path(state).exists() else None) if args.resume == "auto" else args.resume
    return train(cfg, out=out, device=args.device, resume=resume, state_path=state, save_every=args.save_every,
                 stop_after=args.stop_after, log=lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    from dinolab.finetune import main as _main  # the package's module, the one the task files import

    _main()
