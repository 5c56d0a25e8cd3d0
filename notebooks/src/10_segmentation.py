# %% [markdown] slide
# # 10 · Segmentation, end to end
#
# Everything so far comes together: the frozen DINOv3 backbone (notebook 04, pretrained in 05), the adapter's
# Spatial Prior Module and interaction blocks (06–08), the pixel decoder and the FPN head (09) segment ShapesWorld
# scenes into six classes (background, circle, square, triangle, star, ring), trained on a CPU. We compare it with
# what the official repository actually trains, the **linear head**
# (`dinov3/eval/segmentation/models/heads/linear_head.py`: BatchNorm + 1×1 conv on the backbone's patch maps), and try
# **RGB-D early fusion**, a design of this series (not DINOv3's): depth as a fourth input channel.
#
# 1. **Data and the frozen backbone**: scenes, masks, depth; the backbone's four interaction layers computed *once*
#    — for the pretrained tiny backbone and, to see what pretraining contributes, for the same architecture at
#    random init;
# 2. **the linear head** (official) on those cached patch maps;
# 3. **the pipeline backbone → adapter → pixel decoder → FPN head** trained end to end (the backbone frozen,
#    everything else learning), with the cached layers standing in for the backbone — checked to give the same
#    output as the real one;
# 4. **RGB-D**: a 4-channel patch embedding initialised from the RGB one, and a 4-channel SPM;
# 5. results: per-class IoU, boundary F-score, predictions drawn over the images, a `RESULT` line, and an honest
#    look at the target (mIoU ≥ 0.80).
#
# Expected run time: about 120 s on 2 idle CPU cores (four short trainings of the adapter take most of it).

# %% slide hide-input
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("10")))

# %% skip
import json
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from dinolab import data, hub
from dinolab.adapter import DINOv3Adapter
from dinolab.metrics import boundary_fscore, miou
from dinolab.pixel_decoder import MSDeformAttnPixelDecoder
from dinolab.seg_heads import FPNSegHead, LinearHead
from dinolab.trace import trace
from dinolab.train import extract_features, fit
from dinolab.utils import count_params, get_device, seed_everything
from dinolab.weights import TINY_CHECKPOINT, tiny_checkpoint

viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
seed_everything(0)
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
SCALE = 1  # a reader with a GPU can raise this: more images and more training steps
print("device type:", DEVICE.type)

CKPT = tiny_checkpoint()  # data/dinov3_tiny_shapesworld.pth, or $DINOLAB_CKPT

# %% [markdown] slide
# ## 1. Data and the frozen backbone
#
# ShapesWorld gives, for every scene, the image, the semantic mask (0 = background, 1–5 = the shapes) and the metric
# depth. As in notebook 09 we render at 256 px and keep the 128 × 128 window where the objects stand (rows 112–239,
# columns 64–191): in a whole 128-px scene most objects are smaller than one 16-px patch. That is our choice, for a
# CPU; the official recipe trains on 512 × 512 crops of large photos.

# %% hide-input
N_TRAIN, N_VAL = 384 * SCALE, 128
CROP = (slice(112, 240), slice(64, 192))  # rows, columns of a 256-px render
NAMES, K = data.CLASS_NAMES, data.NUM_CLASSES


def shapesworld(split: str, n: int) -> dict:
    """n scenes rendered at 256 px, cropped to the 128 x 128 window around the floor."""
    b = data.ShapesWorld(split, size=256, num_samples=n).tensors()
    return {k: b[k][..., CROP[0], CROP[1]].contiguous() for k in ("image", "mask", "depth")}


train_set, val_set = shapesworld("train", N_TRAIN), shapesworld("val", N_VAL)
for k, v in train_set.items():
    print(f"train {k:5s} {tuple(v.shape)}  {v.dtype}")
freq = torch.bincount(train_set["mask"].flatten(), minlength=K) / train_set["mask"].numel()
print("pixel share per class:", ", ".join(f"{n} {f:.3f}" for n, f in zip(NAMES, freq.tolist())))
CLASS_WEIGHTS = freq ** -0.5 / (freq ** -0.5).mean()  # our choice (official: plain cross-entropy), see below
print("cross-entropy class weights:", ", ".join(f"{n} {w:.2f}" for n, w in zip(NAMES, CLASS_WEIGHTS.tolist())))


# %% subslide hide-input
def colour_mask(mask: torch.Tensor) -> torch.Tensor:
    """[H, W] class ids -> [H, W, 3] colours (dinolab.data.MASK_COLORS)."""
    return data.MASK_COLORS[mask]


fig, axes = plt.subplots(3, 5, figsize=(11.5, 6.9))
for c in range(5):
    axes[0, c].imshow(viz.to_numpy_image(val_set["image"][c]))
    axes[1, c].imshow(colour_mask(val_set["mask"][c]))
    axes[2, c].imshow(val_set["depth"][c], cmap="magma_r")
for r, label in enumerate(["image", "mask", "depth (m)"]):
    axes[r, 0].set_ylabel(label, fontsize=13)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
handles = [plt.Rectangle((0, 0), 1, 1, color=data.MASK_COLORS[i].tolist()) for i in range(K)]
fig.legend(handles, NAMES, loc="lower center", ncol=K, fontsize=12, frameon=False)
plt.tight_layout(rect=(0, 0.05, 1, 1))
plt.show()

