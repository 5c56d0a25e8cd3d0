# %% [markdown] slide
# # 13 · LoRA on q and v: adapting a frozen DINOv3 backbone
#
# The downstream recipes of the official DINOv3 code keep the backbone **frozen** and train only a head
# (notebooks 10–12). This notebook goes one step further: it fine-tunes the backbone with **LoRA**
# (Hu et al., *LoRA: Low-Rank Adaptation of Large Language Models*, ICLR 2022), a low-rank update added to the
# **q** and **v** projections of every attention layer, everything else frozen, after a public DINOv2/DINOv3
# LoRA fine-tuning repository. The official facebookresearch/dinov3 repository itself has no LoRA code at all,
# so this notebook is about *our* `dinolab/lora.py` (checked against peft's LoRA in the tests).
#
# You will:
#
# 1. build the **low-rank update** $W' = W + \frac{\alpha}{r} B A$ by hand and draw its shapes;
# 2. read **why q and v** (the LoRA paper's ablation, and what it does and does not say);
# 3. **slice DINOv3's fused `qkv`**: a LoRA on rows `0:D` equals a LoRA on a separate `q_proj` (checked by hand,
#    and against `dinolab.lora.LoRAQKV`);
# 4. count the **trainable parameters** of every released configuration at four ranks, on the `meta` device;
# 5. **run it**: a shifted ShapesWorld domain, a few hundred labelled images, and three ways to adapt — linear probe,
#    LoRA, full fine-tuning — compared on score, trainable parameters, memory and step time;
# 6. **merge** the update into the weights and check that inference then costs exactly what the plain model costs.
#
# Expected run time: about 55 s on 2 CPU cores.

# %% slide hide-input
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("13")))

# %% skip
import os

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(k, v)

import json
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dinolab import hub, lora, trace
from dinolab.data import ShapesWorld
from dinolab.metrics import miou
from dinolab.seg_heads import LinearHead
from dinolab.train import extract_features, fit
from dinolab.utils import count_params, get_device, seed_everything
from dinolab.weights import TINY_CHECKPOINT, tiny_checkpoint

viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
seed_everything(0)
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
SCALE = 1  # a GPU reader can raise this: more images and more steps in section 5
print("device type:", DEVICE.type)

CKPT = tiny_checkpoint()  # data/dinov3_tiny_shapesworld.pth, or $DINOLAB_CKPT
pretrained = hub.dinov3_vittiny16(weights=CKPT).eval()
D, DEPTH = pretrained.embed_dim, len(pretrained.blocks)
print(f"pretrained tiny backbone: D={D}, {DEPTH} blocks, {count_params(pretrained):,} parameters")

# %% [markdown] slide
# ## 1. The low-rank idea
#
# Fine-tuning turns a pretrained weight $W \in \mathbb{R}^{d_{out}\times d_{in}}$ into $W + \Delta W$. LoRA bets
# that the *useful* change has low rank, and learns it as a product of two thin matrices:
#
# $$W' = W + \frac{\alpha}{r}\, B A, \qquad A \in \mathbb{R}^{r \times d_{in}},\; B \in \mathbb{R}^{d_{out} \times r},
# \; r \ll d .$$
#
# * $W$ stays **frozen**; only $A$ and $B$ train: $r(d_{in}+d_{out})$ numbers instead of $d_{in} d_{out}$.
# * $B$ starts at **zero** (and $A$ random), so at step 0 the adapted model *is* the pretrained model.
# * $\alpha / r$ is a fixed scale: the paper sets $\alpha$ once and does not re-tune it when $r$ changes.
# * The layer computes $W x + \frac{\alpha}{r} B (A x)$: two thin matmuls, $\Delta W$ is never formed, and after
#   training it can be **merged** into $W$ (section 6), so inference costs nothing extra.
#
# The bet is supported by earlier work showing that fine-tuning has a low *intrinsic dimension*
# (Li et al. 2018; Aghajanyan et al. 2020), cited by the LoRA paper as its motivation. Here is the arithmetic on
# the q projection of the tiny backbone's first block ($D = 192$):

# %% hide-input
W_q = pretrained.blocks[0].attn.qkv.weight[:D].detach()  # the q rows of the fused qkv (section 3)
r, alpha = 4, 8.0
g = torch.Generator().manual_seed(0)
A = torch.randn(r, D, generator=g) / math.sqrt(D)  # (r, D_in)
B = torch.randn(D, r, generator=g) * 0.1  # (D_out, r): zero at init, random here so that ΔW is visible
dW = (alpha / r) * B @ A
print(f"W_q {tuple(W_q.shape)}   A {tuple(A.shape)}   B {tuple(B.shape)}   ΔW = (α/r)·B·A {tuple(dW.shape)}")
print(f"rank of ΔW: {int(torch.linalg.matrix_rank(dW))} (= r)   rank of W_q: {int(torch.linalg.matrix_rank(W_q))}")
print(f"numbers: W {W_q.numel():,}   A+B {A.numel() + B.numel():,} ({(A.numel() + B.numel()) / W_q.numel():.1%} of W)")

x = torch.randn(5, D, generator=g)  # 5 tokens
y_merged = x @ (W_q + dW).T  # form W' = W + ΔW, then one matmul
y_lora = x @ W_q.T + (alpha / r) * (x @ A.T) @ B.T  # the LoRA forward: ΔW never formed
torch.testing.assert_close(y_lora, y_merged, rtol=1e-5, atol=1e-5)
print(f"x {tuple(x.shape)} -> x A^T {tuple((x @ A.T).shape)} -> (x A^T) B^T {tuple(((x @ A.T) @ B.T).shape)}: "
      f"equals x (W + ΔW)^T")
print(f"multiply-adds per token: W x {D * D:,}   B(A x) {2 * r * D:,}")

# %% [markdown] subslide
# The figure draws these matrices to scale. On the left, one $D \times D$ projection and its update
# $B A$ for $r = 8$. On the right, DINOv3's **fused** `qkv` weight, $(3D) \times D$: LoRA adds $B_q A_q$ to the
# q rows and $B_v A_v$ to the v rows, and leaves the k rows alone (section 3).

# %% hide-input
def draw_box(ax, x0, y0, w, h, color, label, text_color="black", fontsize=12, alpha_=0.85):
    ax.add_patch(Rectangle((x0, y0), w, h, facecolor=color, edgecolor="black", lw=0.8, alpha=alpha_))
    ax.text(x0 + w / 2, y0 + h / 2, label, ha="center", va="center", fontsize=fontsize, color=text_color)


R_FIG = 8
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.6), gridspec_kw={"width_ratios": [1.25, 1]})
ax = axes[0]
draw_box(ax, 0, 0, D, D, "#c6dbef", f"W\n{D}×{D}\nfrozen")
ax.text(D + 18, D / 2, "+  α/r ·", ha="center", va="center", fontsize=13)
draw_box(ax, D + 40, 0, R_FIG, D, "#fd8d3c", "")
ax.text(D + 40 + R_FIG / 2, -12, f"B\n{D}×{R_FIG}", ha="center", va="top", fontsize=12)
draw_box(ax, D + 60, D - R_FIG, D, R_FIG, "#fd8d3c", "")
ax.text(D + 60 + D / 2, D - R_FIG - 6, f"A   {R_FIG}×{D}", ha="center", va="top", fontsize=12)
ax.text(D + 60 + D / 2, D / 3, f"trainable:\n{R_FIG}·({D}+{D}) = {2 * R_FIG * D:,}\nvs {D * D:,} in W",
        ha="center", va="center", fontsize=12)
