# %% [markdown] slide
# # 01 · Patch embedding: images to tokens
#
# A Vision Transformer does not read pixels; it reads **tokens**. DINOv3 makes them the way every ViT
# does: cut the image into non-overlapping 16×16 patches, flatten each patch into a vector of
# 3·16·16 = 768 numbers, and multiply every vector by one shared matrix. In this notebook you build that
# from primitives (`unfold`, then `reshape`/`permute`, then a matmul), check that it is exactly the
# strided `Conv2d` of the official `dinov3/layers/patch_embed.py` (and of `dinolab.patch_embed.PatchEmbed`),
# and then look at what it does to a real photo: the token grid, the vectors the model sees, the pixels it
# silently drops, the input normalisation, the parameter count of every released model, the official
# initialisation, and what a *linear* map of 16×16 patches can and cannot see.
#
# **Run time:** about 10 s on 2 CPU cores. Nothing is downloaded (the photo ships with matplotlib).

# %% skip
from IPython.display import Markdown

from dinolab import viz

Markdown(viz.series_map("01"))

# %% skip
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle

from dinolab import hub, utils
from dinolab.patch_embed import PatchEmbed
from dinolab.trace import trace

utils.seed_everything(0)
DEVICE = utils.get_device()  # CUDA when present; the stored outputs come from the CPU
# keep convolutions and matmuls in full fp32 on a GPU too, so the equality checks below hold there as well
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt

P = 16  # patch size of every DINOv3 ViT (DINOv2: 14)
print("device:", DEVICE.type)

# %% [markdown] slide
# ## 1. Build it from primitives
#
# Start from the photo at 224×224 (the `img_size` of every released model's config), normalised with the ImageNet
# statistics (section 5 explains why). A batch of one image has shape `(B, C, H, W)`.

# %%
img = viz.load_photo(224)  # (3, 224, 224) in [0, 1]
x = viz.normalize(img).unsqueeze(0).to(DEVICE)  # (B, C, H, W)
B, C, H, W = x.shape
h, w = H // P, W // P  # the token grid
print(f"image x            {tuple(x.shape)}   (B, C, H, W)")
print(f"token grid         h x w = {h} x {w} = {h * w} patches of {C}x{P}x{P} = {C * P * P} numbers each")

# %% [markdown] slide
# ### 1a. Cut into patches with `unfold`
# `F.unfold` slides a `kernel_size` window with step `stride` and writes every window as one column.
# With kernel = stride = 16 the windows do not overlap and tile the image exactly. Each column lists the
# window channel first, then row, then column: `(c, i, j)` with `c` slowest. Windows are numbered
# row-major: window `n` sits at grid row `n // w`, column `n % w`.

# %%
cols = F.unfold(x, kernel_size=P, stride=P)  # (B, C*P*P, h*w)
print(f"unfold             {tuple(cols.shape)}   (B, C*P*P, h*w)")
patches_unfold = cols.transpose(1, 2)  # (B, h*w, C*P*P): one row per patch
print(f"transpose(1, 2)    {tuple(patches_unfold.shape)}   (B, h*w, C*P*P)")

# %% [markdown] skip
# ### 1b. The same with `reshape` and `permute`
# No sliding window is needed when the patches do not overlap: split each spatial axis into
# (grid index, position inside the patch), then move the two grid axes to the front.

# %% skip
t = x.reshape(B, C, h, P, w, P)
print(f"reshape            {tuple(t.shape)}   (B, C, h, P, w, P)")
t = t.permute(0, 2, 4, 1, 3, 5)
print(f"permute            {tuple(t.shape)}   (B, h, w, C, P, P)")
patches = t.reshape(B, h * w, C * P * P)
print(f"reshape            {tuple(patches.shape)}   (B, h*w, C*P*P)")
torch.testing.assert_close(patches, patches_unfold, rtol=0, atol=0)  # bit-identical: only copies
print("reshape/permute == unfold, exactly")

# %% [markdown] slide
# ### 1c. Multiply by one matrix
# Every patch vector goes through the **same** linear map `W` of shape `(D, 768)` plus a bias `b` of shape
# `(D,)`. Here `D = 384`, the width of ViT-S/16. The result is one `D`-dimensional token per patch.

