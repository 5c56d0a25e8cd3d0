# %% [markdown] slide
# # 03 · Attention and the transformer block
#
# A DINOv3 backbone is a patch embedding (notebook 01) followed by a stack of identical **blocks**
# (12 for ViT-S/B, 24 for ViT-L, 40 for the 7B model). This notebook builds one block from
# primitives and checks every piece against `dinolab` (whose names and layout follow the official
# `dinov3/layers/attention.py`, `block.py`, `ffn_layers.py`, `layer_scale.py`, `rms_norm.py`):
#
# ```
# x = x + ls1(attn(norm1(x), rope))      # multi-head self-attention, RoPE on patch tokens only
# x = x + ls2(mlp(norm2(x)))             # Mlp (GELU) or SwiGLU
# ```
#
# You will build scaled dot-product attention, the fused `qkv` projection and its heads, RoPE inside
# attention, DINOv3's masked k bias, LayerScale, Mlp vs SwiGLU, LayerNorm vs RMSNorm, stochastic
# depth the official way, and finally a whole block by hand, then count what attention costs as
# images grow. Everything runs on 2 CPU cores in about 30 s.

# %% skip
from IPython.display import Markdown

from dinolab import viz

Markdown(viz.series_map("03"))

# %% skip
import math
from functools import partial

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from dinolab.attention import LinearKMaskedBias, SelfAttention
from dinolab.block import LayerScale, Mlp, RMSNorm, SelfAttentionBlock, SwiGLUFFN, swiglu_hidden_dim
from dinolab.hub import CONFIGS, HUB_COMMON, RELEASED, build
from dinolab.rope import RopePositionEmbedding
from dinolab.trace import trace
from dinolab.utils import count_params, get_device, seed_everything
from dinolab.vit import NORM_LAYERS

seed_everything(0)
DEVICE = get_device()  # CUDA if present; the stored outputs come from the CPU
viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
torch.set_printoptions(precision=3, sci_mode=False)

# %% [markdown] slide
# ## 1. Scaled dot-product attention from primitives
#
# Each token asks a question (its **query** $q_i$), advertises what it contains (its **key** $k_j$)
# and carries a message (its **value** $v_j$). Token $i$ receives a weighted mean of all values,
# weighted by how well its query matches each key:
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}}\right) V,
# \qquad Q, K, V \in \mathbb{R}^{N \times d}.$$
#
# Three matrix operations. We write them by hand and compare with PyTorch's fused
# `F.scaled_dot_product_attention` (SDPA), which is what the official code (and `dinolab`) calls.

# %% hide-input
B, heads, N, d = 2, 3, 21, 16
q, k, v = torch.randn(3, B, heads, N, d).unbind(0)
print("q, k, v           ", tuple(q.shape), " (B, heads, N, d)")

logits = q @ k.transpose(-2, -1) / math.sqrt(d)
print("q k^T / sqrt(d)   ", tuple(logits.shape), " (B, heads, N queries, N keys)")

weights = logits.softmax(dim=-1)
print("softmax over keys ", tuple(weights.shape), " every row sums to 1:",
      torch.allclose(weights.sum(-1), torch.ones(B, heads, N)))

out = weights @ v
print("weights @ v       ", tuple(out.shape), " (B, heads, N, d): one mixed value per query")

torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
print("manual == F.scaled_dot_product_attention  (assert passed)")