ax.set_xlim(-5, 2 * D + 70)
ax.set_ylim(-45, D + 10)
ax.set_title(f"(a) one projection: W' = W + (α/r)·B·A  (D = {D}, r = {R_FIG}, drawn to scale)", fontsize=13)
ax = axes[1]
for i, (name, color, txt) in enumerate([("q", "#c6dbef", "q rows 0:D"), ("k", "#e0e0e0", "k rows D:2D\nno LoRA"),
                                         ("v", "#c6dbef", "v rows 2D:3D")]):
    y0 = (2 - i) * D
    draw_box(ax, 0, y0, D, D, color, f"{txt}\n{D}×{D}", fontsize=11)
    if name in "qv":
        draw_box(ax, D + 25, y0, R_FIG, D, "#fd8d3c", "")
        draw_box(ax, D + 45, y0 + D - R_FIG, D // 2, R_FIG, "#fd8d3c", "")
        ax.text(D + 12, y0 + D / 2, "+", ha="center", va="center", fontsize=13)
        ax.text(D + 45 + D / 4, y0 + D / 2, f"B_{name} A_{name}\n(A drawn\nhalf width)", ha="center", va="center",
                fontsize=11)
ax.set_xlim(-5, D + 150)
ax.set_ylim(-5, 3 * D + 5)
ax.set_title("(b) the fused qkv weight (3D × D) of every block", fontsize=13)
for ax in axes:
    ax.set_aspect("equal")
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown] slide
# ## 2. Why q and v
#
# Which matrices should get the update? The LoRA paper answers with one ablation (§7.1, Table 5): GPT-3 175B, a
# fixed budget of 18M trainable parameters, spent on one attention matrix at $r = 8$, two at $r = 4$, or all four at
# $r = 2$. Validation accuracy on WikiSQL / MultiNLI:
#
# | weights adapted | q | k | v | o | q, k | q, v | q, k, v, o |
# |---|---|---|---|---|---|---|---|
# | rank r | 8 | 8 | 8 | 8 | 4 | 4 | 2 |
# | WikiSQL (±0.5) | 70.4 | 70.0 | 73.0 | 73.2 | 71.4 | **73.7** | **73.7** |
# | MultiNLI (±0.1) | 91.0 | 90.8 | 91.0 | 91.3 | 91.3 | 91.3 | **91.7** |
#
# (numbers quoted from the paper, not computed here). What it shows: putting the whole budget into $W_q$ or $W_k$
# alone does markedly worse; $W_q, W_v$ is the best pair and level with all four matrices on WikiSQL (all four
# are 0.4 better on MultiNLI).

# %% [markdown] notes
# The paper's reading: rank 4 already captures enough of the update that it pays to
# spread the budget over more matrices rather than give one matrix a larger rank. The paper also adapts **only
# attention weights** and freezes the MLPs, for simplicity and parameter efficiency (§4.2).

# %% [markdown]
# What it does **not** show: anything about vision transformers, or that q and v beat q, k, v and o by a
# margin. That q + v became the default for ViTs (and for the public DINOv2/DINOv3 LoRA repository this notebook follows) is a
# convention carried over from this GPT-3 ablation. `dinolab.lora.apply_lora` takes `targets=("q", "v")` by
# default and accepts any non-empty subset of `("q", "k", "v")`; the output projection `attn.proj` and the MLPs are
# not adapted (an exercise below).

# %% [markdown] slide
# ## 3. Slicing a fused qkv
#
# DINOv3 computes q, k and v with **one** `Linear(D, 3D)` (`dinov3/layers/attention.py::SelfAttention`): the
# output is reshaped to `(B, N, 3, heads, D_head)`, so output features `0:D` are q, `D:2D` are k and `2D:3D` are v,
# i.e. rows `0:D`, `D:2D`, `2D:3D` of the weight. Its bias is a `LinearKMaskedBias`: the k third of the bias is
# multiplied by a mask of NaN→0 (`mask_k_bias=True`), so k gets no bias (notebook 03).
#
# transformers' `DINOv3ViTModel` splits the same weight into `q_proj`, `k_proj`, `v_proj`; peft then puts a LoRA on
# `q_proj` and `v_proj`. On our fused layer we want **the same function**. (peft pointed at the fused `qkv` would
# wrap the whole Linear: one $A$ (r × D) and one $B$ (3D × r) that adapt q, k *and* v together, a different
# model.) So `LoRAQKV` gives each target its own pair and adds the update into its third only:
#
# ```
# out = base(x)                                   # (B, N, 3D): W x + masked bias
# out[..., 0:D]   += (x A_q^T) B_q^T · α/r
# out[..., 2D:3D] += (x A_v^T) B_v^T · α/r
# ```
#
# First by hand, on block 0 of the pretrained backbone, with random (nonzero) $A$ and $B$:

# %% hide-input
qkv = pretrained.blocks[0].attn.qkv  # LinearKMaskedBias(192, 576)
print(qkv, "| weight", tuple(qkv.weight.shape), "| bias", tuple(qkv.bias.shape))
g = torch.Generator().manual_seed(1)
A_q, B_q = torch.randn(r, D, generator=g) * 0.1, torch.randn(D, r, generator=g) * 0.1
A_v, B_v = torch.randn(r, D, generator=g) * 0.1, torch.randn(D, r, generator=g) * 0.1
s = alpha / r
tokens = torch.randn(2, 69, D, generator=g)  # (B, N, D): 1 cls + 4 storage + 8x8 patches of a 128-px image

with torch.no_grad():
    out = qkv(tokens)  # (B, N, 3D)
    print("base qkv(x)            ", tuple(out.shape))
    h_q = tokens @ A_q.T  # (B, N, r): down to rank r
    print("x A_q^T                ", tuple(h_q.shape))
    up_q = h_q @ B_q.T * s  # (B, N, D): back up, into the q third
    print("(x A_q^T) B_q^T · α/r  ", tuple(up_q.shape))
    by_hand = out.clone()
    by_hand[..., :D] += up_q
    by_hand[..., 2 * D:] += (tokens @ A_v.T) @ B_v.T * s

    # the reference: a *separate* q projection (transformers' q_proj), with its own LoRA
    q_proj = nn.Linear(D, D)
    q_proj.weight.copy_(qkv.weight[:D])
    q_proj.bias.copy_(qkv.bias[:D] * qkv.bias_mask[:D])
    q_sep = q_proj(tokens) + (tokens @ A_q.T) @ B_q.T * s