# %%
D = 384
Wmat = torch.randn(D, C * P * P, device=DEVICE) / math.sqrt(C * P * P)  # any matrix will do for the check
bias = torch.randn(D, device=DEVICE) * 0.1
tokens = patches @ Wmat.T + bias  # (B, h*w, C*P*P) @ (C*P*P, D) -> (B, h*w, D)
print(f"W                  {tuple(Wmat.shape)}   (D, C*P*P)")
print(f"patches @ W.T + b  {tuple(tokens.shape)}   (B, h*w, D)")

# %% [markdown] slide
# ## 2. Check it: a strided `Conv2d` is unfold + matmul
#
# A `Conv2d` with `kernel_size = stride = 16` computes, at each output position, the dot product of its
# `(C, 16, 16)` kernel with one 16×16 window. The windows do not overlap, so each output position sees
# exactly one patch, and each of the `D` kernels is one row of `W` folded back into `(C, 16, 16)`. That is
# why the official code (`dinov3/layers/patch_embed.py`) writes the patch embedding as
# `nn.Conv2d(in_chans, embed_dim, kernel_size=16, stride=16)`: same numbers, one fast kernel.
#
# We copy our `W` and `b` into `dinolab.patch_embed.PatchEmbed` (same parameter names as the official
# one: `proj.weight`, `proj.bias`) and compare.

# %% hide-input
pe = PatchEmbed(img_size=224, patch_size=P, in_chans=C, embed_dim=D).to(DEVICE)
with torch.no_grad():
    pe.proj.weight.copy_(Wmat.reshape(D, C, P, P))  # row d of W = kernel d, in (c, i, j) order
    pe.proj.bias.copy_(bias)
print(f"proj.weight        {tuple(pe.proj.weight.shape)}   (D, C, P, P)")

with torch.no_grad():
    conv_map = pe.proj(x)  # what the conv alone returns
    out = pe(x)
print(f"proj(x)            {tuple(conv_map.shape)}   (B, D, h, w)")
print(f"flatten(2).T       {tuple(conv_map.flatten(2).transpose(1, 2).shape)}   (B, h*w, D)")
print(f"PatchEmbed(x)      {tuple(out.shape)}   (B, h*w, D)   flatten_embedding=True (dinolab's default)")
torch.testing.assert_close(out, tokens, rtol=1e-4, atol=1e-4)
print("PatchEmbed(x) == patches @ W.T + b   (assert_close passed)")

# %% [markdown] slide
# **The layout the ViT uses.** The official `DinoVisionTransformer` builds its `PatchEmbed` with
# `flatten_embedding=False`, so the patch embedding returns a **grid** `(B, h, w, D)`;
# `prepare_tokens_with_masks` (in `dinov3/models/vision_transformer.py`) then calls `x.flatten(1, 2)`.
# Flattening `(h, w)` is row-major, `h` outer: token `n` is the patch at row `n // w`, column `n % w`,
# the same order as `unfold`. RoPE (notebook 02) relies on this order to give each token its (row, column).

# %% hide-input
pe_grid = PatchEmbed(img_size=224, patch_size=P, embed_dim=D, flatten_embedding=False).to(DEVICE)
pe_grid.load_state_dict(pe.state_dict())
with torch.no_grad():
    grid = pe_grid(x)
print(f"PatchEmbed(x)      {tuple(grid.shape)}   (B, h, w, D)   flatten_embedding=False (the ViT's choice)")
seq = grid.flatten(1, 2)
print(f"flatten(1, 2)      {tuple(seq.shape)}   (B, h*w, D)")
torch.testing.assert_close(seq, out, rtol=0, atol=0)
r, c = 3, 5  # any grid cell
n = r * w + c
torch.testing.assert_close(seq[0, n], grid[0, r, c], rtol=0, atol=0)
print(f"token {n} = grid cell (row {r}, col {c}) = (n // w, n % w)")

# %% [markdown] skip
# The ViT then puts a `[CLS]` token and 4 storage tokens in front of the patches (the whole token layout is
# drawn in [notebook 00](00_dino_v1_v2_v3.ipynb), section 3); on the meta device, shapes only:

# %% skip
vits = hub.dinov3_vits16(device="meta")
seq_meta, (hh, ww) = vits.prepare_tokens_with_masks(torch.empty(1, 3, 224, 224, device="meta"))
print(f"ViT-S/16 tokens    {tuple(seq_meta.shape)}   = 1 cls + {vits.n_storage_tokens} storage + {hh}x{ww} patches")
assert seq_meta.shape[1] == 1 + 4 + 196

