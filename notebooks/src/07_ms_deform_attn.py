# %% [markdown] slide
# # 07 · Multi-scale deformable attention
#
# DINOv3's dense-prediction stack mixes its feature maps with **multi-scale deformable attention**
# (`MSDeformAttn`, Zhu et al., *Deformable DETR*, 2021): the adapter's extractors use it to let the
# convolutional SPM tokens read the ViT (notebook 08), and the Mask2Former pixel decoder runs six layers of it
# over a 3-level pyramid (notebook 09). Instead of comparing a query with *every* key, each query **predicts a
# few places to look** — $P$ points per head and per level, around its own reference point — reads the value
# map there by bilinear interpolation, and averages the samples with weights it also predicts.

# %% [markdown] notes
# You will build it from the bottom up:
#
# 1. **bilinear sampling** by hand (4 neighbours, 4 weights), checked against `F.grid_sample`;
# 2. **single-scale** deformable attention: one query, $P$ learned points, a softmax over the points;
# 3. **multi-scale, multi-head**: $L$ levels, a softmax over $L \cdot P$, heads; checked against a brute-force
#    loop, `dinolab.msdeform`, and transformers' pure-PyTorch reference;
# 4. the **official initialisation** (points on a ring of head directions, uniform weights), drawn;
# 5. **watching it learn**: sampling points on the levels of a real photo, before and after training;
# 6. the **cost** against dense attention (FLOPs, memory, time) and the blog post's two **fusion styles**
#    (deformable attention vs FPN upsample + conv) compared in numbers.
#
# Facts about the official module come from `dinov3/eval/segmentation/models/utils/ms_deform_attn.py`.
# Expected run time: about 30 s on 2 CPU cores.

# %% skip
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("07")))

# %% skip
import os

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(k, v)

import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import DeformableDetrConfig
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrMultiscaleDeformableAttention,
    MultiScaleDeformableAttention,
)

from dinolab.adapter import get_reference_points
from dinolab.msdeform import MSDeformAttn, ms_deform_attn
from dinolab.pixel_decoder import DINOV3_M2F_CONFIG, MSDeformAttnPixelDecoder
from dinolab.seg_heads import FPNSegHead
from dinolab.trace import trace
from dinolab.utils import count_params, get_device, seed_everything

seed_everything(0)
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
SCALE = 1  # a reader with a GPU can raise this: more training steps in section 5
viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
torch.set_printoptions(precision=4, sci_mode=False)
print("device type:", DEVICE.type)

# %% [markdown] slide
# ## 1. Bilinear sampling by hand
#
# Deformable attention reads a feature map at **fractional** positions. The convention (official
# `ms_deform_attn_core_pytorch`, transformers' `MultiScaleDeformableAttention`, `dinolab.msdeform`) is that of
# `F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)`:
#
# * a location is $(x, y) \in [0, 1]^2$, $x$ along the width; $(0, 0)$ is the **top-left corner** of the map
#   and $(1, 1)$ the bottom-right corner (not pixel centres);
# * pixel $i$ covers $[i/W, (i+1)/W]$, so its **centre** is at $(i + 0.5)/W$;
# * in pixel units the point is at $p_x = xW - 0.5$, $p_y = yH - 0.5$ (pixel centres at integers). Its four
#   neighbours are $x_0 = \lfloor p_x \rfloor$, $x_1 = x_0 + 1$ (same for $y$), with fractions
#   $f_x = p_x - x_0$, $f_y = p_y - y_0$ and weights
#
# $$w_{00} = (1-f_x)(1-f_y),\quad w_{01} = f_x(1-f_y),\quad w_{10} = (1-f_x)f_y,\quad w_{11} = f_x f_y,$$
#
# * a neighbour outside the map contributes **zero** (`padding_mode="zeros"`), so a point near the border
#   reads a darker value and a point far outside reads exactly 0.
#
# One point, written out:

# %% skip
def bilinear_one(vmap, x, y, verbose=False):
    """vmap [C, H, W]; (x, y) floats in normalised [0, 1] coordinates -> [C]; zero outside the map."""
    C, H, W = vmap.shape
    px, py = x * W - 0.5, y * H - 0.5  # pixel units, centres at integers
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(C, dtype=vmap.dtype)
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            inside = 0 <= yy < H and 0 <= xx < W
            if verbose:
                print(f"  neighbour (row {yy:2d}, col {xx:2d})  weight {wy * wx:.4f}  "
                      f"{'value ' + format(vmap[0, yy, xx].item(), '.1f') if inside else 'outside -> 0'}")
            if inside:
                out += wy * wx * vmap[:, yy, xx]
    return out


H, W = 4, 5
vmap = torch.arange(H * W, dtype=torch.float64).view(1, H, W) + 1.0  # pixel (i, j) holds 5i + j + 1
x, y = 0.43, 0.30
print(f"map {tuple(vmap.shape)} (C, H, W); point (x, y) = ({x}, {y}) -> pixel units "
      f"({x * W - 0.5:.2f}, {y * H - 0.5:.2f})")
v = bilinear_one(vmap, x, y, verbose=True)
print(f"bilinear value: {v.item():.4f}")

# %% [markdown] slide
# The same for many points at once, vectorised: gather the four neighbours, weight them, zero those outside.
# `F.grid_sample` wants a grid in $[-1, 1]$, hence `2 * loc - 1`. We test points well outside the map too.

# %% hide-input
def bilinear_sample(vmap, loc):
    """vmap [C, H, W]; loc [N, 2] (x, y) in [0, 1] -> [N, C]. Bilinear, zero padding, align_corners=False."""
    C, H, W = vmap.shape
    px, py = loc[:, 0] * W - 0.5, loc[:, 1] * H - 0.5
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    out = vmap.new_zeros(loc.shape[0], C)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = (x0 + dx).long(), (y0 + dy).long()
        inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        corner = vmap[:, yi.clamp(0, H - 1), xi.clamp(0, W - 1)].T  # [N, C]
        out += (w * inside)[:, None] * corner
    return out


g = torch.Generator().manual_seed(0)
vmap_r = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
loc = torch.rand(500, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3  # [-0.3, 1.3]: many points outside
ours = bilinear_sample(vmap_r, loc)
ref = F.grid_sample(vmap_r[None], (2 * loc - 1).view(1, 1, -1, 2), mode="bilinear", padding_mode="zeros",
                    align_corners=False)[0, :, 0].T
print("vmap", tuple(vmap_r.shape), " loc", tuple(loc.shape), " -> samples", tuple(ours.shape))
torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
torch.testing.assert_close(bilinear_one(vmap_r, *loc[7].tolist()), ours[7])
print("by hand == F.grid_sample(align_corners=False, padding_mode='zeros'), 500 points, float64  (assert passed)")

centres = torch.tensor([[(j + 0.5) / W, (i + 0.5) / H] for i in range(H) for j in range(W)], dtype=torch.float64)
torch.testing.assert_close(bilinear_sample(vmap, centres)[:, 0], vmap.flatten())
corner = bilinear_sample(vmap, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.5]], dtype=torch.float64))[:, 0]
print("pixel centres read their pixel exactly (assert passed); corner (0,0) reads",
      f"{corner[0].item():.2f} = pixel(0,0)/4, corner (1,1) reads {corner[1].item():.2f} = pixel(3,4)/4,",
      f"(2, 0.5) reads {corner[2].item():.1f}")
assert corner.tolist() == [0.25, 20 / 4, 0.0]

# %% slide hide-input
fig, ax = plt.subplots(figsize=(10.4, 6.2))
ax.imshow(vmap[0].numpy(), cmap="Greys", alpha=0.35, extent=(0, 1, 1, 0), aspect=H / W)
for i in range(H):
    for j in range(W):
        ax.plot((j + 0.5) / W, (i + 0.5) / H, ".", color="gray")
        ax.text((j + 0.5) / W, (i + 0.5) / H + 0.05, f"{vmap[0, i, j]:.0f}", ha="center", fontsize=10, color="gray")
