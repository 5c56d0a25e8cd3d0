# %% [markdown] slide
# # 05 · Self-distillation: DINO, iBOT, KoLeo and Gram anchoring
#
# DINOv3 learns without labels. A **student** network is trained to predict, from one crop of an image, what a
# **teacher** network outputs for another crop of the same image. The teacher is an exponential moving average (EMA)
# of the student. This notebook builds every objective of that recipe (`dinov3/train/ssl_meta_arch.py`) on tensors
# small enough to check by hand, then trains the tiny ViT of notebook 04 live for a few seconds, and finally measures
# the shipped checkpoint (`data/dinov3_tiny_shapesworld.pth`, made by `python -m dinolab.pretrain`):
#
# 0. **the data**: ShapesWorld, the procedural dataset that every notebook trains on;
# 1. **the setup**: student, EMA teacher, multi-crop (2 global + n local crops);
# 2. the **DINO loss** (image level): head, temperatures, cross-entropy, the local/global crop pairs;
# 3. **collapse**, and what prevents it: centering, sharpening and **Sinkhorn–Knopp**, in a tiny experiment;
# 4. the **iBOT loss** (patch level): block masks, the mask token, the loss on masked patches only;
# 5. **KoLeo**: a nearest-neighbour entropy estimate that spreads the features out;
# 6. **Gram anchoring**: keep the patch-similarity structure of an earlier teacher;
# 7. **live pretraining** with `dinolab.pretrain.train` (both phases, about 25 s);
# 8. the **shipped checkpoint**: its recipe and learning curves, k-NN accuracy, PCA maps, a linear patch probe, what
#    the Gram phase changed, and the official protocols against random init and a supervised control.
#
# Expected run time: about 100 s on 2 idle CPU cores (about 15 s of it is the live pretraining, most of the rest
# evaluates the shipped checkpoints).

# %% slide hide-input
from IPython.display import Markdown, display

from dinolab import viz

viz.use_style()
display(Markdown(viz.series_map("05")))

# %% skip
import copy
import hashlib
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from dinolab import augment, dino_head, evaluate, hub, losses, masking, schedules, trace
from dinolab.data import CLASS_NAMES, MASK_COLORS, ShapesWorld
from dinolab.linear import knn_accuracy
from dinolab.pretrain import PretrainConfig, Student, train
from dinolab.utils import count_params, get_device, seed_everything

seed_everything(0)
DEVICE = get_device()  # features are computed here (CUDA if present); the live pretraining runs on the CPU
print("device type:", DEVICE.type)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) along the last dim."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


# %% [markdown] slide
# ## 0. The data: ShapesWorld
#
# Every notebook trains on `dinolab.data.ShapesWorld`: procedural scenes (a floor, a far wall, 1–4 shapes of
# 5 classes with random colours and textures, occlusion, shadows). Each index is a deterministic sample with an
# image, a semantic mask, a metric depth map and an image label (the class covering most pixels). Pretraining uses
# **only the images**; masks and labels are used at the end, to *measure* what the features learned.

# %% subslide hide-input
train_ds = ShapesWorld("train")
sample = train_ds.batch(range(6))
for k in ("image", "mask", "depth", "label", "boxes"):
    print(f"{k:6s} {str(tuple(sample[k].shape)):18s} {sample[k].dtype}")
print(train_ds)

fig, axes = plt.subplots(3, 6, figsize=(9.0, 4.4))
for i in range(6):
    axes[0, i].imshow(viz.to_numpy_image(sample["image"][i]), interpolation="nearest")
    axes[0, i].set_title(f"label: {CLASS_NAMES[sample['label'][i]]}", fontsize=10)
    axes[1, i].imshow(MASK_COLORS[sample["mask"][i]].numpy())
    axes[2, i].imshow(sample["depth"][i].numpy(), cmap="magma_r")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
for ax, name in zip(axes[:, 0], ["image", "mask", "depth\n(bright = near)"]):
    ax.set_ylabel(name, fontsize=10)
handles = [plt.Rectangle((0, 0), 1, 1, color=MASK_COLORS[c].numpy()) for c in range(len(CLASS_NAMES))]
fig.legend(handles, CLASS_NAMES, loc="lower center", ncol=6, fontsize=10, frameon=False)
plt.tight_layout(rect=(0, 0.05, 1, 1))
plt.show()

# %% [markdown] slide
# ## 1. The setup: student, teacher and multi-crop
#
# ```
#                  ┌─ 2 global crops ──► teacher (EMA, no grad) ──► targets p_t      (unmasked crops)
#  image ─ aug ──► ┤
#                  └─ 2 global crops (iBOT-masked) + n local crops ──► student ──► predictions p_s
#  loss = cross-entropy(p_t, p_s) over pairs of *different* crops; gradient to the student only;
#  then teacher ← m · teacher + (1 − m) · student
# ```
#
# **Multi-crop** (`dinov3/data/augmentations.py::DataAugmentationDINO`): per image, 2 *global* crops covering 32–100 %
# of the area and n *local* crops covering 5–32 %, each with flips, colour jitter, grey, blur and (second global crop
# only) solarisation. The teacher sees only the global crops, so the student must infer from a small local view what
# the teacher says about a large one: "local-to-global" correspondence. Official sizes are 224 / 96 px with 8 local
# crops (`ssl_default_config.yaml`; the 7B uses 256 / 112). Ours are the defaults of `dinolab.pretrain.PretrainConfig`,
# printed below, on the 128-px ShapesWorld images.

# %% hide-input
cfg_ship = PretrainConfig()  # the defaults of `python -m dinolab.pretrain`
print(f"PretrainConfig: 2 global crops of {cfg_ship.global_size} px, {cfg_ship.n_local} local crops of "
      f"{cfg_ship.local_size} px, from {cfg_ship.image_size}-px images")
aug_show = augment.MultiCropAugmentation(global_size=cfg_ship.global_size, local_size=cfg_ship.local_size,
                                     n_local=cfg_ship.n_local, normalize=False)  # normalize=False: for display
print(aug_show)
crops = aug_show(sample["image"][:2], generator=torch.Generator().manual_seed(3))
for k, v in crops.items():
    print(f"{k:13s} {tuple(v.shape)}")
print("crop-major layout: rows [c*B, (c+1)*B) hold crop c of every image (B = 2 here)")

# %% subslide hide-input
B_show, n_loc = 2, cfg_ship.n_local
fig = plt.figure(figsize=(10.4, 3.0))
gs = fig.add_gridspec(2, 6, width_ratios=[2, 2, 2, 1, 1, 0.05])
ax = fig.add_subplot(gs[:, 0])
ax.imshow(viz.to_numpy_image(sample["image"][0]), interpolation="nearest")
colors = ["tab:red", "tab:orange"] + ["tab:blue", "tab:cyan", "tab:green", "tab:purple"]
boxes = torch.cat([crops["global_boxes"][:, 0], crops["local_boxes"][:, 0]])
names = ["global 1", "global 2"] + [f"local {i + 1}" for i in range(n_loc)]
for box, color, name in zip(boxes.tolist(), colors, names):
    x0, y0, x1, y1 = box
    ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=2))
    ax.text(x0 + 1, y0 + 6, name, color="white", fontsize=10, bbox=dict(fc=color, ec="none", pad=1))
ax.set_title("image 0 (128 px) and its crop boxes", fontsize=10)
ax.axis("off")
views = [crops["global_crops"][c * B_show] for c in range(2)] + [crops["local_crops"][c * B_show] for c in range(n_loc)]
slots = [gs[:, 1], gs[:, 2]] + [gs[r, 3 + c] for r in range(2) for c in range(2)]  # drawn to scale: 96 vs 48 px
for slot, view, color, name in zip(slots, views, colors, names):
    a = fig.add_subplot(slot)
    a.imshow(viz.to_numpy_image(view), interpolation="nearest")
    a.set_title(f"{name}, {view.shape[-1]} px", fontsize=10, color=color)
    a.set_xticks([])
    a.set_yticks([])
    for sp in a.spines.values():
        sp.set_edgecolor(color)
        sp.set_linewidth(2)
plt.tight_layout()
plt.show()

# %% [markdown]
# The student is `dinolab.pretrain.Student`: the ViT backbone plus two heads of the same shape, a **DINO head** for the
# CLS token and an **iBOT head** for patch tokens (separate, as in DINOv3's ViT-7B configs; DINOv2 could share one).
# The teacher is a deep copy with gradients off. Below: one forward pass on normalised crops, with iBOT masks on the global crops.

# %% hide-input
seed_everything(0)
student = Student(cfg_ship)
teacher = copy.deepcopy(student).requires_grad_(False)
aug = augment.MultiCropAugmentation(global_size=cfg_ship.global_size, local_size=cfg_ship.local_size,
                                n_local=cfg_ship.n_local)
crops_n = aug(sample["image"][:2], generator=torch.Generator().manual_seed(3))  # normalised this time
grid = cfg_ship.global_size // 16
masks = masking.make_masks(2 * B_show, grid, generator=0)
print(f"backbone {count_params(student.backbone):,} params; dino_head {count_params(student.dino_head):,}; "
      f"ibot_head {count_params(student.ibot_head):,}  (K = {cfg_ship.head_out_dim} prototypes)")
print(f"global crops {tuple(crops_n['global_crops'].shape)}  local crops {tuple(crops_n['local_crops'].shape)}  "
      f"masks {tuple(masks.shape)} ({int(masks.sum())} masked patches)")
with torch.no_grad():
    s_out = student(crops_n["global_crops"], crops_n["local_crops"], masks)
    t_out = teacher(crops_n["global_crops"], None, masks, mask_inputs=False)
for name, out in (("student", s_out), ("teacher", t_out)):
    print(name, {k: tuple(v.shape) for k, v in out.items() if v is not None and v.numel()})

# %% [markdown] subslide
# **The EMA teacher** (`update_ema`): after each optimiser step, every teacher weight becomes
# `m · teacher + (1 − m) · student`, with m following a cosine from 0.992 to 1 (`cosine_schedule`). The teacher is a
# temporal ensemble of students: slower, smoother and, as in DINO, usually better than the student itself. That is why
# the checkpoint we ship is the teacher.

# %% hide-input
with torch.no_grad():
    for p in student.parameters():
        p.add_(0.01 * torch.randn_like(p))  # pretend an optimiser step moved the student
m = 0.992
expected = {k: m * v + (1 - m) * student.state_dict()[k] for k, v in teacher.state_dict().items()
            if v.is_floating_point()}
schedules.update_ema(teacher, student, m)
for k, v in expected.items():
    if k in dict(teacher.named_parameters()):
        torch.testing.assert_close(teacher.state_dict()[k], v)
print("teacher == 0.992 * teacher + 0.008 * student for every parameter")
print("momentum schedule (first, middle, last of 11 steps):",
      [round(float(x), 4) for x in schedules.cosine_schedule(0.992, 1.0, 11)[[0, 5, 10]]])

