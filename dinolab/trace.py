"""Tensor-flow tables: which module turns which shapes into which.

``trace(model, x)`` runs one forward pass with hooks on the modules and returns a table such as::

    module                 type                  input            output
    patch_embed            PatchEmbed            [4,3,512,512]    [4,32,32,1024]
    blocks.0-23 (x24)      SelfAttentionBlock    [4,1029,1024]    [4,1029,1024]
    ...

It works on the meta device (shapes only, no memory, no arithmetic), which is how the notebooks print
the tables of ViT-L at 512x512 or the 7B model on a laptop.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def fmt_shape(obj) -> str:
    """Shapes of tensors inside (nested) tuples, lists and dicts, e.g. ``[4,1024,32,32]``."""
    if isinstance(obj, Tensor):
        return "[" + ",".join(str(s) for s in obj.shape) + "]"
    if isinstance(obj, int) and not isinstance(obj, bool):  # e.g. H=32, W=32 keyword arguments
        return str(obj)
    if isinstance(obj, dict):
        inner = [f"{k}={fmt_shape(v)}" for k, v in obj.items() if fmt_shape(v)]
        return ", ".join(inner)
    if isinstance(obj, (tuple, list)):
        inner = [fmt_shape(v) for v in obj]
        inner = [s for s in inner if s]
        if not inner:
            return ""
        return inner[0] if len(inner) == 1 else "(" + ", ".join(inner) + ")"
    return ""


@dataclass
class TraceRow:
    name: str
    type: str
    input: str
    output: str
    count: int = 1


@dataclass
class Trace:
    rows: list[TraceRow] = field(default_factory=list)

    def _cells(self) -> list[list[str]]:
        return [[r.name + (f" (x{r.count})" if r.count > 1 else ""), r.type, r.input, r.output] for r in self.rows]

    def __str__(self) -> str:
        head = ["module", "type", "input", "output"]
        cells = self._cells()
        widths = [max(len(head[i]), *(len(c[i]) for c in cells)) if cells else len(head[i]) for i in range(4)]
        line = lambda c: "  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])

    __repr__ = __str__

    def to_markdown(self) -> str:
        out = ["| module | type | input | output |", "|---|---|---|---|"]
        out += ["| " + " | ".join(c) + " |" for c in self._cells()]
        return "\n".join(out)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _depth(name: str) -> int:
    # "blocks.3.attn" is depth 2: the index inside a ModuleList does not count as a level
    return sum(1 for part in name.split(".") if not part.isdigit())


def trace(model: nn.Module, *inputs, max_depth: int = 1, names: list[str] | None = None,
          collapse: bool = True, **kwargs) -> Trace:
    """Run ``model(*inputs, **kwargs)`` once and tabulate (module, input shapes, output shapes).

    ``max_depth``: which submodules to show (1 = direct children, 2 = their children, ...);
    ``names``: show exactly these submodules instead (prefix match); ``collapse``: merge repeated
    rows that differ only by a ModuleList index (``blocks.0-23 (x24)``) or repeat the same call.
    The first row is the whole model. Nothing is computed on the meta device but shapes.
    """
    rows: list[list[str]] = []  # in call order: a row is opened when a module is entered
    open_rows: dict[int, list[list[str]]] = {}
    handles = []

    def wanted(name: str) -> bool:
        if names is not None:
            return any(name == n or name.startswith(n + ".") and _depth(name) == _depth(n) for n in names)
        return 0 < _depth(name) <= max_depth

    def pre_hook_for(name: str):
        def pre_hook(mod, args, kw):
            row = [name, type(mod).__name__, fmt_shape((args, kw) if kw else args), ""]
            rows.append(row)
            open_rows.setdefault(id(mod), []).append(row)
        return pre_hook

    def post_hook(mod, args, kw, out):
        open_rows[id(mod)].pop()[3] = fmt_shape(out)

    for name, mod in model.named_modules():
        if name and wanted(name) and not isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            handles.append(mod.register_forward_pre_hook(pre_hook_for(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    model_row = ("(model)", type(model).__name__, fmt_shape(inputs), fmt_shape(out))
    result = Trace([TraceRow(*model_row)])
    if not collapse:
        result.rows += [TraceRow(*r) for r in rows]
        return result
    merged: dict[tuple, TraceRow] = {}
    for name, typ, i, o in rows:
        key = (re.sub(r"\.\d+(?=\.|$)", ".*", name), typ, i, o)
        if key in merged:
            row = merged[key]
            row.count += 1
            row._idx.add(name)  # type: ignore[attr-defined]
        else:
            row = TraceRow(name, typ, i, o)
            row._idx = {name}  # type: ignore[attr-defined]
            merged[key] = row
    for row in merged.values():
        row.name = _range_name(sorted(row._idx, key=_natural))  # type: ignore[attr-defined]
        del row._idx  # type: ignore[attr-defined]
        result.rows.append(row)
    return result


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _range_name(names: list[str]) -> str:
    """['blocks.0', ..., 'blocks.23'] -> 'blocks.0-23'."""
    if len(names) == 1:
        return names[0]
    # the index that varies may be any of them: 'interactions.3.extra_extractors.0' / '.1' -> '...extra_extractors.0-1'
    matches = [list(re.finditer(r"\.(\d+)(?=\.|$)", n)) for n in names]
    if len({len(m) for m in matches}) != 1 or not matches[0]:
        return names[0]
    varying = [k for k in range(len(matches[0])) if len({m[k].group(1) for m in matches}) > 1]
    if not varying:
        return names[0]
    k = varying[0]
    nums = [int(m[k].group(1)) for m in matches]
    first = matches[0][k]
    lo, hi = min(nums), max(nums)
    span = f"{lo}-{hi}" if len(set(nums)) == hi - lo + 1 else ",".join(map(str, sorted(set(nums))))
    return names[0][: first.start(1)] + span + names[0][first.end(1):]
