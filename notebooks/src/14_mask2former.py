# %% [markdown] slide
# # 14 · Mask2Former's query decoder, and EoMT
#
# DINOv3 reports semantic segmentation with a **Mask2Former** head: the adapter (notebooks 06–08) turns the frozen
# ViT into a pyramid, the pixel decoder (notebook 09) fuses it, and a **query decoder** — the part this notebook
# builds — turns a hundred learned *queries* into a hundred (mask, class) pairs. A query looks at the image through
# **masked attention**: only where its own previous mask says its object is. Training such a set of predictions
# needs a **matching** between predictions and ground-truth segments (the Hungarian algorithm) and a **set loss**;
# inference turns the pairs back into a label map. Then **EoMT** (Encoder-only Mask Transformer, CVPR 2025) asks:
# what if the ViT's own last blocks did the decoder's job? You will
#
# 1. print the official ViT-7B + Mask2Former shape table on the `meta` device;
# 2. build the query decoder from primitives, layer by layer, and check it against `dinolab.mask2former`;
# 3. match predictions to segments and compute the set loss by hand;
# 4. train a tiny Mask2Former, an FPN head and EoMT on the same frozen features of ShapesWorld scenes, and
#    compare them (parameters, time, mIoU, panoptic quality); draw which pixels each query may see, layer by layer.
#
# Expected run time: about a minute on 2 idle CPU cores (three short trainings take most of it).

# %% slide hide-input
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("14")))

# %% skip
import copy
import itertools
import json
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from dinolab import data, hub
from dinolab.adapter import DINOv3Adapter
from dinolab.eomt import EoMT
from dinolab.mask2former import Mask2FormerHead, semantic_inference
from dinolab.metrics import miou
from dinolab.panoptic import panoptic_inference, panoptic_quality, segments_from_instances
from dinolab.seg_heads import FPNSegHead
from dinolab.set_loss import HungarianMatcher, SetCriterion, batch_dice_loss, batch_sigmoid_ce_loss
from dinolab.trace import trace
from dinolab.train import fit
from dinolab.utils import count_params, get_device, seed_everything
from dinolab.weights import TINY_CHECKPOINT, tiny_checkpoint

viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
seed_everything(0)
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
SCALE = 1  # a reader with a GPU can raise this: more scenes and more training steps in section 4
print("device type:", DEVICE.type)

# %% [markdown] slide
# ## 1. The official head on ViT-7B, on the `meta` device
#
# DINOv3's ADE20k segmentor (`dinov3/eval/segmentation/models/__init__.py`, decoder type `"m2f"`): the ViT-7B
# backbone, the adapter reading blocks `[9, 19, 29, 39]`, and `Mask2FormerHead(input_shape, hidden_dim=2048,
# num_classes=150)`, whose file hard-codes the rest — pixel decoder with 16 heads, FFN 4096 and 6 encoder layers;
# query decoder with **100 queries**, 16 heads, FFN 4096, **9 layers**, post-norm. On the `meta` device tensors have
# shapes but no data, so the 7-billion-parameter model costs nothing to build and run. One 512 × 512 image:

# %% skip
class Segmentor(nn.Module):
    """adapter → Mask2FormerHead, as the official "m2f" decoder type."""

    def __init__(self, adapter, head):
        super().__init__()
        self.adapter, self.head = adapter, head

    def forward(self, x):
        return self.head(self.adapter(x))


with torch.device("meta"):
    backbone_7b = hub.dinov3_vit7b16(device="meta")
    D7 = backbone_7b.embed_dim
    adapter_7b = DINOv3Adapter(backbone_7b, interaction_indexes=[9, 19, 29, 39], device="meta")
    head_7b = Mask2FormerHead({"1": [D7, 64, 64, 4], "2": [D7, 32, 32, 4], "3": [D7, 16, 16, 4], "4": [D7, 8, 8, 4]},
                              hidden_dim=2048, num_classes=150)
    x_7b = torch.empty(1, 3, 512, 512)
segmentor_7b = Segmentor(adapter_7b, head_7b)


def short(table):
    """Shorten the table's outputs: aux_outputs repeats pred_logits / pred_masks once per layer."""
    for row in table.rows:
        if "aux_outputs=(" in row.output:
            n = row.output.count("pred_logits=") - 1
            row.output = row.output[:row.output.index("aux_outputs=(")] + f"aux_outputs=[{n} more of these]"
    return table


print(short(trace(segmentor_7b, x_7b, names=["adapter", "head.pixel_decoder.encoder",
                                              "head.pixel_decoder.mask_feature", "head.predictor",
                                              "head.predictor.transformer_cross_attention_layers",
                                              "head.predictor.transformer_self_attention_layers",
                                              "head.predictor.transformer_ffn_layers", "head.predictor.mask_embed"])))

# %% hide-input
with torch.no_grad():
    out_7b = segmentor_7b(x_7b)
shapes_7b = {"pred_logits": tuple(out_7b["pred_logits"].shape), "pred_masks": tuple(out_7b["pred_masks"].shape),
             "aux_outputs": len(out_7b["aux_outputs"])}
print(shapes_7b)
assert shapes_7b == {"pred_logits": (1, 100, 151), "pred_masks": (1, 100, 128, 128), "aux_outputs": 9}
n_pix, n_dec = count_params(head_7b.pixel_decoder), count_params(head_7b.predictor)
print(f"pixel decoder {n_pix / 1e6:.1f} M, query decoder {n_dec / 1e6:.1f} M, adapter "
      f"{count_params(adapter_7b) - count_params(backbone_7b):,} trainable-head parameters besides the "
      f"{count_params(backbone_7b) / 1e9:.2f} B frozen backbone")

# %% [markdown]
# Read the table: 151 = 150 ADE20k classes + one **"no object"** class; the masks come out at 1/4 of the input
# (128²), one per query; `aux_outputs` holds the 9 earlier predictions (before each layer), which are supervised
# too. The query decoder alone has more parameters than a ViT-L backbone: at width 2048 each of its 9 layers is a
# big transformer layer, even though it processes only 100 tokens.