px, py = x * W - 0.5, y * H - 0.5
x0, y0 = math.floor(px), math.floor(py)
fx, fy = px - x0, py - y0
for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
        cx, cy = (x0 + dx + 0.5) / W, (y0 + dy + 0.5) / H
        ax.plot([x, cx], [y, cy], "-", color="tab:blue", lw=0.8)
        ax.plot(cx, cy, "o", color="tab:blue", ms=4 + 14 * wx * wy)
        ax.text(cx + (0.03 if dx else -0.03), cy + (0.07 if dy else -0.04), f"w={wx * wy:.2f}", color="tab:blue",
                fontsize=11, ha="left" if dx else "right")
ax.plot(x, y, "*", color="tab:red", ms=12)
ax.annotate(f"(x, y) = ({x}, {y})\nvalue = {v.item():.2f}", (x, y), xytext=(0.62, 0.55), color="tab:red",
            fontsize=11, arrowprops=dict(arrowstyle="->", color="tab:red", lw=0.8))
ax.plot(0, 0, "s", color="k", ms=5, clip_on=False)
ax.annotate("(0, 0) = top-left corner", (0, 0), xytext=(0.02, 0.235), fontsize=11,
            arrowprops=dict(arrowstyle="->", lw=0.8))
ax.set(xlim=(0, 1), ylim=(1, 0), xlabel="x (normalised)", ylabel="y (normalised)")
ax.set_title(f"Bilinear sampling of a {H}×{W} map\npixel (i, j) has its centre at ((j+0.5)/W, (i+0.5)/H)",
             fontsize=13)
fig.tight_layout()
plt.show()

# %% [markdown] slide
# ## 2. Single-scale deformable attention
#
# Dense attention compares the query with every key: $\mathrm{out}(q) = \sum_{k} \mathrm{softmax}_k(q \cdot k)\,
# v_k$ over all $HW$ positions. Deformable attention keeps only $P$ terms, and **where** they are and **how
# much** each counts are both predicted from the query by linear layers:
#
# $$\mathrm{out}(q) = \sum_{p=1}^{P} a_{p}(q)\; v\big(r_q + \Delta_{p}(q)\big), \qquad
# a(q) = \mathrm{softmax}_p\big(W_a q\big),\quad \Delta(q) = W_o q \ \text{(in pixels)},$$
#
# where $r_q$ is the query's **reference point** (usually its own position) and $v(\cdot)$ is bilinear sampling of
# the value map. There are no keys at all: the weights do not come from a query–key similarity.
# We build it for a 6×7 map with $C = 8$ channels, 5 queries and $P = 4$ points.

# %% hide-input
seed_everything(0)
C, H, W, P, Lq = 8, 6, 7, 4, 5
value_map = torch.randn(C, H, W, dtype=torch.float64)
ref_pts = torch.rand(Lq, 2, dtype=torch.float64)  # reference points (x, y) in [0, 1]
query = torch.randn(Lq, C, dtype=torch.float64)
to_offsets = nn.Linear(C, P * 2).double()  # the sampling_offsets layer
to_logits = nn.Linear(C, P).double()  # the attention_weights layer
print("value map ", tuple(value_map.shape), "(C, H, W);  queries", tuple(query.shape), " reference points",
      tuple(ref_pts.shape))

offsets = to_offsets(query).view(Lq, P, 2)
print("offsets   ", tuple(offsets.shape), "(Lq, P, 2): in pixels of the map, (dx, dy)")
weights = to_logits(query).softmax(-1)
print("weights   ", tuple(weights.shape), "(Lq, P): softmax over the P points, rows sum to 1:",
      torch.allclose(weights.sum(-1), torch.ones(Lq, dtype=torch.float64)))
locations = ref_pts[:, None, :] + offsets / torch.tensor([W, H], dtype=torch.float64)
print("locations ", tuple(locations.shape), "(Lq, P, 2): reference + offsets / (W, H), normalised")
samples = bilinear_sample(value_map, locations.reshape(-1, 2)).view(Lq, P, C)
print("samples   ", tuple(samples.shape), "(Lq, P, C): the value map read at each point")
out_single = (weights[..., None] * samples).sum(1)
print("output    ", tuple(out_single.shape), "(Lq, C): weighted sum over the P points")

# dinolab's core with one level and one head: value [B, HW, heads, d], locations [B, Lq, heads, L, P, 2]
out_lib = ms_deform_attn(value_map.flatten(1).T[None, :, None, :], [(H, W)],
                         locations[None, :, None, None], weights[None, :, None, None])
torch.testing.assert_close(out_lib[0], out_single)
print("by hand == dinolab.msdeform.ms_deform_attn (1 level, 1 head)  (assert passed)")

# %% [markdown] slide
# ## 3. Multi-scale and multi-head
#
# The full module generalises in two directions:
#
# * **levels**: the input is a pyramid of $L$ maps (e.g. strides 8, 16, 32), flattened and concatenated into one
#   sequence of $\sum_l H_l W_l$ tokens. Each query samples $P$ points on **every** level, around the **same**
#   normalised reference point; the offsets are in pixels *of that level*, so the same offset reaches 4× further
#   (in image pixels) on a level of stride 32 than on one of stride 8. The softmax runs **jointly over the
#   $L \cdot P$ samples**, so levels compete: a query decides which scale to trust.
# * **heads**: the value channels are split into $M$ heads of $d_h$ channels; every head has its own offsets and
#   weights, then the heads are concatenated, as in multi-head attention.
#
# $$\mathrm{MSDeformAttn}(q, r_q, \{x^l\}) = W_{out}\,\Big[\ \sum_{l=1}^{L}\sum_{p=1}^{P} a_{mlp}(q)\;
# (W_v x^l)_m\big(r_q + \Delta_{mlp}(q) / (W_l, H_l)\big)\ \Big]_{m=1..M}$$
#
# The four Linear layers have the official names: `value_proj`, `sampling_offsets` ($M L P \cdot 2$ outputs),
# `attention_weights` ($M L P$) and `output_proj`. First the core (everything between the projections),
# written with our `bilinear_sample`:

# %% skip
def ms_deform_attn_by_hand(value, shapes, loc, attn):
    """value [B, ΣHW, M, dh]; shapes [(H, W)] * L; loc [B, Lq, M, L, P, 2] (x, y); attn [B, Lq, M, L, P]
    -> [B, Lq, M·dh]. One level and one head at a time, all queries and points at once."""
    B, S, M, dh = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = value.new_zeros(B, Lq, M, dh)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v_l = value[:, start : start + h * w]  # [B, h·w, M, dh], row-major (y, x)
        start += h * w
        for b in range(B):
            for m in range(M):
                vmap_l = v_l[b, :, m].T.reshape(dh, h, w)
                s = bilinear_sample(vmap_l, loc[b, :, m, lvl].reshape(-1, 2)).view(Lq, P, dh)
                out[b, :, m] += (attn[b, :, m, lvl, :, None] * s).sum(1)
    return out.reshape(B, Lq, M * dh)


def ms_deform_attn_brute(value, shapes, loc, attn):
    """The definition, one scalar sample at a time (5 nested loops): for tiny float64 cases only."""
    B, S, M, dh = value.shape
    _, Lq, _, L, P, _ = loc.shape
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    out = torch.zeros(B, Lq, M, dh, dtype=value.dtype)
    for b in range(B):
        for q in range(Lq):
            for m in range(M):
                for lvl, ((h, w), s0) in enumerate(zip(shapes, starts)):
                    vmap_l = value[b, s0 : s0 + h * w, m].T.reshape(dh, h, w)
                    for p in range(P):
                        out[b, q, m] += attn[b, q, m, lvl, p] * bilinear_one(vmap_l, *loc[b, q, m, lvl, p].tolist())
    return out.reshape(B, Lq, M * dh)


