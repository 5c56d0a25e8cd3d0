"""Short pretraining pilots: what does a run learn, and do its DINO targets carry a signal?

    python tools/pretrain_pilot.py '{"steps": 300, "gram_steps": 0}'
    python tools/pretrain_pilot.py '{"steps": 300, "gram_steps": 0, "augment": {"color_jitter_p": 0.0}}'

The JSON argument holds ``dinolab.pretrain.PretrainConfig`` fields. The script trains (nothing is saved
unless ``--out`` is given) and prints two things:

* every ``--every`` steps, averaged over those steps, four readings of the DINO global-crop loss:
  the entropy of the teacher's Sinkhorn-Knopp targets and of the student's predictions (ln K is
  uniform), how often the teacher picks the same prototype (argmax) for the two global crops of one
  image, and how often the student's argmax on crop 1 matches the teacher's on crop 2. If the teacher
  does not agree with itself across two views, the student has nothing to learn and drifts to a uniform
  output, the DINO loss stays at ln K;
* before and after: k-NN accuracy (k = 20, cosine, frozen CLS, 1,024 train / 512 val images drawn
  like the pretraining data) for the image label and for the scene's nuisance factors
  (``ShapesWorld.scene_attributes``: floor hue in 6 bins, floor and wall texture, objects placed),
  for the random-init backbone and the final teacher.

Numbers from these pilots are in data/README.md. Each run takes about 1.1 s per step on 2 idle cores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinolab import losses  # noqa: E402
from dinolab.data import ShapesWorld  # noqa: E402
from dinolab.linear import knn_accuracy  # noqa: E402
from dinolab.pretrain import PretrainConfig, Student, train  # noqa: E402
from dinolab.train import extract_features  # noqa: E402


def entropy(p: torch.Tensor) -> float:
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()


class TargetMonitor:
    """Wraps ``DINOLoss.forward`` to record the global-crop call (the one with ``ignore_diagonal``)."""

    def __init__(self, every: int, log):
        self.rows, self.every, self.log = [], every, log
        self._orig = losses.DINOLoss.forward

    def __enter__(self):
        monitor = self

        def forward(loss_self, student_logits, teacher_probs, ignore_diagonal=False):
            if ignore_diagonal:
                q = F.softmax(student_logits.detach().float() / loss_self.student_temp, -1)
                p = teacher_probs
                monitor.record(entropy(p), entropy(q), (p[0].argmax(-1) == p[1].argmax(-1)).float().mean().item(),
                               (q[0].argmax(-1) == p[1].argmax(-1)).float().mean().item())
            return monitor._orig(loss_self, student_logits, teacher_probs, ignore_diagonal)

        losses.DINOLoss.forward = forward
        return self

    def __exit__(self, *exc):
        losses.DINOLoss.forward = self._orig

    def record(self, *row):
        self.rows.append(row)
        if len(self.rows) % self.every == 0:
            m = torch.tensor(self.rows[-self.every:]).mean(0).tolist()
            self.log(f"steps {len(self.rows) - self.every}-{len(self.rows) - 1}: teacher target entropy {m[0]:.2f}, "
                     f"student entropy {m[1]:.2f}, teacher agrees with itself across 2 crops {m[2]:.2f}, "
                     f"student (crop 1) agrees with teacher (crop 2) {m[3]:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="{}", help="PretrainConfig fields as JSON")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--out", default=None, help="also save the teacher here (and the sidecar JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(**json.loads(args.config))
    print(cfg, flush=True)
    kw = dict(size=cfg.image_size, n_objects=(1, cfg.max_objects), object_scale=cfg.object_scale)
    data = {}
    for split, n in (("train", 1024), ("val", 512)):
        ds = ShapesWorld(split, **kw)
        a, b = ds.scene_attributes(range(n)), ds.batch(range(n))
        data[split] = (b["image"], {
            "label": b["label"], "floor hue (6 bins)": (a["floor_hue"] * 6).long().clamp(max=5),
            "floor texture": a["floor_texture"], "wall texture": a["wall_texture"], "objects placed": a["n_objects"]})

    def knn(model) -> dict:
        f = {s: extract_features(model, x, layers=1, batch_size=256, normalize=True)[0][1] for s, (x, _) in data.items()}
        return {k: round(knn_accuracy(f["train"], data["train"][1][k], f["val"], data["val"][1][k], k=20, T=0.07), 3)
                for k in data["train"][1]}

    torch.manual_seed(cfg.seed)  # the same initial backbone as train() builds
    print("k-NN, random init:", knn(Student(cfg).backbone), flush=True)
    with TargetMonitor(args.every, lambda s: print(s, flush=True)):
        out = train(cfg, out=args.out, log=lambda *a: None)
    print("k-NN, teacher after training:", knn(out["teacher"]), flush=True)
    h = out["history"]
    print(f"DINO loss: first 10 steps {sum(r['dino'] for r in h[:10]) / 10:.3f}, last 10 steps "
          f"{sum(r['dino'] for r in h[-10:]) / 10:.3f} (uniform = ln {cfg.head_out_dim} = "
          f"{torch.tensor(float(cfg.head_out_dim)).log():.3f}); {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