# %% [markdown] slide
# ## 2. Data: scenes as sets of segments
#
# ShapesWorld scenes at 128 px with one to three large objects (`object_scale=2`). A Mask2Former target is not a label
# map but a **set** of (class, mask) pairs: here one segment for the background ("stuff", class 0) and one per
# visible object ("things", classes 1–5). `ShapesWorld.instances` gives each object's mask, aligned with its box
# and label.

# %% hide-input
N_TRAIN, N_VAL, K = 256 * SCALE, 128, data.NUM_CLASSES  # K = 6 classes: background + 5 shapes
WORLD = dict(size=128, n_objects=(1, 3), object_scale=2.0)
train_set = data.ShapesWorld("train", num_samples=N_TRAIN, **WORLD).instances(torch.arange(N_TRAIN))
val_set = data.ShapesWorld("val", num_samples=N_VAL, **WORLD).instances(torch.arange(N_VAL))
print({k: tuple(v.shape) for k, v in train_set.items()})


def segments(s: dict, b: int, pool: int = 4) -> dict:
    """Image b as a Mask2Former target: labels [T] (background first) and masks [T, 128/pool, 128/pool]
    (area fractions: the masks are predicted at stride 4, so we compare at that resolution)."""
    keep = s["box_labels"][b] > 0
    masks = torch.cat([(s["mask"][b] == 0)[None], s["instance_masks"][b][keep]]).float()
    return {"labels": torch.cat([torch.zeros(1, dtype=torch.int64), s["box_labels"][b][keep]]),
            "masks": F.avg_pool2d(masks[None], pool)[0]}


targets_train = [segments(train_set, b) for b in range(N_TRAIN)]
targets_val = [segments(val_set, b) for b in range(N_VAL)]
t0 = targets_val[0]
print("image 0:", [data.CLASS_NAMES[c] for c in t0["labels"].tolist()], "masks", tuple(t0["masks"].shape))

# %% [markdown] subslide
# **Frozen features.** The shipped tiny backbone (D = 192, 6 blocks) runs once over every image; we keep the
# final-normed patch maps of blocks `[1, 2, 4, 5]` (our choice for 6 blocks, as in notebook 10) for the Mask2Former
# and FPN heads, and the raw tokens after block 3 for EoMT, which continues through the last two blocks itself.
#
# **A stand-in for the adapter.** Training the adapter would take most of our CPU minute, so its last step stands in
# for it: the four ViT maps resized to strides 4, 8, 16, 32, plus a two-convolution **pixel stem** at strides 4 and 8
# (the Spatial Prior Module's role: detail finer than a 16-px patch), each level batch-normalised (the adapter's
# `norm1`–`norm4`). Its output has the adapter's format `{"1": f1, ..., "4": f4}`, so `Mask2FormerHead` takes it as
# it is.

# %% hide-input
LAYERS, GRID = [1, 2, 4, 5], (8, 8)
backbone = hub.dinov3_vittiny16(weights=tiny_checkpoint()).eval().to(DEVICE)
N_PREFIX = 1 + backbone.n_storage_tokens  # cls + 4 storage tokens


@torch.no_grad()
def cache_features(images: torch.Tensor, batch_size: int = 64):
    """One backbone pass → (4 normed patch maps [N, 192, 8, 8], tokens after block 3 [N, 5 + 64, 192])."""
    maps, prefix = [[] for _ in LAYERS], []
    for i in range(0, len(images), batch_size):
        x = viz.normalize(images[i:i + batch_size]).to(DEVICE)
        outs = backbone.get_intermediate_layers(x, n=[1, 2, 3, 4, 5], norm=False, return_class_token=True,
                                                return_extra_tokens=True)
        raw = [torch.cat([cls[:, None], extra, patches], 1) for patches, cls, extra in outs]  # [cls, storage, patches]
        for j, layer in enumerate(LAYERS):
            normed = backbone.final_norm(raw[[1, 2, 3, 4, 5].index(layer)])[:, N_PREFIX:]
            maps[j].append(normed.transpose(1, 2).reshape(len(x), -1, *GRID).cpu())
        prefix.append(raw[[1, 2, 3, 4, 5].index(3)].cpu())
    return [torch.cat(m) for m in maps], torch.cat(prefix)


t0 = time.perf_counter()
maps_train, prefix_train = cache_features(train_set["image"])
maps_val, prefix_val = cache_features(val_set["image"])
cache_seconds = time.perf_counter() - t0
images_train, images_val = viz.normalize(train_set["image"]), viz.normalize(val_set["image"])
print("patch maps:", [tuple(m.shape) for m in maps_train], " EoMT prefix tokens:", tuple(prefix_train.shape))


class Pyramid(nn.Module):
    """Stand-in for the adapter: ViT maps resized to strides 4..32 + a pixel stem at strides 4 and 8, BatchNorm."""

    def __init__(self, dim: int = 192, stem: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 4, stride=4), nn.BatchNorm2d(stem), nn.ReLU())  # stride 4
        self.down = nn.Sequential(nn.Conv2d(stem, stem, 3, stride=2, padding=1), nn.BatchNorm2d(stem), nn.ReLU())
        self.fc1, self.fc2 = nn.Conv2d(stem, dim, 1), nn.Conv2d(stem, dim, 1)
        self.norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))

    def forward(self, images: torch.Tensor, vit_maps: list[torch.Tensor]) -> dict:
        c1 = self.stem(images)
        pixels = [self.fc1(c1), self.fc2(self.down(c1)), 0, 0]
        out = {}
        for i, (x, p) in enumerate(zip(vit_maps, pixels)):
            size = (images.shape[-2] >> (i + 2), images.shape[-1] >> (i + 2))
            out[str(i + 1)] = self.norms[i](F.interpolate(x, size=size, mode="bilinear", align_corners=False) + p)
        return out


