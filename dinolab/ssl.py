"""The self-supervised training objectives of DINOv3, and the data side that feeds them.

How the pieces combine in one training step (``dinov3/train/ssl_meta_arch.py::SSLMetaArch``)::

    images ──MultiCropAugmentation──> 2 global crops (+ masks from make_masks) and n_local local crops
    teacher (EMA of the student, no grad) sees the 2 *unmasked* global crops:
        cls token   -> dino_head -> sinkhorn_knopp(τ_t)  = p_cls   [2, B, K_dino]
        patch tokens at the masked positions
                    -> ibot_head -> sinkhorn_knopp(τ_t)  = p_patch [M, K_ibot]
    student sees the 2 *masked* global crops and the n_local local crops:
        L_dino_local  = DINOLoss(local cls logits  [n_local, B, K], p_cls)
        L_dino_global = DINOLoss(global cls logits [2, B, K],       p_cls, ignore_diagonal=True)
        L_ibot        = iBOTPatchLoss.forward_masked(masked patch logits [M, K], p_patch, masks)
        L_koleo       = mean over the 2 global crops of KoLeoLoss(pre-head global cls tokens [B, D])
        L_gram        = GramLoss(student x_norm_patchtokens, Gram-teacher patch tokens)   (gram stage only)

    total = w_dino · (16/18 · local_weight · L_dino_local + 2/18 · L_dino_global)
            + w_ibot (1.0) · L_ibot
            + 0.1 (koleo_loss_weight) · 2 (n_global_crops) · L_koleo
            + w_gram · L_gram
    (16 = 2 teacher crops × 8 local crops and 2 = 2 × 2 − 2 diagonal pairs: the two DINO scales
    are each term's share of all student/teacher pairs.)

After the optimiser step, ``update_ema(teacher, student, m)`` with m following
``cosine_schedule(0.992, 1.0, ...)``; the teacher temperature τ_t follows
``linear_warmup_then_constant(0.04, 0.07, ...)``.

Official files: ``dinov3/layers/dino_head.py`` (DINOHead), ``dinov3/loss/dino_clstoken_loss.py``
(DINOLoss, Sinkhorn-Knopp, softmax centering), ``dinov3/loss/ibot_patch_loss.py`` (iBOTPatchLoss),
``dinov3/loss/koleo_loss.py``, ``dinov3/loss/gram_loss.py``, ``dinov3/data/masking.py``
(MaskingGenerator), ``dinov3/data/collate.py`` (mask ratios per image),
``dinov3/data/augmentations.py`` (DataAugmentationDINO), ``dinov3/train/cosine_lr_scheduler.py``
(schedules). This file is a re-implementation in plain PyTorch; distributed all-reduces are left
out (single process), so "batch" always means the local batch.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DINOHead",
    "sinkhorn_knopp",
    "softmax_center_teacher",
    "update_center",
    "DINOLoss",
    "iBOTPatchLoss",
    "ibot_mask_weights",
    "MaskingGenerator",
    "make_masks",
    "KoLeoLoss",
    "GramLoss",
    "update_ema",
    "cosine_schedule",
    "linear_warmup_then_constant",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "crop_and_resize",
    "denormalize",
    "MultiCropAugmentation",
]

from .utils import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402 - one home for the normalisation


# ------------------------------------------------------------------------------------------------
# small validation helpers
# ------------------------------------------------------------------------------------------------
def _check_positive(name: str, value: float) -> None:
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_ndim(name: str, x: Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------------------------------------
# DINO head
# ------------------------------------------------------------------------------------------------
def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """Projection head: MLP -> L2-normalise -> ``last_layer`` (prototype scores, no bias).

    ``nlayers=3``: ``mlp.0`` Linear(in, hidden), ``mlp.1`` GELU, ``mlp.2`` Linear(hidden, hidden),
    ``mlp.3`` GELU, ``mlp.4`` Linear(hidden, bottleneck); ``nlayers=1``: ``mlp`` is a single
    Linear(in, bottleneck). ``last_layer`` = Linear(bottleneck, out_dim, bias=False). Unlike DINO v1/v2
    there is no weight norm on ``last_layer`` in DINOv3. All Linear weights ~ trunc_normal(std 0.02),
    biases 0. Parameter names match ``dinov3/layers/dino_head.py``.

    ``forward(x, no_last_layer=False, only_last_layer=False)``: (..., in_dim) -> (..., out_dim);
    ``no_last_layer`` returns the normalised bottleneck (..., bottleneck_dim); ``only_last_layer``
    applies ``last_layer`` alone (the input is then the bottleneck).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ):
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        self.apply(_init_linear)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        if no_last_layer and only_last_layer:
            raise ValueError("no_last_layer and only_last_layer are mutually exclusive")
        if not only_last_layer:
            if x.shape[-1] != self.in_dim:
                raise ValueError(f"DINOHead expects (..., {self.in_dim}), got shape {tuple(x.shape)}")
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = F.normalize(x, dim=-1, p=2, eps=eps)
            if no_last_layer:
                return x
        elif x.shape[-1] != self.bottleneck_dim:
            raise ValueError(f"only_last_layer expects (..., {self.bottleneck_dim}), got {tuple(x.shape)}")
        return self.last_layer(x)