print("q_proj(x) + LoRA       ", tuple(q_sep.shape))
torch.testing.assert_close(by_hand[..., :D], q_sep, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(by_hand[..., D:2 * D], out[..., D:2 * D], rtol=0, atol=0)
print("LoRA on rows 0:D of the fused qkv == LoRA on a separate q_proj; the k third is untouched")

# %% [markdown] subslide
# Now the library: `LoRAQKV` wraps the same layer (its `base`), gets the same $A$, $B$ and must give the same
# output; merging must write $\frac{\alpha}{r}B_qA_q$ into rows `0:D` and $\frac{\alpha}{r}B_vA_v$ into `2D:3D`,
# and nothing into the k rows or the bias.

# %% hide-input
import copy

wrapped = lora.LoRAQKV(copy.deepcopy(qkv), r=r, alpha=alpha, targets=("q", "v"))
wrapped.base.requires_grad_(False)  # apply_lora does this for every block: only the LoRA tensors train
print(wrapped)
with torch.no_grad():
    for name, t in [("lora_A_q", A_q), ("lora_B_q", B_q), ("lora_A_v", A_v), ("lora_B_v", B_v)]:
        getattr(wrapped, name).copy_(t)
    for name, p in wrapped.named_parameters():
        print(f"  {name:13s} {str(tuple(p.shape)):11s} requires_grad={p.requires_grad}")
    torch.testing.assert_close(wrapped(tokens), by_hand, rtol=1e-5, atol=1e-5)
    w_before = wrapped.base.weight.clone()
    wrapped.merge()
    dW_rows = wrapped.base.weight - w_before
    torch.testing.assert_close(dW_rows[:D], s * B_q @ A_q)
    torch.testing.assert_close(dW_rows[2 * D:], s * B_v @ A_v)
    assert torch.all(dW_rows[D:2 * D] == 0) and torch.equal(wrapped.base.bias, qkv.bias)
    torch.testing.assert_close(wrapped(tokens), by_hand, rtol=1e-4, atol=1e-4)
print("dinolab.lora.LoRAQKV == by hand (unmerged and merged); merge changed only the q and v rows")

# %% [markdown]
# That checks one layer against our own arithmetic. The independent check is in `tests/test_lora.py`
# (`test_parity_with_peft_on_split_q_v`): it loads the same random weights into transformers' `DINOv3ViTModel` and
# into `dinolab`, puts peft's LoRA on `q_proj`/`v_proj` and `apply_lora` on the fused `qkv`, copies the same $A$,
# $B$ into both, and compares the outputs of the **whole model** before merging, after merging, and after
# `merge_and_unload` (max difference < 1e-4).

# %% [markdown] slide
# ## 4. How many trainable parameters?
#
# `apply_lora(model, r, alpha)` wraps every block's `qkv` and freezes everything else. Each block then trains
# $2 \cdot 2 r D$ numbers (q and v, each $A$ and $B$), so the model trains $\text{depth} \cdot 4 r D$. We count them
# on the `meta` device (no memory, no arithmetic) for every released configuration and check the count against the
# formula in `lora_param_count`. The share is of the backbone's parameters.

# %% hide-input
RANKS = (4, 8, 16, 64)
rows = ["| model | D | blocks | backbone | " + " | ".join(f"r = {k}" for k in RANKS) + " |",
        "|---|---|---|---|" + "---|" * len(RANKS)]
share = {}
for name in hub.RELEASED + ["dinov3_vittiny16"]:
    model_m = hub.build(name, device="meta")
    n_backbone = count_params(model_m)
    cells = []
    for k in RANKS:
        lora.apply_lora(model_m, r=k, alpha=2 * k)
        n_lora = lora.count_lora_params(model_m, trainable_only=True)
        assert n_lora == lora.lora_param_count(model_m.embed_dim, len(model_m.blocks), k) == len(model_m.blocks) * 4 * k * model_m.embed_dim
        assert count_params(model_m, trainable_only=True) == n_lora  # everything else is frozen
        lora.remove_lora(model_m, merge=False)
        share[name, k] = n_lora / n_backbone
        cells.append(f"{n_lora / 1e6:.2f}M ({n_lora / n_backbone:.2%})")
    rows.append(f"| `{name}` | {model_m.embed_dim} | {len(model_m.blocks)} | {n_backbone / 1e6:,.1f}M | " + " | ".join(cells) + " |")
display(Markdown("\n".join(rows)))

# %% [markdown] notes
# The share shrinks as models grow: at fixed $r$ a block's LoRA count grows like $D$ ($4rD$) while the block
# grows like $D^2$ (about $4D^2$ in attention plus $8D^2$ in an MLP of ratio 4), so the share is roughly
# $4rD / 12D^2 = r / (3D)$. The counts are for the backbone only; the head trains on top in every method.

# %% hide-input
assert share["dinov3_vit7b16", 4] < share["dinov3_vitl16", 4] < share["dinov3_vits16", 4] < 0.1
assert all(share[n, 64] < 0.1 for n in hub.RELEASED)
print(f"r=4: ViT-S {share['dinov3_vits16', 4]:.2%} (r/(3D) = {4 / (3 * 384):.2%}), ViT-L {share['dinov3_vitl16', 4]:.2%}, "
      f"ViT-7B {share['dinov3_vit7b16', 4]:.3%} of the backbone")

# %% [markdown] slide
# ## 5. Run it: a shifted domain, three ways to adapt
#
# ### 5.1 The data
#
# `ShapesWorld(domain="shifted")` renders the **same scenes** as the source domain (same objects in the same places:
# the layout depends only on split, seed and index) with a different appearance: the *dusk* palette (dark,
# warm/purple) and object, floor and wall textures the source never uses. The task: **foreground segmentation**,
# which pixels belong to an object (any of the five shapes) and which to floor or wall, scored by the
# **IoU of the foreground class** on 256 held-out shifted images.
#
# Why not the six-class task? At this scale the tiny backbone does not tell the shapes apart (its frozen
# CLS features classify shapes at chance level, see data/README.md), and a six-class per-patch head mostly
# predicts background; foreground vs background is the part of the dense task this checkpoint can do.

# %% hide-input
N_TRAIN, N_VAL, N_SHOW = 384 * SCALE, 256, 4
shifted_tr = ShapesWorld("train", num_samples=N_TRAIN, domain="shifted").tensors()
shifted_va = ShapesWorld("val", num_samples=N_VAL, domain="shifted").tensors()
source_tr = ShapesWorld("train", num_samples=N_TRAIN, domain="source").tensors()
source_va = ShapesWorld("val", num_samples=N_VAL, domain="source").tensors()
for name, d in [("shifted train", shifted_tr), ("shifted val", shifted_va), ("source train", source_tr), ("source val", source_va)]:
    print(f"{name:14s} image {tuple(d['image'].shape)}  mask {tuple(d['mask'].shape)}  "
          f"foreground share {(d['mask'] > 0).float().mean():.3f}")
assert torch.equal(source_tr["mask"], shifted_tr["mask"])  # same layouts, only the appearance differs
print("masks of source and shifted are identical: same scenes")

# %% subslide hide-input
fig, axes = plt.subplots(3, N_SHOW, figsize=(8.8, 6.0))
for j in range(N_SHOW):
    axes[0, j].imshow(viz.to_numpy_image(source_tr["image"][j]))
    axes[1, j].imshow(viz.to_numpy_image(shifted_tr["image"][j]))
    axes[2, j].imshow((shifted_tr["mask"][j] > 0).numpy(), cmap="gray", vmin=0, vmax=1)
for i, t in enumerate(["source", "shifted", "foreground"]):
    axes[i, 0].set_ylabel(t)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("The same scenes in the source and the shifted domain, and the target (train images 0-3)", fontsize=13)
plt.tight_layout()
plt.show()

# %% [markdown] subslide
# ### 5.2 The head, the loss and the training budget
#
# All three methods use the **same head** and the **same batches**:
#
# * the official linear segmentation head `LinearHead` (BatchNorm + 1×1 conv, notebook 10) on the last block's
#   normalised patch tokens `(B, 192, 8, 8)`, logits bilinearly upsampled to 128 × 128 and a per-pixel
#   cross-entropy, as the official linear segmentation training does (dropout 0 here: our choice);
# * `STEPS` AdamW steps of batch 16, linear warm-up then cosine (`dinolab.train.fit`), the head at lr 1e-2;
# * the backbone runs in `eval` mode in all three, so RoPE's training-time coordinate augmentation is off and the
#   frozen backbone of the linear probe computes exactly the features we cache. (LoRA and full fine-tuning would
#   normally train with augmentations; with 60 steps we keep the three comparable.)
#
# The backbone's learning rate is the one thing that differs: 5e-3 for the LoRA tensors (a larger lr is usual
# for LoRA: $B$ starts at zero and the update is scaled by $\alpha/r$) and 2e-4 for full fine-tuning.

# %% hide-input
STEPS, BATCH = 60 * SCALE, 16
LR_HEAD, LR_LORA, LR_FULL = 1e-2, 5e-3, 2e-4
R_LORA, ALPHA_LORA = 4, 8.0
NC = 2  # background, foreground


def fg(mask):
    return (mask > 0).long()


class SegModel(nn.Module):
    """Backbone (or None: cached features) + the official linear head, logits at the input size."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(0)  # the same head init in every method
        self.head = LinearHead([D], NC, dropout=0.0)

    def train(self, mode=True):  # the backbone always runs in eval mode (see above)
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()
        return self

    def features(self, images):
        return self.backbone.get_intermediate_layers(images, n=1, reshape=True)[0]  # (B, D, 8, 8)

    def forward(self, x, size=(128, 128)):
        f = x if self.backbone is None else self.features(x)
        return F.interpolate(self.head([f]), size=size, mode="bilinear", align_corners=False)


x_tr, y_tr = viz.normalize(shifted_tr["image"]).to(DEVICE), fg(shifted_tr["mask"]).to(DEVICE)
x_va, y_va = viz.normalize(shifted_va["image"]).to(DEVICE), fg(shifted_va["mask"])
g = torch.Generator().manual_seed(1)
ORDER = [torch.randint(0, N_TRAIN, (BATCH,), generator=g) for _ in range(STEPS)]  # the same batches for all
print(f"{STEPS} steps x batch {BATCH} = {STEPS * BATCH} samples = {STEPS * BATCH / N_TRAIN:.1f} epochs of {N_TRAIN} images")


def make_loss(inputs, targets):
    def loss_fn(model, idx):
        return F.cross_entropy(model(inputs[idx]), targets[idx])
    return loss_fn


@torch.no_grad()
def predict(model, inputs, bs=64):
    model.eval()
    return torch.cat([model(inputs[i:i + bs]).argmax(1).cpu() for i in range(0, len(inputs), bs)])


def fg_iou(pred, target):
    return float(miou(pred, target, NC, per_class=True)[1][1])  # IoU of class 1, the foreground

# %% [markdown] subslide
# ### 5.3 Is the frozen backbone hurt by the shift?
#
# Domain adaptation starts from the premise that frozen features are worse on the new domain. We measure it
# with the linear probe (frozen backbone, cached features, the protocol above) trained and tested on each domain,
# and the source probe applied to shifted images (the "train on source, deploy on target" case).

# %% skip
def cached(images):
    return extract_features(pretrained.to(DEVICE), images, layers=1, batch_size=64, return_class_token=False,
                            normalize=True)[0].to(DEVICE)


feat = {"source": (cached(source_tr["image"]), cached(source_va["image"])),
        "shifted": (cached(shifted_tr["image"]), cached(shifted_va["image"]))}
print("cached features (train, val):", {k: [tuple(t.shape) for t in v] for k, v in feat.items()})


def linear_probe(domain):
    f_tr, _ = feat[domain]
    labels = fg((source_tr if domain == "source" else shifted_tr)["mask"]).to(DEVICE)
    probe = SegModel(None).to(DEVICE)
    hist = fit(probe, None, make_loss(f_tr, labels), ORDER, STEPS, lr=LR_HEAD, warmup=5, progress=False)
    return probe, hist


probes = {dom: linear_probe(dom) for dom in ("source", "shifted")}

# %% hide-input
# NBVAL_IGNORE_OUTPUT
# scores depend on float rounding in their last digit; the assert in the next cell checks what the text claims
shift_table = {
    ("source", "source"): fg_iou(predict(probes["source"][0], feat["source"][1]), fg(source_va["mask"])),
    ("source", "shifted"): fg_iou(predict(probes["source"][0], feat["shifted"][1]), y_va),
    ("shifted", "shifted"): fg_iou(predict(probes["shifted"][0], feat["shifted"][1]), y_va),
}
print("linear probe, foreground IoU on 256 val images")
for (tr, te), v in shift_table.items():
    print(f"  trained on {tr:8s} tested on {te:8s} {v:.3f}")

# %% hide-input
assert shift_table["source", "shifted"] < shift_table["source", "source"] - 0.08
assert shift_table["shifted", "shifted"] > shift_table["source", "shifted"] + 0.08
print("the probe trained on the source domain drops on the shifted one; a probe trained there recovers")

# %% [markdown] notes
# The premise holds: the probe trained on source features loses about 0.11 of foreground IoU on shifted images
# (0.517 → 0.406), and a probe trained on shifted features gets it back (0.513). Both probes use the class-weighted
# loss above and predict real foreground; neither collapses to background. (With the checkpoint this notebook used
# before, a short run that had learned mostly colour, the source probe did collapse to background: features that
# encode the object, not the floor, are what make the comparison meaningful.)
#
# The question that remains is the one LoRA is for: **given a few hundred labelled images of a domain, how much
# does adapting the backbone add to a head on frozen features, and at what cost?** The linear probe trained on
# shifted images above is the first method.

# %% [markdown] subslide
# ### 5.4 Linear probe vs LoRA vs full fine-tuning
#
# The three methods, each built from the same pretrained weights:

# %% hide-input
methods = {}

# 1. linear probe: the shifted probe of 5.3 (frozen backbone, cached features)
probe, hist = probes["shifted"]
methods["linear probe"] = dict(model=probe, hist=hist, trainable=count_params(probe.head, trainable_only=True),
                               backbone_trainable=0)

# 2. LoRA: q and v of every block, r = 4
bb_lora = hub.dinov3_vittiny16(weights=CKPT)
torch.manual_seed(1)
lora.apply_lora(bb_lora, r=R_LORA, alpha=ALPHA_LORA, targets=("q", "v"))  # freezes the rest
lora_model = SegModel(bb_lora).to(DEVICE)  # the head is attached after apply_lora: it stays trainable
methods["LoRA r=4 (q, v)"] = dict(model=lora_model, backbone_trainable=lora.count_lora_params(bb_lora, trainable_only=True),
                                  groups=[{"params": [p for p in bb_lora.parameters() if p.requires_grad], "lr": LR_LORA},
                                          {"params": list(lora_model.head.parameters()), "lr": LR_HEAD}])

# 3. full fine-tuning: every backbone parameter
bb_full = hub.dinov3_vittiny16(weights=CKPT)
full_model = SegModel(bb_full).to(DEVICE)
methods["full fine-tuning"] = dict(model=full_model, backbone_trainable=count_params(bb_full, trainable_only=True),
                                   groups=[{"params": list(bb_full.parameters()), "lr": LR_FULL},
                                           {"params": list(full_model.head.parameters()), "lr": LR_HEAD}])

for name, m in methods.items():
    m["trainable"] = count_params(m["model"], trainable_only=True)
    print(f"{name:17s} trainable {m['trainable']:>9,}  (backbone {m['backbone_trainable']:>9,} + head "
          f"{m['trainable'] - m['backbone_trainable']:,})")
assert methods["LoRA r=4 (q, v)"]["backbone_trainable"] == lora.lora_param_count(D, DEPTH, R_LORA)

# %% skip
# NBVAL_IGNORE_OUTPUT
# training: losses and timings vary with the machine; the asserts after the score table check the outcome
for name in ("LoRA r=4 (q, v)", "full fine-tuning"):
    m = methods[name]
    t0 = time.perf_counter()
    m["hist"] = fit(m["model"], m["groups"], make_loss(x_tr, y_tr), ORDER, STEPS, lr=LR_HEAD, warmup=5,
                    progress=False)
    m["step_s"] = (time.perf_counter() - t0) / STEPS
    print(f"{name:17s} loss {m['hist'][0]:.3f} -> {sum(m['hist'][-10:]) / 10:.3f}   {m['step_s'] * 1e3:.0f} ms/step")

# %% hide-input
# NBVAL_IGNORE_OUTPUT
preds = {"linear probe": predict(probe, feat["shifted"][1]),
         "LoRA r=4 (q, v)": predict(lora_model, x_va),
         "full fine-tuning": predict(full_model, x_va)}
for name, m in methods.items():
    m["score"] = fg_iou(preds[name], y_va)
rows = ["| method | trainable parameters | share of full | foreground IoU (shifted val) |", "|---|---|---|---|"]
n_full = methods["full fine-tuning"]["trainable"]
for name, m in methods.items():
    rows.append(f"| {name} | {m['trainable']:,} | {m['trainable'] / n_full:.2%} | {m['score']:.3f} |")
display(Markdown("\n".join(rows)))

# %% hide-input
linear_score = methods["linear probe"]["score"]
lora_score = methods["LoRA r=4 (q, v)"]["score"]
full_score = methods["full fine-tuning"]["score"]
lora_trainable, full_trainable = methods["LoRA r=4 (q, v)"]["trainable"], methods["full fine-tuning"]["trainable"]
assert lora_score > linear_score + 0.03, (lora_score, linear_score)
assert lora_score > full_score, (lora_score, full_score)
assert lora_trainable < 0.01 * full_trainable
print(f"LoRA beats the linear probe by more than 0.03 IoU and beats full fine-tuning, training "
      f"{lora_trainable / full_trainable:.2%} of what full fine-tuning trains")

# %% [markdown]
# With the same head, the same 60 batches and the same pretrained weights, LoRA on q and v beats the linear probe
# (0.572 against 0.513) with 0.7% of full fine-tuning's trainable parameters, and it beats full fine-tuning too
# (0.497, below the probe). The training losses (below) say why: full fine-tuning fits the 384 training images
# about as well as LoRA, but with 2.8 M free weights it also moves what the pretrained features knew; LoRA's 18k
# numbers in the attention can adapt the features but not undo them. The target we set (LoRA ≥ probe + 0.10) is
# not reached in 60 steps; section 5.4′ trains longer.

# %% subslide hide-input
fig, axes = plt.subplots(1, 2, figsize=(12.8, 5.0))
colors = {"linear probe": "tab:gray", "LoRA r=4 (q, v)": "tab:orange", "full fine-tuning": "tab:blue"}
for name, m in methods.items():
    h = torch.tensor(m["hist"])
    smooth = torch.nn.functional.avg_pool1d(h[None, None], 5, stride=1).flatten()
    axes[0].plot(range(4, len(h)), smooth, label=name, color=colors[name])
    axes[1].scatter(m["trainable"], m["score"], s=60, color=colors[name], label=name)
    axes[1].annotate(f"  {m['score']:.2f}", (m["trainable"], m["score"]), fontsize=12, va="center")
axes[0].set(xlabel="step", ylabel="cross-entropy (5-step mean)", title="training loss, same batches")
axes[1].set(xscale="log", xlabel="trainable parameters (log)", ylabel="foreground IoU, shifted val",
            title="score vs trainable parameters")
axes[1].set_xlim(300, 2e7)
axes[0].legend(fontsize=11)
axes[1].legend(fontsize=11, loc="lower right")
plt.tight_layout()
plt.show()

# %% subslide hide-input
fig, axes = plt.subplots(5, N_SHOW, figsize=(7.0, 7.8))
for j in range(N_SHOW):
    axes[0, j].imshow(viz.to_numpy_image(shifted_va["image"][j]))
    axes[1, j].imshow(y_va[j].numpy(), cmap="gray", vmin=0, vmax=1)
    for i, name in enumerate(methods, start=2):
        axes[i, j].imshow(preds[name][j].numpy(), cmap="gray", vmin=0, vmax=1)
for i, t in enumerate(["image", "target", "linear probe", "LoRA r=4", "full FT"]):
    axes[i, 0].set_ylabel(t)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("Foreground predictions on shifted val images 0-3", fontsize=13)
plt.tight_layout()
plt.show()

# %% [markdown] subslide
# **Three backbones.** What LoRA adds depends on what the frozen features already give. The linear probe and LoRA
# again, with the same head, batches and learning rates, on the random-init ViT and on the supervised control (the
# same ViT trained with ShapesWorld's labels on the source look):

# %% hide-input
# NBVAL_IGNORE_OUTPUT
three = {"self-supervised": {"linear probe": linear_score, "LoRA r=4 (q, v)": lora_score}}
for label, weights in (("random init", None), ("supervised control", CKPT.parent / "dinov3_tiny_supervised.pth")):
    with torch.random.fork_rng(devices=[]):  # leaves the notebook's random state as it was
        torch.manual_seed(0)
        bb = hub.dinov3_vittiny16(weights=weights).to(DEVICE).eval()
        f_tr, f_va = (extract_features(bb, imgs, layers=1, batch_size=64, return_class_token=False,
                                       normalize=True)[0].to(DEVICE) for imgs in (shifted_tr["image"], shifted_va["image"]))
        probe_b = SegModel(None).to(DEVICE)
        fit(probe_b, None, make_loss(f_tr, y_tr), ORDER, STEPS, lr=LR_HEAD, warmup=5, progress=False)
        torch.manual_seed(1)
        lora.apply_lora(bb, r=R_LORA, alpha=ALPHA_LORA, targets=("q", "v"))
        lora_b = SegModel(bb).to(DEVICE)
        fit(lora_b, [{"params": [p for p in bb.parameters() if p.requires_grad], "lr": LR_LORA},
                     {"params": list(lora_b.head.parameters()), "lr": LR_HEAD}], make_loss(x_tr, y_tr), ORDER, STEPS,
            lr=LR_HEAD, warmup=5, progress=False)
    three[label] = {"linear probe": fg_iou(predict(probe_b, f_va), y_va), "LoRA r=4 (q, v)": fg_iou(predict(lora_b, x_va), y_va)}
rows = ["| backbone | linear probe | LoRA r=4 (q, v) | LoRA − probe |", "|---|---|---|---|"]
for label in ("random init", "self-supervised", "supervised control"):
    t = three[label]
    rows.append(f"| {label} | {t['linear probe']:.3f} | {t['LoRA r=4 (q, v)']:.3f} | "
                f"**{t['LoRA r=4 (q, v)'] - t['linear probe']:+.3f}** |")
display(Markdown("\n".join(rows)))

# %% [markdown] slide
# ### 5.4′ The same three methods trained longer, offline
#
# Sixty steps is what a notebook can afford. `python -m dinolab.finetune lora --head lora|linear|full` trains the same
# models (the same recipe: rank 4 on q and v, the same learning rates) for 1,000 steps on 2,048 shifted scenes and
# writes the trained part in fp16 with a sidecar (recipe, held-out curve, time, sha256) to `data/`. LoRA's file holds
# its 18k numbers and the head (40 KB); we ship the linear probe and LoRA. Full fine-tuning's file would be a whole
# backbone (5.7 MB): only its sidecar is shipped, with the held-out curve its run measured on the same scenes. Scored
# here on the same 256 shifted validation scenes:

# %% hide-input
from dinolab import finetune

def score_shipped(path):
    """Foreground IoU of a shipped model on the shifted validation scenes."""
    return fg_iou(finetune.predict_in_batches(finetune.load(path, device=DEVICE), x_va).argmax(1), y_va)


long_runs = {}
for head, name in (("linear", "linear probe"), ("lora", "LoRA r=4 (q, v)")):
    path = TINY_CHECKPOINT.with_name(f"lora_{head}_ssl.pth")
    meta = json.loads(path.with_suffix(".json").read_text())
    long_runs[name] = dict(score=score_shipped(path), meta=meta, file_kb=path.stat().st_size / 1024,
                           trainable=meta["trainable_params"])
    c = meta["config"]
    print(f"data/lora_{head}_ssl.pth ({long_runs[name]['file_kb']:,.0f} KB): {c['steps']:,} steps × {c['batch_size']} "
          f"on {c['n_train']:,} scenes, {long_runs[name]['trainable']:,} trainable parameters")

# %% subslide hide-input
# NBVAL_IGNORE_OUTPUT
rows = ["| method | 60 steps, 384 scenes (above) | 1,000 steps, 2,048 scenes (shipped) |", "|---|---|---|"]
full_meta = json.loads(TINY_CHECKPOINT.with_name("lora_full_ssl.json").read_text())  # the curve only, no weights
for name, m in methods.items():
    rows.append(f"| {name} | {m['score']:.3f} | " + (f"**{long_runs[name]['score']:.3f}** |" if name in long_runs else
                                                     f"{full_meta['final']['fg_iou']:.3f} (its run's last evaluation) |"))
display(Markdown("\n".join(rows)))
gap_live = methods["LoRA r=4 (q, v)"]["score"] - methods["linear probe"]["score"]
gap_long = long_runs["LoRA r=4 (q, v)"]["score"] - long_runs["linear probe"]["score"]
share = long_runs["LoRA r=4 (q, v)"]["trainable"] / methods["full fine-tuning"]["trainable"]
print(f"LoRA − linear probe: {gap_live:+.3f} at 60 steps, {gap_long:+.3f} at 1,000 steps; "
      f"LoRA trains {share:.2%} of what full fine-tuning trains")
display(Markdown(
    f"With 1,000 steps the probe, which can only re-weight frozen features, gains little "
    f"({methods['linear probe']['score']:.3f} → {long_runs['linear probe']['score']:.3f}), while LoRA keeps adapting the "
    f"attention ({methods['LoRA r=4 (q, v)']['score']:.3f} → {long_runs['LoRA r=4 (q, v)']['score']:.3f}): the gap "
    f"becomes {gap_long:+.3f}, so the target LoRA ≥ probe + 0.10 is **{'reached' if gap_long >= 0.10 else 'not reached'}**"
    f"{f' (by {gap_long - 0.10:+.4f}: too small a margin to call robust from one run)' if abs(gap_long - 0.10) < 0.005 else ''}, "
    f"with {share:.2%} of full fine-tuning's trainable parameters. Full fine-tuning, given the same 1,000 steps, ends "
    f"at {full_meta['final']['fg_iou']:.3f}: "
    + (f"with enough steps and scenes its 2.8 M free weights stop hurting, and it catches up with LoRA, at {1 / share:.0f} "
       "times LoRA's trainable parameters and a whole backbone to store per domain."
       if full_meta["final"]["fg_iou"] >= long_runs["LoRA r=4 (q, v)"]["score"] - 0.01 else
       f"still below LoRA, with {1 / share:.0f} times its trainable parameters.")))

# %% subslide hide-input
fig, ax = plt.subplots(figsize=(12.8, 4.2))
for name, m in long_runs.items():
    ev = m["meta"]["curves"]
    ax.plot([e["step"] for e in ev], [e["fg_iou"] for e in ev], "o-", color=colors[name], label=name)
ev = full_meta["curves"]
ax.plot([e["step"] for e in ev], [e["fg_iou"] for e in ev], "s--", color=colors["full fine-tuning"],
        label="full fine-tuning (curve from its sidecar)")
ax.set_xlabel("training step (batches of 16 shifted scenes)")
ax.set_ylabel("foreground IoU, shifted val")
ax.set_title("the three methods trained offline: held-out foreground IoU during training")
ax.legend(fontsize=11)
plt.tight_layout()
plt.show()

# %% [markdown] subslide
# How much of that margin is the run's luck? The same two commands with `--seed 1` and `--seed 2` (another
# initialisation of the head and of LoRA's A matrices, another batch order; the same scenes) are shipped too
# (`data/lora_linear_seed1_ssl.pth` and so on), scored here on the same validation scenes:

# %% hide-input
seed_gaps = {0: gap_long}
rows = ["| seed | linear probe | LoRA r=4 (q, v) | LoRA − probe |", "|---|---|---|---|",
        f"| 0 (above) | {long_runs['linear probe']['score']:.3f} | {long_runs['LoRA r=4 (q, v)']['score']:.3f} | "
        f"{gap_long:+.3f} |"]
for seed in (1, 2):
    probe_s, lora_s = (score_shipped(TINY_CHECKPOINT.with_name(f"lora_{h}_seed{seed}_ssl.pth")) for h in ("linear", "lora"))
    seed_gaps[seed] = lora_s - probe_s
    rows.append(f"| {seed} | {probe_s:.3f} | {lora_s:.3f} | {seed_gaps[seed]:+.3f} |")
display(Markdown("\n".join(rows)))
g = torch.tensor(list(seed_gaps.values()))
met = int((g >= 0.10).sum())
display(Markdown(
    f"Over three seeds LoRA − probe is {g.mean():+.3f} on average, from {g.min():+.3f} to {g.max():+.3f}: the target "
    f"LoRA ≥ probe + 0.10 is met by {met} of the 3 runs. LoRA's lead is the same size in every run; whether it clears "
    "0.10 exactly depends on the seed, so read the target as met at its edge, not with room to spare."))
assert g.min() > 0.05, seed_gaps  # LoRA is clearly ahead in every run

# %% [markdown] subslide
# ### 5.5 Memory: what each method has to keep
#
# Training memory has four parts: the weights (all methods keep the whole backbone), the **gradients** and the
# **AdamW state** (two moments) of the trainable parameters, and the **activations** autograd saves for the
# backward pass. The first three follow from the parameter counts. The fourth we *measure*: a
# `torch.autograd.graph.saved_tensors_hooks` pack hook sees every tensor autograd stores during one forward
# pass of a training batch; we add up their storages once each, leaving out the parameters themselves.
# (On a GPU, `torch.cuda.max_memory_allocated` gives the peak directly; on the CPU there is no such counter.)
# The linear probe on cached features saves only the head's activations; its backbone ran once, without a graph.

# %% hide-input
def saved_activation_bytes(model, inputs):
    """Bytes of the tensors autograd saves for backward in one forward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(inputs), torch.zeros(len(inputs), 128, 128, dtype=torch.long, device=inputs.device))
    del loss
    return sum(seen.values())