# %% [markdown] slide
# ## 3. The query decoder, from primitives
#
# Our small decoder (official structure, CPU widths): width 64, 10 queries, 4 heads, FFN 128, **3 layers** — one
# round over the three levels — behind a pixel decoder of width 64 with one encoder layer. We build `dinolab`'s
# head, then redo its query decoder step by step with its weights on two validation scenes.

# %% hide-input
HIDDEN, QUERIES, HEADS, DEC_LAYERS = 64, 10, 4, 3


class Mask2Former(nn.Module):
    """pyramid stand-in → Mask2FormerHead (pixel decoder + query decoder)."""

    def __init__(self):
        super().__init__()
        self.pyramid = Pyramid()
        self.head = Mask2FormerHead(192, hidden_dim=HIDDEN, num_classes=K, num_queries=QUERIES, nheads=HEADS,
                                    dim_feedforward=2 * HIDDEN, dec_layers=DEC_LAYERS, enc_layers=1)

    def forward(self, images, vit_maps):
        return self.head(self.pyramid(images, vit_maps))


seed_everything(0)
m2f = Mask2Former().to(DEVICE).eval()
dec = m2f.head.predictor
with torch.no_grad():
    feats = m2f.pyramid(images_val[:2].to(DEVICE), [m[:2].to(DEVICE) for m in maps_val])
    mask_features, _, multi_scale = m2f.head.pixel_decoder.forward_features(feats)
    reference = dec(multi_scale, mask_features)
print("mask_features", tuple(mask_features.shape), " multi_scale_features", [tuple(m.shape) for m in multi_scale])

# %% [markdown]
# **Inputs.** Each of the three levels (1/32, 1/16, 1/8) gets a sine position embedding (DETR's, as in notebook 09)
# and a learned level embedding, and is flattened to a sequence — `[HW, B, C]`, sequence first, as
# `nn.MultiheadAttention` wants. The queries are two learned tables: `query_feat` (content, updated layer by layer)
# and `query_embed` (position, added to q and k in every attention, never updated).

# %% hide-input
B = mask_features.shape[0]
src, pos, sizes = [], [], []
for lvl, x in enumerate(multi_scale):
    sizes.append(tuple(x.shape[-2:]))
    pos.append(dec.pe_layer(x).flatten(2).permute(2, 0, 1))  # [HW, B, C]
    src.append((x.flatten(2) + dec.level_embed.weight[lvl][None, :, None]).permute(2, 0, 1))  # input_proj = identity
    print(f"level {lvl}: {sizes[-1]} -> src {tuple(src[-1].shape)}, pos {tuple(pos[-1].shape)}")
query_pos = dec.query_embed.weight[:, None].repeat(1, B, 1)
tgt = dec.query_feat.weight[:, None].repeat(1, B, 1)
print("queries: content", tuple(tgt.shape), " position", tuple(query_pos.shape))

# %% [markdown] subslide
# **Prediction heads** (shared by every layer): LayerNorm → `class_embed` (K + 1 logits) and `mask_embed` (3-layer
# MLP) → mask logits = the query's mask embedding · every pixel of `mask_features` (an einsum). The **attention mask**
# for the next layer is that mask resized to the next layer's level: a query may look only where sigmoid ≥ 0.5;
# a query that would see nothing at all sees everything instead.

# %% hide-input
def heads(tgt, level_size):
    h = F.layer_norm(tgt, (HIDDEN,), dec.post_norm.weight, dec.post_norm.bias).transpose(0, 1)  # [B, Q, C]
    logits = dec.class_embed(h)
    e = h
    for i, lin in enumerate(dec.mask_embed.layers):
        e = lin(e) if i == 2 else F.relu(lin(e))
    masks = torch.einsum("bqc,bchw->bqhw", e, mask_features)
    small = F.interpolate(masks, size=level_size, mode="bilinear", align_corners=False)
    blocked = small.sigmoid().flatten(2) < 0.5  # [B, Q, hw]: True = may not look there
    blocked = blocked & ~blocked.all(-1, keepdim=True)  # nothing visible -> everything visible
    return logits, masks, blocked


def attention(q_in, k_in, v_in, attn: nn.MultiheadAttention, blocked=None):
    """Multi-head attention with the fused in_proj of nn.MultiheadAttention, written out. blocked: [B, Q, S]."""
    Wq, Wk, Wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    split = lambda t: t.reshape(t.shape[0], B, HEADS, -1).permute(1, 2, 0, 3)  # noqa: E731  [B, heads, L, d]
    q, k, v = split(q_in @ Wq.T + bq), split(k_in @ Wk.T + bk), split(v_in @ Wv.T + bv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, heads, Q, S]
    if blocked is not None:
        scores = scores.masked_fill(blocked[:, None], float("-inf"))
    o = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(q_in.shape[0], B, -1)
    return attn.out_proj(o)


with torch.no_grad():
    logits, masks, blocked = heads(tgt, sizes[0])
    ours = [(logits, masks)]
    print(f"before layer 1: logits {tuple(logits.shape)}, masks {tuple(masks.shape)}, attention mask "
          f"{tuple(blocked.shape)} ({blocked.float().mean():.0%} blocked)")
    for i in range(DEC_LAYERS):
        lvl = i % 3  # round robin: 1/32, 1/16, 1/8
        ca, sa, ffn = (dec.transformer_cross_attention_layers[i], dec.transformer_self_attention_layers[i],
                       dec.transformer_ffn_layers[i])
        tgt = ca.norm(tgt + attention(tgt + query_pos, src[lvl] + pos[lvl], src[lvl], ca.multihead_attn, blocked))
        tgt = sa.norm(tgt + attention(tgt + query_pos, tgt + query_pos, tgt, sa.self_attn))
        tgt = ffn.norm(tgt + ffn.linear2(F.relu(ffn.linear1(tgt))))
        logits, masks, blocked = heads(tgt, sizes[(i + 1) % 3])
        ours.append((logits, masks))
        print(f"layer {i + 1} (level {sizes[lvl]}): queries {tuple(tgt.shape)} -> masks {tuple(masks.shape)}")

