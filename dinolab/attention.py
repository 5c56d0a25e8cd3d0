"""Multi-head self-attention as in ``dinov3/layers/attention.py``.

* One fused ``qkv`` Linear (D -> 3D): one matmul instead of three; the output is read as
  (B, N, 3, heads, D_head).
* ``mask_k_bias``: the released models multiply the qkv bias by a buffer ``bias_mask`` that is
  1 on the q and v thirds and 0 on the k third. Without RoPE a bias on k would add the same number
  q·b to every logit of a query row, which softmax ignores; but RoPE rotates k *after* the bias is
  added, so q·R_j b changes with the key's position j and the bias would act as a learned positional
  term. DINOv3 removes it explicitly (notebook 03 shows both cases).
* RoPE rotates q and k of the patch tokens only; cls and storage tokens (the first ``N - H*W``
  tokens) are left unrotated: they have no position.
* The attention itself is ``F.scaled_dot_product_attention`` (fused kernels, scale 1/sqrt(D_head)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import rope_apply


class LinearKMaskedBias(nn.Linear):
    """A Linear whose bias is multiplied by ``bias_mask`` (persistent buffer, in checkpoints).

    The official buffer starts as NaN and is filled by ``init_weights``; we fill it at
    construction (q and v thirds 1, k third 0) so a fresh model is usable without that step.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.empty_like(self.bias), persistent=True)
            self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        o = self.out_features
        self.bias_mask.fill_(1.0)
        self.bias_mask[o // 3 : 2 * o // 3] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        mask_k_bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"cannot split dim={dim} into num_heads={num_heads} equal heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # what SDPA uses; kept for the manual version in notebook 03
        linear = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, device=device)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)
        self.proj_drop = nn.Dropout(proj_drop)

    def apply_rope(self, q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """q, k: (B, heads, N, D_head); rope: (sin, cos), each (H*W, D_head). Rotates the last H*W
        tokens (the patches) and leaves the first N - H*W (cls, storage) as they are."""
        sin, cos = rope
        q_dtype, k_dtype = q.dtype, k.dtype
        q, k = q.to(sin.dtype), k.to(sin.dtype)  # rotate in the rope dtype, as the official code
        prefix = q.shape[-2] - sin.shape[-2]  # cls + storage tokens: not rotated
        if prefix < 0:
            raise ValueError(f"RoPE has {sin.shape[-2]} positions but there are only {q.shape[-2]} tokens")
        q = torch.cat([q[:, :, :prefix], rope_apply(q[:, :, prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :prefix], rope_apply(k[:, :, prefix:], sin, cos)], dim=2)
        return q.to(q_dtype), k.to(k_dtype)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (B, N, heads, D_head)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, D_head)
        if rope is not None:
            q, k = self.apply_rope(q, k, rope)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
