# %% [markdown] slide
# # 04 · The DINOv3 ViT: assembled, measured, loaded
#
# Notebooks 01–03 built the parts: the patch embedding, 2-D RoPE, and the pre-norm block with
# LayerScale. Here we put them together into the DINOv3 Vision Transformer of
# `dinov3/models/vision_transformer.py`, and then look at it from every side a user meets:
#
# 1. **assemble** it from the parts in a few cells, printing shapes, and check it equals `dinolab.vit.DinoVisionTransformer`;
# 2. the **token layout**: `[cls, 4 storage tokens, patches]`, where the patches start (index 5), and the **mask token**;
# 3. its **outputs**: `forward_features`, `forward`, `get_intermediate_layers` and the layers the official evals take;
# 4. the **seven released configurations** side by side (exact parameter counts, state-dict keys, memory, FLOPs),
#    all built on PyTorch's `meta` device, so no memory is used and nothing is computed;
# 5. **loading weights**: transformers folders and official `.pth` files, the key mapping between the two,
#    and what a bad checkpoint does;
# 6. **features** of a photo: token norms and PCA maps, with random weights, the tiny checkpoint, or real DINOv3 weights.
#
# Expected run time: about 30 s on 2 CPU cores.

# %% skip
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown(viz.series_map("04")))

# %% skip
import os

# set before transformers is imported: no progress bars, no network
for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(k, v)

import tempfile
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dinolab import hub, trace, weights
from dinolab.block import Mlp, SelfAttentionBlock
from dinolab.patch_embed import PatchEmbed
from dinolab.rope import RopePositionEmbedding
from dinolab.utils import count_params, get_device, seed_everything

seed_everything(0)
viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
print("device type:", DEVICE.type)

# %% [markdown] slide
# ## 1. Assemble the ViT from its parts
#
# The official forward pass (`DinoVisionTransformer.forward_features`) is short:
#
# ```
# x = patch_embed(img)                     # (B, h, w, D)   conv 16x16 stride 16
# x = x.flatten(1, 2)                      # (B, h*w, D)    row-major
# x = cat([cls, storage_0..3, x], dim=1)   # (B, 5+h*w, D)  no absolute position embedding!
# for blk in blocks:
#     x = blk(x, rope_embed(H=h, W=w))     # RoPE (sin, cos) rotates q,k of the patch tokens only
# x_norm = norm(x)                         # one LayerNorm (eps 1e-5) over all tokens
# ```
#
# The official code calls `rope_embed` once per block: in training each block then draws its own random
# coordinate augmentation (`rescale_coords=2`). In eval the result is the same for every block, so we compute it
# once below (`dinolab.vit` calls it in every block, as the official code: same numbers).
#
# We use the settings every released model shares (`dinov3/hub/backbones.py`, in `dinolab.hub.HUB_COMMON`)
# with the small width of `dinov3_vittiny16`, a configuration of ours that notebook 05 pretrains on a CPU.

# %% skip
C = {**hub.HUB_COMMON, **hub.CONFIGS["dinov3_vittiny16"]}
D, DEPTH, HEADS, N_STORAGE = C["embed_dim"], C["depth"], C["num_heads"], C["n_storage_tokens"]
for k in ["patch_size", "embed_dim", "depth", "num_heads", "ffn_ratio", "ffn_layer", "n_storage_tokens",
          "layerscale_init", "norm_layer", "mask_k_bias", "pos_embed_rope_base", "pos_embed_rope_rescale_coords"]:
    print(f"{k:31s} {C[k]}")

# %% [markdown] skip
# Each part is built with the **official attribute names** (`patch_embed`, `cls_token`, `storage_tokens`,
# `mask_token`, `rope_embed`, `blocks`, `norm`), so the state dict of this bag of parts has exactly the keys
# of the full model. Then we overwrite *every* parameter with seeded noise N(0, 0.1): with the official init
# (LayerScale γ = 1e-5, zero mask token) a wrong wiring inside the blocks would hardly change the output, so
# a comparison would prove little.

# %% skip
norm_layer = partial(nn.LayerNorm, eps=1e-5)  # "layernormbf16" in the official code: a plain LayerNorm, eps 1e-5

parts = nn.Module()
parts.patch_embed = PatchEmbed(img_size=224, patch_size=16, in_chans=3, embed_dim=D, flatten_embedding=False)
parts.cls_token = nn.Parameter(torch.zeros(1, 1, D))
parts.storage_tokens = nn.Parameter(torch.zeros(1, N_STORAGE, D))
parts.mask_token = nn.Parameter(torch.zeros(1, D))  # (1, D) in the official code; transformers stores (1, 1, D)
parts.rope_embed = RopePositionEmbedding(D, num_heads=HEADS, base=100.0, rescale_coords=2, dtype="fp32")
parts.blocks = nn.ModuleList(
    SelfAttentionBlock(dim=D, num_heads=HEADS, ffn_ratio=4.0, qkv_bias=True, proj_bias=True, ffn_bias=True,
                       norm_layer=norm_layer, ffn_layer=Mlp, init_values=1e-5, mask_k_bias=True)
    for _ in range(DEPTH)
)
parts.norm = norm_layer(D)
parts.eval()

g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in parts.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
parts = parts.to(DEVICE)
print(f"{count_params(parts):,} parameters in {len(parts.state_dict())} state-dict entries")

