"""Small training loops and metrics for the notebooks.

* :func:`fit`: AdamW + linear warm-up + cosine decay, a tqdm progress bar (optional), returns the loss history.
* :func:`extract_features`: run a frozen backbone once and cache its features, so a head trains in seconds.
* metrics: :func:`accuracy`, :func:`confusion_matrix`, :func:`miou`, :func:`boundary_fscore` (segmentation),
  :func:`absrel`, :func:`rmse`, :func:`delta1` (depth, as the official ``calculate_depth_metrics``).

The progress bar honours ``TQDM_DISABLE=1`` (tqdm reads ``TQDM_*`` environment variables), which the notebook CI
sets; ``progress=False`` turns it off from code.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import utils

__all__ = [
    "fit", "cosine_schedule", "to_device", "extract_features",
    "accuracy", "confusion_matrix", "miou", "boundaries", "boundary_fscore", "absrel", "rmse", "delta1",
]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def cosine_schedule(step: int, steps: int, warmup: int = 0, min_factor: float = 0.0) -> float:
    """LR factor at ``step`` (0-based): linear warm-up ``(step+1)/warmup``, then cosine from 1 to ``min_factor``
    over the remaining ``steps - warmup`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(steps - warmup, 1)
    t = min(step - warmup, span) / span
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def to_device(batch, device):
    """Move every tensor in a (nested) dict / list / tuple to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _batch_source(batches):
    """A function ``step -> batch``: a callable is used as is; an iterable is iterated and, when it runs out,
    restarted if it can be (a list, a DataLoader), otherwise training stops (a generator)."""
    if callable(batches) and not isinstance(batches, (Iterable, nn.Module)):
        return batches
    reiterable = not isinstance(batches, Iterator)
    state = {"it": iter(batches)}

    def get(step: int):
        try:
            return next(state["it"])
        except StopIteration:
            if not reiterable:
                raise
            state["it"] = iter(batches)
            return next(state["it"])  # an empty iterable raises StopIteration here too

    return get


def fit(
    model: nn.Module,
    params,
    loss_fn: Callable,
    batches,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    warmup: int = 0,
    device=None,
    log_every: int | None = None,
    progress: bool = True,
    min_lr_factor: float = 0.0,
    grad_clip: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    desc: str = "train",
) -> list[float]:
    """Train ``model`` for ``steps`` steps; return the loss of every step (floats).

    Args:
        model: put in train mode for the loop, its previous mode restored afterwards (a frozen backbone inside
            it should be in eval mode via its own ``train`` override, or features should be cached).
        params: what to optimise (an iterable of tensors or of param-group dicts); None = every parameter of
            ``model`` with ``requires_grad``.
        loss_fn: ``loss_fn(model, batch) -> scalar loss tensor``.
        batches: a callable ``step -> batch``, or an iterable of batches (a list or DataLoader is cycled; an
            iterator that runs out ends training early). Tensors in the batch are moved to ``device``.
        steps, lr, weight_decay, warmup: AdamW with ``betas``, linear warm-up for ``warmup`` steps, then cosine
            decay to ``lr * min_lr_factor``.
        log_every: if set, print the mean loss of the last ``log_every`` steps (through ``tqdm.write``).
        progress: show a tqdm.auto bar (also disabled by the ``TQDM_DISABLE`` environment variable).
        grad_clip: clip the global gradient norm to this value.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ValueError("no parameters to optimise")
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_schedule(s, steps, warmup, min_lr_factor))
    all_params = [p for g in opt.param_groups for p in g["params"]]
    get_batch = _batch_source(batches)
    was_training = model.training
    model.train()
    history: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    try:
        for step in bar:
            try:
                batch = get_batch(step)
            except StopIteration:
                break
            loss = loss_fn(model, to_device(batch, device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(all_params, grad_clip)
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            bar.set_postfix(loss=f"{history[-1]:.4f}", refresh=False)
            if log_every and (step + 1) % log_every == 0:
                recent = history[-log_every:]
                tqdm.write(f"step {step + 1:>5d}/{steps}  loss {sum(recent) / len(recent):.4f}")
    finally:
        bar.close()
        model.train(was_training)
    return history


# ---------------------------------------------------------------------------------------------------------------
# Feature cache
# ---------------------------------------------------------------------------------------------------------------



@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images,
    layers: int | Sequence[int] = 1,
    batch_size: int = 32,
    reshape: bool = True,
    return_class_token: bool = True,
    norm: bool = True,
    normalize: bool = False,
    device=None,
    progress: bool = False,
):
    """Run a frozen backbone over ``images`` once; return ``get_intermediate_layers`` output for all of them.

    Args:
        backbone: a :class:`dinolab.vit.DinoVisionTransformer` (anything with ``get_intermediate_layers``). Run
            in eval mode under ``no_grad``; its mode is restored afterwards.
        images: a [N, 3, H, W] tensor, or a dataset with ``batch(indices) -> {"image": ...}`` and ``len``
            (``dinolab.data.ShapesWorld``).
        layers: the ``n`` of ``get_intermediate_layers``: an int (last n blocks) or 0-based block indices.
        reshape / return_class_token / norm: passed on (defaults give (patch map [N, D, h, w], cls [N, D]) pairs).
        normalize: apply the ImageNet mean/std first (for images in [0, 1]).
        device: where the backbone runs (default: where its parameters are); results are returned on the CPU.

    Returns: like ``get_intermediate_layers``: a tuple with one entry per layer, each a tensor or a tuple
    (patches, cls), concatenated over all images.
    """
    if isinstance(images, Tensor):
        n_images = images.shape[0]

        def fetch(lo, hi):
            return images[lo:hi]
    elif hasattr(images, "batch") and hasattr(images, "__len__"):
        n_images = len(images)

        def fetch(lo, hi):
            return images.batch(torch.arange(lo, hi))["image"]
    else:
        raise TypeError("images must be a [N, 3, H, W] tensor or a dataset with .batch(indices)")
    if device is None:
        p = next(backbone.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    chunks = []
    try:
        from tqdm.auto import tqdm

        for lo in tqdm(range(0, n_images, batch_size), desc="features", disable=not progress, leave=False):
            x = fetch(lo, min(lo + batch_size, n_images)).to(device)
            if normalize:
                x = utils.normalize(x)
            out = backbone.get_intermediate_layers(x, n=layers, reshape=reshape,
                                                   return_class_token=return_class_token, norm=norm)
            chunks.append(_map_tensors(out, lambda t: t.detach().cpu()))
    finally:
        backbone.train(was_training)
    if not chunks:
        raise ValueError("no images")
    return _cat_nested(chunks)


def _map_tensors(x, fn):
    if isinstance(x, Tensor):
        return fn(x)
    return type(x)(_map_tensors(v, fn) for v in x)


def _cat_nested(chunks):
    first = chunks[0]
    if isinstance(first, Tensor):
        return torch.cat(chunks, 0)
    return type(first)(_cat_nested([c[i] for c in chunks]) for i in range(len(first)))


# ---------------------------------------------------------------------------------------------------------------
# Classification / segmentation metrics
# ---------------------------------------------------------------------------------------------------------------


def _labels(pred: Tensor, target: Tensor) -> Tensor:
    """Logits [B, C, ...] (one more dim than target, floating) → argmax over dim 1; labels pass through."""
    if pred.dim() == target.dim() + 1 and pred.is_floating_point():
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return pred


def accuracy(logits_or_pred: Tensor, target: Tensor, ignore_index: int | None = None) -> float:
    """Fraction of correct labels (logits are argmaxed over dim 1); pixels with ``ignore_index`` don't count."""
    pred = _labels(logits_or_pred, target)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    n = int(keep.sum())
    return float((pred[keep] == target[keep]).sum()) / n if n else float("nan")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """[num_classes, num_classes] int64 counts: row = true class, column = predicted class.

    Pixels whose target is ``ignore_index`` are skipped; any other target or prediction outside
    [0, num_classes) is an error. ``pred`` may be logits [B, C, ...].
    """
    pred = _labels(pred, target).reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, t in (("target", target), ("pred", pred)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): min {int(t.min())}, max {int(t.max())}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def miou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None,
         per_class: bool = False):
    """Mean intersection-over-union.

    IoU_c = TP / (TP + FP + FN) from the confusion matrix pooled over every pixel given (so call it once on the
    whole evaluation set, or accumulate :func:`confusion_matrix`). The mean is over the classes that occur in
    the target **or** the prediction (union > 0); classes absent from both are NaN and skipped — the official
    ``nanmean`` of ``intersect / union``. ``per_class=True`` returns ``(miou, iou [num_classes] with NaNs)``.
    """
    cm = confusion_matrix(pred, target, num_classes, ignore_index).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    m = float(iou.nanmean()) if bool((union > 0).any()) else float("nan")
    return (m, iou) if per_class else m


def boundaries(labels: Tensor) -> Tensor:
    """Boundary pixels of a label map [H, W] or [B, H, W]: pixels whose label differs from one of their 4
    neighbours (both pixels of a differing pair are boundary pixels). Returns a bool tensor of the same shape."""
    squeeze = labels.dim() == 2
    lab = labels[None] if squeeze else labels
    b = torch.zeros_like(lab, dtype=torch.bool)
    dy = lab[:, 1:, :] != lab[:, :-1, :]
    dx = lab[:, :, 1:] != lab[:, :, :-1]
    b[:, 1:, :] |= dy
    b[:, :-1, :] |= dy
    b[:, :, 1:] |= dx
    b[:, :, :-1] |= dx
    return b[0] if squeeze else b


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Square dilation (Chebyshev distance ≤ radius) of a bool [B, H, W] mask by max-pooling."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def boundary_fscore(pred: Tensor, target: Tensor, tolerance_px: int = 2, return_pr: bool = False):
    """Boundary F-score: how well the predicted label boundaries line up with the true ones.

    Boundaries as in :func:`boundaries`. A predicted boundary pixel is correct if a true boundary pixel lies
    within ``tolerance_px`` (Chebyshev distance, i.e. in the (2t+1)² square around it: max-pool dilation), and
    vice versa. precision = matched predicted / predicted, recall = matched true / true, F = 2PR / (P + R),
    counted over all pixels given (images pooled). An empty set counts as fully matched (P = 1 with no predicted
    boundary, R = 1 with no true one), so: no boundaries in both → 1.0; in only one of them → 0.0.
    ``pred`` may be logits [B, C, H, W]. ``return_pr=True`` returns ``(F, precision, recall)``.
    """
    pred = _labels(pred, target)
    if pred.dim() == 2:
        pred, target = pred[None], target[None]
    bp, bt = boundaries(pred), boundaries(target)
    n_p, n_t = int(bp.sum()), int(bt.sum())
    # an empty set is vacuously all-matched: no predicted boundary → precision 1, no true boundary → recall 1
    p = int((bp & _dilate(bt, tolerance_px)).sum()) / n_p if n_p else 1.0
    r = int((bt & _dilate(bp, tolerance_px)).sum()) / n_t if n_t else 1.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return (f, p, r) if return_pr else f


# ---------------------------------------------------------------------------------------------------------------
# Depth metrics (official dinov3/eval/depth/metrics.py: abs_rel, rmse, a1)
# ---------------------------------------------------------------------------------------------------------------


def _depth_pairs(pred: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    if pred.dim() == target.dim() + 1 and pred.shape[1] == 1:
        pred = pred.squeeze(1)  # [B, 1, H, W] prediction vs [B, H, W] target
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = target > 0  # official: valid_mask & (gt > 0)
    if valid is not None:
        keep = keep & valid.reshape(target.shape).bool()
    if not bool(keep.any()):
        raise ValueError("no valid pixels (valid mask and gt > 0)")
    return pred[keep].double(), target[keep].double()


def absrel(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> float:
    """Mean absolute relative error ``mean(|pred − gt| / gt)`` over valid pixels (``valid`` and gt > 0)."""
    p, t = _depth_pairs(pred, target, valid)
    return float(((p - t).abs() / t).mean())


def rmse(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> float:
    """Root mean squared error ``sqrt(mean((pred − gt)²))`` over valid pixels, in the depth unit (metres)."""
    p, t = _depth_pairs(pred, target, valid)
    return float(((p - t) ** 2).mean().sqrt())


def delta1(pred: Tensor, target: Tensor, valid: Tensor | None = None, threshold: float = 1.25) -> float:
    """δ1: fraction of valid pixels with ``max(pred/gt, gt/pred) < 1.25`` (``threshold``: 1.25² and 1.25³ give
    δ2 and δ3)."""
    p, t = _depth_pairs(pred, target, valid)
    return float((torch.maximum(p / t, t / p) < threshold).double().mean())