# %% [markdown] slide
# ## 3. Look at it: token grids over a real photo
#
# Every cell of the grid becomes one token. At 224×224 that is 14×14 = 196 tokens. DINOv3 has no learned
# absolute position table, only RoPE, so any size whose sides are multiples of 16 works, square or not:
# a 288×240 (H×W) image gives an 18×15 grid. The small numbers are token indices (row-major).

# %% slide hide-input
img_rect = viz.load_photo((288, 240))  # (H, W): the photo's own aspect ratio is about 1.17
print(f"square  {tuple(img.shape)} -> grid {img.shape[1] // P}x{img.shape[2] // P} = {(img.shape[1] // P) * (img.shape[2] // P)} tokens")
print(f"portrait {tuple(img_rect.shape)} -> grid {img_rect.shape[1] // P}x{img_rect.shape[2] // P} = {(img_rect.shape[1] // P) * (img_rect.shape[2] // P)} tokens")


def annotate_indices(ax, gh, gw, cells):
    for rr, cc in cells:
        ax.text(cc * P + P / 2, rr * P + P / 2, str(rr * gw + cc), color="yellow", fontsize=10,
                ha="center", va="center", fontweight="bold",
                bbox=dict(boxstyle="square,pad=0.1", fc="black", ec="none", alpha=0.6))


fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [224, 240 * 224 / 288]})
viz.draw_patch_grid(axes[0], img, title="224 x 224 -> 14 x 14 = 196 tokens")
annotate_indices(axes[0], 14, 14, [(0, 0), (0, 1), (0, 13), (1, 0), (7, 7), (13, 13)])
viz.draw_patch_grid(axes[1], img_rect, title="288 x 240 -> 18 x 15 = 270 tokens")
annotate_indices(axes[1], 18, 15, [(0, 0), (0, 14), (1, 0), (17, 14)])
fig.tight_layout()
plt.show()

# %% [markdown] slide
# ### What one token starts from: 768 numbers
# The model never sees "a patch"; it sees a vector. Below, four patches of the 224 photo and the 768
# numbers each one becomes (normalised pixels, in the `(c, i, j)` order of `unfold` and of the conv
# kernel: the 256 red values row by row, then the 256 green, then the 256 blue). Flat sky is three flat
# bands; the star and the ribbons oscillate with a period of 16 (one patch row).

# %% slide hide-input
chosen = {"star (3,1)": (3, 1), "glasses (4,6)": (4, 6), "sky (2,12)": (2, 12), "ribbons (12,10)": (12, 10)}
patches_raw = F.unfold(img.unsqueeze(0), P, stride=P)[0].T  # (196, 768) raw pixels in [0, 1]
patches_norm = patches[0].cpu()  # (196, 768) normalised, what the matmul gets
lo = min((0 - m) / sd for m, sd in zip(viz.IMAGENET_MEAN, viz.IMAGENET_STD))
hi = max((1 - m) / sd for m, sd in zip(viz.IMAGENET_MEAN, viz.IMAGENET_STD))
print(f"one patch: {tuple(patches_norm[0].shape)} numbers; raw in [0, 1], normalised in [{lo:.2f}, {hi:.2f}]")

fig = plt.figure(figsize=(12.8, 5.4))
gs = fig.add_gridspec(2, 5, width_ratios=[1.3, 1, 1, 1, 1], height_ratios=[1, 1])
ax = fig.add_subplot(gs[:, 0])
viz.draw_patch_grid(ax, img, lw=0.3, title="where the patches are")
colors = ["tab:orange", "tab:green", "tab:cyan", "tab:pink"]
for (name, (rr, cc)), col in zip(chosen.items(), colors):
    ax.add_patch(Rectangle((cc * P - 0.5, rr * P - 0.5), P, P, fill=False, ec=col, lw=2))
for k, ((name, (rr, cc)), col) in enumerate(zip(chosen.items(), colors)):
    idx = rr * 14 + cc
    a = fig.add_subplot(gs[0, k + 1])
    a.imshow(viz.to_numpy_image(patches_raw[idx].reshape(3, P, P)), interpolation="nearest")
    a.set_title(f"{name}\ntoken {idx}", fontsize=12, color=col)
    a.set_xticks([])
    a.set_yticks([])
    a = fig.add_subplot(gs[1, k + 1])
    v = patches_norm[idx].numpy()
    for ch, chc in enumerate(["red", "green", "blue"]):
        a.plot(np.arange(ch * 256, (ch + 1) * 256), v[ch * 256:(ch + 1) * 256], color=chc, lw=0.6)
    a.set_ylim(-2.3, 2.8)
    a.set_xticks([0, 256, 512, 768])
    a.tick_params(labelsize=10)
    a.set_xlabel("index in the 768-vector", fontsize=11)
    if k == 0:
        a.set_ylabel("normalised value", fontsize=11)