# ------------------------------------------------------------------------------------------------
# teacher targets: Sinkhorn-Knopp and classic centering
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp, as ``DINOLoss.sinkhorn_knopp_teacher`` (fp32, no grad).

    ``teacher_logits``: (B, K), or (..., K) whose leading dims are all treated as samples (the
    official code passes the 2 global crops concatenated, (2B, K); iBOT passes the M masked patches,
    (M, K), so there B = M). Returns probabilities of the same shape, float32: every row sums to 1,
    and every prototype receives ≈ B/K of the total mass (exactly after the last column step, up to
    the final row normalisation).

    The iteration, literally: Q = exp(t / τ).T (K × B); Q /= ΣQ; n_iterations × { Q /= row sums;
    Q /= K; Q /= column sums; Q /= B }; Q *= B; return Q.T. Like the official code there is no
    max-subtraction in fp32, so logits / τ above ~88 overflow; ours subtracts the global max and
    iterates in float64, which gives the same numbers without that limit.
    """
    _check_positive("teacher_temp", teacher_temp)
    if not isinstance(n_iterations, int) or n_iterations < 0:
        raise ValueError(f"n_iterations must be an int >= 0, got {n_iterations!r}")
    if not isinstance(teacher_logits, Tensor) or teacher_logits.ndim < 2:
        raise ValueError("teacher_logits must be a tensor of shape (B, K) or (..., K)")
    shape = teacher_logits.shape
    t = teacher_logits.detach().double().reshape(-1, shape[-1])
    # Two changes from the official fp32 code, neither of which changes the result: float64, and the
    # global max subtracted before exp (Q /= ΣQ below removes any global factor). A cold teacher
    # (logits / τ of 100 and more) would otherwise overflow or underflow fp32.
    t = t / teacher_temp
    Q = torch.exp(t - t.max()).t()  # K x B
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(n_iterations):
        Q /= Q.sum(dim=1, keepdim=True)  # each prototype gets total mass 1/K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample gets total mass 1/B
        Q /= B
    Q *= B  # columns (samples) sum to 1
    return Q.t().float().reshape(shape)


def softmax_center_teacher(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Classic DINO targets: ``softmax((t - center) / τ)`` over the last dim (float32).

    Centering (subtracting a running mean of the logits) stops one prototype from winning for every
    image; sharpening (small τ) stops the uniform distribution. Each alone collapses; together they
    balance (DINO paper §5.3). DINOv3 trains with ``sinkhorn_knopp`` instead; this is kept for the
    notebook comparison. ``center`` is (1, K) or (K,); update it with ``update_center``.
    """
    _check_positive("teacher_temp", teacher_temp)
    if teacher_logits.shape[-1] != center.shape[-1]:
        raise ValueError(f"center has K={center.shape[-1]}, teacher_logits {tuple(teacher_logits.shape)}")
    return F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> Tensor:
    """EMA of the batch mean of the teacher logits: ``center·m + mean(t)·(1 - m)``; returns a new tensor
    of ``center``'s shape (the mean is over every leading dim of ``teacher_logits`` (..., K))."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    K = center.shape[-1]
    if teacher_logits.shape[-1] != K:
        raise ValueError(f"center has K={K}, teacher_logits {tuple(teacher_logits.shape)}")
    batch_center = teacher_logits.detach().float().reshape(-1, K).mean(dim=0)
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


# ------------------------------------------------------------------------------------------------
# DINO (cls token) loss
# ------------------------------------------------------------------------------------------------
class DINOLoss(nn.Module):
    """Cross-entropy between teacher targets and student predictions over all crop pairs.

    ``forward(student_logits (S, B, K), teacher_probs (T, B, K), ignore_diagonal=False)``:
    ``log_q = log_softmax(student / student_temp)``;
    ``loss = −Σ_{s,t,b,k} p[t,b,k]·log_q[s,b,k] / (B·S·T)``. With ``ignore_diagonal`` the pairs
    s == t (the same view seen by student and teacher) are dropped and the sum is divided by
    ``B·S·T − B·min(S, T)``. Student logits are cast to float32.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1):
        super().__init__()
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be a positive int, got {out_dim!r}")
        _check_positive("student_temp", student_temp)
        self.out_dim = out_dim
        self.student_temp = float(student_temp)

    @staticmethod
    def sinkhorn_knopp_teacher(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, ignore_diagonal: bool = False) -> Tensor:
        _check_ndim("student_logits", student_logits, 3, "(S crops, B, K)")
        _check_ndim("teacher_probs", teacher_probs, 3, "(T crops, B, K)")
        S, B, K = student_logits.shape
        T = teacher_probs.shape[0]
        if K != self.out_dim or teacher_probs.shape[1:] != (B, K):
            raise ValueError(
                f"shape mismatch: student {tuple(student_logits.shape)}, teacher {tuple(teacher_probs.shape)}, "
                f"out_dim {self.out_dim}"
            )
        log_q = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        p = teacher_probs.float()
        if not ignore_diagonal:
            return -torch.einsum("sbk,tbk->", log_q, p) / (B * S * T)
        n_diag = min(S, T)
        denom = B * S * T - B * n_diag
        if denom == 0:
            raise ValueError("ignore_diagonal with S == T == 1 leaves no crop pair")
        per_pair = -torch.einsum("sbk,tbk->st", log_q, p)
        off_diag = ~torch.eye(S, T, dtype=torch.bool, device=per_pair.device)
        return per_pair[off_diag].sum() / denom


