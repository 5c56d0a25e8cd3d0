"""Build the stored notebooks: notebooks/src/NN_topic.py (percent format) -> notebooks/NN_topic.ipynb,
executed top to bottom with nbclient in this environment, as CI runs them.

    python tools/build_notebooks.py            # all notebooks
    python tools/build_notebooks.py 02 04      # those whose name starts with 02 or 04
    python tools/build_notebooks.py --check    # fail if a notebook's source differs from its .py
    python tools/build_notebooks.py --slides [02 04]   # reveal.js decks of the STORED notebooks -> slides/
    python tools/build_notebooks.py --restamp 14     # markdown + slide metadata: sources -> stored notebooks

Source format: cells are separated by lines ``# %%`` (code) and ``# %% [markdown]`` (markdown, every
line prefixed by ``# ``). Stored outputs must only ever come from this script: fresh kernel,
OMP_NUM_THREADS=2, no timing metadata.

Slides: a cell header may carry a slide type and options after the cell kind, e.g.
``# %% [markdown] slide``, ``# %% subslide hide-input``, ``# %% [markdown] fragment``, ``# %% skip``,
``# %% notes``. The type becomes ``cell.metadata.slideshow.slide_type`` (what nbconvert's slides
exporter and RISE read); a cell without one continues the current slide (nbconvert's "-"; no
metadata is written). ``hide-input`` (code cells) drops the input on slides: the tag ``hide-input``
for nbconvert (``TagRemovePreprocessor.remove_input_tags``) and ``jupyter.source_hidden`` for
JupyterLab / RISE (the input is collapsed there; click its bar to open it).
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


SLIDE_TYPES = ("slide", "subslide", "fragment", "skip", "notes", "-")
HIDE_INPUT = "hide-input"


def parse_header(line: str, where: str = "") -> tuple[str, str | None, bool]:
    """``# %% [markdown] slide`` -> ("md", "slide", False); ``# %% subslide hide-input`` -> ("code", "subslide", True)."""
    words = line[len("# %%"):].split()
    kind = "code"
    if words and words[0] == "[markdown]":
        kind, words = "md", words[1:]
    slide_type, hide = None, False
    for w in words:
        if w in SLIDE_TYPES and slide_type is None:
            slide_type = w
        elif w == HIDE_INPUT and kind == "code":
            hide = True
        else:
            raise ValueError(f"{where}: unknown cell option {w!r} in {line!r} "
                             f"(slide types: {', '.join(SLIDE_TYPES)}; code cells: {HIDE_INPUT})")
    return kind, (None if slide_type == "-" else slide_type), hide


def set_slide_metadata(cell, slide_type: str | None, hide: bool) -> None:
    if slide_type:
        cell.metadata["slideshow"] = {"slide_type": slide_type}
    if hide:
        cell.metadata["tags"] = [HIDE_INPUT]
        cell.metadata["jupyter"] = {"source_hidden": True}


def slide_metadata(cell) -> tuple:
    """What --check compares besides type and source: (slide type or None, hide-input)."""
    md = cell.get("metadata", {})
    return (md.get("slideshow", {}).get("slide_type"), HIDE_INPUT in md.get("tags", []),
            bool(md.get("jupyter", {}).get("source_hidden", False)))


def parse(text: str, name: str = "<source>"):
    import nbformat

    cells, kind, buf, opts = [], None, [], (None, False)

    def flush():
        if kind is None:
            return
        while buf and not buf[-1].strip():
            buf.pop()
        while buf and not buf[0].strip():
            buf.pop(0)
        if kind == "md":
            lines = [ln[2:] if ln.startswith("# ") else ln[1:] if ln.startswith("#") else ln for ln in buf]
            cell = nbformat.v4.new_markdown_cell("\n".join(lines))
        elif buf:
            cell = nbformat.v4.new_code_cell("\n".join(buf))
        else:
            return
        set_slide_metadata(cell, *opts)
        cells.append(cell)

    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("# %%"):
            flush()
            kind, slide_type, hide = parse_header(line, f"{name}:{lineno}")
            buf, opts = [], (slide_type, hide)
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


