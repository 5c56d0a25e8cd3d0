"""Speed check: ShapesWorld images per second (not a test).

Renders ``--n`` images with ``ds.batch`` (the vectorised path), ``--repeats`` times, and prints
the best and median throughput: with ``threads=1`` (the default: one core) and with torch's
default thread count (``threads=None``). It also times the per-index ``ds[i]`` path, which
DataLoader-style code uses. Wall-clock time; the CPU time of the one-thread run is printed
too, because on a shared machine it says more than the wall clock.

    .venv/bin/python tests/benchmarks/data_speed.py [--size 128] [--n 1024] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinolab.data import ShapesWorld


def throughput(ds: ShapesWorld, n: int, repeats: int) -> tuple[list[float], list[float]]:
    ds.batch(range(min(n, 64)))  # warm-up
    wall, cpu = [], []
    for r in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        ds.batch(range(r * n % len(ds), r * n % len(ds) + n))
        wall.append(n / (time.perf_counter() - t))
        cpu.append(n / (time.process_time() - c))
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--domain", default="source")
    args = ap.parse_args()
    kw = dict(split="train", size=args.size, domain=args.domain, num_samples=max(8192, args.n * args.repeats))
    print(f"{ShapesWorld(**kw)}\ntorch {torch.__version__}, default threads {torch.get_num_threads()}")

    for threads in (1, None):
        ds = ShapesWorld(**kw, threads=threads)
        wall, cpu = throughput(ds, args.n, args.repeats)
        name = "1 thread" if threads == 1 else f"{torch.get_num_threads()} threads"
        line = f"batch, {name}: {max(wall):7.0f} img/s best, {statistics.median(wall):7.0f} median (wall)"
        if threads == 1:
            line += f"; {max(cpu):7.0f} best, {statistics.median(cpu):7.0f} median (CPU time)"
        print(line)

    ds = ShapesWorld(**kw)
    m = 128
    t = time.perf_counter()
    for i in range(m):
        ds[i]
    print(f"ds[i], 1 thread: {m / (time.perf_counter() - t):7.0f} img/s")


if __name__ == "__main__":
    main()
