"""Small training loops for the notebooks' heads.

* :func:`fit`: AdamW + linear warm-up + cosine decay (:func:`cosine_lr_factor`), a tqdm progress bar
  (optional), returns the loss history.
* :func:`extract_features`: run a frozen backbone once and cache its features, so a head trains in seconds.

The metrics the notebooks evaluate with are in :mod:`dinolab.metrics`.

The progress bar honours ``TQDM_DISABLE=1`` (tqdm reads ``TQDM_*`` environment variables), which the notebook CI
sets; ``progress=False`` turns it off from code.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import utils

__all__ = ["fit", "cosine_lr_factor", "to_device", "extract_features"]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def cosine_lr_factor(step: int, steps: int, warmup: int = 0, min_factor: float = 0.0) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based), for ``LambdaLR``: linear warm-up
    ``(step+1)/warmup``, then cosine from 1 to ``min_factor`` over the remaining ``steps - warmup`` steps.
    (Not :func:`dinolab.schedules.cosine_schedule`, which returns the whole array of values.)"""
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr_factor(s, steps, warmup, min_lr_factor))
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