# %% [markdown] slide
# The input: the sample photo at 128 × 192 pixels, and its mirror image (B = 2). A non-square input (8 × 12 patches)
# makes the row-major order visible in the shapes.

# %% hide-input
B = 2
photo_small = viz.load_photo((128, 192))  # (3, 128, 192) in [0, 1]
img = viz.normalize(torch.stack([photo_small, photo_small.flip(-1)])).to(DEVICE)
print(f"input                  {tuple(img.shape)}")
with torch.no_grad():
    x = parts.patch_embed(img)
    _, h, w, _ = x.shape
    print(f"patch_embed            {tuple(x.shape)}   (B, h, w, D): h = 128/16, w = 192/16")
    x = x.flatten(1, 2)
    print(f"flatten(1, 2)          {tuple(x.shape)}      (B, h*w, D): patch (r, c) is token r*w + c")
    prefix = torch.cat([parts.cls_token.expand(B, -1, -1), parts.storage_tokens.expand(B, -1, -1)], dim=1)
    print(f"cls + storage          {tuple(prefix.shape)}        the same learned vectors for every image")
    x = torch.cat([prefix, x], dim=1)
    print(f"token sequence         {tuple(x.shape)}      1 + {N_STORAGE} + {h}*{w} = {1 + N_STORAGE + h * w}")
    sin, cos = parts.rope_embed(H=h, W=w)
    print(f"rope_embed(H={h}, W={w}) sin {tuple(sin.shape)}, cos {tuple(cos.shape)}  (h*w, D_head): no batch, no heads")
    for i, blk in enumerate(parts.blocks):
        x = blk(x, (sin, cos))
    print(f"after {DEPTH} blocks         {tuple(x.shape)}      the residual stream keeps its shape")
    x_prenorm = x
    x_norm = parts.norm(x)
    mine = {"x_norm_clstoken": x_norm[:, 0], "x_storage_tokens": x_norm[:, 1:1 + N_STORAGE],
            "x_norm_patchtokens": x_norm[:, 1 + N_STORAGE:], "x_prenorm": x_prenorm}
for k, v in mine.items():
    print(f"{k:22s} {tuple(v.shape)}")

# %% [markdown] slide
# Now the library model: load the parts' state dict with `strict=True` (it only works because every name
# matches) and compare all four outputs.

# %% hide-input
model_r = hub.dinov3_vittiny16().eval()  # "_r": random weights
result = model_r.load_state_dict(parts.state_dict(), strict=True)
model_r = model_r.to(DEVICE)
print("missing:", result.missing_keys, " unexpected:", result.unexpected_keys)
with torch.no_grad():
    ref = model_r.forward_features(img)
for k in mine:
    torch.testing.assert_close(mine[k], ref[k])
print("our assembly == dinolab.vit.DinoVisionTransformer.forward_features: all 4 outputs match")
print("output keys:", list(ref))

# %% [markdown] slide
# ## 2. The token layout: cls, 4 storage tokens, patches — and the mask token
#
# The sequence is `[cls, 4 storage tokens, patches]`, patches from index 5, row-major, and only they get RoPE: the
# layout is drawn, with its indices, in [notebook 00](00_dino_v1_v2_v3.ipynb), section 3. What the model adds:
#
# * the parameters: **`cls_token`** `(1, 1, D)` (read by the DINO loss, notebook 05, and the classifiers, notebook 12)
#   and **`storage_tokens`** `(1, 4, D)`, the registers of *Vision Transformers Need Registers* (Darcet et al.,
#   ICLR 2024; transformers calls them `register_tokens`): attended to, read by no loss;
# * **`mask_token`** `(1, D)`, zero at init: `forward_features(x, masks)` with a boolean `masks` of shape
#   `(B, h·w)` replaces the masked patch embeddings by this one learned vector *before* the blocks
#   (`torch.where(masks.unsqueeze(-1), mask_token, x)`). The student solves iBOT's masked-patch task on such
#   inputs (notebook 05). cls and storage tokens are never masked.

# %% skip
def token_index(r: int, c: int, w: int, n_storage: int = N_STORAGE) -> int:
    """Sequence index of the patch in row r, column c of a grid w patches wide."""
    return 1 + n_storage + r * w + c


print("cls at 0, storage at", list(range(1, 1 + N_STORAGE)), f"; first patch at {token_index(0, 0, w)}")
print(f"last patch of the {h}x{w} grid (r={h - 1}, c={w - 1}) at {token_index(h - 1, w - 1, w)}; "
      f"sequence length {x.shape[1]}")

# a block mask like iBOT's: 9 of the 8x12 patches of image 0, none of image 1
masks = torch.zeros(B, h * w, dtype=torch.bool, device=DEVICE)
masks[0, [r * w + c for r in range(2, 5) for c in range(4, 7)]] = True
with torch.no_grad():
    tok, hw = model_r.prepare_tokens_with_masks(img, masks)
    tok_plain, _ = model_r.prepare_tokens_with_masks(img)
    out_masked = model_r.forward_features(img, masks=masks)
print("masks", tuple(masks.shape), "->", int(masks.sum()), "masked patches; tokens", tuple(tok.shape), "grid", hw)
is_mask = (tok[0] == model_r.mask_token[0]).all(-1)  # which positions now hold the mask token
assert torch.equal(is_mask[1 + N_STORAGE:], masks[0]) and not is_mask[: 1 + N_STORAGE].any()
assert torch.equal(tok[1], tok_plain[1]) and torch.equal(tok[0, :5], tok_plain[0, :5])
print("masked positions hold mask_token; cls/storage and the unmasked image are untouched")
print("forward_features(..., masks=masks)['masks'] is the tensor passed in:", out_masked["masks"] is masks)

