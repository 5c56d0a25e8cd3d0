"""Check that the stored notebooks' figures can be shown on a projector, and that the notebooks stay light.

For every stored notebook (or those whose name starts with the given prefixes):

* every PNG output is drawn at >= 100 dpi (read from the PNG's pHYs chunk, which matplotlib writes from
  ``figure.dpi``) and is at most 1600 px wide;
* text size cannot be read back from a PNG, so it is checked in the code cells instead: the notebook calls
  ``viz.use_style()`` (the one place that sets rcParams), sets no rcParams itself (``rcParams``, ``plt.rc(``),
  passes no ``dpi=`` below 100, and no font size below 10 pt (``fontsize=``, ``labelsize=``, ``size=`` in a
  font dict, or the relative sizes "x-small"/"xx-small", which are below 10 pt at the style's 13 pt base);
* the .ipynb file is under 1.5 MB.

    python tools/check_figures.py           # all stored notebooks
    python tools/check_figures.py 00 02     # some
    python tools/check_figures.py --src 04  # the static checks on notebooks/src/04_*.py (before a rebuild)
"""
from __future__ import annotations

import base64
import re
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MIN_DPI, MAX_WIDTH, MIN_PT, MAX_BYTES = 100, 1600, 10, 1_500_000

SMALL_SIZE = re.compile(r"""\b(fontsize|labelsize|titlesize)\s*=\s*(\d+(?:\.\d+)?)\b""")
DICT_SIZE = re.compile(r"""["'](size|fontsize)["']\s*:\s*(\d+(?:\.\d+)?)""")
REL_SIZE = re.compile(r"""\b(?:fontsize|labelsize|size)\s*=\s*["'](x-small|xx-small)["']""")
DPI = re.compile(r"""\bdpi\s*=\s*(\d+(?:\.\d+)?)""")
RC = re.compile(r"""\brcParams\b|\b(?:plt|mpl|matplotlib)\.rc\(|\brc_context\(""")


def png_info(data: bytes) -> tuple[int, int, float | None]:
    """(width, height, dpi or None) of a PNG."""
    width, height = struct.unpack(">II", data[16:24])
    i, dpi = 8, None
    while i + 8 <= len(data):
        (n,) = struct.unpack(">I", data[i:i + 4])
        kind = data[i + 4:i + 8]
        if kind == b"pHYs":
            ppu_x, _, unit = struct.unpack(">IIB", data[i + 8:i + 17])
            dpi = ppu_x * 0.0254 if unit == 1 else None
            break
        if kind == b"IDAT":
            break
        i += 12 + n
    return width, height, dpi


def check_notebook(path: Path) -> list[str]:
    import nbformat

    if path.suffix == ".py":  # a source: its code cells only, no outputs
        sys.path.insert(0, str(ROOT / "tools"))
        from build_notebooks import parse

        nb, size = parse(path.read_text(), path.name), 0
    else:
        nb, size = nbformat.read(path, as_version=4), path.stat().st_size
    problems = []
    if size > MAX_BYTES:
        problems.append(f"file is {size / 1e6:.2f} MB (limit {MAX_BYTES / 1e6:.1f} MB): fewer figures, not smaller ones")
    n_png, styled = 0, False
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        where = f"cell {i}"
        src = cell.source
        styled = styled or "use_style()" in src
        for line_no, line in enumerate(src.splitlines(), 1):
            code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
            for m in SMALL_SIZE.finditer(code):
                if float(m.group(2)) < MIN_PT:
                    problems.append(f"{where} line {line_no}: {m.group(0)} (text below {MIN_PT} pt)")
            for m in DICT_SIZE.finditer(code):
                if float(m.group(2)) < MIN_PT:
                    problems.append(f"{where} line {line_no}: {m.group(0)} (text below {MIN_PT} pt)")
            for m in REL_SIZE.finditer(code):
                problems.append(f"{where} line {line_no}: {m.group(0)} (below {MIN_PT} pt at the 13 pt base)")
            for m in DPI.finditer(code):
                if float(m.group(1)) < MIN_DPI:
                    problems.append(f"{where} line {line_no}: {m.group(0)} (figures are drawn at >= {MIN_DPI} dpi)")
            if RC.search(code):
                problems.append(f"{where} line {line_no}: sets rcParams itself; the style lives in viz.use_style()")
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            n_png += 1
            width, height, dpi = png_info(base64.b64decode(data["image/png"]))
            if dpi is None or round(dpi) < MIN_DPI:
                problems.append(f"{where}: PNG {width}x{height} at {'no' if dpi is None else round(dpi)} dpi "
                                f"(needs >= {MIN_DPI})")
            if width > MAX_WIDTH:
                problems.append(f"{where}: PNG {width} px wide (at most {MAX_WIDTH})")
    if (n_png or "plt." in "".join(c.source for c in nb.cells)) and not styled:
        problems.append("draws figures but never calls viz.use_style()")
    what = f"{n_png} figures, {size / 1e6:.2f} MB" if size else "source"
    print(f"{path.name}: {what}, {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return problems


def main(argv: list[str]) -> int:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if "--src" in argv:
        argv = [a for a in argv if a != "--src"]
        paths = sorted((NOTEBOOKS / "src").glob("[0-9][0-9]_*.py"))
    if argv:
        paths = [p for p in paths if any(p.name.startswith(a) for a in argv)]
    bad = 0
    for path in paths:
        problems = check_notebook(path)
        for p in problems:
            print(f"  {p}")
        bad += bool(problems)
    print(f"{len(paths) - bad}/{len(paths)} notebooks OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