fig.tight_layout()
plt.show()

# %% [markdown] slide
# ## 4. Sizes that are not multiples of 16
#
# What if `H` or `W` is not a multiple of 16? A stride-16 conv without padding produces
# `floor(H / 16) x floor(W / 16)` outputs and never reads the last `H mod 16` rows and `W mod 16` columns.
# The official `PatchEmbed` has its size asserts commented out, so it **crops silently** (the official
# MODEL_CARD: "the model will crop to the closest smaller multiple of the patch size").
# **Our choice:** `dinolab`'s `PatchEmbed` raises a clear error by default; `strict_img_size=False` gives the
# official behaviour.

# %% hide-input
img_odd = viz.load_photo((250, 220))  # 250 = 15*16 + 10, 220 = 13*16 + 12
x_odd = viz.normalize(img_odd).unsqueeze(0).to(DEVICE)
print(f"image              {tuple(x_odd.shape)}")
try:
    pe(x_odd)
except ValueError as e:
    print(f"{type(e).__name__}: {e}")

# %% skip
pe_official = PatchEmbed(patch_size=P, embed_dim=D, strict_img_size=False).to(DEVICE)  # the official behaviour
pe_official.load_state_dict(pe.state_dict())
with torch.no_grad():
    out_odd = pe_official(x_odd)
Hc, Wc = (x_odd.shape[2] // P) * P, (x_odd.shape[3] // P) * P
print(f"strict_img_size=False  {tuple(out_odd.shape)}   = {Hc // P} x {Wc // P} tokens")
with torch.no_grad():
    out_crop = pe(x_odd[:, :, :Hc, :Wc])  # crop top-left Hc x Wc ourselves
torch.testing.assert_close(out_odd, out_crop, rtol=0, atol=0)
print(f"identical to cropping the top-left {Hc}x{Wc} by hand: the bottom rows and right columns are dropped")

# %% [markdown]
# Which pixels are dropped? Ask the model rather than the formula: a pixel that influences no token has a
# gradient of exactly zero. Shade those pixels and count them.

# %% slide hide-input
x_req = x_odd.clone().requires_grad_(True)
pe_official(x_req).sum().backward()
used = x_req.grad[0].abs().sum(0) > 0  # (H, W): True where some token depends on the pixel
n_total = used.numel()
n_dropped = int((~used).sum())
print(f"pixels: {n_total} in the image, {int(used.sum())} used, {n_dropped} dropped ({100 * n_dropped / n_total:.1f} %)")
print(f"formula: H*W - floor(H/16)*16 * floor(W/16)*16 = {250 * 220} - {Hc}*{Wc} = {250 * 220 - Hc * Wc}")
assert n_dropped == 250 * 220 - Hc * Wc
assert not used[Hc:, :].any() and not used[:, Wc:].any() and used[:Hc, :Wc].all()

fig, axes = plt.subplots(1, 2, figsize=(12.8, 5.2))
shade = np.zeros((*used.shape, 4))
shade[~used.cpu().numpy()] = (1.0, 0.0, 0.0, 0.6)
viz.draw_patch_grid(axes[0], img_odd, lw=0.3, title=f"250 x 220: {n_dropped} pixels never seen (red)")
axes[0].imshow(shade, interpolation="nearest")
Z = 40  # the bottom-right corner, where the last full patch ends
viz.draw_patch_grid(axes[1], img_odd, lw=1.0)
axes[1].imshow(shade, interpolation="nearest")
axes[1].set_xlim(220 - Z - 0.5, 220 - 0.5)
axes[1].set_ylim(250 - 0.5, 250 - Z - 0.5)
axes[1].set_title(f"zoom on the last {Z} x {Z} px: {250 - Hc} rows, {220 - Wc} columns cut")
axes[0].add_patch(plt.Rectangle((220 - Z - 0.5, 250 - Z - 0.5), Z, Z, fill=False, ec="yellow", lw=2))
fig.tight_layout()
plt.show()

# %% [markdown] skip
# Up to 15 rows and 15 columns can disappear, always at the bottom and the right. For a 224 model that is
# at most ~13 % of the pixels. Resize (or pad) to a multiple of 16 yourself so that you choose what is lost.

# %% [markdown] skip
# ## 5. Normalisation
#
# The pixels are normalised per channel before the patch embedding, `(x - mean) / std`, in the data
# transform (`make_normalize_transform` in `dinov3/data/transforms.py`; the README's example transforms),
# not inside the model. The statistics depend on the
# weights you use (official README):
#
# | weights | mean (R, G, B) | std (R, G, B) |
# |---|---|---|
# | LVD-1689M (web images) | 0.485, 0.456, 0.406 (the ImageNet values) | 0.229, 0.224, 0.225 |
# | SAT-493M (satellite)   | 0.430, 0.411, 0.296 | 0.213, 0.156, 0.143 |
#
# Per-channel statistics of our photo before and after:

# %% skip
STATS = {"LVD-1689M": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
         "SAT-493M": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))}