MB = 2 ** 20
idx = ORDER[0]
mem_rows = ["| method | weights | gradients | AdamW state | saved activations (batch 16) | total |", "|---|---|---|---|---|---|"]
mem = {}
for name, m in methods.items():
    inputs = feat["shifted"][0][idx] if name == "linear probe" else x_tr[idx]
    n_all = count_params(pretrained) + count_params(m["model"].head) if name == "linear probe" else count_params(m["model"])
    w, gr, opt = 4 * n_all, 4 * m["trainable"], 8 * m["trainable"]
    act = saved_activation_bytes(m["model"], inputs)
    mem[name] = dict(weights=w, grads=gr, adam=opt, act=act, total=w + gr + opt + act)
    mem_rows.append(f"| {name} | {w / MB:.1f} MB | {gr / MB:.2f} MB | {opt / MB:.2f} MB | {act / MB:.1f} MB | {(w + gr + opt + act) / MB:.1f} MB |")
display(Markdown("\n".join(mem_rows)))
assert mem["LoRA r=4 (q, v)"]["adam"] < 0.01 * mem["full fine-tuning"]["adam"]
assert mem["LoRA r=4 (q, v)"]["act"] <= mem["full fine-tuning"]["act"]
assert mem["linear probe"]["act"] < 0.1 * mem["LoRA r=4 (q, v)"]["act"]

