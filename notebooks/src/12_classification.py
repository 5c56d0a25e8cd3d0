# %% [markdown] slide
# # 12 · Classification: the linear probe and k-NN
#
# The standard way to measure what a self-supervised backbone has learned is to **freeze** it and fit the simplest
# possible classifiers on its features. DINOv3 reports two (`dinov3/eval/linear.py`, `dinov3/eval/knn.py`):
#
# 1. the **linear probe**: one `nn.Linear` on `[CLS ‖ mean of the patch tokens]` of the last block, trained with SGD
#    over a grid of learning rates;
# 2. the **weighted k-NN** of the DINO papers: each of the k nearest training images (cosine similarity) votes
#    for its label with weight exp(sim / T), T = 0.07; the official `knn.py` reports k ∈ {10, 20, 100, 200}.
#
# You will read the image label of ShapesWorld and its **majority-class baseline**, build the official probe input
# with `create_linear_input`, train `LinearClassifier` on CLS alone and on CLS ‖ mean patch, run the k-NN, draw the
# per-class **confusion matrix**, and compare the pretrained tiny backbone with the **same architecture at random
# init**. Then the same protocol on **one object per image**, the setting ImageNet numbers come from, with a third
# backbone: the same ViT trained *with* labels, the ceiling at this size. The point to take away: on cluttered scenes
# the label is ambiguous and every probe stays near the majority class; on single objects the self-supervised features
# are clearly above random init and still far below the supervised control.
#
# Expected run time: about 45 s on 2 idle CPU cores (most of it extracting features: 3,584 scenes, then 3,072
# single objects for each of three backbones).

# %% slide hide-input
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("12")))

# %% skip
import os

for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(k, v)

import json

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from dinolab import hub, trace
from dinolab.data import CLASS_NAMES, MASK_COLORS, NUM_CLASSES, ShapesWorld
from dinolab.linear import LinearClassifier, create_linear_input, knn_accuracy, knn_predict
from dinolab.metrics import confusion_matrix
from dinolab.train import extract_features
from dinolab.utils import count_params, get_device, seed_everything
from dinolab.weights import tiny_checkpoint

viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
seed_everything(0)
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
SCALE = 1  # a GPU reader can raise this: more training images
print("device type:", DEVICE.type)

CKPT = tiny_checkpoint()  # data/dinov3_tiny_shapesworld.pth, or $DINOLAB_CKPT
backbone = hub.dinov3_vittiny16(weights=CKPT).to(DEVICE).eval()
D = backbone.embed_dim
print(f"pretrained tiny backbone: D={D}, {len(backbone.blocks)} blocks, {count_params(backbone):,} parameters (frozen)")

# %% [markdown] slide
# ## 1. The label, and the baseline to beat
#
# `dinolab/data.py`: the image label is **the class that covers the most visible pixels** of the semantic mask (summed
# over all objects of that class; ties go to the smaller id; 0 = background only if no object is visible). An image
# holds 1–4 objects of 5 shapes, so the label is "the dominant shape", and the others are distractors. We use three
# disjoint splits: train (fit), val (choose the probe's learning rate), test (report).

# %% hide-input
N_TRAIN, N_VAL, N_TEST, S = 1024 * SCALE, 256, 512, 128
data = {split: ShapesWorld(split, size=S).batch(torch.arange(n))
        for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST))}
for split, b in data.items():
    print(f"{split:5s} image {tuple(b['image'].shape)}  mask {tuple(b['mask'].shape)}  label {tuple(b['label'].shape)}")

# the label, recomputed from the mask
m = data["test"]["mask"]
area = F.one_hot(m.flatten(1), NUM_CLASSES).sum(1)  # (N, 6) pixels per class
by_hand = torch.where(area[:, 1:].amax(1) > 0, area[:, 1:].argmax(1) + 1, 0)
assert torch.equal(by_hand, data["test"]["label"])
print("label == argmax over classes 1..5 of the mask's pixel count (checked on every test image)")

