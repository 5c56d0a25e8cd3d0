"""Pretrain a tiny DINOv3 on ShapesWorld, on the CPU: ``python -m dinolab.pretrain``.

The recipe is DINOv3's (``dinov3/train/ssl_meta_arch.py``), scaled down so that it runs in minutes:

* student and EMA teacher: the same ViT (patch 16, 4 storage tokens, RoPE), separate DINO and iBOT
  heads; the teacher sees the 2 global crops, the student the 2 global (iBOT-masked) crops and
  ``n_local`` local crops;
* phase 1, ``steps`` iterations: DINO cls loss (local and global terms, weighted 2n/(2n+2) and
  2/(2n+2)), iBOT masked-patch loss and KoLeo (0.1 x 2), Sinkhorn-Knopp centering of the teacher,
  teacher temperature warm-up 0.04 -> 0.07, momentum 0.992 -> 1 (cosine), AdamW with warm-up and
  cosine decay;
* phase 2, ``gram_steps`` iterations: the same losses plus **Gram anchoring**: a frozen copy of the
  teacher taken at the start of the phase (the "Gram teacher") sees undistorted crops at twice the
  resolution; its patch features are resized (bicubic) to the student's grid, and the student's
  patch-similarity (Gram) matrix is pulled toward the Gram teacher's.

It runs unchanged under ``torchrun --nproc_per_node N`` (DistributedDataParallel, gloo on the CPU):
each rank renders its own slice of the data stream, the DINO Sinkhorn-Knopp is computed over the
global batch (all-gather), and the iBOT one per rank (a simplification: ranks mask different
numbers of patches). What is saved is the *teacher* backbone (as in DINO, the teacher is the
better model), in half precision except the RoPE periods: a few MB.

    python -m dinolab.pretrain --out data/dinov3_tiny_shapesworld.pth
    torchrun --nproc_per_node 2 -m dinolab.pretrain --steps 4 --batch-size 8 --out /tmp/t.pth
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import augment, losses, masking, schedules
from .data import Palette, ShapesWorld
from .run_state import _rng_state, _set_rng_state, pick_device, save_checkpoint
from .ssl_meta_arch import (Student, _gram_teacher_targets, _sinkhorn_global, _update_center_global, _world,
                            normalize_prototypes)

__all__ = ["PretrainConfig", "CANONICAL_LOOK", "Student", "export_state", "normalize_prototypes", "pick_device", "save_checkpoint",
           "train", "main"]


@dataclass
class PretrainConfig:
    arch: str = "dinov3_vittiny16"
    image_size: int = 128  # ShapesWorld render size
    min_objects: int = 1  # ShapesWorld scenes hold min_objects..max_objects objects
    max_objects: int = 4
    # Two knobs for experiments (the shipped run keeps both at their defaults): larger objects
    # (ShapesWorld(object_scale=...)) and a wider colour-jitter hue range (official 0.1; 0.5 turns the
    # whole colour wheel), both meant to make shape, not colour, what two crops of one image share.
    object_scale: float = 1.0
    hue: float = 0.1
    # Any other MultiCropAugmentation keyword, e.g. {"color_jitter_p": 0.0, "solarize_p": 0.0}
    # (tools/pretrain_pilot.py uses it to show what colour augmentation does to a short run).
    augment: dict = field(default_factory=dict)
    global_size: int = 96  # 6 x 6 patches
    local_size: int = 48  # 3 x 3 patches
    n_local: int = 4
    batch_size: int = 32  # images per process per step
    steps: int = 400
    gram_steps: int = 100
    lr: float = 1e-3  # AdamW peak, reached after warmup
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    drop_path_rate: float = 0.0
    head_out_dim: int = 256
    head_hidden_dim: int = 256
    head_bottleneck_dim: int = 64
    # Third deviation: a colder teacher (official 0.04 -> 0.07). With a batch of 32 images the
    # differences between samples are small next to 0.04, and Sinkhorn-Knopp then returns almost
    # uniform targets (measured: row entropy 5.4 of ln 256 = 5.55 at 0.04, falling below 4.2 at 0.01).
    teacher_temp: tuple[float, float] = (0.01, 0.03)
    teacher_temp_warmup: int = 300
    momentum: tuple[float, float] = (0.992, 1.0)
    koleo_weight: float = 0.1
    ibot_weight: float = 1.0
    gram_weight: float = 1.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    seed: int = 0
    data_seed: int = 0
    log_every: int = 25
    # Our deviation from DINOv3 for a tiny CPU run: keep the prototypes (last_layer rows) on the unit
    # sphere, as DINO v1/v2's weight-normalised last layer, so logits are cosines in [-1, 1] and the
    # 0.04 teacher temperature sharpens from the first step. With DINOv3's plain Linear and a near-identity
    # network at init (LayerScale 1e-5), the teacher starts uniform and a short run never leaves it.
    norm_last_layer: bool = True
    # Second deviation, same reason: LayerScale starts at 0.1 instead of 1e-5, so that the network
    # sees the image from step 0 (at 1e-5 every CLS token is the same vector for hundreds of steps).
    # Only the initial value of ``ls*.gamma`` changes; the architecture and keys are the official ones.
    layerscale_init: float = 0.1
    # Views that share only the layout: with probability appearance_p (ramped up linearly over the first
    # appearance_warmup steps), an image's second global crop and its odd local crops are cut from a
    # re-render of the same scene with a new appearance (ShapesWorld.batch(..., appearance=...)): new colours
    # and textures for objects, floor and wall. Colour then stops being a cue that two views share.
    appearance_p: float = 0.0
    appearance_warmup: int = 0
    # Stronger still: the student sees the *same* crops as the teacher, cut from the re-render (same boxes, flips and
    # photometric draws, new colours and textures), and its local crops come from the re-render too. Every student
    # view then differs from the teacher's in appearance only or in appearance and geometry; the DINO global loss
    # keeps the diagonal pairs (crop c of the student vs crop c of the teacher are no longer the same image), and
    # the iBOT targets are the teacher's patch tokens at the same positions in the original colours.
    student_appearance: bool = False
    # With student_appearance: the teacher's render is in one fixed, plain appearance (grey flat objects on a grey
    # tiled floor, CANONICAL_LOOK) instead of the scene's own. The teacher's targets then depend on the layout only,
    # from the first step, and the student must predict them from a view in random colours.
    teacher_canonical: bool = False
    # The official recipe keeps the prototypes (both heads' last layers) fixed for the first epoch
    # (``optim.freeze_last_layer_epochs: 1``); here counted in steps, -1 = fixed for the whole run. Without it the
    # tiny run collapses to a uniform output: the prototypes learn a common near-null direction (smallest singular
    # value of the 256 x 64 prototype matrix 0.03, the others 1-3) and the head maps every image into it (99.9 % of
    # the bottleneck's energy), so every logit is ~0 and every softmax uniform (loss = ln K). Fixed random
    # prototypes span the bottleneck space: no such direction exists.
    freeze_last_layer_steps: int = 0
    # How the teacher's logits become targets: "sinkhorn_knopp" (DINOv2/v3: balanced within the batch, which at a
    # batch of 32 spreads 64 crops over 256 prototypes) or "centering" (DINO v1: softmax((t - c) / tau), c an EMA of
    # the batch-mean logits with momentum center_momentum; each target depends on its own crop only).
    centering: str = "sinkhorn_knopp"
    center_momentum: float = 0.9
    eval_every: int = 0  # k-NN curves during training (python -m dinolab.pretrain evaluates on the object split)

    @classmethod
    def from_dict(cls, fields: dict) -> "PretrainConfig":
        """The config of a JSON object (``--config``, a state file, a sidecar's ``config``): lists become the tuples
        the pair-valued fields hold, so that ``asdict`` of the result equals the one the run wrote."""
        return cls(**{k: (tuple(v) if k in ("teacher_temp", "momentum", "mask_ratio") else v) for k, v in fields.items()})


# One plain appearance (PretrainConfig.teacher_canonical): every colour range collapsed to a point, flat textures.
CANONICAL_LOOK = dict(
    palette=Palette(object_hue=(0.0, 0.0), object_sat=(0.0, 0.0), object_val=(0.9, 0.9), background_hue=(0.0, 0.0),
                    floor_sat=(0.0, 0.0), floor_val=(0.45, 0.45), wall_sat=(0.0, 0.0), wall_val=(0.7, 0.7)),
    textures=("flat",), floor_textures=("tiles",), wall_textures=("gradient",))


class _Stop(Exception):
    """Raised inside the loop after SIGTERM / Ctrl-C, once the state is saved."""


def train(cfg: PretrainConfig, out: str | Path | None = None, log=print, *, device: str = "auto",
          resume: str | Path | None = None, state_path: str | Path | None = None, save_every: int = 0,
          stop_after: int | None = None, evaluate=None, init: str | Path | None = None,
          init_state: str | Path | None = None) -> dict:
    """Run both phases; return {"teacher": backbone, "student", "history": [...], "evals", "seconds", "step"}.

    ``state_path``: where the full training state (student, teacher, Gram teacher, optimizer, step, RNGs,
    history) is written every ``save_every`` steps, at the end, and on SIGTERM / Ctrl-C. ``resume``: such a
    file to continue from (the run then equals one that was never interrupted). ``stop_after``: stop (and
    save the state) after this many steps in total, to train in chunks. ``evaluate(teacher_backbone)``: a
    function returning a dict of numbers, called every ``cfg.eval_every`` steps and at the end (curves).
    ``init_state``: a state file of another run whose student, teacher (with heads) and centres this run starts
    from, with a fresh optimizer and this run's own schedules. With ``steps=0`` that is a Gram phase run on its own,
    after a phase-1 run (the official code also runs Gram anchoring as a separate stage that loads a teacher).
    """
    dev = pick_device(device)
    rank, world = _world()
    torch.manual_seed(cfg.seed)  # same init on every rank
    student = Student(cfg)
    if init is not None:  # warm start: a backbone checkpoint (e.g. an earlier shipped teacher); heads start fresh
        from .weights import load_into

        load_into(student.backbone, init)
    if cfg.norm_last_layer:
        normalize_prototypes(student)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.to(dev), teacher.to(dev)
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    total = cfg.steps + cfg.gram_steps
    lr_sched = schedules.cosine_schedule(cfg.lr, cfg.min_lr, total, warmup_steps=min(cfg.warmup_steps, total // 5))
    mom_sched = schedules.cosine_schedule(cfg.momentum[0], cfg.momentum[1], total)
    temp_sched = schedules.linear_warmup_then_constant(cfg.teacher_temp[0], cfg.teacher_temp[1], total,
                                                 min(cfg.teacher_temp_warmup, total // 3))
    aug = augment.MultiCropAugmentation(global_size=cfg.global_size, local_size=cfg.local_size, n_local=cfg.n_local,
                                    **{"hue": cfg.hue, **cfg.augment})
    data = ShapesWorld("train", size=cfg.image_size, n_objects=(cfg.min_objects, cfg.max_objects),
                       num_samples=1 << 30, object_scale=cfg.object_scale, seed=cfg.data_seed)
    # the same scenes (same layout draws) in the plain look, for the teacher
    teacher_data = ShapesWorld("train", size=cfg.image_size, n_objects=(cfg.min_objects, cfg.max_objects),
                               num_samples=1 << 30, object_scale=cfg.object_scale, seed=cfg.data_seed,
                               **CANONICAL_LOOK) if cfg.teacher_canonical else data
    gens = {"crops": torch.Generator().manual_seed(cfg.seed * 1000 + rank),
            "masks": torch.Generator().manual_seed(cfg.seed * 1000 + 500 + rank),
            "views": torch.Generator().manual_seed(cfg.seed * 1000 + 700 + rank)}
    dino_loss, ibot_loss, koleo, gram = losses.DINOLoss(cfg.head_out_dim), losses.iBOTPatchLoss(), losses.KoLeoLoss(), losses.GramLoss(
        apply_norm=True, img_level=True, remove_neg=False)
    n_l = cfg.n_local
    local_scale, global_scale = 2 * n_l / (2 * n_l + 2), 2 / (2 * n_l + 2)
    grid = cfg.global_size // student.backbone.patch_size
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext)
    gram_teacher, history, evals, start, seconds_before = None, [], [], 0, 0.0
    offset, started_from = 0, None  # set by init_state: this run's step 0 is the earlier run's step `offset`
    if cfg.centering not in ("sinkhorn_knopp", "centering"):
        raise ValueError(f"centering must be 'sinkhorn_knopp' or 'centering', got {cfg.centering!r}")
    centers = {"cls": torch.zeros(1, cfg.head_out_dim, device=dev), "patch": torch.zeros(1, cfg.head_out_dim, device=dev)}
    if init_state is not None:
        if resume is not None:
            raise ValueError("init_state starts a new run and resume continues one: pass only one of them")
        st = torch.load(init_state, map_location=dev, weights_only=False)  # our own file: see save_state
        if st["config"]["arch"] != cfg.arch or st["config"]["head_out_dim"] != cfg.head_out_dim:
            raise ValueError(f"{init_state} holds a {st['config']['arch']} with K = {st['config']['head_out_dim']}; "
                             f"this run is a {cfg.arch} with K = {cfg.head_out_dim}")
        student.load_state_dict(st["student"]), teacher.load_state_dict(st["teacher"])
        centers = {k: v.to(dev) for k, v in st.get("centers", centers).items()}
        # the curves and the clock go on from the earlier run; steps are numbered after its last one
        history, evals, seconds_before = list(st["history"]), list(st["evals"]), st["seconds"]
        offset = st["step"] + st.get("step_offset", 0)
        started_from = {"config": st["config"], "step": offset}
        log(f"started from the student, teacher and heads of {init_state} (its step {st['step']})")
    if resume is not None:
        st = torch.load(resume, map_location=dev, weights_only=False)  # our own file: optimizer state, RNGs
        if st["config"] != asdict(cfg):
            raise ValueError(f"{resume} was written with another configuration; pass the same one to resume")
        student.load_state_dict(st["student"]), teacher.load_state_dict(st["teacher"])
        opt.load_state_dict(st["optimizer"])
        if st["gram_teacher"] is not None:
            gram_teacher = copy.deepcopy(teacher.backbone).eval()
            gram_teacher.load_state_dict(st["gram_teacher"])
        _set_rng_state(gens, st["rng"])
        history, evals, start, seconds_before = st["history"], st["evals"], st["step"], st["seconds"]
        offset, started_from = st.get("step_offset", 0), st.get("started_from")
        centers = {k: v.to(dev) for k, v in st.get("centers", centers).items()}
        log(f"resumed from {resume} at step {start}")

    t0 = time.time()

    def save_state(step: int) -> None:
        if state_path is None or rank != 0:
            return
        st = {"config": asdict(cfg), "step": step, "student": student.state_dict(), "teacher": teacher.state_dict(),
              "gram_teacher": None if gram_teacher is None else gram_teacher.state_dict(),
              "optimizer": opt.state_dict(), "rng": _rng_state(gens), "history": history, "evals": evals,
              "centers": centers, "world": world, "step_offset": offset, "started_from": started_from,
              "seconds": seconds_before + time.time() - t0}
        tmp = Path(str(state_path) + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.save(st, tmp)
        os.replace(tmp, state_path)  # never a half-written state file

    def run_eval(step: int) -> None:
        if evaluate is not None and rank == 0:
            r = {"step": offset + step, **evaluate(teacher.backbone)}
            evals.append(r)
            log("eval " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))

    stop = {"flag": False}

    def on_signal(signum, frame):  # finish the step, save, leave
        stop["flag"] = True

    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    student.train()
    teacher.train()  # as the official code: the teacher backbone runs in train mode too (RoPE augmentation)
    end = total if stop_after is None else min(total, stop_after)
    step = start
    if start == 0 and cfg.eval_every:
        run_eval(0)
    try:
        for step in range(start, end):
            if step == cfg.steps and cfg.gram_steps > 0 and gram_teacher is None:  # phase 2: freeze a Gram teacher
                gram_teacher = copy.deepcopy(teacher.backbone).eval()
                if out is not None and rank == 0:  # kept to measure what the Gram phase changes (notebook 05)
                    save_checkpoint(gram_teacher, Path(out).with_name(Path(out).stem + "_phase1.pth"), cfg, history,
                                    seconds_before + time.time() - t0, world, evals,
                                    extra=_provenance(offset + step, started_from))
            for g in opt.param_groups:
                g["lr"] = float(lr_sched[step])
            temp = float(temp_sched[step])
            B = cfg.batch_size
            idx = torch.arange((step * world + rank) * B, (step * world + rank + 1) * B)
            images = teacher_data.batch(idx)["image"]
            second = None
            p_app = cfg.appearance_p * min(1.0, (step + 1) / max(1, cfg.appearance_warmup))
            if p_app > 0:  # a re-render of the same scenes in a new appearance, for some of the images
                new_look = torch.rand(B, generator=gens["views"]) < p_app
                second = data.batch(idx, appearance=torch.where(new_look, idx + 1, 0))["image"]
            if cfg.student_appearance and second is not None:
                same_draws = torch.Generator().set_state(gens["crops"].get_state())
                crops = aug(images, generator=gens["crops"])  # the teacher's views, in the scene's own colours
                s_crops = aug(second, generator=same_draws)  # the same crops of the re-render, for the student
                crops = {"global_crops": crops["global_crops"], "s_global_crops": s_crops["global_crops"],
                         "local_crops": s_crops["local_crops"], "global_boxes": crops["global_boxes"],
                         "global_flips": crops["global_flips"]}
            else:
                crops = aug(images, generator=gens["crops"], second=second)
                crops["s_global_crops"] = crops["global_crops"]
            crops = {k: v.to(dev, non_blocking=True) for k, v in crops.items()}
            masks = masking.make_masks(2 * B, (grid, grid), cfg.mask_probability, cfg.mask_ratio,
                                   generator=gens["masks"]).to(dev)
            with torch.no_grad(), autocast():
                t_out = teacher(crops["global_crops"], None, masks, mask_inputs=False)
            with torch.no_grad():
                t_cls_logits = t_out["global_logits"].float()
                t_patch_logits = t_out["patch_logits"].float()  # the unmasked teacher's tokens at the masked positions
                if cfg.centering == "centering":
                    t_cls_probs = losses.softmax_center_teacher(t_cls_logits, centers["cls"], temp).view(2, B, -1)
                    t_patch_probs = losses.softmax_center_teacher(t_patch_logits, centers["patch"], temp)
                    centers["cls"] = _update_center_global(centers["cls"], t_cls_logits, cfg.center_momentum)
                    if masks.any():
                        centers["patch"] = _update_center_global(centers["patch"], t_patch_logits, cfg.center_momentum)
                else:
                    t_cls_probs = _sinkhorn_global(t_cls_logits, temp).view(2, B, -1)
                    t_patch_probs = losses.sinkhorn_knopp(t_patch_logits, temp) if masks.any() else t_patch_logits
            with autocast():
                s_out = model(crops["s_global_crops"], crops["local_crops"], masks)
            s_global = s_out["global_logits"].float().view(2, B, -1)
            s_local = s_out["local_logits"].float().view(n_l, B, -1)
            l_dino = local_scale * dino_loss(s_local, t_cls_probs) + global_scale * dino_loss(
                s_global, t_cls_probs, ignore_diagonal=not cfg.student_appearance)
            l_ibot = (ibot_loss.forward_masked(s_out["patch_logits"].float(), t_patch_probs, masks) if masks.any()
                      else 0 * l_dino)
            cls = s_out["cls"].float().view(2, B, -1)
            l_koleo = sum(koleo(cls[i]) for i in range(2)) / 2
            loss = l_dino + cfg.ibot_weight * l_ibot + cfg.koleo_weight * 2 * l_koleo
            l_gram = torch.zeros((), device=dev)
            if gram_teacher is not None:
                with torch.no_grad(), autocast():
                    target = _gram_teacher_targets(gram_teacher, images.to(dev), crops["global_boxes"],
                                                   crops["global_flips"], cfg.global_size, grid)
                l_gram = gram(s_out["patches"].float(), target.float())
                loss = loss + cfg.gram_weight * l_gram
            opt.zero_grad(set_to_none=True)
            loss.backward()
            frozen = cfg.freeze_last_layer_steps < 0 or step < cfg.freeze_last_layer_steps
            if frozen:
                for head in (student.dino_head, student.ibot_head):
                    head.last_layer.weight.grad = None  # AdamW skips it: no step, no weight decay
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            opt.step()
            if cfg.norm_last_layer and not frozen:
                normalize_prototypes(student)
            with torch.no_grad():
                schedules.update_ema(teacher, student, float(mom_sched[step]))
            with torch.no_grad():  # uniform collapse shows here first: both entropies -> ln K
                t_ent = -(t_cls_probs * t_cls_probs.clamp_min(1e-12).log()).sum(-1).mean()
                s_logp = F.log_softmax(s_global / dino_loss.student_temp, dim=-1)
                s_ent = -(s_logp.exp() * s_logp).sum(-1).mean()
                w = student.dino_head.last_layer.weight.float()  # a prototype direction near 0 allows the collapse
                sv_min = torch.linalg.svdvals(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))[-1]
            rec = {"step": offset + step, "loss": loss.item(), "dino": l_dino.item(), "ibot": float(l_ibot.detach()),
                   "teacher_entropy": t_ent.item(), "student_entropy": s_ent.item(), "prototype_sv_min": sv_min.item(),
                   "koleo": l_koleo.item(), "gram": l_gram.item(), "lr": float(lr_sched[step]), "teacher_temp": temp,
                   "seconds": seconds_before + time.time() - t0}
            history.append(rec)
            if rank == 0 and (step % cfg.log_every == 0 or step == total - 1):
                log(f"step {offset + step:5d}/{offset + total}  loss {rec['loss']:.3f}  dino {rec['dino']:.3f}  ibot {rec['ibot']:.3f}  "
                    f"koleo {rec['koleo']:.3f}  gram {rec['gram']:.4f}  H(t) {t_ent:.2f}  H(s) {s_ent:.2f}  "
                    f"sv_min {sv_min:.3f}  "
                    f"(ln K {math.log(cfg.head_out_dim):.2f})  ({rec['seconds']:.0f} s)")
            done = step + 1
            if cfg.eval_every and (done % cfg.eval_every == 0) and done < total:
                run_eval(done)
            if save_every and done % save_every == 0:
                save_state(done)
            if stop["flag"]:
                save_state(done)
                log(f"stopped by a signal after step {step}; state saved to {state_path}")
                stopped_at = done
                raise _Stop
        step = end
        if end == total and (not evals or evals[-1]["step"] != total) and cfg.eval_every:
            run_eval(total)
        save_state(end)
    except _Stop:
        step = stopped_at
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    seconds = seconds_before + time.time() - t0
    backbone = teacher.backbone.eval()
    if out is not None and rank == 0 and step == total:
        save_checkpoint(backbone, out, cfg, history, seconds, world, evals, extra=_provenance(offset + step, started_from))
    return {"teacher": backbone, "student": student.backbone, "history": history, "evals": evals,
            "seconds": seconds, "step": step}


def export_state(state_path: str | Path, out: str | Path) -> str:
    """Write the teacher backbone of a paused run (a ``--state`` file) as a checkpoint, without training.

    The sidecar is the one a finished run writes (recipe, loss history, evaluations, ``steps_done``: the
    steps behind the weights, counting those of an ``init_state`` run it started from). Returns the sha256 of the weights.
    """
    state_path = Path(state_path)
    if not state_path.is_file():
        raise FileNotFoundError(f"no training state at {state_path}")
    st = torch.load(state_path, map_location="cpu", weights_only=False)  # our own file: optimizer state, RNGs
    cfg = PretrainConfig.from_dict(st["config"])
    teacher = Student(cfg)
    teacher.load_state_dict(st["teacher"])
    return save_checkpoint(teacher.backbone.eval(), out, cfg, st["history"], st["seconds"], st.get("world", 1),
                           st["evals"], extra=_provenance(st["step"] + st.get("step_offset", 0), st.get("started_from")))


def _provenance(steps_done: int, started_from: dict | None) -> dict:
    """Sidecar fields: the steps behind the weights (over every stage), and the earlier run's recipe if any."""
    return {"steps_done": steps_done, **({"started_from": started_from} if started_from else {})}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = PretrainConfig()
    ap.add_argument("--out", default="data/dinov3_tiny_shapesworld.pth")
    ap.add_argument("--config", default=None, help="a JSON object of PretrainConfig fields (flags override it)")
    for name in ("steps", "gram_steps", "batch_size", "seed", "n_local", "global_size", "local_size", "log_every",
                 "image_size", "head_out_dim", "head_hidden_dim", "head_bottleneck_dim", "warmup_steps",
                 "teacher_temp_warmup", "min_objects", "max_objects", "appearance_warmup", "eval_every",
                 "freeze_last_layer_steps"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("lr", "gram_weight", "koleo_weight", "ibot_weight", "layerscale_init", "object_scale", "hue",
                 "appearance_p"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    ap.add_argument("--state", default=None, help="training-state file, written every --save-every steps and on "
                                                  "SIGTERM / Ctrl-C (default: runs/<OUT stem>.state.pt)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--resume", default=None, help="a state file to continue from ('auto': --state if it exists)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (state saved) after this many steps in total")
    ap.add_argument("--init", default=None, help="start the backbone from this checkpoint (a warm start; heads fresh)")
    ap.add_argument("--init-state", default=None, help="start student, teacher and heads from another run's state "
                    "file (fresh optimizer and schedules; with --steps 0, a Gram phase on its own)")
    ap.add_argument("--export", default=None, metavar="STATE",
                    help="write the teacher of this paused run's state file to --out and stop (no training)")
    args = ap.parse_args(argv)
    if args.export:
        print(f"{args.out}: sha256 {export_state(args.export, args.out)}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if pick_device(args.device).type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    fields = json.loads(args.config) if args.config else {}
    fields.update({k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__ and v is not None})
    cfg = PretrainConfig.from_dict(fields)
    state = args.state or str(Path("runs") / (Path(args.out).stem + ".state.pt"))  # runs/ is git-ignored
    resume = args.resume
    if resume == "auto":
        resume = state if Path(state).exists() else None
    evaluate = None
    if cfg.eval_every:
        from .evaluate import ObjectKNN

        evaluate = ObjectKNN()
    try:
        train(cfg, out=args.out, device=args.device, resume=resume, state_path=state, save_every=args.save_every,
              stop_after=args.stop_after, evaluate=evaluate, init=args.init, init_state=args.init_state, log=lambda *a: print(*a, flush=True))
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
