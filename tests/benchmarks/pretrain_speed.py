"""Where a pretraining step spends its time, and how close it runs to the machine's matmul rate.

    python tests/benchmarks/pretrain_speed.py [--batch-size 32] [--steps 6] [--threads N] [--config JSON]
                                              [--sidecar data/dinov3_tiny_shapesworld.json] [--prefetch]

Times the stages of one step of ``dinolab.pretrain`` with a ``PretrainConfig`` (default: the shipped recipe,
phase 1): rendering (ShapesWorld, and the re-render when ``appearance_p`` > 0), multi-crop, teacher forward,
student forward + losses, student backward, optimizer + EMA. The model FLOPs of a step are counted with
``torch.utils.flop_counter`` (forward and backward of the student, forward of the teacher); the achieved rate
is compared with a 2048 x 2048 fp32 matmul measured in the same process, so the ratio U does not depend on
what else the machine is doing at the time as much as a raw time would. Last line:

    pretrain: N img/s, X GFLOP/s = U of the fp32 matmul rate

``--sidecar``: time the recipe a shipped checkpoint was trained with (its phase-1 configuration). The line before
the last splits the step's time between the matrix products (``aten::mm``, ``addmm``, ``bmm`` and the attention
kernel, measured by ``torch.profiler`` over the timed steps) and everything else, with the rate the products alone
reach: U can be no larger than that rate times their share of the step, whatever the rest costs.

``--prefetch``: would a data-loader worker help, rendering and cropping the next batch in a second process while the
model trains on this one? It pays only if the model leaves a core idle. Measured after the above: the model's part of
the step (teacher, student forward + backward, optimizer, EMA) on one batch made beforehand, alone and with a worker
process (1 thread) rendering and cropping beside it, and alone with one thread fewer. The overlapped step would take
the longer of the model's part beside the worker and the worker's time per batch. Its line:

    prefetch: overlapped / sequential step = R   (below 1: a worker helps)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import multiprocessing as mp
import os
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
    ap.add_argument("--sidecar", default=None, help="a checkpoint's JSON sidecar: time its (phase-1) recipe")
    ap.add_argument("--prefetch", action="store_true", help="also measure a data-loader worker process (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {}
    if args.sidecar:
        side = json.loads(Path(args.sidecar).read_text())
        fields = dict((side.get("started_from") or side)["config"])
        fields.update(steps=1000, gram_steps=0, eval_every=0)
    fields.update(json.loads(args.config))
    if args.batch_size:
        fields["batch_size"] = args.batch_size
    cfg = PretrainConfig.from_dict(fields)
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
    center = torch.zeros(1, cfg.head_out_dim)
    stages = {k: [] for k in ("render", "crops", "teacher", "student fwd + loss", "student bwd", "optim + EMA")}

    def make_batch(i: int):
        idx = torch.arange(i * B, (i + 1) * B)
        images = data.batch(idx)["image"]
        second = data.batch(idx, appearance=idx + 1)["image"] if cfg.appearance_p > 0 else None
        return images, second

    def make_crops(images, second):
        crops = aug(images, generator=g, second=second)
        return crops, masking.make_masks(2 * B, (grid, grid), cfg.mask_probability, cfg.mask_ratio, generator=g)

    def step(i: int, timed: bool, count_flops: bool = False, fixed=None) -> float:
        """One step; its stage times go to ``stages`` when ``timed``. ``fixed``: reuse these crops and masks (the
        model's part alone: the render and crop stages then take no time)."""
        t = [time.perf_counter()]
        mark = lambda: t.append(time.perf_counter())  # noqa: E731
        images, second = make_batch(i) if fixed is None else (None, None)
        mark()
        crops, masks = make_crops(images, second) if fixed is None else fixed
        mark()
        fc = FlopCounterMode(display=False) if count_flops else None
        with fc if fc is not None else contextlib.nullcontext():
            with torch.no_grad():
                t_out = teacher(crops["global_crops"], None, masks, mask_inputs=False)
                if cfg.centering == "centering":
                    tp = losses.softmax_center_teacher(t_out["global_logits"], center, 0.04).view(2, B, -1)
                    tpp = losses.softmax_center_teacher(t_out["patch_logits"], center, 0.04)
                else:
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
    step(1, timed=False)
    matmul_ops = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(2, args.steps + 2):
            step(i, timed=True)
    matmul_s = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in matmul_ops) / 1e6 / args.steps
    med = {k: statistics.median(v) for k, v in stages.items()}
    total = sum(med.values())
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, "
          f"{cfg.global_size}/{cfg.local_size} px crops x 2/{cfg.n_local}, appearance_p {cfg.appearance_p}")
    for k, v in med.items():
        print(f"  {k:20s} {v * 1e3:8.1f} ms  {v / total:5.1%}")
    rate = flops / total / 1e9
    mm_rate = flops / matmul_s / 1e9  # the step's FLOPs are (almost all) in these products
    print(f"  matrix products {matmul_s / total:.0%} of the step at {mm_rate:.0f} GFLOP/s = {mm_rate / peak:.2f} of the "
          f"fp32 matmul rate; everything else {1 - matmul_s / total:.0%} (U would be {mm_rate / peak:.2f} if it took no time)")
    print(f"  model FLOPs per step {flops / 1e9:.1f} G; 2048^2 fp32 matmul {peak:.0f} GFLOP/s")
    print(f"pretrain: {B / total:.1f} img/s, {rate:.1f} GFLOP/s = {rate / peak:.2f} of the fp32 matmul rate")
    if args.prefetch:
        prefetch(cfg, lambda fixed: median_step(step, stages, args.steps, fixed), make_batch, make_crops, total)