# %% [markdown] notes
# Two things to read in the table.
#
# * **Activations.** The gradient must flow back through every block to reach the LoRA tensors of block 0, so LoRA
#   keeps most of what full fine-tuning keeps. It does keep less: a frozen Linear needs only its *weight* to pass
#   the gradient back ($\partial L/\partial x = \partial L/\partial y \cdot W$), not its *input*, which it would
#   need for its weight gradient. So an input that only a frozen weight's gradient needed is not kept; the largest
#   is the input of `mlp.fc2`, $4D$ numbers per token. The LoRA-wrapped `qkv` still keeps its input, because $A$'s
#   gradient needs it.
# * **Per-parameter memory** (gradients and AdamW's two moments): LoRA needs it for 0.7% of the weights. For the
#   tiny model this is small change next to the activations; for a large model it is the dominant term, as the
#   next cell computes for ViT-7B in fp32.

# %% hide-input
n7b = count_params(hub.build("dinov3_vit7b16", device="meta"))
n7b_lora = lora.lora_param_count(4096, 40, 4)
print(f"saved activations: LoRA / full = {mem['LoRA r=4 (q, v)']['act'] / mem['full fine-tuning']['act']:.2f}")
print(f"ViT-7B, fp32, before activations: full fine-tuning {16 * n7b / 1e9:.1f} GB (weights + grads + 2 AdamW moments); "
      f"LoRA r=4 {(4 * n7b + 16 * n7b_lora) / 1e9:.1f} GB (frozen weights {4 * n7b / 1e9:.1f} GB + {16 * n7b_lora / 1e6:.0f} MB)")

