# %% [markdown] slide
# # 00 · DINO v1 → v2 → v3: what changed
#
# This notebook is the map before the journey. It puts the three generations of DINO side by side in tables
# you can show at a group meeting, and then **computes** the facts about DINOv3 instead of quoting them:
# the exact parameter count of the seven released backbones (checked against the official numbers), their
# token counts, and their forward FLOPs from a small counting function that we check against PyTorch's own
# FLOP counter. Along the way it corrects the claims of the group-meeting blog post this series started from
# (in Chinese; below, *the blog post*): DINOv2's patch size, DINOv3's model range, and the "online token
# matching" objective that DINOv3 does not have.
#
# Nothing here trains. Every model is built on PyTorch's `meta` device (shapes only, no memory), so even the
# 6.7-billion-parameter ViT-7B is built in a moment. One tiny real ViT runs on the CPU for the FLOP check.
# Expected run time: about 15 s on 2 CPU cores.

# %% slide hide-input
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("00")))

# %% [markdown] skip
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

# %% skip
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
viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
META = torch.device("meta")


def md_table(header, rows):
    """A Markdown table from a header and rows of values (everything str()-ed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


# The official parameter counts: the models that `dinov3/hub/backbones.py` of github.com/facebookresearch/dinov3
# builds (its README rounds them to 21M, 29M, 86M, 300M, 840M, 6,716M). They are the *targets* we assert
# against, not the numbers we show.
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

# %% [markdown] skip
# ## 1. The backbone: v1 vs v2 vs v3
#
# **Where the facts come from.** The DINOv3 column is read from the official code
# (`facebookresearch/dinov3`: `hubconf.py`, `dinov3/hub/backbones.py`, `dinov3/models/vision_transformer.py`,
# `dinov3/layers/*`), and below we read the same values from `dinolab`'s model, which loads official
# checkpoints with `strict=True`. The DINO v1 and DINOv2 columns state only well-known facts of their papers
# and releases: DINO (Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*, ICCV 2021),
# DINOv2 (Oquab et al., 2023) and *Vision Transformers Need Registers* (Darcet et al., ICLR 2024), which added
# the register tokens to DINOv2; the files each row was checked in are listed under the table.
#
# First, read the DINOv3 facts off a model. ViT-S/16 on the meta device costs no memory:

# %% skip
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

# %% [markdown] skip
# No parameter has `pos` in its name: DINOv3 has **no learned position embedding**. Position enters only through
# RoPE, whose state is a buffer of 16 periods per head (`rope_embed.periods`), not a learned table.
# Compare with the learned tables of v1 and v2. Their size follows from the patch grid at the training
# resolution (v1: 224 px, patch 16 → 14×14 grid; v2: 518 px, patch 14 → 37×37 grid), plus one row for [CLS]:

# %% skip
D_S = 384  # ViT-S width in all three generations
pos_table = {
    "DINO v1 ViT-S/16 (224 px)": (1 + (224 // 16) ** 2) * D_S,
    "DINOv2 ViT-S/14 (518 px)": (1 + (518 // 14) ** 2) * D_S,
    "DINOv3 ViT-S/16": sum(p.numel() for n, p in vits_meta.named_parameters() if "pos" in n),
}
for k, v in pos_table.items():
    print(f"{k:28s} learned position parameters: {v:>9,}")

# %% [markdown] skip
# A learned table knows one grid only; at another resolution it must be resized (bicubic interpolation in
# v1 and v2), which the network never saw during training. RoPE instead computes angles from patch
# coordinates normalised to [-1, 1], so any grid works (notebook 02).

# %% [markdown] slide
# ### The backbone, side by side

# %% hide-input
arch_rows = [  # short cells for a slide; the sources are the footnotes below the table
    ["Patch size", "16 and 8", "14", f"{v3['patch']}"],
    ["Position", "learned table (224 px), interpolated", "learned table (518 px), interpolated",
     f"2-D RoPE on patch q, k (base {v3['rope_base']:g}); no table"],
    ["Extra tokens", "[CLS]", "[CLS]; +4 registers (`_reg`)", f"[CLS] + {v3['n_storage']} storage tokens"],
    ["Mask token", "none", "yes (iBOT)", f"yes, {v3['mask_token']} (iBOT)"],
    ["Block", "pre-norm, GELU MLP", "+ LayerScale; SwiGLU in g", f"+ LayerScale {v3['layerscale_init']:g}; SwiGLU in +/7B"],
    ["Attention", "fused qkv + bias", "fused qkv + bias", "fused qkv, k bias masked; 7B: none"],
    ["Norm", "LayerNorm, eps 1e-6", "LayerNorm, eps 1e-6", f"LayerNorm, eps {vits_meta.norm.eps:g}"],
    ["Outputs", "[CLS], patches", "[CLS], registers, patches", "[CLS], storage, patches, pre-norm"],
]
display(md_table(["", "DINO v1 (2021)", "DINOv2 (2023)", "DINOv3 (2025)"], arch_rows))
print(f"DINOv3 ViT-S/16: {v3['qkv']}, {v3['norm']}, RoPE coordinates '{v3['rope_coords']}' in [-1, 1]")

# %% [markdown]
# <small>Sources. v1: Caron et al., ICCV 2021; `vision_transformer.py` of facebookresearch/dino. v2: Oquab et
# al., 2023; Darcet et al., ICLR 2024 (registers); `dinov2/models/vision_transformer.py`, `dinov2/hub/backbones.py`.
# v3 (facebookresearch/dinov3): patch size, norm (`layernormbf16`) `dinov3/hub/backbones.py`; position
# `dinov3/layers/rope_position_encoding.py`; tokens, mask token, outputs (`forward_features`)
# `dinov3/models/vision_transformer.py`; block `dinov3/layers/block.py`; attention `dinov3/layers/attention.py`.
# RMSNorm exists in the official code, but no released model uses it.</small>

# %% [markdown] slide
# ## 2. Training: objectives and data
#
# All three generations share the skeleton: a **student** network is trained to predict the output of a
# **teacher** that is an exponential moving average (EMA) of the student, on different crops of the same
# image (multi-crop: two large "global" crops and several small "local" ones). No labels anywhere. What
# changed is *what* is matched, *how* the teacher targets are kept from collapsing, and the data.

# %% hide-input
obj_rows = [  # short cells for a slide; the sources are the footnotes below the table
    ["Image-level loss", "DINO: teacher vs student softmax", "DINO (own head)", "DINO on [CLS]"],
    ["Patch-level loss", "none", "iBOT: masked patches", "iBOT"],
    ["Against collapse", "centring + sharpening", "Sinkhorn–Knopp + KoLeo", "Sinkhorn–Knopp + KoLeo (0.1)"],
    ["Dense features", "—", "—", "**Gram anchoring** (new) ¹"],
    ["Schedule", "one stage", "pretrain, then high-res", "7B: pretrain → Gram → high-res"],
    ["Smaller models", "trained directly", "distilled from ViT-g", "distilled from the 7B"],
    ["Data (no labels)", "ImageNet-1k, ≈1.28M", "LVD-142M (web)", "LVD-1689M (web), SAT-493M (satellite)"],
]
display(md_table(["", "DINO v1", "DINOv2", "DINOv3 (official code)"], obj_rows))

# %% [markdown]
# <small>¹ Gram anchoring pulls the student's patch-similarity (Gram) matrix towards that of an earlier, frozen
# teacher run at 2× resolution. Sources (facebookresearch/dinov3): `dinov3/loss/dino_clstoken_loss.py`,
# `ibot_patch_loss.py`, `gram_loss.py`; Sinkhorn–Knopp asserted in `dinov3/train/ssl_meta_arch.py`; KoLeo weight and
# the 7B's stages (1M pretraining iterations) in `dinov3/configs/train/dinov3_vit7b16_*.yaml`; distillation
# `dinov3/train/multidist_meta_arch.py`; data: the `Weights` enum in `dinov3/hub/backbones.py`. v1, v2: their
# papers.</small>

# %% [markdown] slide
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

# %% [markdown] slide
# ## 3. The DINOv3 token sequence, with shapes
#
# One 224×224 image through the first steps of ViT-S/16 (on the meta device: shapes only):

# %% hide-input
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

# %% [markdown] slide
# The same picture drawn: the patch grid on the image, and the sequence the transformer sees. The first five
# tokens have no position (RoPE skips them); the 196 patch tokens are in row-major order, so token `5 + 14·r + c`
# is the patch in row `r`, column `c`.

# %% hide-input
photo = viz.load_photo(224)
fig = plt.figure(figsize=(12.8, 4.2))
ax0 = fig.add_axes([0.0, 0.02, 0.25, 0.88])
viz.draw_patch_grid(ax0, photo, patch=16, lw=0.4, title="224×224 → 14×14 patches of 16 px")
for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (13, 13)]):
    ax0.text(c * 16 + 8, r * 16 + 8, str(5 + 14 * r + c), color="black", fontsize=10, ha="center", va="center",
             bbox=dict(boxstyle="square,pad=0.1", fc="yellow", ec="none"))

ax1 = fig.add_axes([0.27, 0.0, 0.73, 1.0])
seq = (["cls"] + [f"s{i}" for i in range(4)] + [f"p{i}" for i in range(4)] + ["…"] + ["p194", "p195"])
colors = {"cls": viz.COLORS[3], "s": viz.COLORS[4], "p": viz.COLORS[0], "…": "white"}
for i, name in enumerate(seq):
    col = colors.get(name, colors.get(name[0]))
    ax1.add_patch(plt.Rectangle((i, 0), 0.9, 1, color=col, alpha=0.85 if name != "…" else 0))
    ax1.text(i + 0.45, 0.5, name, ha="center", va="center", color="white" if name != "…" else "black", fontsize=13)
    idx = {"cls": 0, "…": None}.get(name, None)
    if name.startswith("s"):
        idx = 1 + int(name[1:])
    elif name.startswith("p"):
        idx = 5 + int(name[1:])
    if idx is not None:
        ax1.text(i + 0.45, 1.15, str(idx), ha="center", fontsize=12, color="gray")
ax1.annotate("", xy=(0, -0.25), xytext=(4.9, -0.25), arrowprops=dict(arrowstyle="<->", color=viz.COLORS[4]))
ax1.text(2.45, -0.6, "prefix: 1 cls + 4 storage\nno position, RoPE skipped", ha="center", va="top", fontsize=13)
ax1.annotate("", xy=(5, -0.25), xytext=(len(seq) - 0.1, -0.25), arrowprops=dict(arrowstyle="<->", color=viz.COLORS[0]))
ax1.text((5 + len(seq)) / 2, -0.6, "196 patch tokens (row-major)\nq, k rotated by 2-D RoPE", ha="center",
         va="top", fontsize=13)
ax1.text(0, 1.6, "sequence [1, 201, 384] entering block 0 of ViT-S/16", fontsize=14)
ax1.set_xlim(-0.2, len(seq) + 0.1)
ax1.set_ylim(-1.6, 1.9)
ax1.axis("off")
plt.show()

# %% [markdown] slide
# ## 4. The seven released DINOv3 backbones, computed
#
# `dinolab.hub.build(name, device="meta")` builds each configuration of `dinov3/hub/backbones.py` with the
# official constructor arguments. We count the parameters and **assert that they equal the official numbers
# exactly** (an exact match means every matrix, bias, norm, LayerScale and token has the official shape).
# The FFN width is read from the built block: SwiGLU keeps 2/3 of `D·ffn_ratio` (it has three matrices
# instead of two), rounded up to a multiple of 8 (64 for the 7B's `swiglu64`).

# %% hide-input
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

# %% [markdown] skip
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

# %% skip
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

# %% [markdown] slide
# **Check 1: against `torch.utils.flop_counter.FlopCounterMode` on the meta device.** PyTorch's counter
# intercepts every `aten` operation and counts matmuls (`addmm`, `mm`, `bmm`) and convolutions with the same
# 2-FLOPs-per-MAC convention. It works on meta tensors, so we can count even the 7B model. On meta,
# `scaled_dot_product_attention` runs its reference ("math") path, two `bmm`s, so the attention core is counted.

# %% hide-input
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

# %% [markdown] skip
# They agree exactly: the counter, too, ignores biases (an `addmm`'s add), norms, softmax and
# element-wise ops.
#
# **Check 2: a real model on the CPU.** We take the series' tiny model (`dinov3_vittiny16`: the ViT-S recipe
# at D=192, 6 blocks, 3 heads; it keeps this check fast), randomly initialised (FLOPs do not depend on the
# weights), on a random image tensor: real arithmetic this time, not the meta device. Here the
# default attention kernel is a fused CPU kernel that this PyTorch's counter has no formula for, so its FLOPs
# are silently missed. The missing amount is exactly our attention-core term (scores + weighted sum). Forcing
# the reference math kernel makes the count complete again. A lesson for reading any profiler's FLOP number:
# check what it counts.

# %% skip
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

# %% [markdown] slide
# Now the table a presenter can show. Every number in it is computed above; the parameter counts are asserted
# equal to the official ones.

# %% hide-input
rel_rows, tokens = [], set()
for name in hub.RELEASED:
    c, m = cfgs[name], models[name]
    kind, hidden, _ = ffn_of(m)
    tokens.add(tuple(1 + c["n_storage_tokens"] + (s // c["patch_size"]) ** 2 for s in (224, 512)))
    rel_rows.append([
        f"`{name}`", c["embed_dim"], c["depth"], c["num_heads"], c["embed_dim"] // c["num_heads"],
        f"{kind} {hidden}", "yes" if c.get("qkv_bias", True) else "no", f"{params[name]:,}",
        f"{counted[name] / 1e9:,.1f}",
    ])
display(md_table(["model", "D", "depth", "heads", "head dim", "FFN (hidden)", "qkv bias", "parameters",
                  "GFLOPs @224"], rel_rows))
(tok224, tok512), = tokens  # the same for every model
ffn_params = {n: count_params(models[n].blocks[0].mlp) for n in ("dinov3_vits16", "dinov3_vits16plus")}
s_plus = ffn_params["dinov3_vits16plus"] / ffn_params["dinov3_vits16"]
assert ffn_of(models["dinov3_vits16plus"])[1] == ffn_of(models["dinov3_vits16"])[1] and abs(s_plus - 1.5) < 0.01
print(f"every model: {tok224} tokens at 224 px, {tok512} at 512 px; "
      f"S+ vs S: same FFN hidden width, {s_plus:.2f}x the FFN parameters (3 matrices instead of 2)")

# %% [markdown]
# Three things to notice. The "+" models (S+, L+, H+) use a SwiGLU FFN with `ffn_ratio` 6, which the 2/3
# rule turns into a hidden width of 4·D: the **same** hidden width as the GELU MLP of S, B, L (ratio 4). Their
# FFN is still 1.5× larger, because SwiGLU has a third matrix (printed above). Every model has head dimension
# 64 except the 7B (128), which also drops the qkv bias. And the 7B model costs ≈2.7 TFLOPs for one 224×224 image.

# %% [markdown] skip
# **Why published FLOP numbers differ by 2×.** Many vision papers (ViT, DeiT) report MACs and call them FLOPs.
# Our counter with DeiT's token sequence (1 prefix token, no storage tokens) reproduces DeiT's well-known
# "17.6 GFLOPs" for ViT-B/16 at 224 *as MACs*:

# %% skip
deit_b = vit_flops(cfgs["dinov3_vitb16"], n_prefix=1)
print(f"ViT-B/16, 197 tokens: {sum(deit_b.values()) / 2e9:.1f} GMACs = {sum(deit_b.values()) / 1e9:.1f} GFLOPs")

# %% [markdown] notes
# ## 6. Looking at the numbers
#
# Left: parameters against FLOPs. At a fixed resolution the two grow together (FLOPs ≈ 2 × parameters ×
# tokens, plus attention), so the points lie on a line of slope 1; at 512 px (5.1× the tokens) the same
# models cost 5–7× more, the narrow ones most because their attention core grows fastest.
# Middle: where the FLOPs of a block go. The attention core (q·kᵀ and the weighted sum) grows with N²·D, the
# matmuls with N·D², so its share is large for narrow models at high resolution, and small for the 7B.
# Right: tokens per image against resolution — patch 14 (DINOv2) gives (16/14)² ≈ 1.31× more tokens than
# patch 16 at the same resolution, patch 8 (DINO v1's /8 models) 4×.

# %% slide hide-input
names = hub.RELEASED
fl = {s: {n: vit_flops(cfgs[n], s) for n in names} for s in (224, 512)}
fig, axes = plt.subplots(1, 3, figsize=(12.8, 5.2))

ax = axes[0]
for s, marker in ((224, "o"), (512, "s")):
    xs = [params[n] / 1e6 for n in names]
    ys = [sum(fl[s][n].values()) / 1e9 for n in names]
    ax.loglog(xs, ys, marker, label=f"{s}×{s}")
    if s == 224:
        for n, xv, yv in zip(names, xs, ys):
            ax.annotate(SHORT[n].replace("/16", ""), (xv, yv), textcoords="offset points", xytext=(4, -11),
                        fontsize=11)
ax.set_xlabel("parameters (M)")
ax.set_ylabel("forward GFLOPs / image")
ax.set_title("params vs FLOPs")
ax.legend()

ax = axes[1]
parts = [("qkv + proj", ("qkv", "proj"), viz.COLORS[0]), ("attention core", ("attn_scores", "attn_values"), viz.COLORS[3]),
         ("FFN", ("ffn",), viz.COLORS[2])]
xpos = range(len(names))
for j, s in enumerate((224, 512)):
    bottom = [0.0] * len(names)
    for label, keys, col in parts:
        share = [sum(fl[s][n][k] for k in keys) / (sum(fl[s][n].values()) - fl[s][n]["patch_embed"]) for n in names]
        ax.bar([i + 0.38 * j for i in xpos], share, 0.36, bottom=bottom, color=col, hatch=None if s == 224 else "///",
               edgecolor="white", lw=0, label=label if s == 224 else None)
        bottom = [b + v for b, v in zip(bottom, share)]
ax.set_xticks([i + 0.19 for i in xpos])
ax.set_xticklabels([SHORT[n].replace("ViT-", "").replace("/16", "") for n in names], fontsize=11)
ax.set_ylabel("share of the blocks' FLOPs")
ax.set_ylim(0, 1.2)
ax.set_title("FLOP shares: 224 px solid, 512 hatched")
ax.legend(fontsize=11, loc="upper center", ncol=3, handlelength=1, columnspacing=0.6)

ax = axes[2]
res = list(range(112, 1025, 16))
for p, label, col in ((8, "patch 8 (v1 /8)", viz.COLORS[1]), (14, "patch 14 (v2)", viz.COLORS[2]),
                      (16, "patch 16 (v1 /16, v3)", viz.COLORS[0])):
    ax.semilogy(res, [(r // p) ** 2 for r in res], label=label, color=col)
ax.plot([518], [(518 // 14) ** 2], "o", color=viz.COLORS[2])
ax.annotate("v2 @518:\n37×37", (518, 37**2), textcoords="offset points", xytext=(-8, 8), ha="right", fontsize=11)
ax.plot([512], [(512 // 16) ** 2], "o", color=viz.COLORS[0])
ax.annotate("v3 @512: 32×32", (512, 32**2), textcoords="offset points", xytext=(8, -18), fontsize=11)
ax.set_xlabel("image side (px)")
ax.set_ylabel("patch tokens")
ax.set_title("tokens vs resolution")
ax.legend(fontsize=11)
plt.tight_layout()
plt.show()

# %% skip
core_share = {s: {n: (fl[s][n]["attn_scores"] + fl[s][n]["attn_values"]) / sum(fl[s][n].values()) for n in names}
              for s in (224, 512)}
for n in ("dinov3_vits16", "dinov3_vit7b16"):
    print(f"{SHORT[n]:10s} attention-core share of FLOPs: {100 * core_share[224][n]:4.1f}% at 224, "
          f"{100 * core_share[512][n]:4.1f}% at 512")
ratio = {n: sum(fl[512][n].values()) / sum(fl[224][n].values()) for n in names}
print(f"FLOPs at 512 / FLOPs at 224: {min(ratio.values()):.2f}x to {max(ratio.values()):.2f}x "
      f"(tokens: {1029 / 201:.2f}x)")
assert core_share[512]["dinov3_vits16"] > core_share[224]["dinov3_vits16"] > core_share[224]["dinov3_vit7b16"]

# %% [markdown] slide
# ## 7. What the released models score (quoted, not computed)
#
# Everything above is computed here. What the models *achieve* cannot be: it needs the weights, the datasets
# and the official evaluations. The numbers below are **quoted** from the official model card, next to the
# parameter counts computed above. Higher is better, except NYU (an error).

# %% hide-input
# Quoted from MODEL_CARD.md of github.com/facebookresearch/dinov3, "Evaluation / Results", the table of ViT
# backbones pretrained (7B) or distilled on LVD-1689M. Typed in by hand: these are the only numbers in this
# notebook that are not computed. (IN-ReaL, ObjectNet, ADE20k, NYU↓); ViT-L+/16 has no row there.
MODEL_CARD = {
    "dinov3_vits16": (87.0, 50.9, 47.0, 0.403),
    "dinov3_vits16plus": (88.0, 54.6, 48.8, 0.399),
    "dinov3_vitb16": (89.3, 64.1, 51.8, 0.373),
    "dinov3_vitl16": (90.2, 74.8, 54.9, 0.352),
    "dinov3_vith16plus": (90.3, 78.6, 54.8, 0.352),
    "dinov3_vit7b16": (90.4, 91.1, 55.9, 0.309),
}
assert set(MODEL_CARD) <= set(hub.RELEASED)
bench_rows = [[f"`{n}`", f"{params[n] / 1e6:,.1f}M", *(f"{v:.1f}" for v in MODEL_CARD[n][:3]), f"{MODEL_CARD[n][3]:.3f}"]
              for n in hub.RELEASED if n in MODEL_CARD]
display(md_table(["model", "parameters (computed)", "IN-ReaL ¹", "ObjectNet ¹", "ADE20k mIoU ¹", "NYU ↓ ¹"],
                 bench_rows))
big, large = MODEL_CARD["dinov3_vit7b16"], MODEL_CARD["dinov3_vitl16"]
print(f"ViT-7B/16 vs ViT-L/16 ({params['dinov3_vit7b16'] / params['dinov3_vitl16']:.0f}x the parameters): "
      f"IN-ReaL {big[0] - large[0]:+.1f}, ObjectNet {big[1] - large[1]:+.1f}, ADE20k {big[2] - large[2]:+.1f} points")

# %% [markdown]
# <small>¹ Quoted, not computed: `MODEL_CARD.md` of [facebookresearch/dinov3](https://github.com/facebookresearch/dinov3),
# section *Evaluation → Results* (ViT backbones on LVD-1689M; ViT-L+/16 is not listed). Frozen backbones with light
# heads (the model card: "without fine-tuning, with downstream classifiers as simple as linear layers"); for the
# protocols it refers to the paper (Siméoni et al., *DINOv3*, arXiv:2508.10104). IN-ReaL (ImageNet, ReaL labels) and
# ObjectNet: classification accuracy in %. ADE20k: semantic segmentation, mIoU in %. NYU: depth estimation
# error on NYUv2, lower is better.</small>
#
# What to notice (printed above): the distilled ViT-L is within about a point of its 7B teacher on ImageNet and
# ADE20k with 22× fewer parameters, while ObjectNet (a harder, out-of-distribution test) keeps improving with size.

# %% [markdown] slide
# ## 8. The blog post's claims, corrected
#
# The group-meeting blog post this series started from (in Chinese) has two comparison tables. Where they
# disagree with the official code or the papers, here is the correction and the evidence computed in this
# notebook.

# %% hide-input
p_min, p_max = min(params.values()), max(params.values())
dims = sorted({c["embed_dim"] for c in cfgs.values()})
corr_rows = [  # short cells for a slide; the evidence files are the footnotes below
    ["DINOv2: patch 16", "patch **14**; v1: 16 and 8; v3: 16", f"`patch_size` = {v3['patch']} (v3)"],
    ["v3 dims 384 … 1152 … 1536 … 4096", f"released: {'/'.join(map(str, dims))}; 1152, 1536 unreleased ²",
     "7 hub configs"],
    ["v3: 22M – 7.4B parameters", f"**{p_min / 1e6:.1f}M – {p_max / 1e9:.3f}B**", "counted = official"],
    ["v3: 'Online Token Matching', one objective", "DINO + iBOT + KoLeo, **+ Gram anchoring**; distilled", "³"],
    ["v3: a single head", "separate DINO and iBOT heads (7B)", "⁴"],
    ["v3: LayerNorm or RMSNorm", f"all released: {v3['norm']}", "no RMSNorm (asserted)"],
    ["v3 data: 'curated, as v2'", "LVD-1689M (web), SAT-493M (satellite)", "⁵"],
    ["v3: optional storage tokens", f"always {v3['n_storage']}, after [CLS], no RoPE", "prefix 5 (section 3)"],
]
display(md_table(["the blog post says", "correct", "evidence"], corr_rows))
assert round(p_min / 1e6, 1) == 21.6 and round(p_max / 1e9, 3) == 6.716 and dims == [384, 768, 1024, 1280, 4096]

# %% [markdown]
# <small>Evidence in facebookresearch/dinov3: ² 1152 (`vit_so400m`) and 1536 (`vit_giant2`) exist only as
# architecture factories in the training code; ³ `dinov3/loss/__init__.py` exports DINOLoss, iBOTPatchLoss,
# KoLeoLoss, GramLoss, and the smaller models are distilled from the 7B; ⁴ `dinov3/configs/train/dinov3_vit7b16_*.yaml`;
# ⁵ the `Weights` enum in `dinov3/hub/backbones.py` (DINOv2: LVD-142M).</small>

# %% [markdown] skip
# ## Summary
#
# The shape table of the smallest and the largest released backbone, traced on the meta device
# (`dinolab.trace`; notebook 04 builds and inspects the whole model):

# %% skip
print(trace(vits_meta, torch.empty(1, 3, 224, 224, device=META)))
print()
print(trace(models["dinov3_vit7b16"], torch.empty(1, 3, 512, 512, device=META)))

# %% [markdown] slide
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

# %% [markdown] skip
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