def execute(nb, timeout: int = 900) -> float:
    """Run ``nb`` in place in a fresh kernel, from notebooks/, with CI's environment; return the seconds taken."""
    from nbclient import NotebookClient

    os.environ.update(ENV)
    t0 = time.time()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(OUT)}}).execute()
    return time.time() - t0


def build(src: Path) -> float:
    import nbformat

    nb = parse(src.read_text(), src.name)
    normalise_ids(nb)
    dt = execute(nb)
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
        try:
            want = [(c.cell_type, c.source, slide_metadata(c)) for c in parse(src.read_text(), src.name).cells]
        except ValueError as e:
            print(f"{src.name}: {e}")
            bad += 1
            continue
        have = [(c.cell_type, c.source, slide_metadata(c)) for c in nbformat.read(out, as_version=4).cells]
        if want != have:
            what = "cells" if [w[:2] for w in want] != [h[:2] for h in have] else "slide metadata"
            print(f"{out.name}: stale, its {what} differ from {src.relative_to(ROOT)} (run make notebooks)")
            bad += 1
    return bad


def restamp(prefixes: list[str]) -> int:
    """Markdown and slide metadata from the sources onto the stored notebooks, without executing anything.

    The stored notebook is rebuilt from its source's cells; each code cell takes the outputs and execution
    count of the stored code cell it matches. Refused for a notebook whose code cells (their sources, in
    order) differ from the stored ones: its outputs would not be the source's; run the full build then.
    Markdown cells have no outputs, so editing, adding or removing them needs no re-execution.
    """
    import nbformat

    bad = 0
    for src in sorted(SRC.glob("*.py")):
        if prefixes and not any(src.name.startswith(a) for a in prefixes):
            continue
        out = OUT / (src.stem + ".ipynb")
        new = parse(src.read_text(), src.name)
        stored = nbformat.read(out, as_version=4)
        new_code = [c for c in new.cells if c.cell_type == "code"]
        old_code = [c for c in stored.cells if c.cell_type == "code"]
        if [c.source for c in new_code] != [c.source for c in old_code]:
            print(f"{out.name}: code cells differ from {src.relative_to(ROOT)}; not restamped (run the full build)")
            bad += 1
            continue
        for n, o in zip(new_code, old_code):
            n.outputs, n.execution_count = o.outputs, o.execution_count
        new.metadata = stored.metadata
        normalise_ids(new)
        nbformat.write(new, out)
        print(f"{out.name}: markdown and slide metadata restamped")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------------------
# Slides: one reveal.js deck per stored notebook, made from the stored outputs (nothing is re-executed).
SLIDES = ROOT / "slides"
SLIDE_W, SLIDE_H = 1280, 720  # a 16:9 projector; tools/check_slides.py checks that every slide fits
# reveal.js, MathJax 2, require.js and jQuery come from npm into slides/node_modules (make slides: SLIDES_NPM in the
# Makefile), so a deck works offline from file://; nbconvert's defaults would load them from CDNs.
VENDOR = {
    "reveal_url_prefix": "node_modules/reveal.js",
    "mathjax_url": "node_modules/mathjax/MathJax.js?config=TeX-AMS_CHTML-full,Safe",
    "require_js_url": "node_modules/requirejs/require.js",
    "jquery_url": "node_modules/jquery/dist/jquery.min.js",
}

