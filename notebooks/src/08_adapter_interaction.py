# %% [markdown] slide
# # 08 · The adapter's interaction blocks: how the SPM reads a frozen ViT
#
# Notebook 06 built the Spatial Prior Module (SPM): a conv stem that gives local detail at strides 4/8/16/32.
# Notebook 07 built multi-scale deformable attention. This notebook puts them together around a **frozen** DINOv3
# ViT: DINOv3's dense-prediction adapter (official `dinov3/eval/segmentation/models/backbone/dinov3_adapter.py`,
# `DINOv3_Adapter`) reads the ViT at four blocks and lets the SPM tokens **query** those maps with deformable
# attention — the **extractor**. The original ViT-Adapter (Chen et al., ICLR 2023) also has an **injector** that
# writes SPM information back into the ViT between its blocks; DINOv3's adapter has none. (The blog post says
# "InteractionBlockWithCls" without saying which: **the official segmentation adapter has no injector**.)

# %% [markdown] notes
# You will:
#
# 1. see the **information flow** of both designs (diagram) and why DINOv3 drops the injector;
# 2. inspect `deform_inputs` — reference points, spatial shapes, level start indices — with shapes;
# 3. **rebuild one extractor, one injector and the whole adapter forward** from their parts, printing every shape,
#    and check them against `dinolab.adapter` (`assert_close`);
# 4. generate the blog post's **tensor-flow table** for ViT-L at 512 × 512, batch 4, on the `meta` device, and count
#    parameters with and without injector;
# 5. run it for real with the **tiny pretrained backbone** on ShapesWorld: f1..f4, their PCA maps, a check that the
#    extractor-only adapter leaves the backbone's outputs bit-identical while the injector changes the ViT's token
#    stream, where gradients flow, and what each design costs; then the same adapter after training in notebook 10's
#    segmentation pipeline: what a linear probe reads from each level, before and after.
#
# Expected run time: about 20 s on 2 CPU cores.

# %% skip
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("08")))

# %% skip
import copy
import json
import statistics
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torchinfo
from matplotlib.patches import FancyBboxPatch

from dinolab import hub
from dinolab.adapter import DINOv3Adapter, Injector, deform_inputs
from dinolab.data import MASK_COLORS, ShapesWorld
from dinolab.msdeform import ms_deform_attn
from dinolab.trace import Trace, trace
from dinolab.utils import count_params, get_device, seed_everything
from dinolab.weights import tiny_checkpoint

seed_everything(0)
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
SCALE = 1  # a reader with a GPU can raise this: more images in section 5
viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
torch.set_printoptions(precision=4, sci_mode=False)
print("device type:", DEVICE.type)

CKPT = tiny_checkpoint()  # data/dinov3_tiny_shapesworld.pth, or $DINOLAB_CKPT

# %% [markdown] notes
# ## 1. The information flow
#
# Both designs share the pieces:
#
# * the **ViT** runs on the image and is read after four of its blocks (`interaction_indexes`; ViT-L:
#   `[4, 11, 17, 23]`), each read being the final-normed patch tokens `x_i` `[B, HW/256, D]` (and the cls token);
# * the **SPM** gives c1 (a map at stride 4) and the tokens `c = [c2; c3; c4]` (strides 8, 16, 32), tagged by a
#   learned `level_embed` per level;
# * **interaction i** runs an **extractor**: the SPM tokens are the *queries* of a 1-level deformable attention whose
#   *values* are `x_i` (`c ← c + MSDeformAttn(LN(c), LN(x_i))`, then `c ← c + ConvFFN(LN(c))`). The last
#   interaction runs two extra extractors;
# * at the end, c is split back into maps, `c1 += up(c2)` (a 2 × 2 transposed conv), the four ViT maps are
#   resized to strides 4/8/16/32 and **added**, and a BatchNorm per level gives **f1..f4**.
#
# The original ViT-Adapter adds an **injector** before each group of ViT blocks: the ViT's patch tokens become
# queries on the SPM tokens (`x ← x + γ · MSDeformAttn(LN(x), LN(c))`, 3 levels), so the backbone computes its
# later blocks on modified tokens. That only makes sense if the backbone can adapt to what is written into it, i.e.
# if it is fine-tuned. DINOv3 keeps the backbone **frozen** and runs it **once, under `torch.no_grad()`**
# (`get_intermediate_layers`), so there is nothing to inject into: information flows only **from the ViT into
# the SPM tokens**. (In the official code `InteractionBlockWithCls` still takes `deform_inputs1`, the injector's
# inputs, and ignores them.)

# %% slide hide-input
def draw_adapter_flow(ax, blocks, injector=False, title=""):
    """Boxes and arrows: the frozen ViT (top row), the SPM-token stream (bottom row), their interactions."""
    def box(x, y, w, h, text, fc, fs=11):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.03,rounding_size=0.12",
                                    fc=fc, ec="0.3", lw=0.8))
        ax.text(x, y, text, ha="center", va="center", fontsize=fs)

    def arrow(x0, y0, x1, y1, color="0.25", ls="-", text=None, tx=0.0, ty=0.0, fs=10):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=1.2, ls=ls, shrinkA=0, shrinkB=0))
        if text:
            ax.text((x0 + x1) / 2 + tx, (y0 + y1) / 2 + ty, text, fontsize=fs, color=color, ha="left", va="center")

    vit_c, spm_c, ext_c, inj_c, out_c = "#dbe9f6", "#fde0c5", "#d9f0d3", "#f4cccc", "#eeeeee"
    ytop, ybot, w, h = 3.0, 0.6, 1.45, 0.62
    xs = [3.0, 4.9, 6.8, 8.7]
    box(0.0, 1.8, 1.0, 0.62, "image\n[B,3,H,W]", "white")
    box(1.3, ytop, 1.2, h, "patch embed\n+ cls, reg", vit_c)
    box(1.3, ybot, 1.2, h, "SPM\nc1 | c2,c3,c4", spm_c)
    arrow(0.5, 2.0, 0.7, ytop - 0.1)
    arrow(0.5, 1.6, 0.7, ybot + 0.1)
    prev = 1.9
    for i, (x, blk) in enumerate(zip(xs, blocks)):
        box(x, ytop, w, h, f"blocks {blk}", vit_c)
        box(x, ybot, w, h, f"extractor {i + 1}" if i < 3 else f"extractor {i + 1}\n+ 2 extra", ext_c)
        arrow(prev, ytop, x - w / 2, ytop)  # the ViT token stream
        arrow(prev, ybot, x - w / 2, ybot)  # the SPM token stream
        if injector:  # injector i writes the SPM tokens into the ViT tokens before the blocks of interaction i
            xi = x - w / 2 - 0.35
            box(xi, 1.45, 0.55, 0.4, f"inj {i + 1}", inj_c, fs=10)
            arrow(xi, ybot + 0.02, xi, 1.25, color="#c0392b")
            arrow(xi, 1.65, xi, ytop - 0.02, color="#c0392b")
        # extractor i reads the (final-normed) patch tokens after block interaction_indexes[i]
        arrow(x + 0.25, ytop - h / 2, x + 0.25, ybot + h / 2, color="#2c7bb6",
              text="read x$_{%d}$" % (i + 1), tx=0.05, ty=0.45)
        prev = x + w / 2
    box(11.0, 1.8, 2.0, 1.5, "split c → c2,c3,c4 maps\nc1 += up(c2)\n+ 4 ViT maps (resized)\nBatchNorm\n→ f1, f2, f3, f4",
        out_c, fs=10)
    arrow(prev, ybot, 10.0, 1.3)
    arrow(prev, ytop, 10.0, 2.3, color="#2c7bb6", ls="--", text="x$_1$..x$_4$", ty=0.3)
    ax.plot([1.3, 1.3, 11.0], [ybot - h / 2, 0.0, 0.0], color="#e08214", lw=1.2)  # c1 skips the extractors
    arrow(11.0, 0.0, 11.0, 1.05, color="#e08214")
    ax.text(5.85, 0.1, "c1 (map, stride 4) skips the extractors", ha="center", fontsize=10, color="#e08214")
    ax.text(5.85, 3.55, "frozen ViT: " + ("run block group by block group, autograd through it" if injector else
            "run once under no_grad (get_intermediate_layers)"), ha="center", fontsize=11, color="#2c7bb6")
    ax.text(5.85, -0.3, "bottom row: SPM tokens c = [c2; c3; c4] (the queries), updated by each extractor",
            ha="center", fontsize=11, color="0.3")
    ax.set_xlim(-0.6, 12.1)
    ax.set_ylim(-0.5, 3.8)
    ax.axis("off")
    ax.set_title(title, fontsize=13)


