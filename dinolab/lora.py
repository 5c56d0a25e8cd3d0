"""LoRA (Hu et al., 2021) on the fused ``qkv`` projection of every DINOv3 block, as peft's ``lora.Linear``.

Each target third of the ``Linear(D, 3D)`` output (``targets`` in ("q", "k", "v"), default ("q", "v")) gets its own
pair ``A_t`` (r, D), Kaiming-uniform, and ``B_t`` (D, r), zero: ``out[t] = W_t x + (alpha / r) · B_t (A_t x)`` with
``W`` frozen, so the adapted model equals the pretrained one at step 0. Shapes: x (B, N, D) -> (B, N, 3D). Same
numbers as peft on transformers' split ``q_proj`` / ``v_proj`` (tests/test_lora.py); notebook 13 explains it all.

Keys: the frozen Linear moves to ``blocks.{i}.attn.qkv.base.*``, next to ``blocks.{i}.attn.qkv.lora_{A,B}_{t}``;
attribute access and ``load_state_dict`` still accept the plain ``qkv.{weight,bias,bias_mask}`` names.
:func:`apply_lora` freezes every parameter of the model it is given (a head attached afterwards stays trainable);
:func:`merge_lora` folds ``ΔW`` into ``W`` (do not train a merged model), :func:`unmerge_lora` takes it out again.
"""
from __future__ import annotations

import math
import operator
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS = ("q", "k", "v")  # the order of the thirds of the fused qkv output

__all__ = [
    "LoRAQKV", "apply_lora", "merge_lora", "unmerge_lora", "remove_lora", "lora_state_dict", "load_lora",
    "merged_state_dict", "lora_modules", "lora_config", "count_lora_params", "lora_param_count", "TARGETS",
]


# ----------------------------------------------------------------------------- argument checks
def _check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    try:
        targets = tuple(targets)
    except TypeError:
        raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {targets!r}") from None
    if not targets:
        raise ValueError(f"targets is empty; choose a non-empty subset of {TARGETS}, e.g. ('q', 'v')")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; expected a subset of {TARGETS}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"duplicate LoRA target in {targets}")
    return tuple(t for t in TARGETS if t in targets)  # canonical q, k, v order


def _check_rank(r, dim: int) -> int:
    if isinstance(r, bool):
        raise ValueError(f"LoRA rank r must be an integer, got {r!r}")
    try:
        r = operator.index(r)  # int, numpy integer; not 4.0 or "4"
    except TypeError:
        raise ValueError(f"LoRA rank r must be an integer, got {r!r}") from None
    if not 1 <= r <= dim:
        raise ValueError(f"LoRA rank r={r} is out of range: need 1 <= r <= embed_dim ({dim})")
    return r


def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}") from None
    if not (a > 0 and math.isfinite(a)):
        raise ValueError(f"LoRA alpha must be a positive finite number, got {alpha!r}")
    return a


def _check_dropout(p) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"LoRA dropout must be a number in [0, 1), got {p!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {p}")
    return p