# %% [markdown] notes
# The figure draws image 0: each patch is labelled with its token index (dark = masked), and the sequence the
# blocks see is drawn beside it.

# %% slide hide-input
hs, ws = h, w
mask_small = masks[0].view(hs, ws).cpu()

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12.8, 5.2), gridspec_kw={"width_ratios": [1.1, 1]})
shown = photo_small.clone()
for r, c in mask_small.nonzero().tolist():
    shown[:, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] *= 0.25
viz.draw_patch_grid(ax0, shown, title="patches: token index (dark = masked)")
for r in range(hs):
    for c in range(ws):
        ax0.text(c * 16 + 8, r * 16 + 8, str(token_index(r, c, ws)), ha="center", va="center", fontsize=10,
                 color="white" if mask_small[r, c] else "black",
                 bbox=None if mask_small[r, c] else dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.75))

seq = [(0, "cls", viz.COLORS[3])] + [(i, f"s{i - 1}", viz.COLORS[4]) for i in range(1, 5)]
seq += [(token_index(0, c, ws), None, viz.COLORS[0]) for c in range(6)] + [(None, "…", "white")]
seq += [(token_index(r, c, ws), None, viz.COLORS[0]) for r, c in [(2, 4), (2, 5)]] + [(None, "…", "white")]
seq += [(token_index(hs - 1, c, ws), None, viz.COLORS[0]) for c in (ws - 2, ws - 1)]
for j, (idx, label, color) in enumerate(seq):
    masked = idx is not None and idx >= 5 and bool(mask_small.flatten()[idx - 5])
    ax1.add_patch(plt.Rectangle((j, 0), 0.9, 0.9, fc="0.25" if masked else color, ec="k", lw=0.5))
    text = "M" if masked else (label or "p")
    ax1.text(j + 0.45, 0.45, text, ha="center", va="center", fontsize=11, color="white" if color != "white" else "k")
    if idx is not None:
        ax1.text(j + 0.45, -0.3, str(idx), ha="center", va="center", fontsize=10)
ax1.annotate("", xy=(0, 1.25), xytext=(5, 1.25), arrowprops=dict(arrowstyle="<->", lw=0.8))
ax1.text(2.5, 1.45, "cls + 4 storage:\nno position, no RoPE", ha="center", fontsize=11)
ax1.annotate("", xy=(5, 1.25), xytext=(len(seq), 1.25), arrowprops=dict(arrowstyle="<->", lw=0.8))
ax1.text(5 + (len(seq) - 5) / 2, 1.45, f"{hs * ws} patch tokens, row-major:\nRoPE rotates their q and k", ha="center", fontsize=11)
ax1.text(0, -1.1, "M = patch embedding replaced by mask_token (iBOT input)\n"
         f"the blocks see 1 + {N_STORAGE} + {hs}·{ws} = {1 + N_STORAGE + hs * ws} tokens", fontsize=11, va="top")
ax1.set_xlim(-0.3, len(seq) + 0.2)
ax1.set_ylim(-2.0, 2.3)
ax1.axis("off")
ax1.set_title("the sequence (index below each token)")
plt.tight_layout()
plt.show()

# %% [markdown] slide
# ## 3. Outputs: `forward_features`, `forward`, `get_intermediate_layers`
#
# `forward_features(x)` returns a dict (a list of dicts for a list of crops, as in training);
# `forward(x)` returns `head(x_norm_clstoken)` with `head = nn.Identity()`, i.e. the normed CLS token.
# Only `x_prenorm` is before the final norm.

# %% hide-input
def shape_of(v):
    return tuple(v.shape) if torch.is_tensor(v) else v


with torch.no_grad():
    ff = model_r.forward_features(img)
    cls_out = model_r(img)
rows = ["| key | shape | what |", "|---|---|---|"]
what = {"x_norm_clstoken": "normed cls token", "x_storage_tokens": "normed storage tokens",
        "x_norm_patchtokens": "normed patch tokens, row-major", "x_prenorm": "all tokens before the final norm",
        "masks": "the masks passed in"}
for k, v in ff.items():
    rows.append(f"| `{k}` | `{shape_of(v)}` | {what[k]} |")
rows.append(f"| `model(x)` | `{tuple(cls_out.shape)}` | `forward`: head(x_norm_clstoken), head = Identity |")
display(Markdown("\n".join(rows)))
torch.testing.assert_close(cls_out, ff["x_norm_clstoken"])
torch.testing.assert_close(model_r.norm(ff["x_prenorm"]),
                           torch.cat([ff["x_norm_clstoken"][:, None], ff["x_storage_tokens"], ff["x_norm_patchtokens"]], 1))
print("forward == x_norm_clstoken;  norm(x_prenorm) == [cls, storage, patches]")

