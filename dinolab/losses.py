"""The DINOv3 training objectives and their teacher targets, plain PyTorch, one process.

* ``sinkhorn_knopp`` (DINOv3) / ``softmax_center_teacher`` + ``update_center`` (classic DINO): teacher
  logits (..., K) -> target probabilities (..., K);
* ``DINOLoss``: cls-token cross-entropy over crop pairs, student (S, B, K) vs teacher (T, B, K);
* ``iBOTPatchLoss``: the same at the masked patches, (M, K) with masks (B, N);
* ``KoLeoLoss``: spread of the (B, D) cls tokens; ``GramLoss``: patch-similarity anchoring, (B, N, D).

"Batch" is the local batch (the official all-reduces are left out). How the terms are weighted and
combined: notebook 05 and ``dinolab.pretrain``. Official: ``dinov3/loss/`` (``dino_clstoken_loss.py``,
``ibot_patch_loss.py``, ``koleo_loss.py``, ``gram_loss.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "sinkhorn_knopp",
    "softmax_center_teacher",
    "update_center",
    "DINOLoss",
    "iBOTPatchLoss",
    "ibot_mask_weights",
    "KoLeoLoss",
    "GramLoss",
]


def _check_positive(name: str, value: float) -> None:
    value = float(value)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_ndim(name: str, x: Tensor, ndim: int, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


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
    if teacher_logits.ndim < 2:
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
        _check_positive("student_temp", student_temp)
        self.out_dim = out_dim
        self.student_temp = float(student_temp)

    @staticmethod
    def sinkhorn_knopp_teacher(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, ignore_diagonal: bool = False) -> Tensor:
        _check_ndim("student_logits", student_logits, 3, "(S crops, B, K)")
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