# %% [markdown] subslide
# Background covers most pixels. With a few hundred training steps, plain cross-entropy (the official loss) first
# learns "everything is background" and barely starts on the shapes; we weight each class by 1/√(pixel share)
# (normalised to mean 1) — our choice, used for every model below so the comparison stays fair.
#
# The backbone is frozen, so its outputs for a given image never change: we compute them **once** and train every
# head on the cache. Which layers? The adapter reads four blocks (`interaction_indexes`). The official rule for
# picking them (`dinov3/eval/segmentation/models/__init__.py`, `FOUR_EVEN_INTERVALS`) is `i·(depth // 4) − 1`, which
# for our 6-block model gives `[0, 1, 2, 3]` and skips the last, best blocks; we take `[1, 2, 4, 5]` (our choice).
# `get_intermediate_layers(..., norm=True)` applies the final LayerNorm to each, as the official adapter and
# linear head both do.
#
# We cache two more backbones of the same architecture: one with **random weights** (no pretraining), the floor, and
# the **supervised control** (`data/dinov3_tiny_supervised.pth`: the same ViT trained *with* ShapesWorld's labels,
# `python -m dinolab.supervised`), the ceiling for features of this size. The linear head and the pipeline are
# trained on each, so the differences are what the self-supervised pretraining of notebook 05 contributes, and what
# it still misses.

# %% hide-input
LAYERS = [1, 2, 4, 5]
backbone = hub.dinov3_vittiny16(weights=CKPT).eval().to(DEVICE)
seed_everything(0)
backbone_random = hub.dinov3_vittiny16().eval().to(DEVICE)  # same architecture, random init
backbone_sup = hub.dinov3_vittiny16(weights=TINY_CHECKPOINT.parent / "dinov3_tiny_supervised.pth").eval().to(DEVICE)


def cache_features(bb: nn.Module) -> dict:
    """{"train", "val"}: per layer a (patch tokens [N, 64, D], cls [N, D]) pair, as get_intermediate_layers gives."""
    return {split: extract_features(bb, viz.normalize(s["image"]), layers=LAYERS, batch_size=64, reshape=False,
                                    return_class_token=True, device=DEVICE)
            for split, s in [("train", train_set), ("val", val_set)]}


t0 = time.perf_counter()
cache, cache_random, cache_sup = cache_features(backbone), cache_features(backbone_random), cache_features(backbone_sup)
feature_seconds = time.perf_counter() - t0
tokens, cls = cache["train"][0]
print(f"{len(LAYERS)} layers x (patch tokens {tuple(tokens.shape)}, cls {tuple(cls.shape)})  — 128/16 = 8x8 patches")

# %% skip
# NBVAL_IGNORE_OUTPUT
print(f"backbone features for {N_TRAIN + N_VAL} images, two backbones: {feature_seconds:.1f} s")

# %% [markdown] slide
# ## 2. The official linear head
#
# `LinearHead` (official): the patch maps of the chosen layers, resized to the first one's size and concatenated
# (4 × 192 = 768 channels), → Dropout2d(0.1) → BatchNorm → 1×1 conv to the 6 classes. Its logits live on the 8 × 8
# patch grid; training upsamples them bilinearly to the 128 × 128 mask (cross-entropy), and `predict` does the same.
# Optimiser: AdamW, weight decay 10⁻³, warm-up + cosine, as the official ADE20k linear config, but lr 10⁻² instead of
# 10⁻³: the official schedule has 40k iterations, ours 200 (our choice; at 10⁻³ the head is still far from converged).

# %% hide-input
def patch_maps(table: dict, split: str, idx=slice(None)) -> list[torch.Tensor]:
    """The cached layers as [B, D, 8, 8] maps (get_intermediate_layers(..., reshape=True))."""
    return [t[idx].transpose(1, 2).reshape(t[idx].shape[0], -1, 8, 8).to(DEVICE) for t, _ in table[split]]


LINEAR_STEPS = 200 * SCALE


def train_linear(table: dict):
    """The official linear head on cached patch maps -> (head, losses, validation predictions [N, 128, 128])."""
    seed_everything(0)
    head = LinearHead([backbone.embed_dim] * len(LAYERS), K).to(DEVICE)
    g = torch.Generator().manual_seed(0)

    def loss_fn(model, idx):
        logits = model(patch_maps(table, "train", idx))  # [B, 6, 8, 8]
        logits = F.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, train_set["mask"][idx].to(DEVICE), weight=CLASS_WEIGHTS.to(DEVICE))

    hist = fit(head, None, loss_fn, lambda step: torch.randint(0, N_TRAIN, (32,), generator=g),
               steps=LINEAR_STEPS, lr=1e-2, weight_decay=1e-3, warmup=15, progress=False)
    head.eval()
    with torch.no_grad():
        pred = head.predict(patch_maps(table, "val"), rescale_to=(128, 128)).argmax(1).cpu()
    return head, hist, pred


t0 = time.perf_counter()
linear, hist_linear, pred_linear = train_linear(cache)
linear_random, hist_linear_random, pred_linear_random = train_linear(cache_random)
linear_sup, hist_linear_sup, pred_linear_sup = train_linear(cache_sup)
linear_seconds = time.perf_counter() - t0
print(f"linear head: {count_params(linear):,} parameters "
      f"(BatchNorm {sum(p.numel() for p in linear.batchnorm_layer.parameters()):,} + 1x1 conv {count_params(linear.conv):,})")
with torch.no_grad():
    print(f"logits {tuple(linear(patch_maps(cache, 'val', slice(0, 2))).shape)} -> predict(rescale_to=128) "
          f"{tuple(pred_linear.shape)}")

# %% [markdown] slide
# ## 3. Backbone → adapter → pixel decoder → FPN head, end to end
#
# The model: image → **frozen backbone** (4 layers) and **SPM** (conv stem) → 4 **interaction
# blocks** (the SPM tokens read the ViT with deformable attention) → `{f1, f2, f3, f4}`, D = 192 channels at strides
# 4, 8, 16, 32 → **pixel decoder** (`MSDeformAttnPixelDecoder`, notebook 09: a deformable-attention encoder over f4,
# f3, f2 and one FPN step onto f1) → `mask_features` at stride 4 and `multi_scale_features` at strides 32, 16, 8
# (a list, **coarse to fine**) → **FPN head** on four levels, **finest first**: `[mask_features, ms[2], ms[1], ms[0]]`
# (strides 4, 8, 16, 32) → logits at the image size. Everything except the backbone trains: SPM, interactions, `up`,
# the adapter's BatchNorms, the pixel decoder and the head.