# %% hide-input
preds_ref = reference["aux_outputs"] + [reference]
for (lg, mk), r in zip(ours, preds_ref):
    torch.testing.assert_close(lg, r["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mk, r["pred_masks"], atol=1e-5, rtol=1e-5)
print(f"all {len(ours)} predictions (before layer 1..3 and after the last) equal dinolab's "
      "MultiScaleMaskedTransformerDecoder")

# %% [markdown] slide
# ## 4. Matching and the set loss
#
# The decoder predicts 10 (class, mask) pairs; image 0 has a handful of segments. Which prediction should learn
# which segment? Mask2Former decides per image by the **Hungarian algorithm**: the one-to-one assignment with the
# least total cost, where the cost of prediction q for segment t is
#
# $$C_{qt} = 2\,(-p_q(c_t)) + 5\,\mathrm{BCE}(m_q, m_t) + 5\,\mathrm{dice}(m_q, m_t),$$
#
# the class probability and two mask distances (Mask2Former's weights; the official code computes the mask terms on
# 12,544 random points, we use every pixel of the 32 × 32 mask). Unmatched predictions are trained to say "no
# object". Below, the cost matrix of image 0 for the untrained model, the assignment found by
# `scipy.optimize.linear_sum_assignment`, and a check by brute force over all assignments.

# %% hide-input
matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=None)
tgt0 = {k: v.to(DEVICE) for k, v in targets_val[0].items()}
pl, pm = reference["pred_logits"][0], reference["pred_masks"][0]
prob = pl.softmax(-1)
flat_p, flat_t = pm.flatten(1), tgt0["masks"].flatten(1)
C = (2 * -prob[:, tgt0["labels"]] + 5 * batch_sigmoid_ce_loss(flat_p, flat_t) + 5 * batch_dice_loss(flat_p, flat_t))
torch.testing.assert_close(C, matcher.cost_matrix(pl, pm, tgt0["labels"], tgt0["masks"]))
(qi, ti), = matcher({"pred_logits": pl[None], "pred_masks": pm[None]}, [tgt0])
n_t = len(tgt0["labels"])
brute = min(itertools.permutations(range(QUERIES), n_t), key=lambda qs: sum(C[q, t] for t, q in enumerate(qs)))
assert [dict(zip(ti.tolist(), qi.tolist()))[t] for t in range(n_t)] == list(brute)
print(f"cost matrix {tuple(C.shape)} (queries x segments); Hungarian = brute force over "
      f"{math.perm(QUERIES, n_t):,} assignments; chosen queries {list(brute)} for segments "
      f"{[data.CLASS_NAMES[c] for c in tgt0['labels'].tolist()]}")

# %% slide hide-input
fig, axes = plt.subplots(1, 1 + n_t, figsize=(12.8, 4.6), gridspec_kw={"width_ratios": [1.6] + [1] * n_t})
im = axes[0].imshow(C.cpu().numpy(), cmap="viridis")
axes[0].scatter(ti.tolist(), qi.tolist(), marker="s", s=200, facecolors="none", edgecolors="red", linewidths=2.5)
axes[0].set_xticks(range(n_t), [data.CLASS_NAMES[c] for c in tgt0["labels"].tolist()], rotation=45, ha="right")
axes[0].set_ylabel("query")
axes[0].set_title("matching cost (red: chosen)")
fig.colorbar(im, ax=axes[0], fraction=0.05)
for t in range(n_t):
    axes[1 + t].imshow(tgt0["masks"][t].cpu(), cmap="gray", vmin=0, vmax=1)
    axes[1 + t].set_title(f"segment {t}: {data.CLASS_NAMES[int(tgt0['labels'][t])]}")
    axes[1 + t].set_xticks([])
    axes[1 + t].set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown] subslide
# **The set loss** (Mask2Former's `SetCriterion`): for every query a cross-entropy over K + 1 classes — matched queries
# towards their segment's class, the others towards "no object", whose weight is only **0.1** (most queries are
# unmatched; at full weight "no object" would swamp the loss); for matched pairs the mask BCE and the dice loss, each
# summed over pairs and divided by the number of segments in the batch. The weighted total is
# `2·CE + 5·BCE + 5·dice`, and the same loss is added for **every intermediate prediction** (deep supervision),
# each matched on its own. By hand for image 0:

# %% hide-input
target_classes = torch.full((QUERIES,), K, dtype=torch.int64, device=DEVICE)  # "no object" = class K
target_classes[qi] = tgt0["labels"][ti]
weights = torch.ones(K + 1, device=DEVICE)
weights[K] = 0.1
ce_terms = -pl.log_softmax(-1)[torch.arange(QUERIES), target_classes] * weights[target_classes]
loss_ce = ce_terms.sum() / weights[target_classes].sum()
p_m, t_m = pm[qi].flatten(1), tgt0["masks"][ti].flatten(1)
loss_mask = F.binary_cross_entropy_with_logits(p_m, t_m, reduction="none").mean(1).sum() / n_t
s = p_m.sigmoid()
loss_dice = (1 - (2 * (s * t_m).sum(1) + 1) / (s.sum(1) + t_m.sum(1) + 1)).sum() / n_t
criterion = SetCriterion(K, matcher, eos_coef=0.1, num_points=None).to(DEVICE)
lib = criterion({"pred_logits": pl[None], "pred_masks": pm[None]}, [tgt0])
for name, v in [("loss_ce", loss_ce), ("loss_mask", loss_mask), ("loss_dice", loss_dice)]:
    torch.testing.assert_close(v, lib[name])
    print(f"{name:10s} by hand {v.item():.4f} = SetCriterion")
tgt1 = {k: v.to(DEVICE) for k, v in targets_val[1].items()}
all_losses = criterion(reference, [tgt0, tgt1])  # both scenes, every prediction of the decoder
print(f"with deep supervision: {len(all_losses)} terms ({len(reference['aux_outputs'])} intermediate predictions "
      f"x 3 + 3 final), weighted total {criterion.total(all_losses).item():.2f}")