# nbconvert's reveal template, minus what would need the network (mermaid, widget manager), plus a projector
# style: larger text than the notebook, figures scaled to the slide, no prompts.
DECK_TEMPLATE = r"""{%- extends 'reveal/index.html.j2' -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_css -%}
<style type="text/css">
:root {
  --jp-content-font-size1: 22px;
  --jp-ui-font-size1: 20px;
  --jp-code-font-size: 17px;
  --jp-cell-prompt-width: 0px;
}
.reveal { font-size: 22px; }
.reveal .slides section { padding: 0 8px; box-sizing: border-box; }
.reveal .slides h1, .reveal .slides h2, .reveal .slides h3, .reveal .slides h4 { text-transform: none; }
.reveal .jp-RenderedHTMLCommon h1 { font-size: 44px; margin: 0 0 18px 0; }
.reveal .jp-RenderedHTMLCommon h2 { font-size: 36px; margin: 0 0 14px 0; }
.reveal .jp-RenderedHTMLCommon h3 { font-size: 30px; margin: 0 0 12px 0; }
.reveal .jp-RenderedHTMLCommon p, .reveal .jp-RenderedHTMLCommon li { line-height: 1.35; }
.reveal .jp-RenderedHTMLCommon table { font-size: 18px; margin: 6px 0; }
.reveal .jp-RenderedHTMLCommon td, .reveal .jp-RenderedHTMLCommon th { padding: 3px 8px; }
.reveal pre { font-size: 16px; line-height: 1.25; box-sizing: border-box; white-space: pre-wrap;
              overflow-wrap: anywhere; }
.reveal .jp-OutputArea-output img { max-height: 600px; max-width: 100%; width: auto; height: auto; }
.reveal .jp-Cell { padding: 2px 0; }
.reveal .jp-InputPrompt, .reveal .jp-OutputPrompt { display: none; }
</style>
{%- endblock html_head_css -%}
"""


def deck_exporter():
    import jinja2
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    c = Config()
    c.SlidesExporter.update(VENDOR)
    c.SlidesExporter.reveal_theme = "white"  # its font ships with reveal.js ("simple" loads Google Fonts)
    c.SlidesExporter.reveal_transition = "none"
    c.SlidesExporter.reveal_number = "c/t"
    c.SlidesExporter.reveal_width = str(SLIDE_W)
    c.SlidesExporter.reveal_height = str(SLIDE_H)
    c.SlidesExporter.exclude_input_prompt = True
    c.SlidesExporter.exclude_output_prompt = True
    c.CoalesceStreamsPreprocessor.enabled = True  # one block per cell's printed output
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {HIDE_INPUT}
    return SlidesExporter(config=c, extra_loaders=[jinja2.DictLoader({"dinolab_deck.html.j2": DECK_TEMPLATE})],
                          template_file="dinolab_deck.html.j2")


def build_slides(prefixes: list[str]) -> int:
    """slides/NN_topic.slides.html for every stored notebook (or those starting with a prefix)."""
    import nbformat

    missing = [v.split("?")[0] for v in VENDOR.values() if not (SLIDES / v.split("?")[0]).exists()]
    if missing:
        print("slides/node_modules is incomplete (missing " + ", ".join(missing) + "): run `make slides`, which "
              "installs reveal.js, MathJax, require.js and jQuery there with npm")
        return 1
    exporter = deck_exporter()
    notebooks = sorted(OUT.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        notebooks = [n for n in notebooks if any(n.name.startswith(a) for a in prefixes)]
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        n_slides = sum(c.metadata.get("slideshow", {}).get("slide_type") in ("slide", "subslide") for c in nb.cells)
        if not n_slides:
            print(f"{path.stem}: no slide metadata (no presenter path yet), skipped")
            continue
        body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem}})
        out = SLIDES / f"{path.stem}.slides.html"
        out.write_text(body)
        print(f"{out.relative_to(ROOT)}: {n_slides} slides")
    return 0


def main(argv: list[str]) -> int:
    if "--check" in argv:
        return 1 if check() else 0
    if "--restamp" in argv:
        return restamp([a for a in argv if a != "--restamp"])
    if "--slides" in argv:
        return build_slides([a for a in argv if a != "--slides"])
    sources = sorted(SRC.glob("*.py"))
    if argv:
        sources = [s for s in sources if any(s.name.startswith(a) for a in argv)]
    for src in sources:
        dt = build(src)
        print(f"{src.stem}: executed in {dt:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