# %% [markdown] notes
# Our settings, all chosen to fit a CPU minute (official values in brackets): SPM width `conv_inplane=16` [64]; no
# extra extractors in the last block [2]; drop path 0 [0.3]; 6 deformable heads in the adapter [16, which must divide
# D/2 = 96]; no gradient checkpointing; pixel decoder `conv_dim = mask_dim = 64` [2048], 4 heads [16], FFN 128
# [4096], 1 encoder layer [6] (notebook 09 trains one of width 96); FPN width 64; AdamW lr 3·10⁻³, cosine, batch 16,
# 64 steps (the pixel decoder makes each step dearer, so fewer steps than the 80 an FPN head alone would get in the
# same time).
#
# What is official and what is not: the adapter and the pixel decoder are DINOv3's modules (parameter names included).
# DINOv3's own segmentation model (Mask2Former, `dinov3/eval/segmentation/models/heads/mask2former_head.py`) puts a
# query-based transformer decoder after the pixel decoder (notebook 14 builds it); the FPN head is this series' lighter
# design instead. In notebook 09 the FPN decoder reads only the three `multi_scale_features` and predicts at
# stride 8; here we also give it `mask_features` as its finest level, so it predicts at stride 4 (our choice).
#
# **Training on cached features.** The official adapter calls `backbone.get_intermediate_layers(x, n=..., return_class_token=True)`
# under `no_grad` — nothing flows back into the backbone. So a stand-in module that *returns the cached outputs* for
# the images of the batch is, for training, the same model at a fraction of the cost. We check that claim below.

# %% subslide hide-input
class CachedBackbone(nn.Module):
    """Stands in for the frozen ViT inside DINOv3Adapter: get_intermediate_layers returns precomputed outputs.

    Set ``.rows`` (indices into the cache) before each forward; the images passed in are then ignored here
    (the adapter's SPM still reads them)."""

    def __init__(self, backbone: nn.Module, table):
        super().__init__()
        self.embed_dim, self.patch_size = backbone.embed_dim, backbone.patch_size
        self.table, self.rows = table, None

    def get_intermediate_layers(self, x, n, return_class_token=True, **kwargs):
        assert self.rows is not None and len(self.rows) == x.shape[0], "set .rows to the batch's cache indices"
        return tuple((p[self.rows].to(x.device), c[self.rows].to(x.device)) for p, c in self.table)


class Segmenter(nn.Module):
    """adapter -> pixel decoder -> FPN head -> logits at the input size."""

    def __init__(self, adapter: DINOv3Adapter, pixel_decoder: MSDeformAttnPixelDecoder, head: FPNSegHead):
        super().__init__()
        self.adapter, self.pixel_decoder, self.head = adapter, pixel_decoder, head

    @staticmethod
    def head_levels(mask_features, multi_scale) -> list[torch.Tensor]:
        """The FPN head's 4 levels, finest first: mask_features (stride 4), then the decoder's maps at strides 8,
        16, 32 (multi_scale_features come coarse to fine: [1/32, 1/16, 1/8], hence the reversal)."""
        return [mask_features, *multi_scale[::-1]]

    def forward(self, x):
        mask_features, multi_scale = self.pixel_decoder(self.adapter(x))
        return self.head(self.head_levels(mask_features, multi_scale), output_size=x.shape[-2:])


PD_DIM, PD_HEADS = 64, 4  # pixel decoder width (conv_dim = mask_dim) and deformable heads (ours)


def build_segmenter(bb: nn.Module) -> Segmenter:
    seed_everything(0)
    adapter = DINOv3Adapter(bb, interaction_indexes=LAYERS, conv_inplane=16, deform_num_heads=6, drop_path_rate=0.0,
                            with_cp=False, use_extra_extractor=False)
    pixel_decoder = MSDeformAttnPixelDecoder(bb.embed_dim, conv_dim=PD_DIM, mask_dim=PD_DIM, num_heads=PD_HEADS,
                                             dim_feedforward=2 * PD_DIM, num_layers=1, num_points=4)
    return Segmenter(adapter, pixel_decoder, FPNSegHead(PD_DIM, 64, K)).to(DEVICE)


model_rgb = build_segmenter(backbone)
n_train = count_params(model_rgb, trainable_only=True)
print(f"trainable: {n_train:,} parameters (adapter {count_params(model_rgb.adapter, True):,}, "
      f"pixel decoder {count_params(model_rgb.pixel_decoder):,}, FPN head {count_params(model_rgb.head):,}); "
      f"frozen backbone {count_params(backbone):,}")

# one batch through the three stages (real backbone), shapes at each
x_check = viz.normalize(val_set["image"][:4]).to(DEVICE)
model_rgb.eval()
with torch.no_grad():
    pyramid = model_rgb.adapter(x_check)
    mask_features, multi_scale = model_rgb.pixel_decoder(pyramid)
    levels = Segmenter.head_levels(mask_features, multi_scale)
    logits = model_rgb.head(levels, output_size=x_check.shape[-2:])
print(f"input                         {tuple(x_check.shape)}")
for k, f in pyramid.items():
    print(f"adapter f{k}                    {tuple(f.shape)}  stride {128 // f.shape[-1]}")
print(f"pixel decoder mask_features   {tuple(mask_features.shape)}  stride {128 // mask_features.shape[-1]}")
for i, f in enumerate(multi_scale):
    print(f"pixel decoder multi_scale[{i}]  {tuple(f.shape)}  stride {128 // f.shape[-1]}")