# %% [markdown] slide
# ## 5. Three heads on the same frozen features
#
# * **Mask2Former** (above): pyramid stand-in → pixel decoder → query decoder, trained with the set loss.
# * **FPN head** (`dinolab.seg_heads.FPNSegHead`, notebooks 09–10) on the same pyramid stand-in: one class per pixel,
#   cross-entropy. No queries, no matching.
# * **EoMT**: no pyramid, no pixel decoder, no query decoder. 10 learned query tokens are put in front of the ViT's
#   tokens before its **last two blocks**: `[queries, cls, storage, patches]`. The blocks' attention lets queries
#   read patches and each other (RoPE rotates only the patch tokens, so queries have no position). After the last
#   block, a class head reads the queries, and the mask logits are query · patch features brought from stride 16 to
#   stride 4 by two `ScaleBlock`s (transposed conv ×2). During training the queries' attention to patches is
#   **masked** by their own intermediate masks, with a probability annealed from 1 to 0, so the finished model needs
#   no mask. Here the two last blocks are fine-tuned (EoMT trains the whole ViT) from the tokens cached after block 3.
#
# Our simplification of EoMT's annealing: one linear schedule for both blocks over the first half of training (the
# official anneals each block on its own polynomial schedule); once it reaches 0 we switch the intermediate
# predictions off, which also drops their deep supervision for the second half.
#
# Every model: the same 150 steps of the same batches of 8 scenes, AdamW, lr 2·10⁻³, warm-up and cosine.

# %% hide-input
STEPS, BATCH, LR = 150 * SCALE, 8, 2e-3
criterion = SetCriterion(K, HungarianMatcher(2.0, 5.0, 5.0, num_points=None), eos_coef=0.1, num_points=None).to(DEVICE)


class FPNSeg(nn.Module):
    """pyramid stand-in → FPNSegHead → logits at the image size."""

    def __init__(self):
        super().__init__()
        self.pyramid = Pyramid()
        self.head = FPNSegHead(192, HIDDEN, K)

    def forward(self, images, vit_maps):
        f = self.pyramid(images, vit_maps)
        return self.head([f[k] for k in "1234"], output_size=images.shape[-2:])


def make_eomt() -> EoMT:
    model = EoMT(copy.deepcopy(backbone), num_classes=K, num_q=QUERIES, num_blocks=2)
    model.backbone.requires_grad_(False)
    for m in (*model.backbone.blocks[-2:], model.backbone.norm):  # fine-tune the last two blocks
        m.requires_grad_(True)
    return model.to(DEVICE)


def rows(idx, maps, prefix, images):
    return {"images": images[idx], "maps": [m[idx] for m in maps], "prefix": prefix[idx]}


def train(name: str, model: nn.Module) -> tuple[list[float], float]:
    g = torch.Generator().manual_seed(0)  # the same batches for every model

    def batch(step):
        idx = torch.randint(0, N_TRAIN, (BATCH,), generator=g)
        b = rows(idx, maps_train, prefix_train, images_train)
        b["mask"] = train_set["mask"][idx]
        b["targets"] = [targets_train[i] for i in idx.tolist()]
        b["step"] = torch.tensor(step)
        return b

    def loss_fn(m, b):
        if name == "FPN head":
            return F.cross_entropy(m(b["images"], b["maps"]), b["mask"])
        if name == "EoMT":
            p = max(0.0, 1 - int(b["step"]) / (0.5 * STEPS))  # linear annealing over the first half
            m.attn_mask_probs.fill_(p)
            m.masked_attn_enabled = p > 0
            out = m.decode(b["prefix"], GRID)
        else:
            out = m(b["images"], b["maps"])
        return criterion.total(criterion(out, b["targets"]))

    t0 = time.perf_counter()
    hist = fit(model, None, loss_fn, batch, steps=STEPS, lr=LR, weight_decay=0.05, warmup=10, device=DEVICE,
               progress=False)
    return hist, time.perf_counter() - t0


seed_everything(0)
models = {"Mask2Former": Mask2Former().to(DEVICE), "FPN head": FPNSeg().to(DEVICE), "EoMT": make_eomt()}
histories, seconds = {}, {}
for name, model in models.items():
    histories[name], seconds[name] = train(name, model)
print({name: f"{count_params(m, trainable_only=True):,} trainable parameters" for name, m in models.items()})

# %% skip
# NBVAL_IGNORE_OUTPUT
print(f"backbone features for {N_TRAIN + N_VAL} scenes (one pass): {cache_seconds:.1f} s")
for name in models:
    print(f"{name:12s} {STEPS} steps: {seconds[name]:5.1f} s ({seconds[name] / STEPS * 1000:.0f} ms/step); "
          f"loss {sum(histories[name][:10]) / 10:.2f} -> {sum(histories[name][-10:]) / 10:.2f}")

# %% [markdown] slide
# ### Semantic inference and panoptic quality
#
# A mask-classification model gives a label map the official way (`dinov3/eval/segmentation/inference.py`): each
# query votes for every class with its class probability (no-object dropped) times its mask probability,
# `einsum("bqc,bqhw->bchw", softmax(logits)[..., :-1], sigmoid(masks))`, and each pixel takes the class with the most
# votes. The FPN head's logits are already a label map. Besides the mIoU over the 6 classes we score what only the
# query models can do, tell objects apart: **panoptic quality** (PQ: a predicted and a true segment of the same class
# match when IoU > 0.5; PQ = Σ IoU of matches / (TP + FP/2 + FN/2), per class, averaged), with Mask2Former's panoptic
# inference (keep queries with class score > 0.8, give each pixel to the strongest, drop mostly-hidden segments).

