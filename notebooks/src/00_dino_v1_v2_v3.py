# %% [markdown]
# # 00 · DINO v1 → v2 → v3: what changed
#
# This notebook is the map before the journey. It puts the three generations of DINO side by side in tables
# you can show at a group meeting, and then **computes** the facts about DINOv3 instead of quoting them:
# the exact parameter count of the seven released backbones (checked against the official numbers), their
# token counts, and their forward FLOPs from a small counting function that we check against PyTorch's own
# FLOP counter. Along the way it corrects the claims of the blog post this project started from
# (`shared/seed`): DINOv2's patch size, DINOv3's model range, and the "online token matching" objective that
# DINOv3 does not have.
#
# Nothing here trains. Every model is built on PyTorch's `meta` device (shapes only, no memory), so even the
# 6.7-billion-parameter ViT-7B is built in a moment. One tiny real ViT runs on the CPU for the FLOP check.
# Expected run time: about 15 s on 2 CPU cores.

# %%
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("00")))

# %% [markdown]
# ### What you build in each notebook
#
# - **00** (this one): the comparison tables, the released-model table, a FLOP counter. Nothing to train.
# - **01 Patch embedding**: cut an image into 16×16 patches, flatten and project them, and prove that this is
#   exactly a `Conv2d` with kernel = stride = 16; see what happens when the image is not a multiple of 16.
# - **02 RoPE**: the 2-D axial rotary position embedding of DINOv3, from the period formula to `(sin, cos)`
#   tables; check that a query–key score depends only on the offset between two patches.
# - **03 Attention and blocks**: multi-head self-attention with the fused `qkv` matrix and the masked K bias,
#   RoPE on patch tokens only, then the pre-norm block with LayerScale and the SwiGLU feed-forward.
# - **04 The ViT backbone**: assemble the whole DINOv3 ViT, build the seven released configurations, load
#   real weights when you have them, and read its outputs (cls, storage and patch tokens, intermediate layers).
# - **05 Self-distillation**: the training losses — DINO with Sinkhorn–Knopp centring, iBOT on masked patches,
#   KoLeo, Gram anchoring — with an EMA teacher and multi-crop, and a tiny pretraining run on the CPU.
# - **06 Spatial Prior Module**: the small convolutional stem of the segmentation adapter (features at
#   strides 4, 8, 16, 32).
# - **07 Deformable attention**: multi-scale deformable attention in plain PyTorch (`grid_sample`).
# - **08 Adapter interaction**: the blocks where the SPM tokens read the frozen ViT's layers (official
#   DINOv3: extractor only, no injector back into the ViT).
# - **09 Pixel decoder and FPN**: the deformable-attention encoder over three scales and the FPN step to 1/4.
# - **10 Segmentation**: the pieces together, trained on the procedural ShapesWorld scenes, with mIoU.
# - **11 Depth**: a DPT head with depth bins and the scale-invariant log loss.
# - **12 Classification**: linear probe and k-NN on cls + mean-pooled patch features.
# - **13 LoRA**: low-rank updates on the q and v parts of the fused `qkv`, merged back after training.

# %%
import math

import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinolab import hub, vit
from dinolab.attention import LinearKMaskedBias
from dinolab.block import RMSNorm, SwiGLUFFN
from dinolab.trace import trace
from dinolab.utils import count_params, seed_everything

seed_everything(0)
torch.set_num_threads(2)
META = torch.device("meta")