# %% [markdown] slide
# ## 2. The DINO loss, on tiny tensors
#
# ### 2.1 The head
# `DINOHead` (`dinov3/layers/dino_head.py`): a 3-layer MLP to a small *bottleneck*, L2 normalisation, then
# `last_layer`, a bias-free Linear whose K rows are the **prototypes**. The output is K logits: how much the
# (normalised) embedding looks like each prototype. Official sizes: K = 65,536, hidden 2048, bottleneck 256
# (ViT-7B: 262,144 / 8192 / 512). Here: input 8, hidden 16, bottleneck 4, K = 6, layer by layer.

# %% hide-input
seed_everything(0)
head = dino_head.DINOHead(in_dim=8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
x = torch.randn(3, 8)  # 3 CLS tokens of width 8
h = x
print(f"input             {tuple(h.shape)}")
for i, layer in enumerate(head.mlp):
    h = layer(h)
    print(f"mlp.{i} {type(layer).__name__:10s} {tuple(h.shape)}")
z = F.normalize(h, dim=-1)
print(f"L2-normalise      {tuple(z.shape)}   norms {[round(v, 3) for v in z.norm(dim=-1).tolist()]}")
logits = head.last_layer(z)
print(f"last_layer        {tuple(logits.shape)}   (prototypes: weight {tuple(head.last_layer.weight.shape)})")
torch.testing.assert_close(logits, head(x))
print("== head(x)")

# %% [markdown] subslide
# DINOv3's `last_layer` is a plain Linear (DINO v1/v2 used weight normalisation). Our pretraining keeps the prototype
# rows on the unit sphere after each step (`PretrainConfig.norm_last_layer`, our deviation for short CPU runs), so the
# logits are cosines in [−1, 1].
#
# ### 2.2 Temperatures
# Logits become distributions with a softmax at a temperature τ: `softmax(l / τ)`. The student uses τ_s = 0.1, the
# teacher a **lower** τ_t (officially 0.04 warming up to 0.07, `linear_warmup_then_constant`): the teacher's targets are
# *sharper* than the student's predictions. (Our short CPU runs use an even colder teacher: see
# `PretrainConfig.teacher_temp`, printed below, and the comment beside it.)

# %% hide-input
l = torch.tensor([0.9, 0.7, 0.2, 0.0, -0.3, -0.8])  # cosine-like logits for K = 6 prototypes
rows = ["| τ | softmax(l / τ) | entropy (nats) |", "|---|---|---|"]
for tau, who in [(1.0, ""), (0.1, "student"), (0.07, "teacher, official end"), (0.04, "teacher, official start")]:
    p = F.softmax(l / tau, dim=-1)
    rows.append(f"| {tau} {who} | {[round(v, 3) for v in p.tolist()]} | {entropy(p):.3f} |")
rows.append(f"| uniform | | log K = {math.log(6):.3f} |")
display(Markdown("\n".join(rows)))
print("teacher temperature in PretrainConfig (start, end of warm-up):", cfg_ship.teacher_temp)

# %% [markdown] subslide
# ### 2.3 Cross-entropy between teacher and student
# For one image and one pair of crops, the loss is `H(p_t, p_s) = −Σ_k p_t[k] · log p_s[k]`, which equals
# `H(p_t) + KL(p_t ‖ p_s)`. Only the KL part depends on the student; the entropy of the teacher is a floor that the
# loss can never go below. (So a DINO loss does not go to 0, and its value alone says little.)

# %% hide-input
t_logits, s_logits = 2 * torch.rand(6) - 1, 2 * torch.rand(6) - 1  # cosine-like logits in [-1, 1]
p_t, log_p_s = F.softmax(t_logits / 0.04, -1), F.log_softmax(s_logits / 0.1, -1)
ce = -(p_t * log_p_s).sum()
kl = (p_t * (p_t.clamp_min(1e-12).log() - log_p_s)).sum()
print(f"H(p_t, p_s) = {ce:.4f} = H(p_t) {entropy(p_t):.4f} + KL {kl:.4f}")
torch.testing.assert_close(ce, entropy(p_t) + kl)

# %% [markdown]
# ### 2.4 All the crop pairs, and the local / global weights
# The teacher gives targets for the 2 global crops, the student predictions for 2 global + n local crops. Every
# student crop is paired with every teacher crop **except itself** (a global crop is not asked to predict its own
# target): 2n local pairs and 2 · 2 − 2 = 2 global pairs. `ssl_meta_arch.py` computes the two groups with
# `DINOLoss` (each a mean over its pairs) and weights them by their share of all pairs: **2n / (2n + 2)** for the
# local term and **2 / (2n + 2)** for the global one (official n = 8: 16/18 and 2/18). The weighted sum is then
# simply the mean over all 2n + 2 pairs. We check `dinolab.losses.DINOLoss` against a plain loop.

# %% hide-input
seed_everything(0)
B, K, n = 3, 6, 4
teacher_logits = torch.randn(2, B, K)  # (teacher crops, images, prototypes)
student_global, student_local = torch.randn(2, B, K), torch.randn(n, B, K)
p_teacher = losses.sinkhorn_knopp(teacher_logits.flatten(0, 1), teacher_temp=0.04).view(2, B, K)  # section 3
print(f"teacher probs {tuple(p_teacher.shape)}  student global {tuple(student_global.shape)}  "
      f"student local {tuple(student_local.shape)}")

student_all = torch.cat([student_global, student_local])  # student crop s: 0, 1 = global, 2.. = local
pair_losses = {}
for s in range(2 + n):
    for t in range(2):
        if s == t:
            continue  # the same global crop seen by both networks
        ce_per_image = -(p_teacher[t] * F.log_softmax(student_all[s] / 0.1, -1)).sum(-1)  # (B,)
        pair_losses[(s, t)] = ce_per_image.mean()
by_hand = torch.stack(list(pair_losses.values())).mean()
print(f"{len(pair_losses)} pairs = 2n + 2 = {2 * n + 2}")

dino = losses.DINOLoss(out_dim=K, student_temp=0.1)
local_scale, global_scale = 2 * n / (2 * n + 2), 2 / (2 * n + 2)
l_local = dino(student_local, p_teacher)
l_global = dino(student_global, p_teacher, ignore_diagonal=True)
total = local_scale * l_local + global_scale * l_global
print(f"local scale {local_scale:.3f}, global scale {global_scale:.3f}")
print(f"L_local {l_local:.4f}  L_global {l_global:.4f}  weighted {total:.4f}  by-hand mean over pairs {by_hand:.4f}")
torch.testing.assert_close(total, by_hand)
print("DINOLoss (local + global, weighted) == the plain mean over the 2n + 2 crop pairs")

# %% [markdown] slide
# ## 3. Collapse, and what prevents it
#
# The teacher is made from the student, so the pair can agree trivially, in two ways:
#
# * **one prototype for every image**: every output is the same one-hot vector; the loss is 0 and the features say
#   nothing;
# * **the uniform distribution for every image**: the loss is log K, every target is the same, and again nothing is
#   learned.
#
# DINO (v1) prevents both with two opposite forces on the teacher: **centering** subtracts a running mean of the teacher
# logits (`softmax_center_teacher`, `update_center`), so no prototype can win for every image, but this pushes toward
# uniform; **sharpening** (τ_t < τ_s) pushes away from uniform, but alone lets one prototype win. DINOv2 and DINOv3
# replace centering by **Sinkhorn–Knopp** (from SwAV): the targets of a batch are rescaled so that each prototype
# receives the same share of the batch. `SSLMetaArch` asserts `centering == "sinkhorn_knopp"`; the EMA centering is
# still in the code but unused.
#
# ### 3.1 Sinkhorn–Knopp by hand
# `DINOLoss.sinkhorn_knopp_teacher`: `Q = exp(logits / τ).T` (K × B), normalised to total mass 1; then 3 times:
# make every prototype's row sum 1/K, then every sample's column sum 1/B; finally multiply by B, so each sample's
# target sums to 1 and each prototype gets about B/K of the batch. Below, a batch of B = 8 where prototype 0 is
# preferred by every sample.

# %% subslide hide-input
def sinkhorn_by_hand(logits: torch.Tensor, tau: float, n_iter: int = 3) -> torch.Tensor:
    Q = torch.exp(logits / tau).T  # (K, B)
    K_, B_ = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iter):
        Q = Q / Q.sum(dim=1, keepdim=True) / K_  # each prototype: mass 1/K
        Q = Q / Q.sum(dim=0, keepdim=True) / B_  # each sample: mass 1/B
    return (Q * B_).T  # (B, K), rows sum to 1


seed_everything(1)
Bs, Ks = 8, 4
biased = 0.3 * torch.randn(Bs, Ks) + torch.tensor([0.4, 0.0, 0.0, 0.0])  # prototype 0 favoured by everyone
p_soft = F.softmax(biased / 0.1, dim=-1)
p_sk = losses.sinkhorn_knopp(biased, teacher_temp=0.1)
torch.testing.assert_close(p_sk, sinkhorn_by_hand(biased, 0.1))
print("losses.sinkhorn_knopp == by hand")
print(f"softmax  rows sum to {[round(v, 3) for v in p_soft.sum(1).tolist()][:3]}...  "
      f"columns (prototype usage) {[round(v, 2) for v in p_soft.sum(0).tolist()]}")
print(f"Sinkhorn rows sum to {[round(v, 3) for v in p_sk.sum(1).tolist()][:3]}...  "
      f"columns (prototype usage) {[round(v, 2) for v in p_sk.sum(0).tolist()]}   B/K = {Bs / Ks}")
torch.testing.assert_close(p_sk.sum(1), torch.ones(Bs))
torch.testing.assert_close(p_sk.sum(0), torch.full((Ks,), Bs / Ks), atol=0.2 * Bs / Ks, rtol=0)
print("asserted: rows sum to 1; columns within 20 % of B/K after the official 3 iterations")
for it in (0, 1, 3, 10, 30):
    cols = losses.sinkhorn_knopp(biased, teacher_temp=0.1, n_iterations=it).sum(0)
    print(f"  n_iterations {it:2d}: columns {[round(v, 3) for v in cols.tolist()]}")
cols = losses.sinkhorn_knopp(biased, teacher_temp=0.1, n_iterations=30).sum(0)
torch.testing.assert_close(cols, torch.full((Ks,), Bs / Ks), atol=0.01 * Bs / Ks, rtol=0)
print("asserted: with more iterations the columns converge to B/K (30 iterations: within 1 %)")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
for ax, p, title in [(axes[0], p_soft, "softmax(l / 0.1)"), (axes[1], p_sk, "Sinkhorn-Knopp (τ = 0.1)")]:
    im = ax.imshow(p.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"{title}\ncolumn sums {[round(v, 1) for v in p.sum(0).tolist()]}", fontsize=10)
    ax.set_xlabel("prototype")
    ax.set_ylabel("sample")
    ax.set_xticks(range(Ks))
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()