# %% skip
@torch.no_grad()
def evaluate(name: str, model: nn.Module) -> dict:
    model.eval()
    b = rows(torch.arange(N_VAL), maps_val, prefix_val, images_val)
    b = {k: ([t.to(DEVICE) for t in v] if isinstance(v, list) else v.to(DEVICE)) for k, v in b.items()}
    if name == "FPN head":
        return {"semantic": model(b["images"], b["maps"]).argmax(1).cpu()}
    out = model.decode(b["prefix"], GRID) if name == "EoMT" else model(b["images"], b["maps"])
    masks = F.interpolate(out["pred_masks"], size=(128, 128), mode="bilinear", align_corners=False)
    logits = out["pred_logits"]
    semantic = semantic_inference(logits, masks).argmax(1).cpu()
    panoptic = [panoptic_inference(logits[i], masks[i], thing_classes=range(1, K)) for i in range(N_VAL)]
    agnostic = [panoptic_inference(agnostic_logits(logits[i]), masks[i], thing_classes=[1]) for i in range(N_VAL)]
    return {"semantic": semantic, "panoptic": [(s.cpu(), c) for s, c in panoptic],
            "agnostic": [(s.cpu(), c) for s, c in agnostic], "logits": logits.cpu(), "masks": masks.cpu()}


def agnostic_logits(logits: torch.Tensor) -> torch.Tensor:
    """[Q, K+1] -> [Q, 3]: background, any shape (the five merged), no object (as log-probabilities)."""
    p = logits.softmax(-1)
    return torch.stack([p[:, 0], p[:, 1:K].sum(-1), p[:, K]], -1).log()


truth = [segments_from_instances(val_set["mask"][i], val_set["instance_masks"][i], val_set["box_labels"][i])
         for i in range(N_VAL)]
truth_agnostic = [(seg, {sid: min(c, 1) for sid, c in cls.items()}) for seg, cls in truth]
preds, results = {}, {}
for name, model in models.items():
    preds[name] = evaluate(name, model)
    m, iou = miou(preds[name]["semantic"], val_set["mask"], K, per_class=True)
    results[name] = {"miou": m, "iou": iou, "params": count_params(model, trainable_only=True)}
    if "panoptic" in preds[name]:
        results[name]["pq"] = panoptic_quality(preds[name]["panoptic"], truth, K)
        results[name]["pq_agnostic"] = panoptic_quality(preds[name]["agnostic"], truth_agnostic, 2)

# by hand for one pixel: the einsum is a sum over queries of class probability x mask probability
o = preds["Mask2Former"]
votes = (o["logits"][0].softmax(-1)[:, :-1] * o["masks"][0, :, 64, 64].sigmoid()[:, None]).sum(0)
assert votes.argmax() == o["semantic"][0, 64, 64]

# %% slide hide-input
# NBVAL_IGNORE_OUTPUT
table = ["| model | trainable parameters | ms / step | mIoU | " + " | ".join(f"IoU {n}" for n in data.CLASS_NAMES)
         + " | PQ | PQ, shapes merged |", "|---|---|---|---|" + "---|" * K + "---|---|"]
for name, r in results.items():
    pq = f"{r['pq']['pq']:.3f} | {r['pq_agnostic']['pq']:.3f}" if "pq" in r else "— | —"
    table.append(f"| {name} | {r['params']:,} | {seconds[name] / STEPS * 1000:.0f} | **{r['miou']:.3f}** | "
                 + " | ".join(f"{v:.2f}" for v in r["iou"].tolist()) + f" | {pq} |")
display(Markdown("\n".join(table)))
for name in ("Mask2Former", "EoMT"):
    pc = results[name]["pq"]["per_class"]
    print(f"{name}: PQ per class " + ", ".join(f"{data.CLASS_NAMES[c]} {v[0]:.2f} (TP {v[1]}, FP {v[2]}, FN {v[3]})"
                                               for c, v in pc.items()))
    pa = results[name]["pq_agnostic"]["per_class"]
    print(f"{name}: shapes merged: " + ", ".join(f"{n} {v[0]:.2f} (TP {v[1]}, FP {v[2]}, FN {v[3]})"
                                                for n, v in zip(["background", "object"], pa.values())))

# %% skip
r_m2f, r_fpn, r_eomt = results["Mask2Former"], results["FPN head"], results["EoMT"]
assert r_m2f["miou"] > 0.18 and r_fpn["miou"] > 0.15 and r_eomt["miou"] > 0.12, \
    (r_m2f["miou"], r_fpn["miou"], r_eomt["miou"])
assert r_m2f["iou"][0] > 0.8 and r_eomt["iou"][0] > 0.7  # the background segment is found
assert r_m2f["pq"]["pq"] > 0.08 and r_m2f["pq_agnostic"]["pq"] > 0.35, (r_m2f["pq"]["pq"], r_m2f["pq_agnostic"]["pq"])
assert r_eomt["pq_agnostic"]["pq"] > 0.3 and r_m2f["pq_agnostic"]["pq"] > r_m2f["pq"]["pq"] + 0.2
print("every model is above its floor")

# %% [markdown] slide
# ### Look at the predictions
#
# Validation scenes; class colours over a grey image. The last column is Mask2Former's **panoptic** output with the
# five shapes merged into one "object" class (see below why): each segment its own colour, so objects stay apart
# where the semantic map would merge them.

# %% subslide hide-input
def overlay(ax, img, mask, title=""):
    ax.imshow(viz.to_numpy_image(img).mean(-1), cmap="gray", vmin=0, vmax=1)
    colours = torch.cat([data.MASK_COLORS[mask], (mask > 0).float()[..., None] * 0.75], -1)
    ax.imshow(colours.numpy())
    ax.set_title(title)
    ax.axis("off")


