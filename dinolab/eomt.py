"""EoMT, the Encoder-only Mask Transformer (Kerssies et al., "Your ViT is Secretly an Image Segmentation Model",
CVPR 2025; official code ``tue-mps/eomt``, ``models/eomt.py`` and ``models/scale_block.py``).

No adapter, no pixel decoder, no query decoder: ``num_q`` learned query tokens are put in front of the ViT's
tokens before its last ``num_blocks`` blocks, and the ViT's own blocks process queries and patches together.
After the last block (and, for deep supervision, before each of those blocks) shared heads predict:

* ``class_head``: logits ``[B, Q, C+1]`` from the (final-normed) query tokens;
* ``mask_head`` (3-layer MLP with GELU) on the queries · ``upscale`` (patch features taken back from stride 16 to
  stride 4 by ``log2(patch) − 2`` ``ScaleBlock``s: transposed conv ×2, GELU, depthwise 3×3, LayerNorm) → mask
  logits ``[B, Q, H/4, W/4]``.

Token order inside the last blocks: ``[queries, cls, storage, patches]``. :class:`dinolab.attention.SelfAttention`
rotates only the last H·W tokens with RoPE, so the queries, like cls and storage, get no position.

Masked attention (training only, annealed away): before each of the last blocks a query may attend to the patches
where its current mask logit (resized to the patch grid) is > 0, and to every query, cls and storage token. Each
query keeps its mask with probability ``attn_mask_probs[block]``; training lowers these from 1 to 0, so the
finished model runs with plain attention. (The official code anneals each block on its own polynomial schedule;
the notebook sets all blocks to one linear schedule.)

Outputs have Mask2Former's format (``pred_logits``, ``pred_masks``, ``aux_outputs``), so
:class:`dinolab.set_loss.SetCriterion` trains it unchanged. The official wraps the ViT as ``encoder.backbone``;
here it is ``backbone`` (a :class:`dinolab.vit.DinoVisionTransformer`); stochastic depth is not supported in the
last blocks, and ``train()`` leaves the backbone's RoPE in eval mode (no coordinate augmentation).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerNorm2d", "ScaleBlock", "EoMT"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (timm's ``LayerNorm2d``, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """×2 upsampling of a ``[B, D, h, w]`` map: ConvTranspose 2×2 stride 2 → GELU → depthwise 3×3 → LayerNorm2d."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(embed_dim, embed_dim, kernel_size=3, padding=1, groups=embed_dim, bias=False)
        self.norm = LayerNorm2d(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


class EoMT(nn.Module):
    """``EoMT(backbone, num_classes, num_q, num_blocks, masked_attn_enabled)`` (official arguments).

    ``forward(x [B, 3, H, W])`` = ``decode(*prefix_tokens(x))``: ``prefix_tokens`` runs the blocks before the
    last ``num_blocks`` (a frozen prefix can be cached), ``decode`` adds the queries and runs the rest.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_q: int = 100, num_blocks: int = 4,
                 masked_attn_enabled: bool = True):
        super().__init__()
        if not 1 <= num_blocks <= len(backbone.blocks):
            raise ValueError(f"num_blocks must be in [1, {len(backbone.blocks)}], got {num_blocks}")
        self.backbone = backbone
        self.num_q = num_q
        self.num_blocks = num_blocks
        self.masked_attn_enabled = masked_attn_enabled
        self.register_buffer("attn_mask_probs", torch.ones(num_blocks))
        D = backbone.embed_dim
        self.q = nn.Embedding(num_q, D)
        self.class_head = nn.Linear(D, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        num_upscale = max(1, int(math.log2(backbone.patch_size)) - 2)  # 16 → stride 4: two ×2 blocks
        self.upscale = nn.Sequential(*[ScaleBlock(D) for _ in range(num_upscale)])

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.backbone.n_storage_tokens  # cls + storage

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.rope_embed.eval()  # no RoPE coordinate augmentation (see the module doc)
        return self

    # ------------------------------------------------------------------------------------------ pieces
    def _predict(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Normed tokens ``[B, Q + prefix + h·w, D]`` → (mask logits [B, Q, 4h, 4w], class logits [B, Q, C+1])."""
        q = x[:, : self.num_q]
        patches = x[:, self.num_q + self.num_prefix_tokens:]
        patches = patches.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(q), self.upscale(patches))
        return mask_logits, self.class_head(q)

    def _attn_mask(self, x: Tensor, mask_logits: Tensor, prob: float, grid: tuple[int, int]) -> Tensor:
        """``[B, N, N]`` bool, True = may attend. Query rows see only the patches inside their mask (a random
        ``1 − prob`` share of the queries is left unmasked)."""
        B, N, _ = x.shape
        attn_mask = torch.ones(B, N, N, dtype=torch.bool, device=x.device)
        inside = F.interpolate(mask_logits, grid, mode="bilinear").flatten(2) > 0  # [B, Q, h·w]
        if prob < 1:
            free = torch.rand(B, self.num_q, 1, device=x.device) > prob
            inside = inside | free
        attn_mask[:, : self.num_q, self.num_q + self.num_prefix_tokens:] = inside
        return attn_mask

    @staticmethod
    def _block(block: nn.Module, x: Tensor, rope, attn_mask: Tensor | None) -> Tensor:
        """``SelfAttentionBlock.forward`` with an attention mask (the same weights, SDPA with ``attn_mask``)."""
        attn = block.attn
        B, N, C = x.shape
        qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, heads, N, D_head]
        q, k = attn.apply_rope(q, k, rope)  # the last h·w tokens only
        mask = None if attn_mask is None else attn_mask[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + block.ls1(attn.proj(o.transpose(1, 2).reshape(B, N, C)))
        return x + block.ls2(block.mlp(block.norm2(x)))

    # ------------------------------------------------------------------------------------------ forward
    def prefix_tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Tokens ``[B, prefix + h·w, D]`` after the first ``depth − num_blocks`` blocks, and the grid (h, w)."""
        bb = self.backbone
        tokens, grid = bb.prepare_tokens_with_masks(x)
        for blk in bb.blocks[: len(bb.blocks) - self.num_blocks]:
            tokens = blk(tokens, bb.rope_for(*grid))
        return tokens, grid

    def decode(self, tokens: Tensor, grid: tuple[int, int]) -> dict:
        """Queries + the last ``num_blocks`` blocks + heads → ``{"pred_logits", "pred_masks", "aux_outputs"}``."""
        bb = self.backbone
        x = torch.cat([self.q.weight[None].expand(tokens.shape[0], -1, -1), tokens], 1)
        aux = []
        first = len(bb.blocks) - self.num_blocks
        for i, blk in enumerate(bb.blocks[first:]):
            attn_mask = None
            if self.masked_attn_enabled:
                mask_logits, class_logits = self._predict(bb.norm(x), grid)
                aux.append({"pred_logits": class_logits, "pred_masks": mask_logits})
                prob = float(self.attn_mask_probs[i])
                if prob > 0:
                    attn_mask = self._attn_mask(x, mask_logits, prob, grid)
            x = self._block(blk, x, bb.rope_for(*grid), attn_mask)
        mask_logits, class_logits = self._predict(bb.norm(x), grid)
        return {"pred_logits": class_logits, "pred_masks": mask_logits, "aux_outputs": aux}

    def forward(self, x: Tensor) -> dict:
        return self.decode(*self.prefix_tokens(x))
