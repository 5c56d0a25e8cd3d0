# %% [markdown] slide
# # 02 · Rotary position embedding: from 1-D RoPE to DINOv3's 2-D axial RoPE
#
# Attention compares tokens by their content only, so a ViT must be told where each patch is.
# DINOv1 and DINOv2 *add* a learned table of absolute position vectors to the patch tokens; DINOv3
# has no such table. It *rotates* the queries and keys of the patch tokens by angles that depend on
# the patch's (row, column) coordinates: a 2-D rotary position embedding (RoPE). In this notebook
# you build it from primitives: first 1-D RoPE and its key property (the attention logit depends
# only on the *offset* between two tokens), then DINOv3's axial 2-D version exactly as
# `dinov3/layers/rope_position_encoding.py` computes it. You check it against `dinolab.rope` and
# against transformers' `DINOv3ViTRopePositionEmbedding`, look at its frequencies, see what
# happens at other resolutions and aspect ratios (and how that differs from DINOv2's interpolated
# table), and look at the random coordinate augmentations used in training.
#
# **Run time:** about 15 s on 2 CPU cores. No weights, no downloads.

# %% skip
from IPython.display import Markdown

from dinolab import viz

Markdown(viz.series_map("02"))

# %% skip
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from dinolab import hub
from dinolab.attention import SelfAttention
from dinolab.rope import RopePositionEmbedding
from dinolab.trace import trace
from dinolab.utils import get_device, seed_everything

DEVICE = get_device()  # CUDA if present; RoPE is tiny, so the stored outputs come from the CPU
seed_everything(0)
viz.use_style()  # the series' figure style: 100 dpi, text >= 10 pt
f64 = torch.float64  # identity checks in float64, so that "equal" means equal to ~1e-12
SHAPES = []  # (step, shape) rows collected while we build; printed in the summary


def show(name, t):
    """Print a tensor's shape and keep it for the summary table."""
    SHAPES.append((name, tuple(t.shape)))
    print(f"{name:<42} {tuple(t.shape)}")


# %% [markdown] slide
# ## 0. Why attention needs positions
#
# Self-attention is *permutation-equivariant*: shuffle the input tokens and the outputs come out
# shuffled the same way, nothing else changes. Without position information a ViT sees a bag of patches.

# %%
x = torch.randn(1, 6, 8)  # (B, N, D): 6 tokens
perm = torch.randperm(6)
out = F.scaled_dot_product_attention(x, x, x)
out_of_shuffled = F.scaled_dot_product_attention(x[:, perm], x[:, perm], x[:, perm])
torch.testing.assert_close(out_of_shuffled, out[:, perm])
print("attention(shuffled tokens) == shuffled attention(tokens): positions are invisible")

# %% [markdown] slide
# ## 1. 1-D RoPE from scratch
#
# Split a head vector of D dims into D/2 pairs. At position $m$, turn pair $k$ by the angle
# $\theta_k(m) = 2\pi\, m / P_k$, where $P_k$ is the pair's *period* (the distance after which it has
# made a full turn). Rotation keeps lengths, and rotations compose: $R(m)^\top R(n) = R(n-m)$. So
#
# $$\langle R(m)\,q,\; R(n)\,k\rangle = \langle q,\; R(n-m)\,k\rangle ,$$
#
# the attention logit between a query at $m$ and a key at $n$ depends on their contents and on the
# offset $n-m$ only. That is the whole idea (Su et al., RoFormer, 2021). We use RoFormer's pairs
# of neighbouring dims $(2k, 2k+1)$ first, and RoFormer's geometric periods $P_k = 2\pi\, b^{2k/D}$ (it writes
# the angle as $m\cdot b^{-2k/D}$). RoFormer's base is $b = 10{,}000$; we use $b = 100$ here, the value
# DINOv3 chose for its 2-D RoPE (section 2), so that the two halves of this notebook use the same periods.