groups = ["0–4", "5–11", "12–17", "18–23"]  # ViT-L, interaction_indexes [4, 11, 17, 23]
fig, ax = plt.subplots(figsize=(12.8, 4.4))
fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.01)
draw_adapter_flow(ax, groups, injector=False,
                  title="DINOv3 adapter (official): extractor only — information flows ViT → SPM tokens")
plt.show()

# %% slide hide-input
fig, ax = plt.subplots(figsize=(12.8, 4.4))
fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.01)
draw_adapter_flow(ax, groups, injector=True,
                  title="original ViT-Adapter: injectors (red) also write SPM tokens into the ViT")
plt.show()

# %% [markdown] slide
# Consequences you can check below:
#
# | | DINOv3 (extractor only) | ViT-Adapter (injector + extractor) |
# |---|---|---|
# | backbone forward | once, `no_grad`, `get_intermediate_layers` | in four chunks, with autograd |
# | backbone outputs | **unchanged** by the adapter | changed by every injector |
# | gradient | stops at the ViT's outputs | flows *through* the frozen blocks into the injectors |
# | activation memory | SPM + extractors | + every ViT block's activations |
# | backbone features reusable | yes: one backbone pass can serve several heads | no |
#
# `dinolab.adapter.DINOv3Adapter(use_injector=True)` builds the original variant for this comparison (our addition,
# not official — the official adapter has no injector; our `Injector` follows the ViT-Adapter paper, with the
# LayerScale `γ` initialised to `init_values`, 0 ⇒ it starts as the identity).

# %% [markdown] slide
# ## 2. `deform_inputs`: where every query looks
#
# Deformable attention needs, for each query, a **reference point** (x, y) ∈ [0, 1]², and, for the value maps, their
# **spatial shapes** and where each level starts in the flattened value sequence (**level start index**).
# `deform_inputs(x, patch_size=16)` builds two sets:
#
# * `deform_inputs1` (injector): queries = the ViT's patch tokens, values = the three SPM levels;
# * `deform_inputs2` (extractor): queries = the SPM tokens of the three levels, value = the one ViT map.
#
# Reference points are pixel centres `(i + 0.5) / n`, level after level, row-major, as (x, y). For a 128 × 128 image
# (the tiny run below) and for the blog post's 512 × 512 (on the meta device):

# %% hide-input
def show_deform_inputs(x):
    d1, d2 = deform_inputs(x, 16)
    for name, (ref, shapes, starts) in [("deform_inputs1 (injector) ", d1), ("deform_inputs2 (extractor)", d2)]:
        print(f"{name}: reference_points {list(ref.shape)}, spatial_shapes {shapes.tolist()}, "
              f"level_start_index {starts.tolist()}")
    return d1, d2


print("128 x 128:")
d1, d2 = show_deform_inputs(torch.zeros(1, 3, 128, 128))
print("512 x 512 (meta):")
_ = show_deform_inputs(torch.empty(4, 3, 512, 512, device="meta"))

ref2 = d2[0][0, :, 0]  # [336, 2]: the extractor's queries = c2 (16x16) + c3 (8x8) + c4 (4x4)
print("\nextractor reference points, first 3 of each SPM level (x, y):")
for lvl, (start, (h, w)) in enumerate(zip([0, 256, 320], [(16, 16), (8, 8), (4, 4)]), start=2):
    print(f"  c{lvl} ({h}x{w}): {[tuple(round(v, 4) for v in p) for p in ref2[start:start + 3].tolist()]}")
    torch.testing.assert_close(ref2[start + w][1], torch.tensor(1.5 / h))  # the second row starts at y = 1.5/h
assert d2[0].shape == (1, 16 * 16 + 8 * 8 + 4 * 4, 1, 2) and d1[2].tolist() == [0, 256, 320]

# %% [markdown] notes
# The extractor's queries on the image, and the value grid they read (the ViT's 8 × 8 patch tokens). Two things
# to notice: the c3 queries sit exactly on the ViT's token centres (same normalised grid), and each query sees
# the *whole* ViT map through its learned sampling offsets, not only its own patch.

# %% slide hide-input
def grid_centres(n, size=128):
    """Pixel coordinates (x, y) of the cell centres of an n x n grid over a size x size image, row-major."""
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return (torch.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * (size / n) - 0.5


img128 = ShapesWorld("val", size=128).batch([3])["image"][0]
pts = d2[0][0, :, 0] * 128 - 0.5  # the extractor's reference points in pixels (pixel centres at integers)
torch.testing.assert_close(pts[256:320], grid_centres(8))  # c3 queries sit on the ViT's token centres
panels = [("extractor: SPM tokens (queries)\nread the ViT map (values)",
           [(pts[:256], "c2 queries (16x16)", "#e08214", 8, "o"), (pts[256:320], "c3 queries (8x8)", "#4daf4a", 30, "o"),
            (pts[320:], "c4 queries (4x4)", "#984ea3", 90, "o"), (grid_centres(8), "ViT tokens (values)", "#2c7bb6", 20, "x")]),
          ("injector: ViT tokens (queries)\nread the SPM levels (values)",
           [(d1[0][0, :, 0] * 128 - 0.5, "ViT queries (8x8)", "#2c7bb6", 30, "o"),
            (grid_centres(16), "c2 values", "#e08214", 8, "x"), (grid_centres(8), "c3 values", "#4daf4a", 20, "x"),
            (grid_centres(4), "c4 values", "#984ea3", 40, "x")])]
fig, axes = plt.subplots(1, 2, figsize=(12.8, 6.0))
for ax, (title, sets) in zip(axes, panels):
    ax.imshow(viz.to_numpy_image(img128), alpha=0.5)
    for p, label, col, sz, marker in sets:
        if marker == "o":
            ax.scatter(p[:, 0], p[:, 1], s=sz, facecolors="none", edgecolors=col, linewidths=1.0, label=label)
        else:
            ax.scatter(p[:, 0], p[:, 1], s=sz, c=col, marker="x", linewidths=1.0, label=label)
    ax.set_xlim(-0.5, 127.5), ax.set_ylim(127.5, -0.5)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=12)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=11)