# %% skip
def attention_by_hand(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q, k, v of shape (..., N, d)."""
    return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1) @ v


# %% [markdown] slide
# ### Why divide by $\sqrt{d}$?
#
# If the entries of $q$ and $k$ are independent with variance 1, then $q \cdot k$ is a sum of $d$
# products of variance 1, so its **standard deviation grows like $\sqrt{d}$**. Large logits make the
# softmax nearly one-hot: each query attends to a single key, and the softmax's gradient
# $\mathrm{diag}(p) - p p^\top$ vanishes, so learning stalls. Dividing by $\sqrt{d}$ keeps the logits at
# unit scale whatever the head width. We measure it: the **entropy** of an attention row is
# $\log N$ for uniform attention and 0 for one-hot attention.

# %% skip
g = torch.Generator().manual_seed(0)
n_keys, dims = 196, [4, 16, 64, 256, 1024]  # 196 = 14 x 14 patches (224 px)


def row_stats(d, scale):
    q = torch.randn(64, d, generator=g)
    k = torch.randn(n_keys, d, generator=g)
    z = (q @ k.T) * scale
    p = z.softmax(-1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(n_keys)
    return z.std().item(), entropy.item(), p.max(-1).values.mean().item()


stats = {name: [row_stats(d, s(d)) for d in dims]
         for name, s in [("q·k / sqrt(d)", lambda d: d**-0.5), ("q·k (no scaling)", lambda d: 1.0)]}
print(f"{'d':>6} | {'std, scaled':>11} {'entropy/logN':>12} {'max weight':>10} | "
      f"{'std, unscaled':>13} {'entropy/logN':>12} {'max weight':>10}")
for i, d in enumerate(dims):
    (s1, h1, m1), (s2, h2, m2) = stats["q·k / sqrt(d)"][i], stats["q·k (no scaling)"][i]
    print(f"{d:>6} | {s1:11.2f} {h1:12.3f} {m1:10.3f} | {s2:13.2f} {h2:12.3f} {m2:10.3f}")
assert all(0.85 < h < 0.95 for _, h, _ in stats["q·k / sqrt(d)"])  # ~ (log N - 1/2) / log N at unit scale
assert stats["q·k (no scaling)"][-1][1] < 0.1  # d = 1024 without scaling: almost one-hot rows

# %% slide hide-input
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.4))
for (name, rows), style in zip(stats.items(), ["o-", "s--"]):
    axes[0].plot(dims, [r[0] for r in rows], style, label=name)
    axes[1].plot(dims, [r[1] for r in rows], style, label=name)
axes[0].set(xscale="log", yscale="log", xlabel="head dimension d", ylabel="std of the logits",
            title="Logit scale vs head width")
axes[1].set(xscale="log", xlabel="head dimension d", ylabel="entropy / log N", ylim=(0, 1.02),
            title=f"How spread out attention rows are (N = {n_keys})")
axes[1].axhline(1, color="gray", lw=0.8, ls=":")
for ax in axes:
    ax.set_xticks(dims, [str(x) for x in dims])
    ax.legend(frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown] skip
# With $1/\sqrt{d}$ the rows keep the same spread at every width (released models use $d = 64$;
# the 7B model $d = 128$). Without it, at $d = 1024$ each query puts almost all its weight on one
# key. (The official `SelfAttention` keeps a `self.scale` attribute but never uses it: SDPA applies
# $1/\sqrt{d}$ itself.)

# %% [markdown] slide
# ## 2. Multi-head attention with one fused `qkv` Linear
#
# One head of width $D$ would give each token one way of looking at the others. Multi-head attention
# splits the $D$ channels into `heads` groups of $D_\text{head} = D/\text{heads}$ and runs attention
# in each group independently (ViT-L: 16 heads of 64). The official code computes q, k and v of
# all heads with **one** Linear $D \to 3D$ (one big matmul instead of three) and reads its output as
# `(B, N, 3, heads, D_head)`.
#
# We use a toy size so the shapes stay readable: $D = 64$, 4 heads of 16, one [CLS] token and
# 4 storage tokens (the DINOv3 token layout, [notebook 00](00_dino_v1_v2_v3.ipynb)) followed by a 4 × 4 grid of
# patch tokens.

# %% hide-input
seed_everything(0)
B, D, n_heads = 2, 64, 4
D_head = D // n_heads
n_prefix, Hp, Wp = 1 + 4, 4, 4  # [CLS] + 4 storage tokens, then a 4 x 4 patch grid
N = n_prefix + Hp * Wp
x = torch.randn(B, N, D)

# the parameters of our attention layer
W_qkv, b_qkv = torch.randn(3 * D, D) * D**-0.5, torch.randn(3 * D)
b_qkv[D : 2 * D] = 0.0  # DINOv3 zeroes the k third of the bias (section 4 explains why)
W_proj, b_proj = torch.randn(D, D) * D**-0.5, torch.randn(D)
print(f"x      {tuple(x.shape)}  (B, N = {n_prefix} prefix + {Hp}x{Hp} patches, D)")
print(f"W_qkv  {tuple(W_qkv.shape)}  (3D, D): rows [0, D) make q, [D, 2D) make k, [2D, 3D) make v")

# %% hide-input
qkv = x @ W_qkv.T + b_qkv
print("qkv = x W^T + b           ", tuple(qkv.shape), "(B, N, 3D)")
qkv = qkv.reshape(B, N, 3, n_heads, D_head)
print("reshape                   ", tuple(qkv.shape), "(B, N, 3, heads, D_head)")
q, k, v = qkv.unbind(2)
print("unbind(2) -> q, k, v      ", tuple(q.shape), "(B, N, heads, D_head) each")
q, k, v = (t.transpose(1, 2) for t in (q, k, v))
print("transpose(1, 2)           ", tuple(q.shape), "(B, heads, N, D_head): heads act like a batch dim")

# %% [markdown] skip
# The reshape fixes which rows of `W_qkv` belong to which head: row
# $r = \text{which}\cdot D + h \cdot D_\text{head} + c$ feeds channel $c$ of head $h$ of
# q (which = 0), k (1) or v (2). We check two of them directly:

# %% skip
rows = lambda which, h: slice(which * D + h * D_head, which * D + (h + 1) * D_head)  # noqa: E731
for name, which, h, t in [("q", 0, 1, q), ("k", 1, 2, k)]:
    direct = x @ W_qkv[rows(which, h)].T + b_qkv[rows(which, h)]
    torch.testing.assert_close(t[:, h], direct)
    print(f"{name} of head {h} = x @ W_qkv[{rows(which, h).start}:{rows(which, h).stop}].T + bias   (assert passed)")

# %% [markdown] skip
# ### RoPE inside attention: patch tokens only
#
# DINOv3 has no position embedding added to the tokens; positions enter **only here**, by rotating
# q and k of each patch token by angles that depend on its (row, column) (notebook 02). The [CLS]
# and storage tokens have no position, so the first `N - H*W` tokens are left unrotated. v is never
# rotated. The rotation uses the "rotate half" layout: channel $j$ turns together with channel
# $j + D_\text{head}/2$.

# %% skip
rope = RopePositionEmbedding(D, num_heads=n_heads)  # base 100, no learnable weights
sin, cos = rope(H=Hp, W=Wp)
print("sin, cos              ", tuple(sin.shape), "(H*W, D_head): no batch or head dimension")


def rotate_half(t):
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat([-t2, t1], dim=-1)


def rope_on_patches(t, sin, cos):
    """Rotate the last H*W tokens of t (B, heads, N, D_head); leave the prefix tokens untouched."""
    prefix = t.shape[-2] - sin.shape[-2]
    patches = t[:, :, prefix:]
    return torch.cat([t[:, :, :prefix], patches * cos + rotate_half(patches) * sin], dim=2)


q_rot, k_rot = rope_on_patches(q, sin, cos), rope_on_patches(k, sin, cos)
print("q, k after RoPE       ", tuple(q_rot.shape))
assert torch.equal(q_rot[:, :, :n_prefix], q[:, :, :n_prefix])  # prefix tokens: unrotated
assert not torch.allclose(q_rot[:, :, n_prefix:], q[:, :, n_prefix:])  # patch tokens: rotated
torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths
print("prefix tokens unrotated, patch tokens rotated, norms kept  (asserts passed)")

# %% skip
o = attention_by_hand(q_rot, k_rot, v)
print("attention per head    ", tuple(o.shape), "(B, heads, N, D_head)")
o = o.transpose(1, 2).reshape(B, N, D)
print("merge heads           ", tuple(o.shape), "(B, N, D): heads concatenated channel-wise")
o = o @ W_proj.T + b_proj
print("proj (D -> D)         ", tuple(o.shape), "(B, N, D): mixes information across heads")

# %% [markdown] slide
# Now the same computation as one function, and the check against `dinolab.attention.SelfAttention`
# with our weights copied in. `mask_k_bias=True` (as in every released model) makes its `qkv` a
# `LinearKMaskedBias`, which carries a `bias_mask` buffer.

# %% hide-input
def mha_by_hand(x, W_qkv, b_qkv, W_proj, b_proj, n_heads, rope=None):
    B, N, D = x.shape
    q, k, v = (x @ W_qkv.T + b_qkv).reshape(B, N, 3, n_heads, D // n_heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = rope_on_patches(q, *rope), rope_on_patches(k, *rope)
    o = attention_by_hand(q, k, v).transpose(1, 2).reshape(B, N, D)
    return o @ W_proj.T + b_proj


attn = SelfAttention(D, num_heads=n_heads, qkv_bias=True, proj_bias=True, mask_k_bias=True)
print("state-dict keys:", list(attn.state_dict()))
attn.load_state_dict({"qkv.weight": W_qkv, "qkv.bias": b_qkv, "qkv.bias_mask": attn.qkv.bias_mask,
                      "proj.weight": W_proj, "proj.bias": b_proj})
with torch.no_grad():
    torch.testing.assert_close(mha_by_hand(x, W_qkv, b_qkv, W_proj, b_proj, n_heads, (sin, cos)),
                               attn(x, rope=(sin, cos)))
torch.testing.assert_close(o, attn(x, rope=(sin, cos)).detach())
print("our multi-head attention (RoPE on patches only) == dinolab SelfAttention  (assert passed)")

# %% [markdown] notes
# ## 3. What RoPE alone does to attention
#
# [Notebook 02](02_rope.ipynb) shows that a RoPE logit depends only on the offset between two patches, with its
# offset maps; here we ask which rotation pairs make which pattern. A random-init attention map is noise. A more instructive picture: give **every** patch the
# same content vector $c$ ($q_i = k_i = c$ before rotation), so the only thing that differs
# between tokens is RoPE. Then $q_i \cdot k_j = (R_i c)\cdot(R_j c) = c^\top R_{j-i}\, c$:
# a **pure positional** pattern that depends only on the offset between the patches. Which pattern
# depends on which rotation pairs $c$ puts its energy in. A released head has $D_\text{head} = 64$:
# 32 pairs, the first 16 turning with the row coordinate, the next 16 with the column, with
# periods $100^{k/16}$ (in units of the normalised coordinate, which spans 2 across the image).

# %% skip
G, Dh = 14, 64  # a 224 px image: 14 x 14 patches; one head of width 64
rope14 = RopePositionEmbedding(Dh, num_heads=1)
sin14, cos14 = rope14(H=G, W=G)
print("periods (16 per axis):", [round(p, 1) for p in rope14.periods.tolist()])


def rope_only_logits(c, row, col):
    """q.k / |c|^2 between the patch at (row, col) and every patch, when every patch has content c."""
    t = c.expand(1, 1, G * G, Dh)
    t = rope_on_patches(t, sin14, cos14)[0, 0]  # (G*G, Dh)
    return (t @ t[row * G + col]).reshape(G, G) / c.pow(2).sum()


def energy_in(pairs):
    """A content vector with unit energy in the given rotation pairs (pair p = channels p and p + 32)."""
    c = torch.zeros(Dh)
    for p in pairs:
        c[p] = c[p + Dh // 2] = 1.0
    return c


choices = {
    "all 32 pairs": energy_in(range(32)),
    "row pairs only": energy_in(range(16)),
    "column pairs only": energy_in(range(16, 32)),
    "fastest pairs (period 1)": energy_in([0, 16]),
    "slowest pairs (13-75)": energy_in([*range(8, 16), *range(24, 32)]),
}
maps = {name: rope_only_logits(c, 7, 7) for name, c in choices.items()}

# checks: the pattern depends only on the offset (move the query, the map moves with it) ...
shifted = rope_only_logits(choices["all 32 pairs"], 5, 6)
torch.testing.assert_close(shifted[:12, :13], maps["all 32 pairs"][2:, 1:])
# ... the query matches itself best, and "row pairs only" cannot tell columns apart
assert maps["all 32 pairs"].argmax().item() == 7 * G + 7
torch.testing.assert_close(maps["row pairs only"], maps["row pairs only"][:, :1].expand(G, G))
print("translation invariant, peaked at the query, row pairs see rows only  (asserts passed)")

# %% slide hide-input
fig = plt.figure(figsize=(12.8, 6.4))
grid = fig.add_gridspec(2, len(maps), height_ratios=[1.1, 1])
for i, (name, m) in enumerate(maps.items()):
    ax = fig.add_subplot(grid[0, i])
    ax.imshow(m, cmap="viridis")  # each panel on its own colour scale
    ax.plot(7, 7, marker="*", color="w", ms=9, mec="k")
    ax.set_title(f"{name}\nrange [{m.min():.2f}, {m.max():.2f}]", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
ax = fig.add_subplot(grid[1, :])
# "row pairs only" (flat at 1) and the slowest pairs (almost flat) nearly coincide: hollow squares on a dashed
# line vs small dots on a solid one, so that both stay visible
styles = {"all 32 pairs": dict(marker="o", ls="-"), "row pairs only": dict(marker="s", ls="--", ms=10, mfc="none"),
          "column pairs only": dict(marker="^", ls="-."), "fastest pairs (period 1)": dict(marker="D", ls=":"),
          "slowest pairs (13-75)": dict(marker="o", ls="-", ms=4)}
for name, m in maps.items():
    ax.plot(range(-7, G - 7), m[7], label=name, **{"ms": 6, **styles[name]})
ax.set(xlabel="column offset from the query (patches), same row", ylabel="q·k / |c|²", xticks=range(-7, G - 7))
ax.set_ylim(-0.75, 1.1)
ax.legend(frameon=False, fontsize=11, ncol=3, loc="lower center")
fig.suptitle("RoPE alone (same content at every patch): logits of the query ★ against every patch, 14 x 14 grid")
fig.tight_layout()
plt.show()

# %% [markdown] skip
# Read the maps left to right (each on its own colour scale); the line plot reads them along the
# query's row. With energy in all pairs, RoPE alone gives a **locality bias**: the score falls
# steadily with distance. Row-only pairs give horizontal bands: they cannot tell columns apart, so
# their line is flat at 1 (dashed, hollow squares; the slowest pairs' dots lie just below it). Column-only
# pairs give vertical bands. The fastest pairs (period 1 in
# coordinate units = 7 patches at 224 px) resolve small offsets sharply but repeat: offsets 0 and
# ±7 look alike. The slowest pairs barely change across the image and behave like "no position".
# Fast and slow pairs together give precision without ambiguity; a trained head decides, through
# where its q and k put their energy, how much it attends by content and how much by position.

# %% [markdown] slide
# ## 4. The masked k bias
#
# **First, what the released checkpoints hold.** In the released non-7B checkpoints (S, S+, B, L, L+, H+)
# **both `qkv.bias` and its `bias_mask` are all zeros**, as reported in the official repository's issue
# tracker (facebookresearch/dinov3 issue #195): the released models effectively use no qkv bias at all, and the
# 7B has none by construction (`qkv_bias=False`). We cannot check this offline (no checkpoints here); loading such
# a checkpoint into `dinolab` reproduces it exactly, because the stored buffer replaces our (1, 0, 1) default.
# So what follows is about the architecture and the training code, which keep a bias on q and v and mask the
# one on k, not about the released weights.

# %% [markdown] skip
# **Without RoPE, a bias on k does nothing.** Write $k_j = W_k x_j + b$. Then
# $$q_i \cdot k_j = q_i \cdot W_k x_j + \underbrace{q_i \cdot b}_{\text{same for every key } j},$$
# so the bias adds one constant per query row, and softmax ignores constants:
# $\mathrm{softmax}(z + c\mathbf{1}) = \mathrm{softmax}(z)$. The outputs are unchanged, and so the
# gradient reaching $b$ is exactly zero. We check both.

# %% skip
seed_everything(1)
xq, xk, xv = torch.randn(3, 1, 1, 9, 16).unbind(0)
b_k = torch.randn(16, requires_grad=True)
z_plain = xq @ xk.transpose(-2, -1)
z_bias = xq @ (xk + b_k).transpose(-2, -1)
row_shift = (z_bias - z_plain).detach()
print("logit change, first query row:", row_shift[0, 0, 0, :5].numpy().round(3), "... (one constant)")
assert row_shift.std(dim=-1).max() < 1e-5  # the same number across every key of a row
out_bias = attention_by_hand(xq, xk + b_k, xv)
torch.testing.assert_close(out_bias, attention_by_hand(xq, xk, xv))
out_bias.pow(2).sum().backward()
assert b_k.grad.norm() < 1e-4
print("outputs unchanged, and the gradient reaching the k bias is 0 up to rounding  (asserts passed)")

# %% [markdown] slide
# **With RoPE, it is not a constant any more.** DINOv3 rotates k *after* the bias is added, so for
# a patch key $k_j = R_j (W_k x_j + b)$ and the extra term $q_i \cdot R_j b$ changes with the key's
# position $j$: a k bias would become a learned, query-dependent positional bias. So in a RoPE
# model the k-bias mask is a real modelling choice, not only a saving. We check it with
# `dinolab`'s `SelfAttention`: same weights with a nonzero k bias, with and without the mask.

# %% hide-input
seed_everything(2)
a_masked = SelfAttention(D, num_heads=n_heads, qkv_bias=True, mask_k_bias=True)
a_plain = SelfAttention(D, num_heads=n_heads, qkv_bias=True, mask_k_bias=False)
with torch.no_grad():
    a_masked.qkv.bias.normal_()  # q, k and v biases all nonzero
a_plain.load_state_dict({k_: v_ for k_, v_ in a_masked.state_dict().items() if k_ != "qkv.bias_mask"})
with torch.no_grad():
    same_without_rope = torch.allclose(a_plain(x), a_masked(x), atol=1e-5)
    gap_with_rope = (a_plain(x, rope=(sin, cos)) - a_masked(x, rope=(sin, cos))).abs().max().item()
print("k bias kept vs masked, no RoPE  : outputs equal ->", same_without_rope)
print("k bias kept vs masked, with RoPE: outputs differ ->", gap_with_rope > 1e-2)
assert same_without_rope and gap_with_rope > 1e-2

# %% [markdown] skip
# ### `bias_mask`: a buffer, and it is in the checkpoints
#
# `LinearKMaskedBias` multiplies the `qkv` bias by `bias_mask` (1 on the q third, **0 on the k
# third**, 1 on the v third). It is a *persistent buffer*, so `blocks.{i}.attn.qkv.bias_mask`
# is a key of every official checkpoint of the models with a qkv bias. Officially it is created
# filled with NaN and set by `init_weights()` (`dinov3/layers/attention.py`; `init_weights_vit` in
# `dinov3/models/vision_transformer.py`): a model that neither loads a checkpoint nor calls
# `init_weights()` outputs NaN. `dinolab` fills it at construction (our choice), so a fresh layer
# works.

# %% skip
mask = attn.qkv.bias_mask
print("bias_mask", tuple(mask.shape), "-> value per third (q, k, v):",
      [t.unique().tolist() for t in mask.chunk(3)])
assert [t.unique().tolist() for t in mask.chunk(3)] == [[1.0], [0.0], [1.0]]
print("buffer in the state dict:", "qkv.bias_mask" in attn.state_dict())

nan_layer = LinearKMaskedBias(D, 3 * D)
nan_layer.bias_mask.fill_(float("nan"))  # what the official layer holds before init_weights()
print("official layer before init_weights(): all outputs NaN ->", torch.isnan(nan_layer(x)).all().item())

qkv_7b = build("dinov3_vit7b16", device="meta").blocks[0].attn.qkv
print("ViT-7B: qkv_bias =", CONFIGS["dinov3_vit7b16"]["qkv_bias"], "-> qkv has a bias:", qkv_7b.bias is not None,
      "| has bias_mask:", hasattr(qkv_7b, "bias_mask"))

# %% [markdown] skip
# The NaN initialisation was reported in the official repository too (facebookresearch/dinov3 issue #58 asked
# what `LinearKMaskedBias` is for; it was labelled a bug, and PR #155 fixed the initialisation). And recall the
# first paragraph of this section: in the released non-7B checkpoints this buffer, like the bias, is all zeros.

# %% [markdown] slide
# ## 5. LayerScale: every block starts as (almost) the identity
#
# `LayerScale` multiplies a residual branch by a learned per-channel vector $\gamma \in
# \mathbb{R}^D$, initialised to a tiny constant (`layerscale_init = 1e-5` in every released model;
# the idea comes from CaiT, Touvron et al. 2021):
# $x \leftarrow x + \gamma \odot \mathrm{attn}(\mathrm{norm}_1(x))$.
# At initialisation each block then adds about $10^{-5}$ of a branch output to the residual
# stream, so a deep stack starts as the identity map and each block's contribution grows only as
# its $\gamma$ is learned. We measure it on a stack of 24 random blocks (ViT-L depth, ViT-S width),
# with the official initialisation, with and without LayerScale.

# %% skip
ls = LayerScale(384)
print("gamma", tuple(ls.gamma.shape), f"init {ls.gamma[0].item():.0e}", "| state-dict keys in a block: ls1.gamma, ls2.gamma")


def official_init_(module):
    """Official init of the Linears: trunc_normal(std=0.02), bias 0. The official call uses the default
    cut-offs a=-2, b=2, which are absolute values (100 standard deviations), so it is a plain normal."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


D_ls, heads_ls, depth_ls, grid_ls = 384, 6, 24, 6
rope_ls = RopePositionEmbedding(D_ls, num_heads=heads_ls).to(DEVICE)
sc_ls = rope_ls(H=grid_ls, W=grid_ls)
x0 = torch.randn(1, 5 + grid_ls**2, D_ls, generator=torch.Generator().manual_seed(0)).to(DEVICE)

residual = {}
for label, init in [("LayerScale 1e-5", 1e-5), ("no LayerScale", None)]:
    seed_everything(3)
    blocks = nn.ModuleList(
        SelfAttentionBlock(D_ls, heads_ls, qkv_bias=True, init_values=init, mask_k_bias=True,
                           norm_layer=partial(nn.LayerNorm, eps=1e-5))
        for _ in range(depth_ls)).to(DEVICE)
    official_init_(blocks)
    xs = [x0]
    with torch.no_grad():
        for blk in blocks:
            xs.append(blk(xs[-1], sc_ls))
    residual[label] = {
        "norm": [(t.norm() / x0.norm()).item() for t in xs],
        "update": [((b - a).norm() / a.norm()).item() for a, b in zip(xs, xs[1:])],
        "total": ((xs[-1] - x0).norm() / x0.norm()).item(),
    }
    print(f"{label:16s}: per-block |block(x) - x| / |x| ~ {residual[label]['update'][0]:.1e};"
          f" after 24 blocks |f(x) - x| / |x| = {residual[label]['total']:.1e}")
assert residual["LayerScale 1e-5"]["total"] < 1e-4 and residual["no LayerScale"]["total"] > 0.5
assert min(residual["no LayerScale"]["update"]) > 0.1 and max(residual["LayerScale 1e-5"]["update"]) < 1e-5

# %% slide hide-input
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.4))
for (label, r), style in zip(residual.items(), ["o-", "s--"]):
    axes[0].plot(range(depth_ls + 1), r["norm"], style, ms=3, label=label)
    axes[1].plot(range(1, depth_ls + 1), r["update"], style, ms=3, label=label)
