"""Build the stored notebooks: notebooks/src/NN_topic.py (percent format) -> notebooks/NN_topic.ipynb,
executed top to bottom with nbclient in this environment, as CI runs them.

    python tools/build_notebooks.py            # all notebooks
    python tools/build_notebooks.py 02 04      # those whose name starts with 02 or 04
    python tools/build_notebooks.py --check    # fail if a notebook's source differs from its .py

Source format: cells are separated by lines ``# %%`` (code) and ``# %% [markdown]`` (markdown, every
line prefixed by ``# ``). Stored outputs must only ever come from this script (see
../shared/reference/teaching_notebooks.md §0): fresh kernel, OMP_NUM_THREADS=2, no timing metadata.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"

# The same environment as CI (Makefile) so that outputs match under nbval.
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
       "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}


def parse(text: str):
    import nbformat

    cells, kind, buf = [], None, []

    def flush():
        if kind is None:
            return
        while buf and not buf[-1].strip():
            buf.pop()
        while buf and not buf[0].strip():
            buf.pop(0)
        if kind == "md":
            lines = [ln[2:] if ln.startswith("# ") else ln[1:] if ln.startswith("#") else ln for ln in buf]
            cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        elif buf:
            cells.append(nbformat.v4.new_code_cell("\n".join(buf)))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, buf = ("md" if "[markdown]" in line else "code"), []
        elif kind is not None:
            buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def normalise_ids(nb) -> None:
    for i, cell in enumerate(nb.cells):  # stable ids: no git noise between rebuilds
        cell["id"] = f"cell-{i:03d}"


def build(src: Path) -> float:
    import nbformat
    from nbclient import NotebookClient

    nb = parse(src.read_text())
    normalise_ids(nb)
    os.environ.update(ENV)
    t0 = time.time()
    client = NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(OUT)}})
    client.execute()
    dt = time.time() - t0
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    out = OUT / (src.stem + ".ipynb")
    nbformat.write(nb, out)
    return dt


def check() -> int:
    import nbformat

    bad = 0
    for src in sorted(SRC.glob("*.py")):
        out = OUT / (src.stem + ".ipynb")
        if not out.exists():
            print(f"{out.name}: missing (run make notebooks)")
            bad += 1
            continue
        want = [(c.cell_type, c.source) for c in parse(src.read_text()).cells]
        have = [(c.cell_type, c.source) for c in nbformat.read(out, as_version=4).cells]
        if want != have:
            print(f"{out.name}: stale, its cells differ from {src.relative_to(ROOT)} (run make notebooks)")
            bad += 1
    return bad


def main(argv: list[str]) -> int:
    if "--check" in argv:
        return 1 if check() else 0
    sources = sorted(SRC.glob("*.py"))
    if argv:
        sources = [s for s in sources if any(s.name.startswith(a) for a in argv)]
    for src in sources:
        dt = build(src)
        print(f"{src.stem}: executed in {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