# %% [markdown] subslide
# ### 3.2 A tiny collapse experiment
# Student: a 2-layer MLP → L2 normalisation → K = 64 unit-norm prototypes (a miniature `DINOHead`); teacher: its EMA
# (m = 0.9). Data: random 32-d vectors; the two "views" add independent noise. The student on view 1 predicts the
# teacher on view 2 and vice versa, for 300 steps, with four ways of making the teacher's targets:
#
# | variant | teacher targets |
# |---|---|
# | sharpening only | `softmax(t / 0.04)` |
# | centering only | `softmax((t − c) / 0.1)`, c = EMA of the batch mean (τ_t = τ_s: no sharpening) |
# | centering + sharpening (DINO v1) | `softmax((t − c) / 0.04)` |
# | Sinkhorn–Knopp (DINOv2/v3) | `sinkhorn_knopp(t, 0.04)` |
#
# We follow two entropies of the teacher targets p (K = 64, so log K = 4.16): **H(p)**, the mean entropy of one
# sample's target (≈ 0: confident, log K: uniform), and **H(p̄)**, the entropy of the batch-mean target (how many
# prototypes are in use: ≈ 0 means one prototype for everything). Healthy training needs H(p) low and H(p̄) high.

# %% skip
def collapse_run(variant: str, steps: int = 300, K: int = 64, d: int = 32, B: int = 64, seed: int = 0,
                 tau_s: float = 0.1, tau_t: float = 0.04, noise: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.ModuleDict(dict(mlp=nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, 16)),
                             prototypes=nn.Linear(16, K, bias=False)))
    unit = lambda w: w.div_(w.norm(dim=1, keepdim=True))  # noqa: E731  prototypes on the unit sphere
    with torch.no_grad():
        unit(net.prototypes.weight)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.0)
    center = torch.zeros(1, K)
    logits_of = lambda m, v: m.prototypes(F.normalize(m.mlp(v), dim=-1))  # noqa: E731
    H_row, H_mean = [], []
    for _ in range(steps):
        x = torch.randn(B, d, generator=g)
        v1, v2 = x + noise * torch.randn(B, d, generator=g), x + noise * torch.randn(B, d, generator=g)
        with torch.no_grad():
            t = logits_of(ema, torch.cat([v1, v2]))
            if variant == "sharpening only":
                p = F.softmax(t / tau_t, dim=-1)
            elif variant == "centering only":
                p = losses.softmax_center_teacher(t, center, tau_s)
                center = losses.update_center(center, t, momentum=0.9)
            elif variant == "centering + sharpening":
                p = losses.softmax_center_teacher(t, center, tau_t)
                center = losses.update_center(center, t, momentum=0.9)
            else:  # "Sinkhorn-Knopp"
                p = losses.sinkhorn_knopp(t, tau_t)
        s = logits_of(net, torch.cat([v2, v1]))  # the student sees the *other* view
        loss = -(p * F.log_softmax(s / tau_s, dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            unit(net.prototypes.weight)
        schedules.update_ema(ema, net, 0.9)
        H_row.append(entropy(p).mean().item())
        H_mean.append(entropy(p.mean(0)).item())
    return torch.tensor(H_row), torch.tensor(H_mean)


VARIANTS = ["sharpening only", "centering only", "centering + sharpening", "Sinkhorn-Knopp"]
runs = {v: collapse_run(v) for v in VARIANTS}
LOGK = math.log(64)
final = {v: (hr[-20:].mean().item(), hm[-20:].mean().item()) for v, (hr, hm) in runs.items()}

# %% hide-input
# NBVAL_IGNORE_OUTPUT
# the exact entropies depend on float rounding; the asserts below check the outcome
rows = ["| variant | H(p), last 20 steps | H(p̄), last 20 steps | outcome |", "|---|---|---|---|"]
for v, (hr, hm) in final.items():
    outcome = ("collapse: one prototype" if hm < 0.1 * LOGK else "collapse: uniform" if hr > 0.95 * LOGK
               else "healthy: confident and diverse")
    rows.append(f"| {v} | {hr:.2f} | {hm:.2f} | {outcome} |")
display(Markdown("\n".join(rows) + f"\n\nlog K = {LOGK:.2f}"))

# %% subslide hide-input
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.2))
for v, (hr, hm) in runs.items():
    axes[0].plot(hr, label=v)
    axes[1].plot(hm, label=v)
for ax, title in zip(axes, ["H(p): entropy of one sample's target", "H(p̄): entropy of the batch-mean target"]):
    ax.axhline(LOGK, color="k", ls=":", lw=1)
    ax.text(150, LOGK + 0.07, "log K (uniform)", fontsize=10, ha="center")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylim(-0.2, LOGK + 0.4)
axes[1].legend(fontsize=10, loc="center right")
plt.tight_layout()
plt.show()

(hr_s, hm_s), (hr_c, hm_c) = final["sharpening only"], final["centering only"]
assert hm_s < 0.1 * LOGK and hr_s < 0.1 * LOGK, "sharpening alone should collapse to one prototype"
assert hr_c > 0.95 * LOGK, "centering alone should collapse to the uniform distribution"
for v in ("centering + sharpening", "Sinkhorn-Knopp"):
    hr, hm = final[v]
    assert hr < 0.5 * LOGK and hm > 0.75 * LOGK, v
assert final["Sinkhorn-Knopp"][1] > 0.95 * LOGK  # SK uses (almost) every prototype equally
print("asserted: sharpening alone -> one prototype; centering alone -> uniform; "
      "centering + sharpening and Sinkhorn-Knopp -> confident targets spread over the prototypes")

# %% [markdown] slide
# Sinkhorn–Knopp uses the prototypes most evenly because it enforces the balance *within each batch*, not through a
# slow running mean. The price is that it needs the whole batch (the official code all-reduces the sums across GPUs).
#
# ### 3.3 A third collapse, inside the student's head
# Both collapses above are the teacher's. The student has one of its own. Its logits are `W z`: z is the
# L2-normalised bottleneck (d = 64 in our tiny head) and the rows of W are K = 256 unit-norm prototypes. If z is
# orthogonal to every prototype, all K logits are 0 and the softmax is uniform at any temperature: the student outputs
# 1/K for every image, its loss is log K whatever the targets, and the teacher, its running average, follows.
#
# Random prototypes leave no such direction. For a unit z, ‖W z‖ ≥ σ_min(W), the smallest singular value of W, and
# with K ≫ d random unit rows σ_min is about 1. But the prototypes are trained, and nothing in the loss stops them
# from opening a direction that none of them points into.

# %% subslide hide-input
seed_everything(0)
K_p, d_p, tau_s = 256, 64, 0.1


def most_uniform_output(W: torch.Tensor) -> tuple[float, float]:
    """(σ_min of W, entropy of softmax(W v / τ_s)) for v the unit z with the smallest logits."""
    sv = torch.linalg.svdvals(W)
    v = torch.linalg.svd(W, full_matrices=False).Vh[-1]
    return sv[-1].item(), entropy(F.softmax(W @ v / tau_s, dim=-1)).item()


W_rand = F.normalize(torch.randn(K_p, d_p), dim=1)
v_weak = torch.linalg.svd(W_rand, full_matrices=False).Vh[-1]
W_open = F.normalize(W_rand - (W_rand @ v_weak)[:, None] * v_weak, dim=1)  # every prototype made orthogonal to v
log_K = math.log(K_p)
rows = ["| prototypes | σ_min(W) | most uniform output: entropy | log K |", "|---|---|---|---|"]
for name, W in [("random unit rows", W_rand), ("the same, with one direction emptied", W_open)]:
    sv_min, h = most_uniform_output(W)
    rows.append(f"| {name} | {sv_min:.2f} | {h:.3f} | {log_K:.3f} |")
display(Markdown("\n".join(rows)))
assert most_uniform_output(W_rand)[1] < log_K - 0.1  # random prototypes: no exactly uniform output
torch.testing.assert_close(W_open @ v_weak, torch.zeros(K_p), atol=1e-5, rtol=0)
print(f"asserted: with one direction emptied, z = that direction gives K logits of 0 -> entropy log K = {log_K:.3f}")

# %% [markdown] subslide
# Our tiny pretraining fell into exactly this. Below, two runs of `python -m dinolab.pretrain` with the same recipe
# (single large objects, two views of each scene in different colours, batch 32, K = 256, d = 64) that differ in
# one setting only: the prototypes learn (`freeze_last_layer_steps=0`) or stay at their random initialisation (`-1`).
# The official recipe freezes them for the first epoch (`optim.freeze_last_layer_epochs: 1`); we freeze them for the
# whole run. The curves were logged during training (`tools/pilot_curves.py` turned the two training states into
# `data/prototype_pilots.json`).

# %% slide hide-input
pilots = json.loads((Path("..") / "data" / "prototype_pilots.json").read_text())
learn, froz = pilots["learnable"], pilots["frozen"]
torch.manual_seed(froz["config"]["seed"])  # train() seeds, then builds the student: rebuild its prototypes
W_run = F.normalize(Student(PretrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in froz["config"].items()})).dino_head.last_layer.weight.detach(),
                    dim=1)
sv_run, h_ceiling = most_uniform_output(W_run)
ln_k = froz["ln_k"]
fig, axes = plt.subplots(1, 3, figsize=(12.8, 4.4))
for name, run in pilots.items():
    axes[0].plot(run["step"], run["prototype_sv_min"], label=f"prototypes {name}")
    axes[1].plot(run["step"], run["student_entropy"], label=f"prototypes {name}")
    axes[2].plot(run["step"], run["teacher_entropy"], label=f"prototypes {name}")
for ax, title in zip(axes, ["σ_min of the prototypes", "entropy of the student's output",
                            "entropy of the teacher's targets"]):
    ax.set_title(title)
    ax.set_xlabel("step")
last = froz["step"][-1]
for ax in axes[1:]:
    ax.axhline(ln_k, color="k", ls=":", lw=1)
    ax.text(last, ln_k - 0.01, "log K", ha="right", va="top")
axes[1].axhline(h_ceiling, color="C1", ls="--", lw=1, label="most uniform output\nthe frozen prototypes allow")
axes[1].legend(handles=axes[1].get_lines()[-1:], loc="lower right")
axes[0].set_ylim(0, 1.2)
axes[0].legend()
plt.tight_layout()
plt.show()

print(f"learnable prototypes: σ_min {learn['prototype_sv_min'][0]:.2f} -> {learn['prototype_sv_min'][-1]:.2f}; "
      f"student entropy at the end {learn['student_entropy'][-1]:.2f} of log K = {ln_k:.2f}")
print(f"frozen prototypes:    σ_min {sv_run:.2f} throughout; student entropy at the end "
      f"{froz['student_entropy'][-1]:.2f}; the most uniform output these prototypes allow: {h_ceiling:.2f}")