def md_table(header, rows):
    """A Markdown table from a header and rows of values (everything str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


# The official parameter counts (README / hub models of facebookresearch/dinov3; see
# shared/reference/dinov3_official.md §2). They are the *targets* we assert against, not the numbers we show.
OFFICIAL_PARAMS = {
    "dinov3_vits16": 21_601_152, "dinov3_vits16plus": 28_697_472, "dinov3_vitb16": 85_669_632,
    "dinov3_vitl16": 303_154_176, "dinov3_vitl16plus": 403_915_776, "dinov3_vith16plus": 840_633_600,
    "dinov3_vit7b16": 6_716_043_264,
}
SHORT = {"dinov3_vits16": "ViT-S/16", "dinov3_vits16plus": "ViT-S+/16", "dinov3_vitb16": "ViT-B/16",
         "dinov3_vitl16": "ViT-L/16", "dinov3_vitl16plus": "ViT-L+/16", "dinov3_vith16plus": "ViT-H+/16",
         "dinov3_vit7b16": "ViT-7B/16"}
assert list(OFFICIAL_PARAMS) == hub.RELEASED
print("released configurations:", len(hub.RELEASED))

# %% [markdown]
# ## 1. The backbone: v1 vs v2 vs v3
#
# **Where the facts come from.** The DINOv3 column is read from the official code
# (`facebookresearch/dinov3`: `hubconf.py`, `dinov3/hub/backbones.py`, `dinov3/models/vision_transformer.py`,
# `dinov3/layers/*`), and below we read the same values from `dinolab`'s model, which loads official
# checkpoints with `strict=True`. The DINO v1 and DINOv2 columns state only well-known facts of their papers
# and releases: DINO (Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, ICCV 2021),
# DINOv2 (Oquab et al., 2023) and *Vision Transformers Need Registers* (Darcet et al., 2023), which added the
# register tokens to DINOv2. Their architecture rows (position table, qkv bias, LayerNorm eps, LayerScale,
# SwiGLU in ViT-g, 518 px / patch 14 hub models) were also checked in `vision_transformer.py` of
# `facebookresearch/dino` and in `dinov2/models/vision_transformer.py` and `dinov2/hub/backbones.py` of
# `facebookresearch/dinov2`; their objective and data rows come from the papers.
#
# First, read the DINOv3 facts off a model. ViT-S/16 on the meta device costs no memory:

# %%
vits_meta = hub.build("dinov3_vits16", device=META).eval()
blk = vits_meta.blocks[0]
v3 = {
    "patch": vits_meta.patch_embed.patch_size[0],
    "n_storage": vits_meta.storage_tokens.shape[1],
    "pos_params": [n for n, _ in vits_meta.named_parameters() if "pos" in n],
    "rope_periods": tuple(vits_meta.rope_embed.periods.shape),
    "rope_base": vits_meta.rope_embed.base,
    "rope_coords": vits_meta.rope_embed.normalize_coords,
    "layerscale_init": blk.ls1.init_values,
    "norm": f"{type(vits_meta.norm).__name__}(eps={vits_meta.norm.eps:g})",
    "qkv": type(blk.attn.qkv).__name__,
    "mask_token": tuple(vits_meta.mask_token.shape),
}
for k, v in v3.items():
    print(f"{k:16s} {v}")
assert v3["patch"] == 16 and v3["n_storage"] == 4 and v3["pos_params"] == []
assert v3["layerscale_init"] == 1e-5 and vits_meta.norm.eps == 1e-5 and isinstance(blk.attn.qkv, LinearKMaskedBias)

# %% [markdown]
# No parameter has `pos` in its name: DINOv3 has **no learned position embedding**. Position enters only through
# RoPE, whose state is a buffer of 16 periods per head (`rope_embed.periods`), not a learned table.
# Compare with the learned tables of v1 and v2. Their size follows from the patch grid at the training
# resolution (v1: 224 px, patch 16 → 14×14 grid; v2: 518 px, patch 14 → 37×37 grid), plus one row for [CLS]:

# %%
D_S = 384  # ViT-S width in all three generations
pos_table = {
    "DINO v1 ViT-S/16 (224 px)": (1 + (224 // 16) ** 2) * D_S,
    "DINOv2 ViT-S/14 (518 px)": (1 + (518 // 14) ** 2) * D_S,
    "DINOv3 ViT-S/16": sum(p.numel() for n, p in vits_meta.named_parameters() if "pos" in n),
}
for k, v in pos_table.items():
    print(f"{k:28s} learned position parameters: {v:>9,}")

# %% [markdown]
# A learned table knows one grid only; at another resolution it must be resized (bicubic interpolation in
# v1 and v2), which the network never saw during training. RoPE instead computes angles from patch
# coordinates normalised to [-1, 1], so any grid works (notebook 02).

# %%
arch_rows = [
    ["Patch size", "16 and 8 (ViT-S/16, S/8, B/16, B/8)", "14 (ViT-S/14, B/14, L/14, g/14)", f"{v3['patch']}", "papers, code / `hub/backbones.py`"],
    ["Position encoding", "learned absolute table, interpolated for other resolutions",
     "learned absolute table (trained at 518 px), interpolated",
     f"2-D axial RoPE on q,k of patch tokens (base {v3['rope_base']:g}, coords `{v3['rope_coords']}` in [-1,1]); "
     f"no learned pos-embed", "papers, code / `layers/rope_position_encoding.py`"],
    ["Extra tokens", "[CLS]", "[CLS]; +4 registers in the `_reg` variants (2023)",
     f"[CLS] + {v3['n_storage']} storage tokens, right after [CLS]", "papers, code / `vision_transformer.py`"],
    ["Mask token", "none (no masked modelling)", "yes (iBOT)", f"yes, shape {v3['mask_token']} (iBOT)",
     "papers, code / `vision_transformer.py`"],
    ["Block", "pre-norm ViT: LayerNorm, attention, GELU MLP (×4)",
     "pre-norm ViT + LayerScale; SwiGLU FFN in ViT-g",
     f"pre-norm + LayerScale (init {v3['layerscale_init']:g}); GELU MLP in S/B/L, SwiGLU in S+/L+/H+/7B",
     "papers, code / `layers/block.py`"],
    ["Attention", "fused qkv with bias (`qkv_bias=True`)", "fused qkv with bias",
     f"fused qkv, K third of the bias masked to 0 (`{v3['qkv']}`); no qkv bias in 7B",
     "papers, code / `layers/attention.py`"],
    ["Norm", "LayerNorm (eps 1e-6)", "LayerNorm (eps 1e-6)",
     f"{v3['norm']} everywhere; RMSNorm exists in the code but no released model uses it",
     "papers, code / `hub/backbones.py` (`layernormbf16`)"],
    ["Outputs", "[CLS] (+ patch tokens)", "[CLS], registers, patch tokens, intermediate layers",
     "`x_norm_clstoken`, `x_storage_tokens`, `x_norm_patchtokens`, `x_prenorm`; intermediate layers",
     "`forward_features`"],
]
display(md_table(["", "DINO v1 (2021)", "DINOv2 (2023)", "DINOv3 (2025)", "source (v1,v2 / v3)"], arch_rows))

# %% [markdown]
# ## 2. Training: objectives and data
#
# All three generations share the skeleton: a **student** network is trained to predict the output of a
# **teacher** that is an exponential moving average (EMA) of the student, on different crops of the same
# image (multi-crop: two large "global" crops and several small "local" ones). No labels anywhere. What
# changed is *what* is matched, *how* the teacher targets are kept from collapsing, and the data.

# %%
obj_rows = [
    ["Image-level loss", "DINO: cross-entropy between teacher and student softmax outputs over prototypes",
     "DINO loss (own head)", "DINO loss on [CLS] (`loss/dino_clstoken_loss.py`)"],
    ["Patch-level loss", "none", "iBOT: masked patches of the student predict the teacher's patch outputs",
     "iBOT, unchanged in kind (`loss/ibot_patch_loss.py`)"],
    ["Against collapse", "centering (EMA of teacher outputs) + sharpening (low teacher temperature)",
     "Sinkhorn–Knopp centering of the teacher + KoLeo regulariser (spread the [CLS] features)",
     "Sinkhorn–Knopp (asserted in `train/ssl_meta_arch.py`) + KoLeo (weight 0.1)"],
    ["Dense-feature stability", "—", "—",
     "**Gram anchoring** (new): the student's patch-similarity (Gram) matrix is pulled towards that of an "
     "earlier frozen teacher run at 2× resolution (`loss/gram_loss.py`)"],
    ["Schedule", "one stage", "pretraining, then a short high-resolution phase",
     "7B: pretrain (1M iterations) → Gram anchoring → high-resolution adaptation (`configs/train/dinov3_vit7b16_*`)"],
    ["Smaller models", "trained directly", "distilled from ViT-g",
     "distilled from the 7B teacher (`train/multidist_meta_arch.py`; README: 'distilled')"],
    ["Data", "ImageNet-1k train images, no labels (≈1.28M)", "LVD-142M (curated web images)",
     "LVD-1689M (web) and SAT-493M (satellite) — the `Weights` enum in `hub/backbones.py`"],
]
display(md_table(["", "DINO v1", "DINOv2", "DINOv3 (official code)"], obj_rows))

# %% [markdown]
# The DINOv3 pipeline, as the official `SSLMetaArch` combines the losses (notebook 05 builds every box):
#
# ```text
#              image
#                │  multi-crop: 2 global crops + 8 local crops
#      ┌─────────┴──────────────────────────────┐
#      ▼                                         ▼
#  TEACHER ViT (EMA of student, no grad)     STUDENT ViT  (half of the global crops: some patches → mask_token)
#   [CLS] ─ DINO head ─ Sinkhorn–Knopp ──┐    [CLS] ─ DINO head ─► DINO loss  (vs teacher, global + local crops)
#   patches ─ iBOT head ─ Sinkhorn–Knopp ┴──► masked patches ─ iBOT head ─► iBOT loss
#                                             [CLS] (before the head) ─► KoLeo
#  GRAM TEACHER (frozen earlier EMA copy,     patch tokens ─► Gram matrix ─► Gram loss (MSE)
#   same crops at 2× resolution) ─► patch tokens, resized to the student's grid ─► Gram matrix ─┘
#
#  finally: the trained 7B is the frozen teacher that the smaller released ViTs are distilled from
# ```
#
# ## 3. The DINOv3 token sequence, with shapes
#
# One 224×224 image through the first steps of ViT-S/16 (on the meta device: shapes only):

# %%
x = torch.empty(1, 3, 224, 224, device=META)
print("image                  ", tuple(x.shape))
grid = vits_meta.patch_embed(x)
print("patch_embed  (B,h,w,D) ", tuple(grid.shape))
print("flatten      (B,hw,D)  ", tuple(grid.flatten(1, 2).shape))
tokens, (H, W) = vits_meta.prepare_tokens_with_masks(x)
print("+cls +storage (B,N,D)  ", tuple(tokens.shape), f" N = 1 + {vits_meta.n_storage_tokens} + {H}*{W}")
sin, cos = vits_meta.rope_embed(H=H, W=W)
print("RoPE sin, cos (hw,Dh)  ", tuple(sin.shape), tuple(cos.shape))
prefix = tokens.shape[1] - sin.shape[0]
print("tokens without RoPE    ", prefix, "(cls + storage)")
assert tokens.shape == (1, 1 + 4 + 14 * 14, 384) and prefix == 5

for side in (224, 512):
    n = vits_meta.prepare_tokens_with_masks(torch.empty(1, 3, side, side, device=META))[0].shape[1]
    print(f"{side}x{side}: {n} tokens")

# %% [markdown]
# The same picture drawn: the patch grid on the image, and the sequence the transformer sees. The first five
# tokens have no position (RoPE skips them); the 196 patch tokens are in row-major order, so token `5 + 14·r + c`
# is the patch in row `r`, column `c`.

# %%
photo = viz.load_photo(224)
fig = plt.figure(figsize=(10, 2.9), dpi=80)
ax0 = fig.add_axes([0.0, 0.02, 0.24, 0.92])
viz.draw_patch_grid(ax0, photo, patch=16, lw=0.4, title="224×224 → 14×14 patches of 16 px")
for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (13, 13)]):
    ax0.text(c * 16 + 8, r * 16 + 8, str(5 + 14 * r + c), color="black", fontsize=7, ha="center", va="center",
             bbox=dict(boxstyle="square,pad=0.1", fc="yellow", ec="none"))

ax1 = fig.add_axes([0.26, 0.0, 0.74, 1.0])
seq = (["cls"] + [f"s{i}" for i in range(4)] + [f"p{i}" for i in range(4)] + ["…"] + ["p194", "p195"])
colors = {"cls": "#d62728", "s": "#9467bd", "p": "#1f77b4", "…": "white"}
for i, name in enumerate(seq):
    col = colors.get(name, colors.get(name[0]))
    ax1.add_patch(plt.Rectangle((i, 0), 0.9, 1, color=col, alpha=0.85 if name != "…" else 0))
    ax1.text(i + 0.45, 0.5, name, ha="center", va="center", color="white" if name != "…" else "black", fontsize=9)
    idx = {"cls": 0, "…": None}.get(name, None)
    if name.startswith("s"):
        idx = 1 + int(name[1:])
    elif name.startswith("p"):
        idx = 5 + int(name[1:])
    if idx is not None:
        ax1.text(i + 0.45, 1.15, str(idx), ha="center", fontsize=7, color="gray")
ax1.annotate("", xy=(0, -0.25), xytext=(4.9, -0.25), arrowprops=dict(arrowstyle="<->", color="#9467bd"))
ax1.text(2.45, -0.6, "prefix: 1 cls + 4 storage\nno position, RoPE skipped", ha="center", va="top", fontsize=8)
ax1.annotate("", xy=(5, -0.25), xytext=(len(seq) - 0.1, -0.25), arrowprops=dict(arrowstyle="<->", color="#1f77b4"))
ax1.text((5 + len(seq)) / 2, -0.6, "196 patch tokens (row-major)\nq, k rotated by 2-D RoPE", ha="center",
         va="top", fontsize=8)
ax1.text(0, 1.55, "sequence [1, 201, 384] entering block 0 of ViT-S/16", fontsize=9)
ax1.set_xlim(-0.2, len(seq) + 0.1)
ax1.set_ylim(-1.6, 1.9)
ax1.axis("off")
plt.show()

# %% [markdown]
# ## 4. The seven released DINOv3 backbones, computed
#
# `dinolab.hub.build(name, device="meta")` builds each configuration of `dinov3/hub/backbones.py` with the
# official constructor arguments. We count the parameters and **assert that they equal the official numbers
# exactly** (an exact match means every matrix, bias, norm, LayerScale and token has the official shape).
# The FFN width is read from the built block: SwiGLU keeps 2/3 of `D·ffn_ratio` (it has three matrices
# instead of two), rounded up to a multiple of 8 (64 for the 7B's `swiglu64`).

# %%
models = {name: hub.build(name, device=META).eval() for name in hub.RELEASED}
cfgs = {name: {**hub.HUB_COMMON, **hub.CONFIGS[name]} for name in hub.RELEASED}


def ffn_of(model):
    """(type, hidden width, number of D x hidden matrices) of the first block's FFN."""
    mlp = model.blocks[0].mlp
    if isinstance(mlp, SwiGLUFFN):
        return "SwiGLU", mlp.w1.out_features, 3
    return "GELU MLP", mlp.fc1.out_features, 2