show = [0, 1, 2]
fig, axes = plt.subplots(len(show), 5, figsize=(12.8, 7.2))
for r, i in enumerate(show):
    overlay(axes[r, 0], val_set["image"][i], val_set["mask"][i], "ground truth" if r == 0 else "")
    for c, name in enumerate(models):
        overlay(axes[r, c + 1], val_set["image"][i], preds[name]["semantic"][i], name if r == 0 else "")
    seg, cls = preds["Mask2Former"]["agnostic"][i]
    axes[r, 4].imshow(viz.to_numpy_image(val_set["image"][i]).mean(-1), cmap="gray", vmin=0, vmax=1)
    axes[r, 4].imshow(seg.numpy(), cmap="tab10", vmin=0, vmax=9, alpha=(seg > 0).float().numpy() * 0.7)
    axes[r, 4].set_title("Mask2Former, panoptic\n(shapes merged)" if r == 0 else "")
    axes[r, 4].axis("off")
handles = [plt.Rectangle((0, 0), 1, 1, color=data.MASK_COLORS[c].tolist()) for c in range(1, K)]
fig.legend(handles, data.CLASS_NAMES[1:], loc="lower center", ncol=K - 1, frameon=False)
plt.tight_layout(rect=(0, 0.06, 1, 1))
plt.show()

# %% [markdown] slide
# ### Masked attention, layer by layer
#
# Which pixels may a query look at? For the trained Mask2Former on one scene: the queries matched to the scene's
# segments (rows), and the attention mask each cross-attention layer receives (columns): the previous prediction,
# resized to that layer's level (1/32, 1/16, 1/8) — white where the query may look. The last column is the final mask.

# %% subslide hide-input
i_show = show[0]
m2f_model = models["Mask2Former"].eval()
with torch.no_grad():
    out_one = m2f_model(images_val[i_show:i_show + 1].to(DEVICE), [m[i_show:i_show + 1].to(DEVICE) for m in maps_val])
tgt_one = {k: v.to(DEVICE) for k, v in targets_val[i_show].items()}
(q_idx, t_idx), = criterion.matcher(out_one, [tgt_one])
level_sizes = [(4, 4), (8, 8), (16, 16)]
preds_one = out_one["aux_outputs"] + [out_one]
fig, axes = plt.subplots(len(q_idx), DEC_LAYERS + 2, figsize=(12.8, 2.4 * len(q_idx) + 0.6), squeeze=False)
for r, (q, t) in enumerate(zip(q_idx.tolist(), t_idx.tolist())):
    axes[r, 0].imshow(viz.to_numpy_image(val_set["image"][i_show]))
    axes[r, 0].imshow(tgt_one["masks"][t].cpu(), cmap="Reds", alpha=0.4, extent=(0, 128, 128, 0))
    axes[r, 0].set_title(f"query {q}: {data.CLASS_NAMES[int(tgt_one['labels'][t])]}")
    for layer in range(DEC_LAYERS):
        m = F.interpolate(preds_one[layer]["pred_masks"], size=level_sizes[layer % 3], mode="bilinear",
                          align_corners=False)[0, q].sigmoid() >= 0.5
        if not m.any():
            m = torch.ones_like(m)  # nothing visible -> everything visible
        axes[r, layer + 1].imshow(m.cpu(), cmap="gray", vmin=0, vmax=1)
        axes[r, layer + 1].set_title(f"layer {layer + 1}: {level_sizes[layer % 3][0]}²")
    axes[r, -1].imshow(out_one["pred_masks"][0, q].sigmoid().cpu() >= 0.5, cmap="gray", vmin=0, vmax=1)
    axes[r, -1].set_title("final mask (32²)")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown] notes
# Layer 1 reads the coarsest level (4 × 4 for a 128-px image) through the mask predicted from the bare learned query;
# each later layer reads a finer level through a sharper mask. This is what makes Mask2Former converge fast: a query
# spends its attention on its own object instead of the whole image.

# %% [markdown] slide
# ### What the numbers say
#
# (The table comes from the stored run; the asserts hold on every run.)
#
# * The three heads reach similar **mIoU** on these scenes, and all of it is modest: the tiny self-supervised
#   backbone's features separate the five shapes only a little (notebook 10's linear head reads about 0.25 mIoU from
#   them), so the class of an object is mostly guessed; what is learned well is *where* objects are (background IoU).
# * Only the query models produce **instances**, and the per-class PQ shows the same weakness: panoptic inference
#   keeps a query only if its class probability exceeds 0.8, and hardly any shape query is that sure of its shape, so
#   the shapes' PQ is near 0 and the PQ comes from the background segment. Merge the five shapes into one "object"
#   class (sum their probabilities) and the same masks give a far higher PQ: many objects are found and kept apart
#   as separate segments (the TP / FP / FN counts above), though fewer than half of them in 150 steps.
# * **EoMT** has no pixel stem: its masks come from patch tokens at stride 16, upsampled; it fine-tunes two ViT
#   blocks (more trainable parameters) but has no decoder to run. With real DINOv3 weights and a large ViT, its paper
#   finds it matches Mask2Former's accuracy at a fraction of the cost — a claim this CPU run cannot test.

# %% [markdown] slide
# ### With more scenes and steps
#
# 150 steps on 256 scenes is what fits in this notebook. `tools/scale_budget.py` runs this notebook again with
# `SCALE` raised (the scenes and steps of this section multiplied by it, nothing else changed) and keeps each run's
# RESULT line in `data/mask2former_scale_budget.json`, with the command:

# %% subslide hide-input
scale_budget = json.loads((TINY_CHECKPOINT.parent / "mask2former_scale_budget.json").read_text())
sb = scale_budget["runs"]
steps_axis = [b["result"]["steps"] for b in sb]
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.4))
for key, label, c in (("miou_m2f", "Mask2Former", "C0"), ("miou_fpn", "FPN head", "C1"), ("miou_eomt", "EoMT", "C2")):
    axes[0].plot(steps_axis, [b["result"][key] for b in sb], "o-", color=c, label=label)
for key, label, c in (("pq_agnostic", "Mask2Former", "C0"), ("pq_agnostic_eomt", "EoMT", "C2")):
    axes[1].plot(steps_axis, [b["result"][key] for b in sb], "o-", color=c, label=label)
