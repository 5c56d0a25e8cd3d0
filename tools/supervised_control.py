"""Supervised control: can a network learn the ShapesWorld image label at all, and how fast?

    python tools/supervised_control.py cnn --steps 1500 --max-objects 1 --object-scale 3
    python tools/supervised_control.py vit --steps 1500 --max-objects 1 --object-scale 3 --lr 5e-4

Trains end to end with cross-entropy on the label (the class covering most pixels), batch 32 drawn at
random from the 8,192-image train split, AdamW (weight decay 0.05), and prints the accuracy on 512
validation images five times during the run. ``cnn`` is a small 5-layer conv net (stride-2 3x3 convs,
BatchNorm, ReLU, 32-192 channels, global average pool). ``vit`` is the architecture of the shipped
checkpoint (``dinov3_vittiny16``, LayerScale init 1.0) with a linear head on CLS || mean patch token.
The results are listed in data/README.md; they say how hard the label is before any self-supervision.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinolab import hub, viz  # noqa: E402
from dinolab.data import NUM_CLASSES, ShapesWorld  # noqa: E402


def build(kind: str) -> nn.Module:
    if kind == "cnn":
        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU())
        return nn.Sequential(conv(3, 32), conv(32, 64), conv(64, 128), conv(128, 128), conv(128, 192),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(192, NUM_CLASSES))

    class ViTClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = hub.build("dinov3_vittiny16", layerscale_init=1.0)
            self.head = nn.Linear(2 * self.backbone.embed_dim, NUM_CLASSES)

        def forward(self, x):
            o = self.backbone.forward_features(x)
            return self.head(torch.cat([o["x_norm_clstoken"], o["x_norm_patchtokens"].mean(1)], 1))

    return ViTClassifier()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=("cnn", "vit"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-objects", type=int, default=4)
    ap.add_argument("--object-scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.steps < 5:
        ap.error("--steps must be at least 5 (the accuracy is printed 5 times)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kw = dict(size=128, n_objects=(1, args.max_objects), object_scale=args.object_scale)
    train_set, val = ShapesWorld("train", **kw), ShapesWorld("val", **kw).batch(range(512))
    model = build(args.model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    x_val = viz.normalize(val["image"])
    g, t0 = torch.Generator().manual_seed(0), time.time()
    for step in range(args.steps):
        batch = train_set.batch(torch.randint(0, len(train_set), (32,), generator=g))
        model.train()
        loss = nn.functional.cross_entropy(model(viz.normalize(batch["image"])), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % (args.steps // 5) == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(x_val).argmax(1) == val["label"]).float().mean().item()
            print(f"{args.model} step {step + 1}: train loss {loss.item():.3f}, val accuracy {acc:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    majority = (val["label"] == val["label"].mode().values).float().mean().item()
    print(f"majority class on val: {majority:.3f}")


if __name__ == "__main__":
    main()