# %% [markdown] subslide
# ### 5.6 Step time
#
# Measured during training above (wall clock, so it depends on the machine; not compared by CI):

# %% hide-input
# NBVAL_IGNORE_OUTPUT
for name in ("LoRA r=4 (q, v)", "full fine-tuning"):
    print(f"{name:17s} {methods[name]['step_s'] * 1e3:6.0f} ms per training step (batch {BATCH}, 128 px, {DEVICE.type})")
print(f"{'linear probe':17s} the backbone ran once over the {N_TRAIN} train images; each step is the head only")

# %% [markdown]
# LoRA's step is cheaper, but nowhere near by the factor in trainable parameters: the forward pass is the same
# (plus the thin matmuls), and the backward pass skips only the *weight* gradients of the frozen layers (about half
# of the backward matmuls), not the gradients with respect to their inputs, and AdamW updates 18k numbers instead of
# 2.8M. The larger wins of LoRA are memory (above), storage (kilobytes per task, section 6) and, in multi-GPU
# training, no gradient all-reduce for frozen weights.

# %% [markdown] subslide
# ### 5.7 What did full fine-tuning change? Singular values of $\Delta W$
#
# LoRA restricts $\Delta W$ to rank $r$. Full fine-tuning had no such restriction: how concentrated is *its*
# update? Below, the singular values of $\Delta W_q$ (rows `0:D` of `qkv.weight`, after minus before) for each block,
# normalised by the largest, next to the LoRA update of the same block (rank 4 exactly) and a random Gaussian
# matrix of the same size.