versions = {"raw [0, 1]": img}
versions.update({f"{k} norm.": viz.normalize(img, mean=m, std=s) for k, (m, s) in STATS.items()})
print(f"{'':16s}" + "".join(f"{ch + ' mean':>10s}{ch + ' std':>9s}" for ch in "RGB"))
for name, v in versions.items():
    m, s = v.mean(dim=(1, 2)), v.std(dim=(1, 2))
    print(f"{name:16s}" + "".join(f"{m[i]:10.3f}{s[i]:9.3f}" for i in range(3)))

# %% skip
fig, axes = plt.subplots(1, 3, figsize=(12.8, 3.8), sharey=True)
for a, (name, v) in zip(axes, versions.items()):
    for ch, col in enumerate(["red", "green", "blue"]):
        a.hist(v[ch].flatten().numpy(), bins=60, histtype="step", color=col, density=True)
    a.set_title(name)
    a.axvline(0, color="k", lw=0.5)
axes[0].set_ylabel("density")
fig.tight_layout()
plt.show()

# %% [markdown] skip
# Normalisation roughly centres each channel and scales it to unit spread, so that the initial weights
# (section 7) see inputs of a known size. It is a per-channel affine map, and the patch embedding is affine
# too, so the two compose into one: a model with normalisation **folded into** its patch embedding takes
# raw `[0, 1]` pixels and gives the same tokens:
#
# `W' = W / std` (per input channel), `b' = b - sum over (c, i, j) of W * mean / std`.

# %% skip
mean_t = torch.tensor(STATS["LVD-1689M"][0], device=DEVICE).view(1, C, 1, 1)
std_t = torch.tensor(STATS["LVD-1689M"][1], device=DEVICE).view(1, C, 1, 1)
pe_fold = PatchEmbed(patch_size=P, embed_dim=D).to(DEVICE)
with torch.no_grad():
    pe_fold.proj.weight.copy_(pe.proj.weight / std_t)
    pe_fold.proj.bias.copy_(pe.proj.bias - (pe.proj.weight * mean_t / std_t).sum(dim=(1, 2, 3)))
    tokens_fold = pe_fold(img.unsqueeze(0).to(DEVICE))  # raw pixels in
torch.testing.assert_close(tokens_fold, out, rtol=1e-4, atol=1e-4)
print("PatchEmbed(normalize(img)) == folded PatchEmbed(img)")

# %% [markdown] slide
# ## 6. How many parameters? Every released configuration
#
# The patch embedding is one `(D, 3, 16, 16)` kernel plus a `(D,)` bias: `3·16·16·D + D` parameters. We
# build each released model on the meta device (no memory) and count; the whole models' parameter counts and
# FLOPs are in [notebook 00](00_dino_v1_v2_v3.ipynb).

# %% hide-input
rows = []
for name in hub.RELEASED:
    m = hub.build(name, device="meta")
    Dm = m.embed_dim
    n_pe = utils.count_params(m.patch_embed)
    assert n_pe == 3 * 16 * 16 * Dm + Dm
    rows.append((name, Dm, n_pe, utils.count_params(m)))
table = ["| model | D | patch embed 3·16·16·D + D | share of the model | MACs at 224 (196·768·D) |",
         "|---|---:|---:|---:|---:|"]
