"""dinolab vs transformers: forward time of ViT-S/16 on the CPU (eval, fp32, batch 8 at 224, SDPA).

Both models hold the same random weights (converted with dinolab.weights), run alternately in this one
process, and we print the median of the per-round time ratios dinolab / transformers. Goal: <= 0.95.

    .venv/bin/python tests/benchmarks/backbone_speed.py [--rounds 9] [--batch 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from dinolab import weights

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                          patch_size=16, num_register_tokens=4, layerscale_value=1e-5,
                          attn_implementation="sdpa")
    peer = DINOv3ViTModel(cfg).eval()
    ours = weights.load_backbone(peer.state_dict(), num_heads=6).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.inference_mode():
        ref = peer(pixel_values=x).last_hidden_state
        o = ours.forward_features(x)
        got = torch.cat([o["x_norm_clstoken"][:, None], o["x_storage_tokens"], o["x_norm_patchtokens"]], 1)
        diff = (got - ref).abs().max().item()
        for _ in range(2):  # warm-up
            peer(pixel_values=x)
            ours(x)
        ratios, t_ours, t_peer = [], [], []
        for r in range(args.rounds):
            order = [("ours", lambda: ours(x)), ("peer", lambda: peer(pixel_values=x))]
            if r % 2:
                order.reverse()
            times = {}
            for name, fn in order:
                t0 = time.perf_counter()
                fn()
                times[name] = time.perf_counter() - t0
            t_ours.append(times["ours"])
            t_peer.append(times["peer"])
            ratios.append(times["ours"] / times["peer"])
    print(f"ViT-S/16, batch {args.batch} at {args.size}, fp32, eval, {args.threads} threads, {args.rounds} rounds")
    print(f"max |dinolab - transformers| = {diff:.2e}")
    print(f"median time: dinolab {statistics.median(t_ours) * 1e3:.1f} ms, "
          f"transformers {statistics.median(t_peer) * 1e3:.1f} ms")
    print(f"median ratio dinolab / transformers = {statistics.median(ratios):.3f} (goal <= 0.95)")


if __name__ == "__main__":
    main()