y = {split: b["label"] for split, b in data.items()}
counts = torch.bincount(y["train"], minlength=NUM_CLASSES)
majority = int(counts.argmax())
majority_acc = float((y["test"] == majority).float().mean())
print("train label counts:", {CLASS_NAMES[c]: int(n) for c, n in enumerate(counts)})
print(f"majority-class baseline: always predict '{CLASS_NAMES[majority]}' (the most frequent training label) → "
      f"test accuracy {majority_acc:.3f} (uniform guessing over 5 shapes: 0.200)")

present = area[:, 1:] > 0
mean_area = area[:, 1:].sum(0) / present.sum(0).clamp_min(1)
print("mean pixels of a class in the test images where it appears:",
      {CLASS_NAMES[c + 1]: int(a) for c, a in enumerate(mean_area)})
share = area.gather(1, y["test"][:, None])[:, 0].float() / (S * S)
second = area[:, 1:].sort(1, descending=True).values[:, 1].float()
margin = second / area.gather(1, y["test"][:, None])[:, 0].float()
print(f"the labelled class covers a median {100 * share.median():.1f} % of the image "
      f"({share.median() * S * S / 256:.1f} patches of 16 × 16); in {100 * (margin > 0.5).float().mean():.0f} % of "
      f"test images a second shape covers more than half as many pixels as the label's")
assert 0.15 < majority_acc < 0.3  # five shapes, roughly balanced

# %% subslide hide-input
fig, axes = plt.subplots(2, 6, figsize=(12.8, 4.4))
for i in range(6):
    axes[0, i].imshow(viz.to_numpy_image(data["test"]["image"][i]))
    axes[0, i].set_title(f"label: {CLASS_NAMES[y['test'][i]]}", fontsize=12)
    axes[1, i].imshow(MASK_COLORS[data["test"]["mask"][i]].numpy())
    axes[1, i].set_title(f"{100 * share[i]:.1f} % of pixels", fontsize=12)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
handles = [plt.Rectangle((0, 0), 1, 1, color=MASK_COLORS[c].numpy()) for c in range(NUM_CLASSES)]
fig.legend(handles, CLASS_NAMES, loc="lower center", ncol=6, fontsize=12, frameon=False)
plt.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()

# %% [markdown]
# The classes are not balanced: a shape that covers more pixels on average (circle, ring: see the mean areas above)
# wins the "most pixels" vote more often than a thin one (star, triangle), so always answering the most frequent
# label already beats 1/5. That majority-class accuracy is the floor any classifier must clear.

# %% [markdown] notes
# The labelled shape is also small: a few patches of the 8 × 8 grid, with other shapes, shadows and textured floors
# around it. A global descriptor (CLS, or the mean of 64 patch tokens) has to single out that one shape.

# %% [markdown] slide
# ## 2. The official probe input
#
# `dinov3/eval/linear.py` reads the frozen backbone through `get_intermediate_layers(x, n=n_last_blocks,
# return_class_token=True)` (normalised outputs) and builds the classifier input with `create_linear_input`: the CLS
# tokens of the last `use_n_blocks` blocks, concatenated with the **mean of the last block's patch tokens** (storage
# tokens excluded) when `use_avgpool`. The official `setup_linear_classifiers` always uses avgpool and, by default,
# one block → **2D features**. The hub's ViT-7B classifier `dinov3_vit7b16_lc` is exactly that: `Linear(8192, 1000)`
# on `cat(CLS, mean patch)`, D = 4096.

# %% hide-input
x2 = viz.normalize(data["test"]["image"][:2]).to(DEVICE)
with torch.no_grad():
    out = backbone.get_intermediate_layers(x2, n=4, return_class_token=True, norm=True)
print(f"get_intermediate_layers(n=4): {len(out)} pairs of (patch tokens, cls):",
      [(tuple(p.shape), tuple(c.shape)) for p, c in out][:1], "...")
patches, cls = out[-1]
by_hand = torch.cat([cls, patches.mean(dim=1)], dim=-1)
print(f"last block: cls {tuple(cls.shape)} ‖ mean over {patches.shape[1]} patch tokens {tuple(patches.mean(1).shape)} "
      f"→ {tuple(by_hand.shape)}")