print("FPN head levels (finest first): strides", [128 // f.shape[-1] for f in levels])
print(f"FPN head logits               {tuple(logits.shape)}")
assert [128 // f.shape[-1] for f in levels] == [4, 8, 16, 32] and logits.shape == (4, K, 128, 128)

# the stand-in gives the same output as the real backbone
with torch.no_grad():
    out_real = model_rgb(x_check)
    model_rgb.adapter.backbone = CachedBackbone(backbone, cache["val"])
    model_rgb.adapter.backbone.rows = torch.arange(4)
    out_cached = model_rgb(x_check)
torch.testing.assert_close(out_cached, out_real, atol=1e-4, rtol=1e-4)
print(f"logits {tuple(out_real.shape)}: cached backbone == real backbone (within 1e-4)")


# %% [markdown] notes
# The training loop: each step picks 16 scenes, points the stand-in at their cached rows, and runs the adapter, the
# pixel decoder and the head on the images. The same function trains the random-init comparison below and the RGB-D
# model of section 4.

# %% skip
STEPS, BATCH = 64 * SCALE, 16


def train_segmenter(model: Segmenter, inputs: dict[str, torch.Tensor], table: dict) -> list[float]:
    """inputs: {"train": [N, C, H, W], "val": ...} network inputs (normalised RGB, or RGB + depth);
    table: the cached backbone outputs for the same images."""
    g = torch.Generator().manual_seed(0)  # the same batches for every model
    model.adapter.backbone = CachedBackbone(backbone, table["train"])

    def loss_fn(m, idx):
        m.adapter.backbone.rows = idx
        return F.cross_entropy(m(inputs["train"][idx].to(DEVICE)), train_set["mask"][idx].to(DEVICE),
                               weight=CLASS_WEIGHTS.to(DEVICE))

    return fit(model, None, loss_fn, lambda step: torch.randint(0, N_TRAIN, (BATCH,), generator=g),
               steps=STEPS, lr=3e-3, weight_decay=1e-4, warmup=10, progress=False)


@torch.no_grad()
def predict(model: Segmenter, x: torch.Tensor, table: dict, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    model.adapter.backbone = CachedBackbone(backbone, table["val"])
    preds = []
    for i in range(0, len(x), batch_size):
        model.adapter.backbone.rows = torch.arange(i, min(i + batch_size, len(x)))
        preds.append(model(x[i:i + batch_size].to(DEVICE)).argmax(1).cpu())
    return torch.cat(preds)


def train_and_predict(model: Segmenter, inputs: dict, table: dict) -> tuple[list, float, torch.Tensor]:
    """Train on `table`'s cached layers, then predict the validation scenes: (loss history, seconds, predictions)."""
    t0 = time.perf_counter()
    hist = train_segmenter(model, inputs, table)
    seconds = time.perf_counter() - t0
    return hist, seconds, predict(model, inputs["val"], table)


rgb_inputs = {"train": viz.normalize(train_set["image"]), "val": viz.normalize(val_set["image"])}
hist_rgb, rgb_seconds, pred_rgb = train_and_predict(model_rgb, rgb_inputs, cache)
print(f"trained {STEPS} steps x {BATCH} scenes; predictions {tuple(pred_rgb.shape)}")

# %% [markdown]
# **What does pretraining contribute?** The same pipeline — same adapter init, same batches, same steps — on the
# random-init backbone's cached layers, and on the supervised control's.

# %% hide-input
model_random = build_segmenter(backbone_random)
hist_random, random_seconds, pred_random = train_and_predict(model_random, rgb_inputs, cache_random)
print(f"random-init backbone: trained {STEPS} steps x {BATCH} scenes; predictions {tuple(pred_random.shape)}")
model_sup = build_segmenter(backbone_sup)
hist_sup, sup_seconds, pred_sup = train_and_predict(model_sup, rgb_inputs, cache_sup)
print(f"supervised control: trained {STEPS} steps x {BATCH} scenes; predictions {tuple(pred_sup.shape)}")

# %% [markdown] slide
# ## 4. RGB-D: depth as a fourth input channel
#
# Our pipeline fuses RGB and depth **early**: the network sees a 4-channel image. For a ViT that means a
# 4-channel **patch embedding**: `Conv2d(4, D, 16, stride=16)`, whose first three input channels take the pretrained
# RGB weights. What should the fourth (depth) channel's weights start as?
#
# * **mean of the RGB weights**: the usual choice when the whole network is fine-tuned (the depth map then enters
#   like one more grey-level image, at the scale the next layers expect, and training adapts it);
# * **zeros**: the pretrained network is unchanged at the start; depth has to be learned in.
#
# Here the backbone is **frozen and runs under `no_grad`** inside the official adapter: its patch embedding never
# trains, whatever we choose. A frozen mean-initialised channel would just inject the depth map into a network that
# never saw one (we measure how much it moves the features), and it could not learn to use it. So we **zero** the
# depth weights (the ViT's features stay exactly the RGB ones — checked below, which also lets us reuse the cache) and
# let depth in where something trains: the adapter's **SPM** takes all 4 channels (it reads `in_chans` from the
# backbone's patch embedding). The other option — making the new patch-embedding weights trainable — needs the
# backbone forward with gradients (through all 6 blocks, for the first layer), which the official adapter does not do.
#
# The depth channel: log-depth standardised with the training set's mean and std (depth spans about 1–10 m; the log
# spreads the near range, where the objects are).

# %% subslide hide-input
log_depth = train_set["depth"].log()
DEPTH_MEAN, DEPTH_STD = float(log_depth.mean()), float(log_depth.std())


def rgbd(split_set: dict) -> torch.Tensor:
    depth = ((split_set["depth"].log() - DEPTH_MEAN) / DEPTH_STD)[:, None]
    return torch.cat([viz.normalize(split_set["image"]), depth], 1)


rgbd_inputs = {"train": rgbd(train_set), "val": rgbd(val_set)}
print(f"RGB-D input {tuple(rgbd_inputs['train'].shape)}; log-depth mean {DEPTH_MEAN:.3f}, std {DEPTH_STD:.3f}")

sd = backbone.state_dict()
w_rgb = sd["patch_embed.proj.weight"]  # [D, 3, 16, 16]
backbone_rgbd = {}
for init, w_depth in [("zeros", torch.zeros_like(w_rgb[:, :1])), ("mean", w_rgb.mean(1, keepdim=True))]:
    bb = hub.dinov3_vittiny16(in_chans=4).eval().to(DEVICE)
    bb.load_state_dict({**sd, "patch_embed.proj.weight": torch.cat([w_rgb, w_depth], 1)}, strict=True)
    backbone_rgbd[init] = bb
print("patch_embed.proj.weight:", tuple(w_rgb.shape), "->", tuple(backbone_rgbd["zeros"].patch_embed.proj.weight.shape))

with torch.no_grad():
    x4 = rgbd_inputs["val"][:16].to(DEVICE)
    ref = backbone.get_intermediate_layers(x4[:, :3], n=LAYERS)[-1]
    f_zeros = backbone_rgbd["zeros"].get_intermediate_layers(x4, n=LAYERS)[-1]
    f_mean = backbone_rgbd["mean"].get_intermediate_layers(x4, n=LAYERS)[-1]
torch.testing.assert_close(f_zeros, ref)
change = float((f_mean - ref).norm() / ref.norm())
print(f"zeros init: last-layer features identical to RGB  -> the RGB cache serves the RGB-D model too")
print(f"mean init (frozen): last-layer features move by {change:.0%} of their norm — depth seen as extra brightness")
assert change > 0.05

# %% hide-input
model_rgbd = build_segmenter(backbone_rgbd["zeros"])
print("SPM stem conv:", tuple(model_rgbd.adapter.spm.stem[0].weight.shape), "(out, in=4, 3, 3);",
      f"trainable {count_params(model_rgbd, trainable_only=True):,} parameters "
      f"(+{count_params(model_rgbd, True) - n_train} for the depth channel)")
# zero-init depth weights: the RGB cache is exact
hist_rgbd, rgbd_seconds, pred_rgbd = train_and_predict(model_rgbd, rgbd_inputs, cache)

# %% [markdown] slide
# ## 5. Results
#
# Seven models on the same 128 validation scenes — the linear head and the pipeline, each on the pretrained, the
# random-init and the supervised backbone, and the RGB-D pipeline: the mean IoU over the six classes (background included), the IoU of
# each class, the boundary F-score of the class maps (2-px tolerance, notebook 09) and the pixel accuracy.

# %% skip
target = val_set["mask"]
MODELS = {  # name -> (validation predictions, trainable parameters)
    "linear head (official)": (pred_linear, count_params(linear)),
    "linear head, random-init backbone": (pred_linear_random, count_params(linear_random)),
    "pipeline (adapter + pixel decoder + FPN)": (pred_rgb, n_train),
    "pipeline, random-init backbone": (pred_random, count_params(model_random, True)),
    "pipeline, RGB-D": (pred_rgbd, count_params(model_rgbd, True)),
    "linear head, supervised control": (pred_linear_sup, count_params(linear_sup)),
    "pipeline, supervised control": (pred_sup, count_params(model_sup, True)),
}
results = {}
for name, (pred, n_params) in MODELS.items():
    m, iou = miou(pred, target, K, per_class=True)
    results[name] = dict(miou=m, iou=iou, bf=boundary_fscore(pred, target, tolerance_px=2),
                         acc=float((pred == target).float().mean()), params=n_params)
    print(f"{name:40s} {n_params:>9,d} trainable parameters")
r_lin, r_lin_random, r_rgb, r_random, r_rgbd, r_lin_sup, r_sup = results.values()

# %% hide-input
# NBVAL_IGNORE_OUTPUT
rows = ["| model | mIoU | " + " | ".join(f"IoU {n}" for n in NAMES) + " | boundary F | pixel acc. |",
        "|---|---|" + "---|" * K + "---|---|"]
for name, r in results.items():
    rows.append(f"| {name} | **{r['miou']:.3f}** | " + " | ".join(f"{v:.2f}" for v in r["iou"].tolist())
                + f" | {r['bf']:.3f} | {r['acc']:.3f} |")
display(Markdown("\n".join(rows)))
print(f"training time: linear heads {linear_seconds:.1f} s (both), pipeline {rgb_seconds:.1f} s, "
      f"random-init {random_seconds:.1f} s, RGB-D {rgbd_seconds:.1f} s, supervised {sup_seconds:.1f} s "
      f"({STEPS} steps each)")

# %% hide-input
assert r_lin["miou"] > 0.12 and r_lin_random["miou"] > 0.12, (r_lin["miou"], r_lin_random["miou"])
assert min(r_rgb["miou"], r_random["miou"], r_rgbd["miou"]) > 0.2, (r_rgb["miou"], r_random["miou"], r_rgbd["miou"])
assert r_lin["miou"] > r_lin_random["miou"] + 0.03  # the linear head reads more from pretrained features ...
assert r_rgb["bf"] > r_lin["bf"]  # ... and the pipeline draws better outlines (stride 4 instead of 16)
assert abs(r_rgbd["miou"] - r_rgb["miou"]) < 0.08  # depth through the SPM: no large change in so few steps
print("linear head: pretrained > random-init backbone (mIoU); pipeline > linear head in boundary F; RGB-D ≈ RGB")

# %% [markdown] slide
# ### 5.1 The pipeline trained longer, offline
#
# Sixty-four steps is what fits in this notebook. `python -m dinolab.finetune segmentation --head fpn --backbone
# ssl|supervised|random` trains the same pipeline (adapter + pixel decoder + FPN head, the same recipe) for 3,000 steps
# on 4,096 scenes and writes its trained part in fp16 with a sidecar (recipe, held-out curve, time, sha256) to `data/`;
# `dinolab.finetune.load` rebuilds the model and checks the sha256. Scored here on the same 128 validation scenes:

# %% hide-input
from dinolab import finetune

long_seg = {}
for bb, label in (("random", "random-init"), ("ssl", "pretrained"), ("supervised", "supervised control")):
    path = TINY_CHECKPOINT.with_name(f"seg_fpn_{bb}.pth")
    meta = json.loads(path.with_suffix(".json").read_text())
    pred = finetune.predict_in_batches(finetune.load(path, device=DEVICE), viz.normalize(val_set["image"]), 32).argmax(1)
    m, iou = miou(pred, target, K, per_class=True)
    long_seg[label] = dict(miou=m, iou=iou, bf=boundary_fscore(pred, target, tolerance_px=2), pred=pred, meta=meta)
    c = meta["config"]
    print(f"data/seg_fpn_{bb}.pth: {c['steps']:,} steps × {c['batch_size']} on {c['n_train']:,} scenes")

# %% subslide hide-input
# NBVAL_IGNORE_OUTPUT
live = {"random-init": r_random, "pretrained": r_rgb, "supervised control": r_sup}
shipped_steps = long_seg["pretrained"]["meta"]["config"]["steps"]
rows = [f"| pipeline, backbone | mIoU, {STEPS} steps (above) | mIoU, {shipped_steps:,} steps (shipped) | " + " | ".join(f"IoU {n}" for n in NAMES)
        + " | boundary F |", "|---|---|---|" + "---|" * K + "---|"]
for label, r in long_seg.items():
    rows.append(f"| {label} | {live[label]['miou']:.3f} | **{r['miou']:.3f}** | "
                + " | ".join(f"{v:.2f}" for v in r["iou"].tolist()) + f" | {r['bf']:.3f} |")
display(Markdown("\n".join(rows)))

# %% subslide hide-input
fig, ax = plt.subplots(figsize=(12.8, 4.2))
for j, (label, r) in enumerate(long_seg.items()):
    ev = r["meta"]["curves"]
    ax.plot([e["step"] for e in ev], [e["miou"] for e in ev], "o-", color=f"C{j}", label=f"{label} backbone")
ax.axhline(0.80, color="k", ls=":", lw=1, label="mIoU 0.80")
ax.set_xlabel("training step (batches of 16 scenes)")
ax.set_ylabel("held-out mIoU")
ax.set_ylim(0, 1)
ax.set_title("the pipeline trained offline: held-out mIoU during training")
ax.legend(fontsize=11, ncol=2)
plt.tight_layout()
plt.show()

# %% subslide hide-input
ssl_l, rand_l, sup_l = (long_seg[k] for k in ("pretrained", "random-init", "supervised control"))
spread = {k: max(e["miou"] for e in r["meta"]["curves"][-4:]) - min(e["miou"] for e in r["meta"]["curves"][-4:])
          for k, r in long_seg.items()}  # how much each curve wobbles over its last four evaluations
wobble, gain = max(spread.values()), ssl_l["miou"] - rand_l["miou"]
# what the text of this section and of "The target, honestly" says
assert ssl_l["miou"] >= 0.80 and rand_l["miou"] >= 0.80 and abs(gain) <= wobble, (ssl_l["miou"], rand_l["miou"], wobble)
last = ssl_l["meta"]["curves"][-4:]
display(Markdown(
    f"Trained {ssl_l['meta']['config']['steps'] / STEPS:.0f}× longer on {ssl_l['meta']['config']['n_train'] / N_TRAIN:.0f}× "
    f"more scenes, the pipeline on the self-supervised backbone goes from {r_rgb['miou']:.3f} to {ssl_l['miou']:.3f} "
    f"mIoU (goal 0.80: **{'reached' if ssl_l['miou'] >= 0.80 else 'not reached'}**, by {ssl_l['miou'] - 0.80:+.3f}). "
    f"Its last four evaluations (steps "
    f"{last[0]['step']:,}–{last[-1]['step']:,}) lie within {spread['pretrained']:.3f} of each other; the widest such "
    f"spread among the three curves is {wobble:.3f}"
    + (", larger than the margin by which the goal is met: one more evaluation could fall either side of it. "
       if ssl_l["miou"] - 0.80 < spread["pretrained"] else ". ")
    + f"On random-init features the same training reaches "
    f"{rand_l['miou']:.3f}, on the supervised control's {sup_l['miou']:.3f}. "
    + (f"So at this budget the pretrained features are worth {gain:+.3f} mIoU over random init, and labels would add "
       f"{sup_l['miou'] - ssl_l['miou']:+.3f} more."
       if gain > wobble else
       f"The differences between the backbones ({gain:+.3f} for the self-supervised one over random init, "
       f"{sup_l['miou'] - rand_l['miou']:+.3f} for the supervised control) are no larger than that wobble: trained "
       "this long, the pipeline learns the shapes from the pixels, through its own trainable parts (the SPM's "
       "convolutions, the extractors, the pixel decoder, the FPN head), and the frozen features buy nothing "
       "measurable. The linear head, which has nothing but the features, is where they show (section 4).")))

# %% skip
# NBVAL_IGNORE_OUTPUT
print("RESULT " + json.dumps({"miou": round(r_rgb["miou"], 4), "miou_linear": round(r_lin["miou"], 4),
                              "miou_rgbd": round(r_rgbd["miou"], 4), "miou_random_init": round(r_random["miou"], 4),
                              "miou_linear_random_init": round(r_lin_random["miou"], 4),
                              "miou_supervised": round(r_sup["miou"], 4),
                              "miou_linear_supervised": round(r_lin_sup["miou"], 4),
                              "boundary_f": round(r_rgb["bf"], 4), "boundary_f_linear": round(r_lin["bf"], 4),
                              "boundary_f_rgbd": round(r_rgbd["bf"], 4), "steps": STEPS, "train_images": N_TRAIN,
                              "val_images": N_VAL, "miou_shipped": round(long_seg["pretrained"]["miou"], 4),
                              "miou_shipped_random_init": round(long_seg["random-init"]["miou"], 4),
                              "miou_shipped_supervised": round(long_seg["supervised control"]["miou"], 4),
                              "boundary_f_shipped": round(long_seg["pretrained"]["bf"], 4),
                              "steps_shipped": long_seg["pretrained"]["meta"]["config"]["steps"]}))

# %% [markdown] slide
# Predictions on validation scenes: class colours as in section 1, over the image in grey.

# %% hide-input
def overlay(ax, img, mask, title=""):
    ax.imshow(viz.to_numpy_image(img).mean(-1), cmap="gray", vmin=0, vmax=1)  # grey, so the class colours stand out
    colours = torch.cat([colour_mask(mask), (mask > 0).float()[..., None] * 0.8], -1)  # background transparent
    ax.imshow(colours.numpy())
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


show = [0, 1, 2]
columns = [("ground truth", target), ("linear head", pred_linear), ("pipeline", pred_rgb),
           ("pipeline,\nrandom-init backbone", pred_random), ("pipeline, RGB-D", pred_rgbd)]
fig, axes = plt.subplots(len(show), len(columns) + 1, figsize=(10.5, 5.3))
for r, i in enumerate(show):
    axes[r, 0].imshow(viz.to_numpy_image(val_set["image"][i]))
    axes[r, 0].set_xticks([])
    axes[r, 0].set_yticks([])
    for c, (title, masks) in enumerate(columns):
        overlay(axes[r, c + 1], val_set["image"][i], masks[i], title if r == 0 else "")
axes[0, 0].set_title("image", fontsize=11)
fig.legend(handles[1:], NAMES[1:], loc="lower center", ncol=K - 1, fontsize=12, frameon=False)
plt.tight_layout(rect=(0, 0.04, 1, 1))
plt.show()

# %% [markdown] subslide
# Read the errors: the linear head works on the 8 × 8 patch grid, so its objects are blocks of 16-px patches; the
# pipeline models draw clean outlines (stride 4), but often give them the wrong class — with or without
# pretraining. Finding objects is learned from pixels; naming their shape is what the features should carry.

# %% hide-input
fig, ax = plt.subplots(figsize=(12.8, 4.8))
for name, h in [("pipeline", hist_rgb), ("pipeline, random-init backbone", hist_random),
                ("pipeline, RGB-D", hist_rgbd), ("linear head", hist_linear)]:
    ax.plot(torch.tensor(h[:STEPS]).unfold(0, 10, 1).mean(1), label=name)  # running mean over 10 steps
ax.set_xlabel("step")
ax.set_ylabel("weighted cross-entropy\n(running mean of 10)")
ax.set_title(f"first {STEPS} steps (the linear heads train for {LINEAR_STEPS})", fontsize=13)
ax.legend(fontsize=12)
plt.tight_layout()
plt.show()

# %% [markdown] slide
# ### The target, honestly
#
# The target set for this notebook: **mIoU ≥ 0.80** for backbone → adapter → pixel decoder → FPN head on the
# self-supervised backbone, and above the official linear head. The 64-step run here is far from it (and ties the
# linear head in mIoU, winning on boundaries). The pipeline trained offline (section 5.1) reaches it, and so does
# the same pipeline on random-init features: met this way, the goal says more about the pipeline than about the
# features. The numbers:

# %% hide-input
# NBVAL_IGNORE_OUTPUT
display(Markdown("\n".join([
    "| | goal | measured |", "|---|---|---|",
    f"| mIoU, backbone → adapter → pixel decoder → FPN head | ≥ 0.80 | {r_rgb['miou']:.3f} ({STEPS} steps); "
    f"{long_seg['pretrained']['miou']:.3f} (shipped, {long_seg['pretrained']['meta']['config']['steps']:,} steps) |",
    f"| the same, shipped, on random-init / supervised features | — | {long_seg['random-init']['miou']:.3f} / "
    f"{long_seg['supervised control']['miou']:.3f} |",
    f"| above the linear head | yes | {r_rgb['miou']:.3f} vs {r_lin['miou']:.3f}: "
    f"{'yes' if r_rgb['miou'] > r_lin['miou'] else 'no'} |",
    f"| what pretraining adds (pretrained − random init) | — | pipeline {r_rgb['miou'] - r_random['miou']:+.3f}, "
    f"linear head {r_lin['miou'] - r_lin_random['miou']:+.3f} |",
    f"| what labels would add (supervised control − pretrained) | — | pipeline {r_sup['miou'] - r_rgb['miou']:+.3f}, "
    f"linear head {r_lin_sup['miou'] - r_lin['miou']:+.3f} |",
    f"| RGB-D − RGB | — | {r_rgbd['miou'] - r_rgb['miou']:+.3f} |",
    f"| best IoU among the five shape classes (pipeline) | — | {r_rgb['iou'][1:].max():.2f} |"])))

# %% [markdown] notes
# **Why the live run is far from it, and why the long runs do not need the features.**
#
# * **The frozen features separate the shapes only a little.** The tiny checkpoint was pretrained for two hours on
#   2 CPU cores, on single objects; notebook 05 measures its k-NN there at 0.34 against 0.23 at random init. The
#   linear head is the honest test of the features, and it shows the same here: 0.254 mIoU on the pretrained backbone
#   against 0.177 on random-init features, with far better outlines (boundary F 0.54 against 0.23). The pipeline does
#   not use that yet: after 64 steps it scores about the same on both backbones (0.254 and 0.245).
# * **Features that carry the class are what is missing.** On the supervised control's features (the same ViT
#   trained with labels) the same linear head reaches 0.390 and the pipeline 0.409. The self-supervised checkpoint
#   covers about a third of the linear head's gap between random init and that control.
# * **So the pipeline's score is what its trainable parts learn from pixels** (the SPM's conv stem, the
#   interactions, the pixel decoder, the FPN head) in 64 steps × 16 scenes. That is enough for object-vs-background
#   and for clean boundaries (high background IoU and boundary F), not for telling a circle from a ring or a square
#   from a triangle: the shape-class IoUs stay low, and the loss curves are still falling slowly when training stops.
# * **Given about 47× the steps on about 10× the scenes (section 5.1), those parts learn the shapes from the pixels
#   alone**: the pipeline on random-init features scores as well as on pretrained ones. ShapesWorld's classes are
#   simple outlines on a flat floor, which convolutions can learn from a few thousand scenes.
# * **Resolution.** A 128-px crop is 8 × 8 patches; an object covers a few patches, so the ViT sees its outline at a
#   resolution of 16 px.
#
# **What would make the features count** (none of which fits 2 CPU cores): a backbone with real features — a longer
# pretraining (`python -m dinolab.pretrain` for hours, on a GPU) or real DINOv3 weights (ViT-S/16 or larger, loaded as
# in notebook 04); larger crops (256 px = 16 × 16 patches); and real images, where a few thousand scenes are too few
# to learn the classes from pixels; with weak features, fine-tuning the backbone or LoRA on q and v (notebook 13). The
# check of success is the linear head: when it rises, the features have become good, and the adapter, pixel decoder
# and FPN head then add their boundary quality on top.

# %% [markdown] slide
# ## 6. Summary: what to remember
#
# * The end-to-end path: image [B, 3, 128, 128] → frozen ViT, 4 layers of [B, 64, 192] tokens → adapter (SPM +
#   interactions) → pyramid f1..f4 of 192 channels at strides 4, 8, 16, 32 → pixel decoder → `mask_features`
#   [B, 64, 32, 32] and `multi_scale_features` at strides 32, 16, 8 (coarse to fine) → FPN head on
#   `[mask_features, ms[2], ms[1], ms[0]]` (finest first) → logits [B, 6, 128, 128].
# * The official **linear head** (BatchNorm + 1×1 conv on the patch maps) measures the backbone's features; the
#   **pipeline** also learns from pixels through the SPM and predicts at stride 4 — better boundaries always, and,
#   trained long enough on simple shapes, the classes too, whatever the features. Compare with a random-init backbone
#   to know what the features add.
# * A frozen backbone run under `no_grad` can be **cached**: training then costs only the trainable parts, and a
#   stand-in that returns the cached layers gives exactly the same model (checked).
# * **RGB-D early fusion**: a 4-channel patch embedding whose first three input channels are the RGB weights. With a
#   frozen backbone, zero-initialised depth weights keep its features exact, and depth enters through the trainable
#   SPM; a mean-initialised depth channel changes the frozen features with no way to learn from them.
# * Settings that are ours, for a CPU: 2× zoomed 128-px crops, interaction layers `[1, 2, 4, 5]`, class-weighted
#   cross-entropy, small widths (SPM 16, pixel decoder 64 with 1 encoder layer, FPN 64), 64 steps; the FPN head
#   after the pixel decoder is this series' design (DINOv3 puts Mask2Former's query decoder there). The adapter's and
#   the pixel decoder's structure and parameter names are the official ones.

# %% [markdown] skip
# The shape table of the trained model on one 128 × 128 scene, with the real backbone put back in place of the cache
# (it is called through `get_intermediate_layers`, not `forward`, so it has no row of its own):

# %% skip
model_rgb.adapter.backbone = backbone
model_rgb.eval()
print(trace(model_rgb, rgb_inputs["val"][:1].to(DEVICE),
            names=["adapter", "adapter.spm", *[f"adapter.interactions.{i}" for i in range(4)], "adapter.up",
                   "pixel_decoder", "pixel_decoder.encoder",
                   "pixel_decoder.lateral_convs.0", "pixel_decoder.output_convs.0", "pixel_decoder.mask_feature",
                   "head", *[f"head.lateral_convs.{i}" for i in range(4)], "head.cls_seg"]))

# %% [markdown] skip
# ### Exercises
#
# 1. With a GPU, set `SCALE = 8` (more scenes, steps and linear-head steps). Which classes improve first, and does
#    the pretrained backbone start to beat the random-init one?
# 2. Train with plain cross-entropy (`weight=None`, as the official recipe). How do the per-class IoUs change?
# 3. Remove the pixel decoder: put `FPNSegHead(192, 64, K)` straight on the adapter's pyramid `{f1, ..., f4}` and
#    retrain for the same steps (on the pretrained and the random-init backbone). What does the decoder add to the
#    mIoU and the boundary F-score, and what does it cost per step? Then spend the saved time on more steps.
# 4. Build the RGB-D model from `backbone_rgbd["mean"]` instead (recompute its cache first: its features are no
#    longer the RGB ones). Does injecting depth into the frozen ViT help or hurt?
# 5. Set `add_vit_feature=False` in `DINOv3Adapter` (the pyramid then comes from the SPM and interactions only) and
#    retrain. How much of the mIoU did the ViT's own maps contribute?