# ----------------------------------------------------------------------------- the module
class LoRAQKV(nn.Module):
    """A fused ``qkv`` Linear(D, 3D) plus one low-rank update per target third.

    ``base``: the original Linear (frozen by :func:`apply_lora`, its bias mask respected since its own
    forward is called). Parameters ``lora_A_{t}`` (r, D) and ``lora_B_{t}`` (D, r) for t in ``targets``.
    Attributes not found here (``weight``, ``bias``, ``bias_mask``, ``in_features`` ...) are the base's.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, targets: Iterable[str] = ("q", "v"),
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear) or base.out_features != 3 * base.in_features:
            raise ValueError(f"LoRAQKV wraps a fused Linear(D, 3D); got {base!r}")
        self.dim = base.in_features
        self.targets = _check_targets(targets)
        self.r = _check_rank(r, self.dim)
        self.alpha = _check_alpha(alpha)
        self.scaling = self.alpha / self.r
        self.dropout_p = _check_dropout(dropout)
        self.base = base
        # peft applies dropout to the LoRA input only (the frozen path sees the clean x)
        self.lora_dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        w = base.weight
        # Adapter dtype as peft (autocast_adapter_dtype=True): float32 under an fp16/bf16 base.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        for t in self.targets:
            self.register_parameter(f"lora_A_{t}", nn.Parameter(torch.empty(self.r, self.dim, device=w.device, dtype=dtype)))
            self.register_parameter(f"lora_B_{t}", nn.Parameter(torch.empty(self.dim, self.r, device=w.device, dtype=dtype)))
        self.merged = False
        self.reset_lora_parameters()
        self.register_load_state_dict_pre_hook(_accept_plain_keys)

    def reset_lora_parameters(self) -> None:
        """peft's default init: A Kaiming-uniform (a=sqrt(5), i.e. bound 1/sqrt(D)), B zero, so ΔW = 0."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters on a merged LoRAQKV; unmerge it first")
        with torch.no_grad():
            for t in self.targets:
                nn.init.kaiming_uniform_(self.lora_A(t), a=math.sqrt(5))
                nn.init.zeros_(self.lora_B(t))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)  # weight, bias, bias_mask, in_features, ...

    def lora_A(self, t: str) -> nn.Parameter:
        return getattr(self, f"lora_A_{t}")

    def lora_B(self, t: str) -> nn.Parameter:
        return getattr(self, f"lora_B_{t}")

    def rows(self, t: str) -> slice:
        """The rows of the fused weight (columns of the output) that belong to target ``t``."""
        i = TARGETS.index(t)
        return slice(i * self.dim, (i + 1) * self.dim)

    def delta_weight(self, t: str) -> Tensor:
        """ΔW_t = B_t A_t · alpha/r, (D, D). Materialised for merging and inspection only."""
        return (self.lora_B(t) @ self.lora_A(t)) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:  # ΔW already in base.weight: the plain model's cost
            return out
        for t in self.targets:
            A, B = self.lora_A(t), self.lora_B(t)
            h = self.lora_dropout(x.to(A.dtype))  # one dropout draw per target, as peft's separate q/v layers
            update = F.linear(F.linear(h, A), B) * self.scaling  # (..., D): never forms ΔW
            # In place into the target third: autograd-safe, as a Linear does not keep its output.
            out[..., self.rows(t)] += update.to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """``W[rows_t] += ΔW_t`` for every target (no-op if already merged). Bias untouched."""
        if self.merged:
            return
        w = self.base.weight
        for t in self.targets:
            w[self.rows(t)] += self.delta_weight(t).to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W[rows_t] -= ΔW_t``: undoes :meth:`merge` up to floating-point rounding (no-op if unmerged)."""
        if not self.merged:
            return
        w = self.base.weight
        for t in self.targets:
            w[self.rows(t)] -= self.delta_weight(t).to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, targets={self.targets}, "
                f"dropout={self.dropout_p:g}, merged={self.merged}")


def _accept_plain_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs) -> None:
    """Let ``...qkv.weight`` (a plain backbone checkpoint) load into ``...qkv.base.weight``."""
    for name in list(module.base.state_dict().keys()):
        plain, wrapped = prefix + name, prefix + "base." + name
        if plain in state_dict and wrapped not in state_dict:
            state_dict[wrapped] = state_dict.pop(plain)


# ----------------------------------------------------------------------------- model-level API
def lora_modules(model: nn.Module) -> dict[str, LoRAQKV]:
    """``{module name: LoRAQKV}`` in model order (empty if the model has no LoRA)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAQKV)}


def _require_lora(model: nn.Module) -> dict[str, LoRAQKV]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules; call apply_lora(model, r, alpha) first")
    return mods


