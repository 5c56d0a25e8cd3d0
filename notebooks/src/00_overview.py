# %% [markdown] slide
# # dinolab: DINOv3 rebuilt in plain PyTorch
#
# **An overview of the series in ten slides.** The notebooks of this series rebuild DINOv3 and its dense-prediction stack
# from primitives: every component is built step by step with its shapes printed, checked against the official
# code or an independent implementation, looked at in a figure, and run on a CPU. Every number in them is
# computed, not typed.
#
# Each notebook has its own deck (`make slides`); this one is the map. Start with
# [notebook 00](00_dino_v1_v2_v3.ipynb) for DINO v1 → v2 → v3, the released models and their costs.

# %% slide hide-input
from IPython.display import Markdown, display

from dinolab import viz

display(Markdown("## The series\n\n" + viz.series_map("")))

# %% [markdown] slide
# ## The idea in one picture
#
# ```text
#   image (B, 3, H, W)
#     │  01 patch embedding: 16×16 patches → D-dim tokens (a strided conv)
#     ▼
#   [cls, 4 storage, H/16·W/16 patches]          04 the ViT: depth × pre-norm blocks
#     │  02 2-D RoPE rotates q, k of the patches      03 attention, LayerScale, SwiGLU
#     ▼
#   frozen DINOv3 backbone ── trained by 05: DINO + iBOT + KoLeo + Gram anchoring, distilled from the 7B
#     │  4 intermediate layers (stride 16)
#     ▼
#   06 SPM (conv stem, strides 4/8/16/32) ── 07 deformable attention ── 08 adapter: SPM tokens read the ViT
#     │  pyramid f1..f4
#     ▼
#   09 pixel decoder + FPN ──► 10 segmentation · 11 depth (DPT) · 12 classification (cls, k-NN) · 13 LoRA
# ```

# %% hide-input
import torch

from dinolab import hub
from dinolab.utils import count_params

with torch.device("meta"):
    counts = {name: count_params(hub.build(name, device="meta")) for name in hub.RELEASED}
    vits = hub.build("dinov3_vits16", device="meta")
    n_tokens = vits.prepare_tokens_with_masks(torch.empty(1, 3, 224, 224))[0].shape[1]
print(f"{len(counts)} released ViTs, {min(counts.values()) / 1e6:.1f}M to {max(counts.values()) / 1e9:.3f}B parameters; "
      f"patch {vits.patch_embed.patch_size[0]}; {n_tokens} tokens for a 224 x 224 image "
      f"(1 cls + {vits.n_storage_tokens} storage + {(224 // 16) ** 2} patches)")

# %% [markdown] slide
# ## 01–04: the backbone, piece by piece
#
# | notebook | you build | the check that proves it |
# |---|---|---|
# | [01](01_patch_embedding.ipynb) patch embedding | unfold + one matmul | equals `Conv2d(3, D, 16, stride=16)` |
# | [02](02_rope.ipynb) 2-D RoPE | periods, coordinates, (sin, cos) | logit depends on the offset only |
# | [03](03_attention_and_blocks.ipynb) attention and blocks | SDPA, fused qkv, masked k bias, LayerScale, SwiGLU | block by hand equals `dinolab`'s |
# | [04](04_vit_backbone.ipynb) the ViT | the whole model, its outputs, weight loading | equals transformers' `DINOv3ViTModel` |
#
# What to remember: position enters **only** through RoPE on the patch tokens; a fresh DINOv3 is almost the
# identity (LayerScale 1e-5); the released sizes differ in width, depth and FFN (the 7B also in head size and
# qkv bias), not in design.

# %% [markdown] slide
# ## 05: how DINOv3 is trained
#
# - A **student** ViT matches an **EMA teacher** across multi-crop views, no labels (all three DINO generations).
# - Losses: **DINO** on the cls token, **iBOT** on masked patches, **KoLeo** to spread the features;
#   Sinkhorn–Knopp keeps the teacher's targets from collapsing.
# - New in v3: **Gram anchoring** keeps the patch features' similarity structure (Gram matrix) close to that of an
#   earlier teacher, so dense features do not degrade in long training.
# - The 7B is trained from scratch; the smaller released models are **distilled** from it.
#
# [Notebook 05](05_self_distillation.ipynb) builds every loss and runs a tiny pretraining on the CPU.

# %% [markdown] slide
# ## 06–09: from a ViT to a feature pyramid
#
# | notebook | piece | what it adds |
# |---|---|---|
# | [06](06_spatial_prior_module.ipynb) | Spatial Prior Module | a conv stem: detail at strides 4, 8, 16, 32 |
# | [07](07_ms_deform_attn.ipynb) | multi-scale deformable attention | each query reads a few learned points per level |
# | [08](08_adapter_interaction.ipynb) | the adapter | SPM tokens **read** the frozen ViT (extractor only, no injector) |
# | [09](09_pixel_decoder_fpn.ipynb) | pixel decoder + FPN | fuse the levels, back to stride 4 |
#
# The backbone stays frozen: the adapter only reads it, so its features are exactly those of the released model.

# %% [markdown] slide
# ## 10–13: the tasks
#
# | notebook | task | heads compared |
# |---|---|---|
# | [10](10_segmentation.ipynb) | segmentation | adapter + pixel decoder + FPN head vs a linear head |
# | [11](11_depth.ipynb) | depth | DPT head with depth bins and SigLoss vs a linear head |
# | [12](12_classification.ipynb) | classification | linear probe on cls vs cls ‖ mean patch, k-NN |
# | [13](13_lora.ipynb) | fine-tuning | LoRA on q and v vs linear probe vs full fine-tuning |
#
# All trained on ShapesWorld, a procedural dataset made on the fly, on a CPU: small, honest numbers, each
# notebook says what it measured.

# %% [markdown] slide
# ## How every notebook works
#
# 1. **Build** the component from primitives, printing shapes after every step.
# 2. **Check** it: against `dinolab` (`torch.testing.assert_close`) and an identity that must hold.
# 3. **Look** at it: a figure that teaches.
# 4. **Run** it: a tiny CPU experiment with an `assert` on what must come out.
# 5. **Summary**: the shape table, what to remember, exercises.
#
# The stored notebooks are executed and compared with a fresh run in CI (nbval); `make slides` turns each into
# a deck like this one, `make lab` opens them in JupyterLab (present live with RISE).

# %% [markdown] slide
# ## What to remember
#
# - DINOv3 = DINOv2's recipe (DINO + iBOT + KoLeo, EMA teacher, multi-crop) **+ Gram anchoring**, scaled to a
#   7B teacher, distilled into smaller ViTs.
# - The ViT: patch 16, `[cls, 4 storage, patches]`, **2-D RoPE** instead of a position table, LayerScale,
#   a masked k bias; SwiGLU in the "+" models and the 7B.
# - Dense tasks read a **frozen** backbone at four layers; the adapter adds fine detail from a conv stem.
# - Where to start: [00](00_dino_v1_v2_v3.ipynb) for the map and the numbers, then 01 → 04 in order.