params = {}
for name, m in models.items():
    params[name] = count_params(m)
    assert params[name] == OFFICIAL_PARAMS[name], (name, params[name], OFFICIAL_PARAMS[name])
    assert not any(isinstance(mod, RMSNorm) for mod in m.modules())  # no released model uses RMSNorm
    print(f"{SHORT[name]:10s} {params[name]:>14,} parameters  == official")

# %% [markdown]
# ## 5. FLOPs from the configuration
#
# **Convention.** We count the multiply–adds (MACs) of the matrix products and report **FLOPs = 2 × MACs**.
# A linear map of N tokens from width a to width b costs N·a·b MACs. Per block, with N tokens, width D and
# FFN width h:
#
# | matmul | MACs |
# |---|---|
# | qkv projection | N · D · 3D |
# | attention scores q·kᵀ (all heads) | N · N · D |
# | weighted sum of v (all heads) | N · N · D |
# | output projection | N · D · D |
# | FFN: 2 matrices (GELU MLP) or 3 (SwiGLU) | N · D · h · (2 or 3) |
#
# plus the patch embedding once: a 16×16×3 → D projection per patch. **Not counted**: biases, LayerNorm,
# softmax, GELU/SiLU, RoPE rotations, LayerScale and residual adds. These are element-wise, O(N·D) per block
# against O(N·D²) for the matmuls, so they are a fraction of a percent for D ≥ 384. The function takes the
# configuration dictionary only, not a model:

# %%
def ffn_hidden(cfg):
    """FFN width and number of matrices from the config (the rule of dinov3/layers/ffn_layers.py)."""
    hidden = int(cfg["embed_dim"] * cfg["ffn_ratio"])
    if cfg["ffn_layer"].startswith("swiglu"):
        align = int(cfg["ffn_layer"][6:] or 8)  # "swiglu" -> 8, "swiglu64" -> 64
        d = int(hidden * 2 / 3)
        return d + (-d % align), 3
    return hidden, 2


def vit_flops(cfg, img=224, n_prefix=None):
    """Forward FLOPs (2 x multiply-adds of the matmuls) for one img x img image, split by part."""
    D, L, p = cfg["embed_dim"], cfg["depth"], cfg["patch_size"]
    h, n_mats = ffn_hidden(cfg)
    hw = (img // p) ** 2
    N = hw + (1 + cfg["n_storage_tokens"] if n_prefix is None else n_prefix)
    macs = {
        "patch_embed": hw * (3 * p * p) * D,
        "qkv": L * N * D * 3 * D,
        "attn_scores": L * N * N * D,
        "attn_values": L * N * N * D,
        "proj": L * N * D * D,
        "ffn": L * N * D * h * n_mats,
    }
    return {k: 2 * v for k, v in macs.items()}


for name in hub.RELEASED:
    assert ffn_hidden(cfgs[name])[0] == ffn_of(models[name])[1]  # config rule == built model
f = vit_flops(cfgs["dinov3_vits16"])
for k, v in f.items():
    print(f"ViT-S/16 @224  {k:12s} {v / 1e9:7.3f} GFLOPs")
print(f"ViT-S/16 @224  {'total':12s} {sum(f.values()) / 1e9:7.3f} GFLOPs")

# %% [markdown]
# **Check 1: against `torch.utils.flop_counter.FlopCounterMode` on the meta device.** PyTorch's counter
# intercepts every `aten` operation and counts matmuls (`addmm`, `mm`, `bmm`) and convolutions with the same
# 2-FLOPs-per-MAC convention. It works on meta tensors, so we can count even the 7B model. On meta,
# `scaled_dot_product_attention` runs its reference ("math") path, two `bmm`s, so the attention core is counted.

# %%
counted = {}
for name, m in models.items():
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(torch.empty(1, 3, 224, 224, device=META))
    counted[name] = fc.get_total_flops()
    ours = sum(vit_flops(cfgs[name]).values())
    rel = abs(ours - counted[name]) / counted[name]
    print(f"{SHORT[name]:10s} ours {ours / 1e9:9.2f} GFLOPs   FlopCounterMode {counted[name] / 1e9:9.2f}   "
          f"difference {100 * rel:.3f}%")
    assert rel < 0.01
assert all(counted[n] == sum(vit_flops(cfgs[n]).values()) for n in hub.RELEASED)
print("identical counts for all seven configurations")

# %% [markdown]
# They agree exactly: the counter, too, ignores biases (an `addmm`'s add), norms, softmax and
# element-wise ops.
#
# **Check 2: a real model on the CPU.** We take the series' tiny model (`dinov3_vittiny16`: the ViT-S recipe
# at D=192, 6 blocks, 3 heads; it keeps this check fast) with real weights and a real image tensor. Here the
# default attention kernel is a fused CPU kernel that this PyTorch's counter has no formula for, so its FLOPs
# are silently missed. The missing amount is exactly our attention-core term (scores + weighted sum). Forcing
# the reference math kernel makes the count complete again. A lesson for reading any profiler's FLOP number:
# check what it counts.

# %%
from torch.nn.attention import SDPBackend, sdpa_kernel

tiny = hub.build("dinov3_vittiny16").eval()
img = torch.randn(1, 3, 224, 224)
with torch.no_grad(), FlopCounterMode(display=False) as fc:
    out = tiny(img)
fused = fc.get_total_flops()
with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
    tiny(img)
mathk = fc.get_total_flops()
print("tiny model:", count_params(tiny), "parameters, output", tuple(out.shape))

f = vit_flops({**hub.HUB_COMMON, **hub.CONFIGS["dinov3_vittiny16"]})
ours, core = sum(f.values()), f["attn_scores"] + f["attn_values"]
print(f"ours                               {ours / 1e9:.3f} GFLOPs")
print(f"FlopCounterMode, math SDPA kernel   {mathk / 1e9:.3f} GFLOPs")
print(f"FlopCounterMode, default kernel     {fused / 1e9:.3f} GFLOPs  (missing {(ours - fused) / 1e9:.3f} = "
      f"attention core {core / 1e9:.3f})")
assert abs(mathk - ours) / ours < 0.01
assert fused == ours or fused == ours - core  # a newer PyTorch may count the fused kernel too

# %% [markdown]
# Now the table a presenter can show. Every number in it is computed above; the parameter counts are asserted
# equal to the official ones.

# %%
rel_rows = []
for name in hub.RELEASED:
    c, m = cfgs[name], models[name]
    kind, hidden, _ = ffn_of(m)
    tok = {s: 1 + c["n_storage_tokens"] + (s // c["patch_size"]) ** 2 for s in (224, 512)}
    rel_rows.append([
        f"`{name}` ({SHORT[name]})", c["embed_dim"], c["depth"], c["num_heads"], c["embed_dim"] // c["num_heads"],
        f"{kind} {hidden}", "yes" if c.get("qkv_bias", True) else "no", f"{params[name]:,}",
        f"{params[name] / 1e6:,.1f}M", tok[224], tok[512], f"{counted[name] / 1e9:,.1f}",
    ])
display(md_table(["model", "D", "depth", "heads", "head dim", "FFN (hidden)", "qkv bias", "parameters", "≈",
                  "tokens @224", "tokens @512", "GFLOPs @224"], rel_rows))

# %% [markdown]
# Three things to notice. The "+" models (S+, L+, H+) keep the width of their base model but use a wider
# SwiGLU FFN (`ffn_ratio` 6 → hidden 4·D after the 2/3 rule). Every model has head dimension 64 except the
# 7B (128), which also drops the qkv bias. And the 7B model costs ≈2.7 TFLOPs for one 224×224 image.
#
# **Why published FLOP numbers differ by 2×.** Many vision papers (ViT, DeiT) report MACs and call them FLOPs.
# Our counter with DeiT's token sequence (1 prefix token, no storage tokens) reproduces DeiT's well-known
# "17.6 GFLOPs" for ViT-B/16 at 224 *as MACs*:

# %%
deit_b = vit_flops(cfgs["dinov3_vitb16"], n_prefix=1)
print(f"ViT-B/16, 197 tokens: {sum(deit_b.values()) / 2e9:.1f} GMACs = {sum(deit_b.values()) / 1e9:.1f} GFLOPs")

# %% [markdown]
# ## 6. Looking at the numbers
#
# Left: parameters against FLOPs. At a fixed resolution the two grow together (FLOPs ≈ 2 × parameters ×
# tokens, plus attention), so the points lie on a line of slope 1; at 512 px (5.1× the tokens) the same
# models cost 5–7× more, the narrow ones most because their attention core grows fastest.
# Middle: where the FLOPs of a block go. The attention core (q·kᵀ and the weighted sum) grows with N²·D, the
# matmuls with N·D², so its share is large for narrow models at high resolution, and small for the 7B.
# Right: tokens per image against resolution — patch 14 (DINOv2) gives (16/14)² ≈ 1.31× more tokens than
# patch 16 at the same resolution, patch 8 (DINO v1's /8 models) 4×.

# %%
names = hub.RELEASED
fl = {s: {n: vit_flops(cfgs[n], s) for n in names} for s in (224, 512)}
fig, axes = plt.subplots(1, 3, figsize=(10, 3.7), dpi=80)

ax = axes[0]
for s, marker in ((224, "o"), (512, "s")):
    xs = [params[n] / 1e6 for n in names]
    ys = [sum(fl[s][n].values()) / 1e9 for n in names]
    ax.loglog(xs, ys, marker, label=f"{s}×{s}")
    if s == 224:
        for n, xv, yv in zip(names, xs, ys):
            ax.annotate(SHORT[n].replace("/16", ""), (xv, yv), textcoords="offset points", xytext=(4, -9),
                        fontsize=7)
ax.set_xlabel("parameters (M)")
ax.set_ylabel("forward GFLOPs / image")
ax.set_title("params vs FLOPs", fontsize=9)
ax.legend(fontsize=7)

ax = axes[1]
parts = [("qkv + proj", ("qkv", "proj"), "#1f77b4"), ("attention core", ("attn_scores", "attn_values"), "#d62728"),
         ("FFN", ("ffn",), "#2ca02c")]
xpos = range(len(names))
for j, s in enumerate((224, 512)):
    bottom = [0.0] * len(names)
    for label, keys, col in parts:
        share = [sum(fl[s][n][k] for k in keys) / (sum(fl[s][n].values()) - fl[s][n]["patch_embed"]) for n in names]
        ax.bar([i + 0.38 * j for i in xpos], share, 0.36, bottom=bottom, color=col, hatch=None if s == 224 else "///",
               edgecolor="white", lw=0, label=label if s == 224 else None)
        bottom = [b + v for b, v in zip(bottom, share)]
ax.set_xticks([i + 0.19 for i in xpos])
ax.set_xticklabels([SHORT[n].replace("ViT-", "").replace("/16", "") for n in names], fontsize=7)
ax.set_ylabel("share of the blocks' FLOPs")
ax.set_ylim(0, 1.2)
ax.set_title("FLOP shares: 224 px (solid), 512 px (hatched)", fontsize=9)
ax.legend(fontsize=7, loc="upper center", ncol=3, handlelength=1, columnspacing=0.8)

ax = axes[2]
res = list(range(112, 1025, 16))
for p, label, col in ((8, "patch 8 (v1 /8)", "#ff7f0e"), (14, "patch 14 (v2)", "#2ca02c"),
                      (16, "patch 16 (v1 /16, v3)", "#1f77b4")):
    ax.semilogy(res, [(r // p) ** 2 for r in res], label=label, color=col)
ax.plot([518], [(518 // 14) ** 2], "o", color="#2ca02c")
ax.annotate("v2 @518: 37×37", (518, 37**2), textcoords="offset points", xytext=(-75, 8), fontsize=7)
ax.plot([512], [(512 // 16) ** 2], "o", color="#1f77b4")
ax.annotate("v3 @512: 32×32", (512, 32**2), textcoords="offset points", xytext=(8, -16), fontsize=7)
ax.set_xlabel("image side (px)")
ax.set_ylabel("patch tokens")
ax.set_title("tokens vs resolution", fontsize=9)
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %%
core_share = {s: {n: (fl[s][n]["attn_scores"] + fl[s][n]["attn_values"]) / sum(fl[s][n].values()) for n in names}
              for s in (224, 512)}
for n in ("dinov3_vits16", "dinov3_vit7b16"):
    print(f"{SHORT[n]:10s} attention-core share of FLOPs: {100 * core_share[224][n]:4.1f}% at 224, "
          f"{100 * core_share[512][n]:4.1f}% at 512")
ratio = {n: sum(fl[512][n].values()) / sum(fl[224][n].values()) for n in names}
print(f"FLOPs at 512 / FLOPs at 224: {min(ratio.values()):.2f}x to {max(ratio.values()):.2f}x "
      f"(tokens: {1029 / 201:.2f}x)")
assert core_share[512]["dinov3_vits16"] > core_share[224]["dinov3_vits16"] > core_share[224]["dinov3_vit7b16"]

# %% [markdown]
# ## 7. The seed's claims, corrected
#
# The blog post this project started from (`shared/seed`, in Chinese) has two comparison tables. Where they
# disagree with the official code or the papers, here is the correction and the evidence computed in this
# notebook.

# %%
p_min, p_max = min(params.values()), max(params.values())
dims = sorted({c["embed_dim"] for c in cfgs.values()})
corr_rows = [
    ["DINOv2 patch embedding: patch=16", "patch **14** (DINOv2 ViT-S/14 ... g/14); v1: 16 and 8; v3: 16",
     f"v3 `patch_embed.patch_size` = {v3['patch']}"],
    ["v3 dims 384/768/1024/1152/1280/1536/4096",
     f"released dims are {'/'.join(map(str, dims))}; 1152 (`vit_so400m`) and 1536 (`vit_giant2`) exist only as "
     "architecture factories in the training code", "the 7 `dinov3_*` hub configs above"],
    ["v3 parameter range 22M – 7.4B", f"**{p_min / 1e6:.1f}M – {p_max / 1e9:.3f}B** ({p_min:,} to {p_max:,})",
     "counted, and asserted equal to the official counts"],
    ["v3 core idea: 'Online Token Matching', a single objective without extra regularisers",
     "DINOv3 **keeps** the DINO loss, the iBOT loss and KoLeo with Sinkhorn–Knopp centring, and **adds Gram "
     "anchoring**; smaller models are distilled from the 7B",
     "`dinov3/loss/__init__.py` exports DINOLoss, iBOTPatchLoss, KoLeoLoss, GramLoss"],
    ["v3: a single head", "the 7B configs use separate DINO and iBOT heads (as DINOv2)",
     "`configs/train/dinov3_vit7b16_*.yaml`"],
    ["v3: flexible LayerNorm or RMSNorm", f"every released model uses {v3['norm']}; RMSNorm is an unused option",
     "no RMSNorm module in any of the 7 models (asserted)"],
    ["v3 data: 'large curated data, as v2'", "LVD-1689M (web) and SAT-493M (satellite); v2: LVD-142M",
     "`Weights` enum in `hub/backbones.py`"],
    ["v3 extra tokens: optional storage tokens", f"always {v3['n_storage']} storage tokens, right after [CLS]; "
     "no RoPE on them", "sequence [1, 201, 384] at 224 px, prefix 5"],
]
display(md_table(["seed says", "correct", "evidence"], corr_rows))
assert round(p_min / 1e6, 1) == 21.6 and round(p_max / 1e9, 3) == 6.716 and dims == [384, 768, 1024, 1280, 4096]

# %% [markdown]
# ## Summary
#
# The shape table of the smallest and the largest released backbone, traced on the meta device
# (`dinolab.trace`; notebook 04 builds and inspects the whole model):

# %%
print(trace(vits_meta, torch.empty(1, 3, 224, 224, device=META)))
print()
print(trace(models["dinov3_vit7b16"], torch.empty(1, 3, 512, 512, device=META)))

# %% [markdown]
# **What to remember**
#
# - Same skeleton in all three: a ViT student trained to match an EMA teacher across multi-crop views, no labels.
# - Patch size: v1 16 and 8, **v2 14**, v3 16. Position: v1/v2 a learned table (interpolated), **v3 RoPE** on
#   patch tokens only, no learned position parameters.
# - DINOv3 sequence = `[cls, 4 storage tokens, patches]`; 201 tokens at 224 px, 1029 at 512 px.
# - Released DINOv3 ViTs: 21.6M (S) to 6.716B (7B) parameters; S+/L+/H+/7B use SwiGLU; LayerScale 1e-5,
#   LayerNorm eps 1e-5, K bias masked; the 7B has head dim 128 and no qkv bias.
# - Objective: DINO + iBOT + KoLeo with Sinkhorn–Knopp (as v2) **plus Gram anchoring**; smaller models are
#   distilled from the 7B. Not "online token matching".
# - FLOPs ≈ 2 × parameters × tokens, plus the attention core (∝ N²·D), which matters for narrow models at high
#   resolution. Say which convention you use: 1 MAC = 2 FLOPs here.
#
# **Exercises**
#
# 1. Count a DINO v1 ViT-S/16 backbone: build `vit.DinoVisionTransformer(embed_dim=384, depth=12, num_heads=6,
#    n_storage_tokens=0, layerscale_init=None, device="meta")`, subtract its mask token (v1 has none) and add
#    the learned 197×384 position table. Which parts of DINOv3 ViT-S/16 explain the difference?
# 2. At what image side does the attention core of ViT-S/16 cost as much as all its other matmuls? Use
#    `vit_flops` and find the crossing; explain it with N ≈ 6·D for a GELU MLP of ratio 4.
# 3. Count a DINOv2-style ViT-L/14 at 518 px with 4 registers: `vit_flops({**cfgs["dinov3_vitl16"],
#    "patch_size": 14}, 518)`. How many more FLOPs than DINOv3 ViT-L/16 at 512 px, and why?
# 4. Run check 2 on `dinov3_vits16`, and with another `SDPBackend` (or on a GPU): which attention kernels
#    does your PyTorch's `FlopCounterMode` count?
# 5. For the 7B, what fraction of the parameters sits in the FFNs? Compare with ViT-S and explain the role of
#    `ffn_ratio=3` with SwiGLU.