def apply_lora(model: nn.Module, r: int, alpha: float, targets: Iterable[str] = ("q", "v"),
               dropout: float = 0.0) -> nn.Module:
    """Wrap ``model.blocks[i].attn.qkv`` of every block in a :class:`LoRAQKV`, in place; returns ``model``.

    Afterwards only the LoRA tensors require grad: every other parameter of ``model`` is frozen (its
    previous flags are restored by :func:`remove_lora`). Modules attached afterwards (a head) keep theirs.
    All arguments are checked before anything is changed.
    """
    targets = _check_targets(targets)
    alpha = _check_alpha(alpha)
    dropout = _check_dropout(dropout)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ValueError(f"apply_lora needs a model with a non-empty `blocks` ModuleList (a DinoVisionTransformer); "
                         f"{type(model).__name__} has {'none' if blocks is None else type(blocks).__name__}")
    if lora_modules(model):
        raise ValueError("LoRA is already applied to this model; call remove_lora(model) before applying it again")
    for i, blk in enumerate(blocks):
        qkv = getattr(getattr(blk, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
            raise ValueError(f"blocks[{i}].attn.qkv is not a fused Linear(D, 3D): {qkv!r}")
    r = [_check_rank(r, blk.attn.qkv.in_features) for blk in blocks][0]

    model._lora_saved_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for blk in blocks:
        blk.attn.qkv = LoRAQKV(blk.attn.qkv, r, alpha, targets, dropout)  # LoRA params: requires_grad=True
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold ΔW into every base qkv weight; the forward then skips the LoRA path (plain-model cost)."""
    for m in _require_lora(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (``W -= ΔW``; exact up to fp rounding)."""
    for m in _require_lora(model).values():
        m.unmerge()
    return model


def remove_lora(model: nn.Module, *, merge: bool = True) -> nn.Module:
    """Put the plain qkv Linear back (original keys). ``merge=True`` keeps the learned update folded in
    (peft's ``merge_and_unload``); ``merge=False`` discards it (peft's ``unload``). The ``requires_grad``
    flags from before :func:`apply_lora` are restored."""
    mods = _require_lora(model)
    for name, m in mods.items():
        m.merge() if merge else m.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    saved = model.__dict__.pop("_lora_saved_requires_grad", None)
    if saved is not None:
        for n, p in model.named_parameters():
            if n in saved:
                p.requires_grad_(saved[n])
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the LoRA tensors (detached copies), e.g. ``blocks.3.attn.qkv.lora_A_q``. Kilobytes to save,
    independent of the merge state. r and the targets show in the shapes and keys; alpha does not
    (see :func:`lora_config`)."""
    out: dict[str, Tensor] = {}
    for name, m in _require_lora(model).items():
        for t in m.targets:
            out[f"{name}.lora_A_{t}"] = m.lora_A(t).detach().clone()
            out[f"{name}.lora_B_{t}"] = m.lora_B(t).detach().clone()
    return out


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(keys[:limit])
    return shown + (f"\n  ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_lora(model: nn.Module, sd: Mapping[str, Tensor]) -> nn.Module:
    """Load :func:`lora_state_dict` output into a model prepared with :func:`apply_lora` (same r, targets).

    Every key must match: missing, unexpected and mis-shaped keys are all listed in one ValueError and
    the model is left unchanged. Merged modules are unmerged, loaded and merged again.
    """
    mods = _require_lora(model)
    own = {f"{name}.lora_{ab}_{t}": (m, ab, t) for name, m in mods.items() for t in m.targets for ab in "AB"}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = []
    for k in sorted(set(own) & set(sd)):
        m, ab, t = own[k]
        want = tuple(getattr(m, f"lora_{ab}")(t).shape)
        v = sd[k]
        if not isinstance(v, Tensor):
            bad.append(f"{k}: not a tensor ({type(v).__name__})")
        elif tuple(v.shape) != want:
            bad.append(f"{k}: checkpoint {tuple(v.shape)} vs model {want}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s):\n  " + _listing(missing))
    if unexpected:
        hint = " (pass lora_state_dict(...), not a full state_dict)" if any(".lora_" not in k for k in unexpected) else ""
        problems.append(f"{len(unexpected)} unexpected key(s){hint}:\n  " + _listing(unexpected))
    if bad:
        problems.append(f"{len(bad)} mis-shaped key(s) (a different rank r?):\n  " + _listing(bad))
    if problems:
        raise ValueError("LoRA state dict does not fit the model; " + "\n".join(problems))
    with torch.no_grad():
        for name, m in mods.items():
            was_merged = m.merged
            m.unmerge()
            for t in m.targets:
                m.lora_A(t).copy_(sd[f"{name}.lora_A_{t}"])
                m.lora_B(t).copy_(sd[f"{name}.lora_B_{t}"])
            if was_merged:
                m.merge()
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with ΔW folded in and the original (non-LoRA) keys: loads strictly into the
    plain model. ``model`` itself is not changed."""
    mods = _require_lora(model)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in mods.items():
        for t in m.targets:
            sd.pop(f"{name}.lora_A_{t}")
            sd.pop(f"{name}.lora_B_{t}")
        for key in list(m.base.state_dict()):
            sd[f"{name}.{key}"] = sd.pop(f"{name}.base.{key}")
        if not m.merged:
            w = sd[f"{name}.weight"]
            with torch.no_grad():
                for t in m.targets:
                    w[m.rows(t)] += m.delta_weight(t).to(w.dtype)
    return sd


def lora_config(model: nn.Module) -> dict:
    """``{"r", "alpha", "targets", "dropout"}`` of the (uniform) LoRA modules, to save next to the tensors."""
    m = next(iter(_require_lora(model).values()))
    return {"r": m.r, "alpha": m.alpha, "targets": m.targets, "dropout": m.dropout_p}


def count_lora_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of LoRA parameters in the model (0 if none)."""
    return sum(p.numel() for m in lora_modules(model).values() for t in m.targets
               for p in (m.lora_A(t), m.lora_B(t)) if p.requires_grad or not trainable_only)


def lora_param_count(embed_dim: int, depth: int, r: int, targets: Iterable[str] = ("q", "v")) -> int:
    """Trainable LoRA parameters, analytically: ``depth · len(targets) · 2 r D`` (A: r·D, B: D·r)."""
    targets = _check_targets(targets)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
        raise ValueError(f"embed_dim must be a positive integer, got {embed_dim!r}")
    r = _check_rank(r, embed_dim)
    return depth * len(targets) * 2 * r * embed_dim