axes[0].set(xlabel="block", ylabel="|x_l| / |x_0|", title="Residual-stream norm through depth")
axes[1].set(xlabel="block", ylabel="|block(x) - x| / |x|", yscale="log", title="How much each block changes x")
for ax in axes:
    ax.legend(frameon=False)
fig.tight_layout()
plt.show()

# %% [markdown] skip
# Without LayerScale, every freshly initialised block changes the stream by more than 10 % (asserted
# above), the stream's norm keeps growing, and after 24 blocks the output is far from the input:
# early in training the features are dominated by random blocks. With $\gamma = 10^{-5}$ the stack
# is the identity to 5 digits: the patch embeddings pass through unchanged, and the optimizer grows
# each $\gamma$ (one scalar per channel and branch) only where the block helps. It is one of the
# ingredients that keep the training of deep, wide ViTs (up to 40 blocks of width 4096 here) stable.

# %% [markdown] slide
# ## 6. The feed-forward network: Mlp vs SwiGLU
#
# Every block's second branch is a per-token MLP with hidden width `int(D * ffn_ratio)`.
# * `Mlp` (ViT-S, B, L): $\;\mathrm{fc_2}(\mathrm{GELU}(\mathrm{fc_1} x))$, two matrices $D \times h$.
# * `SwiGLUFFN` (S+, L+, H+, 7B): $\;w_3(\mathrm{SiLU}(w_1 x) \odot w_2 x)$, **three** matrices.
#   $w_2 x$ is a linear "value" and $\mathrm{SiLU}(w_1 x)$ a soft, input-dependent gate.
#   To keep the parameter count of a two-matrix MLP, the hidden width is cut to two thirds and
#   rounded **up** to a multiple of `align_to` (8 for `"swiglu"`; 32/64/128 for `"swiglu32"` /
#   `"swiglu64"` / `"swiglu128"`; `dinov3/layers/ffn_layers.py`):
#   $d = \lfloor 2h/3 \rfloor$, $\;h_\text{SwiGLU} = d + (-d \bmod \mathtt{align\_to})$.

