"""How far notebook 15's detector goes with more training steps and more scenes: a small JSON the notebook plots.

    python tools/detection_budget.py --out data/detection_budget.json \
        supervised:4096:250 supervised:4096:1000 supervised:4096:4000 supervised:512:4000 ssl:4096:4000

Each BACKBONE:SCENES:STEPS trains notebook 15's hybrid detector (k = 4; two-stage token queries; width 64, 3 decoder
layers; AdamW lr 1e-3, 20 warm-up steps, cosine; batches of 16; the same window features of blocks [1, 2, 4, 5]) on
the first SCENES training scenes for STEPS steps, then scores it with COCO AP on notebook 15's 128 validation scenes
and on 128 of its own training scenes (the gap between the two is over-fitting). BACKBONE: ``ssl`` (the shipped
self-supervised checkpoint) or ``supervised`` (the supervised control). About 0.07 s a step on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinolab import data, hub  # noqa: E402
from dinolab.detection import (HungarianMatcher, SetCriterion, TinyDETR, average_precision,  # noqa: E402
                               batched_window_features, hybrid_loss, post_process, scene_targets)
from dinolab.train import fit  # noqa: E402
from dinolab.utils import seed_everything  # noqa: E402
from dinolab.weights import TINY_CHECKPOINT, tiny_checkpoint  # noqa: E402

WORLD = dict(size=128, n_objects=(1, 3), object_scale=2.0)  # notebook 15's scenes
LAYERS, N_VAL, BATCH, K_ONE2MANY = [1, 2, 4, 5], 128, 16, 4


def parse_run(text: str) -> tuple[str, int, int]:
    try:
        name, scenes, steps = text.split(":")
        scenes, steps = int(scenes), int(steps)
    except ValueError:
        raise SystemExit(f"a run is BACKBONE:SCENES:STEPS (e.g. supervised:4096:1000), got {text!r}") from None
    if name not in ("ssl", "supervised") or scenes < 16 or steps < 1:
        raise SystemExit(f"{text!r}: BACKBONE is ssl or supervised, SCENES >= 16, STEPS >= 1")
    return name, scenes, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="BACKBONE:SCENES:STEPS")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    runs = [parse_run(r) for r in args.runs]
    torch.set_num_threads(args.threads)
    K = len(data.SHAPES)
    n_max = max(n for _, n, _ in runs)
    train_set = data.ShapesWorld("train", num_samples=n_max, **WORLD).tensors()
    val_set = data.ShapesWorld("val", num_samples=N_VAL, **WORLD).tensors()
    targets_train, truth_val = scene_targets(train_set), scene_targets(val_set, normalized=False)
    truth_train = scene_targets(train_set, normalized=False)[:N_VAL]
    paths = {"ssl": tiny_checkpoint(), "supervised": TINY_CHECKPOINT.with_name("dinov3_tiny_supervised.pth")}
    feats = {}
    for name in sorted({r[0] for r in runs}):
        backbone = hub.dinov3_vittiny16(weights=paths[name]).eval()
        feats[name] = tuple(batched_window_features(backbone, s["image"], LAYERS, n_windows_sqrt=2)
                            for s in (train_set, val_set))
    results = []
    for name, n_train, steps in runs:
        f_train = feats[name][0][:n_train]
        seed_everything(0)
        model = TinyDETR(f_train.shape[1], K, hidden_dim=64, num_queries_one2many=1, dec_layers=3, nheads=4,
                         dim_feedforward=128, two_stage=True)
        criterion = SetCriterion(K, HungarianMatcher(1.0, 5.0, 2.0), eos_coef=0.1)
        g = torch.Generator().manual_seed(0)

        def batch(step):
            idx = torch.randint(0, n_train, (BATCH,), generator=g)
            return {"feats": f_train[idx], "targets": [targets_train[i] for i in idx.tolist()]}

        def loss_fn(m, b):
            return hybrid_loss(criterion, m(b["feats"]), b["targets"], K_ONE2MANY)

        t0 = time.perf_counter()
        hist = fit(model, None, loss_fn, batch, steps=steps, lr=1e-3, weight_decay=1e-4, warmup=20, progress=False,
                   grad_clip=1.0)
        seconds = time.perf_counter() - t0
        model.eval()
        scores = {}
        with torch.no_grad():
            for split, f, truth in (("val", feats[name][1], truth_val), ("train", f_train[:N_VAL], truth_train)):
                s = average_precision(post_process(model(f), (128, 128)), truth, num_classes=K)
                scores[split] = {"ap50": round(s["ap50"], 4), "ap": round(s["ap"], 4)}
        rec = {"backbone": name, "scenes": n_train, "steps": steps, "seconds": round(seconds, 1),
               "loss_last_100": round(sum(hist[-100:]) / len(hist[-100:]), 3), **scores}
        print(json.dumps(rec), flush=True)
        results.append(rec)
    out = {"command": "python tools/detection_budget.py --out " + args.out + " " + " ".join(args.runs),
           "torch": torch.__version__, "threads": args.threads, "runs": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