torch.testing.assert_close(create_linear_input(out, use_n_blocks=1, use_avgpool=True), by_hand)
print("create_linear_input(n=1, avgpool) == cat(cls, mean patch)")
for nb, avg in ((1, False), (1, True), (4, True)):
    print(f"  use_n_blocks={nb}, use_avgpool={avg!s:5s} → {tuple(create_linear_input(out, nb, avg).shape)}")

# %% [markdown] notes
# The backbone is frozen, so we extract the last four blocks' (patch tokens, CLS) once for every image, for the
# pretrained backbone and for the same architecture at **random init**, and fit all classifiers on the cache.

# %% skip
def cache(model):
    return {split: extract_features(model, b["image"], layers=4, batch_size=128, reshape=False, normalize=True)
            for split, b in data.items()}


feats = {"pretrained": cache(backbone)}
seed_everything(0)
feats["random init"] = cache(hub.dinov3_vittiny16().to(DEVICE).eval())
for name, f in feats.items():
    print(f"{name:11s}", {split: f"{len(v)} × ({tuple(v[-1][0].shape)}, {tuple(v[-1][1].shape)})" for split, v in f.items()})

# %% [markdown] slide
# ## 3. The linear probe
#
# `LinearClassifier` (ours, official names): `nn.Linear(out_dim, num_classes)` with weight N(0, 0.01) and bias 0, on
# `create_linear_input`. The official recipe trains one classifier per learning rate of a grid (13 values, scaled by
# batch/256) with SGD (momentum 0.9, no weight decay), a cosine schedule and cross-entropy, and keeps the best on the
# validation set. Ours (smaller, our choice): 6 learning rates, 30 epochs of 1,024 images at batch 128; the best
# learning rate is chosen on **val** and the accuracy reported on **test**, a split it never saw.

# %% skip
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
EPOCHS, BATCH = 30, 128
PROBES = {"CLS only": dict(use_cls=True, use_mean_patch=False),
          "CLS ‖ mean patch (official)": dict(use_cls=True, use_mean_patch=True)}