# %% skip
def swiglu_width(hidden, align_to=8):
    d = int(hidden * 2 / 3)
    return d + (-d % align_to)


for h in range(1, 20000, 7):  # our two lines == dinolab's, for every alignment
    for a in (8, 32, 64, 128):
        assert swiglu_width(h, a) == swiglu_hidden_dim(h, a)
print("width for a few hidden sizes:")
print(f"{'hidden':>7} | " + " ".join(f"align {a:>3}" for a in (8, 32, 64, 128)))
for h in (2304, 4351, 12288):  # S+ (384 x 6), SO400M-like (1152 x 3.78), 7B (4096 x 3)
    print(f"{h:>7} | " + " ".join(f"{swiglu_width(h, a):>9}" for a in (8, 32, 64, 128)))

# %% hide-input
align = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
rows_md = ["| model | D | ffn_layer | ffn_ratio | h = int(D·ratio) | SwiGLU width | Mlp(h) params | SwiGLU params | SwiGLU / Mlp |",
           "|---|---|---|---|---|---|---|---|---|"]
ffn_table = {}
for name in RELEASED:
    cfg = CONFIGS[name]
    if not cfg["ffn_layer"].startswith("swiglu"):
        continue
    Dm, h, a = cfg["embed_dim"], int(cfg["embed_dim"] * cfg["ffn_ratio"]), align[cfg["ffn_layer"]]
    with torch.device("meta"):
        p_mlp = count_params(Mlp(Dm, h))
        swi = SwiGLUFFN(Dm, h, align_to=a)
    p_swi = count_params(swi)
    assert p_swi == count_params(build(name, device="meta").blocks[0].mlp)  # what the model really holds
    ffn_table[name] = (swi.w1.out_features, p_mlp, p_swi)
    rows_md.append(f"| {name} | {Dm} | {cfg['ffn_layer']} | {cfg['ffn_ratio']:g} | {h} | {swi.w1.out_features} | "
                   f"{p_mlp:,} | {p_swi:,} | {p_swi / p_mlp:.4f} |")