for name, Dm, n_pe, n_all in rows:
    table.append(f"| `{name}` | {Dm} | {n_pe:,} | {100 * n_pe / n_all:.2f} % | {196 * 768 * Dm / 1e6:.1f} M |")
Markdown("\n".join(table))

# %% skip
shares = {name: n_pe / n_all for name, _, n_pe, n_all in rows}
assert max(shares.values()) < 0.015 and min(shares.values()) < 0.0005 and rows[-1][2] == 3_149_824
print(f"largest share {100 * max(shares.values()):.2f} % ({max(shares, key=shares.get)}), "
      f"smallest {100 * min(shares.values()):.3f} % ({min(shares, key=shares.get)})")

# %% [markdown]
# The patch embedding is about 1 % of a small model and under 0.05 % of the 7B one: a negligible share of
# the parameters, yet every bit of information the transformer gets passes through it. The official
# ViT-7B pretraining config, `dinov3/configs/train/dinov3_vit7b16_pretrain.yaml`, gives it a reduced learning
# rate (a patch-embedding learning-rate multiplier of 0.2).

# %% [markdown] skip
# ## 7. The official initialisation
#
# `PatchEmbed.reset_parameters` in `dinov3/layers/patch_embed.py` draws weight and bias from
# `U(-sqrt(k), sqrt(k))` with `k = 1 / (in_chans · p²) = 1/768`. We measure it on a fresh ViT-S patch
# embedding. (This happens to be exactly PyTorch's default `Conv2d` init: `kaiming_uniform_(a=sqrt(5))`
# gives the same bound `1/sqrt(fan_in)`; with the same seed the two are bit-identical.)

# %% skip
utils.seed_everything(0)
pe_init = PatchEmbed(patch_size=P, embed_dim=384)
torch.manual_seed(1)
pe_init.reset_parameters()
wt, bs = pe_init.proj.weight.detach(), pe_init.proj.bias.detach()
bound = math.sqrt(1 / (3 * P * P))
print(f"bound sqrt(1/768)  {bound:.4f}")
print(f"weight  min {wt.min():.4f}  max {wt.max():.4f}  std {wt.std():.4f}   (uniform std = bound/sqrt(3) = {bound / math.sqrt(3):.4f})")
print(f"bias    min {bs.min():.4f}  max {bs.max():.4f}")
assert wt.abs().max() <= bound and bs.abs().max() <= bound
assert abs(wt.std().item() - bound / math.sqrt(3)) < 0.01 * bound
torch.manual_seed(1)
conv_default = torch.nn.Conv2d(3, 384, P, P)
torch.testing.assert_close(conv_default.weight, pe_init.proj.weight, rtol=0, atol=0)
print("identical to nn.Conv2d's default init with the same seed")

# %% [markdown] skip
# What size are the tokens at init? For a fixed input patch `x` and i.i.d. weights with variance
# `σ² = bound²/3 = 1/(3·768)`, each token coordinate has variance `σ²·‖x‖² + σ²` (weights and bias), i.e.
# `mean(x²)/3 + 1/2304`, whatever the patch size: that is what the `1/fan_in` scaling is for. Over a dataset
# normalised to zero mean and unit variance, `mean(x²) ≈ 1` and tokens start with a standard deviation near
# `sqrt(1/3) ≈ 0.58`. Our single photo is darker than average (negative means, std above 1 after
# normalisation, section 5), so its `mean(x²)` is larger.

# %% skip
with torch.no_grad():
    tok0 = pe_init(x.cpu())[0]  # (196, 384)
msq = patches[0].cpu().pow(2).mean().item()
pred = msq / 3 + bound**2 / 3
meas = tok0.pow(2).mean().item()
print(f"mean(x²) of the normalised photo {msq:.3f}")
print(f"predicted E[token²] {pred:.3f}   measured {meas:.3f}   (token std {math.sqrt(meas):.3f})")
assert abs(meas / pred - 1) < 0.15

# %% [markdown] slide
# ## 8. Run it: what a linear map of 16×16 patches can see
#
# The patch embedding is linear, so it can only keep (or drop) **directions** in the 768-dimensional patch
# space. Which directions carry the image? Take many 16×16 patches of the photo (stride 4, so they
# overlap), run a PCA, and draw the principal directions as 16×16 RGB images.