# %% [markdown] slide
# Now a tiny random case in float64 — non-square levels, one of them a single column, locations in
# $[-0.3, 1.3]$ so many points fall (partly) outside — compared four ways: the brute-force loop, our vectorised
# version, `dinolab.msdeform.ms_deform_attn` (the official `grid_sample` core) and transformers'
# `MultiScaleDeformableAttention` (the pure-PyTorch reference from
# `transformers/models/deformable_detr/modeling_deformable_detr.py`, which is the official
# `ms_deform_attn_core_pytorch`: one `grid_sample` per level).

# %% hide-input
def random_core_inputs(B, shapes, M, dh, P, Lq, seed=0, lo=-0.3, hi=1.3):
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, M, dh, generator=g, dtype=torch.float64)
    loc = lo + (hi - lo) * torch.rand(B, Lq, M, L, P, 2, generator=g, dtype=torch.float64)
    attn = torch.randn(B, Lq, M, L * P, generator=g, dtype=torch.float64).softmax(-1).view(B, Lq, M, L, P)
    return value, loc, attn


def transformers_core(value, shapes, loc, attn):
    st = torch.tensor(shapes)
    start = torch.cat([st.new_zeros(1), st.prod(1).cumsum(0)[:-1]])  # level_start_index (unused there)
    return MultiScaleDeformableAttention()(value, st, [tuple(s) for s in shapes], start, loc, attn, 64)


shapes_tiny = [(3, 4), (2, 1)]
value, loc, attn = random_core_inputs(B=2, shapes=shapes_tiny, M=2, dh=3, P=2, Lq=5)
print(f"value {tuple(value.shape)} (B, ΣHW={3 * 4}+{2 * 1}, M, dh);  loc {tuple(loc.shape)} (B, Lq, M, L, P, 2);"
      f"  attn {tuple(attn.shape)}")
out_brute = ms_deform_attn_brute(value, shapes_tiny, loc, attn)
results = {"vectorised by hand": ms_deform_attn_by_hand(value, shapes_tiny, loc, attn),
           "dinolab ms_deform_attn": ms_deform_attn(value, shapes_tiny, loc, attn),
           "transformers MultiScaleDeformableAttention": transformers_core(value, shapes_tiny, loc, attn)}
print("brute-force loop ->", tuple(out_brute.shape), "(B, Lq, M·dh)")
for name, out in results.items():
    torch.testing.assert_close(out, out_brute, atol=1e-12, rtol=0)
    print(f"  {name:44s} == brute force (float64, atol 1e-12)  (assert passed)")

# %% [markdown]
# A bigger case (3 levels, 4 heads, 4 points, 2 × 60 queries): our vectorised version, dinolab and transformers
# agree; and so do their **gradients** with respect to all three inputs. That matters: the official repository
# runs this forward in pure PyTorch, but its custom `autograd.Function` needs the compiled CUDA op for the
# backward, so the official head cannot be trained on a CPU. `dinolab.msdeform` gets its gradient from autograd through
# `grid_sample` by default, as transformers' reference does (its `fused=True` path has a hand-written CPU backward).

