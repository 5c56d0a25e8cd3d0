"""What a notebook's live run measures when it is given more: execute it with ``SCALE = s`` and keep its RESULT line.

    python tools/scale_budget.py 14 --scales 1 4 16 --out data/mask2former_scale_budget.json

Every downstream notebook sets ``SCALE = 1`` in its set-up cell: the number of training scenes and steps of its live
run is a multiple of it (the notebook says which). This script runs the notebook's source top to bottom, as
``tools/build_notebooks.py`` does, once per scale, with only that line changed, and writes the ``RESULT {...}`` line
of each run and its wall time to a small JSON that the notebook can plot. Nothing is written to notebooks/. A run
fails loudly if the notebook fails at that scale (an assert, a timeout).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_notebooks as bn  # noqa: E402

SCALE_LINE = re.compile(r"^SCALE = 1\b", re.M)


def run(src: Path, scale: int, timeout: int) -> tuple[dict, float]:
    text = src.read_text()
    if len(SCALE_LINE.findall(text)) != 1:
        raise SystemExit(f"{src.name}: expected exactly one line starting 'SCALE = 1'")
    nb = bn.parse(SCALE_LINE.sub(f"SCALE = {scale}", text), src.name)
    seconds = bn.execute(nb, timeout)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            for line in out.get("text", "").splitlines():
                if line.startswith("RESULT "):
                    return json.loads(line[len("RESULT "):]), seconds
    raise SystemExit(f"{src.name} at SCALE = {scale} printed no RESULT line")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", help="the number of the notebook, e.g. 14")
    ap.add_argument("--scales", type=int, nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = ap.parse_args()
    srcs = sorted(bn.SRC.glob(f"{args.notebook}_*.py"))
    if len(srcs) != 1:
        raise SystemExit(f"no single notebook source matches {args.notebook!r}: {[s.name for s in srcs]}")
    if any(s < 1 for s in args.scales):
        raise SystemExit("scales are whole numbers >= 1")
    runs = []
    for s in args.scales:
        result, seconds = run(srcs[0], s, args.timeout)
        runs.append({"scale": s, "seconds": round(seconds, 1), "result": result})
        print(json.dumps(runs[-1]), flush=True)
    import torch

    Path(args.out).write_text(json.dumps({"command": f"python tools/scale_budget.py {args.notebook} --scales "
                                          + " ".join(map(str, args.scales)) + f" --out {args.out}",
                                          "notebook": srcs[0].stem, "torch": torch.__version__, "runs": runs},
                                         indent=1) + "\n")


if __name__ == "__main__":
    main()
