"""Open every reveal.js deck in headless Chromium, step through all its slides, and fail on what a projector
would show wrong: a JavaScript error, a request that needs the network (decks must work offline), an image
that does not load, or content that does not fit the 1280 x 720 slide (taller or wider than the slide, or
cut off inside a scroll box). Saves one screenshot per deck in slides/screenshots/.

    python tools/check_slides.py                        # every slides/NN_*.slides.html
    python tools/check_slides.py slides/02_rope.slides.html --all-shots   # one PNG per slide, to look at

Installs nothing: it needs Debian's Chromium (``sudo apt-get install chromium chromium-driver``; another
binary via CHROMIUM=/path) and the ``playwright`` Python package from the test extras, which drives that
binary (no browser download: ``executable_path`` points at it).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # reported in main()
    PlaywrightTimeout = TimeoutError

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT / "slides"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]
TOLERANCE = 2  # px: rounding of layout sizes
TIMEOUT_MS = 180_000  # per step; generous, so that a busy machine does not fail the check
MATH_TIMEOUT_MS = 60_000
MATH_SHOWN = """() => {
  const s = Reveal.getCurrentSlide();
  const onSlide = e => !e.closest('aside.notes');  // speaker notes are not shown
  const n = [...s.querySelectorAll('script[type^="math/tex"]')].filter(onSlide).length;
  const shown = [...s.querySelectorAll('.MathJax_CHTML')].filter(onSlide);
  return shown.length >= n && shown.every(e => e.getBoundingClientRect().width > 0);
}"""
# Wait until the slide on screen is final: MathJax 2 typesets in a queue (and nbconvert's deck re-typesets each
# slide when it is shown), and text in a web font stays invisible until the font has loaded.
SETTLE = """() => new Promise(resolve => {
  const frames = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r())));
  const mathjax = () => (window.MathJax && MathJax.Hub)  // (queueing from inside the hook would never run)
    ? new Promise(r => MathJax.Hub.Register.StartupHook('End', () => r()))
        .then(() => new Promise(r => MathJax.Hub.Queue(() => r())))
    : Promise.resolve();
  const settled = mathjax().then(frames).then(() => document.fonts.ready).then(frames)
    .then(() => document.fonts.ready).then(frames);
  Promise.race([settled, new Promise(r => setTimeout(() => r(), %d))]).then(() => resolve());
})""" % TIMEOUT_MS

# Runs in the page for the slide on screen: sizes in the slide's own coordinates (before reveal's scaling).
MEASURE = """() => {
  const cfg = Reveal.getConfig();
  const s = Reveal.getCurrentSlide();
  const tol = %d;
  const out = {h: s.scrollHeight, w: s.scrollWidth, W: cfg.width, H: cfg.height, boxes: [], images: [],
               title: (s.querySelector('h1, h2, h3') || {}).textContent || ''};
  for (const el of s.querySelectorAll('*')) {
    const st = getComputedStyle(el);
    const clipsX = ['auto', 'scroll', 'hidden'].includes(st.overflowX);
    const clipsY = ['auto', 'scroll', 'hidden'].includes(st.overflowY);
    if ((clipsX && el.scrollWidth > el.clientWidth + tol) || (clipsY && el.scrollHeight > el.clientHeight + tol)) {
      if (el.clientWidth > 4 && el.clientHeight > 4)  // not screen-reader-only boxes (MathJax's assistive MathML)
        out.boxes.push(el.tagName.toLowerCase() + '.' + (el.className || '').toString().split(' ')[0] +
                       ' ' + el.scrollWidth + 'x' + el.scrollHeight + ' in ' + el.clientWidth + 'x' + el.clientHeight);
    }
  }
  for (const img of s.querySelectorAll('img')) {
    if (!img.complete || img.naturalWidth === 0) out.images.push((img.getAttribute('src') || '').slice(0, 60));
  }
  return out;
}""" % TOLERANCE


def check_deck(browser, deck: Path, shots: Path, all_shots: bool, shot_index: int | None,
               verbose: bool = False) -> list[str]:
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda e: problems.append(f"JavaScript error: {e}"))
    page.on("console", lambda m: problems.append(f"console error: {m.text}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:100]} ({r.failure})"))

    def no_network(route):
        problems.append(f"needs the network: {route.request.url[:100]}")
        route.abort()

    page.route("http://**/*", no_network)
    page.route("https://**/*", no_network)
    page.goto(deck.as_uri(), wait_until="load")
    # nbconvert loads reveal.js with require.js (an AMD module, no global): fetch the same instance
    page.wait_for_function("() => document.querySelector('.reveal.ready') !== null")
    page.evaluate("""() => new Promise(resolve => {
        const src = [...document.scripts].map(s => s.textContent).find(t => t.includes('/dist/reveal.js'));
        const url = src.match(/"([^"]*\\/dist\\/reveal\\.js)"/)[1];
        require([url], R => { window.Reveal = R; resolve(); });
    })""")
    page.evaluate(SETTLE)
    indices = page.evaluate("() => Reveal.getSlides().map(s => Reveal.getIndices(s))")

    def show(ix) -> bool:  # go to a slide and wait until MathJax has (re)typeset it and its fonts are in
        page.evaluate(f"() => Reveal.slide({ix['h']}, {ix.get('v') or 0})")
        page.evaluate(SETTLE)
        try:  # every formula of the slide typeset and laid out (width > 0 once its web font is in)
            page.wait_for_function(MATH_SHOWN, timeout=MATH_TIMEOUT_MS)
        except PlaywrightTimeout:
            return False
        page.evaluate(SETTLE)
        return True

    first_figure = None
    for i, ix in enumerate(indices):
        math_ok = show(ix)
        m = page.evaluate(MEASURE)
        where = f"slide {i + 1}/{len(indices)} ({m['title'].strip().rstrip('¶')[:50] or 'no title'})"
        if not math_ok:
            problems.append(f"{where}: a formula was not typeset within {MATH_TIMEOUT_MS // 1000} s")
        if verbose:
            print(f"  {where}: {m['w']} x {m['h']}", flush=True)
        if m["h"] > m["H"] + TOLERANCE:
            problems.append(f"{where}: content is {m['h']} px tall, the slide {m['H']}")
        if m["w"] > m["W"] + TOLERANCE:
            problems.append(f"{where}: content is {m['w']} px wide, the slide {m['W']}")
        for box in m["boxes"]:
            problems.append(f"{where}: cut off in a scroll box: {box}")
        for src in m["images"]:
            problems.append(f"{where}: image did not load: {src}")
        has_figure = page.evaluate("() => Reveal.getCurrentSlide().querySelector('img') !== null")
        if first_figure is None and has_figure:
            first_figure = i
        if all_shots:
            page.screenshot(path=str(shots / f"{deck.name.split('.')[0]}_{i + 1:02d}.png"))
    pick = shot_index if shot_index is not None else (first_figure if first_figure is not None else 0)
    pick = min(pick, len(indices) - 1)
    show(indices[pick])
    page.screenshot(path=str(shots / f"{deck.name.split('.')[0]}.png"))
    print(f"{deck.name}: {len(indices)} slides, screenshot of slide {pick + 1}, "
          f"{'OK' if not problems else f'{len(problems)} problem(s)'}")
    page.close()
    return problems


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("decks", nargs="*", type=Path, help="default: slides/NN_*.slides.html")
    ap.add_argument("--all-shots", action="store_true", help="also save one screenshot per slide")
    ap.add_argument("--verbose", action="store_true", help="print the size of every slide")
    ap.add_argument("--shot", type=int, default=None, help="slide (1-based) of the per-deck screenshot; "
                    "default: the first slide with a figure")
    args = ap.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: install Chromium (sudo apt-get install chromium chromium-driver) "
              "or set CHROMIUM=/path/to/chromium")
        return 2
    decks = args.decks or sorted(SLIDES.glob("[0-9][0-9]_*.slides.html"))
    if not decks:
        print("no decks in slides/: run make slides")
        return 1
    from playwright.sync_api import sync_playwright

    shots = SLIDES / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    failed = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        for deck in decks:
            problems = check_deck(browser, deck.resolve(), shots, args.all_shots,
                                  None if args.shot is None else args.shot - 1, args.verbose)
            for p in problems:
                print(f"  {p}")
            failed += bool(problems)
        browser.close()
    print(f"{len(decks) - failed}/{len(decks)} decks OK; screenshots in {shots.relative_to(ROOT)}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