# %% hide-input
shapes3 = [(8, 10), (4, 5), (2, 3)]
value, loc, attn = random_core_inputs(B=2, shapes=shapes3, M=4, dh=8, P=4, Lq=60, seed=1)
go = torch.randn(2, 60, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
grads = {}
for name, fn in [("by hand", lambda v, l, a: ms_deform_attn_by_hand(v, shapes3, l, a)),
                 ("dinolab", lambda v, l, a: ms_deform_attn(v, shapes3, l, a)),
                 ("transformers", lambda v, l, a: transformers_core(v, shapes3, l, a))]:
    ins = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(*ins)
    out.backward(go)
    grads[name] = (out.detach(), *[t.grad for t in ins])
print("output", tuple(grads["dinolab"][0].shape), "; gradients w.r.t. value", tuple(grads["dinolab"][1].shape),
      ", sampling_locations", tuple(grads["dinolab"][2].shape), ", attention_weights", tuple(grads["dinolab"][3].shape))
for name in ("by hand", "dinolab"):
    for what, a, b in zip(["output", "d value", "d locations", "d weights"], grads[name], grads["transformers"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    print(f"{name:8s} == transformers: output and all three gradients (float64)  (assert passed)")

# %% [markdown] slide
# ### The whole module, by hand
#
# Around the core sit the four projections. The value goes through `value_proj` (width
# `int(d_model · ratio)`; the DINOv3 adapter uses `ratio = 0.5`), is split into heads, and padded positions are
# zeroed; the query gives offsets and logits; `sampling_locations = reference + offsets / (W_l, H_l)`. We compare
# our function with `dinolab.msdeform.MSDeformAttn` and with transformers' `DeformableDetrMultiscaleDeformableAttention`
# loaded from the **same state dict** (the parameter names are the official ones in all three). Two transformers
# gotchas: its `attention_mask` is True = *valid*, the opposite of the official `input_padding_mask`
# (True = padding), and it adds `position_embeddings` to the query (we pass none).

# %% hide-input
def msdeform_by_hand(m, query, reference_points, input_flatten, shapes, padding_mask=None):
    B, Lq, _ = query.shape
    S = input_flatten.shape[1]
    M, L, P = m.n_heads, m.n_levels, m.n_points
    value = m.value_proj(input_flatten)
    if padding_mask is not None:
        value = value.masked_fill(padding_mask[..., None], 0.0)
    value = value.view(B, S, M, m.value_dim // M)
    offsets = m.sampling_offsets(query).view(B, Lq, M, L, P, 2)
    attn = m.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
    wh = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype)  # (W_l, H_l): offsets are level pixels
    loc = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    return m.output_proj(ms_deform_attn_by_hand(value, shapes, loc, attn))


seed_everything(0)
d_model, M, P = 32, 4, 3
ours = MSDeformAttn(d_model, n_levels=3, n_heads=M, n_points=P).double()
with torch.no_grad():  # random weights: the official init has zero offset/attention weights, too easy a test
    for p in ours.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
cfg = DeformableDetrConfig(d_model=d_model, encoder_attention_heads=M, num_feature_levels=3, encoder_n_points=P)
peer = DeformableDetrMultiscaleDeformableAttention(cfg, num_heads=M, n_points=P).double()
print("state-dict keys:", list(ours.state_dict()))
peer.load_state_dict(ours.state_dict())

B, Lq = 2, 9
S = sum(h * w for h, w in shapes3)
query = torch.randn(B, Lq, d_model, dtype=torch.float64)
feat = torch.randn(B, S, d_model, dtype=torch.float64)
refs = torch.rand(B, Lq, 3, 2, dtype=torch.float64)
pad = torch.zeros(B, S, dtype=torch.bool)
pad[1, 80:] = True  # image 1: its two coarse levels are padding
st = torch.tensor(shapes3)
start = torch.cat([st.new_zeros(1), st.prod(1).cumsum(0)[:-1]])
print(f"query {tuple(query.shape)}, reference_points {tuple(refs.shape)}, input_flatten {tuple(feat.shape)}, "
      f"spatial_shapes {st.tolist()}, level_start_index {start.tolist()}")
out_hand = msdeform_by_hand(ours, query, refs, feat, shapes3, pad)
out_ours = ours(query, refs, feat, st, start, pad)
out_peer, _ = peer(hidden_states=query, attention_mask=~pad, encoder_hidden_states=feat, position_embeddings=None,
                   reference_points=refs, spatial_shapes=st, spatial_shapes_list=shapes3, level_start_index=start)
print("output", tuple(out_ours.shape), "(B, Lq, d_model)")
torch.testing.assert_close(out_hand, out_ours, atol=1e-12, rtol=0)
torch.testing.assert_close(out_ours, out_peer, atol=1e-12, rtol=0)
print("by hand == dinolab MSDeformAttn == transformers DeformableDetrMultiscaleDeformableAttention  (assert passed)")

# %% slide hide-input
def draw_msdeform_flow(m, query, refs, feat, shapes):
    """MSDeformAttn as boxes and arrows. Shapes come from one forward pass of `m` on the example above (hooks on
    its four Linear layers) and from its attributes, so the labels follow the example's sizes."""
    seen = {}

    def hook(name):
        return lambda mod, args, out: seen.__setitem__(name, (tuple(args[0].shape), tuple(out.shape)))

    names = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
    handles = [getattr(m, n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        out = m(query, refs, feat, torch.tensor(shapes))
    for h in handles:
        h.remove()
    B_, Lq_, d = seen["sampling_offsets"][0]
    S_, dv = seen["value_proj"][1][1:]
    M_, L_, P_ = m.n_heads, m.n_levels, m.n_points
    dh = dv // M_
    assert seen["sampling_offsets"][1][-1] == M_ * L_ * P_ * 2 and seen["attention_weights"][1][-1] == M_ * L_ * P_

    def sh(*s):
        return viz.shape_label(s)

    fig, ax = viz.diagram_canvas()  # 128 x 72 units on a 16:9 slide
    F = viz.DIAGRAM_FILLS
    fill = {"io": F["io"], "linear": F["blue"], "reshape": F["orange"], "core": F["green"]}

    def box(x, y, w, text, kind, h=7.0):
        return viz.diagram_box(ax, x, y, w, h, text, fill[kind], rounding=1.2)

    def arrow(p0, p1, shape="", what="", dx=1.0, dy=0.0, at=0.5, ha="left"):
        # a tensor's shape along the arrow (monospace), and what its axes are just under it
        t = viz.diagram_arrow(ax, p0, p1, lw=1.4, shrink=1, head=16, label=shape, label_at=at, dx=dx, dy=dy, ha=ha,
                              fontsize=11, label_color=viz.COLORS[0], family="monospace")
        if t is not None and what:
            x, y = t.get_position()
            ax.text(x, y - 0.4, what, ha=ha, va="top", fontsize=10, color="0.35")

    R1, R2, R3, R4, R5 = 60, 47, 34, 21, 8
    ax.text(64, 69.5, f"MSDeformAttn(d_model={m.d_model}, n_levels={L_}, n_heads={M_}, n_points={P_}) on the "
            f"example above: B = {B_}, Lq = {Lq_}, levels {' + '.join(f'{h}×{w}' for h, w in shapes)}",
            ha="center", va="center", fontsize=13)
    q = box(36, R1, 24, "query\n" + sh(B_, Lq_, d), "io")
    r = box(80, R1, 22, "reference_points\n" + sh(*refs.shape), "io")
    x_in = box(112, R1, 24, "input_flatten\n" + sh(B_, S_, d), "io")
    aw = box(20, R2, 26, f"attention_weights\nLinear({d} → {M_ * L_ * P_})", "linear")
    so = box(52, R2, 26, f"sampling_offsets\nLinear({d} → {M_ * L_ * P_ * 2})", "linear")
    vp = box(112, R2, 24, f"value_proj\nLinear({d} → {dv})", "linear")
    sm = box(20, R3, 26, f"softmax over\nL·P = {L_}·{P_} = {L_ * P_} per head", "reshape")
    loc = box(52, R3, 26, "reference +\noffset / (W_l, H_l)", "reshape")
    sp = box(112, R3, 24, f"split {M_} heads × {dh} ch\nand {L_} levels", "reshape")
    bil = box(84, R4, 30, f"bilinear sample each\nlevel's map at its {P_} points", "core")
    ws = box(48, R5, 28, "weighted sum over L·P,\nconcatenate heads", "core")
    op = box(84, R5, 22, f"output_proj\nLinear({dv} → {d})", "linear")
    o = box(115, R5, 18, "output\n" + sh(*out.shape), "io")

    arrow(q["b"], aw["t"])
    arrow(q["b"], so["t"])
    arrow(aw["b"], sm["t"], sh(B_, Lq_, M_, L_ * P_), "B, Lq, M, L·P", dx=-1.0, ha="right")
    arrow(so["b"], loc["t"], sh(B_, Lq_, M_, L_, P_, 2), "B, Lq, M, L, P, xy (px)", dx=-1.0, ha="right")
    arrow(r["b"], (loc["t"][0] + 8, loc["t"][1]), sh(*refs.shape), "B, Lq, L, xy in [0, 1]", dx=2.5, at=0.35)
    arrow(x_in["b"], vp["t"])
    arrow(vp["b"], sp["t"], sh(B_, S_, dv))
    arrow(sm["b"], (ws["t"][0] - 6, ws["t"][1]), sh(B_, Lq_, M_, L_, P_), "attention weights", dx=-2.0,
          ha="right", at=0.55)
    arrow(loc["b"], (bil["t"][0] - 8, bil["t"][1]), sh(B_, Lq_, M_, L_, P_, 2), "sampling_locations", dx=-1.0,
          dy=-2.5, at=0.3, ha="right")
    arrow(sp["b"], (bil["t"][0] + 8, bil["t"][1]), sh(B_ * M_, dh, "H_l", "W_l"), "B·M, dh, H_l, W_l per level",
          dx=1.5, at=0.45)
    arrow(bil["b"], (ws["t"][0] + 6, ws["t"][1]), sh(B_, Lq_, M_, L_ * P_, dh), "samples: B, Lq, M, L·P, dh",
          dx=-1.0, dy=2.0, ha="right")
    arrow(ws["r"], op["l"], sh(B_, Lq_, M_ * dh), "", dx=0.0, ha="center", dy=0.5)
    arrow(op["r"], o["l"])
    ax.text(2, 2, "blue: the four nn.Linear layers (state-dict names)   orange: reshapes and softmax, no parameters   "
            "green: the core ms_deform_attn", fontsize=10, color="0.35")
    return fig


draw_msdeform_flow(ours, query, refs, feat, shapes3)
plt.show()


# %% [markdown] slide
# ## 4. The official initialisation
#
# `MSDeformAttn._reset_parameters` (official, copied from Deformable DETR):
#
# * `sampling_offsets.weight = 0`, so at first the offsets **do not depend on the query** and equal the bias;
# * the bias puts head $m$ in direction $\theta_m = 2\pi m / M$, as $(\cos\theta_m, \sin\theta_m)$ divided by its
#   larger coordinate (the ring becomes a **square**: directions land on pixel neighbours), the same for every
#   level, and point $i$ goes $(i + 1)$ pixels out;
# * `attention_weights.weight = bias = 0`: every query starts with **uniform** weights $1/(L P)$;
# * `value_proj`, `output_proj`: Xavier-uniform, bias 0.
#
# So an untrained layer is a fixed, sparse, dilated "star" filter: each head averages $P$ pixels along its own
# direction, on every level. Training then bends the star per query. We rebuild the bias from the recipe and
# compare it with dinolab's, for the pixel decoder's setting (16 heads, 3 levels, 4 points).

# %% skip
M, L, P = 16, 3, 4
m_init = MSDeformAttn(64, n_levels=L, n_heads=M, n_points=P)  # the bias does not depend on d_model
thetas = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)
grid = torch.stack([thetas.cos(), thetas.sin()], -1)
grid = grid / grid.abs().max(-1, keepdim=True).values  # onto the unit square
grid = grid.view(M, 1, 1, 2).repeat(1, L, P, 1) * torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)
init_bias = m_init.sampling_offsets.bias.detach().view(M, L, P, 2)
torch.testing.assert_close(init_bias, grid)
assert torch.count_nonzero(m_init.sampling_offsets.weight) == 0
print("sampling_offsets.bias", tuple(m_init.sampling_offsets.bias.shape), "-> view", tuple(init_bias.shape),
      "(heads, levels, points, xy) == recipe  (assert passed)")
print("head  angle   point 0 (dx, dy)    point 3 (dx, dy)")
for h in range(0, M, 2):
    print(f"{h:4d}  {math.degrees(thetas[h]):5.1f}°  {tuple(round(v, 3) for v in init_bias[h, 0, 0].tolist())!s:18s}"
          f"  {tuple(round(v, 3) for v in init_bias[h, 0, 3].tolist())!s}")

logits0 = m_init.attention_weights(torch.randn(7, 64)).view(7, M, L * P)
torch.testing.assert_close(logits0.softmax(-1), torch.full_like(logits0, 1 / (L * P)))
print(f"zero attention logits -> every weight = 1/(L·P) = 1/{L * P} = {1 / (L * P):.4f}  (assert passed)")

# %% slide hide-input
strides = [8, 16, 32]  # the pixel decoder's encoder levels at 1/8, 1/16, 1/32
colors = plt.cm.hsv(torch.linspace(0, 1, M + 1)[:-1].numpy())
fig, axes = plt.subplots(1, 2, figsize=(12.8, 5.8))
ax = axes[0]
for h in range(M):
    pts = init_bias[h, 0].numpy()
    ax.plot(pts[:, 0], pts[:, 1], "-", color=colors[h], lw=0.7)
    ax.scatter(pts[:, 0], pts[:, 1], s=12 + 10 * torch.arange(P).numpy(), color=colors[h], zorder=3)
    ax.text(*(pts[-1] * 1.13), str(h), fontsize=10, ha="center", va="center", color=colors[h])
ax.plot(0, 0, "k+", ms=10)
ax.set(aspect="equal", xlim=(-5, 5), ylim=(5, -5), xlabel="dx (pixels of the level)", ylabel="dy",
       title=f"Official init: {M} heads × {P} points (same on every level)\nhead m → angle 2πm/{M}, "
             "point i at (i+1) px")
ax = axes[1]
for lvl, (s, mk) in enumerate(zip(strides, ["o", "s", "^"])):
    pts = (init_bias[:, lvl].reshape(-1, 2) * s).numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=10, marker=mk, label=f"level 1/{s}: reach ±{P * s} px", alpha=0.7)
ax.plot(0, 0, "k+", ms=10)
ax.set(aspect="equal", xlim=(-140, 140), ylim=(140, -140), xlabel="dx (image pixels)", ylabel="dy",
       title="The same offsets in image pixels:\ncoarse levels look further")
ax.legend(frameon=False, fontsize=11, loc="lower left")
fig.tight_layout()
plt.show()

# %% [markdown] notes
# ## 5. Watching it learn: sampling points on a real photo
#
# A tiny task where the module must learn **where** to look. The pyramid is the photo's colour at strides
# 4, 8 and 16 (a 256-px crop → levels of 64², 32², 16²; averaging is a fixed conv, the simplest "feature"). Each
# of two heads carries the colour (`value_proj` and `output_proj` are frozen identities, so the only way to lower
# the loss is to move the points and re-weight them). The targets, for every query on a 32 × 32 grid:
#
# * head 0 must return the colour **(+6, +4)** base-level pixels away (24 px right, 16 px down in the image),
# * head 1 the colour **(−5, −5)** away (20 px left and up),
#
# each averaged over the three levels ("a multi-scale descriptor of that spot"), so the best answer puts the
# points of **every** level on the target. Note the offsets it must learn differ per level: (6, 4) pixels on the
# 64² level, (3, 2) on the 32² level, (1.5, 1) on the 16² level. The offsets here are a learned bias, the same
# for every query, because the task is the same everywhere; in real models `sampling_offsets.weight` makes them
# depend on the query's content.

# %% skip
seed_everything(0)
photo = viz.load_photo(256)
pyramid = [F.avg_pool2d(photo[None], k) for k in (4, 8, 16)]  # strides 4, 8, 16
shapes_photo = [tuple(p.shape[-2:]) for p in pyramid]
for k, p in zip((4, 8, 16), pyramid):
    print(f"level stride {k:2d}: {tuple(p.shape)}")
n_heads_t = 2
flat = torch.cat([p.repeat(1, n_heads_t, 1, 1).flatten(2).transpose(1, 2) for p in pyramid], 1)  # RGB per head
print("input_flatten", tuple(flat.shape), f"(B, ΣHW = {' + '.join(f'{h}·{w}' for h, w in shapes_photo)}, "
      f"{n_heads_t} heads × RGB)")

ref_q = get_reference_points([(32, 32)])[:, :, 0]  # [1, 1024, 2]: queries on a 32x32 grid
Lq_t = ref_q.shape[1]


def read(level, xy):  # level [1, 3, H, W], xy [1, N, 2] -> [1, N, 3] (bilinear, zeros outside)
    return F.grid_sample(level, (2 * xy - 1)[:, :, None], align_corners=False)[..., 0].transpose(1, 2)


query_t = read(pyramid[0], ref_q).repeat(1, 1, n_heads_t)  # the query = the colour at its reference point
H0, W0 = shapes_photo[0]
DELTAS = torch.tensor([[6.0, 4.0], [-5.0, -5.0]])  # per head, in base-level (64²) pixels
target = torch.cat([sum(read(p, ref_q + d / torch.tensor([W0, H0])) for p in pyramid) / 3 for d in DELTAS], -1)
print("queries", tuple(query_t.shape), " reference points", tuple(ref_q.shape), " targets", tuple(target.shape))

m_t = MSDeformAttn(3 * n_heads_t, n_levels=3, n_heads=n_heads_t, n_points=4)
with torch.no_grad():
    for lin in (m_t.value_proj, m_t.output_proj):
        lin.weight.copy_(torch.eye(3 * n_heads_t))
        lin.bias.zero_()
        lin.requires_grad_(False)
print("trainable:", [n for n, p in m_t.named_parameters() if p.requires_grad],
      f"({count_params(m_t, trainable_only=True)} parameters)")


def where_it_looks(m, qi):
    """Sampling locations (image pixels, [M, L, P, 2]) and weights ([M, L, P]) of query qi."""
    with torch.no_grad():
        q = query_t[:, qi : qi + 1]
        Mh, Lh, Ph = m.n_heads, m.n_levels, m.n_points
        off = m.sampling_offsets(q).view(Mh, Lh, Ph, 2)
        w = m.attention_weights(q).view(Mh, Lh * Ph).softmax(-1).view(Mh, Lh, Ph)
        wh = torch.tensor([[w_, h_] for h_, w_ in shapes_photo], dtype=torch.float32).view(1, Lh, 1, 2)
        loc = ref_q[0, qi].view(1, 1, 1, 2) + off / wh
    return loc * 256, w


QI = 12 * 32 + 15  # the query at grid row 12, column 15 (on the face)
before = where_it_looks(m_t, QI)

# %% skip
# NBVAL_IGNORE_OUTPUT
# the loss values depend on float rounding; the asserts in the next cell check the outcome
m_t, query_t, flat, target, ref_d = (t.to(DEVICE) for t in (m_t, query_t, flat, target, ref_q))
ref_in = ref_d[:, :, None].expand(1, Lq_t, 3, 2)
st_photo = torch.tensor(shapes_photo)
opt = torch.optim.Adam([{"params": m_t.sampling_offsets.parameters(), "lr": 0.15},
                        {"params": m_t.attention_weights.parameters(), "lr": 0.01}])
STEPS = 300 * SCALE
losses = []
t0 = time.perf_counter()
for step in range(STEPS):
    loss = F.mse_loss(m_t(query_t, ref_in, flat, st_photo), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 50 == 0 or step == STEPS - 1:
        print(f"step {step:4d}  loss {loss.item():.6f}")
print(f"{STEPS} steps in {time.perf_counter() - t0:.1f} s")
m_t, query_t = m_t.cpu(), query_t.cpu()

# %% skip
# NBVAL_IGNORE_OUTPUT
after = where_it_looks(m_t, QI)
ref_px = ref_q[0, QI] * 256
loss_drop = losses[0] / losses[-1]
print(f"loss {losses[0]:.5f} -> {losses[-1]:.6f}  ({loss_drop:.0f}x lower)")
miss = []
for h in range(n_heads_t):
    loc_h, w_h = after[0][h], after[1][h]
    mean_xy = (w_h[..., None] * loc_h).sum((0, 1)) - ref_px  # attention-weighted mean offset, image px
    want = DELTAS[h] * 256 / W0
    miss.append((mean_xy - want).norm().item())
    print(f"head {h}: weighted mean offset ({mean_xy[0]:+.1f}, {mean_xy[1]:+.1f}) image px, target "
          f"({want[0]:+.0f}, {want[1]:+.0f}); weight per level {[round(v, 2) for v in w_h.sum(-1).tolist()]}")
assert loss_drop > 50, loss_drop
assert max(miss) < 4.0, miss  # within one base-level pixel (4 image px) of the target

# %% slide hide-input
img_np = viz.to_numpy_image(photo)
fig, axes = plt.subplots(2, 3, figsize=(11, 6.4))
head_colors = ["cyan", "magenta"]
for row, (name, (loc_px, w)) in enumerate([("before (official init)", before), ("after training", after)]):
    for lvl, ax in enumerate(axes[row]):
        ax.imshow(viz.to_numpy_image(pyramid[lvl][0]), extent=(0, 256, 256, 0), interpolation="nearest")
        for h in range(n_heads_t):
            pts = loc_px[h, lvl].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=300 * w[h, lvl].numpy(), color=head_colors[h],
                       edgecolor="k", lw=0.5, zorder=3, label=f"head {h}")
            tgt = (ref_q[0, QI] * 256 + DELTAS[h] * 256 / W0).numpy()
            ax.plot(*tgt, "*", color="yellow", mec="k", ms=13, zorder=2)
        ax.plot(*(ref_q[0, QI] * 256).numpy(), "w+", ms=12, mew=2, zorder=5)
        ax.set(xlim=(60, 200), ylim=(170, 30), xticks=[], yticks=[])
        h_, w_ = shapes_photo[lvl]
        ax.set_title(f"{name}\nlevel {lvl}: {h_}x{w_} (stride {256 // w_})", fontsize=11)
axes[0, 0].legend(frameon=True, fontsize=10, loc="lower left")
fig.suptitle("One query (+): its 2 heads × 3 levels × 4 sampling points (size ∝ weight); ★ = the targets",
             fontsize=13)
fig.tight_layout()
plt.show()

# %% [markdown] notes
# Before training, each head's points sit on its init line (head 0 to the right, head 1 to the left: with 2 heads
# the angles are 0° and 180°), 1 to 4 pixels of each level away — so four times further on the 16² level than on
# the 64² level. After 300 steps the points of every level have gathered on the two stars. Gradients reach a point
# only through the bilinear weights of its 4 neighbours, so points move by following the local image gradient;
# a point that starts where the image is flat barely moves, and the softmax learns to trust it less (smaller
# marker). This is why the official init spreads the points out in all directions and at several distances.

# %% [markdown] slide
# ## 6. Cost against dense attention
#
# In an encoder every token of the pyramid is a query: $L_q = S = \sum_l H_l W_l$. Counting a multiply-add as
# 2 FLOPs (as `torch.utils.flop_counter` does), with width $d$, value width $d_v = \text{ratio}\cdot d$, heads
# $M$, levels $L$, points $P$:
#
# | part | deformable | dense |
# |---|---|---|
# | projections | value $2Sd\,d_v$ · offsets $2L_q d\,(2MLP)$ · weights $2L_q d\,(MLP)$ · output $2L_q d_v d$ | q, k, v $2\cdot 3 S d^2$ · output $2Sd^2$ |
# | mixing | $L_q M L P \cdot 10\,d_h = 10\,L_q L P\, d_v$ (4 bilinear corners × 2 + weighted sum × 2 per channel) | $QK^\top$ $2L_q S d$ · $AV$ $2 L_q S d$ |
#
# Deformable mixing is **linear** in the number of queries and independent of the map size; dense mixing is
# quadratic. We check the projection counts (and the whole dense layer) against PyTorch's `FlopCounterMode` on the
# `meta` device (shapes only, no memory); the counter does not see deformable sampling (a gather, not a matmul),
# so that term comes from the formula. Softmax and location arithmetic (a few FLOPs per sample) are left out.

# %% slide hide-input
def deform_flops(Lq, S, d, M, L, P, ratio=1.0):
    dv = int(d * ratio)
    proj = 2 * S * d * dv + 2 * Lq * d * (2 * M * L * P) + 2 * Lq * d * (M * L * P) + 2 * Lq * dv * d
    return proj, 10 * Lq * L * P * dv


def dense_flops(N, d):
    return 8 * N * d * d, 4 * N * N * d


class DenseSelfAttention(nn.Module):
    """Plain multi-head self-attention over the flattened pyramid (qkv Linear + SDPA + output Linear)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, d = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, d))


def counted_flops(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def pyramid_inputs(base, d, device="meta"):
    shapes = [(base >> i, base >> i) for i in range(3)]
    S = sum(h * w for h, w in shapes)
    x = torch.randn(1, S, d, device=device)
    refs = get_reference_points(shapes, device).expand(1, S, 3, 2)
    return shapes, S, x, refs


d_c, M_c, P_c = 256, 8, 4  # Deformable DETR's encoder setting
with torch.device("meta"):
    deform_c, dense_c = MSDeformAttn(d_c, n_levels=3, n_heads=M_c, n_points=P_c), DenseSelfAttention(d_c, M_c)
BASES = [32, 64, 128]
rows = []
for base in BASES:
    shapes, S, x, refs = pyramid_inputs(base, d_c)
    proj_d, mix_d = deform_flops(S, S, d_c, M_c, 3, P_c)
    proj_n, mix_n = dense_flops(S, d_c)
    assert counted_flops(lambda: deform_c(x, refs, x, torch.tensor(shapes))) == proj_d
    assert counted_flops(lambda: dense_c(x)) == proj_n + mix_n
    # memory of the attention step's intermediates (float32), from tensor sizes:
    # dense: the [M, Lq, S] attention matrix (logits + softmax), as a plain implementation stores for backward;
    # deformable (official grid_sample path): offsets, logits, weights, locations and the sampled values
    # [M·dh, Lq, L·P] that grid_sample materialises before the weighted sum.
    mem_n = 2 * M_c * S * S * 4
    mem_d = (S * M_c * 3 * P_c * (2 + 1 + 1 + 2) + S * 3 * P_c * d_c) * 4
    rows.append((base, S, proj_d + mix_d, proj_n + mix_n, mem_d, mem_n))
print("FLOP formulas == FlopCounterMode for the projections (deformable) and the whole dense layer  (assert passed)")
print(f"d = {d_c}, {M_c} heads, 3 levels, {P_c} points; every token is a query\n")
print(f"{'base level':>10} {'tokens S':>9} | {'deform GFLOPs':>13} {'dense GFLOPs':>12} {'ratio':>6} | "
      f"{'deform MB':>9} {'dense MB':>9}")
for base, S, fd, fn, md, mn in rows:
    print(f"{base:>7}²   {S:>9} | {fd / 1e9:13.2f} {fn / 1e9:12.2f} {fn / fd:6.1f} | {md / 2**20:9.1f} {mn / 2**20:9.0f}")
assert rows[-1][3] / rows[-1][2] > 10 * rows[0][3] / rows[0][2]  # the gap widens with resolution

# %% [markdown] notes
# Timing on this machine (forward only, batch 1, `no_grad`, best of 3): dinolab's `MSDeformAttn(fused=True)`, the same layer
# with transformers' `grid_sample` core, and dense attention through `F.scaled_dot_product_attention` (whose fused
# kernels never store the attention matrix, but still do the quadratic work). Dense attention at 128² would take
# seconds, so there we time **1/16 of the queries** against all keys and multiply by 16 — its cost is exactly
# linear in the number of queries. The numbers are not compared by nbval.

# %% skip
# NBVAL_IGNORE_OUTPUT
def best_time(fn, n=3):
    fn()  # warm-up (dinolab caches its index geometry per size)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return min(ts)


seed_everything(0)
deform_t, dense_t = MSDeformAttn(d_c, 3, M_c, P_c, fused=True).to(DEVICE), DenseSelfAttention(d_c, M_c).to(DEVICE)
hf_core = MultiScaleDeformableAttention()
times = {"dinolab MSDeformAttn": [], "transformers core": [], "dense (SDPA)": []}
with torch.no_grad():
    for base in BASES:
        shapes, S, x, refs = pyramid_inputs(base, d_c, DEVICE)
        st_b = torch.tensor(shapes, device=DEVICE)
        times["dinolab MSDeformAttn"].append(best_time(lambda: deform_t(x, refs, x, st_b)))

        def with_hf_core():  # the same layer, with the grid_sample core (official / transformers)
            value = deform_t.value_proj(x).view(1, S, M_c, d_c // M_c)
            off = deform_t.sampling_offsets(x).view(1, S, M_c, 3, P_c, 2)
            a = deform_t.attention_weights(x).view(1, S, M_c, 3 * P_c).softmax(-1).view(1, S, M_c, 3, P_c)
            wh = st_b.flip(-1).to(x.dtype)
            loc = refs[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
            return deform_t.output_proj(hf_core(value, st_b, shapes, None, loc, a, 64))

        times["transformers core"].append(best_time(with_hf_core))
        if base < 128:
            times["dense (SDPA)"].append(best_time(lambda: dense_t(x)))
        else:
            q_part = x[:, : S // 16]

            def dense_part():
                B_, N_, _ = x.shape
                kv = dense_t.qkv(x).view(1, N_, 3, M_c, d_c // M_c).permute(2, 0, 3, 1, 4)
                q = dense_t.qkv(q_part)[..., :d_c].view(1, -1, M_c, d_c // M_c).transpose(1, 2)
                return dense_t.proj(F.scaled_dot_product_attention(q, kv[1], kv[2]).transpose(1, 2).flatten(2))

            times["dense (SDPA)"].append(16 * best_time(dense_part, n=1))
for name, ts in times.items():
    print(f"{name:22s}", "  ".join(f"{b}²: {t * 1e3:8.1f} ms" for b, t in zip(BASES, ts)))
assert times["dense (SDPA)"][-1] > 2 * times["dinolab MSDeformAttn"][-1]

# %% hide-input
# NBVAL_IGNORE_OUTPUT
tokens = [r[1] for r in rows]
fig, axes = plt.subplots(1, 3, figsize=(12.8, 4.4))
axes[0].plot(tokens, [r[2] / 1e9 for r in rows], "o-", label="deformable")
axes[0].plot(tokens, [r[3] / 1e9 for r in rows], "s--", label="dense")
axes[0].set(title="FLOPs (computed)", ylabel="GFLOPs")
axes[1].plot(tokens, [r[4] / 2**20 for r in rows], "o-", label="deformable")
axes[1].plot(tokens, [r[5] / 2**20 for r in rows], "s--", label="dense (stored attention matrix)")
axes[1].set(title="Memory of the attention step (computed)", ylabel="MB")
for (name, ts), style in zip(times.items(), ["o-", "^-", "s--"]):
    axes[2].plot(tokens, [t * 1e3 for t in ts], style, label=name)
axes[2].set(title="Forward time (measured, this machine)", ylabel="ms")
for ax in axes:
    ax.set(xscale="log", yscale="log", xlabel="tokens S = ΣHW (3 levels)")
    ax.set_xticks(tokens, [f"{t}\n({b}² base)" for t, b in zip(tokens, BASES)])
    ax.minorticks_off()
    ax.legend(frameon=False, fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown] notes
# Every 4× more tokens cost dense attention 16× more, deformable attention 4× more. At the 128² base level the
# dense attention matrix alone (8 heads) would need the memory in the table; the deformable layer's largest
# intermediate is the $L_q \times L P \times d$ block of samples of the `grid_sample` reference, which dinolab's
# fused gather-sum (`fused=True`) does not materialise.

# %% [markdown] slide
# ## 7. The blog post's two fusion styles, in numbers
#
# The blog post compares two ways to merge a feature pyramid: **multi-scale deformable attention** (what the
# pixel decoder's encoder does: global, content-adaptive, costly) and **FPN upsample + conv** (its own decoder
# head: cheap, local, fixed). Here they are side by side for a 512 × 512 image and ViT-L-sized features
# ($D = 1024$; levels 1/8, 1/16, 1/32 = 64², 32², 16², i.e. 5376 tokens; the FPN also takes the 1/4 level),
# all built on the `meta` device. "Reads per output" counts the input positions that one output value depends
# on; the FPN's footprint is measured by back-propagating from one output pixel (positive weights and inputs,
# so that no ReLU hides a path).

# %% slide hide-input
D_L, IMG = 1024, 512
fpn_strides = [4, 8, 16, 32]
enc_shapes = [(IMG // s, IMG // s) for s in (8, 16, 32)]
S_enc = sum(h * w for h, w in enc_shapes)


# FPN footprint: the same head with 2 channels on real sizes (the footprint does not depend on the width)
def fpn_footprint():
    head = FPNSegHead(2, 2, num_classes=1).double().eval()
    with torch.no_grad():
        for p in head.parameters():
            p.abs_()
    feats = [torch.rand(1, 2, IMG // s, IMG // s, dtype=torch.float64, requires_grad=True) for s in fpn_strides]
    out = head.forward_features(feats)
    c = out.shape[-1] // 2
    out[0, :, c, c].sum().backward()
    reach, n_reads = 0, 0
    for s, f in zip(fpn_strides, feats):
        nz = f.grad[0].abs().sum(0).nonzero()
        n_reads += len(nz)
        extent = (nz.max(0).values - nz.min(0).values + 1) * s  # in image pixels
        reach = max(reach, int(extent.max()))
    return reach, n_reads


fpn_reach, fpn_reads = fpn_footprint()
print(f"FPN head: one stride-4 output pixel depends on {fpn_reads} input positions over 4 levels, "
      f"a window of {fpn_reach} x {fpn_reach} image px")

with torch.device("meta"):
    deform_layer = MSDeformAttn(D_L, n_levels=3, n_heads=16, n_points=4)
    dense_layer = DenseSelfAttention(D_L, 16)
    fpn_head = FPNSegHead(D_L, 256, num_classes=150)  # the blog post's FPN head over f1..f4 (ADE20k: 150 classes)
    pixel_decoder = MSDeformAttnPixelDecoder(D_L, **DINOV3_M2F_CONFIG)
    x_enc = torch.randn(1, S_enc, D_L)
    feats_L = [torch.randn(1, D_L, IMG // s, IMG // s) for s in fpn_strides]
refs_enc = get_reference_points(enc_shapes, "meta").expand(1, S_enc, 3, 2)

counter = FlopCounterMode(display=False)
with counter:
    pixel_decoder({str(i + 1): f for i, f in enumerate(feats_L)})
enc_flops = sum(counter.get_flop_counts()["MSDeformAttnPixelDecoder.encoder"].values())
n_layers, w2048 = DINOV3_M2F_CONFIG["num_layers"], DINOV3_M2F_CONFIG["conv_dim"]
enc_flops += n_layers * deform_flops(S_enc, S_enc, w2048, 16, 3, 4)[1]  # + the sampling the counter cannot see

init_reach = int(init_bias.abs().max()) * 32  # section 4's init (P = 4 px) on the 1/32 level
table = [
    ("MSDeformAttn, 1 layer over 1/8–1/32 (d 1024, 16 heads, 4 points)", count_params(deform_layer),
     sum(deform_flops(S_enc, S_enc, D_L, 16, 3, 4)), f"{16 * 3 * 4} points × 4 corners",
     f"whole image (init ±{init_reach} px)", "yes"),
    ("dense self-attention, 1 layer over 1/8–1/32 (d 1024)", count_params(dense_layer),
     sum(dense_flops(S_enc, D_L)), f"all {S_enc} tokens", "whole image", "yes (q·k)"),
    ("FPN head (blog post) over 1/4–1/32: 4 laterals 1024→256, 3 top-down 3×3 convs", count_params(fpn_head),
     counted_flops(lambda: fpn_head(feats_L)), f"{fpn_reads} positions (fixed)", f"{fpn_reach}×{fpn_reach} px", "no"),
    (f"official pixel-decoder encoder ({n_layers} layers, d {w2048}, FFN {DINOV3_M2F_CONFIG['dim_feedforward']})",
     count_params(pixel_decoder.encoder), enc_flops, f"{n_layers} × {16 * 3 * 4} points × 4 corners",
     "whole image", "yes"),
]
md = ["| fusion | params | GFLOPs @ 512² | reads per output | reach | content-adaptive |", "|---|---|---|---|---|---|"]
md += [f"| {n} | {p / 1e6:.2f} M | {f / 1e9:.1f} | {r} | {reach} | {a} |" for n, p, f, r, reach, a in table]
display(Markdown("\n".join(md)))
assert table[0][2] < table[1][2] / 3  # deformable layer: a fraction of dense attention's FLOPs
assert table[3][2] > 10 * table[2][2]  # the official 6-layer encoder costs far more than the FPN head
assert fpn_reach < IMG

# %% [markdown] notes
# What the table says:
#
# * **Per layer, deformable attention is cheaper than dense attention** at this size (most of its FLOPs are the
#   four projections, not the mixing), and it can still reach anywhere: offsets are the unbounded output of a
#   Linear layer. What it reads *depends on the content* of each query.
# * **One FPN head costs about as much as one deformable layer** (similar parameters and FLOPs), but for a
#   different reason: its FLOPs are 3×3 convolutions on the large 1/4 level (128², where no deformable layer
#   runs). Each output sees a fixed window (measured above; wide thanks to the coarse levels) through
#   few, fixed reads — the same shape everywhere, never adapted to the image.
# * **The official encoder is big**: six layers at width 2048 with a 4096 FFN — the blog post's "costly" is about
#   width and depth, not about the deformable mixing itself.
# * The blog post's other claim, that deformable fusion "loses high-frequency detail", is about where it is used: the
#   pixel decoder applies it only to the coarse levels (1/8 to 1/32) and recovers detail with one FPN step at 1/4.
#   Sampling a few bilinear points per head is a smooth, low-pass read-out of each level.

# %% [markdown] skip
# ## 8. Summary
#
# The shape table of `MSDeformAttn` as the DINOv3 adapter's extractor uses it (the blog post's setting: batch 4,
# 512 × 512, ViT-L, D = 1024; queries = the 5376 SPM tokens, value = the 32 × 32 ViT map, 16 heads, 1 level,
# 4 points, ratio 0.5), then as the pixel decoder uses it (width 2048, 3 levels), both on the `meta` device.
# The core `ms_deform_attn` is a function, not a module, so it has no row of its own; its shapes (between
# `attention_weights` and `output_proj`) are printed under each table.

# %% skip
with torch.device("meta"):
    extractor_attn = MSDeformAttn(1024, n_levels=1, n_heads=16, n_points=4, ratio=0.5)
    q_spm, vit_map = torch.randn(4, 5376, 1024), torch.randn(4, 32 * 32, 1024)
refs_spm = get_reference_points(enc_shapes, "meta").expand(4, 5376, 1, 2)
print("adapter extractor: MSDeformAttn(1024, n_levels=1, n_heads=16, n_points=4, ratio=0.5)")
print(trace(extractor_attn, q_spm, refs_spm, vit_map, torch.tensor([[32, 32]])))


def core_shapes(m, B, Lq, S):
    M, L, P, dh = m.n_heads, m.n_levels, m.n_points, m.value_dim // m.n_heads
    return (f"core ms_deform_attn: value [{B},{S},{M},{dh}], sampling_locations [{B},{Lq},{M},{L},{P},2], "
            f"attention_weights [{B},{Lq},{M},{L},{P}] -> [{B},{Lq},{M * dh}]")


print(core_shapes(extractor_attn, 4, 5376, 1024))
with torch.device("meta"):
    decoder_attn = MSDeformAttn(2048, n_levels=3, n_heads=16, n_points=4)
    tokens_dec = torch.randn(4, 5376, 2048)
print("\npixel-decoder encoder layer: MSDeformAttn(2048, n_levels=3, n_heads=16, n_points=4)")
print(trace(decoder_attn, tokens_dec, get_reference_points(enc_shapes, "meta").expand(4, 5376, 3, 2), tokens_dec,
            torch.tensor(enc_shapes)))
print(core_shapes(decoder_attn, 4, 5376, 5376))

# %% skip
# NBVAL_IGNORE_OUTPUT
import json

result = {"loss_drop": round(loss_drop, 1), "max_miss_px": round(max(miss), 2),
          "dense_over_deform_flops_128": round(rows[-1][3] / rows[-1][2], 1)}
print("RESULT " + json.dumps(result))

# %% [markdown] slide
# ### What to remember
#
# * A deformable-attention query **predicts** $M \times L \times P$ sampling offsets (in pixels of each level) and
#   $M \times L \times P$ logits, softmaxed **jointly over levels and points** per head; it reads the value at
#   `reference + offset / (W_l, H_l)` by bilinear interpolation and takes the weighted sum. No keys, no $q \cdot k$.
# * Conventions: (x, y) order, (0, 0) = top-left **corner**, pixel centres at $(i + 0.5)/W$, zeros outside —
#   exactly `F.grid_sample(align_corners=False, padding_mode="zeros")` on `2·loc − 1`.
# * Official init: zero offset weights, offset bias = head directions on the unit square × $(i + 1)$, zero attention
#   logits (uniform $1/(LP)$), Xavier projections. An untrained layer is a fixed sparse star filter.
# * Cost: $O(L_q \cdot L \cdot P \cdot d)$ for the mixing, linear in the number of queries; dense attention is
#   $O(L_q \cdot S \cdot d)$. With every pyramid token as a query the gap grows with resolution.
# * The official forward is pure PyTorch (`grid_sample`), but its backward needs a compiled CUDA op;
#   `dinolab.msdeform` is pure PyTorch in both directions and matches transformers' reference in float64.
# * DINOv3 uses it twice: adapter extractors (16 heads, 1 level, 4 points, ratio 0.5) and the pixel decoder's
#   six encoder layers (width 2048, 16 heads, 3 levels, 4 points).

# %% [markdown] skip
# ### Exercises
#
# 1. Move a point by a tiny $\epsilon$ and check `bilinear_sample` against a finite difference: where is the
#    gradient with respect to the location discontinuous, and why does section 5 need the init to spread points out?
# 2. In section 5, give the two heads the **same** target. Do both heads end up at the same place? Then make the
#    target offset depend on the query (e.g. +6 px to the right for dark pixels, −6 for bright ones) and let
#    `sampling_offsets.weight` learn it: this is what "content-adaptive" means.
# 3. Use the box form of the reference points (`[B, Lq, L, 4]` = (cx, cy, w, h)): the offsets are then scaled by
#    $\frac{1}{P}\cdot\frac{1}{2}(w, h)$. Draw the init sampling points inside a box.
# 4. Using `deform_flops` and `dense_flops`, find the number of tokens at which one dense layer (d = 256) costs
#    as much as one deformable layer with $P = 4$, and at which it costs 100× more.
# 5. Time `ms_deform_attn` forward + backward against the transformers core (autograd through `grid_sample`)
#    at 64² (see `tests/benchmarks/msdeform_speed.py` for how dinolab's fused backward works).