assert abs(froz["prototype_sv_min"][-1] - sv_run) < 1e-3  # the logged value is these prototypes' σ_min
assert learn["prototype_sv_min"][-1] < 0.25 * learn["prototype_sv_min"][0]
assert learn["student_entropy"][-1] > froz["student_entropy"][-1]
print("asserted: learnable prototypes open a near-empty direction; frozen ones keep σ_min, and the output off uniform")

# %% [markdown] notes
# Read the middle panel twice. With learnable prototypes the student's entropy climbs to log K: the head found the
# empty direction. With frozen prototypes it stops lower, but right at the most uniform output those prototypes allow:
# the student still hedges as much as it can. Freezing removes the escape, not the reason to hedge. The reason is in
# the right panel: the teacher's targets for two views of one image hardly agree when the views share no colour, so
# there is little for the student to predict. Section 8 measures what such runs learn.

# %% [markdown] slide
# ## 4. iBOT: masked patch prediction
#
# iBOT adds a **patch-level** task: some patches of the student's global crops are replaced by a learned
# `mask_token` (notebook 04), and the student must predict, at those positions, the teacher's distribution for the
# *unmasked* patch. A separate iBOT head (same shape as the DINO head) maps patch tokens to K prototypes; teacher targets
# use Sinkhorn–Knopp over all masked patches of the batch.
#
# ### 4.1 Block masks
# `MaskingGenerator` (`dinov3/data/masking.py`) adds random rectangles (at least 4 patches, aspect 0.3–3.3) until
# the requested count is reached, then completes it with random patches: masks are blobs, not salt-and-pepper, so a
# masked patch cannot simply be copied from its neighbour. `make_masks` (`dinov3/data/collate.py`) masks half of the
# global crops, with ratios spread evenly over [0.1, 0.5]; the other half get no mask.

# %% subslide hide-input
gen14 = masking.MaskingGenerator((14, 14), max_num_patches=0.5 * 196)  # official 224-px crops: 14 x 14 patches
print(gen14)
ratios = [0.1, 0.2, 0.3, 0.4, 0.5]
mask_examples = [gen14(int(r * 196), generator=7 + i) for i, r in enumerate(ratios)]
for r, mk in zip(ratios, mask_examples):
    assert int(mk.sum()) == int(r * 196)  # exactly the requested number of patches
batch_masks = masking.make_masks(8, (6, 6), generator=0)  # our 96-px global crops: 6 x 6 patches
print("make_masks(8 crops, 6x6) ->", tuple(batch_masks.shape), "masked per crop:", batch_masks.sum(1).tolist())
assert (batch_masks.sum(1) == 0).sum() == 4  # mask_probability 0.5: half the crops unmasked

fig, axes = plt.subplots(1, 6, figsize=(12.8, 2.9))
for ax, r, mk in zip(axes, ratios, mask_examples):
    ax.imshow(mk.numpy(), cmap="gray_r", vmin=0, vmax=1.6)
    ax.set_title(f"14x14, ratio {r}\n{int(mk.sum())} patches", fontsize=10)
axes[5].imshow(batch_masks[batch_masks.sum(1).argmax()].view(6, 6).numpy(), cmap="gray_r", vmin=0, vmax=1.6)
axes[5].set_title(f"6x6 (ours)\n{int(batch_masks.sum(1).max())} patches", fontsize=10)
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 4.2 The mask token replaces patch tokens
# Only the student's input is masked; the teacher sees the whole crop. Inside the backbone
# (`prepare_tokens_with_masks`), a masked patch embedding is swapped for `mask_token` *before* the blocks.

# %% hide-input
x_g = crops_n["global_crops"]  # (2B, 3, 96, 96)
bb = student.backbone
with torch.no_grad():
    tok_masked, hw = bb.prepare_tokens_with_masks(x_g, masks)
    tok_clean, _ = bb.prepare_tokens_with_masks(x_g)
patch_tok = tok_masked[:, 1 + bb.n_storage_tokens:]  # skip cls + 4 storage tokens
print(f"crops {tuple(x_g.shape)} -> tokens {tuple(tok_masked.shape)} (1 cls + 4 storage + {hw[0]}x{hw[1]} patches)")
assert torch.equal(patch_tok[masks], bb.mask_token.expand(int(masks.sum()), -1))
assert torch.equal(tok_masked[:, 1 + bb.n_storage_tokens:][~masks], tok_clean[:, 1 + bb.n_storage_tokens:][~masks])
print(f"{int(masks.sum())} masked positions hold mask_token; the {int((~masks).sum())} others are unchanged")

# %% [markdown] subslide
# ### 4.3 The loss on masked patches only
# For each masked patch i of image b: `ℓ_i = −Σ_k p_t[i, k] · log softmax(s[i] / 0.1)[k]`. The official weighting
# (`masks_weight` in `collate.py`, `iBOTPatchLoss.forward_masked`): **mean over the masked patches of each image, then
# the sum over images divided by the number of images**, counting the unmasked images too (they add 0). So an image
# with 3 masked patches weighs as much as one with 18.

# %% hide-input
seed_everything(0)
Bi, Ni, Ki = 4, 9, 5
mk = torch.zeros(Bi, Ni, dtype=torch.bool)
mk[0, [0, 1, 3]] = True                # 3 masked patches
mk[2, [2, 4, 5, 6, 7, 8]] = True       # 6 masked patches; images 1 and 3 are unmasked
s_dense, t_dense = torch.randn(Bi, Ni, Ki), torch.randn(Bi, Ni, Ki)
t_probs = losses.sinkhorn_knopp(t_dense[mk], teacher_temp=0.04)  # SK over the M masked patches of the batch
print(f"masks {tuple(mk.shape)}, M = {int(mk.sum())} masked patches; student rows {tuple(s_dense[mk].shape)}, "
      f"teacher probs {tuple(t_probs.shape)}")

by_hand, row = 0.0, 0
for b in range(Bi):
    idx = mk[b].nonzero().flatten()
    if len(idx) == 0:
        continue  # contributes 0, but still counts in the division by Bi
    per_patch = [-(t_probs[row + j] * F.log_softmax(s_dense[b, i] / 0.1, -1)).sum() for j, i in enumerate(idx)]
    by_hand += torch.stack(per_patch).mean()
    row += len(idx)
by_hand = by_hand / Bi

ibot = losses.iBOTPatchLoss(student_temp=0.1)
l_masked = ibot.forward_masked(s_dense[mk], t_probs, mk)
t_probs_dense = torch.zeros(Bi, Ni, Ki)
t_probs_dense[mk] = t_probs
l_dense = ibot(s_dense, t_probs_dense, mk)
print(f"by hand {by_hand:.4f}   forward_masked {l_masked:.4f}   forward (dense) {l_dense:.4f}")
print("per-patch weights (ibot_mask_weights):", [round(w, 3) for w in losses.ibot_mask_weights(mk).tolist()])
torch.testing.assert_close(l_masked, by_hand)
torch.testing.assert_close(l_dense, by_hand)

# %% [markdown] slide
# ## 5. KoLeo: spread the features out
#
# The Kozachenko–Leonenko estimator of differential entropy is, up to constants, the mean log distance of each point to
# its nearest neighbour: `Ĥ ≈ (d/n) Σ_i log ρ_i + const`. Maximising it spreads points apart. The **KoLeo loss**
# (Sablayrolles et al. 2019, added in DINOv2; `dinov3/loss/koleo_loss.py`) is `−(1/n) Σ_i log ‖x_i − x_nn(i)‖` on
# L2-normalised vectors, applied to the student's pre-head CLS tokens of each global crop within the batch, with weight
# 0.1 × 2 crops. It works against the clumping of images into a few directions, which helps nearest-neighbour retrieval.

# %% hide-input
seed_everything(0)
xk = torch.randn(16, 8)
xn = F.normalize(xk, dim=-1)
sim = xn @ xn.T
sim.fill_diagonal_(-1)  # a point is not its own neighbour
nn_idx = sim.argmax(1)
koleo_by_hand = -torch.log((xn - xn[nn_idx]).norm(dim=-1)).mean()
koleo = losses.KoLeoLoss()
print(f"KoLeo by hand {koleo_by_hand:.4f}   losses.KoLeoLoss {koleo(xk):.4f}")
torch.testing.assert_close(koleo(xk), koleo_by_hand, atol=1e-6, rtol=1e-5)  # the official adds eps = 1e-8

# %% [markdown] notes
# **A 2-D toy.** 24 points on the unit circle, bunched around one direction; 300 Adam steps on the KoLeo loss alone
# move them apart. For n evenly spaced points every nearest-neighbour distance is 2·sin(π/n).

# %% subslide hide-input
seed_everything(0)
n_pts = 24
angles = 0.6 * torch.randn(n_pts)
pts = nn.Parameter(torch.stack([angles.cos(), angles.sin()], dim=1))
opt_k = torch.optim.Adam([pts], lr=0.02)


def nn_dist(p: torch.Tensor) -> torch.Tensor:
    u = F.normalize(p.detach(), dim=-1)
    d = torch.cdist(u, u)
    d.fill_diagonal_(float("inf"))
    return d.min(1).values


before = F.normalize(pts.detach().clone(), dim=-1)
loss_before, d_before = koleo(pts).item(), nn_dist(pts)
for _ in range(300):
    loss_k = koleo(pts)
    opt_k.zero_grad()
    loss_k.backward()
    opt_k.step()
after = F.normalize(pts.detach(), dim=-1)
loss_after, d_after = koleo(pts).item(), nn_dist(pts)
even = 2 * math.sin(math.pi / n_pts)
print(f"KoLeo loss {loss_before:.3f} -> {loss_after:.3f}   (evenly spaced: {-math.log(even):.3f})")
print(f"nearest-neighbour distance: min {d_before.min():.3f} -> {d_after.min():.3f}, "
      f"mean {d_before.mean():.3f} -> {d_after.mean():.3f}  (evenly spaced: {even:.3f})")
assert loss_after < loss_before - 1.0 and d_after.min() > 0.5 * even and d_after.mean() > 0.9 * even