assert {n: w for n, (w, _, _) in ffn_table.items()} == {
    "dinov3_vits16plus": 1536, "dinov3_vitl16plus": 4096, "dinov3_vith16plus": 5120, "dinov3_vit7b16": 8192}
assert all(abs(ps / pm - 1) < 0.01 for _, pm, ps in ffn_table.values())
Markdown("\n".join(rows_md))

# %% [markdown] skip
# The SwiGLU widths come out as round numbers (1536 = 4 × 384, 4096 = 4 × 1024, 5120 = 4 × 1280,
# 8192 = 2 × 4096), and the parameter counts match a GELU Mlp of width $h$ to within 0.1 % (the
# difference is the extra bias). Note what "+" means, though: S+ is not ViT-S with a SwiGLU of the
# same cost; its ratio 6 makes the FFN 1.5 times larger than ViT-S's ratio-4 Mlp:

# %% skip
ffn = {}
for n_ in ("dinov3_vits16", "dinov3_vits16plus"):
    m_ = build(n_, device="meta")
    ffn[n_] = count_params(m_.blocks[0].mlp)
    print(f"{n_:18s} FFN per block {ffn[n_]:>10,}   whole model {count_params(m_):>11,}")
print(f"FFN per block, S+ / S = {ffn['dinov3_vits16plus'] / ffn['dinov3_vits16']:.3f}")

# %% [markdown] skip
# Why gate at all? The product $\mathrm{SiLU}(a)\cdot b$ lets one projection switch the other on or
# off per token and channel; such GLU variants have trained better than a plain nonlinearity in
# large transformers (Shazeer 2020, "GLU Variants Improve Transformer").