# %% [markdown] skip
# `get_intermediate_layers(x, n=..., reshape=..., return_class_token=..., return_extra_tokens=..., norm=...)` is
# what every dense eval calls (`dinov3/eval/segmentation`, `depth`, `detection`, the adapter):
#
# * `n` an **int** → the last `n` blocks; `n` a **list** → those 0-based block indices;
# * `norm=True` (default) passes each block output through the **final** `norm` (the same LayerNorm for all layers);
# * `reshape=True` turns patch tokens `(B, h·w, D)` into maps `(B, D, h, w)`;
# * `return_class_token` / `return_extra_tokens` add the cls `(B, D)` and storage `(B, 4, D)` tokens: each entry
#   becomes a tuple `(patches, cls[, storage])`.

# %% skip
with torch.no_grad():
    last4 = model_r.get_intermediate_layers(img, n=4)
    picked = model_r.get_intermediate_layers(img, n=[1, 3, 5], reshape=True)
    full = model_r.get_intermediate_layers(img, n=[5], return_class_token=True, return_extra_tokens=True)
    raw = model_r.get_intermediate_layers(img, n=1, norm=False)
print("n=4                       ->", len(last4), "x", tuple(last4[0].shape), "(blocks 2, 3, 4, 5)")
print("n=[1,3,5], reshape=True   ->", len(picked), "x", tuple(picked[0].shape), "(B, D, h, w)")
p, c, s = full[0]
print("n=[5], cls + extra tokens ->", len(full), "x (patches", tuple(p.shape), ", cls", tuple(c.shape),
      ", storage", tuple(s.shape), ")")
print("n=1, norm=False           ->", len(raw), "x", tuple(raw[0].shape))

# the last block, normed, is forward_features; unnormed it is x_prenorm; reshape is a view change only
torch.testing.assert_close(last4[-1], ff["x_norm_patchtokens"])
torch.testing.assert_close(c, ff["x_norm_clstoken"])
torch.testing.assert_close(s, ff["x_storage_tokens"])
torch.testing.assert_close(raw[0], ff["x_prenorm"][:, 1 + N_STORAGE:])
torch.testing.assert_close(picked[2], last4[-1].reshape(B, h, w, D).permute(0, 3, 1, 2))
torch.testing.assert_close(picked[1], last4[1].reshape(B, h, w, D).permute(0, 3, 1, 2))  # block 3 in both
print("checks: last layer == forward_features; norm=False == x_prenorm; reshape == permute of (B, h, w, D)")

# %% [markdown] slide
# **Which layers do the official evals take?** `dinov3/eval/segmentation/models/__init__.py::_get_backbone_out_indices`
# (`FOUR_EVEN_INTERVALS`) takes `[i·(depth//4) − 1 for i = 1..4]`, except for 24 blocks, where it uses
# `[4, 11, 17, 23]` ("used in the paper"). The detection backbone (`dinov3/eval/detection/models/backbone.py`)
# uses the plain formula for every depth; the released 7B depth head (`dinov3/hub/depthers.py`) and the
# adapter's default (`interaction_indexes`) are `[9, 19, 29, 39]`. Computed for each released depth:

# %% hide-input
def seg_out_indices(depth: int) -> list[int]:
    """FOUR_EVEN_INTERVALS of the official segmentation eval."""
    return [4, 11, 17, 23] if depth == 24 else [i * (depth // 4) - 1 for i in range(1, 5)]


def det_out_indices(depth: int) -> list[int]:
    return [m * depth // 4 - 1 for m in range(1, 5)]


rows = ["| model | depth | segmentation / depth (FOUR_EVEN_INTERVALS) | detection |", "|---|---|---|---|"]
for name in hub.RELEASED:
    dep = hub.CONFIGS[name]["depth"]
    rows.append(f"| `{name}` | {dep} | `{seg_out_indices(dep)}` | `{det_out_indices(dep)}` |")
display(Markdown("\n".join(rows)))
assert seg_out_indices(12) == [2, 5, 8, 11] and seg_out_indices(24) == [4, 11, 17, 23]
assert seg_out_indices(40) == [9, 19, 29, 39] == det_out_indices(40)

# %% [markdown] slide
# ## 4. The seven released configurations: what a checkpoint holds
#
# Their widths, depths, FFNs, parameter counts (asserted equal to the official ones) and FLOPs are computed in
# [notebook 00](00_dino_v1_v2_v3.ipynb), sections 4–5. Here, what loading one means: how many state-dict keys a
# checkpoint has (asserted equal to the official checkpoints') and what its weights cost in memory, read off models
# built with `hub.build(name, device="meta")` (shapes, no storage: even the 6.7 B model costs nothing).
# Memory = parameters × 4 bytes (fp32) or × 2 bytes (bf16): the weights alone, no activations.

# %% hide-input
OFFICIAL_KEYS = {"dinov3_vits16": 188, "dinov3_vits16plus": 212, "dinov3_vitb16": 188, "dinov3_vitl16": 368,
                 "dinov3_vitl16plus": 416, "dinov3_vith16plus": 552, "dinov3_vit7b16": 610}


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


rows = ["| model | FFN | qkv bias | parameters | state-dict keys | fp32 | bf16 |", "|---|---|---|---|---|---|---|"]
table = {}
for name in [*hub.RELEASED, "dinov3_vittiny16"]:
    m = hub.build(name, device="meta").eval()
    n_par, n_keys = count_params(m), len(m.state_dict())
    table[name] = dict(params=n_par, keys=n_keys)
    rows.append(f"| `{name}` | {hub.CONFIGS[name]['ffn_layer']} | {m.blocks[0].attn.qkv.bias is not None} | "
                f"{n_par:,} | {n_keys} | {human_bytes(4 * n_par)} | {human_bytes(2 * n_par)} |")
display(Markdown("\n".join(rows)))
for name in hub.RELEASED:
    assert table[name]["keys"] == OFFICIAL_KEYS[name], name
print("state-dict key counts equal the official ones for all 7 released models")

# %% [markdown] notes
# How to read it:
# * The "+" models swap the GELU MLP (`fc1`, `fc2`) for **SwiGLU** (`w1`, `w2`, `w3`, hidden = 2/3 · ratio · D rounded
#   up to a multiple of 8): one more matrix per block, so 2 more keys (weight, bias) per block: ViT-S+ has
#   188 + 2·12 = 212 keys.
# * The **7B** has `D_head = 128` (all others 64), no qkv bias (so no `bias_mask` either), SwiGLU aligned to 64,
#   and an extra `local_cls_norm` used only on local crops in training.
# * A ViT-L holds 0.3 B parameters, about 1.1 GiB in fp32; the 7B needs 12.5 GiB for its weights even in bf16.
# * `dinov3_vittiny16` is **not** an official model: it is our CPU-sized config for notebook 05.

# %% [markdown] skip
# ### The full tensor flow of ViT-L at 512 × 512, batch 4
#
# This is the backbone part of the blog post's "完整的张量流维度跟踪" (full tensor-flow shape trace: B = 4, 512², ViT-L,
# D = 1024) that this series started from ([notebook 00](00_dino_v1_v2_v3.ipynb)), made by
# `dinolab.trace` with hooks on every module down to depth 3, on the meta device.

# %% skip
vitl = hub.build("dinov3_vitl16", device="meta").eval()
x_meta = torch.empty(4, 3, 512, 512, device="meta")
with FlopCounterMode(display=False) as fc:
    flow = trace.trace(vitl, x_meta, max_depth=3)
print(flow)
print(f"\n{fc.get_total_flops() / 1e12:.2f} TFLOPs for the batch of 4 at 512x512")

# %% [markdown] skip
# Inside `attn` (not modules, so not in the table): the fused `qkv` output `[4, 1029, 3072]` is read as
# `(B, N, 3, heads, D_head)` and split into q, k, v of shape `[4, 16, 1029, 64]`; RoPE rotates rows 5…1028 of q and
# k; attention weights would be `[4, 16, 1029, 1029]`. The dense heads take 4 intermediate layers; here are
# their shapes (the blog post's "[4, 1024, 1024]" is the un-reshaped patch tokens of one layer):

# %% skip
B4, N_l, heads_l = 4, 1 + 4 + 32 * 32, vitl.num_heads
print(f"q, k, v          [{B4}, {heads_l}, {N_l}, {vitl.embed_dim // heads_l}]")
print(f"attention matrix [{B4}, {heads_l}, {N_l}, {N_l}] = {human_bytes(4 * B4 * heads_l * N_l**2)} per block in fp32 "
      "if materialised (SDPA's fused kernels never store it whole)")
layers = vitl.get_intermediate_layers(x_meta, n=seg_out_indices(24), return_class_token=True)
flat = vitl.get_intermediate_layers(x_meta, n=seg_out_indices(24))
maps = vitl.get_intermediate_layers(x_meta, n=seg_out_indices(24), reshape=True)
print(f"get_intermediate_layers(n={seg_out_indices(24)}):")
print(f"  reshape=False              -> {len(flat)} x {list(flat[0].shape)}")
print(f"  reshape=True               -> {len(maps)} x {list(maps[0].shape)}")
print(f"  return_class_token=True    -> {len(layers)} x ({list(layers[0][0].shape)}, {list(layers[0][1].shape)})")

# %% [markdown] skip
# ### torchinfo summary of the tiny model
#
# `torchinfo` runs one forward pass with hooks, like `dinolab.trace` (we build a fresh, seeded model for each
# summary, to check that it is deterministic). Its parameter total is right. Its **mult-adds total is not** for
# transformers: it multiplies a Linear's weights by the batch size only, not by the number of tokens (checked
# below), so it is about N times too small. Use the FLOP counter above instead.

# %% skip
import torchinfo

def tiny_summary():
    seed_everything(0)
    tiny = hub.dinov3_vittiny16().eval()
    return tiny, torchinfo.summary(tiny, input_size=(1, 3, 224, 224), depth=2, verbose=0, device="cpu")


tiny, summary = tiny_summary()
print(summary)
assert str(tiny_summary()[1]) == str(summary), "torchinfo summary is not deterministic"
assert summary.total_params == count_params(tiny)
fc1 = next(layer for layer in summary.summary_list if layer.var_name == "fc1")
fc1_w = tiny.blocks[0].mlp.fc1.weight.numel()
print(f"torchinfo mult-adds of one fc1: {fc1.macs:,} = its parameter count {fc1.num_params:,}; "
      f"true: {fc1_w:,} weights x 201 tokens = {fc1_w * 201:,}")
assert fc1.macs == fc1.num_params

# %% [markdown] slide
# ## 5. Loading weights: transformers folders, official `.pth`, and their key mapping
#
# Official checkpoints (`dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth`, …) and the transformers port
# (`facebook/dinov3-vitl16-pretrain-lvd1689m`) hold the same network under different names, and transformers splits
# the fused `qkv` and drops the (always masked) k bias. `dinolab.weights.load_backbone(path)` reads either, maps the
# keys to the official layout (`hf_to_official`), infers the configuration from the tensor shapes (and
# `config.json`), and loads with `strict=True`.
#
# We test this on a tiny transformers `DINOv3ViTModel` with every parameter randomised, saved with
# `save_pretrained` to a temporary folder: `config.json` + `model.safetensors`, the layout of a hub download.

# %% hide-input
import transformers
from transformers import DINOv3ViTConfig, DINOv3ViTModel

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
hf_cfg = DINOv3ViTConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         patch_size=16, image_size=64, num_register_tokens=4, layerscale_value=1e-5)
hf = DINOv3ViTModel(hf_cfg).eval()
with torch.no_grad():
    for p_ in hf.parameters():
        p_.normal_(0, 0.1)  # nothing left at its init value, so no wrong mapping can hide

x_small = torch.randn(2, 3, 64, 96)
with tempfile.TemporaryDirectory() as folder:
    hf.save_pretrained(folder)
    print("saved files:", sorted(os.listdir(folder)))
    ours = weights.load_backbone(folder)  # config.json + model.safetensors
    torch.save(weights.hf_to_official(hf.state_dict()), Path(folder) / "official.pth")
    ours_pth = weights.load_backbone(Path(folder) / "official.pth", num_heads=4)  # a .pth has no config.json

with torch.no_grad():
    ref_tokens = hf(pixel_values=x_small).last_hidden_state  # [cls, registers, patches], normed
    o = ours.forward_features(x_small)
    o_pth = ours_pth.forward_features(x_small)
our_tokens = torch.cat([o["x_norm_clstoken"][:, None], o["x_storage_tokens"], o["x_norm_patchtokens"]], 1)
diff = (our_tokens - ref_tokens).abs().max().item()
print(f"tokens {tuple(our_tokens.shape)}; max |ours - transformers| < 1e-4: {diff < 1e-4}")
assert diff < 1e-4
torch.testing.assert_close(o_pth["x_prenorm"], o["x_prenorm"])
print("the official-layout .pth gives the same model")
print("inferred:", {k: weights.infer_config(weights.hf_to_official(hf.state_dict()), hf_cfg.to_dict())[k]
                    for k in ("embed_dim", "depth", "num_heads", "ffn_layer", "n_storage_tokens", "mask_k_bias")})

# %% skip
# NBVAL_IGNORE_OUTPUT
# the exact difference depends on the CPU's float arithmetic, so this cell's output is not compared
print(f"max |ours - transformers| = {diff:.1e} (float32 rounding)")

# %% [markdown] skip
# **The key mapping for one block**, computed, not typed: we convert the real transformers keys with
# `hf_to_official` and, for each official tensor, find which transformers tensor (or which third of it) holds the
# same numbers.

# %% skip
hf_sd = hf.state_dict()
off_sd = weights.hf_to_official(hf_sd)


def sources(off_key: str) -> str:
    """Where the numbers of one official tensor are found among the transformers tensors."""
    t = off_sd[off_key]
    found = []  # (q/k/v position, text)
    for hk, hv in hf_sd.items():
        if hv.shape == t.shape and torch.equal(hv, t):
            found.append((0, f"`{hk}`"))
        elif hv.numel() == t.numel() and torch.equal(hv.reshape(t.shape), t):
            found.append((0, f"`{hk}` {tuple(hv.shape)}, reshaped"))
        elif t.shape[0] == 3 * hv.shape[0] and t.shape[1:] == hv.shape[1:]:  # one third of the fused qkv
            for j, (third, chunk) in enumerate(zip("qkv", t.chunk(3))):
                if torch.equal(chunk, hv):
                    found.append((j, f"{third} third ← `{hk}`"))
    q, k, v = t.chunk(3) if ".attn.qkv." in off_key else (None, None, None)
    if off_key.endswith("qkv.bias") and not k.any():
        found.append((1, "k third = zeros (transformers has no k bias)"))
    if off_key.endswith("bias_mask"):
        found.append((0, f"none: made by `hf_to_official`, {q[0]:g} / {k[0]:g} / {v[0]:g} on the q / k / v thirds"))
    return "; ".join(text for _, text in sorted(found)) or "—"


rows = ["| official key | shape | transformers key(s) |", "|---|---|---|"]
for k in off_sd:
    if k.startswith("blocks.0.") or not k.startswith("blocks."):
        rows.append(f"| `{k}` | `{tuple(off_sd[k].shape)}` | {sources(k)} |")
rows.append(f"| `rope_embed.periods` | `{tuple(ours.rope_embed.periods.shape)}` | none: transformers recomputes "
            "`inv_freq` (a non-persistent buffer); `load_backbone` recomputes `periods` |")
display(Markdown("\n".join(rows)))
assert all(sources(k) != "—" for k in off_sd)

# %% [markdown] slide
# Two differences matter when you compare numbers. transformers has no `k_proj.bias`: it can drop it because the
# official k bias is **masked to zero** by the `bias_mask` buffer (and in the released non-7B checkpoints the whole qkv
# bias is zero, [notebook 03](03_attention_and_blocks.ipynb) section 4), not because a k bias would do nothing — under
# RoPE, k is rotated *after* the bias, so a k bias would be a position-dependent term (notebook 03 shows it). And
# `mask_token` is `(1, D)` officially but `(1, 1, D)` in transformers.
#
# **A bad checkpoint** never half-loads: `load_into` checks everything first and raises one `CheckpointError`
# listing every missing, unexpected and mis-shaped key; the model is left exactly as it was.

# %% hide-input
target = hub.dinov3_vittiny16()
before = {k: v.clone() for k, v in target.state_dict().items()}
bad = {k: v + 1 for k, v in target.state_dict().items()}
del bad["blocks.3.mlp.fc1.weight"]                 # missing
bad["blocks.7.attn.qkv.weight"] = torch.zeros(3)  # unexpected (the model has 6 blocks)
bad["storage_tokens"] = torch.zeros(1, 8, 192)     # wrong shape (8 registers instead of 4)
try:
    weights.load_into(target, bad)
except weights.CheckpointError as e:
    print(f"{type(e).__name__}: {e}")
unchanged = all(torch.equal(before[k], v) for k, v in target.state_dict().items())
print("model unchanged:", unchanged)
assert unchanged

# %% [markdown] notes
# ## 6. Features: the model at hand
#
# From here on we look at features, with the best weights available:
#
# 1. **real DINOv3 weights**, if you set `DINOV3_WEIGHTS` to an official `.pth` or a transformers folder
#    (e.g. `DINOV3_WEIGHTS=~/ckpt/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth make lab`; the official ones need
#    an access request on Meta's site, the transformers ones on the Hugging Face hub);
# 2. else the tiny checkpoint `data/dinov3_tiny_shapesworld.pth`, which **notebook 05 pretrains** on ShapesWorld
#    (used here once it exists);
# 3. else `dinov3_vittiny16` with its official random initialisation (what CI runs).

# %% skip
def repo_root() -> Path:
    here = Path.cwd().resolve()
    return next((p for p in [here, *here.parents] if (p / "dinolab").is_dir()), here)


TINY_CKPT = repo_root() / "data" / "dinov3_tiny_shapesworld.pth"
env_weights = os.environ.get("DINOV3_WEIGHTS")
if env_weights:
    model = weights.load_backbone(env_weights, device=DEVICE)
    SOURCE = "real DINOv3 weights (DINOV3_WEIGHTS)"
    print(f"DINOV3_WEIGHTS set: loaded {env_weights}")
elif TINY_CKPT.exists():
    model = weights.load_backbone(TINY_CKPT, device=DEVICE)
    SOURCE = "tiny checkpoint pretrained in notebook 05"
    print("DINOV3_WEIGHTS not set: using the tiny checkpoint data/dinov3_tiny_shapesworld.pth (from notebook 05)")
else:
    seed_everything(0)
    model = hub.dinov3_vittiny16().to(DEVICE).eval()
    SOURCE = "random init"
    print("DINOV3_WEIGHTS not set: using dinov3_vittiny16 with its official random init "
          "(set DINOV3_WEIGHTS to an official .pth or a transformers folder to see real features)")
RANDOM = SOURCE == "random init"
print(f"model: D={model.embed_dim}, depth={model.n_blocks}, heads={model.num_heads}, "
      f"storage tokens={model.n_storage_tokens}, {count_params(model):,} parameters")

# %% skip
photo = viz.load_photo(448)  # grace_hopper.jpg from matplotlib: 448x448 -> 28x28 patches
x_photo = viz.normalize(photo)[None].to(DEVICE)  # ImageNet (LVD-1689M) mean/std; SAT-493M models use other stats
with torch.no_grad():
    feats = model.forward_features(x_photo)
    per_layer = model.get_intermediate_layers(x_photo, n=model.n_blocks, norm=False,
                                              return_class_token=True, return_extra_tokens=True)
    embed, _ = model.prepare_tokens_with_masks(x_photo)
gh, gw = 448 // model.patch_size, 448 // model.patch_size
print("photo", tuple(photo.shape), "-> tokens", tuple(feats["x_prenorm"].shape), f"({gh}x{gw} patches)")

# %% [markdown] skip
# **Token norms.** In trained ViTs with registers, the register (storage) tokens typically end up with norms unlike
# those of the patch tokens: they are where the network keeps global information (Darcet et al., ICLR 2024). Set
# `DINOV3_WEIGHTS` to see it in DINOv3. At random init nothing of the sort can happen yet: the blocks start almost as
# the identity (each residual branch is scaled by LayerScale γ = 1e-5), so every token leaves the network almost as it
# entered: cls and storage tokens with their N(0, 0.02) init, patch tokens with their linear patch embedding.
# The numbers below are the unnormed residual stream (`norm=False`) after each block, for the model at hand.

# %% skip
n_s = model.n_storage_tokens
norm_rows = []
for i, (pt, ct, st) in enumerate(per_layer):
    norm_rows.append([ct.norm(dim=-1).item(), *st[0].norm(dim=-1).tolist(), pt[0].norm(dim=-1).mean().item()])
norms = torch.tensor(norm_rows)  # (depth, 1 + n_s + 1)
labels = ["cls"] + [f"storage {j}" for j in range(n_s)] + ["patches (mean)"]
print(f"{'block':>5}  " + "  ".join(f"{lab:>14}" for lab in labels))
for i in range(len(norms)):
    print(f"{i:>5}  " + "  ".join(f"{v:>14.3f}" for v in norms[i].tolist()))
change = ((feats["x_prenorm"] - embed).norm() / embed.norm()).item()
print(f"relative change of the tokens through all {model.n_blocks} blocks: {change:.1e}")
if RANDOM:
    assert change < 1e-3  # LayerScale 1e-5: the random network is almost the identity

# %% skip
fig, ax = plt.subplots(figsize=(10, 4.6))
colors = ["tab:red"] + [plt.cm.Oranges(0.4 + 0.15 * j) for j in range(n_s)] + ["tab:blue"]
for j, lab in enumerate(labels):
    ax.plot(range(len(norms)), norms[:, j], marker="o", ms=3, color=colors[j], label=lab)
ax.set_yscale("log")
ax.set_xlabel("block")
ax.set_ylabel("token norm (pre-norm)")
ax.set_title(f"token norms per block — {SOURCE}")
ax.legend(fontsize=11, ncol=2)
plt.tight_layout()
plt.show()

# %% [markdown] notes
# **PCA maps.** Project the normed patch tokens on their first three principal components and show them as RGB
# (`viz.pca_rgb`). For comparison, the same PCA on the raw 16 × 16 × 3 pixel patches. With the random model the two
# maps look alike: its features are (almost) a linear function of the pixels, so the PCA shows colour, brightness
# and texture, not semantics. With real DINOv3 weights the feature map instead groups patches by what they show
# (face, cap, uniform, flag), whatever their colour, which the pixel PCA cannot do. The tiny checkpoint of notebook 05
# has only seen ShapesWorld scenes at 96 px, so expect much less from it on a photo.

# %% slide hide-input
pixel_patches = photo.unfold(1, 16, 16).unfold(2, 16, 16)  # (3, 28, 28, 16, 16)
pixel_patches = pixel_patches.permute(1, 2, 0, 3, 4).reshape(gh * gw, -1)  # (784, 768)
pca_pixels = viz.pca_rgb(pixel_patches).reshape(gh, gw, 3)
pca_feats = viz.pca_rgb(feats["x_norm_patchtokens"][0].cpu()).reshape(gh, gw, 3)
print("pixel patches", tuple(pixel_patches.shape), "-> PCA", tuple(pca_pixels.shape))
print("patch features", tuple(feats["x_norm_patchtokens"][0].shape), "-> PCA", tuple(pca_feats.shape))

fig, axes = plt.subplots(1, 3, figsize=(12.8, 4.8))
axes[0].imshow(viz.to_numpy_image(photo))
axes[0].set_title("photo (448 x 448)")
axes[1].imshow(pca_pixels.numpy())
axes[1].set_title("PCA of raw pixel patches")
axes[2].imshow(pca_feats.numpy())
axes[2].set_title(f"PCA of patch features\n({SOURCE})")
for a in axes:
    a.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown] skip
# ## 7. Summary
#
# The shape table of the tiny model at 224 × 224 (from `dinolab.trace`):

# %% skip
print(trace.trace(hub.dinov3_vittiny16(device="meta").eval(), torch.empty(1, 3, 224, 224, device="meta")))

# %% [markdown] slide
# **What to remember**
#
# * DINOv3's ViT = `PatchEmbed` (16×16 conv) → `[cls, 4 storage, h·w patches]` → `depth` pre-norm blocks with RoPE
#   (patch tokens only; officially recomputed per block) → one final LayerNorm. No absolute position embedding.
# * Patch tokens start at index **5**. `mask_token` replaces masked patch *embeddings* before the blocks (iBOT).
# * `forward_features` gives normed cls `(B, D)`, storage `(B, 4, D)`, patches `(B, h·w, D)` and `x_prenorm`;
#   `forward` gives the normed cls; `get_intermediate_layers` gives chosen blocks through the *final* norm, as
#   `(B, D, h, w)` maps with `reshape=True`. Segmentation/depth take `[2,5,8,11]` (12 blocks), `[4,11,17,23]` (ViT-L),
#   `[9,19,29,39]` (7B).
# * Seven released sizes from 21.6 M to 6.716 B parameters; all share D_head = 64 except the 7B (128); the "+"
#   models and the 7B use SwiGLU; the 7B has no qkv bias.
# * Official and transformers checkpoints differ in names, in the fused/split qkv, in the (masked, hence dropped)
#   k bias and in the mask token's shape; `dinolab.weights.load_backbone` reads both and refuses a bad checkpoint
#   without touching the model.
# * A randomly initialised DINOv3 is nearly the identity (LayerScale 1e-5): its "features" are its patch embedding.

# %% [markdown] skip
# **Exercises**
#
# 1. Build `dinov3_vits16plus` and `dinov3_vits16` on the meta device and list the state-dict keys one has and the
#    other has not. Explain the difference 212 − 188 = 24.
# 2. Run `get_intermediate_layers(img, n=[0], norm=False)` on `model_r` and compare it with
#    `model_r.blocks[0](model_r.prepare_tokens_with_masks(img)[0], model_r.rope_embed(H=8, W=12))`.
# 3. Compute the fp32 size of the attention matrix of the 7B (32 heads) for one 1024 × 1024 image if it were
#    materialised. How does it compare with the weights?
# 4. Feed a 130 × 192 image to `model_r`. What does our `PatchEmbed` do, and what would the official one do?
# 5. Set `n_storage_tokens=0` in `hub.build("dinov3_vittiny16", n_storage_tokens=0)`: which outputs change shape,
#    and what does `weights.load_into` say when you load `model_r.state_dict()` into it?
