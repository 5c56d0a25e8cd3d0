"""Curves of pretraining runs, from their training-state files, into one small JSON for notebook 05.

    python tools/pilot_curves.py --steps 1500 --out data/prototype_pilots.json \
        learnable=runs/c0/t.state.pt frozen=runs/L1/t.state.pt

Each NAME=STATE pair is a state file written by ``python -m dinolab.pretrain --state ...``. For the first
``--steps`` steps of each run the JSON keeps the mean of every logged number over windows of ``--window`` steps
(DINO loss, entropies of the teacher's targets and the student's predictions, the prototypes' smallest singular
value), the k-NN evaluations, and the run's configuration, so that the notebook can plot them without the state.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

KEYS = ("dino", "ibot", "koleo", "teacher_entropy", "student_entropy", "prototype_sv_min")


def curves(state_path: str, steps: int, window: int) -> dict:
    st = torch.load(state_path, map_location="cpu", weights_only=False)  # our own training state
    hist = [h for h in st["history"] if h["step"] < steps]
    if len(hist) < steps:
        raise ValueError(f"{state_path} holds {len(hist)} steps, fewer than --steps {steps}")
    out = {"config": st["config"], "step": [], **{k: [] for k in KEYS if k in hist[0]}}
    for a in range(0, steps, window):
        chunk = hist[a:a + window]
        out["step"].append(a + len(chunk) // 2)
        for k in KEYS:
            if k in out:
                out[k].append(round(sum(h[k] for h in chunk) / len(chunk), 5))
    if "prototype_sv_min" not in out and st["config"].get("freeze_last_layer_steps") == -1:
        # a run logged before the key existed, with prototypes that never moved: the value is the final one
        w = st["student"]["dino_head.last_layer.weight"].float()
        sv = torch.linalg.svdvals(w / w.norm(dim=1, keepdim=True))[-1].item()
        out["prototype_sv_min"] = [round(sv, 5)] * len(out["step"])
    out["evals"] = [e for e in st["evals"] if e["step"] <= steps]
    out["ln_k"] = math.log(st["config"]["head_out_dim"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="NAME=STATE_FILE")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--window", type=int, default=25)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"expected NAME=STATE_FILE, got {item!r}")
        data[name] = curves(path, args.steps, args.window)
    Path(args.out).write_text(json.dumps(data, indent=0))
    print(f"{args.out}: {', '.join(data)}; {args.steps} steps each")


if __name__ == "__main__":
    main()