# %% skip
t = torch.linspace(-4, 4, 401)
a, b = torch.meshgrid(torch.linspace(-3, 3, 121), torch.linspace(-3, 3, 121), indexing="ij")
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.6))
axes[0].plot(t, F.gelu(t), label="GELU (Mlp)")
axes[0].plot(t, F.silu(t), "--", label="SiLU = x·sigmoid(x) (SwiGLU gate)")
axes[0].plot(t, F.relu(t), ":", color="gray", label="ReLU")
axes[0].set(xlabel="x", title="The two activations are almost the same curve")
axes[0].legend(frameon=False)
im = axes[1].imshow(F.silu(a) * b, origin="lower", extent=(-3, 3, -3, 3), cmap="RdBu_r", vmin=-8, vmax=8)
axes[1].set(xlabel="b = w2·x (value)", ylabel="a = w1·x (gate)", title="SwiGLU unit: SiLU(a) · b")
fig.colorbar(im, ax=axes[1])
fig.tight_layout()
plt.show()

# %% [markdown] skip
# The activation is not the difference (GELU and SiLU nearly coincide); the **gating** is. On the
# right, for $a < 0$ the gate is closed and the unit outputs about 0 whatever $b$ is; for $a > 0$
# it passes $b$ (with its sign) scaled by about $a$: a multiplicative interaction of two
# projections that a plain MLP unit cannot express.

# %% [markdown] skip
# ## 7. LayerNorm vs RMSNorm
#
# $$\mathrm{LayerNorm}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \varepsilon}} \odot w + b, \qquad
# \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac1D \sum_c x_c^2 + \varepsilon}} \odot w,$$
# with $\mu, \sigma^2$ the mean and variance over the $D$ channels of one token. RMSNorm drops the
# centring and the bias: if a token already has zero mean, $\sigma^2 = \frac1D\sum_c x_c^2$ and the
# two are equal (for $b = 0$).