fig, axes = plt.subplots(1, 2, figsize=(11, 5))
circle = torch.linspace(0, 2 * math.pi, 200)
for ax, u, d, title in [(axes[0], before, d_before, "before"), (axes[1], after, d_after, "after 300 KoLeo steps")]:
    ax.plot(circle.cos(), circle.sin(), color="0.8", lw=1)
    ax.scatter(u[:, 0], u[:, 1], c=range(n_pts), cmap="viridis", s=25, zorder=3)
    ax.set_title(f"{title}\nmin NN distance {d.min():.3f}", fontsize=10)
    ax.set_aspect("equal")
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown] slide
# ## 6. Gram anchoring
#
# **Why.** The DINOv3 report (arXiv 2508.10104) introduces Gram anchoring to address "the known yet unsolved issue of
# dense feature maps degrading during long training schedules": as the ViT-7B trains on, its global (image-level)
# results keep improving, but its dense results (e.g. linear segmentation) peak early and then decline, and the
# similarity maps of patch features become noisy: patches start to resemble distant, unrelated patches. The image-level
# DINO objective does not care *where* in the image information sits.
#
# **What.** The student's patch features are asked to have the same **Gram matrix** (all patch-to-patch cosine
# similarities) as those of a **Gram teacher**, a frozen earlier copy of the EMA teacher whose dense features were still
# good (`dinov3/loss/gram_loss.py`): with X̂ the L2-normalised patch features (N × D) of one image,
# `L_gram = mean((X̂_s X̂_sᵀ − X̂_g X̂_gᵀ)²)`. Only the *similarity structure* is anchored: the features themselves may
# still move, rotate or change scale as the DINO and iBOT losses improve them. In the official recipe the Gram phase
# starts after 1M iterations (weight 2.0), the Gram teacher sees the same crops at **twice the resolution** with no
# photometric distortions, its patch features are resized (bicubic) to the student's grid, and it is refreshed from the
# EMA teacher every 10k iterations (at most 3 times) (`dinov3_vit7b16_gram_anchor.yaml`).

# %% subslide hide-input
seed_everything(0)
Ng, Dg = 36, 192
feats_g = torch.randn(2, Ng, Dg)  # (images, patches, D): say, one image's patch tokens
Xn = F.normalize(feats_g, dim=-1)
gram_mat = Xn @ Xn.transpose(1, 2)
print(f"patch features {tuple(feats_g.shape)} -> Gram matrices {tuple(gram_mat.shape)}, diagonal = 1: "
      f"{torch.allclose(gram_mat.diagonal(dim1=1, dim2=2), torch.ones(2, Ng))}")
gram = losses.GramLoss(apply_norm=True, img_level=True, remove_neg=False)  # the official configs' settings
Q, _ = torch.linalg.qr(torch.randn(Dg, Dg))  # a random rotation of feature space
perm = torch.randperm(Ng)
checks = {
    "identical features": gram(feats_g, feats_g).item(),
    "rotated features (X Q)": gram(feats_g @ Q, feats_g).item(),
    "rescaled features (3 X)": gram(3 * feats_g, feats_g).item(),
    "noisy features (X + 0.5 noise)": gram(feats_g + 0.5 * torch.randn_like(feats_g), feats_g).item(),
    "patches shuffled": gram(feats_g[:, perm], feats_g).item(),
}
for k, v in checks.items():
    print(f"GramLoss, {k:32s} {'0 (< 1e-10)' if v < 1e-10 else f'{v:.2e}'}")
by_hand_gram = ((gram_mat[:, perm][:, :, perm] - gram_mat) ** 2).mean()
torch.testing.assert_close(torch.tensor(checks["patches shuffled"]), by_hand_gram)
assert max(checks["identical features"], checks["rotated features (X Q)"], checks["rescaled features (3 X)"]) < 1e-10
assert checks["noisy features (X + 0.5 noise)"] > 1e-3 and checks["patches shuffled"] > 1e-3
print("asserted: zero for identical, rotated and rescaled features; > 0 when the similarity structure changes")

# %% [markdown]
# The Gram teacher's targets in `dinolab.pretrain` (as in `ssl_meta_arch.py`): the same crop boxes re-cut from the
# source image at twice the size without colour distortions, through the frozen Gram teacher, then a bicubic resize of
# the patch-feature map down to the student's grid. The shapes, for our 96-px global crops:

# %% hide-input
gram_teacher = copy.deepcopy(teacher.backbone).eval()
G = cfg_ship.global_size
with torch.no_grad():
    hr_crops = torch.cat([augment.crop_and_resize(sample["image"][:2], crops_n["global_boxes"][c], 2 * G,
                                              flip=crops_n["global_flips"][c]) for c in range(2)])
    hr_feats = gram_teacher.forward_features(viz.normalize(hr_crops))["x_norm_patchtokens"]
    fmap = hr_feats.transpose(1, 2).reshape(len(hr_crops), -1, 2 * grid, 2 * grid)
    target = F.interpolate(fmap, size=(grid, grid), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
print(f"clean crops at 2x      {tuple(hr_crops.shape)}")
print(f"Gram-teacher patches   {tuple(hr_feats.shape)}   ({2 * grid}x{2 * grid} grid)")
print(f"as a map               {tuple(fmap.shape)}")
print(f"bicubic to the student {tuple(target.shape)}   == student patches {tuple(s_out['patches'].shape)}")
print(f"GramLoss(student patches, target) = {gram(s_out['patches'], target).item():.3f}  (random weights)")

# %% [markdown] slide
# ## 7. Live pretraining
#
# `dinolab.pretrain.train` puts everything together: multi-crop → student and EMA teacher → DINO (local and global
# terms) + iBOT + 0.1 · 2 · KoLeo, with Sinkhorn–Knopp targets, teacher-temperature warm-up, momentum and learning-rate
# schedules; then a **Gram phase** where a frozen copy of the teacher anchors the student's patch Gram matrices.
# The live run is far too short to learn good features (that is what the shipped checkpoint of section 8 is for); it
# shows the machinery running and the losses moving. It runs on the CPU; under `torchrun` the same function runs DDP.

# %% hide-input
cfg_live = PretrainConfig(steps=40, gram_steps=10, batch_size=16, global_size=64, local_size=32,
                          warmup_steps=5, teacher_temp_warmup=15, log_every=5)
official_7b = {"crops": "2 × 256 + 8 × 112 px", "prototypes K (DINO / iBOT)": "262,144 / 98,304",
               "batch": "16 per GPU", "teacher temperature": "0.04 → 0.07",
               "phase 1 / Gram phase": "1M / +200k iterations"}
ours = {"crops": f"2 × {cfg_live.global_size} + {cfg_live.n_local} × {cfg_live.local_size} px",
        "prototypes K (DINO / iBOT)": f"{cfg_live.head_out_dim} / {cfg_live.head_out_dim}",
        "batch": str(cfg_live.batch_size), "teacher temperature": " → ".join(map(str, cfg_live.teacher_temp)),
        "phase 1 / Gram phase": f"{cfg_live.steps} / +{cfg_live.gram_steps} steps"}
display(Markdown("| | ViT-7B (`dinov3_vit7b16_pretrain.yaml`, `_gram_anchor.yaml`) | live run |\n|---|---|---|\n"
                 + "\n".join(f"| {k} | {official_7b[k]} | {ours[k]} |" for k in ours)))

# %% skip
# NBVAL_IGNORE_OUTPUT
# losses and timings vary from machine to machine: the asserts in the next cell check what matters
live = train(cfg_live, log=print)
hist = live["history"]
print(f"{len(hist)} steps in {live['seconds']:.1f} s")

# %% subslide hide-input
# NBVAL_IGNORE_OUTPUT
keys = ["loss", "dino", "ibot", "koleo", "gram"]
fig, axes = plt.subplots(1, 5, figsize=(12.8, 3.2))
for ax, k in zip(axes, keys):
    ax.plot([h[k] for h in hist], marker=".", ms=3)
    ax.axvline(cfg_live.steps - 0.5, color="k", ls=":", lw=1)
    ax.set_title(k, fontsize=10)
    ax.set_xlabel("step", fontsize=10)
    ax.tick_params(labelsize=10)
axes[0].text(cfg_live.steps, axes[0].get_ylim()[1], " Gram\n phase", fontsize=10, va="top")
plt.tight_layout()
plt.show()

# %% hide-input
L = cfg_live.steps
phase1 = [h["loss"] - cfg_live.gram_weight * h["gram"] for h in hist]
start, end = sum(phase1[:4]) / 4, sum(phase1[L - 4:L]) / 4
assert all(math.isfinite(h["loss"]) for h in hist)
assert end < start, "the phase-1 loss should fall"
assert all(h["gram"] == 0 for h in hist[:L]) and all(h["gram"] > 0 for h in hist[L:])
assert (hist[0]["teacher_temp"], hist[-1]["teacher_temp"]) == tuple(cfg_live.teacher_temp)
print("asserted: losses finite; the phase-1 loss falls (mean of the last 4 steps < mean of the first 4);")
print("          Gram loss 0 in phase 1 and > 0 in the Gram phase; teacher temperature warmed up",
      " -> ".join(map(str, cfg_live.teacher_temp)))

# %% [markdown] slide
# ## 8. The shipped checkpoint
#
# `data/dinov3_tiny_shapesworld.pth` is the **teacher backbone** of a long run of the same function
# (`python -m dinolab.pretrain`), saved in fp16 with a JSON sidecar (recipe, loss history, k-NN every 250 steps,
# sha256). Its recipe is the one the pilots of this notebook's appendix and section 3.3 led to; it differs from the
# live run above in four places, each because a measured run failed without it:
#
# | choice | official DINOv3 | here | why |
# |---|---|---|---|
# | images | ImageNet-scale photos | one object per image, 3× size | the label is the object, as in ImageNet |
# | what two views share | colour jitter, grey, solarise on one photo | the same scene rendered in two appearances | under colour jitter the targets of two crops disagree (appendix) |
# | teacher targets | Sinkhorn–Knopp | DINO v1 centering | SK at batch 32 stayed at ln K; centering left it |
# | prototypes | learnt (frozen for epoch 1) | frozen at init | learnt ones open a null direction (section 3.3) |
#
# We check the file against its recorded sha256 and print the recipe.

# %% subslide hide-input
DATA = Path("..") / "data"
CKPT = DATA / "dinov3_tiny_shapesworld.pth"
CKPT_PHASE1 = DATA / "dinov3_tiny_shapesworld_phase1.pth"  # written when a run reaches its Gram phase
if not CKPT.exists():
    raise FileNotFoundError(f"{CKPT} is missing: make it with `python -m dinolab.pretrain` from the repository root "
                            "(recipe and sha256 in data/README.md)")
meta = json.loads(CKPT.with_suffix(".json").read_text())
sha = hashlib.sha256(CKPT.read_bytes()).hexdigest()
assert sha == meta["sha256"], f"sha256 mismatch: file {sha}, sidecar {meta['sha256']}"
# a Gram phase run on its own records the phase-1 run it started from; rc is the phase-1 recipe
gram_rc = meta["config"] if "started_from" in meta else None
rc = meta["started_from"]["config"] if gram_rc else meta["config"]
steps_done = meta.get("steps_done", rc["steps"] + rc["gram_steps"])
p1_steps = meta["started_from"]["step"] if gram_rc else min(steps_done, rc["steps"])
gram_note = (f"{gram_rc['gram_steps']:,} steps, weight {gram_rc['gram_weight']}, lr {gram_rc['lr']}, momentum "
             f"{gram_rc['momentum'][0]}" if gram_rc else f"{steps_done - p1_steps:,} steps")
recipe = {"arch": rc["arch"], "phase 1": f"{p1_steps:,} steps (of a {rc['steps']:,}-step schedule)", "Gram phase": gram_note,
          "batch size x processes": f"{rc['batch_size']} x {meta['world_size']}",
          "crops": f"2 x {rc['global_size']} + {rc['n_local']} x {rc['local_size']} px of {rc['image_size']} px images",
          "objects per scene": (f"{rc.get('min_objects', 1)}" if rc.get("min_objects", 1) == rc.get("max_objects", 4)
                                else f"{rc.get('min_objects', 1)} to {rc.get('max_objects', 4)}")
                               + f", at {rc.get('object_scale', 1.0)}× size",
          "second appearance for the student": rc.get("appearance_p", 0.0) > 0,
          "teacher targets": rc.get("centering", "sinkhorn_knopp"),
          "prototypes": "frozen" if rc.get("freeze_last_layer_steps", 0) < 0 else "learnt",
          "prototypes K": rc["head_out_dim"], "lr": rc["lr"], "teacher temp": rc["teacher_temp"],
          "momentum": rc["momentum"], "hours on 2 CPU cores": f"{meta['seconds'] / 3600:.1f}", "sha256": meta["sha256"][:16] + "…"}
display(Markdown("| recipe | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in recipe.items())))
print(f"{CKPT.name}: sha256 matches the sidecar")

# %% subslide hide-input
h_ship = meta["history"]
sup_meta = json.loads((DATA / "dinov3_tiny_supervised.json").read_text()) if (DATA / "dinov3_tiny_supervised.json").exists() else None


def smooth(key: str, w: int = 50) -> tuple[list, list]:
    """Means of `key` over windows of about w steps (per-step losses of batch 32 are noisy; long runs store their
    history as means over `history_every` steps already): (window centres, means)."""
    recs = [h for h in h_ship if key in h]
    n = max(1, w // meta.get("history_every", 1))
    wins = [recs[i:i + n] for i in range(0, len(recs) - n + 1, n)]
    return ([sum(h["step"] for h in c) / len(c) for c in wins], [sum(h[key] for h in c) / len(c) for c in wins])


fig, axes = plt.subplots(1, 4, figsize=(12.8, 3.4))
for ax, k, title in zip(axes, ["dino", "ibot", "teacher_entropy"], ["DINO loss", "iBOT loss", "entropy (nats)"]):
    ax.plot(*smooth(k), lw=1.5, label="teacher targets" if k == "teacher_entropy" else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    if steps_done > p1_steps:
        ax.axvline(p1_steps, color="k", ls=":", lw=1)
axes[2].plot(*smooth("student_entropy"), lw=1.5, label="student")
axes[2].axhline(math.log(rc["head_out_dim"]), color="k", ls=":", lw=1, label="ln K")
axes[2].legend(fontsize=10)
evs = meta.get("evals", [])
axes[3].plot([e["step"] for e in evs], [e["knn20"] for e in evs], marker=".", label="self-supervised")
if sup_meta is not None:
    axes[3].plot([e["step"] for e in sup_meta["evals"]], [e["knn20"] for e in sup_meta["evals"]], marker=".",
                 color="0.5", label="supervised control")
if steps_done > p1_steps:
    axes[3].axvline(p1_steps, color="k", ls=":", lw=1)
axes[3].set_title("k-NN (k = 20), single objects")
axes[3].set_xlabel("step")
axes[3].set_ylim(0, 1)
axes[3].legend(fontsize=10, loc="upper left")
fig.suptitle("the shipped run, from its JSON sidecar (losses: means over 50 steps)")
plt.tight_layout()
plt.show()

# %% [markdown]
# **The baseline** is the same network at **its own starting point**: the weights the run started from (same
# configuration and seed, before any step). So the comparison measures what pretraining added.

# %% hide-input
cfg_run = PretrainConfig.from_dict(rc)
pretrained = hub.build(rc["arch"], weights=CKPT)  # strict load; fp16 values are copied into fp32 parameters
torch.manual_seed(cfg_run.seed)
random_init = Student(cfg_run).backbone  # train() seeds, then builds the Student: the same initial backbone
models = {"pretrained": pretrained.eval().to(DEVICE), "random init": random_init.eval().to(DEVICE)}
if CKPT_PHASE1.exists():  # the teacher at the end of phase 1, before the Gram phase
    phase1_model = hub.build(rc["arch"], weights=CKPT_PHASE1)
    models = {"pretrained": models["pretrained"], "phase 1 (no Gram)": phase1_model.eval().to(DEVICE),
              "random init": models["random init"]}
print("models:", list(models))

# %% [markdown] subslide
# ### 8.1 k-NN classification on frozen CLS features
# DINO's standard probe: no training at all. Each validation image takes the labels of its k = 20 most cosine-similar
# training images, each vote weighted by `exp(sim / 0.07)` (`dinolab.linear.knn_predict`). We embed 1024 training and
# 512 validation ShapesWorld images (128 px, the full image) drawn like the pretraining data (same number of objects per
# scene; the validation scenes were never seen) and keep the normalised CLS token and the patch tokens.

# %% skip
N_TRAIN, N_VAL = 1024, 512
eval_kw = dict(size=rc["image_size"], n_objects=(1, rc.get("max_objects", 4)), object_scale=rc.get("object_scale", 1.0))
tr_data, va_data = ShapesWorld("train", **eval_kw).batch(range(N_TRAIN)), ShapesWorld("val", **eval_kw).batch(range(N_VAL))
print("evaluation data:", eval_kw)


@torch.inference_mode()
def embed(model: nn.Module, images: torch.Tensor, bs: int = 256):
    """(N, 3, H, W) in [0, 1] -> CLS (N, D) and patch tokens (N, h*w, D), on the CPU."""
    cls, patches = [], []
    for i in range(0, len(images), bs):
        out = model.forward_features(viz.normalize(images[i:i + bs]).to(DEVICE))
        cls.append(out["x_norm_clstoken"].float().cpu())
        patches.append(out["x_norm_patchtokens"].float().cpu())
    return torch.cat(cls), torch.cat(patches)


feats = {name: (embed(m, tr_data["image"]), embed(m, va_data["image"])) for name, m in models.items()}
(cls_tr, p_tr), (cls_va, p_va) = feats["pretrained"]
print(f"train: CLS {tuple(cls_tr.shape)}, patches {tuple(p_tr.shape)};  val: CLS {tuple(cls_va.shape)}")
print("val label counts:", {CLASS_NAMES[c]: int((va_data["label"] == c).sum()) for c in range(len(CLASS_NAMES))})

# %% hide-input
# NBVAL_IGNORE_OUTPUT
# (accuracies over 512 images move in steps of 0.002: one flipped vote changes the 3rd decimal on another CPU)
knn = {name: knn_accuracy(f_tr[0], tr_data["label"], f_va[0], va_data["label"], k=20, T=0.07)
       for name, (f_tr, f_va) in feats.items()}
majority = (va_data["label"] == tr_data["label"].mode().values).float().mean().item()
display(Markdown("| features | k-NN accuracy (k = 20) |\n|---|---|\n"
                 + "\n".join(f"| {name} | {acc:.3f} |" for name, acc in knn.items())
                 + f"\n| (majority class) | {majority:.3f} |"))

# %% [markdown] subslide
# ### 8.2 PCA maps of patch features
# Project each patch token on the first 3 principal components (fitted on the patches of these 4 images together)
# and show them as RGB (`viz.pca_rgb`). With good dense features, patches of the same kind of surface get the same
# colour across images, and objects stand out from the floor and wall. We render the same validation scenes at 192 px
# (12 × 12 patches; RoPE lets the ViT run at any size) for a finer map. Keep the random-init column in view: even an
# untrained ViT separates wall, floor and objects here, because its patch embedding sees colour and texture. A PCA map
# alone does not prove that anything was learned; the numbers of sections 8.1 and 8.3 do.

# %% subslide hide-input
show_ids = [0, 1, 2, 3]
hi = ShapesWorld("val", **{**eval_kw, "size": 192}).batch(show_ids)
cols = ["image", "mask"] + [f"PCA, {name}" for name in models]
fig, axes = plt.subplots(len(show_ids), len(cols), figsize=(1.3 * len(cols), 5.0))
hi_feats = {}
for j, (name, m) in enumerate(models.items()):
    _, ptok = embed(m, hi["image"])
    hi_feats[name] = ptok
    hw = int(ptok.shape[1] ** 0.5)
    rgb = viz.pca_rgb(ptok).view(len(show_ids), hw, hw, 3)
    for i in range(len(show_ids)):
        axes[i, 2 + j].imshow(rgb[i].numpy(), interpolation="nearest")
for i in range(len(show_ids)):
    axes[i, 0].imshow(viz.to_numpy_image(hi["image"][i]))
    axes[i, 1].imshow(MASK_COLORS[hi["mask"][i]].numpy())
for ax, c in zip(axes[0], cols):
    ax.set_title(c.replace(", ", "\n"), fontsize=10)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown] subslide
# ### 8.3 A linear patch probe
# How much of the semantic mask can a *linear* map read off each frozen patch token? Each patch (16 × 16 pixels) is
# labelled with the most frequent class of its pixels (the mask downsampled by 16: an 8 × 8 label map per 128-px image).
# A linear layer (D → 6 classes) is trained for 100 full-batch AdamW steps on the patches of 512 training images and
# evaluated on the 512 validation images by mean IoU over the 6 classes, and by the IoU of "any object" (prediction
# ≠ background). Objects cover only a few percent of the patches, so the cross-entropy weights each class by
# 1/√frequency (our choice; without it the probe predicts "background" everywhere). The official linear segmentation
# eval (`dinov3/eval/segmentation`) is the same idea with BatchNorm and pixel-level upsampling.

# %% skip
def patch_labels(mask: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(B, H, W) class map -> (B, h*w): the most frequent class inside each patch."""
    Bm, H, W = mask.shape
    blocks = mask.view(Bm, H // patch, patch, W // patch, patch).permute(0, 1, 3, 2, 4).reshape(Bm, -1, patch * patch)
    return blocks.mode(dim=-1).values


def iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of two boolean maps."""
    return ((pred & target).sum() / (pred | target).sum().clamp_min(1)).item()


def miou(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> float:
    present = [c for c in range(n_classes) if ((pred == c) | (target == c)).any()]
    return sum(iou(pred == c, target == c) for c in present) / len(present)


def patch_probe(f_tr, y_tr, f_va, y_va, n_classes: int = len(CLASS_NAMES), steps: int = 100, seed: int = 0):
    """Class-balanced, full-batch AdamW on standardised frozen features -> (val mIoU, val foreground IoU)."""
    torch.manual_seed(seed)
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    a, b = (f_tr - mu) / sd, (f_va - mu) / sd
    freq = torch.bincount(y_tr, minlength=n_classes).float().clamp_min(1) / len(y_tr)
    weight = freq.rsqrt() / freq.rsqrt().mean()
    lin = nn.Linear(a.shape[1], n_classes)
    opt_p = torch.optim.AdamW(lin.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        loss_p = F.cross_entropy(lin(a), y_tr, weight=weight)
        opt_p.zero_grad()
        loss_p.backward()
        opt_p.step()
    with torch.no_grad():
        pred = lin(b).argmax(1)
    return miou(pred, y_va, n_classes), iou(pred > 0, y_va > 0)


# %% hide-input
# NBVAL_IGNORE_OUTPUT
N_PROBE = 512
y_tr, y_va = patch_labels(tr_data["mask"][:N_PROBE]).flatten(), patch_labels(va_data["mask"]).flatten()
print(f"patch labels: train {tuple(y_tr.shape)}, val {tuple(y_va.shape)}; val class shares "
      f"{[round(v, 3) for v in (torch.bincount(y_va, minlength=6) / len(y_va)).tolist()]}")
probe_all = {name: patch_probe(f_tr[1][:N_PROBE].flatten(0, 1), y_tr, f_va[1].flatten(0, 1), y_va)
             for name, (f_tr, f_va) in feats.items()}
probe = {name: v[0] for name, v in probe_all.items()}
display(Markdown("| patch features | linear probe mIoU (6 classes) | foreground IoU |\n|---|---|---|\n"
                 + "\n".join(f"| {name} | {m:.3f} | {fg:.3f} |" for name, (m, fg) in probe_all.items())))

# %% [markdown] subslide
# ### 8.4 What did the Gram phase do?
# As in the official code, the Gram phase is a stage of its own (`dinov3_vit7b16_gram_anchor.yaml`): it starts from the
# phase-1 run's student, teacher and heads (`python -m dinolab.pretrain --init-state ... --steps 0 --gram-steps N`),
# freezes a copy of that teacher as the **Gram teacher** (run on the same crops at 2× resolution), and trains with the
# Gram loss added at weight 2, a constant learning rate and teacher momentum 0.999, the official stage's choices.
# The phase-1 teacher is shipped too (`data/dinov3_tiny_shapesworld_phase1.pth`), so the tables above include it and
# we compare the two here. Patch-feature locality is measured by the
# patch probe, by how much more similar a patch is to patches of its own class than to the others, and seen in the
# rows of the Gram matrix: the cosine similarity of one patch (on the image's main object) to every patch of its image.
# Sharp dense features light up that object and little else.

# %% subslide hide-input
Gh = hi["mask"].shape[-1] // 16
blocks = hi["mask"].view(len(show_ids), Gh, 16, Gh, 16).permute(0, 1, 3, 2, 4).reshape(len(show_ids), Gh * Gh, 256)
anchor = (blocks == hi["label"][:, None, None]).float().mean(-1).argmax(1)  # the patch most covered by the label class
rows_shown = [0, 2]
fig, axes = plt.subplots(len(rows_shown), 1 + len(models), figsize=(2.8 * (1 + len(models)), 5.4))
for r, i in enumerate(rows_shown):
    ay, ax_ = divmod(int(anchor[i]), Gh)
    axes[r, 0].imshow(viz.to_numpy_image(hi["image"][i]))
    axes[r, 0].add_patch(plt.Rectangle((ax_ * 16 - 0.5, ay * 16 - 0.5), 16, 16, fill=False, ec="red", lw=2))
    for j, (name, ptok) in enumerate(hi_feats.items()):
        f = F.normalize(ptok[i], dim=-1)
        sim_map = (f @ f[anchor[i]]).view(Gh, Gh)
        im = axes[r, 1 + j].imshow(sim_map.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        axes[r, 1 + j].add_patch(plt.Rectangle((ax_ - 0.5, ay - 0.5), 1, 1, fill=False, ec="k", lw=1.5))
        if r == 0:
            axes[r, 1 + j].set_title(name, fontsize=10)
axes[0, 0].set_title("anchor patch (red)", fontsize=10)
fig.suptitle("a row of the Gram matrix: cos similarity of the anchor patch to all patches", fontsize=10, x=0.45)
for a in axes.flat:
    a.set_xticks([])
    a.set_yticks([])
fig.colorbar(im, ax=axes, shrink=0.7)
plt.show()

# %% skip
def same_class_margin(patches: torch.Tensor, labels: torch.Tensor, n_img: int = 128) -> float:
    """Mean cosine similarity of patch pairs of the same class minus that of different classes, within images."""
    x = F.normalize(patches[:n_img], dim=-1)
    y = labels.view(len(patches), -1)[:n_img]
    s = x @ x.transpose(1, 2)
    same = y[:, :, None] == y[:, None, :]
    off = ~torch.eye(s.shape[1], dtype=torch.bool)
    return (s[same & off].mean() - s[~same].mean()).item()


# %% subslide hide-input
# NBVAL_IGNORE_OUTPUT
margins = {name: same_class_margin(f_va[1], y_va) for name, (_, f_va) in feats.items()}
if "phase 1 (no Gram)" in models:
    rows = ["| model | k-NN | patch probe mIoU | same-class similarity margin |", "|---|---|---|---|"]
    rows += [f"| {n} | {knn[n]:.3f} | {probe[n]:.3f} | {margins[n]:.3f} |" for n in models]
    display(Markdown("\n".join(rows)))
else:
    print(f"no phase-1 checkpoint ({CKPT_PHASE1.name}): Gram-phase comparison skipped")
    print("same-class similarity margin:", {n: round(v, 3) for n, v in margins.items()})

# %% [markdown] notes
# Measured here, the Gram stage changed little: the k-NN, the patch probe and the same-class margin of the final
# teacher are within about 0.015 of the phase-1 teacher's, and its Gram-matrix rows look the same. That is what Gram
# anchoring is for: DINOv3 adds it late in very long runs, where the patch features of an unanchored model *degrade*
# (in the paper, dense-task scores of the ViT-7B fall as training goes on while the global ones keep rising). A
# 5,000-step run of a tiny ViT has no such degradation to undo; the anchor only keeps the structure as it was.

# %% [markdown] subslide
# ### 8.5 Shape or colour? What the CLS token encodes
# A self-supervised model learns whatever stays the same between its two views and differs between images. ShapesWorld
# draws every scene's look independently of its shapes: the floor's hue and pattern, the wall's pattern
# (`ShapesWorld.scene_attributes`, which renders nothing). So the same k-NN (k = 20) on the same frozen CLS features
# can be asked to predict each of those factors instead of the label. A model that took the colour shortcut reads the
# floor hue far better than the shape; the floor hue is cut into 6 equal bins of the colour wheel.

# %% hide-input
# NBVAL_IGNORE_OUTPUT
def scene_targets(split: str, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image label and the scene's nuisance factors for samples 0 .. len(labels) - 1 of a split."""
    a = ShapesWorld(split, **eval_kw).scene_attributes(range(len(labels)))
    return {"shape label": labels, "floor hue (6 bins)": (a["floor_hue"] * 6).long().clamp(max=5),
            "floor texture": a["floor_texture"], "wall texture": a["wall_texture"], "objects placed": a["n_objects"]}


att_tr, att_va = scene_targets("train", tr_data["label"]), scene_targets("val", va_data["label"])
att_knn = {name: {k: knn_accuracy(f_tr[0], att_tr[k], f_va[0], att_va[k], k=20, T=0.07) for k in att_tr}
           for name, (f_tr, f_va) in feats.items()}
att_major = {k: (att_va[k] == att_tr[k].mode().values).float().mean().item() for k in att_tr}
header = "| k-NN on CLS predicts | " + " | ".join(models) + " | majority class |"
rows = [header, "|---" * (len(models) + 2) + "|"]
rows += [f"| {k} | " + " | ".join(f"{att_knn[n][k]:.3f}" for n in models) + f" | {att_major[k]:.3f} |" for k in att_tr]
display(Markdown("\n".join(rows)))

# %% [markdown] subslide
# And what did pretraining change? DINO's targets ask one thing of the CLS token: the two global crops of an image
# should land on the same prototypes, and different images on different ones. So measure exactly that. Take 256
# validation images and two global crops of each, embed both crops and, for every crop 2, look for the nearest crop 1
# (cosine) among all 256. *View retrieval* is how often that is the same image's own crop. We do it twice, with the full
# DINO augmentation the run trained with (colour jitter, grey, blur, solarise) and with the geometry alone (crop and
# flip). We also give the margin: the mean cosine of same-image pairs minus that of different-image pairs.

# %% hide-input
# NBVAL_IGNORE_OUTPUT
N_VIEWS = 256
view_imgs = va_data["image"][:N_VIEWS]
augs = {"full DINO augmentation": augment.MultiCropAugmentation(global_size=cfg_run.global_size, n_local=0),
        "crop + flip only": augment.MultiCropAugmentation(global_size=cfg_run.global_size, n_local=0, color_jitter_p=0.0,
                                                      grayscale_p=0.0, solarize_p=0.0, blur_p=(0.0, 0.0, 0.0))}


@torch.inference_mode()
def view_retrieval(model: nn.Module, aug) -> tuple[float, float]:
    crops = aug(view_imgs, generator=torch.Generator().manual_seed(0))["global_crops"]  # crop-major (2 * N, ...)
    f = F.normalize(model.forward_features(crops.to(DEVICE))["x_norm_clstoken"].float().cpu(), dim=-1)
    sim = f[N_VIEWS:] @ f[:N_VIEWS].T  # crop 2 of each image vs crop 1 of every image
    own = torch.eye(N_VIEWS, dtype=torch.bool)
    return (sim.argmax(1) == torch.arange(N_VIEWS)).float().mean().item(), (sim[own].mean() - sim[~own].mean()).item()


views = {(name, a): view_retrieval(m, aug) for name, m in models.items() for a, aug in augs.items()}
rows = ["| CLS features | " + " | ".join(f"view retrieval, {a} | margin, {a}" for a in augs) + " |",
        "|---" * (1 + 2 * len(augs)) + "|"]
rows += [f"| {n} | " + " | ".join(f"{views[n, a][0]:.3f} | {views[n, a][1]:.3f}" for a in augs) + " |" for n in models]
display(Markdown("\n".join(rows) + f"\n\n(chance for view retrieval: 1/{N_VIEWS} = {1 / N_VIEWS:.3f})"))

# %% [markdown] notes
# Read the two tables together:
#
# * **The shortcut is gone.** Random init already reads the floor hue well above the majority rate (a random ViT's CLS
#   averages colour-laden patch embeddings). Pretraining raised that only a little, while the shape label rose by
#   about 0.1. The checkpoint shipped before this recipe (appendix) did the opposite: floor hue up from about 0.55 to
#   about 0.7, shape at chance. Two renders of one scene in different appearances leave the layout, and so the shape,
#   as the only thing the views share.
# * **It learned what DINO asks for.** Under crop + flip the pretrained CLS finds its own image's other crop far more
#   often than at random init, and the same-image margin is several times larger. Under the full DINO colour
#   augmentation, which this run never trained with, retrieval drops but stays well above random init.

# %% [markdown] subslide
# ### 8.6 The protocol DINOv3 reports, on single objects
#
# ImageNet, where DINOv3 reports its k-NN and linear-probe numbers, is **object-centric**: one main object per
# photo. Our cluttered scenes are not, so the image-level numbers above mix two questions (is there a shape in the
# features, and which of several shapes is "the" label). The fair image-level test is the **object-centric split**
# (`dinolab.evaluate.object_split`): one object per image, at `object_scale=3`, label = its class, in a random
# appearance. On it we run the official protocols on frozen features (`dinolab.evaluate`):
#
# * **k-NN** as `dinov3/eval/knn.py`: normed CLS, cosine similarity, votes weighted by exp(sim / 0.07), k = 10 and 20
#   (2,048 training and 1,024 validation images);
# * a **linear probe** on [CLS ‖ mean patch] (the input of `dinov3/eval/linear.py`), trained full-batch with AdamW;
# * a dense **patch probe**: one linear map per patch token against the mask of the standard cluttered scenes (the label
#   of a 16-px patch is its most frequent pixel class), mIoU over the 6 classes.
#
# Three backbones, one architecture: **random init**, the **self-supervised** checkpoint, and, where
# `data/dinov3_tiny_supervised.pth` exists, the **supervised control** (`python -m dinolab.supervised`: the same ViT
# trained *with* the labels: masks and image labels), which is the ceiling for these features at this budget.

# %% subslide hide-input
# NBVAL_IGNORE_OUTPUT
# (accuracies over 1,024 images move in steps of 0.001; one flipped vote changes the last digit on another CPU)
SUPERVISED = DATA / "dinov3_tiny_supervised.pth"
backbones = {"random init": models["random init"], "self-supervised": models["pretrained"]}
if SUPERVISED.exists():
    backbones["supervised control"] = hub.build(rc["arch"], weights=SUPERVISED).eval().to(DEVICE)
knn_eval = evaluate.ObjectKNN()  # 2,048 train / 1,024 val single-object images
scenes_tr = ShapesWorld("train", size=128).batch(range(1024))
scenes_va = ShapesWorld("val", size=128).batch(range(512))
protocol = {}
for name, bb in backbones.items():
    protocol[name] = {**evaluate.object_protocol(bb, knn_eval),
                      "patch probe mIoU": evaluate.patch_probe_miou(bb, scenes_tr, scenes_va)}
majority_obj = torch.bincount(knn_eval.y_val).max().item() / len(knn_eval.y_val)
cols = list(next(iter(protocol.values())))
display(Markdown("| backbone | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
                 + "\n".join(f"| {n} | " + " | ".join(f"{v[c]:.3f}" for c in cols) + " |" for n, v in protocol.items())
                 + f"\n| (majority class) | {majority_obj:.3f} | {majority_obj:.3f} | {majority_obj:.3f} | |"))

# %% [markdown]
# ### Result, honestly
# The targets we set ourselves, on the single-object split of 8.6: k-NN (k = 20) ≥ 0.90 and ≥ random init + 0.40, a
# linear probe ≥ 0.95, and a patch probe mIoU ≥ 0.60 and ≥ random init + 0.25. **The shipped checkpoint does not reach
# them.** After 5,720 steps (5,220 of phase 1 and 500 of the Gram stage, 2.0 hours on 2 CPU cores) its k-NN is 0.344
# against 0.227 at random init and 0.891 for the supervised control; the linear probe reads 0.406 (random init 0.262)
# and the patch probe 0.220 (0.118). Every number of 8.6 is above random init, and none is near the goal. The k-NN
# curve at the start of section 8 shows why more of the same would not get there: it rose from 0.22 to 0.32 between
# steps 750 and 2,000 and then flattened (0.33 ± 0.01 over the next 3,000 steps), while the DINO loss kept falling.
# The student keeps getting better at predicting the teacher's targets for batches of 32, and that no longer makes
# the features better at shape. What would close the rest, in the order we would try it: a much larger batch (a GPU:
# the same command with `--device cuda`, or `torchrun` across several), the colour augmentations brought back as a
# curriculum once shape is learnt, and learnt prototypes once the backbone has features (the official recipe freezes
# them for the first epoch only). The cell below asserts what holds and prints what falls short.

# %% skip
# NBVAL_IGNORE_OUTPUT
ssl_p, rnd_p = protocol["self-supervised"], protocol["random init"]
result = {"knn_acc": round(ssl_p["k-NN k=20"], 3), "knn_acc_random": round(rnd_p["k-NN k=20"], 3),
          "knn_acc_supervised": (round(protocol["supervised control"]["k-NN k=20"], 3)
                                 if "supervised control" in protocol else None),
          "linear_acc": round(ssl_p["linear probe"], 3), "linear_acc_random": round(rnd_p["linear probe"], 3),
          "patch_miou": round(ssl_p["patch probe mIoU"], 3),
          "patch_miou_random": round(rnd_p["patch probe mIoU"], 3),
          "scenes_knn_acc": round(knn["pretrained"], 3), "scenes_knn_acc_random": round(knn["random init"], 3),
          "same_class_margin": round(margins["pretrained"], 3), "same_class_margin_random": round(margins["random init"], 3)}
if "phase 1 (no Gram)" in models:
    result.update(knn_acc_phase1=round(knn["phase 1 (no Gram)"], 3),
                  patch_probe_miou_phase1=round(probe["phase 1 (no Gram)"], 3))
print("RESULT " + json.dumps(result))
targets = {"k-NN >= 0.90 and >= random + 0.40": result["knn_acc"] >= max(0.90, result["knn_acc_random"] + 0.40),
           "linear probe >= 0.95": result["linear_acc"] >= 0.95,
           "patch mIoU >= 0.60 and >= random + 0.25": result["patch_miou"] >= max(0.60, result["patch_miou_random"] + 0.25)}
for t, ok in targets.items():
    print(f"target {t}: {'reached' if ok else 'NOT reached'}")
# what the shipped checkpoint does achieve: every protocol above its own random init
assert result["knn_acc"] >= result["knn_acc_random"] + 0.05, result
assert result["linear_acc"] >= result["linear_acc_random"] + 0.05, result
assert result["patch_miou"] >= result["patch_miou_random"] + 0.04, result
assert result["same_class_margin"] >= result["same_class_margin_random"] + 0.05, result

# %% [markdown] skip
# ## 9. Summary
#
# The shape table of one student forward pass in the shipped configuration (2 images: 4 global crops of 96 px with
# iBOT masks, 8 local crops of 48 px), from `dinolab.trace`. The backbone is called through `forward_features`, so its
# submodules appear at depth 2:

# %% skip
seed_everything(0)
flow = trace.trace(Student(cfg_ship), crops_n["global_crops"], crops_n["local_crops"], masks, max_depth=2)
display(flow)

# %% [markdown] notes
# **What to remember**
#
# * **Self-distillation**: a student predicts an EMA teacher's distribution over K prototypes, from a *different* crop.
#   DINO loss on the CLS token over 2n + 2 crop pairs (local weight 2n/(2n+2), global 2/(2n+2)); iBOT loss on the
#   masked patches (mean per image, then over images); KoLeo (0.1 × 2) on the CLS tokens; Gram anchoring in a late phase.
# * **Collapse** is the default outcome of a network teaching itself: sharpening alone gives one prototype, centering
#   alone gives the uniform distribution. DINOv3 balances the teacher's targets with **Sinkhorn–Knopp**: each sample's
#   target sums to 1, each prototype gets ≈ B/K of the batch.
# * The teacher is sharper (officially τ_t 0.04 → 0.07) than the student (τ_s = 0.1) and sees only unmasked global
#   crops.
# * **KoLeo** spreads the batch's features over the sphere (nearest-neighbour entropy).
# * **Gram anchoring** matches patch-to-patch cosine similarities to an earlier, frozen teacher (at 2× resolution). It
#   is invariant to rotations and rescaling of the features, so it constrains only the dense *structure*, which long
#   training otherwise degrades.
# * What we ship is the **teacher** backbone. On this hardware self-distillation learns shape only when the two views
#   share nothing but the layout (two appearances of one scene) and the prototypes cannot open an exit (frozen); then
#   its k-NN rises steadily, slower than a supervised model's on the same data.
#
# **Exercises**
#
# 1. In `collapse_run`, raise the teacher temperature of "centering + sharpening" step by step from 0.04 to 0.1
#    (= τ_s). Where does it tip into the uniform collapse, and why? Does Sinkhorn–Knopp tip at the same point?
# 2. What does Sinkhorn–Knopp return for a batch of B identical samples? Why does that make small batches (B < K)
#    a problem, and what does the official code do about it across GPUs?
# 3. Change the iBOT weighting to a mean over *all* masked patches of the batch. Which images gain weight? Construct an
#    example where the two losses differ by more than 2×.
# 4. GramLoss ignores one rotation of all patch features. Show that it does not ignore a *different* rotation of each
#    patch's feature, nor flipping the sign of one patch's feature. What does `remove_neg=True` change in these checks?
# 5. Rerun the live pretraining with `gram_steps=0` and `steps=50`, then compare the patch probe of the two live
#    teachers with the code of section 8.3. (With a GPU, `embed` and the probes run there: raise `N_TRAIN`.)


# %% [markdown] skip
# ## Appendix: the runs that did not learn
#
# The checkpoint shipped before this one came from the live run's recipe made longer: 500 steps on cluttered scenes
# (1–4 objects), the DINO colour augmentations, Sinkhorn–Knopp targets, learnt prototypes. On the single-object split
# its k-NN was 0.224 against 0.227 at its random init. Two things held it at chance:
#
# * **Colour was the only thing two crops shared.** Self-distillation rewards whatever stays the same between two crops
#   of one image and differs between images. In a tiny network at the start of training that is colour, and the
#   augmentations are designed to destroy it. The teacher's two crops of one image picked different prototypes (the
#   pilots logged agreement of 0.02–0.07 over the first 100 steps), the student had nothing consistent to predict, and
#   the DINO loss stayed near ln K. Without the colour augmentations the agreement climbed to 0.22 within 100 steps,
#   but that run learned the floor's colour (floor hue read at 0.75 after 600 steps, shape at 0.199). Real photos
#   escape this because what stays the same across crops (fur, wheels, leaves) is tied to the class; in ShapesWorld,
#   colour is drawn independently of the class.
# * **The head found an exit** (section 3.3): with learnt prototypes every pilot whose views did not share colour sat
#   at exactly ln K, because the prototypes opened a direction the head could map every image into.
#
# Larger objects (2–3×) and hue jitter over the whole colour wheel stayed within 0.03 of random init after 300–1,000
# steps. The recipe of section 8 removes both causes: the two views are renders of one scene in different appearances
# (only the layout is shared), and the prototypes stay at their random initialisation. Every run, with its numbers, is
# listed in `data/README.md`.
