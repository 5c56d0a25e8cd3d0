"""Speed check: dinolab.msdeform.ms_deform_attn vs transformers' pure-PyTorch MultiScaleDeformableAttention.

Forward + backward (grads for value, sampling_locations, attention_weights), fp32, CPU, 3 levels (64², 32², 16²),
8 heads, d_head 32, 4 points, queries = all 5376 positions. The two implementations alternate in one process;
the median of the per-repeat time ratios (ours / peer) is printed, plus the max abs differences of the output
and the three gradients.

    HF_HUB_OFFLINE=1 .venv/bin/python tests/benchmarks/msdeform_speed.py [--batch 2] [--repeats 9] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers.models.deformable_detr.modeling_deformable_detr import (  # noqa: E402
    MultiScaleDeformableAttention,
)

from dinolab.msdeform import ms_deform_attn  # noqa: E402

SHAPES = [(64, 64), (32, 32), (16, 16)]
HEADS, D_HEAD, POINTS = 8, 32, 4


def make_inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    L = len(SHAPES)
    value = torch.randn(batch, S, HEADS, D_HEAD, generator=g)
    # reference points = pixel centres of every level (as in the pixel decoder) + a few pixels of offset,
    # so the access pattern is realistic and some samples fall outside the map
    refs = []
    for h, w in SHAPES:
        yy, xx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h) / h, torch.linspace(0.5, w - 0.5, w) / w, indexing="ij")
        refs.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1))
    ref = torch.cat(refs, 0)[None, :, None, None, None, :]  # [1, Lq, 1, 1, 1, 2]
    wh = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32).view(1, 1, 1, L, 1, 2)
    offsets = torch.randn(batch, S, HEADS, L, POINTS, 2, generator=g) * 3.0
    loc = ref + offsets / wh
    attn = torch.randn(batch, S, HEADS, L * POINTS, generator=g).softmax(-1).view(batch, S, HEADS, L, POINTS)
    grad_out = torch.randn(batch, S, HEADS * D_HEAD, generator=g)
    return value, loc, attn, grad_out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    value, loc, attn, grad_out = make_inputs(args.batch)
    shapes_t = torch.tensor(SHAPES, dtype=torch.long)
    level_start = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    peer = MultiScaleDeformableAttention()

    def run_peer(v, l, a):
        return peer(v, shapes_t, SHAPES, level_start, l, a, 64)

    def run_ours(v, l, a):
        return ms_deform_attn(v, shapes_t, l, a, fused=True)  # the optimised path this benchmark justifies

    def step(fn):
        ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
        t0 = time.perf_counter()
        out = fn(*ins)
        out.backward(grad_out)
        dt = time.perf_counter() - t0
        return dt, out.detach(), [t.grad for t in ins]

    load_before = os.getloadavg()[0]
    for _ in range(args.warmup):
        step(run_peer)
        step(run_ours)
    t_peer, t_ours, ratios = [], [], []
    for _ in range(args.repeats):
        tp, out_p, grads_p = step(run_peer)
        to, out_o, grads_o = step(run_ours)
        t_peer.append(tp)
        t_ours.append(to)
        ratios.append(to / tp)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"levels {SHAPES}, heads {HEADS}, d_head {D_HEAD}, points {POINTS}, queries {loc.shape[1]}")
    print(f"peer (transformers grid_sample) fwd+bwd median: {statistics.median(t_peer) * 1e3:8.1f} ms")
    print(f"ours (dinolab fused=True)      fwd+bwd median: {statistics.median(t_ours) * 1e3:8.1f} ms")
    print(f"median ratio ours/peer over {args.repeats} repeats: {statistics.median(ratios):.3f}")
    print(f"ratio of best times (min ours / min peer):   {min(t_ours) / min(t_peer):.3f}")
    load = max(load_before, os.getloadavg()[0])
    print(f"1-min load average during the run: {load:.2f} on {os.cpu_count()} CPUs")
    if load > 0.5 * (os.cpu_count() or 1):
        print("WARNING: the machine is busy. Under CPU oversubscription every multi-threaded op waits for a "
              "descheduled thread at its barrier, which penalises the implementation with more (smaller) ops; "
              "rerun on an idle machine (or with fewer threads) for a meaningful ratio.")
    names = ["output", "grad value", "grad sampling_locations", "grad attention_weights"]
    for name, a, b in zip(names, [out_o, *grads_o], [out_p, *grads_p]):
        print(f"max abs diff {name:24s}: {(a - b).abs().max().item():.3e}   (max |peer| {b.abs().max().item():.3e})")


if __name__ == "__main__":
    main()