# ------------------------------------------------------------------------------------------------
# iBOT (masked patch) loss
# ------------------------------------------------------------------------------------------------
def ibot_mask_weights(masks: Tensor) -> Tensor:
    """(B, N) bool -> (M,) float: for each masked patch (row-major order, image by image, i.e. the order
    of ``masks.flatten().nonzero()``), 1 / (number of masked patches in its image). This is
    ``masks_weight`` of ``dinov3/data/collate.py``."""
    _check_ndim("masks", masks, 2, "(B images, N patches) bool")
    masks = masks.bool()
    per_image = 1.0 / masks.sum(-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(nn.Module):
    """Masked-patch prediction: the student (masked input) predicts the teacher's (unmasked input)
    distribution at each masked patch, with ``Σ_k p·log_softmax(s / student_temp)`` per patch.

    Weighting (official): mean over the masked patches of each image, then sum over images divided by
    the number of images B — *including* images with no mask, which contribute 0. (The official
    constructor's ``patch_out_dim``/``center_momentum`` only serve the unused classic centering.)

    * ``forward_masked(student_patch_logits (M, K), teacher_patch_probs (M, K), masks (B, N) bool,
      masks_weight=None)``: the training path. Row i of both inputs is the i-th True entry of
      ``masks`` in row-major order (``student_tokens.flatten(0, 1)[masks.flatten()]``), so
      M == masks.sum(). ``masks_weight`` (M,) defaults to ``ibot_mask_weights(masks)``.
    * ``forward(student_patch_logits (B, N, K), teacher_patch_probs (B, N, K), masks (B, N))``: the
      same number computed on dense tensors (unmasked positions are ignored).
    """

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        _check_positive("student_temp", student_temp)
        self.student_temp = float(student_temp)

    @staticmethod
    def sinkhorn_knopp_teacher(teacher_patch_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """SK over the M masked patches (B = M): ``teacher_patch_logits`` is (M, K)."""
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, n_iterations)

    def _per_patch(self, s: Tensor, t: Tensor) -> Tensor:
        return torch.sum(t.float() * F.log_softmax(s.float() / self.student_temp, dim=-1), dim=-1)

    def forward_masked(
        self,
        student_patch_logits: Tensor,
        teacher_patch_probs: Tensor,
        masks: Tensor,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        _check_ndim("student_patch_logits", student_patch_logits, 2, "(M masked patches, K)")
        _check_ndim("teacher_patch_probs", teacher_patch_probs, 2, "(M masked patches, K)")
        _check_ndim("masks", masks, 2, "(B images, N patches) bool")
        if student_patch_logits.shape != teacher_patch_probs.shape:
            raise ValueError(
                f"student {tuple(student_patch_logits.shape)} and teacher {tuple(teacher_patch_probs.shape)} differ"
            )
        M = int(masks.bool().sum())
        if student_patch_logits.shape[0] != M:
            raise ValueError(f"masks has {M} masked patches but the logits have {student_patch_logits.shape[0]} rows")
        if masks_weight is None:
            masks_weight = ibot_mask_weights(masks)
        elif masks_weight.shape != (M,):
            raise ValueError(f"masks_weight must have shape ({M},), got {tuple(masks_weight.shape)}")
        loss = self._per_patch(student_patch_logits, teacher_patch_probs) * masks_weight.to(student_patch_logits.device)
        return -loss.sum() / masks.shape[0]

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, masks: Tensor) -> Tensor:
        _check_ndim("student_patch_logits", student_patch_logits, 3, "(B, N, K)")
        _check_ndim("masks", masks, 2, "(B, N) bool")
        if teacher_patch_probs.shape != student_patch_logits.shape or masks.shape != student_patch_logits.shape[:2]:
            raise ValueError(
                f"shape mismatch: student {tuple(student_patch_logits.shape)}, teacher "
                f"{tuple(teacher_patch_probs.shape)}, masks {tuple(masks.shape)}"
            )
        m = masks.float()
        loss = self._per_patch(student_patch_logits, teacher_patch_probs)
        loss = (loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return -loss.mean()


# ------------------------------------------------------------------------------------------------
# masking
# ------------------------------------------------------------------------------------------------
def _as_random(generator) -> random.Random:
    """None -> python's global ``random`` state; int -> random.Random(seed); random.Random -> itself;
    torch.Generator -> a random.Random seeded from one draw of that generator."""
    if generator is None:
        return random._inst  # the module-level functions' state, as the official code uses
    if isinstance(generator, random.Random):
        return generator
    if isinstance(generator, torch.Generator):
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    if isinstance(generator, int) and not isinstance(generator, bool):
        return random.Random(generator)
    raise TypeError(f"generator must be None, an int, random.Random or torch.Generator, got {type(generator).__name__}")


class MaskingGenerator:
    """Block-wise masking of a patch grid (BEiT/iBOT), as ``dinov3/data/masking.py``.

    ``__call__(num_masking_patches=0, generator=None)`` -> bool tensor (h, w) with exactly
    ``num_masking_patches`` True entries. Rectangles are added one at a time: area
    ~ U(min_num_patches, max_mask_patches), log aspect ~ U(log min_aspect, log max_aspect), position
    uniform; a rectangle is kept only if it adds between 1 and ``max_mask_patches`` new patches
    (10 tries per rectangle, ``max_mask_patches`` = min(remaining, max_num_patches)). When no try adds
    anything the loop stops, and the mask is completed with uniformly random patches to the exact count.

    ``generator``: None (python's global ``random``), an int seed, a ``random.Random`` or a
    ``torch.Generator``. The official code uses ``random`` for the blocks and ``np.random`` for the
    completion; here both come from the one ``random.Random``, so a seed fixes the mask.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        if not isinstance(input_size, tuple):
            input_size = (int(input_size),) * 2
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (h, w) with positive sides, got {input_size}")
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            self.max_num_patches = self.num_patches
        _check_positive("min_aspect", min_aspect)
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches}], log aspect [{self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}])"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: Tensor, max_mask_patches: float, rng: random.Random) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                n_new = h * w - int(block.sum())
                if 0 < n_new <= max_mask_patches:
                    block.fill_(True)
                    delta += n_new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int = 0, generator=None) -> Tensor:
        num_masking_patches = int(num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}")
        rng = _as_random(generator)
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            mask_count += delta
        return self.complete_mask_randomly(mask, num_masking_patches, rng)

    @staticmethod
    def complete_mask_randomly(mask: Tensor, num_masking_patches: int, rng: random.Random) -> Tensor:
        flat = mask.flatten()
        free = (~flat).nonzero().flatten().tolist()
        to_add = rng.sample(free, num_masking_patches - int(flat.sum()))
        if to_add:
            flat[torch.tensor(to_add, dtype=torch.long)] = True
        return flat.reshape(mask.shape)


def make_masks(
    n_images: int,
    grid_hw: int | tuple[int, int],
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    generator=None,
    mask_generator: MaskingGenerator | None = None,
) -> Tensor:
    """iBOT masks for a batch of global crops, as ``collate_data_and_cast`` -> bool (n_images, h*w).

    ``int(n_images · mask_probability)`` images are masked; the i-th of them gets
    ``int(N · U(r_i, r_{i+1}))`` masked patches with r = linspace(ratio_min, ratio_max, n_masked + 1)
    (so the ratios are spread over the whole range rather than drawn independently); the others get
    no mask; the list is then shuffled. ``mask_generator`` defaults to the one built in
    ``dinov3/train/train.py``: ``MaskingGenerator(grid_hw, max_num_patches=0.5 · N)``.
    ``generator`` as in ``MaskingGenerator`` (one stream drives counts, blocks and shuffle).
    """
    if not isinstance(grid_hw, tuple):
        grid_hw = (int(grid_hw),) * 2
    if not isinstance(n_images, int) or n_images < 0:
        raise ValueError(f"n_images must be an int >= 0, got {n_images!r}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    lo, hi = ratio_min_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_min_max must satisfy 0 <= min <= max <= 1, got {ratio_min_max}")
    h, w = grid_hw
    N = h * w
    if mask_generator is None:
        mask_generator = MaskingGenerator((h, w), max_num_patches=0.5 * N)
    elif mask_generator.get_shape() != (h, w):
        raise ValueError(f"mask_generator grid {mask_generator.get_shape()} != grid_hw {(h, w)}")
    rng = _as_random(generator)
    n_masked = int(n_images * mask_probability)
    probs = [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)] if n_masked else []
    masks = []
    for i in range(n_masked):
        masks.append(mask_generator(int(N * rng.uniform(probs[i], probs[i + 1])), generator=rng))
    for _ in range(n_masked, n_images):
        masks.append(mask_generator(0, generator=rng))
    rng.shuffle(masks)
    if not masks:
        return torch.zeros(0, N, dtype=torch.bool)
    return torch.stack(masks).flatten(1)


# ------------------------------------------------------------------------------------------------
# KoLeo and Gram
# ------------------------------------------------------------------------------------------------
class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator (Sablayrolles et al. 2018), as ``koleo_loss.py``.

    ``forward(x (B, D), eps=1e-8)``: in float32, ``x = F.normalize(x)``; each point's nearest
    neighbour is the other point with the largest dot product (the diagonal is set to −1);
    ``loss = −mean_i log(‖x_i − x_nn(i)‖ + eps)`` where the distance is ``nn.PairwiseDistance(2,
    eps=1e-8)`` (which adds eps to the difference). Minimising it spreads the batch over the sphere.
    """

    @staticmethod
    def nearest_neighbours(x: Tensor) -> Tensor:
        """Index of each row's nearest other row, for L2-normalised rows."""
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-1)
            return dots.argmax(dim=1)

    def forward(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        _check_ndim("x", x, 2, "(B, D)")
        if x.shape[0] < 2:
            raise ValueError(f"KoLeo needs at least 2 points, got {x.shape[0]}")
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        idx = self.nearest_neighbours(x)
        distances = F.pairwise_distance(x, x[idx], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


class GramLoss(nn.Module):
    """Gram anchoring, as ``gram_loss.py``: MSE between the patch-similarity matrices of the student
    and of the Gram teacher.

    ``forward(output_feats, target_feats, img_level=None)`` (``img_level`` defaults to the constructor's):
    float32; with ``apply_norm`` both are L2-normalised along D. With ``img_level`` the inputs are
    (B, N, D) and the Gram matrices are per image, (B, N, N); otherwise (B, N, D) inputs are flattened
    to (B·N, D) and one (B·N, B·N) matrix is built over the whole batch. ``remove_neg``: negative
    entries of both matrices -> 0. ``remove_only_teacher_neg``: student entries -> 0 where student
    AND teacher are negative, then teacher negatives -> 0. Loss = mean of squared differences.
    Only the feature directions' inner products matter, so the loss is invariant to a common rotation
    of the feature space.
    """

    def __init__(
        self,
        apply_norm: bool = True,
        img_level: bool = True,
        remove_neg: bool = True,
        remove_only_teacher_neg: bool = False,
    ):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg are mutually exclusive")
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def forward(self, output_feats: Tensor, target_feats: Tensor, img_level: bool | None = None) -> Tensor:
        img_level = self.img_level if img_level is None else img_level
        if output_feats.shape != target_feats.shape:
            raise ValueError(f"student {tuple(output_feats.shape)} and teacher {tuple(target_feats.shape)} differ")
        if img_level:
            _check_ndim("output_feats", output_feats, 3, "(B, N, D) when img_level")
        elif output_feats.ndim not in (2, 3):
            raise ValueError(f"features must be (B, N, D) or (B*N, D), got {tuple(output_feats.shape)}")
        s = output_feats.float()
        t = target_feats.float()
        if self.apply_norm:
            s = F.normalize(s, dim=-1)
            t = F.normalize(t, dim=-1)
        if not img_level and s.ndim == 3:
            s, t = s.flatten(0, 1), t.flatten(0, 1)
        target_sim = t @ t.transpose(-1, -2)
        student_sim = s @ s.transpose(-1, -2)
        if self.remove_neg:
            target_sim = target_sim.clamp(min=0.0)
            student_sim = student_sim.clamp(min=0.0)
        elif self.remove_only_teacher_neg:
            student_sim = student_sim.masked_fill((student_sim < 0) & (target_sim < 0), 0.0)
            target_sim = target_sim.clamp(min=0.0)
        return F.mse_loss(student_sim, target_sim)


# ------------------------------------------------------------------------------------------------
# EMA teacher and schedules
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter ← m·teacher + (1 − m)·student; buffers are copied from the
    student. The two modules must have the same parameter and buffer names."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameter names")
    for name, tp in t_params.items():
        sp = s_params[name]
        if sp.shape != tp.shape:
            raise ValueError(f"parameter {name}: teacher {tuple(tp.shape)} vs student {tuple(sp.shape)}")
        tp.mul_(momentum).add_(sp.detach().to(tp.dtype), alpha=1.0 - momentum)
    t_bufs, s_bufs = dict(teacher.named_buffers()), dict(student.named_buffers())
    if t_bufs.keys() != s_bufs.keys():
        raise ValueError("teacher and student have different buffer names")
    for name, tb in t_bufs.items():
        tb.copy_(s_bufs[name])


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """Per-iteration values (float64 array of length ``total_steps``), as the official
    ``linear_warmup_cosine_decay(start_warmup, base, final, warmup_steps, total_steps)``: a linear ramp
    ``start_warmup -> base`` over ``warmup_steps`` (end point excluded), then a half cosine from
    ``base`` (first step after warm-up) to exactly ``final`` (last step).

    Teacher momentum: ``cosine_schedule(0.992, 1.0, total)``.
    """
    if not isinstance(total_steps, int) or not isinstance(warmup_steps, int):
        raise TypeError("total_steps and warmup_steps must be ints")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}")
    linear = np.linspace(start_warmup, base, warmup_steps, endpoint=False)
    cosine = (np.cos(np.linspace(0.0, np.pi, total_steps - warmup_steps)) + 1.0) / 2.0
    cosine = (base - final) * cosine + final
    return np.concatenate([linear, cosine])


def linear_warmup_then_constant(start: float, peak: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear ``start -> peak`` over ``warmup_steps`` (end point excluded), then ``peak``.

    Teacher temperature: ``linear_warmup_then_constant(0.04, 0.07, total, warmup)``.
    """
    return cosine_schedule(peak, peak, total_steps, warmup_steps=warmup_steps, start_warmup=start)


# ------------------------------------------------------------------------------------------------
# multi-crop augmentation in pure torch
# ------------------------------------------------------------------------------------------------
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(-3)
    maxc = x.amax(dim=-3)
    minc = x.amin(dim=-3)
    delta = maxc - minc
    gray_px = delta == 0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    d = torch.where(gray_px, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray_px, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = x.unbind(-3)
    h6 = (h % 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    r = torch.stack([v, q, p, p, t, v], dim=-3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    g = torch.stack([t, v, v, q, p, p], dim=-3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    b = torch.stack([p, p, t, v, v, q], dim=-3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    return torch.stack([r, g, b], dim=-3)


def crop_and_resize(
    images: Tensor,
    boxes: Tensor,
    size: int | tuple[int, int],
    flip: Tensor | None = None,
    mode: str = "bilinear",
    antialias: bool = True,
) -> Tensor:
    """One crop per image, resampled to ``size``, without a loop over images.

    ``images`` (B, C, H, W); ``boxes`` (B, 4) = (x0, y0, x1, y1) in pixel-edge coordinates (the box
    (0, 0, W, H) is the whole image; fractional boxes are fine); ``flip`` (B,) bool mirrors the crop
    horizontally. Each box becomes an affine map of the output grid onto the input
    (``F.affine_grid`` + ``F.grid_sample``, align_corners=False, border padding), so a full box at the
    input size is the identity. ``antialias``: when a crop is shrunk by more than 1.5×, sample at
    k× the output size (k ≤ 4) and average-pool k×k, a cheap stand-in for PIL's antialiased resize.
    """
    _check_ndim("images", images, 4, "(B, C, H, W)")
    B, C, H, W = images.shape
    if boxes.shape != (B, 4):
        raise ValueError(f"boxes must be (B={B}, 4), got {tuple(boxes.shape)}")
    oh, ow = (size, size) if isinstance(size, int) else size
    if mode not in ("bilinear", "bicubic", "nearest"):
        raise ValueError(f"mode must be bilinear, bicubic or nearest, got {mode!r}")
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    x0, y0, x1, y1 = boxes.unbind(-1)
    sx, sy = (x1 - x0) / W, (y1 - y0) / H
    cx, cy = (x0 + x1) / W - 1.0, (y0 + y1) / H - 1.0
    if flip is not None:
        sx = torch.where(flip.to(images.device).bool(), -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], -1), torch.stack([zero, sy, cy], -1)], dim=-2)
    k = 1
    if antialias:
        shrink = max(float(((x1 - x0) / ow).max()), float(((y1 - y0) / oh).max()))
        k = int(min(4, max(1, round(shrink))))
    src = images if images.is_floating_point() else images.float()
    grid = F.affine_grid(theta.to(src.dtype), [B, C, oh * k, ow * k], align_corners=False)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=False)
    if k > 1:
        out = F.avg_pool2d(out, k)
    return out


def denormalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo the ImageNet normalisation of (..., 3, H, W) images (for display)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class MultiCropAugmentation:
    """DINO multi-crop (``DataAugmentationDINO``) on a batch, in torch only.

    ``__call__(images (B, 3, H, W) float in [0, 1] (or uint8), generator=None) -> dict``:

    * ``global_crops`` (2·B, 3, G, G) and ``local_crops`` (n_local·B, 3, L, L), crop-major as the
      official collate stacks them: rows [c·B, (c+1)·B) are crop c of every image;
    * ``global_boxes`` (2, B, 4), ``local_boxes`` (n_local, B, 4): (x0, y0, x1, y1) in source pixels;
      ``global_flips`` (2, B), ``local_flips`` (n_local, B) bool — for plotting.

    Per crop, as the official pipeline: RandomResizedCrop (torchvision's sampling: area fraction
    ~ U(scale), log aspect ~ U(log ratio), 10 tries then a centre crop), horizontal flip (p
    ``hflip_p``), colour jitter with p ``color_jitter_p`` (brightness 0.4, contrast 0.4, saturation
    0.2, hue 0.1, in a random order per crop), grayscale (p ``grayscale_p``), Gaussian blur (kernel 9,
    σ ~ U(0.1, 2), reflect padding) with p ``blur_p`` = (global 1, global 2, local), solarize (p
    ``solarize_p``, second global crop only), then ImageNet normalisation if ``normalize``.
    The teacher sees the same global crops.

    ``blur_p`` default (1.0, 0.1, 0.5) are the probabilities the official code *means*. Its
    ``GaussianBlur(p)`` wraps ``RandomApply(p=1 - p)``, which applies the blur with probability 1 − p
    (global 1 never blurred, global 2 blurred 90 %, local 50 %); pass
    ``official_blur_inversion=True`` to reproduce that.

    Every random number is drawn on the CPU from ``generator`` (a torch.Generator; None = torch's
    global RNG), in a fixed order, so a seeded generator gives identical crops on any device.
    Crops are resampled with ``crop_and_resize`` (one ``grid_sample`` per crop index, none per image);
    ``interpolation`` "bilinear" (default) or "bicubic" (the official uses bicubic; the result is
    clamped to [0, 1]).
    """

    def __init__(
        self,
        global_size: int = 112,
        local_size: int = 48,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int = 9,
        solarize_p: float = 0.2,
        official_blur_inversion: bool = False,
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        antialias: bool = True,
        patch_size: int = 16,
    ):
        for name, s in (("global_size", global_size), ("local_size", local_size)):
            if not isinstance(s, int) or s < patch_size or s % patch_size:
                raise ValueError(f"{name} must be a positive multiple of patch_size={patch_size}, got {s!r}")
        if not isinstance(n_local, int) or n_local < 0:
            raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        probs = [hflip_p, color_jitter_p, grayscale_p, solarize_p, *blur_p]
        if len(blur_p) != 3 or any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError("probabilities must be in [0, 1] and blur_p must have 3 entries")
        if blur_kernel_size % 2 != 1 or blur_kernel_size // 2 >= local_size:
            raise ValueError(f"blur_kernel_size must be odd and smaller than the crops, got {blur_kernel_size}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a fraction of the colour wheel, either way), got {hue!r}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale, self.ratio = tuple(global_scale), tuple(local_scale), tuple(ratio)
        self.hflip_p, self.color_jitter_p, self.grayscale_p = hflip_p, color_jitter_p, grayscale_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        if official_blur_inversion:
            blur_p = tuple(1.0 - p for p in blur_p)
        self.blur_p = tuple(blur_p)
        self.blur_sigma, self.blur_kernel_size = tuple(blur_sigma), blur_kernel_size
        self.solarize_p = solarize_p
        self.normalize = normalize
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation, self.antialias = interpolation, antialias

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(2 x {self.global_size}px scale {self.global_scale}, "
            f"{self.n_local} x {self.local_size}px scale {self.local_scale}, normalize={self.normalize})"
        )

    # --- geometry ---------------------------------------------------------------------------------
    def sample_boxes(self, n: int, H: int, W: int, scale, g: torch.Generator | None, attempts: int = 10) -> Tensor:
        """torchvision ``RandomResizedCrop.get_params`` for n crops at once -> (n, 4) xyxy float."""
        area = H * W
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=g, dtype=torch.float64))
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, attempts, generator=g, dtype=torch.float64))
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid attempt
        has = ok.any(dim=1)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        u = torch.rand(n, 2, generator=g, dtype=torch.float64)
        top = torch.floor(u[:, 0] * (H - h + 1))
        left = torch.floor(u[:, 1] * (W - w + 1))
        # fallback: centre crop with the aspect ratio clamped into range
        in_ratio = W / H
        if in_ratio < self.ratio[0]:
            fw, fh = W, round(W / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fh, fw = H, round(H * self.ratio[1])
        else:
            fw, fh = W, H
        w = torch.where(has, w, torch.full_like(w, fw))
        h = torch.where(has, h, torch.full_like(h, fh))
        top = torch.where(has, top, torch.full_like(top, (H - fh) // 2))
        left = torch.where(has, left, torch.full_like(left, (W - fw) // 2))
        return torch.stack([left, top, left + w, top + h], dim=-1).float()

    # --- photometry (all vectorised over the crops) ---------------------------------------------
    def _color_jitter(self, x: Tensor, g) -> Tensor:
        n = x.shape[0]
        apply = torch.rand(n, generator=g) < self.color_jitter_p
        order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
        b = _uniform(n, max(0.0, 1 - self.brightness), 1 + self.brightness, g).float()
        c = _uniform(n, max(0.0, 1 - self.contrast), 1 + self.contrast, g).float()
        s = _uniform(n, max(0.0, 1 - self.saturation), 1 + self.saturation, g).float()
        hf = _uniform(n, -self.hue, self.hue, g).float()
        dev = x.device
        apply, order, b, c, s, hf = (t.to(dev) for t in (apply, order, b, c, s, hf))

        def op(k: int, y: Tensor, sel: Tensor) -> Tensor:
            if k == 0:  # brightness: blend with black
                return (y * b[sel].view(-1, 1, 1, 1)).clamp(0, 1)
            if k == 1:  # contrast: blend with the mean grey level of the crop
                f = c[sel].view(-1, 1, 1, 1)
                m = _gray(y).mean(dim=(-3, -2, -1), keepdim=True)
                return (f * y + (1 - f) * m).clamp(0, 1)
            if k == 2:  # saturation: blend with the grey image
                f = s[sel].view(-1, 1, 1, 1)
                return (f * y + (1 - f) * _gray(y)).clamp(0, 1)
            hsv = rgb_to_hsv(y)  # hue: rotate the hue channel
            hsv = torch.cat([(hsv[:, :1] + hf[sel].view(-1, 1, 1, 1)) % 1.0, hsv[:, 1:]], dim=1)
            return hsv_to_rgb(hsv).clamp(0, 1)

        for step in range(4):
            new = x.clone()
            for k in range(4):
                sel = apply & (order[:, step] == k)
                if bool(sel.any()):
                    new[sel] = op(k, x[sel], sel)
            x = new
        return x

    def _grayscale(self, x: Tensor, g) -> Tensor:
        sel = (torch.rand(x.shape[0], generator=g) < self.grayscale_p).to(x.device)
        return torch.where(sel.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)

    def _blur(self, x: Tensor, p: float, g) -> Tensor:
        n, C, H, W = x.shape
        sel = torch.rand(n, generator=g) < p
        sigma = _uniform(n, self.blur_sigma[0], self.blur_sigma[1], g)
        if not bool(sel.any()):
            return x
        half = self.blur_kernel_size // 2
        t = torch.arange(-half, half + 1, dtype=torch.float64)
        ker = torch.exp(-0.5 * (t / sigma[sel].unsqueeze(1)) ** 2)
        ker = (ker / ker.sum(dim=1, keepdim=True)).to(x.dtype).to(x.device)  # (m, k)
        sel = sel.to(x.device)
        y = x[sel]
        m = y.shape[0]
        wk = ker.repeat_interleave(C, dim=0)  # (m*C, k)
        z = F.pad(y.reshape(1, m * C, H, W), (half, half, half, half), mode="reflect")
        z = F.conv2d(z, wk.view(m * C, 1, 1, -1), groups=m * C)
        z = F.conv2d(z, wk.view(m * C, 1, -1, 1), groups=m * C)
        out = x.clone()
        out[sel] = z.reshape(m, C, H, W)
        return out

    def _solarize(self, x: Tensor, p: float, g) -> Tensor:
        sel = (torch.rand(x.shape[0], generator=g) < p).to(x.device).view(-1, 1, 1, 1)
        return torch.where(sel & (x >= 128 / 255), 1.0 - x, x)

    def _views(self, images: Tensor, n_views: int, size: int, scale, blur_p: Sequence[float],
               solarize_p: Sequence[float], g, second: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        B, _, H, W = images.shape
        source = lambda v: images if second is None or v % 2 == 0 else second  # noqa: E731 - odd views from `second`
        boxes = self.sample_boxes(n_views * B, H, W, scale, g).view(n_views, B, 4)
        flips = (torch.rand(n_views, B, generator=g) < self.hflip_p)
        crops = torch.cat([
            crop_and_resize(source(v), boxes[v], size, flips[v], mode=self.interpolation, antialias=self.antialias)
            for v in range(n_views)  # loop over crop index only; each call handles all B images
        ])
        if self.interpolation == "bicubic":
            crops = crops.clamp(0, 1)
        crops = self._color_jitter(crops, g)
        crops = self._grayscale(crops, g)
        crops = torch.cat([self._blur(cv, blur_p[v], g) for v, cv in enumerate(crops.split(B))])
        crops = torch.cat([self._solarize(cv, solarize_p[v], g) for v, cv in enumerate(crops.split(B))])
        if self.normalize:
            m = torch.tensor(self.mean, dtype=crops.dtype, device=crops.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=crops.dtype, device=crops.device).view(1, -1, 1, 1)
            crops = (crops - m) / s
        return crops, boxes, flips

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 second: Tensor | None = None) -> dict[str, Tensor]:
        """``second``: optionally another render of the same scenes (same shape as ``images``, e.g.
        ``ShapesWorld.batch(idx, appearance=...)``); the second global crop and every odd local crop are
        then cut from it, so two views of an image share its layout but not its colours."""
        images = self._check_images("images", images)
        if second is not None:
            second = self._check_images("second", second)
            if second.shape != images.shape:
                raise ValueError(f"second must have the shape of images {tuple(images.shape)}, got {tuple(second.shape)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator or None")
        g = generator
        gl, gboxes, gflips = self._views(
            images, 2, self.global_size, self.global_scale, self.blur_p[:2], (0.0, self.solarize_p), g, second
        )
        out = {"global_crops": gl, "global_boxes": gboxes, "global_flips": gflips}
        if self.n_local:
            lc, lboxes, lflips = self._views(
                images, self.n_local, self.local_size, self.local_scale,
                (self.blur_p[2],) * self.n_local, (0.0,) * self.n_local, g, second,
            )
        else:
            B = images.shape[0]
            lc = images.new_zeros(0, 3, self.local_size, self.local_size)
            lboxes, lflips = torch.zeros(0, B, 4), torch.zeros(0, B, dtype=torch.bool)
        out.update(local_crops=lc, local_boxes=lboxes, local_flips=lflips)
        return out

    @staticmethod
    def _check_images(name: str, images: Tensor) -> Tensor:
        _check_ndim(name, images, 4, "(B, 3, H, W)")
        if images.shape[1] != 3:
            raise ValueError(f"{name} must have 3 channels, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        if not images.is_floating_point():
            raise TypeError(f"{name} must be float in [0, 1] or uint8, got {images.dtype}")
        images = images.float()
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float {name} must be in [0, 1] (not normalised), got range [{lo:.3f}, {hi:.3f}]")
        return images