def train_probe(f, lr, **kw):
    torch.manual_seed(0)
    clf = LinearClassifier(D, NUM_CLASSES, **kw).to(DEVICE)
    x_tr = clf.features(f["train"]).to(DEVICE)
    y_tr = y["train"].to(DEVICE)
    steps = EPOCHS * (N_TRAIN // BATCH)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=g).to(DEVICE)
        loss = F.cross_entropy(clf(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return clf


ABSENT = (counts == 0).to(DEVICE)  # classes with no training image (here: background) are never predicted


@torch.no_grad()
def predict(clf, f_split):
    return clf(clf.features(f_split).to(DEVICE)).masked_fill(ABSENT, float("-inf")).argmax(1).cpu()


def acc(pred, target):
    return float((pred == target).float().mean())


# %% hide-input
# NBVAL_IGNORE_OUTPUT
# the accuracies depend on float rounding in their last digits; the asserts below check what the text claims
results, best = {}, {}
for bname, f in feats.items():
    for pname, kw in PROBES.items():
        val_accs = {}
        clfs = {}
        for lr in LRS:
            clfs[lr] = train_probe(f, lr, **kw)
            val_accs[lr] = acc(predict(clfs[lr], f["val"]), y["val"])
        lr_best = max(LRS, key=lambda lr: val_accs[lr])
        best[bname, pname] = clfs[lr_best]
        results[bname, pname] = acc(predict(clfs[lr_best], f["test"]), y["test"])
        print(f"{bname:11s} {pname:28s} val acc per lr {[round(v, 3) for v in val_accs.values()]} → lr {lr_best}: "
              f"test acc {results[bname, pname]:.3f}")
# How much of the lr pick is noise: one accuracy on N_VAL images has a standard error of sqrt(p (1 - p) / N_VAL).
se = (0.5 * 0.5 / N_VAL) ** 0.5
print(f"standard error of one val accuracy on {N_VAL} images: up to ±{se:.3f}; learning rates whose val accuracies "
      f"differ by less than about {2 * se:.2f} are a tie, so the pick among them is noise")

# %% [markdown] slide
# ## 4. Weighted k-NN
#
# `dinolab.linear.knn_predict` (DINO's `knn.py`): cosine similarity between L2-normalised features, the k most
# similar training images, each voting for its label with weight exp(sim / 0.07). The official evaluation reports
# k = 10, 20, 100 and 200; we do too. No training, no hyperparameter search: a pure measure of how the feature space
# is organised. We check it by hand for one test image first (k = 20).

# %% hide-input
# NBVAL_IGNORE_OUTPUT
# the similarities and votes are printed with many digits; the assert checks the by-hand vote against knn_predict
f_cls = {split: v[-1][1] for split, v in feats["pretrained"].items()}  # last block's CLS
q = F.normalize(f_cls["test"][:1], dim=1)
sim = q @ F.normalize(f_cls["train"], dim=1).T  # (1, N_TRAIN)
top_sim, top_idx = sim.topk(20, dim=1)
votes = torch.zeros(NUM_CLASSES).scatter_add_(0, y["train"][top_idx[0]], (top_sim[0] / 0.07).exp())
print(f"test image 0 (label {CLASS_NAMES[y['test'][0]]}): 20 neighbours with cosine {top_sim[0, 0]:.3f} … "
      f"{top_sim[0, -1]:.3f}; their labels {y['train'][top_idx[0]].tolist()}")
print("weighted votes per class:", {CLASS_NAMES[c]: round(float(v), 1) for c, v in enumerate(votes) if v > 0})
assert int(votes.argmax()) == int(knn_predict(f_cls["train"], y["train"], f_cls["test"][:1], k=20, T=0.07)[0])
print("by hand == knn_predict")

# %% subslide hide-input
# NBVAL_IGNORE_OUTPUT
# the accuracies can differ in the last digit between machines; the asserts below check what the text claims
KS = (10, 20, 100, 200)  # the official knn.py's values
knn, knn_k = {}, {}
for bname, f in feats.items():
    for pname, kw in PROBES.items():
        xs = {split: create_linear_input(v, 1, kw["use_mean_patch"]) for split, v in f.items()}
        knn_k[bname, pname] = {k: knn_accuracy(xs["train"], y["train"], xs["test"], y["test"], k=k, T=0.07) for k in KS}
        knn[bname, pname] = knn_k[bname, pname][20]
rows = ["| backbone | features | linear probe | " + " | ".join(f"k-NN k={k}" for k in KS) + " |",
        "|---|---|---|" + "---|" * len(KS)]
for (bname, pname), a in results.items():
    rows.append(f"| {bname} | {pname} | {a:.3f} | " + " | ".join(f"{knn_k[bname, pname][k]:.3f}" for k in KS) + " |")
rows.append(f"| — | majority class ('{CLASS_NAMES[majority]}') | {majority_acc:.3f} |" + " |" * len(KS))
display(Markdown("\n".join(rows)))

# %% hide-input
ACC = results["pretrained", "CLS ‖ mean patch (official)"]
ACC_CLS = results["pretrained", "CLS only"]
KNN = knn["pretrained", "CLS only"]
RAND = results["random init", "CLS ‖ mean patch (official)"]
BEST = max(list(results.values()) + list(knn.values()))
assert min(ACC, ACC_CLS, KNN) > 0.15  # no classifier is far below chance (the pipeline is sane)
print(f"asserted: every classifier is above 0.15; pretrained {ACC:.3f} vs random init {RAND:.3f} "
      f"(linear probe, CLS ‖ mean patch), majority class {majority_acc:.3f}")

# %% [markdown] slide
# ## 5. Which classes get confused?
# Rows: the true label; columns: the probe's prediction (pretrained backbone, official features, test split),
# normalised per row so the diagonal is each class's recall.

# %% hide-input
# NBVAL_IGNORE_OUTPUT
# predictions of a trained probe: counts can move by one between machines
pred = predict(best["pretrained", "CLS ‖ mean patch (official)"], feats["pretrained"]["test"])
assert int(y["test"].min()) > 0 and int(pred.min()) > 0  # no image is all background: drop class 0
cm = confusion_matrix(pred, y["test"], NUM_CLASSES)[1:, 1:]
assert int(cm.sum()) == N_TEST
cm_norm = cm.float() / cm.sum(1, keepdim=True).clamp_min(1)
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.0), gridspec_kw=dict(width_ratios=[1.1, 1]))
ax = axes[0]
im = ax.imshow(cm_norm.numpy(), cmap="Blues", vmin=0, vmax=1)
names = CLASS_NAMES[1:]
ax.set_xticks(range(5), names, fontsize=11, rotation=30)
ax.set_yticks(range(5), names, fontsize=11)
for i in range(5):
    for j in range(5):
        ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=11,
                color="white" if cm_norm[i, j] > 0.5 else "black")