plt.tight_layout()
plt.show()

# %% [markdown] slide
# ## 3. Rebuild it from its parts
#
# We build the adapter on the tiny pretrained backbone (D = 192, 6 blocks) with **our choices**, the official ones
# scaled down:
#
# * `interaction_indexes = [1, 2, 4, 5]`: four reads that end at the last block, like ViT-L's `[4, 11, 17, 23]`
#   (the official rule for other depths, `i·(depth // 4) − 1`, would give `[0, 1, 2, 3]` for 6 blocks and never
#   read the last two);
# * `deform_num_heads = 3`: the value width is `D · deform_ratio = 96`, so each head has 32 channels — the same
#   per-head width as ViT-L's 16 heads over 512;
# * everything else official: `conv_inplane = 64`, 4 points, `deform_ratio = 0.5`, `cffn_ratio = 0.25`,
#   `drop_path_rate = 0.3`, `add_vit_feature`, extra extractors, `with_cp`.

# %% hide-input
backbone = hub.dinov3_vittiny16(weights=CKPT).eval()
D, DEPTH = backbone.embed_dim, len(backbone.blocks)
IDX, HEADS = [1, 2, 4, 5], 3
print(f"tiny backbone: D={D}, {DEPTH} blocks; official rule for {DEPTH} blocks: "
      f"{[i * (DEPTH // 4) - 1 for i in range(1, 5)]}; our choice: {IDX}")

seed_everything(0)
adapter = DINOv3Adapter(backbone, interaction_indexes=IDX, deform_num_heads=HEADS).eval()
n_img = 4 * SCALE
batch = ShapesWorld("val", size=128).batch(range(n_img))
x = viz.normalize(batch["image"])
print("input:", list(x.shape))

# %% [markdown] slide
# ### One extractor, by hand
#
# `query_norm` and `feat_norm` are LayerNorms; the deformable attention is written out from its parts (notebook 07):
# value projection → heads; sampling offsets (in pixels of the value map) added to the reference points after
# dividing by (W, H); one softmax over the L·P points of each head; the bilinear gather–sum `ms_deform_attn`;
# output projection. Then the **ConvFFN**: `fc1` (D → D/4), a 3 × 3 depthwise conv applied to each SPM level as
# its own map, GELU, `fc2`. Both are residual. (DropPath is active only in training.)