# %% skip
def layer_norm_by_hand(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rms_norm_by_hand(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


seed_everything(4)
Dn, eps = 1024, 1e-5
ln, rms = nn.LayerNorm(Dn, eps=eps), RMSNorm(Dn, eps=eps)
with torch.no_grad():
    ln.weight.normal_()
    rms.weight.copy_(ln.weight)
xn = torch.randn(2, 7, Dn) * 3 + 2  # tokens with nonzero mean
with torch.no_grad():
    torch.testing.assert_close(layer_norm_by_hand(xn, ln.weight, ln.bias, eps), ln(xn))
    torch.testing.assert_close(rms_norm_by_hand(xn, rms.weight, eps), rms(xn))
    x_centred = xn - xn.mean(-1, keepdim=True)
    torch.testing.assert_close(ln(x_centred), rms(x_centred))
    gap = (ln(xn) - rms(xn)).abs().max().item()
print("by hand == nn.LayerNorm and == dinolab RMSNorm; equal on zero-mean tokens  (asserts passed)")
print(f"on tokens with mean 2 they differ (max |LN - RMS| > 1: {gap > 1})")
print(f"parameters at D = {Dn}: LayerNorm {count_params(ln):,} (w, b), RMSNorm {count_params(rms):,} (w)")
print("a bf16 RMSNorm on bf16 tokens returns", RMSNorm(Dn).bfloat16()(xn.bfloat16()).dtype,
      "(it normalises in fp32 inside, then casts back)")

# %% skip
for key, make in NORM_LAYERS.items():
    layer = make(8)
    print(f"norm_layer={key!r:16} -> {type(layer).__name__:9} eps={layer.eps:g}")
print("released models use norm_layer =", repr(HUB_COMMON["norm_layer"]))

# %% [markdown] skip
# `"layernormbf16"` is a plain LayerNorm whose only difference is `eps=1e-5` (the constructor
# default `"layernorm"` uses 1e-6); all released ViTs use it (`dinov3/hub/backbones.py`), so no
# released backbone uses RMSNorm.

# %% [markdown] slide
# ## 8. A whole block, by hand
#
# Pre-norm: each branch sees a normalised copy of the stream, and its output is scaled by
# LayerScale and *added* to the stream. We assemble it from our own pieces (hand LayerNorm,
# `mha_by_hand` with RoPE, hand GELU-MLP) and compare with `dinolab.block.SelfAttentionBlock`
# configured like a released Mlp block (LayerNorm eps 1e-5, masked k bias, LayerScale, GELU Mlp)
# at our toy width. To make the check meaningful, the norms, biases and the
# $\gamma$s get random values (with $\gamma = 10^{-5}$ almost anything would "match").

# %% hide-input
seed_everything(5)
blk = SelfAttentionBlock(D, n_heads, ffn_ratio=4.0, qkv_bias=True, init_values=1e-5, mask_k_bias=True,
                         norm_layer=partial(nn.LayerNorm, eps=1e-5), ffn_layer=Mlp).eval()
with torch.no_grad():
    for name_, p in blk.named_parameters():
        if not name_.endswith("weight") or "norm" in name_:
            p.normal_(0.0, 0.5)  # biases, gammas, norm weights: make them all count
P = dict(blk.named_parameters())


def block_by_hand(x, rope):
    h = layer_norm_by_hand(x, P["norm1.weight"], P["norm1.bias"], 1e-5)
    b_qkv = P["attn.qkv.bias"] * blk.attn.qkv.bias_mask  # the k third of the bias is masked
    x = x + P["ls1.gamma"] * mha_by_hand(h, P["attn.qkv.weight"], b_qkv, P["attn.proj.weight"],
                                         P["attn.proj.bias"], n_heads, rope)
    h = layer_norm_by_hand(x, P["norm2.weight"], P["norm2.bias"], 1e-5)
    h = F.gelu(h @ P["mlp.fc1.weight"].T + P["mlp.fc1.bias"]) @ P["mlp.fc2.weight"].T + P["mlp.fc2.bias"]
    return x + P["ls2.gamma"] * h


with torch.no_grad():
    y_hand, y_lib = block_by_hand(x, (sin, cos)), blk(x, (sin, cos))
print("in", tuple(x.shape), "-> out", tuple(y_hand.shape), "| |out - in| / |in| =",
      f"{((y_lib - x).norm() / x.norm()).item():.2f}")
torch.testing.assert_close(y_hand, y_lib)
print("block by hand == dinolab SelfAttentionBlock  (assert passed)")

# %% [markdown] skip
# ## 9. Stochastic depth, the official way
#
# Stochastic depth drops whole residual branches at random during training (the block then acts
# as the identity for that sample), which regularises deep networks; DINOv3 trains with
# `drop_path_rate` 0.3 (ViT-L on ImageNet-1k, default config) and 0.4 (7B), and the released
# models set it to 0 (it does nothing at inference anyway).
#
# * **Usual `DropPath` (timm):** compute the branch $f(x)$ for the whole batch, multiply sample
#   $i$ by $m_i / (1-p)$ with $m_i \sim \mathrm{Bernoulli}(1-p)$.
# * **Official DINOv3 (`dinov3/layers/block.py`)**: draw a random subset of
#   $s = \max(\lfloor B(1-p) \rfloor, 1)$ samples, compute the branch **for those only**, and
#   `index_add` it back with scale $\alpha = B/s$. There is no `DropPath` module and no state-dict key.
#
# Both are unbiased: sample $i$ is in the subset with probability $s/B$ and then gets
# $\alpha f(x_i)$, so $\mathbb{E} = x_i + \tfrac{s}{B}\cdot\tfrac{B}{s} f(x_i) = x_i + f(x_i)$. The
# official form **saves compute** (the branch runs on $s$ samples instead of $B$), and always
# drops exactly $B - s$ samples instead of a random number.

# %% skip
def stochastic_depth_official(x, branch, p, gen):
    b = x.shape[0]
    s = max(int(b * (1 - p)), 1)
    idx = torch.randperm(b, generator=gen)[:s]
    return torch.index_add(x, 0, idx, branch(x[idx]), alpha=b / s)


def drop_path_usual(x, branch, p, gen):
    keep = (torch.rand(x.shape[0], 1, generator=gen) < 1 - p).to(x.dtype)
    return x + branch(x) * keep / (1 - p)


seed_everything(6)
Bsd, p_drop, trials = 8, 0.3, 4000
x_sd = torch.randn(Bsd, 4)
W_sd = torch.randn(4, 4)
branch = lambda t: torch.tanh(t @ W_sd)  # noqa: E731  any per-sample function
target = x_sd + branch(x_sd)
gen = torch.Generator().manual_seed(0)
mean_official = sum(stochastic_depth_official(x_sd, branch, p_drop, gen) for _ in range(trials)) / trials
mean_usual = sum(drop_path_usual(x_sd, branch, p_drop, gen) for _ in range(trials)) / trials
err_o, err_u = (mean_official - target).abs().max().item(), (mean_usual - target).abs().max().item()
print(f"Monte-Carlo over {trials} draws, max |mean - (x + f(x))|: official {err_o:.3f}, usual {err_u:.3f}")
assert err_o < 0.1 and err_u < 0.1
s = max(int(Bsd * (1 - p_drop)), 1)
print(f"B = {Bsd}, p = {p_drop}: the official branch runs on {s} of {Bsd} samples ({s / Bsd:.1%} of the compute), "
      f"added back x{Bsd / s:.2f}; DropPath runs all {Bsd} and zeroes ~{Bsd * p_drop:.1f}")

# %% [markdown] skip
# One consequence of the rounding down: the rate actually applied is $1 - s/B$, which is larger
# than $p$ when $B(1-p)$ is not an integer, and 0 for a batch of one (the subset is never empty).
# Computed for the rates used in training:

# %% skip
print(f"{'B':>4} | " + " | ".join(f"p={p}: s, effective rate" for p in (0.3, 0.4)))
for b_ in (1, 2, 4, 8, 16, 64):
    cells = []
    for p in (0.3, 0.4):
        s_ = max(int(b_ * (1 - p)), 1)
        cells.append(f"{s_:>6}, {1 - s_ / b_:>12.3f}")
    print(f"{b_:>4} | " + " | ".join(cells))

# %% [markdown] skip
# The same thing inside `dinolab`'s block in training mode: a hook on `attn` sees only $s$
# samples, and with the same random seed our version by hand gives the same result.

# %% skip
seed_everything(7)
blk_sd = SelfAttentionBlock(D, n_heads, qkv_bias=True, init_values=0.5, drop_path=p_drop, mask_k_bias=True).train()
x8 = torch.randn(Bsd, N, D)
seen = []
hook = blk_sd.attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
torch.manual_seed(123)
with torch.no_grad():
    y_lib = blk_sd(x8, (sin, cos))
hook.remove()
torch.manual_seed(123)
with torch.no_grad():
    s = max(int(Bsd * (1 - p_drop)), 1)
    i1 = torch.randperm(Bsd)[:s]
    x_attn = torch.index_add(x8, 0, i1, blk_sd.ls1(blk_sd.attn(blk_sd.norm1(x8[i1]), (sin, cos))), alpha=Bsd / s)
    i2 = torch.randperm(Bsd)[:s]
    y_hand = torch.index_add(x_attn, 0, i2, blk_sd.ls2(blk_sd.mlp(blk_sd.norm2(x_attn[i2]))), alpha=Bsd / s)
print(f"attention ran on a batch of {seen[0]} (of {Bsd})")
assert seen == [s]
torch.testing.assert_close(y_hand, y_lib)
print("official-style stochastic depth by hand == dinolab block in train mode  (assert passed)")

# %% [markdown] slide
# ## 10. What attention costs as images grow
#
# Per block, with $N$ tokens of width $D$ and an MLP of width $4D$ (ViT-L), the Linears cost $24ND^2$
# FLOPs, **linear** in $N$, and attention itself ($QK^\top$ and $\cdot V$) $4N^2D$, **quadratic** in $N$
# (the counting convention and the derivation for every released model are in
# [notebook 00](00_dino_v1_v2_v3.ipynb), section 5). A manual implementation also stores the
# $\text{heads} \times N \times N$ attention matrix.
#
# We check the formula against PyTorch's FLOP counter on a real ViT-L block on the `meta` device
# (shapes only, no arithmetic), then tabulate image sizes from 224 to 1024 px ($N = (s/16)^2 + 5$).

# %% hide-input
from torch.utils.flop_counter import FlopCounterMode

D_L, heads_L = CONFIGS["dinov3_vitl16"]["embed_dim"], CONFIGS["dinov3_vitl16"]["num_heads"]
with torch.device("meta"):
    blk_L = SelfAttentionBlock(D_L, heads_L, qkv_bias=True, init_values=1e-5, mask_k_bias=True,
                               norm_layer=partial(nn.LayerNorm, eps=1e-5))
    rope_L = RopePositionEmbedding(D_L, num_heads=heads_L)


def block_flops(n, d=D_L):
    return 24 * n * d * d, 4 * n * n * d  # (Linears, attention matmuls)


for side in (224, 512):
    g_ = side // 16
    with FlopCounterMode(display=False) as counter, torch.device("meta"):
        blk_L(torch.empty(1, g_ * g_ + 5, D_L), rope_L(H=g_, W=g_))
    assert counter.get_total_flops() == sum(block_flops(g_ * g_ + 5)), side
print("24 N D^2 + 4 N^2 D == torch FlopCounterMode on a ViT-L block at 224 and 512 px  (assert passed)")

sides = [224, 320, 448, 512, 640, 768, 896, 1024]
cost = []
for side in sides:
    n = (side // 16) ** 2 + 5
    lin, att = block_flops(n)
    cost.append((side, n, lin / 1e9, att / 1e9, att / (lin + att), heads_L * n * n * 4 / 2**20))
rows_md = ["| image | tokens N | Linears GFLOP/block | attention GFLOP/block | attention share | N×N matrix, fp32, B=1 (MiB/block) |",
           "|---|---|---|---|---|---|"]
rows_md += [f"| {s_}² | {n:,} | {l_:.1f} | {a_:.1f} | {sh:.0%} | {m_:,.0f} |" for s_, n, l_, a_, sh, m_ in cost]
Markdown("\n".join(rows_md))

# %% skip
fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.4))
axes[0].plot(sides, [c[2] for c in cost], "o-", label="Linears (24·N·D²)")
axes[0].plot(sides, [c[3] for c in cost], "s--", label="attention (4·N²·D)")
axes[0].set(xlabel="image side (px)", ylabel="GFLOP per block", title="ViT-L block: compute", yscale="log")
axes[0].legend(frameon=False)
axes[1].plot(sides, [c[5] for c in cost], "o-", color="C3")
axes[1].set(xlabel="image side (px)", ylabel="MiB per block (B = 1)", yscale="log",
            title="Attention matrix if materialised")
fig.tight_layout()
plt.show()
assert cost[0][4] < 0.05 and cost[-1][4] > 0.4  # attention: ~3 % of a block at 224 px, ~40 % at 1024 px

# %% [markdown] skip
# At the training resolution (224 px, 201 tokens) attention is a small part of the work, and the
# Linears dominate. At 1024 px ($N$ = 4101) it is about 40 % of every block, and a naive
# implementation would store over 1 GiB per block per image for the attention matrix. That is why
# the official code calls `F.scaled_dot_product_attention`: its fused kernels (FlashAttention-style,
# picked whenever the inputs allow) walk over the keys in tiles with a running softmax and never
# store the $N \times N$ matrix.
# The timing below (not compared in CI: timings vary by machine) shows the difference on this
# machine, and which kernel SDPA picked.

# %% skip
# NBVAL_IGNORE_OUTPUT
import time

from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def bench(fn, *args, reps=3):
    fn(*args)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


qb, kb, vb = torch.randn(3, 1, 6, 1029, 64, device=DEVICE).unbind(0)  # ViT-S heads, 512 px
with OpLog() as log, torch.no_grad():
    F.scaled_dot_product_attention(qb, kb, vb)
with torch.no_grad():
    t_manual, t_sdpa = bench(attention_by_hand, qb, kb, vb), bench(F.scaled_dot_product_attention, qb, kb, vb)
print(f"device {DEVICE.type}; SDPA ran {log.ops}")
print(f"manual {t_manual:.1f} ms, SDPA {t_sdpa:.1f} ms per call (1 x 6 heads x 1029 tokens x 64)")

# %% [markdown] slide
# ## Summary
#
# The tensor flow through one **ViT-L block at 512 × 512** (4 images, 1 + 4 + 32 × 32 = 1029
# tokens), traced on the `meta` device:

# %% hide-input
with torch.device("meta"):
    x_meta = torch.empty(4, 1029, D_L)
    rope_meta = rope_L(H=32, W=32)
trace(blk_L, x_meta, rope_meta, max_depth=2)

# %% [markdown] skip
# `ls1` and `ls2` are the LayerScale modules ($\gamma \odot \text{branch}$): the block calls them as the official
# code does, `x = x + ls1(attn(norm1(x), rope))`, so each has its own row.

# %% [markdown] slide
# ## What to remember
#
# - **Attention** = softmax(q kᵀ/√d) v; the √d keeps rows from collapsing to one-hot as d grows; SDPA never
#   stores the N×N matrix.
# - **Fused qkv**: one Linear D → 3D read as (B, N, 3, heads, D_head): rows [0, D) q, [D, 2D) k, [2D, 3D) v.
# - **RoPE** rotates q and k of the **patch tokens only**, after the bias; alone it gives offset-only patterns.
# - **Masked k bias**: released non-7B checkpoints hold an all-zero qkv bias and `bias_mask` (#195); the 7B has
#   no qkv bias. By design a k bias is a no-op without RoPE and a positional bias with it.
# - **LayerScale** γ, init 1e-5: a 24-block stack starts as the identity (10⁻⁵ vs ~1 without).
# - **FFN**: Mlp (S, B, L) or SwiGLU (S+, L+, H+, 7B), width ⌊2h/3⌋ rounded up: the same parameters as an Mlp of width h.
# - **Norms**: released models use LayerNorm, eps 1e-5; RMSNorm = LayerNorm without centring and bias.
# - **Stochastic depth**: a random subset of max(⌊B(1−p)⌋, 1) samples runs each branch, added back ×B/s.
#
# <small>Official files (facebookresearch/dinov3, `dinov3/`): `layers/attention.py`, `layers/rope_position_encoding.py`,
# `layers/layer_scale.py`, `layers/ffn_layers.py`, `layers/block.py`, `models/vision_transformer.py`.</small>

# %% [markdown] skip
# ## Exercises
#
# 1. **Heads vs width.** Keep $D = 64$ and compare 1, 4 and 16 heads in `mha_by_hand`: which shapes
#    change, and does the parameter count? Why must $D$ be divisible by $4 \cdot \text{heads}$ for
#    DINOv3's 2-D RoPE?
# 2. **A k bias under RoPE.** In section 4, unmask the k bias and plot $q_i \cdot R_j b$ over the
#    14 × 14 grid for a fixed query (reuse `rope_only_logits`' rotation). What kind of positional
#    bias could it learn?
# 3. **LayerScale at ViT-L width.** Rerun section 5 with `D_ls = 1024, heads_ls = 16`.
#    How much does each block change the stream without LayerScale now, and why does the width matter
#    with std-0.02 weights?
# 4. **SwiGLU alignment.** For ViT-SO400M (D = 1152, ffn_ratio 3.777777778, `vit_so400m` in the
#    official code), compute the SwiGLU width for align_to 8, 64 and 128 and the parameter cost of
#    each choice over 27 blocks.
# 5. **Unbiased, but noisier?** Extend the Monte-Carlo of section 9 to compare the *variance* of the
#    two stochastic-depth forms for B = 8 and p = 0.3. Which is larger, and why?
