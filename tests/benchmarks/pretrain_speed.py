"""Where a pretraining step spends its time, and how close it runs to the machine's matmul rate.

    python tests/benchmarks/pretrain_speed.py [--batch-size 32] [--steps 6] [--threads N] [--config JSON]

Times the stages of one step of ``dinolab.pretrain`` with a ``PretrainConfig`` (default: the shipped recipe,
phase 1): rendering (ShapesWorld, and the re-render when ``appearance_p`` > 0), multi-crop, teacher forward,
student forward + losses, student backward, optimizer + EMA. The model FLOPs of a step are counted with
``torch.utils.flop_counter`` (forward and backward of the student, forward of the teacher); the achieved rate
is compared with a 2048 x 2048 fp32 matmul measured in the same process, so the ratio U does not depend on
what else the machine is doing at the time as much as a raw time would. Last line:

    pretrain: N img/s, X GFLOP/s = U of the fp32 matmul rate
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dinolab import augment, losses, masking, schedules  # noqa: E402
from dinolab.data import ShapesWorld  # noqa: E402
from dinolab.pretrain import PretrainConfig, Student, normalize_prototypes  # noqa: E402


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--config", default="{}", help="PretrainConfig fields as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = json.loads(args.config)
    if args.batch_size:
        fields["batch_size"] = args.batch_size
    cfg = PretrainConfig(**fields)
    B = cfg.batch_size
    torch.manual_seed(0)
    student = Student(cfg)
    normalize_prototypes(student)
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    aug = augment.MultiCropAugmentation(global_size=cfg.global_size, local_size=cfg.local_size, n_local=cfg.n_local,
                                    **{"hue": cfg.hue, **cfg.augment})
    data = ShapesWorld("train", size=cfg.image_size, n_objects=(cfg.min_objects, cfg.max_objects),
                       num_samples=1 << 30, object_scale=cfg.object_scale)
    dino, ibot, koleo = losses.DINOLoss(cfg.head_out_dim), losses.iBOTPatchLoss(), losses.KoLeoLoss()
    grid = cfg.global_size // 16
    g = torch.Generator().manual_seed(0)
    stages = {k: [] for k in ("render", "crops", "teacher", "student fwd + loss", "student bwd", "optim + EMA")}

    def step(i: int, timed: bool, count_flops: bool = False) -> float:
        t = [time.perf_counter()]
        mark = lambda: t.append(time.perf_counter())  # noqa: E731
        idx = torch.arange(i * B, (i + 1) * B)
        images = data.batch(idx)["image"]
        second = data.batch(idx, appearance=idx + 1)["image"] if cfg.appearance_p > 0 else None
        mark()
        crops = aug(images, generator=g, second=second)
        masks = masking.make_masks(2 * B, (grid, grid), cfg.mask_probability, cfg.mask_ratio, generator=g)
        mark()
        fc = FlopCounterMode(display=False) if count_flops else None
        with fc if fc is not None else contextlib.nullcontext():
            with torch.no_grad():
                t_out = teacher(crops["global_crops"], None, masks, mask_inputs=False)
                tp = losses.sinkhorn_knopp(t_out["global_logits"], 0.03).view(2, B, -1)
                tpp = losses.sinkhorn_knopp(t_out["patch_logits"], 0.03)
            mark()
            s = student(crops["global_crops"], crops["local_crops"], masks)
            loss = (dino(s["local_logits"].view(cfg.n_local, B, -1), tp) + dino(s["global_logits"].view(2, B, -1), tp,
                                                                                  ignore_diagonal=True)
                    + ibot.forward_masked(s["patch_logits"], tpp, masks) + koleo(s["cls"][:B]))
            mark()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            mark()
        opt.step()
        normalize_prototypes(student)
        with torch.no_grad():
            schedules.update_ema(teacher, student, 0.996)
        mark()
        if timed:
            for k, a, b in zip(stages, t[:-1], t[1:]):
                stages[k].append(b - a)
        return fc.get_total_flops() if fc is not None else 0.0

    flops = step(0, timed=False, count_flops=True)
    for i in range(1, args.steps + 1):
        step(i, timed=True)
    med = {k: statistics.median(v) for k, v in stages.items()}
    total = sum(med.values())
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, "
          f"{cfg.global_size}/{cfg.local_size} px crops x 2/{cfg.n_local}, appearance_p {cfg.appearance_p}")
    for k, v in med.items():
        print(f"  {k:20s} {v * 1e3:8.1f} ms  {v / total:5.1%}")
    rate = flops / total / 1e9
    print(f"  model FLOPs per step {flops / 1e9:.1f} G; 2048^2 fp32 matmul {peak:.0f} GFLOP/s")
    print(f"pretrain: {B / total:.1f} img/s, {rate:.1f} GFLOP/s = {rate / peak:.2f} of the fp32 matmul rate")


if __name__ == "__main__":
    main()