ax.set_xlabel("predicted", fontsize=12)
ax.set_ylabel("true label", fontsize=12)
ax.set_title("linear probe, pretrained (counts; colour = row share)", fontsize=13)
fig.colorbar(im, ax=ax, fraction=0.046)
ax = axes[1]
recall = cm_norm.diag()
ax.bar(range(5), recall.numpy(), color=[MASK_COLORS[c].numpy() for c in range(1, 6)], edgecolor="k")
ax.axhline(0.2, color="0.5", ls=":", label="chance (0.2)")
ax.set_xticks(range(5), names, fontsize=11, rotation=30)
ax.set_ylim(0, 1)
ax.set_title("per-class recall", fontsize=13)
ax.legend(fontsize=11)
plt.tight_layout()
plt.show()
top2 = counts[1:].topk(2).indices + 1
print(f"predictions that are one of the two most frequent training labels ({', '.join(CLASS_NAMES[c] for c in top2)}): "
      f"{100 * torch.isin(pred, top2).float().mean():.0f} % (their share of the true test labels: "
      f"{100 * torch.isin(y['test'], top2).float().mean():.0f} %)")

# %% [markdown] notes
# The pattern of errors says more than the total: the probe answers mostly with the frequent labels, whatever the true
# shape. It has learned the class frequencies, not the shapes; the rare thin shapes (triangle, star) are almost never
# recognised.

# %% [markdown] slide
# ## 6. One object per image: the question ImageNet asks
#
# An ImageNet photo has one main object, and its label names it. A cluttered ShapesWorld scene does not: "the shape
# covering most pixels" shares the image with distractors. So the protocol is also run on the **object-centric split**
# (`dinolab.evaluate.object_split`: one object per image at 3× size, label = its class, a random appearance; 2,048
# training and 1,024 validation images), with three backbones of the same architecture: **random init**, the
# **self-supervised** checkpoint of notebook 05, and the **supervised control** (the same ViT trained with the labels,
# `python -m dinolab.supervised`), which shows how far frozen features of this size can go. The probe here is
# `dinolab.evaluate.linear_probe` (full-batch AdamW on standardised [CLS ‖ mean patch]); the k-NN is the one above.
# The first row is the floor under all of them: the same k-NN and probe on the raw pixels (each image average-pooled to
# 16 × 16 × 3 = 768 numbers), which know the colours and where they are, and nothing of shape.

# %% hide-input
# NBVAL_IGNORE_OUTPUT
# (accuracies over 1,024 images move in steps of 0.001; one flipped vote changes the last digit on another CPU)
from dinolab import evaluate

SUPERVISED = CKPT.parent / "dinov3_tiny_supervised.pth"
obj = evaluate.ObjectKNN()  # renders the object-centric split once
obj_backbones = {"random init": hub.dinov3_vittiny16().to(DEVICE).eval(), "self-supervised": backbone}
if SUPERVISED.exists():
    obj_backbones["supervised control"] = hub.dinov3_vittiny16(weights=SUPERVISED).to(DEVICE).eval()