# %% hide-input
with torch.no_grad():
    sv = {"full FT": [], "LoRA": []}
    for i in range(DEPTH):
        before = pretrained.blocks[i].attn.qkv.weight[:D].cpu()
        sv["full FT"].append(torch.linalg.svdvals(bb_full.blocks[i].attn.qkv.weight[:D].cpu() - before))
        sv["LoRA"].append(torch.linalg.svdvals(bb_lora.blocks[i].attn.qkv.delta_weight("q").cpu()))
    sv_rand = torch.linalg.svdvals(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))


def energy(s_, k):  # share of the squared Frobenius norm in the top k singular values
    return float((s_[:k] ** 2).sum() / (s_ ** 2).sum())


full_top4 = [energy(s_, R_LORA) for s_ in sv["full FT"]]
rand_top4 = energy(sv_rand, R_LORA)
assert all(int((s_ > 1e-5 * s_[0]).sum()) <= R_LORA for s_ in sv["LoRA"])  # the LoRA update has rank <= r
assert min(full_top4) > 0.5 > 0.2 > rand_top4  # full FT's update is concentrated in a few directions
print(f"ΔW_q {tuple(bb_full.blocks[0].attn.qkv.weight[:D].shape)}: the LoRA update has rank <= {R_LORA} in every block; "
      f"full FT puts > 50% of ||ΔW||² in its top {R_LORA} directions, a random matrix < 20%")

# %% hide-input
# NBVAL_IGNORE_OUTPUT
print(f"share of ||ΔW_q||² in the top {R_LORA} singular values: full FT, blocks 0-5:",
      [round(e, 3) for e in full_top4], f"  random matrix: {rand_top4:.3f}   LoRA: "
      f"{min(energy(s_, R_LORA) for s_ in sv['LoRA']):.3f}")

# %% subslide hide-input

fig, ax = plt.subplots(figsize=(11, 4.2))
for i, s_ in enumerate(sv["full FT"]):
    ax.plot(range(1, D + 1), s_ / s_[0], color="tab:blue", alpha=0.35 + 0.1 * i, label="full FT ΔW_q, blocks 0-5" if i == 0 else None)
for i, s_ in enumerate(sv["LoRA"]):
    ax.plot(range(1, D + 1), (s_ / s_[0]).clamp(min=1e-4), color="tab:orange", alpha=0.6, label="LoRA ΔW_q (r = 4)" if i == 0 else None)
ax.plot(range(1, D + 1), sv_rand / sv_rand[0], "k--", label="random Gaussian 192×192")
ax.set(xscale="log", yscale="log", xlabel="index i", ylabel="σ_i / σ_1", ylim=(1e-4, 1.5),
       title="Singular values of the fine-tuning update of W_q")
ax.axvline(R_LORA, color="gray", lw=0.8, ls=":")
ax.legend(fontsize=11, loc="lower left")
plt.tight_layout()
plt.show()

# %% [markdown]
# Full fine-tuning was free to change $W_q$ in all 192 directions, yet almost all of its update lies in a handful:
# the spectrum falls by one to two orders of magnitude within the first ten singular values, where a random
# matrix's stays flat. That is the low-rank hypothesis LoRA builds on, seen in our own run: a rank-4 update can
# hold most of what full fine-tuning did to this matrix, and section 5.4 measured that LoRA recovers most of full
# fine-tuning's gain over the linear probe.

# %% [markdown] notes
# (One short run on one task: this illustrates the idea, it does not
# prove it in general. The LoRA paper's own analysis, §7, looks at the learned LoRA updates of GPT-3: the top
# directions of its $r = 8$ and $r = 64$ runs overlap strongly.)

# %% [markdown] slide
# ## 6. Merging: inference at the plain model's cost
#
# After training, `merge_lora` writes $W \leftarrow W + \frac{\alpha}{r}B A$ into every `qkv` weight (q and v
# rows) and sets `merged=True`, after which `LoRAQKV.forward` returns `base(x)` and skips the LoRA path. Three checks:
# the outputs do not change, the merged model does **exactly** the plain model's arithmetic (FLOPs counted with
# `torch.utils.flop_counter`), and the merged weights, exported with the original key names, load **strictly**
# into a plain `DinoVisionTransformer`.

# %% hide-input
x_check = x_va[:8]
with torch.no_grad():
    lora_model.eval()
    y_before = lora_model(x_check)
    tokens_before = bb_lora.forward_features(x_check)["x_norm_patchtokens"]
    lora.merge_lora(bb_lora)
    y_after = lora_model(x_check)
    tokens_after = bb_lora.forward_features(x_check)["x_norm_patchtokens"]
# The size of the difference is float rounding (it changes with the machine), so print the statement, not the number.
print("logits", tuple(y_after.shape), "| max |merged - unmerged| < 1e-4 for logits and patch tokens:",
      bool((y_after - y_before).abs().max() < 1e-4 and (tokens_after - tokens_before).abs().max() < 1e-4))