for ax, title in zip(axes, ("mIoU (6 classes)", "PQ, the five shapes merged into one class")):
    ax.set_xscale("log")
    ax.set_xticks(steps_axis, [f"{s:,}\n({b['result']['train_images']:,} scenes)" for s, b in zip(steps_axis, sb)])
    ax.minorticks_off()
    ax.set_xlabel("training steps (scenes)")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=11)
plt.tight_layout()
plt.show()
last = sb[-1]["result"]
display(Markdown(
    f"At {last['steps']:,} steps on {last['train_images']:,} scenes: Mask2Former {last['miou_m2f']:.3f} mIoU, the FPN "
    f"head {last['miou_fpn']:.3f}, EoMT {last['miou_eomt']:.3f}; Mask2Former is "
    f"**{'at or above' if last['miou_m2f'] >= last['miou_fpn'] else 'below'}** the FPN head there "
    f"(it was {'at or above' if sb[0]['result']['miou_m2f'] >= sb[0]['result']['miou_fpn'] else 'below'} it at "
    f"{sb[0]['result']['steps']} steps). The shapes-merged PQ goes from {sb[0]['result']['pq_agnostic']:.3f} to "
    f"{last['pq_agnostic']:.3f} for Mask2Former and from {sb[0]['result']['pq_agnostic_eomt']:.3f} to "
    f"{last['pq_agnostic_eomt']:.3f} for EoMT; the PQ with the shapes told apart from {sb[0]['result']['pq']:.3f} to "
    f"{last['pq']:.3f} (Mask2Former)."))

# %% skip
# NBVAL_IGNORE_OUTPUT
print("RESULT " + json.dumps({"miou_m2f": round(r_m2f["miou"], 4), "miou_fpn": round(r_fpn["miou"], 4),
                              "miou_eomt": round(r_eomt["miou"], 4), "pq": round(r_m2f["pq"]["pq"], 4),
                              "pq_eomt": round(r_eomt["pq"]["pq"], 4), "pq_agnostic": round(r_m2f["pq_agnostic"]["pq"], 4),
                              "pq_agnostic_eomt": round(r_eomt["pq_agnostic"]["pq"], 4), "steps": STEPS,
                              "train_images": N_TRAIN}))

# %% [markdown] slide
# ## 6. Summary: what to remember
#
# * **Mask2Former's query decoder**: Q learned queries (content `query_feat` + position `query_embed`); per layer
#   masked cross-attention to one pixel-decoder level (round robin 1/32 → 1/16 → 1/8), self-attention among the
#   queries, FFN, post-norm; shared heads after every layer give class logits [B, Q, K+1] and masks
#   [B, Q, H/4, W/4] = mask embedding · `mask_features`. DINOv3: width 2048, 100 queries, 16 heads, 9 layers, 151
#   logits for ADE20k.
# * **Masked attention**: a query sees only where its previous mask has sigmoid ≥ 0.5 (everything if nowhere).
# * **Training a set**: Hungarian matching per image and per prediction layer (cost 2·class + 5·BCE + 5·dice), then
#   CE with "no object" weighted 0.1, BCE and dice on matched masks, for the final and every intermediate prediction.
# * **Semantic inference**: `einsum("bqc,bqhw->bchw", softmax(class)[..., :-1], sigmoid(mask))`, argmax over classes.
# * **EoMT**: queries join the ViT's tokens for its last blocks; no adapter, no pixel decoder, no decoder; masked
#   attention only while training, annealed away.
# * Ours, for a CPU: 128-px scenes, a pyramid stand-in instead of the adapter, width 64, 10 queries, 3 layers,
#   every mask pixel instead of 12,544 sampled points, 150 steps. Structure and parameter names are the official
#   ones: an official `Mask2FormerHead` state dict loads with `strict=True` (tests/test_mask2former.py).

# %% [markdown] skip
# The shape table of the trained tiny Mask2Former on one 128 × 128 scene:

# %% skip
one = (images_val[:1].to(DEVICE), [m[:1].to(DEVICE) for m in maps_val])
print(short(trace(models["Mask2Former"].eval(), *one, names=["pyramid", "head.pixel_decoder.encoder",
                                                               "head.pixel_decoder.mask_feature", "head.predictor",
                                                               "head.predictor.transformer_cross_attention_layers",
                                                               "head.predictor.transformer_self_attention_layers",
                                                               "head.predictor.transformer_ffn_layers"])))

# %% [markdown] skip
# and of EoMT on the same scene, from the tokens after block 3: in the ViT's last two blocks the sequence is 10 queries
# + cls + 4 storage + 64 patches = 79 tokens.

# %% skip
class EoMTDecode(nn.Module):
    """EoMT from the cached tokens after block 3: decode(tokens, grid) as a forward, for the shape table."""

    def __init__(self, eomt: EoMT):
        super().__init__()
        self.eomt = eomt

    def forward(self, tokens):
        return self.eomt.decode(tokens, GRID)


print(short(trace(EoMTDecode(models["EoMT"].eval()), prefix_val[:1].to(DEVICE),
                  names=[*(f"eomt.backbone.blocks.{i}.{m}" for i in (4, 5) for m in ("attn.qkv", "attn.proj", "mlp")),
                         "eomt.backbone.norm", "eomt.class_head", "eomt.mask_head", "eomt.upscale"])))

# %% [markdown] skip
# ### Exercises
#
# 1. Turn masked attention off (let every query see every pixel: replace the attention mask by all-False in
#    `MultiScaleMaskedTransformerDecoder.forward_prediction_heads`) and retrain. How do the loss curve and PQ change?
# 2. Set the no-object weight `eos_coef` to 1.0. How many queries claim an object on a validation scene now?
# 3. Train without deep supervision (drop `aux_outputs` before the loss). Which layer's predictions get worse?
# 4. Give EoMT 4 blocks instead of 2 (`num_blocks=4`, prefix after block 1). What does it cost per step, and what
#    does it buy?
# 5. Use `SetCriterion(num_points=256)` (uniform points in the matcher, importance sampling in the loss, as the
#    official code) and compare the step time and the result with every pixel.