# the floor below every backbone: the same k-NN and probe on the raw pixels, each image average-pooled to 16 × 16
px_tr, px_va = (F.adaptive_avg_pool2d(x, 16).flatten(1) for x in (obj.x_train, obj.x_val))
obj_res = {"raw pixels (16 × 16 × 3)": {
    **{f"k-NN k={k}": v for k, v in evaluate.knn_accuracies(px_tr, obj.y_train, px_va, obj.y_val).items()},
    "linear probe": evaluate.linear_probe(px_tr, obj.y_train, px_va, obj.y_val)}}
for name, bb in obj_backbones.items():
    obj_res[name] = evaluate.object_protocol(bb, obj)  # k-NN k=10, 20 and the linear probe on [CLS ‖ mean patch]
obj_major = torch.bincount(obj.y_val).max().item() / len(obj.y_val)
obj_cols = list(obj_res["random init"])
display(Markdown("| backbone | " + " | ".join(obj_cols) + " |\n|---|" + "---|" * len(obj_cols) + "\n"
                 + "\n".join(f"| {n} | " + " | ".join(f"{r[c]:.3f}" for c in obj_cols) + " |" for n, r in obj_res.items())
                 + f"\n| (majority class) | " + " | ".join(f"{obj_major:.3f}" for _ in obj_cols) + " |"))

# %% [markdown] subslide
# Read the first two rows together: on raw pixels the k-NN does better than on the random-init ViT's CLS token. A
# random network mixes the pixels into a vector in which nearness means little, and the pixels' own nearness (same
# colours in the same places) carries some of the class. Pretraining has to beat the pixels, not only random init; the
# self-supervised features do, by a margin that is real but small next to the supervised control's.

# %% hide-input
OBJ_ACC = obj_res["self-supervised"]["linear probe"]
OBJ_KNN = obj_res["self-supervised"]["k-NN k=20"]
OBJ_RAND = obj_res["random init"]["linear probe"]
OBJ_PIX = obj_res["raw pixels (16 × 16 × 3)"]["linear probe"]
assert OBJ_ACC > OBJ_RAND + 0.05 and OBJ_KNN > obj_res["random init"]["k-NN k=20"] + 0.05, obj_res
assert OBJ_ACC > OBJ_PIX + 0.05, (OBJ_ACC, OBJ_PIX)
print("asserted: on single objects the self-supervised features beat random init and the raw pixels by more than "
      "0.05 in the linear probe, and random init in the k-NN (k = 20)")

# %% skip
# NBVAL_IGNORE_OUTPUT
result = {"acc": round(ACC, 4), "acc_cls_only": round(ACC_CLS, 4), "knn_acc": round(KNN, 4),
          "knn_acc_cls_meanpatch": round(knn["pretrained", "CLS ‖ mean patch (official)"], 4),
          "acc_random_init": round(RAND, 4), "acc_cls_only_random_init": round(results["random init", "CLS only"], 4),
          "knn_acc_random_init": round(knn["random init", "CLS only"], 4), "majority_acc": round(majority_acc, 4),
          "n_train": N_TRAIN, "n_val": N_VAL, "n_test": N_TEST, "split_reported": "test",
          "object_acc": round(OBJ_ACC, 4), "object_knn_acc_k10": round(obj_res["self-supervised"]["k-NN k=10"], 4),
          "object_knn_acc_k20": round(OBJ_KNN, 4), "object_acc_random_init": round(OBJ_RAND, 4),
          "object_acc_raw_pixels": round(OBJ_PIX, 4),
          "object_acc_supervised": (round(obj_res["supervised control"]["linear probe"], 4)
                                    if "supervised control" in obj_res else None)}
print("RESULT " + json.dumps(result))

# %% [markdown] slide
# ### The target, and what would reach it