def median_step(step, stages, n: int, fixed) -> float:
    """Median seconds of ``n`` steps on the ``fixed`` batch (after one warm-up step)."""
    step(0, timed=False, fixed=fixed)
    for v in stages.values():
        v.clear()
    for i in range(n):
        step(i, timed=True, fixed=fixed)
    return statistics.median(sum(v) for v in zip(*stages.values()))


def _worker(make_batch, make_crops, stop, counter) -> None:
    torch.set_num_threads(1)
    i = 0
    while not stop.is_set():
        make_crops(*make_batch(i))
        i += 1
        with counter.get_lock():
            counter.value += 1


def prefetch(cfg, model_step, make_batch, make_crops, sequential: float) -> None:
    """Time the model's part of the step alone, beside a worker process that renders and crops, and with one
    thread fewer; print what the overlapped step would cost against the sequential one."""
    threads = torch.get_num_threads()
    fixed = make_crops(*make_batch(0))
    alone = model_step(fixed)
    ctx = mp.get_context("fork")
    stop, counter = ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=_worker, args=(make_batch, make_crops, stop, counter))
    proc.start()
    try:
        time.sleep(2.0)  # the worker is up and running
        c0, t0 = counter.value, time.perf_counter()
        beside = model_step(fixed)
        rate = (counter.value - c0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        proc.join()
    torch.set_num_threads(max(1, threads - 1))
    fewer = model_step(fixed)
    torch.set_num_threads(threads)
    overlapped = max(beside, 1 / max(rate, 1e-9))
    print(f"prefetch ({os.cpu_count()} cores; the model on {threads} threads):")
    print(f"  whole step in sequence       {sequential * 1e3:7.0f} ms")
    print(f"  model part alone             {alone * 1e3:7.0f} ms")
    print(f"  model part, worker beside    {beside * 1e3:7.0f} ms ({beside / alone:.1f}x alone); the worker makes "
          f"{rate:.1f} batches/s ({1e3 / max(rate, 1e-9):.0f} ms each)")
    print(f"  model part, {max(1, threads - 1)} thread(s)         {fewer * 1e3:7.0f} ms ({fewer / alone:.1f}x alone)")
    print(f"prefetch: overlapped / sequential step = {overlapped / sequential:.2f}")


if __name__ == "__main__":
    main()