# %% hide-input
def rotate_pairs(x, angles):
    """x (..., N, D) seen as pairs (0,1), (2,3), ...; angles (N, D/2). Turn pair k of token n by angles[n, k]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]  # (..., N, D/2) each
    c, s = torch.cos(angles), torch.sin(angles)
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)  # back to (..., N, D)


D1, N1 = 8, 16
periods_1d = 2 * math.pi * 100.0 ** (2 * torch.arange(D1 // 2, dtype=f64) / D1)
pos = torch.arange(N1, dtype=f64)
angles_1d = 2 * math.pi * pos[:, None] / periods_1d[None, :]
print("periods P_k:", [round(p, 1) for p in periods_1d.tolist()])
show("1-D: positions", pos)
show("1-D: angles (N, D/2)", angles_1d)

q1, k1 = torch.randn(D1, dtype=f64), torch.randn(D1, dtype=f64)
Q1 = rotate_pairs(q1.expand(N1, D1), angles_1d)  # the same query content placed at every position
K1 = rotate_pairs(k1.expand(N1, D1), angles_1d)
show("1-D: rotated q at every position (N, D)", Q1)
L1 = Q1 @ K1.T  # L1[m, n] = <R(m) q, R(n) k>
show("1-D: logits (N, N)", L1)

# %% [markdown] slide
# **Check the identity.** Every diagonal of `L1` (fixed offset n − m) must be constant, each logit must equal
# $\langle q, R(n-m)k\rangle$, and rotation must keep the norm.

# %% hide-input
spread_1d = max((torch.diagonal(L1, d).max() - torch.diagonal(L1, d).min()).item() for d in range(-N1 + 1, N1))
assert spread_1d < 1e-12
for m, n in [(0, 3), (5, 8), (12, 15), (9, 2)]:
    direct = q1 @ rotate_pairs(k1[None], 2 * math.pi * (n - m) / periods_1d[None])[0]
    torch.testing.assert_close(L1[m, n], direct)
torch.testing.assert_close(Q1.norm(dim=-1), q1.norm().expand(N1))
print("offset +3:", ", ".join(f"L[{m},{m + 3}]={L1[m, m + 3].item():+.3f}" for m in (0, 4, 8, 12)))
print("offset -7:", ", ".join(f"L[{m},{m - 7}]={L1[m, m - 7].item():+.3f}" for m in (7, 10, 15)))
print(f"largest spread along a diagonal < 1e-12: {spread_1d < 1e-12}")

# %% slide hide-input
fig, axs = plt.subplots(1, 2, figsize=(12.8, 4.8))
im = axs[0].imshow(L1.numpy(), cmap="RdBu_r")
axs[0].set(title="L[m, n] = <R(m)q, R(n)k>: constant diagonals", xlabel="key position n", ylabel="query position m")
fig.colorbar(im, ax=axs[0], fraction=0.046)
mm, nn_ = torch.meshgrid(pos, pos, indexing="ij")
axs[1].scatter((nn_ - mm).flatten().numpy(), L1.flatten().numpy(), s=8, c=mm.flatten().numpy(), cmap="viridis")
axs[1].set(title="all 256 pairs vs offset (colour = m): one curve", xlabel="offset n - m", ylabel="logit")
fig.tight_layout()
plt.show()

# %% [markdown] skip
# **The complex-number view.** Read pair $k$ as the complex number $z_k = x_{2k} + i\,x_{2k+1}$; turning it
# by $\theta$ is multiplying by $e^{i\theta}$. The dot product of two vectors is
# $\mathrm{Re}\sum_k q_k \overline{k_k}$, so after rotation it is
# $\mathrm{Re}\sum_k q_k\overline{k_k}\,e^{i(\theta_k(m)-\theta_k(n))}$: only $m - n$ appears.

# %% skip
def rope_complex(x, angles):
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())  # (..., N, D/2) complex
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


torch.testing.assert_close(rope_complex(q1.expand(N1, D1), angles_1d), Q1)
zq, zk = torch.view_as_complex(q1.view(-1, 2)), torch.view_as_complex(k1.view(-1, 2))
m, n = 2, 11
torch.testing.assert_close(L1[m, n], (zq * zk.conj() * torch.exp(2j * math.pi * (m - n) / periods_1d)).sum().real)
print("complex multiplication == 2x2 rotations; logit = Re(sum q_k conj(k_k) e^{i(theta(m) - theta(n))})")

# %% [markdown] skip
# **Which dims form a pair does not matter.** RoFormer pairs neighbours (2k, 2k+1). DINOv3 (like GPT-NeoX and
# most transformers models) pairs dim $j$ with dim $j + D/2$: split the vector in two halves and "rotate half",
# `[x1, x2] -> [-x2, x1]`, so that `x * cos + rotate_half(x) * sin` turns every pair at once with two contiguous
# slices. The two layouts differ only by a fixed permutation of the dims, which the learned q and k
# projections absorb. The check: permute, rotate the DINOv3 way, and get the permuted RoFormer result.

# %% skip
def rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the last dim: the 90-degree turn of every pair (j, j + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, sin, cos):
    """Turn each pair (j, j + D/2) of x (..., N, D) by the angle whose sin/cos are (N, D) at dims j and j + D/2."""
    return x * cos + rotate_half(x) * sin


half_layout = torch.cat([torch.arange(0, D1, 2), torch.arange(1, D1, 2)])  # pair k -> dims (k, k + D/2)
print("dims in rotate-half order:", half_layout.tolist())
x8 = torch.randn(N1, D1, dtype=f64)
a = angles_1d.tile(2)  # (N, D): the angle of pair k at dims k and k + D/2
torch.testing.assert_close(apply_rope(x8[:, half_layout], a.sin(), a.cos()), rotate_pairs(x8, angles_1d)[:, half_layout])
print("rotate-half RoPE == interleaved RoPE up to a permutation of the dims")

# %% [markdown] slide
# ## 2. DINOv3's 2-D axial RoPE, from primitives
#
# An image has two axes. DINOv3 keeps them apart ("axial"): half of the rotation pairs turn with the
# patch's **row** coordinate, the other half with its **column** coordinate. Everything below follows
# `dinov3/layers/rope_position_encoding.py` (our `dinolab/rope.py`). We use the head of ViT-S/16
# (`dinov3_vits16`: D = 384, 6 heads, so D_head = 64) on a 224 × 224 image: a 14 × 14 patch grid.
#
# **Periods.** D_head dims make D_head/2 pairs, half per axis: D_head/4 = 16 frequencies, shared by the two
# axes, with periods $P_k = \text{base}^{4k/D_\text{head}}$, base = 100 (`pos_embed_rope_base=100` in every
# released model, `dinov3/hub/backbones.py`).

# %% hide-input
embed_dim, num_heads = 384, 6  # dinov3_vits16
D_head = embed_dim // num_heads
base = 100.0
periods = base ** (4 * torch.arange(D_head // 4, dtype=f64) / D_head)
show("periods (D_head/4,)", periods)
print(f"D_head = {D_head}; periods from {periods[0].item():.3f} to {periods[-1].item():.2f} (ratio {base ** (1 - 4 / D_head):.2f})")
print("first four:", [round(p, 3) for p in periods[:4].tolist()])

# %% [markdown] skip
# **Coordinates.** Each patch is represented by its centre, $(i + 0.5)$ in patch units, divided by the grid size
# and mapped to $[-1, 1]$. `normalize_coords` chooses the divisor: `"separate"` divides rows by H and columns by W
# (every released model), `"max"` divides both by max(H, W), `"min"` by min(H, W). The result is (H·W, 2) with
# column 0 = row coordinate, column 1 = column coordinate, rows of the grid flattened row-major like the tokens.

# %% skip
def patch_coords(H, W, mode="separate", dtype=f64):
    ch = torch.arange(0.5, H, dtype=dtype)  # patch centres, in patch units
    cw = torch.arange(0.5, W, dtype=dtype)
    div_h, div_w = {"separate": (H, W), "max": (max(H, W),) * 2, "min": (min(H, W),) * 2}[mode]
    grid = torch.stack(torch.meshgrid(ch / div_h, cw / div_w, indexing="ij"), dim=-1)  # (H, W, 2) in [0, 1]
    return 2 * grid.flatten(0, 1) - 1  # (H*W, 2) in [-1, 1]


H, W = 14, 14
coords = patch_coords(H, W)
show("coords (H*W, 2)", coords)
print("patch (0, 0):", coords[0].tolist(), "  patch (0, 1):", [round(v, 4) for v in coords[1].tolist()])
print(f"one patch = a coordinate step of 2/{W} = {2 / W:.4f}; range ±{coords.max().item():.4f} = ±(1 - 1/{W})")
print("\n  grid    mode       row range          col range")
for (h, w) in [(14, 14), (14, 24)]:
    for mode in ("separate", "max", "min"):
        c = patch_coords(h, w, mode)
        print(f"{h:>3}x{w:<3} {mode:<9} [{c[:, 0].min().item():+.3f}, {c[:, 0].max().item():+.3f}]   "
              f"[{c[:, 1].min().item():+.3f}, {c[:, 1].max().item():+.3f}]")

# %% [markdown] skip
# **Angles and the `[h, w, h, w]` layout.** $\text{angle} = 2\pi \cdot \text{coord} / P_k$ for each axis and
# each of the 16 periods gives (H·W, 2, 16); flatten to (H·W, 32) = `[16 row angles | 16 column angles]`, then
# `tile(2)` to (H·W, 64) = `[h, w, h, w]`, so that dims j and j + 32 (a rotate-half pair) carry the same angle.

# %% skip
def rope_sin_cos(H, W, mode="separate", periods=periods):
    """Our from-scratch DINOv3 RoPE: (sin, cos), each (H*W, D_head)."""
    c = patch_coords(H, W, mode, dtype=periods.dtype)
    ang = 2 * math.pi * c[:, :, None] / periods[None, None, :]  # (HW, 2, D_head/4)
    ang = ang.flatten(1, 2).tile(2)  # (HW, D_head): [h, w, h, w]
    return ang.sin(), ang.cos()


angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
show("angles (H*W, 2, D_head/4)", angles)
angles = angles.flatten(1, 2)
show("angles flattened: [h | w] (H*W, D_head/2)", angles)
angles = angles.tile(2)
show("angles tiled: [h, w, h, w] (H*W, D_head)", angles)
assert torch.equal(angles[:, : D_head // 2], angles[:, D_head // 2 :])  # dim j and j + 32 share an angle
sin, cos = angles.sin(), angles.cos()
show("sin, cos (H*W, D_head)", sin)


def dim_role(j, D=D_head):
    """What dim j of a head carries: axis, frequency index, and its rotation partner."""
    half, quarter = D // 2, D // 4
    jj = j % half
    return ("row" if jj < quarter else "col"), jj % quarter, (j + half) % D


print("\n dim  axis  freq k  period  partner")
for j in [0, 1, 15, 16, 31, 32, 47, 48, 63]:
    axis, kk, partner = dim_role(j)
    print(f"{j:>4}  {axis:<4}  {kk:>6}  {periods[kk].item():6.2f}  {partner:>7}")

# %% [markdown] skip
# Now rotate q and k of shape (B, heads, N, D_head). For one pair (j, j + 32) with angle $a$,
# `x * cos + rotate_half(x) * sin` gives $y_j = x_j\cos a - x_{j+32}\sin a$ and $y_{j+32} = x_{j+32}\cos a + x_j\sin a$:
# the 2 × 2 rotation. The same sin/cos serve every batch element and every head (broadcast).

# %% skip
qh = torch.randn(2, num_heads, H * W, D_head, dtype=f64)  # (B, heads, N, D_head), patch tokens only
show("q (B, heads, H*W, D_head)", qh)
q_rot = apply_rope(qh, sin, cos)
show("rotated q (same shape)", q_rot)
j, a_j = 5, angles[:, 5]
torch.testing.assert_close(q_rot[..., j], qh[..., j] * a_j.cos() - qh[..., j + 32] * a_j.sin())
torch.testing.assert_close(q_rot[..., j + 32], qh[..., j + 32] * a_j.cos() + qh[..., j] * a_j.sin())
torch.testing.assert_close(q_rot.norm(dim=-1), qh.norm(dim=-1))
print("pair (5, 37) is a 2x2 rotation; norms are kept")

# %% [markdown] slide
# ### Check against `dinolab.rope` and against transformers
#
# `dinolab.rope.RopePositionEmbedding(embed_dim, num_heads=...)` returns `(sin, cos)` like the official module.
# We compare all three coordinate modes on square and non-square grids. The module works in float32 (hub models
# pass `pos_embed_rope_dtype="fp32"`), so we compare our float64 version with a float32 tolerance.

# %% hide-input
for (h, w) in [(14, 14), (14, 24), (32, 32), (7, 3)]:
    for mode in ("separate", "max", "min"):
        ref = RopePositionEmbedding(embed_dim, num_heads=num_heads, normalize_coords=mode).eval()
        sin_ref, cos_ref = ref(H=h, W=w)
        sin_ours, cos_ours = rope_sin_cos(h, w, mode)
        torch.testing.assert_close(sin_ref, sin_ours.float(), atol=2e-6, rtol=0)
        torch.testing.assert_close(cos_ref, cos_ours.float(), atol=2e-6, rtol=0)
ref = RopePositionEmbedding(embed_dim, num_heads=num_heads).eval()  # the hub setting: base 100, "separate"
torch.testing.assert_close(ref.periods, periods.float())
print("dinolab.rope matches our from-scratch RoPE: 4 grids x 3 modes, sin and cos, and the periods buffer")
print("periods buffer:", tuple(ref.periods.shape), ref.periods.dtype,
      "| learnable parameters:", sum(p.numel() for p in ref.parameters()))

# %% [markdown] skip
# transformers' `DINOv3ViTRopePositionEmbedding` (in `transformers.models.dinov3_vit.modeling_dinov3_vit`) takes
# the pixel tensor (it only reads H and W from it), stores `inv_freq = 1 / periods`, supports only `"separate"`,
# and returns **`(cos, sin)`**, the other order. Its config has `pos_embed_rescale=2.0` by default, so in training
# mode it draws random coordinates (section 6): compare in `.eval()`.

# %% skip
from transformers import DINOv3ViTConfig
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

cfg = DINOv3ViTConfig(hidden_size=384, num_attention_heads=6)
hf_rope = DINOv3ViTRopePositionEmbedding(cfg).eval()
print("transformers: rope_theta =", cfg.rope_theta, "| inv_freq", tuple(hf_rope.inv_freq.shape),
      "| pos_embed_rescale =", cfg.pos_embed_rescale)
torch.testing.assert_close(hf_rope.inv_freq, (1 / periods).float())
for (h, w) in [(14, 14), (14, 24), (32, 32)]:
    cos_hf, sin_hf = hf_rope(torch.zeros(1, 3, 16 * h, 16 * w))  # note the order: (cos, sin)
    sin_ours, cos_ours = rope_sin_cos(h, w)
    torch.testing.assert_close(sin_hf, sin_ours.float(), atol=2e-6, rtol=0)
    torch.testing.assert_close(cos_hf, cos_ours.float(), atol=2e-6, rtol=0)
print("transformers matches on 14x14, 14x24, 32x32; (cos, sin) shapes at 224x384:",
      [tuple(t.shape) for t in hf_rope(torch.zeros(1, 3, 224, 384))])

# %% [markdown] slide
# ## 3. The identity in 2-D, and the tokens that are not rotated
#
# Put the same query content q and key content k on every patch of the 14 × 14 grid, rotate, and take all
# 196 × 196 logits. Because each axis has its own rotation and each rotation depends linearly on the
# row (or column) index, the logit must depend only on the offset (Δrow, Δcol) of the key from the query.
# We group the 38,416 pairs by their offset (27 × 27 = 729 groups) and measure the spread inside each group.

# %% hide-input
def offset_stats(L, H, W):
    """L (HW, HW) logits of a H x W grid. Group the pairs by (d_row, d_col) = key - query.
    Returns the mean map (2H-1, 2W-1), the max-min spread map, and R^2: the fraction of the logits'
    variance that the offset alone explains (1 = a pure function of the offset)."""
    rc = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).reshape(-1, 2).to(L.device)
    d = rc[None, :, :] - rc[:, None, :]  # (HW, HW, 2) offset of key j from query i
    idx = ((d[..., 0] + H - 1) * (2 * W - 1) + d[..., 1] + W - 1).flatten()
    n, Lf = (2 * H - 1) * (2 * W - 1), L.flatten()
    count = torch.zeros(n, dtype=L.dtype, device=L.device).index_add_(0, idx, torch.ones_like(Lf))
    mean = torch.zeros_like(count).index_add_(0, idx, Lf) / count
    hi = torch.full_like(count, -torch.inf).scatter_reduce(0, idx, Lf, "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce(0, idx, Lf, "amin")
    r2 = 1 - ((Lf - mean[idx]) ** 2).sum() / ((Lf - Lf.mean()) ** 2).sum()
    shape = (2 * H - 1, 2 * W - 1)
    return mean.reshape(shape), (hi - lo).reshape(shape), r2.item()


q, k = torch.randn(D_head, dtype=f64), torch.randn(D_head, dtype=f64)
Qr = apply_rope(q.expand(H * W, D_head), sin, cos)
Kr = apply_rope(k.expand(H * W, D_head), sin, cos)
L2 = Qr @ Kr.T
show("2-D: logits (H*W, H*W)", L2)
offset_map, spread_map, r2 = offset_stats(L2, H, W)
show("2-D: logit vs offset (2H-1, 2W-1)", offset_map)
print(f"logits: std {L2.std().item():.2f}; largest spread inside an offset group below 1e-10 (rounding): "
      f"{spread_map.max().item() < 1e-10}")
print(f"R^2 of 'logit = f(offset)': {r2:.6f}")
assert spread_map.max() < 1e-10 and r2 > 1 - 1e-12

# %% slide hide-input
fig, axs = plt.subplots(1, 3, figsize=(12.8, 4.6))
ext = [-(W - 1) - 0.5, W - 1 + 0.5, H - 1 + 0.5, -(H - 1) - 0.5]
vmax = L2.abs().max().item()
axs[0].imshow(offset_map.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, extent=ext)
axs[0].set(title="logit vs (Δrow, Δcol)", xlabel="Δcol (patches)", ylabel="Δrow (patches)")
for ax, (r0, c0), colour in [(axs[1], (3, 3), "k"), (axs[2], (10, 8), "g")]:
    row = L2[r0 * W + c0].reshape(H, W)
    # the query's 14x14 map is a window of the offset map: keys at (r, c) have offset (r - r0, c - c0)
    torch.testing.assert_close(row, offset_map[H - 1 - r0 : 2 * H - 1 - r0, W - 1 - c0 : 2 * W - 1 - c0])
    ax.imshow(row.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.plot(c0, r0, marker="*", color=colour, ms=12)
    ax.set(title=f"logits of the query at patch ({r0}, {c0})", xlabel="key column", ylabel="key row")
    axs[0].add_patch(plt.Rectangle((-c0 - 0.5, -r0 - 0.5), W, H, fill=False, color=colour, lw=1.5))
fig.suptitle("Same q, k on every patch: each query's map is a window (box) cut from one offset map", fontsize=14)
fig.tight_layout()
plt.show()

# %% [markdown] skip
# **cls and storage tokens are not rotated.** In `dinov3/layers/attention.py` the sequence is
# `[cls, 4 storage tokens, H·W patches]` and RoPE is applied to the last H·W tokens of q and k only
# (`prefix = N - H*W`); v is never rotated. A prefix token has no position. It can still tell where a patch is:
# its unrotated query meets a *rotated* key, so $q_{cls}\cdot R(p)\,k$ depends on the patch's absolute position p.
# `dinolab.attention.SelfAttention.apply_rope` does this, as does transformers' `apply_rotary_pos_emb`.

# %% skip
n_prefix = 1 + 4  # cls + 4 storage tokens, as in every released model
attn = SelfAttention(embed_dim, num_heads=num_heads, qkv_bias=True, mask_k_bias=True)
sin32, cos32 = RopePositionEmbedding(embed_dim, num_heads=num_heads).eval()(H=H, W=W)
qf = torch.randn(2, num_heads, n_prefix + H * W, D_head)
kf = torch.randn(2, num_heads, n_prefix + H * W, D_head)
show("q with prefix tokens (B, heads, 5 + H*W, D_head)", qf)
q_out, k_out = attn.apply_rope(qf, kf, (sin32, cos32))
assert torch.equal(q_out[:, :, :n_prefix], qf[:, :, :n_prefix]) and torch.equal(k_out[:, :, :n_prefix], kf[:, :, :n_prefix])
torch.testing.assert_close(q_out[:, :, n_prefix:], apply_rope(qf[:, :, n_prefix:].double(), sin, cos).float(), atol=1e-5, rtol=1e-5)

from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

q_hf, k_hf = apply_rotary_pos_emb(qf, kf, cos32, sin32)
torch.testing.assert_close(q_hf, q_out)
torch.testing.assert_close(k_hf, k_out)
print("first 5 tokens unchanged; patch tokens rotated exactly as ours; transformers agrees")

cls_q = torch.randn(D_head, dtype=f64)
cls_logits = Kr @ cls_q  # unrotated cls query against the rotated keys of the same content k
print(f"cls-query logits over the 196 patches (same key content everywhere): std {cls_logits.std().item():.2f} > 0, "
      "so they depend on where the patch is")
assert cls_logits.std() > 0.1

# %% [markdown] slide
# ## 4. The frequencies
#
# Coordinates span about 2 units across the image (from −1 to 1). A pair with period $P$ turns
# $2/P$ full turns from one edge to the other. With base 100 and D_head = 64 the periods go from 1
# (almost two turns across the image: a fine, high-frequency pattern that distinguishes neighbours) to 75
# (a fortieth of a turn: nearly constant, close to "no position", free for content). Row and column pairs use
# the same 16 periods. The table is for a 14 × 14 grid and a 32 × 32 grid (512 px).

# %% hide-input
print("  k  period  turns across image  rad per patch @14  rad per patch @32")
for kk in [0, 2, 4, 8, 12, 15]:
    P = periods[kk].item()
    print(f"{kk:>3}  {P:6.2f}  {2 * (1 - 1 / 14) / P:18.3f}  {2 * math.pi * (2 / 14) / P:17.3f}  {2 * math.pi * (2 / 32) / P:17.3f}")

# %% slide hide-input
fig = plt.figure(figsize=(12.8, 5.6))
gs = fig.add_gridspec(2, 4, width_ratios=[1.5, 1, 1, 1])
ax = fig.add_subplot(gs[:, 0])
ax.semilogy(range(len(periods)), periods.numpy(), "o-", ms=4)
ax.axhline(2, color="grey", ls="--", lw=1)
ax.text(0.3, 2.3, "image width in coordinates (2)", fontsize=11, color="grey")
ax.set(title=f"16 periods P_k = 100^(4k/{D_head})", xlabel="frequency index k", ylabel="period (coordinate units, log)")
show_k = [0, 5, 15]
for r, axis in enumerate(["row", "col"]):
    for cidx, kk in enumerate(show_k):
        dim = kk if axis == "row" else D_head // 4 + kk
        a2 = fig.add_subplot(gs[r, cidx + 1])
        a2.imshow(cos[:, dim].reshape(H, W).numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        a2.set_title(f"{axis} k={kk} (dim {dim}), P={periods[kk].item():.1f}", fontsize=11)
        a2.set_xticks([])
        a2.set_yticks([])
fig.suptitle("cos(angle) over the 14 x 14 grid: row pairs make horizontal bands, column pairs vertical bands", fontsize=14)
fig.tight_layout()
plt.show()

# %% [markdown] slide
# ## 5. Other resolutions and aspect ratios
#
# Coordinates are normalised, so the grid always spans about $[-1, 1]$: at 224 px (14 × 14) and at 512 px
# (32 × 32) the patch *at the same place in the image* gets (almost) the same angles; a larger image just samples
# the same range more densely. For a non-square image, `"separate"` stretches each axis to $[-1, 1]$ (a 224 × 384
# image gets the same coordinate extent as a square one, so its patches are closer together along the long axis).
# `"max"` and `"min"` divide both axes by the same number, so patches stay square (the same step on both axes),
# but note what the official formula `2 * (i + 0.5) / max(H, W) - 1` does: the grid is anchored at −1 (top-left),
# not centred. With `"max"` the short axis stops well before +1; with `"min"` the long axis runs past +1.

# %% slide hide-input
grids = [(14, 14, "separate"), (32, 32, "separate"), (14, 24, "separate"), (14, 24, "max"), (14, 24, "min")]
right = [max(1.15, patch_coords(h, w, mode)[:, 1].max().item() + 0.15) for h, w, mode in grids]
fig, axs = plt.subplots(1, 5, figsize=(12.8, 3.9), gridspec_kw={"width_ratios": [r + 1.15 for r in right]})
for ax, (h, w, mode), xr in zip(axs, grids, right):
    c = patch_coords(h, w, mode)
    ax.scatter(c[:, 1].numpy(), c[:, 0].numpy(), s=5, linewidths=0)
    ax.add_patch(plt.Rectangle((-1, -1), 2, 2, fill=False, ls="--", color="grey"))
    ax.set_title(f"{16 * h}x{16 * w} px, {h}x{w}\n'{mode}'", fontsize=11)
    ax.set_aspect("equal")
    ax.set_xlim(-1.15, xr)
    ax.set_ylim(1.15, -1.15)  # row 0 at the top, like the image
axs[0].set(xlabel="column coord", ylabel="row coord")
fig.tight_layout()
plt.show()
for h, w, mode in grids:
    c = patch_coords(h, w, mode)
    print(f"{h}x{w} {mode:<8}: coordinate step per patch (row, col) = ({2 / {'separate': h, 'max': max(h, w), 'min': min(h, w)}[mode]:.4f}, "
          f"{2 / {'separate': w, 'max': max(h, w), 'min': min(h, w)}[mode]:.4f}), col range ±{c[:, 1].max().item():.3f}")

# %% [markdown] skip
# ### RoPE vs DINOv2's interpolated absolute position embedding
#
# DINOv2 (`dinov2/models/vision_transformer.py`) learns a table `pos_embed` of shape (1, 1 + N, D) (one vector
# per patch of the training grid, plus one for cls), *adds* it to the tokens, and for any other grid resamples the
# patch part with `F.interpolate(..., mode="bicubic")` (`interpolate_pos_encoding`). The hub models are built for
# 518 px with patch 14 (`dinov2/hub/backbones.py`): a 37 × 37 table. RoPE has no table at all.

# %% skip
dinov2_table = torch.zeros(1, 1 + 37 * 37, embed_dim)  # dinov2_vits14: D = 384, 518 px / 14 = 37
print(f"DINOv2 ViT-S/14 pos_embed {tuple(dinov2_table.shape)}: {dinov2_table.numel():,} learned parameters")
print(f"DINOv3 ViT-S/16 rope_embed: {sum(p.numel() for p in ref.parameters())} parameters, "
      f"a {tuple(ref.periods.shape)} buffer of fixed periods")

# %% [markdown] skip
# **An experiment.** We measure the *positional part* of the attention logit on a 14 × 14 grid (224 px, the
# "training" resolution) and on a 32 × 32 grid (512 px), for both schemes:
#
# * **RoPE**: the same random q and k contents on every patch, rotated (as in section 3);
# * **absolute**: a stand-in for a learned table, random N(0, 1) vectors on the 14 × 14 grid (untrained: a trained
#   table is smoother), bicubically interpolated to 32 × 32 like DINOv2; the logit between patches i and j is
#   $(W_q p_i)\cdot(W_k p_j)$ with random projections (the position-position term of the logit).
#
# Three questions: is the logit a function of the offset (R²)? How does the logit-vs-offset curve change from
# 14 × 14 to 32 × 32? Does the resampled table still look like the learned one (its norm)?
# `GRIDS` and `DEVICE` can be changed (e.g. a 64 × 64 grid on a GPU).

# %% skip
GRIDS = (14, 32)
seed_everything(0)
q_c, k_c = torch.randn(D_head, dtype=f64, device=DEVICE), torch.randn(D_head, dtype=f64, device=DEVICE)
table14 = torch.randn(1, embed_dim, GRIDS[0], GRIDS[0], dtype=f64, device=DEVICE)  # "learned" at 14 x 14
W_q = torch.randn(embed_dim, D_head, dtype=f64, device=DEVICE) / embed_dim**0.5
W_k = torch.randn(embed_dim, D_head, dtype=f64, device=DEVICE) / embed_dim**0.5
res = {}
for g in GRIDS:
    s, c = (t.to(DEVICE) for t in rope_sin_cos(g, g))
    L_rope = apply_rope(q_c.expand(g * g, D_head), s, c) @ apply_rope(k_c.expand(g * g, D_head), s, c).T
    table = table14 if g == GRIDS[0] else F.interpolate(table14, size=(g, g), mode="bicubic", align_corners=False)
    p = table[0].flatten(1).T  # (g*g, D): one position vector per patch
    L_abs = (p @ W_q) @ (p @ W_k).T
    res[g] = {"rope": offset_stats(L_rope, g, g), "abs": offset_stats(L_abs, g, g),
              "L_rope": L_rope, "L_abs": L_abs, "pos_norm": p.norm(dim=-1).mean().item()}
    show(f"{g}x{g}: absolute table (1, D, g, g)", table)
    show(f"{g}x{g}: positional logits (g*g, g*g)", L_abs)

print("\ngrid   R^2 RoPE   R^2 absolute   mean spread in an offset group (RoPE | absolute)   logit std (RoPE | abs)")
for g in GRIDS:
    r, ab = res[g]["rope"], res[g]["abs"]
    rope_spread = "< 1e-10" if r[1].max().item() < 1e-10 else f"{r[1].mean().item():.1e}"
    print(f"{g:>2}x{g:<2}  {r[2]:8.4f}   {ab[2]:12.4f}   {rope_spread:>25} | {ab[1].mean().item():6.2f}"
          f"          {res[g]['L_rope'].std().item():6.2f} | {res[g]['L_abs'].std().item():5.2f}")
g0, g1 = GRIDS
print(f"\nmean |position vector|: {g0}x{g0} {res[g0]['pos_norm']:.2f} -> {g1}x{g1} after bicubic {res[g1]['pos_norm']:.2f} "
      f"({100 * (res[g1]['pos_norm'] / res[g0]['pos_norm'] - 1):+.0f}%); RoPE rotations keep every norm")
assert all(res[g]["rope"][2] > 1 - 1e-9 for g in GRIDS) and all(res[g]["abs"][2] < 0.5 for g in GRIDS)

# %% [markdown] skip
# **RoPE's curve in patch units stretches; in coordinates it is the same function.** At 32 × 32 an offset of one
# patch is a coordinate step of 2/32 instead of 2/14, so the logit at Δcol = 16 patches (coordinate offset 1.0) at
# 512 px equals the logit at Δcol = 7 patches at 224 px. More generally every RoPE logit, at any grid, equals one
# continuous function of the coordinate offset, $g(\delta) = \langle q, R(\delta)\,k\rangle$: we check all
# offsets of both grids against it.

# %% skip
def g_of_offset(delta):
    """<q, R(delta) k> for coordinate offsets delta (M, 2): q at coordinate (0, 0), k at delta."""
    ang = (2 * math.pi * delta[:, :, None] / periods.to(delta.device)).flatten(1, 2).tile(2)
    return apply_rope(k_c.expand(len(delta), D_head), ang.sin(), ang.cos()) @ q_c


for g in GRIDS:
    dr, dc = torch.meshgrid(torch.arange(-(g - 1), g), torch.arange(-(g - 1), g), indexing="ij")
    delta = torch.stack([dr, dc], -1).reshape(-1, 2).to(f64).to(DEVICE) * (2 / g)  # patch offsets -> coordinate offsets
    torch.testing.assert_close(res[g]["rope"][0].flatten(), g_of_offset(delta))
m0, m1 = res[g0]["rope"][0], res[g1]["rope"][0]
h0, h1 = g0 // 2, g1 // 2  # Δcol of g/2 patches = coordinate offset 1.0 (even grids)
torch.testing.assert_close(m1[g1 - 1, g1 - 1 + h1], m0[g0 - 1, g0 - 1 + h0])
print(f"RoPE: logit(Δcol={h0} @ {g0}x{g0}) = {m0[g0 - 1, g0 - 1 + h0].item():+.3f} = logit(Δcol={h1} @ {g1}x{g1}) = "
      f"{m1[g1 - 1, g1 - 1 + h1].item():+.3f}; every offset of both grids = g(coordinate offset)")
print(f"one patch = {2 / g0:.4f} coordinate units at {g0}x{g0}, {2 / g1:.4f} at {g1}x{g1}: "
      f"the same image fraction is {g1 / g0:.2f}x as many patches away")

# %% slide hide-input
fig, axs = plt.subplots(1, 3, figsize=(12.8, 5))
cols = {g0: "tab:blue", g1: "tab:orange"}
for g in GRIDS:
    mean_r, _, _ = res[g]["rope"]
    d_patch = torch.arange(-(g - 1), g)
    curve = mean_r[g - 1].cpu()  # Δrow = 0 slice
    axs[0].plot(d_patch.numpy(), curve.numpy(), ".-", ms=3, lw=1, color=cols[g], label=f"{g}x{g}")
    axs[1].plot((d_patch * 2 / g).numpy(), curve.numpy(), ".", ms=4, color=cols[g], label=f"{g}x{g}")
    La = res[g]["L_abs"].cpu().reshape(g, g, g, g)  # (query row, query col, key row, key col)
    # Δrow = 0 pairs, for every query: logit of key (r, c0 + d) vs query (r, c0)
    band = [torch.diagonal(La.diagonal(dim1=0, dim2=2), offset=d, dim1=0, dim2=1).flatten() for d in d_patch.tolist()]
    lo = torch.stack([b.min() for b in band])
    hi = torch.stack([b.max() for b in band])
    axs[2].fill_between((d_patch * 2 / g).numpy(), lo.numpy(), hi.numpy(), alpha=0.2, color=cols[g], label=f"{g}x{g}: min-max over queries")
La14 = res[g0]["L_abs"].cpu().reshape(g0, g0, g0, g0)
for r0, style in [(2, "-"), (7, "--"), (11, ":")]:  # three queries in the left column, keys in the same row
    axs[2].plot(torch.arange(g0).numpy() * 2 / g0, La14[r0, 0, r0].numpy(), style, color="k", lw=1.2,
                label=f"{g0}x{g0}: query at ({r0}, 0)")
fine = torch.linspace(-2, 2, 401, dtype=f64, device=DEVICE)
axs[1].plot(fine.cpu().numpy(), g_of_offset(torch.stack([torch.zeros_like(fine), fine], -1)).cpu().numpy(), "k-", lw=0.6, label="g(δ)")
axs[0].set(title="RoPE: logit vs Δcol in patches", xlabel="Δcol (patches), Δrow = 0", ylabel="logit")
axs[1].set(title="RoPE: vs Δcol in coordinates: one curve", xlabel="Δcol (coordinate units)")
axs[2].set(title="absolute: each query its own curve", xlabel="Δcol (coordinate units)")
for ax in axs:
    ax.legend(fontsize=10, loc="lower left")
fig.tight_layout()
plt.show()

# %% [markdown] slide
# What the experiment shows:
#
# * **Relative vs absolute.** The RoPE logit is a function of the offset alone (R² = 1 at both grids, spread at rounding level);
#   with an added absolute table the positional logit depends on *where* the pair is (R² near 0 for this untrained
#   table: the band in the third panel). Training can make a table partly relative; RoPE is relative by construction.
# * **Resolution.** RoPE needs no parameters and no resampling: the angles of any grid come from the formula, and
#   the logit is the same function $g$ of the coordinate offset at every resolution. Honestly, that means the curve
#   *in patches* is stretched by 32/14 at 512 px: a head that looked one patch away at 224 px now looks about 2.3
#   patches away, i.e. at the same fraction of the image, and neighbouring patches get closer angles than any pair
#   seen at 224 px (section 6 shows how training widens that range).
# * **Interpolation changes the absolute embedding itself.** Bicubic resampling averages neighbouring table entries,
#   so in-between positions get vectors that were never learned (here the mean norm drops, as printed above, and
#   the logit spread with it); a smooth trained table suffers less. RoPE keeps every q and k norm exactly.
# * **Aspect ratio.** Both schemes stretch a non-square grid onto the trained range ("separate" for RoPE, the two
#   scale factors of `F.interpolate` for DINOv2): neither keeps patches isotropic unless you choose `"max"`/`"min"`.

# %% [markdown] notes
# ## 6. Training-time augmentations of the coordinates
#
# `RopePositionEmbedding` can randomise the coordinates while `self.training` is True, in this order
# (`dinov3/layers/rope_position_encoding.py`):
#
# | option | what it does | drawn |
# |---|---|---|
# | `shift_coords = s` | coords + U(−s, s) | one value per axis |
# | `jitter_coords = j` | coords × exp(U(−log j, log j)) | one factor per axis (changes the aspect) |
# | `rescale_coords = r` | coords × exp(U(−log r, log r)) | **one** factor for both axes |
#
# Released hub models set `rescale_coords=2` only (factor in [1/2, 2]); shift and jitter are off. In eval mode all
# three do nothing, so the hub setting is inert at inference. The shift and jitter values below are ours, for
# illustration (no released config uses them).

# %% slide hide-input
settings = {
    "rescale 2 (hub models)": dict(rescale_coords=2.0),
    "shift 0.3 (ours)": dict(shift_coords=0.3),
    "jitter 1.5 (ours)": dict(jitter_coords=1.5),
    "all three": dict(shift_coords=0.3, jitter_coords=1.5, rescale_coords=2.0),
}
h = w = 5
plain = RopePositionEmbedding(embed_dim, num_heads=num_heads).eval()
base_coords = plain.coords(h, w)


def draw_grid(ax, c, **kw):
    """Draw a (h*w, 2) coordinate grid as a wireframe (x = column coord, y = row coord)."""
    g = c.reshape(h, w, 2)
    for r in range(h):
        ax.plot(g[r, :, 1], g[r, :, 0], **kw)
    for col in range(w):
        ax.plot(g[:, col, 1], g[:, col, 0], **kw)


fig, axs = plt.subplots(1, 4, figsize=(12.8, 4.2))
seed_everything(1)
for ax, (name, kw) in zip(axs, settings.items()):
    aug = RopePositionEmbedding(embed_dim, num_heads=num_heads, **kw)
    assert torch.equal(aug.eval().coords(h, w), base_coords)  # inert in eval mode
    aug.train()
    draw_grid(ax, base_coords, color="lightgrey", lw=3)
    for colour in ["tab:blue", "tab:orange", "tab:green"]:
        draw_grid(ax, aug.coords(h, w), color=colour, lw=1, marker=".", ms=3)
    ax.set_title(name)
    ax.set_aspect("equal")
    ax.invert_yaxis()
fig.suptitle("5 x 5 patch centres: eval grid (thick grey) vs three training draws (colours)", fontsize=14)
fig.tight_layout()
plt.show()

only_rescale = RopePositionEmbedding(embed_dim, num_heads=num_heads, rescale_coords=2.0).train()
c_rescaled = only_rescale.coords(h, w)
ratio = c_rescaled[0] / base_coords[0]  # patch (0, 0): (row factor, col factor)
torch.testing.assert_close(c_rescaled, base_coords * ratio[0])  # one factor, both axes, every patch
assert 0.5 <= ratio[0] <= 2
only_jitter = RopePositionEmbedding(embed_dim, num_heads=num_heads, jitter_coords=1.5).train()
ratio_j = only_jitter.coords(h, w)[0] / base_coords[0]
print(f"rescale: one factor {ratio[0].item():.3f} on both axes; jitter: row x{ratio_j[0].item():.3f}, "
      f"col x{ratio_j[1].item():.3f}")

# %% [markdown] skip
# **Each block draws its own augmentation.** The official ViT calls `self.rope_embed(H=H, W=W)` inside the block
# loop (`dinov3/models/vision_transformer.py`), so in training each block gets fresh random coordinates: a
# different rescale factor per block for the same image. In eval mode every block gets the same values (both the
# official code and `dinolab`'s ViT still recompute them in every block: for a patch grid that costs next to
# nothing). We record the coordinates each call produces in the tiny ViT of the series
# (`dinov3_vittiny16`: 6 blocks, hub RoPE settings) by wrapping its `rope_embed.coords`.

# %% skip
tiny = hub.dinov3_vittiny16()
print("tiny ViT rope settings: rescale_coords =", tiny.rope_embed.rescale_coords, "| blocks:", len(tiny.blocks))
recorded = []
original_coords = tiny.rope_embed.coords


def recording_coords(H, W):
    c = original_coords(H, W)
    recorded.append(c)
    return c


tiny.rope_embed.coords = recording_coords  # an instance attribute: forward's self.coords(H, W) now records
img = torch.randn(1, 3, 64, 64)  # a 4 x 4 patch grid is enough
grid_eval = tiny.eval().rope_embed.coords(4, 4)
recorded.clear()
seed_everything(2)
with torch.no_grad():
    tiny.train()(img, is_training=True)
    factors_train = [(c / grid_eval)[0, 0].item() for c in recorded]
    recorded.clear()
    tiny.eval()(img)
    factors_eval = [(c / grid_eval)[0, 0].item() for c in recorded]
tiny.rope_embed.coords = original_coords
print(f"train: {len(factors_train)} RoPE calls, rescale factor per block:", " ".join(f"{f:.3f}" for f in factors_train))
print(f"eval:  {len(factors_eval)} RoPE call(s), factor:", " ".join(f"{f:.3f}" for f in factors_eval))
assert len(factors_train) == len(tiny.blocks) and len(set(round(f, 6) for f in factors_train)) == len(tiny.blocks)
assert all(f == 1.0 for f in factors_eval)

# %% [markdown] skip
# Why rescale? A factor $s$ at a 14 × 14 grid gives a coordinate step per patch of $2s/14$, the step of a
# $14/s$-patch grid. With $s \in [1/2, 2]$ training sees steps from that of a 28 × 28 grid to that of a 7 × 7 grid,
# so the spacings met at other resolutions are not new to the model (DINOv3 also has a high-resolution
# adaptation stage at 512–768 px, `dinov3_vit7b16_high_res_adapt.yaml`).

# %% skip
for s_ in (0.5, 1.0, 2.0):
    print(f"14x14, rescale {s_:>3}: step per patch {2 * s_ / 14:.4f}  (= a {14 / s_:.0f}x{14 / s_:.0f} grid without rescale)")
print(f"32x32, eval       : step per patch {2 / 32:.4f}")

# %% [markdown] skip
# **A caveat on the stored periods.** The official training builder (`dinov3/models/__init__.py::build_model`) does
# not forward `pos_embed_rope_dtype`, so the `rope_embed.periods` buffer in released checkpoints may be rounded to
# bf16, while transformers and timm recompute fp32 periods and ignore it; `dinolab.weights` loads the buffer as is
# from an official checkpoint, so for bit-exact parity take the periods from the checkpoint (the rounding error is
# computed below).

# %% skip
p_bf16 = ref.periods.to(torch.bfloat16).float()
rel_err = ((p_bf16 - ref.periods).abs() / ref.periods).max().item()
print(f"bf16-rounded periods: largest relative error {rel_err:.1e} (bf16 keeps 8 significant bits)")
assert rel_err < 2 ** -8

# %% [markdown] skip
# ## 7. Summary
#
# **Shapes.** Where RoPE sits in ViT-S/16 (built on the meta device: shapes only), at 512 × 512 and at 224 × 384.
# Its (sin, cos), each (H·W, D_head), go into every block's attention next to the 1 + 4 + H·W tokens (in eval
# `dinolab` computes them once for all 12 blocks, so the table shows one call).

# %% skip
vits = hub.dinov3_vits16(device="meta").eval()
for size in [(512, 512), (224, 384)]:
    print(trace(vits, torch.empty(1, 3, *size, device="meta"), names=["patch_embed", "rope_embed", "blocks.0.attn", "norm"]))
    print()

# %% [markdown] notes
# The from-scratch build, step by step (recorded by `show` above):

# %% slide hide-input
def md_cell(text):
    """Escape what Markdown would read as markup: '|' would split the table row ("[h | w]"), '*' would start
    an emphasis ("(H*W, H*W)")."""
    return text.replace("|", "\\|").replace("*", "\\*")


Markdown("| step | shape |\n|---|---|\n" + "\n".join(f"| {md_cell(name)} | `{shape}` |" for name, shape in SHAPES))

# %% [markdown] slide
# **What to remember**
#
# * RoPE rotates q and k (never v) pair by pair; $\langle R(m)q, R(n)k\rangle = \langle q, R(n-m)k\rangle$, so the
#   logit sees only the offset. Which dims are paired is a convention: DINOv3 pairs j with j + D_head/2 ("rotate half").
# * DINOv3 is **axial**: of the D_head/2 pairs, the first D_head/4 turn with the row coordinate, the next D_head/4
#   with the column coordinate, laid out `[h, w, h, w]`; 16 periods $100^{4k/64}$ from 1 to 75 for D_head = 64
#   (32 periods for the 7B, D_head = 128).
# * Coordinates are patch centres normalised to $[-1, 1]$ (`"separate"` in every released model), angle
#   $= 2\pi\cdot\text{coord}/P_k$. No learned parameters, only a `periods` buffer; nothing to interpolate at a new
#   resolution, but one patch is a smaller coordinate step on a larger grid.
# * cls and the 4 storage tokens are not rotated: the last H·W tokens are.
# * Training may randomise the coordinates (hub models: `rescale_coords=2`, one factor in [1/2, 2], drawn anew in every
#   block); eval is deterministic. transformers' module returns `(cos, sin)`, ours and the official `(sin, cos)`.

# %% [markdown] skip
# **Exercises**
#
# 1. Replace `"separate"` by `"max"` in section 3 on a 10 × 16 grid. Is the logit still a function of (Δrow, Δcol)?
#    Is it still a function of the *coordinate* offset when you compare a 10 × 16 and a 16 × 16 grid?
# 2. Set base = 10,000 (RoFormer's, and the LLM default) instead of DINOv3's 100 and redraw the frequency figure.
#    How many periods are now longer than the image (2 coordinate units), i.e. nearly useless for position?
# 3. Put q and k on a 14 × 14 grid with `rescale_coords=2` in training mode. Is the logit still a function of the
#    offset? Of which offset: patches or coordinates? Does `shift_coords` change the patch-to-patch logits? The
#    cls-to-patch logits?
# 4. The cls token's query meets rotated keys. Using section 3, show that the cls-to-patch logits over the grid are a
#    sum of 2-D cosine waves, and find which periods dominate for random q, k.
# 5. Make the absolute table of section 5 smooth (e.g. bicubic-upsample a random 4 × 4 grid to 14 × 14) and rerun the
#    experiment. How do R² and the norm loss from interpolation change?