# %% hide-input
# NBVAL_IGNORE_OUTPUT
display(Markdown(
    f"**Target**: accuracy ≥ 0.95 on single objects. **Measured** there (section 6): linear probe {OBJ_ACC:.3f} "
    f"(random init {OBJ_RAND:.3f}), k-NN k = 20 {OBJ_KNN:.3f}; the goal is "
    f"**{'reached' if OBJ_ACC >= 0.95 else 'not reached'}**. On the cluttered scenes of sections 1–5, "
    f"{N_TEST} test images: linear probe on CLS ‖ mean patch "
    f"{ACC:.3f}, on CLS only {ACC_CLS:.3f}, k-NN (CLS) {KNN:.3f}; the same probe on the random-init backbone {RAND:.3f}; "
    f"always predicting the majority class {majority_acc:.3f}; the best of the {len(results) + len(knn)} classifiers above scores {BEST:.3f}, "
    f"{BEST - majority_acc:+.3f} from the majority-class baseline, and pretraining adds {ACC - RAND:+.3f} over the "
    f"same probe on random-init features.\n\n"
    f"Why so little on the cluttered scenes: the label is the shape covering most pixels of a cluttered scene; at 128 px it covers a median "
    f"of only {share.median() * S * S / 256:.1f} patches, next to distractor shapes, and the backbone was pretrained on "
    f"single large objects for a few CPU hours (notebook 05 measures it on that task, where its k-NN is well above "
    f"random init). What would reach the goal: a backbone pretrained much "
    f"longer (a GPU; `python -m dinolab.pretrain` with more steps and a larger batch), larger images (more patches per "
    f"shape), or training the backbone on the labels (fine-tuning, or LoRA as in notebook 13). For scale: the "
    f"official README's fast setup (ViT-L/16 pretrained on ImageNet-1k, 32 H100s for about 14 h) reaches 82.0 % k-NN "
    f"and 83.5 % linear-probe accuracy on ImageNet's 1,000 classes."))

# %% [markdown] slide
# ## Summary
#
# The shapes through the official probe (`dinolab.trace`, two test images; the head takes the (patch tokens, CLS)
# pairs of `get_intermediate_layers`):

# %% hide-input
probe = best["pretrained", "CLS ‖ mean patch (official)"]
two = [(p[:2].to(DEVICE), c[:2].to(DEVICE)) for p, c in feats["pretrained"]["test"]]
display(trace.trace(probe, two))
print(f"LinearClassifier: in {probe.out_dim} = 2 × D, out {probe.num_classes} classes, {count_params(probe):,} parameters")

# %% [markdown] slide
# ### What to remember
#
# * Linear probe and k-NN measure a **frozen** backbone: the backbone's features, not the classifier, are what is
#   evaluated. The official probe input is `[CLS ‖ mean patch]` of the last block (2D), `nn.Linear` with N(0, 0.01)
#   init, SGD over a grid of learning rates; the k-NN uses cosine similarity, k ∈ {10, 20, 100, 200}, votes weighted
#   by exp(sim / 0.07).
# * Always read the **label definition** and compute the **trivial baselines** (majority class, random-init backbone)
#   before reading an accuracy. Here the label is the shape covering most pixels.
# * Choose hyperparameters on one split and report on another: the official recipe picks the best of its
#   learning-rate grid on the evaluation set itself, which is slightly optimistic.
# * Ask the question the features were trained for: the same frozen backbone is near the majority class on
#   cluttered scenes and well above random init on single objects. Compare with a random-init backbone and a
#   supervised control to know what the pretraining bought.

# %% [markdown] skip
# ### Exercises
#
# 1. Add the official `use_n_blocks=4` variant (CLS of the last four blocks ‖ mean patch, 5D features). Does it help?
# 2. Probe every block separately (CLS and mean patch of block 0, 1, …, 5). Which block is most linearly separable?
# 3. Fit the probe on raw pixels (the image average-pooled to 16 × 16). How does it compare with the backbone?
# 4. Make the task easier: `ShapesWorld(n_objects=(1, 1))` (one shape per image) or crop around the largest object
#    (the boxes are in the batch). How much of the gap is the distractors, how much the features?
# 5. With a GPU, pretrain the tiny backbone 20× longer (`python -m dinolab.pretrain`, see `PretrainConfig`) and rerun
#    this notebook with `DINOLAB_CKPT` pointing at it.