# %% hide-input
def layer_norm(ln, t):
    return F.layer_norm(t, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def deform_attn_by_hand(attn, query, ref, value_in, shapes, show):
    """MSDeformAttn from its parts. query [B, Nq, D]; ref [1, Nq, 1, 2]; value_in [B, S, D]."""
    B, Nq, _ = query.shape
    M, L, P = attn.n_heads, attn.n_levels, attn.n_points
    value = attn.value_proj(value_in).view(B, value_in.shape[1], M, -1)
    show("value = value_proj(feat) -> heads", value)
    offsets = attn.sampling_offsets(query).view(B, Nq, M, L, P, 2)
    show("sampling offsets (px of each level)", offsets)
    weights = attn.attention_weights(query).view(B, Nq, M, L * P).softmax(-1).view(B, Nq, M, L, P)
    show("attention weights (softmax over L*P)", weights)
    wh = torch.tensor([[w, h] for h, w in shapes.tolist()], dtype=offsets.dtype, device=offsets.device)
    loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    show("sampling locations = ref + offset/(W,H)", loc)
    sampled = ms_deform_attn(value, shapes, loc, weights)
    show("ms_deform_attn: weighted bilinear samples", sampled)
    out = attn.output_proj(sampled)
    show("output_proj", out)
    return out


def conv_ffn_by_hand(ffn, t, H, W, show):
    """fc1 -> depthwise 3x3 conv per SPM level -> GELU -> fc2. t [B, N, D]; (H, W) = the stride-16 grid."""
    B, _, _ = t.shape
    hidden = ffn.fc1(t)
    show("ConvFFN fc1", hidden)
    C = hidden.shape[-1]
    shapes = [(2 * H, 2 * W), (H, W), (H // 2, W // 2)]
    parts = []
    for part, (h, w) in zip(hidden.split([h * w for h, w in shapes], dim=1), shapes):
        fmap = part.transpose(1, 2).reshape(B, C, h, w)
        conv = F.conv2d(fmap, ffn.dwconv.dwconv.weight, ffn.dwconv.dwconv.bias, padding=1, groups=C)
        show(f"  depthwise 3x3 on a {h}x{w} level", conv)
        parts.append(conv.flatten(2).transpose(1, 2))
    out = ffn.fc2(F.gelu(torch.cat(parts, 1)))
    show("GELU, fc2", out)
    return out


def extractor_by_hand(ext, c, feat, d2, H, W, verbose=False):
    show = (lambda name, t: print(f"    {name:40s} {list(t.shape)}")) if verbose else (lambda name, t: None)
    ref, shapes, _ = d2
    show("query c (SPM tokens)", c)
    show("feat x_i (ViT patch tokens)", feat)
    c = c + deform_attn_by_hand(ext.attn, layer_norm(ext.query_norm, c), ref, layer_norm(ext.feat_norm, feat),
                                shapes, show)
    c = c + conv_ffn_by_hand(ext.ffn, layer_norm(ext.ffn_norm, c), H, W, show)
    show("c after the extractor", c)
    return c


ext = adapter.interactions[0].extractor
with torch.no_grad():
    c_tokens = torch.cat(adapter.spm(x)[1:], 1)
    x_vit = backbone.get_intermediate_layers(x, n=IDX, return_class_token=True)[0][0]
    d1, d2 = deform_inputs(x, 16)
    print("extractor of interaction 0, by hand:")
    ours = extractor_by_hand(ext, c_tokens, x_vit, d2, 8, 8, verbose=True)
    theirs = ext(c_tokens, d2[0], x_vit, d2[1], d2[2], 8, 8)
torch.testing.assert_close(ours, theirs)
print("== dinolab.adapter.Extractor (assert_close passed)")

# %% [markdown] skip
# ### One injector, by hand
#
# The same deformable attention with the roles swapped — the ViT's patch tokens query the **three** SPM levels
# (`deform_inputs1`) — scaled by the LayerScale `γ` and added to the ViT tokens. With `γ = 0` (the init,
# `init_values = 0`) it is exactly the identity; we set `γ = 0.1` to test the formula.

# %% skip
seed_everything(2)
inj = Injector(D, num_heads=HEADS, n_points=4, n_levels=3, deform_ratio=0.5, init_values=0.1).eval()
with torch.no_grad():
    show = lambda name, t: print(f"    {name:40s} {list(t.shape)}")  # noqa: E731
    print("injector, by hand:")
    delta = deform_attn_by_hand(inj.attn, layer_norm(inj.query_norm, x_vit), d1[0], layer_norm(inj.feat_norm, c_tokens),
                                d1[1], show)
    ours = x_vit + inj.gamma * delta
    theirs = inj(x_vit, d1[0], c_tokens, d1[1], d1[2])
torch.testing.assert_close(ours, theirs)
print("== dinolab.adapter.Injector (assert_close passed)")
inj.gamma.data.zero_()
with torch.no_grad():
    assert torch.equal(inj(x_vit, d1[0], c_tokens, d1[1], d1[2]), x_vit)
print("gamma = 0: the injector is the identity (torch.equal)")

# %% [markdown] slide
# ### The whole adapter forward, by hand
#
# Now every step of `DINOv3Adapter.forward`, with the adapter's own modules. With `verbose=True` it prints the
# blog post's tensor-flow table — we run it that way in section 4 on ViT-L at 512 × 512; here it runs quietly on the
# tiny model and must equal `adapter(x)`.

# %% hide-input
def adapter_by_hand(a, x, verbose=False):
    show = (lambda name, t: print(f"  {name:52s} {list(t.shape)}")) if verbose else (lambda name, t: None)
    B, _, H, W = x.shape
    p = a.patch_size
    Hc, Wc, Ht, Wt = H // 16, W // 16, H // p, W // p
    d1, d2 = deform_inputs(x, p)
    show("image", x)
    c1, c2, c3, c4 = a.spm(x)
    for name, t in zip(("SPM c1 (map, stride 4)", "SPM c2 tokens (stride 8)", "SPM c3 tokens (stride 16)",
                        "SPM c4 tokens (stride 32)"), (c1, c2, c3, c4)):
        show(name, t)
    c = torch.cat([c2 + a.level_embed[0], c3 + a.level_embed[1], c4 + a.level_embed[2]], dim=1)
    show("c = cat(c2, c3, c4) + level_embed", c)
    with torch.no_grad():  # the frozen ViT, once
        layers = a.backbone.get_intermediate_layers(x, n=a.interaction_indexes, return_class_token=True)
    for i, (x_i, cls_i) in enumerate(layers):
        show(f"ViT block {a.interaction_indexes[i]}: patch tokens x_{i + 1} | cls", x_i)
    vit_maps = []
    for i, (blk, (x_i, _)) in enumerate(zip(a.interactions, layers)):
        c = extractor_by_hand(blk.extractor, c, x_i, d2, Hc, Wc)
        if blk.extra_extractors is not None:
            for e in blk.extra_extractors:
                c = extractor_by_hand(e, c, x_i, d2, Hc, Wc)
        show(f"interaction {i}: extractor{' + 2 extra' if blk.extra_extractors is not None else ''} -> c", c)
        vit_maps.append(x_i.transpose(1, 2).reshape(B, -1, Ht, Wt))
    n2, n3 = c2.shape[1], c3.shape[1]
    c2 = c[:, :n2].transpose(1, 2).reshape(B, -1, 2 * Hc, 2 * Wc)
    c3 = c[:, n2:n2 + n3].transpose(1, 2).reshape(B, -1, Hc, Wc)
    c4 = c[:, n2 + n3:].transpose(1, 2).reshape(B, -1, Hc // 2, Wc // 2)
    show("split: c2 map", c2), show("split: c3 map", c3), show("split: c4 map", c4)
    c1 = a.up(c2) + c1
    show("c1 = up(c2) + c1  (ConvTranspose2d 2x2, stride 2)", c1)
    feats = []
    for i, (ci, xi, s) in enumerate(zip((c1, c2, c3, c4), vit_maps, (4, 2, 1, 0.5))):
        xi = F.interpolate(xi, size=(int(Hc * s), int(Wc * s)), mode="bilinear", align_corners=False)
        show(f"ViT map x_{i + 1} resized (bilinear) and added to c{i + 1}", xi)
        feats.append(getattr(a, f"norm{i + 1}")(ci + xi))
    for i, f in enumerate(feats):
        show(f"f{i + 1} = BatchNorm(c{i + 1} + x_{i + 1})", f)
    return {str(i + 1): f for i, f in enumerate(feats)}


with torch.no_grad():
    ours, theirs = adapter_by_hand(adapter, x), adapter(x)
for k in theirs:
    torch.testing.assert_close(ours[k], theirs[k])
print("adapter_by_hand(x) == DINOv3Adapter(x) for f1..f4:", {k: list(v.shape) for k, v in theirs.items()},
      "(assert_close passed)")

# %% [markdown] slide
# ## 4. The blog post's setting: ViT-L, 512 × 512, batch 4
#
# First the by-hand forward in verbose mode, on the **meta device** (shapes, no data, no arithmetic): the blog post's
# "完整的张量流维度跟踪" (complete tensor-flow trace), step by step, including the tensors that are not module
# outputs (the concatenated `c`, the split, the resized ViT maps).

# %% skip
vitl = hub.dinov3_vitl16(device="meta")
adapter_l = DINOv3Adapter(vitl, interaction_indexes=[4, 11, 17, 23], device="meta")  # official defaults otherwise
x_l = torch.empty(4, 3, 512, 512, device="meta")
print("ViT-L/16, 512 x 512, batch 4 (meta):")
with torch.no_grad():
    out_l = adapter_by_hand(adapter_l, x_l, verbose=True)
seed_shapes = {"1": (4, 1024, 128, 128), "2": (4, 1024, 64, 64), "3": (4, 1024, 32, 32), "4": (4, 1024, 16, 16)}
assert {k: tuple(v.shape) for k, v in out_l.items()} == seed_shapes
print("f1..f4 == the blog post's 4 x [4,1024,128|64|32|16,...] (assert passed)")

# %% [markdown] skip
# The same forward as a module table from `dinolab.trace` (`max_depth=2`; the SPM's inner layers are left out —
# they are notebook 06's table). The backbone's final `norm` runs four times: once per read. `interactions.0-3`
# take `(x_i, c, cls, deform_inputs1, deform_inputs2, H_c, W_c, H_toks, W_toks)` and return `(x_i, c, cls)`
# with `x_i` and `cls` untouched.

# %% skip
table = trace(adapter_l, x_l, max_depth=2)
table = Trace([r for r in table if not r.name.startswith("spm.")])
print(table)
rows = {r.name: r for r in table}
assert rows["spm"].output == "([4,1024,128,128], [4,4096,1024], [4,1024,1024], [4,256,1024])"
assert rows["backbone.norm"].count == 4 and rows["backbone.blocks.0-23"].count == 24
assert rows["interactions.0-3.extractor"].output == "[4,5376,1024]"
assert rows["interactions.3.extra_extractors.0-1"].count == 2
assert rows["(model)"].output == "1=[4,1024,128,128], 2=[4,1024,64,64], 3=[4,1024,32,32], 4=[4,1024,16,16]"

# %% [markdown]
# **Parameters.** The adapter's trainable parameters for ViT-L, by part, with and without injectors (all counted on
# the meta device). `tests/test_adapter.py` derives the extractor-only total, 16,654,272, independently from the
# layer shapes.

# %% hide-input
def parts(a):
    groups = {"SPM": a.spm, "extractors (4)": [b.extractor for b in a.interactions],
              "extra extractors (2)": [b.extra_extractors for b in a.interactions if b.extra_extractors is not None],
              "injectors": [b.injector for b in a.interactions if b.injector is not None],
              "level_embed, up, norm1..4": [a.up, a.norm1, a.norm2, a.norm3, a.norm4]}
    out = {}
    for name, mods in groups.items():
        mods = mods if isinstance(mods, list) else [mods]
        out[name] = sum(count_params(m) for m in mods) + (a.level_embed.numel() if name.startswith("level") else 0)
    return out


adapter_l_inj = DINOv3Adapter(vitl, interaction_indexes=[4, 11, 17, 23], use_injector=True, device="meta")
p_plain, p_inj = parts(adapter_l), parts(adapter_l_inj)
print(f"{'ViT-L adapter part':28s} {'extractor only':>15s} {'+ injectors':>13s}")
for name in p_plain:
    print(f"{name:28s} {p_plain[name]:15,d} {p_inj[name]:13,d}")
train_plain, train_inj = count_params(adapter_l, trainable_only=True), count_params(adapter_l_inj, trainable_only=True)
frozen = count_params(vitl)
print(f"{'trainable total':28s} {train_plain:15,d} {train_inj:13,d}")
print(f"{'frozen backbone':28s} {frozen:15,d} {frozen:13,d}")
assert train_plain == sum(p_plain.values()) == 16_654_272
assert count_params(adapter_l) - train_plain == frozen and not any(p.requires_grad for p in vitl.parameters())
print(f"\nthe adapter trains {train_plain / frozen:.1%} of the backbone's size; injectors would add "
      f"{train_inj - train_plain:,} ({(train_inj - train_plain) / train_plain:.1%})")

# %% [markdown] skip
# For every released size, with the official `interaction_indexes` rule (`_get_backbone_out_indices` in
# `dinov3/eval/segmentation/models/__init__.py`: `[4, 11, 17, 23]` for 24 blocks, otherwise
# `i·(depth // 4) − 1`, i = 1..4) and the official 16 heads:

# %% skip
def official_indexes(depth):
    return [4, 11, 17, 23] if depth == 24 else [i * (depth // 4) - 1 for i in range(1, 5)]


print(f"{'model':20s} {'D':>5s} {'indexes':>16s} {'adapter':>12s} {'+ injectors':>12s} {'backbone':>15s}")
for name in hub.RELEASED:
    bb = hub.build(name, device="meta")
    idx = official_indexes(len(bb.blocks))
    n_plain = count_params(DINOv3Adapter(bb, interaction_indexes=idx, device="meta"), trainable_only=True)
    n_inj = count_params(DINOv3Adapter(bb, interaction_indexes=idx, use_injector=True, device="meta"),
                         trainable_only=True)
    print(f"{name:20s} {bb.embed_dim:5d} {str(idx):>16s} {n_plain:12,d} {n_inj:12,d} {count_params(bb):15,d}")

# %% [markdown] slide
# ## 5. A real run: the tiny pretrained backbone on ShapesWorld
#
# The adapter built in section 3 (random init — it is trained in notebook 10) on four 128 × 128 validation images.
# The pyramid has strides 4/8/16/32: 32², 16², 8², 4² cells.

# %% hide-input
with torch.no_grad():
    feats = adapter(x)
for k, v in feats.items():
    print(f"f{k}: {list(v.shape)}  (stride {128 // v.shape[-1]})")
assert [tuple(v.shape) for v in feats.values()] == [(n_img, D, 128 // s, 128 // s) for s in (4, 8, 16, 32)]

# %% [markdown] notes
# PCA maps of each level (3 principal components → RGB, fitted per level over the batch). Each level is the sum of
# the **ViT's map** (stride 16, resized) and the **SPM** path, normalised. The second figure splits level 1 into its
# three sources: the ViT part (x₁ bilinearly upsampled from 8 × 8 to 32 × 32), the SPM's c1, and `up(c2)` (c2 after
# the extractors, upsampled by the transposed conv).

# %% slide hide-input
def pca_maps(f):
    """[B, C, h, w] -> [B, h, w, 3] with one PCA over the whole batch."""
    return viz.pca_rgb(f.permute(0, 2, 3, 1))


fig, axes = plt.subplots(2, 5, figsize=(12.8, 5.6))
pcs = {k: pca_maps(v) for k, v in feats.items()}
for row, i in enumerate([0, 1]):
    axes[row, 0].imshow(viz.to_numpy_image(batch["image"][i]))
    axes[row, 0].set_title("image 128x128", fontsize=11)
    for col, k in enumerate(feats, start=1):
        axes[row, col].imshow(pcs[k][i].numpy())
        axes[row, col].set_title(f"f{k}: {feats[k].shape[-1]}x{feats[k].shape[-1]} (stride {128 // feats[k].shape[-1]})",
                                 fontsize=11)
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% slide hide-input
def level1_sources(a, x):
    """The three terms f1 = norm1(ViT x1 + SPM c1 + up(c2)) adds, for adapter a on images x (patch 16)."""
    n, h = x.shape[0], x.shape[-1] // 16
    d1, d2 = deform_inputs(x, 16)
    with torch.no_grad():
        c1, c2, c3, c4 = a.spm(x)
        c = torch.cat([c2 + a.level_embed[0], c3 + a.level_embed[1], c4 + a.level_embed[2]], 1)
        layers = a.backbone.get_intermediate_layers(x, n=a.interaction_indexes, return_class_token=True)
        for i, blk in enumerate(a.interactions):
            _, c, _ = blk(layers[i][0], c, layers[i][1], d1, d2, h, h, h, h)
        dim = c.shape[-1]
        up = a.up(c[:, :4 * h * h].transpose(1, 2).reshape(n, dim, 2 * h, 2 * h))
        vit = F.interpolate(layers[0][0].transpose(1, 2).reshape(n, dim, h, h), size=(4 * h, 4 * h), mode="bilinear",
                            align_corners=False)
    return {"ViT x1": vit, "SPM c1": c1, "up(c2)": up}


def energy_shares(sources):
    energy = {name: t.square().mean().item() for name, t in sources.items()}
    return {name: e / sum(energy.values()) for name, e in energy.items()}


src1 = level1_sources(adapter, x)
vit_part, c1_sp, up_part = src1["ViT x1"], src1["SPM c1"], src1["up(c2)"]
with torch.no_grad():
    torch.testing.assert_close(adapter.norm1(c1_sp + up_part + vit_part), feats["1"])
print("f1 == norm1(c1 + up(c2) + ViT x1) (assert_close passed); share of the energy before the norm: "
      + ", ".join(f"{k} {v:.2f}" for k, v in energy_shares(src1).items()))

fig, axes = plt.subplots(1, 5, figsize=(12.8, 3.4))
axes[0].imshow(viz.to_numpy_image(batch["image"][0]))
axes[0].set_title("image", fontsize=11)
for ax, f, title in [(axes[1], vit_part, "ViT x1, upsampled 8->32"), (axes[2], c1_sp, "SPM c1 (stride 4)"),
                     (axes[3], up_part, "up(c2): random 2x2 deconv"), (axes[4], feats["1"], "f1 = norm1(sum)")]:
    ax.imshow(pca_maps(f)[0].numpy())
    ax.set_title(title, fontsize=11)
for ax in axes:
    ax.set_xticks([]), ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown] notes
# The three sources of level 1, at initialisation:
#
# * the **ViT part** is smooth — one vector per 16 × 16 patch, interpolated — but knows which region is which;
# * the **SPM's c1** has the sharp object outlines of the conv stem (notebook 06), but at init only a small share of
#   the energy (printed above);
# * **`up(c2)`** is a randomly initialised 2 × 2 transposed conv with stride 2: each of the four positions in a
#   2 × 2 block gets its own random kernel, which is the **checkerboard** that dominates f1 above (the classic
#   transposed-conv artifact). Its kernel is learned; the next slides show what training does to it.

# %% [markdown] slide
# ### After training: the adapter inside notebook 10's segmentation pipeline
#
# Notebook 10 trains this adapter together with a pixel decoder and an FPN head on the frozen self-supervised
# backbone (class-weighted cross-entropy on six classes), at that notebook's small widths: `conv_inplane = 16`, 6
# deformable heads, no extra extractors. Its trained weights ship in `data/seg_fpn_ssl.pth`, and
# `dinolab.finetune.load` rebuilds the whole pipeline from them. We compare its adapter with the same modules at the
# initialisation its training started from (the recipe's seed), on notebook 10's inputs (the floor window of a
# 256-px render), and measure three things:
#
# * what a **linear probe** reads from each level: mIoU of six classes at the level's grid, each cell labelled with
#   its most frequent pixel class (`dinolab.evaluate.map_probe_miou`; 96 training and 48 held-out scenes);
# * where f1's energy comes from: the ViT's x₁, the SPM's c1, or up(c2);
# * how much of f1's variance is **one fixed 2 × 2 pattern**, the same in every image (the mean of each of the four
#   positions of a 2 × 2 block, over all images and blocks): the checkerboard of section 5.

# %% hide-input
from dinolab import evaluate, finetune
from dinolab.finetune_segmentation import PipelineSeg, scenes
from dinolab.weights import TINY_CHECKPOINT

seg_path = TINY_CHECKPOINT.with_name("seg_fpn_ssl.pth")
seg_meta = json.loads(seg_path.with_suffix(".json").read_text())
seg_cfg = seg_meta["config"]
trained_pipe = finetune.load(seg_path)
init_backbone = finetune.load_backbone("ssl")
torch.manual_seed(seg_cfg["seed"])  # as dinolab.finetune.train does before it builds the pipeline
init_pipe = PipelineSeg(init_backbone, seg_cfg["layers"]).eval()
adapters = {"at init": init_pipe.head["adapter"], "trained": trained_pipe.head["adapter"]}
print(f"{seg_path.name}: {seg_cfg['steps']:,} steps x {seg_cfg['batch_size']} on {seg_cfg['n_train']:,} scenes; "
      f"the whole pipeline's held-out mIoU {seg_meta['final']['miou']:.3f}")

probe_tr = scenes("train", 96, seg_cfg["image_size"], seg_cfg["zoom"])
probe_va = scenes("val", 48, seg_cfg["image_size"], seg_cfg["zoom"])
x_tr, x_va = viz.normalize(probe_tr["image"]), viz.normalize(probe_va["image"])


def fixed_2x2_share(f):
    """Share of f's variance (about each channel's mean) that is one 2 x 2 pattern repeated over every image."""
    B, C, H, W = f.shape
    g = f - f.mean((0, 2, 3), keepdim=True)
    pattern = g.reshape(B, C, H // 2, 2, W // 2, 2).mean((0, 2, 4), keepdim=True)
    return (pattern.square().mean() / g.square().mean()).item()


def without_2x2_pattern(f):
    B, C, H, W = f.shape
    g = f.reshape(B, C, H // 2, 2, W // 2, 2)
    return (g - g.mean((0, 2, 4), keepdim=True)).reshape(B, C, H, W)


with torch.no_grad():
    vit_tr, vit_va = (init_backbone.get_intermediate_layers(v, n=[seg_cfg["layers"][-1]], reshape=True)[0]
                      for v in (x_tr, x_va))
vit_probe = evaluate.map_probe_miou(vit_tr, probe_tr["mask"], vit_va, probe_va["mask"])
trained_feats, probe, shares, checker = {}, {}, {}, {}
for name, a in adapters.items():
    with torch.no_grad():
        f_tr, f_va = a(x_tr), a(x_va)
    trained_feats[name] = f_va
    probe[name] = {k: evaluate.map_probe_miou(f_tr[k], probe_tr["mask"], f_va[k], probe_va["mask"]) for k in f_tr}
    shares[name] = energy_shares(level1_sources(a, x_va))
    checker[name] = fixed_2x2_share(f_va["1"])

print(f"linear probe mIoU (six classes, held-out)   f1 (32x32)  f2 (16x16)  f3 (8x8)  f4 (4x4)")
for name in adapters:
    print(f"  adapter {name:9s}                  " + "".join(f"{probe[name][k]:10.3f}  " for k in probe[name]))
print(f"  the frozen ViT's last read block (8x8)                          {vit_probe:.3f}")
print("\nf1 before its norm: share of the energy        ViT x1   SPM c1   up(c2)   fixed 2x2 pattern in f1")
for name in adapters:
    print(f"  adapter {name:9s}                        " + "".join(f"{v:6.3f}   " for v in shares[name].values())
          + f"  {checker[name]:.3f}")
assert all(probe["trained"][k] > probe["at init"][k] for k in probe["trained"])
assert shares["trained"]["up(c2)"] > 0.9 and checker["trained"] > checker["at init"]

# %% slide hide-input
fig, axes = plt.subplots(2, 6, figsize=(12.8, 4.9))
show = 0
for row, name in enumerate(adapters):
    f = trained_feats[name]
    axes[row, 0].imshow(viz.to_numpy_image(probe_va["image"][show]))
    axes[row, 0].set_ylabel(f"adapter {name}", fontsize=12)
    panels = [("f1", f["1"]), ("f1 - fixed 2x2 pattern", without_2x2_pattern(f["1"])),
              ("f2", f["2"]), ("f3", f["3"]), ("f4", f["4"])]
    for col, (title, t) in enumerate(panels, start=1):
        axes[row, col].imshow(pca_maps(t)[show].numpy())
        axes[row, col].set_title(f"{title}: {t.shape[-1]}x{t.shape[-1]}", fontsize=11)
axes[0, 0].set_title("image (notebook 10's input)", fontsize=11)
for ax in axes.flat:
    ax.set_xticks([]), ax.set_yticks([])
plt.tight_layout()
plt.show()

# %% [markdown] notes
# What training changed, with the frozen ViT unchanged (its own last read block, probed the same way, is printed
# above as a reference):
#
# * **Every level holds more of the classes after training** (linear probe above, trained against init), most at
#   f1 and f2, the two levels finer than the ViT's own grid (strides 4 and 8). The gain is modest, and the ViT's
#   own block reads no better than the untrained adapter: the pixel decoder and the FPN head, which see all four
#   levels at once, do much of the work behind the pipeline's mIoU.
# * **f1 became up(c2).** Before the norm, up(c2) carries almost all of f1's energy after training: the pipeline
#   routes its stride-4 level through the c2 tokens, which the extractors refined by reading the ViT, rather than
#   through the SPM's c1 (whose share stays small) or the interpolated ViT map.
# * **The checkerboard did not go away; it grew** (its share of f1's variance is printed above). Subtract the fixed
#   pattern and f1 shows the objects and their outlines, with some of the pattern left over: each of the four positions
#   of a 2 × 2 block applies its own kernel to the c2 token under it, so part of the pattern changes with the content. Nothing in the
#   loss asks for smooth features; the layers after f1 (the pixel decoder's convolutions and the FPN head) learn to
#   read through the pattern. Upsampling by interpolation and then a convolution is the usual cure for the
#   transposed conv's checkerboard (Odena, Dumoulin and Olah, 2016); the official adapter keeps the transposed conv,
#   and so do we.

# %% [markdown] slide
# ### The backbone is untouched — unless there is an injector
#
# We record the ViT's token stream (the output of every block) with forward hooks, once when the backbone runs on
# its own and once inside the adapter. Extractor-only: **bit-identical** (`torch.equal`), and the backbone's
# weights do not move when the adapter trains. Injector variant: with `γ = 0` (its init) it equals the
# extractor-only adapter; with `γ ≠ 0` the ViT computes different tokens.

# %% hide-input
def record_blocks(model_call):
    """Run model_call() and return the output of every backbone block, in call order."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())) for b in backbone.blocks]
    try:
        with torch.no_grad():
            model_call()
    finally:
        for h in hooks:
            h.remove()
    return seen


alone = record_blocks(lambda: backbone.get_intermediate_layers(x, n=IDX))
inside = record_blocks(lambda: adapter(x))
assert len(alone) == len(inside) == DEPTH and all(torch.equal(a, b) for a, b in zip(alone, inside))
print(f"extractor-only: all {DEPTH} block outputs inside the adapter are bit-identical to the backbone alone")

# one training step of the adapter: the backbone's weights must not move
before = copy.deepcopy(backbone.state_dict())
trainer = copy.deepcopy(adapter).train()
opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-3)
loss = sum(f.square().mean() for f in trainer(x).values())
loss.backward()
opt.step()
assert all(torch.equal(v, trainer.backbone.state_dict()[k]) for k, v in before.items())
print("after an AdamW step on the adapter: backbone state dict unchanged (torch.equal)")

# the injector variant, with the same extractor-only weights
seed_everything(0)
adapter_inj = DINOv3Adapter(backbone, interaction_indexes=IDX, deform_num_heads=HEADS, use_injector=True,
                            init_values=0.0).eval()
report = adapter_inj.load_state_dict(adapter.state_dict(), strict=False)
assert not report.unexpected_keys and all(".injector." in k for k in report.missing_keys)
print(f"injector variant: {len(report.missing_keys)} new tensors, all under interactions.*.injector.*")
with torch.no_grad():
    out_inj = adapter_inj(x)
for k in feats:
    torch.testing.assert_close(out_inj[k], feats[k], rtol=1e-5, atol=1e-5)
print("gamma = 0: injector variant == extractor-only adapter (assert_close passed)")

for blk in adapter_inj.interactions:
    blk.injector.gamma.data.fill_(0.1)
inside_inj = record_blocks(lambda: adapter_inj(x))
rel = [((b - a).norm() / a.norm()).item() for a, b in zip(alone, inside_inj)]
assert len(inside_inj) == DEPTH and all(r > 1e-3 for r in rel)
print("gamma = 0.1: relative change of each block's output tokens:", [round(r, 3) for r in rel])

# %% [markdown] slide
# ## 6. What each design costs, and where gradients flow
#
# **Gradients.** One backward pass of a dummy loss (the sum of the squared features) in training mode, for the
# extractor-only adapter, the injector variant at its init (`γ = 0`), and the injector variant with `γ = 0.1`.
# Per group of parameters: no gradient at all (`None`), an exactly zero gradient, or a non-zero one.

# %% hide-input
def grad_table(a):
    a = copy.deepcopy(a).train()
    a.zero_grad(set_to_none=True)
    sum(f.square().mean() for f in a(x).values()).backward()
    groups = {"backbone (frozen)": a.backbone.parameters(), "SPM": a.spm.parameters(),
              "extractors": [p for b in a.interactions for m in (b.extractor, b.extra_extractors) if m is not None
                             for p in m.parameters()],
              "injector gamma": [b.injector.gamma for b in a.interactions if b.injector is not None],
              "injector attention + norms": [p for b in a.interactions if b.injector is not None
                                             for n, p in b.injector.named_parameters() if n != "gamma"]}
    out = {}
    for name, params in groups.items():
        params = list(params)
        if not params:
            out[name] = "—"
        elif all(p.grad is None for p in params):
            out[name] = "None"
        else:
            total = sum(p.grad.abs().sum().item() for p in params if p.grad is not None)
            out[name] = "non-zero" if total > 0 else "zero"
    return out


adapter_inj0 = copy.deepcopy(adapter_inj)
for blk in adapter_inj0.interactions:
    blk.injector.gamma.data.zero_()
tables = {"extractor only": grad_table(adapter), "injector, gamma=0": grad_table(adapter_inj0),
          "injector, gamma=0.1": grad_table(adapter_inj)}
print(f"{'gradient of':28s}" + "".join(f"{k:>22s}" for k in tables))
for name in tables["extractor only"]:
    print(f"{name:28s}" + "".join(f"{t[name]:>22s}" for t in tables.values()))
assert tables["extractor only"]["backbone (frozen)"] == "None" and tables["extractor only"]["SPM"] == "non-zero"
assert tables["injector, gamma=0"]["injector gamma"] == "non-zero"
assert tables["injector, gamma=0"]["injector attention + norms"] == "zero"
assert tables["injector, gamma=0.1"]["injector attention + norms"] == "non-zero"
assert all(t["backbone (frozen)"] == "None" for t in tables.values())

# %% [markdown] notes
# * The frozen backbone never gets a `.grad` (its parameters do not require one). In the extractor-only adapter the
#   ViT even runs under `no_grad`: no graph, no stored activations.
# * With injectors, the gradient must pass *through* the frozen blocks to reach the injectors of earlier
#   interactions — so every ViT block's activations are kept for backward.
# * At `γ = 0` only `γ` itself gets a gradient (`∂out/∂attn = γ = 0`): the injector starts as the identity and
#   opens gradually — the reason for the ViT-Adapter's zero init.
#
# **Activation memory.** What autograd saves for backward in one training forward, counted with a saved-tensors hook
# (parameters excluded), here and for ViT-L at 512 × 512, batch 4, on the meta device. This is an estimate: the
# exact bytes depend on kernels (e.g. fused attention saves less); both variants are counted without gradient
# checkpointing (`with_cp=False`; the official `with_cp=True` checkpoints the extractors and saves even less).

# %% skip
def saved_bytes(a, inp):
    params = {id(p) for p in a.parameters()}
    saved = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a(inp)
    return sum(saved.values())


mem = {}
for label, bb, idx, heads, inp, dev in [("tiny, 128x128, batch 4", backbone, IDX, HEADS, x, None),
                                        ("ViT-L, 512x512, batch 4", vitl, [4, 11, 17, 23], 16, x_l, "meta")]:
    for use_inj in (False, True):
        seed_everything(0)
        a = DINOv3Adapter(bb, interaction_indexes=idx, deform_num_heads=heads, use_injector=use_inj, with_cp=False,
                          device=dev).train()
        mem[label, use_inj] = saved_bytes(a, inp)
print(f"{'saved for backward':26s} {'extractor only':>15s} {'+ injectors':>13s} {'ratio':>7s}")
for label in ("tiny, 128x128, batch 4", "ViT-L, 512x512, batch 4"):
    a_, b_ = mem[label, False], mem[label, True]
    print(f"{label:26s} {a_ / 2**20:11,.0f} MiB {b_ / 2**20:9,.0f} MiB {b_ / a_:7.1f}")
assert mem["ViT-L, 512x512, batch 4", True] > 3 * mem["ViT-L, 512x512, batch 4", False]

# %% [markdown] skip
# **Time.** Median of 3 runs on this machine (CPU, 2 threads; these numbers vary from run to run and are not
# compared by CI): inference (`no_grad`) and one training step (forward + backward), batch 4 at 128 × 128.

# %% skip
# NBVAL_IGNORE_OUTPUT
def median_time(fn, reps=3):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(a):
    a.zero_grad(set_to_none=True)
    sum(f.square().mean() for f in a(x).values()).backward()


timings = {}
for label, a in [("extractor only", adapter), ("injector + extractor", adapter_inj)]:
    a_train = copy.deepcopy(a).train()
    with torch.no_grad():
        t_inf = median_time(lambda: a.eval()(x))
    t_train = median_time(lambda: train_step(a_train))
    timings[label] = (t_inf, t_train)
    print(f"{label:22s} trainable {count_params(a, trainable_only=True):>10,d}   inference {1e3 * t_inf:7.0f} ms   "
          f"train step {1e3 * t_train:7.0f} ms")

# %% [markdown] skip
# On the tiny model the injector costs time in the **training step** (the backward pass now runs through the ViT
# blocks it writes into); at **inference** the two designs differ by little (printed above; a few ms of run-to-run
# noise on this machine), so speed at inference is not the argument. At ViT-L and 512 × 512 the memory table
# decides: the injector design must keep the whole backbone's activations for backward, the extractor-only design
# none.

# %% skip
# NBVAL_IGNORE_OUTPUT
result = {"adapter_trainable_vitl": train_plain, "injector_extra_vitl": train_inj - train_plain,
          "saved_mib_vitl_512_b4": round(mem["ViT-L, 512x512, batch 4", False] / 2**20),
          "saved_mib_vitl_512_b4_injector": round(mem["ViT-L, 512x512, batch 4", True] / 2**20),
          "ms_train_step_tiny": round(1e3 * timings["extractor only"][1]),
          "ms_train_step_tiny_injector": round(1e3 * timings["injector + extractor"][1]),
          **{f"probe_miou_f1_f4_{name.replace(' ', '_')}": [round(v, 3) for v in probe[name].values()]
             for name in adapters}}
print("RESULT " + json.dumps(result))

# %% [markdown] skip
# ## 7. Summary
#
# The adapter's module table for the tiny run (`dinolab.trace`, depth 2 without the SPM's inner layers) and a
# `torchinfo` summary; the ViT-L table at 512 × 512 is in section 4.

# %% skip
summary_table = trace(adapter, x, max_depth=2)
print(Trace([r for r in summary_table if not r.name.startswith("spm.")]))

# %% skip
print(torchinfo.summary(adapter, input_data=x, depth=1, col_names=("output_size", "num_params", "trainable"),
                        verbose=0))

# %% [markdown] slide
# ### What to remember
#
# * DINOv3's adapter = **frozen ViT** (read at 4 blocks, once, under `no_grad`) + **SPM** (c1 map, c2/c3/c4 tokens)
#   + 4 **extractor-only** interaction blocks (2 extra extractors in the last) + `up(c2)` into c1 + the 4 ViT maps
#   added + BatchNorm → **f1..f4** at strides 4/8/16/32, all with D channels. ViT-L at 512², batch 4:
#   `[4,1024,128,128]`, `[4,1024,64,64]`, `[4,1024,32,32]`, `[4,1024,16,16]`.
# * Extractor: the **21·HW/1024 SPM tokens are the queries** (5376 at 512²), the ViT's 32 × 32 map the value;
#   1-level deformable attention (16 heads, 4 points, value width D/2) + ConvFFN (D/4, depthwise conv per level).
#   `deform_inputs2` = reference points `[1, 5376, 1, 2]`, shapes `[[32, 32]]`, start `[0]`.
# * **No injector** (official; see the blog post's corrections): the backbone's outputs are
#   untouched (bit-identical here), it can serve several heads, and no ViT activation is stored for backward.
#   The original ViT-Adapter's injectors write into the ViT and need gradients through it — ≈4–5× the saved
#   activations for ViT-L at 512², batch 4 (estimate above).
# * ViT-L adapter: **16,654,272 trainable** parameters (5.5 % of the frozen 303 M backbone).
# * Trained in the segmentation pipeline, every level reads more of the classes, f1 becomes almost all up(c2), and
#   the transposed conv's checkerboard stays: the layers after the adapter learn to read through it.

# %% [markdown] skip
# ### Exercises
#
# 1. Set `add_vit_feature=False` and compare the PCA maps of f3 with and without the ViT maps added. Which levels
#    change most?
# 2. Plot the sampling locations of one c2 query through the four extractors after the official init
#    (`deform_attn_by_hand` computes `loc`): where on the ViT map does a stride-8 query look?
# 3. Train the injector variant for a few steps with `γ` initialised to 0: how fast does `γ` move away from 0, and
#    in which interaction first?
# 4. Recompute the memory table with `with_cp=True` (the official default). Why does the saved-tensors hook now
#    undercount, and what does gradient checkpointing trade for memory?
# 5. The official rule gives `[0, 1, 2, 3]` for a 6-block model. Build the tiny adapter with it and compare the
#    ViT part of f1 with ours (`[1, 2, 4, 5]`): what do the first blocks carry?