torch.testing.assert_close(y_after, y_before, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(tokens_after, tokens_before, rtol=1e-4, atol=1e-4)
assert all(m.merged for m in lora.lora_modules(bb_lora).values())

# a plain backbone holding the merged weights: original keys, strict load
plain = hub.dinov3_vittiny16().to(DEVICE).eval()
plain.load_state_dict(lora.merged_state_dict(bb_lora), strict=True)
with torch.no_grad():
    torch.testing.assert_close(plain.forward_features(x_check)["x_norm_patchtokens"], tokens_after, rtol=1e-5, atol=1e-5)
print("merged outputs == unmerged outputs; the exported weights load strictly into a plain DinoVisionTransformer")


def flops(model_, x_):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model_.forward_features(x_)
    return fc.get_total_flops()


f_plain, f_merged = flops(plain, x_check), flops(bb_lora, x_check)
lora.unmerge_lora(bb_lora)
f_unmerged = flops(bb_lora, x_check)
lora.merge_lora(bb_lora)
print(f"FLOPs for 8 images: plain {f_plain / 1e9:.3f} G   LoRA merged {f_merged / 1e9:.3f} G   "
      f"LoRA unmerged {f_unmerged / 1e9:.3f} G (+{f_unmerged / f_plain - 1:.2%})")
assert f_merged == f_plain < f_unmerged  # merged: no LoRA matmul runs

# %% skip
# NBVAL_IGNORE_OUTPUT
def median_time(fn, n=7):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2]


with torch.no_grad():
    for _ in range(2):  # warm up
        plain.forward_features(x_check), bb_lora.forward_features(x_check)
    t_plain = median_time(lambda: plain.forward_features(x_check))
    t_merged = median_time(lambda: bb_lora.forward_features(x_check))
    lora.unmerge_lora(bb_lora)
    t_unmerged = median_time(lambda: bb_lora.forward_features(x_check))
    lora.merge_lora(bb_lora)
print(f"forward, 8 images (median of 7): plain {t_plain * 1e3:.1f} ms   merged {t_merged * 1e3:.1f} ms   "
      f"unmerged {t_unmerged * 1e3:.1f} ms")

# %% [markdown] subslide
# What travels between runs is only the LoRA tensors (plus the head): `lora_state_dict` returns kilobytes, and
# `load_lora` puts them into a fresh `apply_lora` model with the same rank (the `alpha` goes in the config, see
# `lora.lora_config`). One pretrained backbone can then serve many tasks, each a small file.

# %% hide-input
sd_lora = lora.lora_state_dict(bb_lora)
n_lora_bytes = sum(t.numel() * t.element_size() for t in sd_lora.values())
n_full_bytes = sum(t.numel() * t.element_size() for t in bb_full.state_dict().values())
print(f"{len(sd_lora)} LoRA tensors, e.g. {next(iter(sd_lora))} {tuple(next(iter(sd_lora.values())).shape)}: "
      f"{n_lora_bytes / 1024:.0f} KB  vs  the full fine-tuned backbone {n_full_bytes / MB:.1f} MB")
print("config:", lora.lora_config(bb_lora))

fresh = lora.apply_lora(hub.dinov3_vittiny16(weights=CKPT).to(DEVICE).eval(), **{k: v for k, v in lora.lora_config(bb_lora).items()})
lora.load_lora(fresh, sd_lora)
with torch.no_grad():
    torch.testing.assert_close(fresh.forward_features(x_check)["x_norm_patchtokens"], tokens_after, rtol=1e-4, atol=1e-4)
print("pretrained backbone + loaded LoRA tensors reproduces the fine-tuned model")

# %% skip
# NBVAL_IGNORE_OUTPUT
result = {
    "task": "foreground segmentation, ShapesWorld shifted, fg IoU on 256 val images",
    "lora_score": round(lora_score, 3), "linear_score": round(linear_score, 3), "full_score": round(full_score, 3),
    "lora_trainable": lora_trainable, "linear_trainable": methods["linear probe"]["trainable"],
    "full_trainable": full_trainable, "lora_share_of_full": round(lora_trainable / full_trainable, 4),
    "lora_rank": R_LORA, "lora_alpha": ALPHA_LORA, "steps": STEPS, "batch": BATCH, "n_train": N_TRAIN,
    "probe_source_on_source": round(shift_table["source", "source"], 3),
    "probe_shifted_on_shifted": round(shift_table["shifted", "shifted"], 3),
    "lora_score_shipped": round(long_runs["LoRA r=4 (q, v)"]["score"], 3),
    "linear_score_shipped": round(long_runs["linear probe"]["score"], 3),
    "steps_shipped": long_runs["LoRA r=4 (q, v)"]["meta"]["config"]["steps"],
    "linear_score_random_init": round(three["random init"]["linear probe"], 3),
    "lora_score_random_init": round(three["random init"]["LoRA r=4 (q, v)"], 3),
    "linear_score_supervised": round(three["supervised control"]["linear probe"], 3),
    "lora_score_supervised": round(three["supervised control"]["LoRA r=4 (q, v)"], 3),
}
print("RESULT " + json.dumps(result))

# %% [markdown] slide
# ## Summary
#
# The shapes through a LoRA-adapted backbone and its head (`dinolab.trace`; the thin LoRA matmuls run inside
# `qkv`, whose `base` is the frozen fused Linear):

# %% hide-input
lora.unmerge_lora(bb_lora)
display(trace.trace(lora_model, x_tr[:2], names=["backbone.patch_embed", "backbone.blocks", "backbone.blocks.0.attn.qkv",
                                                 "backbone.blocks.0.attn.qkv.base", "backbone.norm", "head"]))
qkv0 = bb_lora.blocks[0].attn.qkv
print({k: tuple(v.shape) for k, v in qkv0.named_parameters()})

# %% [markdown] slide
# ### What to remember
#
# * LoRA learns $\Delta W = \frac{\alpha}{r} B A$ with $A$ (r × d_in), $B$ (d_out × r), $B = 0$ at start, $W$ frozen:
#   $r(d_{in}+d_{out})$ numbers per matrix instead of $d_{in}d_{out}$.
# * q and v is the LoRA paper's choice from a GPT-3 ablation (Table 5): at a fixed budget, spreading rank over q and v
#   beat putting it all into q or k. For ViTs it is a convention, not a measured optimum.
# * DINOv3's `qkv` is fused; a q/v LoRA adds into rows `0:D` and `2D:3D` only. That is exactly peft on transformers'
#   split `q_proj`/`v_proj` (checked here by hand and in `tests/test_lora.py` against peft); peft on the fused layer
#   would be a different model.
# * Trainable parameters: $4rD$ per block for q and v, a share of about $r/(3D)$ of the backbone: at r = 4, 0.34% of
#   ViT-S and 0.04% of ViT-7B (section 4).
# * LoRA removes the per-parameter memory (gradients, optimizer state) and most of the storage; it saves only part of
#   the activation memory and step time, because the backward pass still crosses every block.
# * Full fine-tuning's own update of $W_q$ was concentrated in a few directions (5.7): the reason a small rank can
#   be enough.
# * Merge after training: the same outputs, the plain model's FLOPs, the plain model's keys.
# * Measured here: the shift costs a frozen probe about 0.11 IoU; on the shifted domain LoRA (0.7% of full
#   fine-tuning's trainable parameters) beats a new probe by about 0.06 and full fine-tuning by about 0.08.

# %% [markdown] skip
# ### Exercises
#
# 1. Rank sweep: train LoRA with r = 1, 2, 8, 16 (keep α = 2r). Where does the score stop improving? Plot score vs
#    trainable parameters next to the three points above.
# 2. Targets at a fixed budget, as in the paper's Table 5: `targets=("q",)` at r = 8, `("v",)` at r = 8,
#    `("q", "v")` at r = 4, `("q", "k", "v")` at r = 3 (about the same count). Does the ranking match GPT-3's?
# 3. Adapt `attn.proj` and the MLP's `fc1`/`fc2` too (write a small wrapper like `LoRAQKV` for a plain Linear).
#    How many parameters, and how much score?
# 4. Turn the RoPE coordinate augmentation back on during training (drop the `eval()` in `SegModel.train`).
#    Does it help LoRA or full fine-tuning with 60 steps?
# 5. With `SCALE = 4` on a GPU: does full fine-tuning's $\Delta W_q$ spectrum (5.7) become more or less concentrated
#    with more steps?