# %% hide-input
pix = F.unfold(img.unsqueeze(0), P, stride=4)[0].T  # (N, 768) raw pixels
print(f"patches for the PCA  {tuple(pix.shape)}   (N, C*P*P)")
mean_patch = pix.mean(0)
U, S, Vh = torch.linalg.svd(pix - mean_patch, full_matrices=False)  # rows of Vh: principal directions
var = S**2 / (S**2).sum()
cum = var.cumsum(0)
k90, k99 = int((cum < 0.90).sum()) + 1, int((cum < 0.99).sum()) + 1
print(f"Vh                   {tuple(Vh.shape)}   (768 directions, each C*P*P)")
print(f"variance in PC 1: {100 * var[0]:.1f} %; PCs for 90 %: {k90}; for 99 %: {k99} (of 768)")
print(f"variance kept by the top 384 directions (the width of ViT-S): {100 * cum[383]:.3f} %")
assert k90 < 20 and k99 < 200


def recon(k):
    """Photo rebuilt from the top-k directions of each non-overlapping patch."""
    p = patches_raw - mean_patch
    p = p @ Vh[:k].T @ Vh[:k] + mean_patch  # (196, 768)
    return F.fold(p.T.unsqueeze(0), (224, 224), P, stride=P)[0]


def psnr(a, b):
    return (10 * torch.log10(1 / (a - b).pow(2).mean())).item()


ks = [1, 4, 16, 64]
psnrs = {k: psnr(recon(k).clamp(0, 1), img) for k in ks}
print("PSNR of the photo rebuilt from the top-k directions:", ", ".join(f"k={k}: {v:.1f} dB" for k, v in psnrs.items()))
assert psnrs[64] > psnrs[16] > psnrs[4] > psnrs[1]

# %% slide hide-input
fig = plt.figure(figsize=(12.8, 5.6))
gs = fig.add_gridspec(2, 8)
for i in range(8):
    a = fig.add_subplot(gs[0, i])
    comp = Vh[i].reshape(3, P, P)
    a.imshow(viz.to_numpy_image(0.5 + 0.5 * comp / comp.abs().max()), interpolation="nearest")
    a.set_title(f"PC {i + 1}: {100 * var[i]:.1f} %", fontsize=11)
    a.set_xticks([])
    a.set_yticks([])
a = fig.add_subplot(gs[1, :3])
a.semilogx(np.arange(1, 769), cum.numpy(), color="k")
for kk, ls in [(k90, ":"), (k99, "--")]:
    a.axvline(kk, color="tab:red", ls=ls, lw=0.8)
a.axvline(384, color=viz.COLORS[0], lw=1.2)
a.text(384, 0.75, "ViT-S D=384 ", color=viz.COLORS[0], fontsize=11, rotation=90, va="center", ha="right")
a.set_xlabel("number of directions k")
a.set_ylabel("variance kept")
a.set_title(f"90 % at k={k90}, 99 % at k={k99}", fontsize=12)
for j, k in enumerate(ks):
    a = fig.add_subplot(gs[1, 3 + j])
    a.imshow(viz.to_numpy_image(recon(k)))
    a.set_title(f"top {k}: {psnrs[k]:.1f} dB", fontsize=11)
    a.set_xticks([])
    a.set_yticks([])
a = fig.add_subplot(gs[1, 7])
a.imshow(viz.to_numpy_image(img))
a.set_title("original", fontsize=11)
a.set_xticks([])
a.set_yticks([])
fig.tight_layout()
plt.show()

# %% [markdown] notes
# The first directions are smooth: overall brightness, a colour contrast (blue sky and flag against skin and
# gold), then top/bottom and left/right gradients, then finer stripes, much like the low frequencies of a 2-D
# cosine basis (the sign of a direction is arbitrary). A handful of them hold
# most of the variance, and 384 directions (ViT-S) keep almost all of it, so the *width* of the embedding is
# not what limits the model. What a linear map cannot do:
#
# * **Nothing nonlinear.** "Is there an edge here, of either sign, anywhere in the patch?" is not a linear
#   function of the pixels. Those features are built by the transformer blocks after the embedding.
# * **Nothing across patch borders.** Each token sees its own 16×16 window only; a structure cut by a grid line
#   reaches the model as two halves, and the blocks must put it together. The grid is fixed, so moving the
#   image by 16 pixels only renumbers the tokens, while moving it by 8 changes every token. Below, each token
#   of the shifted image is compared with the best-matching of the two old tokens it overlaps:

# %% skip
wide = viz.normalize(viz.load_photo((224, 256))).unsqueeze(0)  # wider, so we can slide a 224 window
with torch.no_grad():
    ref = pe_init(wide[..., 0:224]).reshape(14, 14, -1)  # old tokens, (h, w, D)
    best = {}
    for s in [0, 4, 8, 12, 16]:
        new = pe_init(wide[..., s:s + 224]).reshape(14, 14, -1)
        # new token (r, c) covers columns s + 16c ... s + 16c + 15: it overlaps old tokens (r, c) and (r, c + 1)
        cos_left = F.cosine_similarity(new[:, :13], ref[:, :13], dim=-1)
        cos_right = F.cosine_similarity(new[:, :13], ref[:, 1:], dim=-1)
        best[s] = torch.maximum(cos_left, cos_right).mean().item()
        print(f"shift {s:2d} px: mean cosine(new token, best old token) = {best[s]:.3f}")
    renum = (new[:, :13] - ref[:, 1:]).abs().max().item()  # new is the 16 px shift here
assert renum < 1e-5 and best[0] > 0.999 and best[16] > 0.999 and best[8] < min(best[4], best[12])
print("shift 16 px: new token (r, c) == old token (r, c + 1) for all 14 x 13 shared cells")

# %% [markdown] slide
# ## 9. Summary
#
# The shape table of the component (`dinolab.trace`), as the ViT uses it (`flatten_embedding=False`),
# for ViT-S at 224 and for the dense-prediction setting of notebooks 06–10 (ViT-L, B = 4, 512×512) on the meta device:

# %%
trace(PatchEmbed(embed_dim=384, flatten_embedding=False), torch.empty(1, 3, 224, 224))

# %% skip
trace(hub.dinov3_vitl16(device="meta").patch_embed, torch.empty(4, 3, 512, 512, device="meta"))

# %% [markdown] slide
# **What to remember**
#
# * Patch embedding = cut into non-overlapping 16×16 patches, flatten each to `3·16·16 = 768` numbers in
#   `(c, i, j)` order, apply one shared `(D, 768)` matrix and a bias. A `Conv2d(3, D, 16, stride=16)` is
#   exactly that (checked above against `unfold` + matmul).
# * Shapes: `(B, 3, H, W) → conv (B, D, H/16, W/16) → (B, H/16·W/16, D)`. The official ViT keeps the grid
#   `(B, h, w, D)` (`flatten_embedding=False`) and flattens it row-major, `h` outer: token `n` is at
#   `(n // w, n % w)`. Then 1 cls + 4 storage tokens go in front: 201 tokens at 224.
# * Sides that are not multiples of 16: the official code drops the last `H mod 16` rows and `W mod 16`
#   columns without a word; `dinolab` raises unless `strict_img_size=False`.
# * Inputs are normalised per channel with the statistics of the weights: LVD-1689M uses the ImageNet
#   mean/std, SAT-493M its own. Normalisation can be folded into the patch embedding.
# * Parameters: `3·16·16·D + D`, about 1 % of ViT-S and under 0.05 % of ViT-7B. Init: `U(±1/sqrt(768))`,
#   the same as PyTorch's default conv init; tokens start with std ≈ 0.58.
# * Linear means: it chooses directions in patch space (the smooth, low-frequency ones carry most of the
#   variance); anything nonlinear or across patch borders is the transformer's job.

# %% [markdown] skip
# **Exercises**
#
# 1. DINOv2 uses patch size 14. Redo section 1 with `P = 14`: how many tokens at 224? At 518 (DINOv2's
#    high-resolution size)? How many parameters has a ViT-L/14 patch embedding?
# 2. Write `unpatchify`: `(B, h*w, C*P*P) → (B, C, H, W)` with `reshape`/`permute`, and check that it
#    inverts section 1b (and equals `F.fold`).
# 3. Fold the SAT-493M normalisation into a ViT-L patch embedding and check it against
#    `PatchEmbed(normalize(img))` as in section 5.
# 4. A 600×512 photo (this one at full size) goes into the official model. How many tokens does it give, and
#    how many pixels are dropped? Verify with `PatchEmbed(strict_img_size=False)` and the gradient trick.
# 5. Train only a patch embedding (D = 16) plus a linear decoder back to 768 numbers to reconstruct the
#    photo's patches. Compare its reconstruction error with the top-16 PCA of section 8. Why can it not do better?
