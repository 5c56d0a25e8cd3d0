"""Start JupyterLab from the venv, open a stored notebook in headless Chromium, wait until its outputs are
rendered, take a screenshot (slides/screenshots/lab_<notebook>.png), check that the RISE extension
(jupyterlab-rise, live slides) is installed, and stop the server.

    python tools/check_lab.py                                  # notebooks/00_dino_v1_v2_v3.ipynb
    python tools/check_lab.py notebooks/02_rope.ipynb

Installs nothing: it needs Debian's Chromium (``sudo apt-get install chromium chromium-driver``, or
CHROMIUM=/path) and the ``playwright`` Python package of the test extras, which drives that binary.
The server listens on 127.0.0.1 on a free port with a random token; as root it adds --allow-root.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url} within {timeout:.0f} s")


def main(argv: list[str]) -> int:
    notebook = Path(argv[0]) if argv else ROOT / "notebooks" / "00_dino_v1_v2_v3.ipynb"
    notebook = notebook.resolve()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: install Chromium (sudo apt-get install chromium chromium-driver) "
              "or set CHROMIUM=/path/to/chromium")
        return 2
    from playwright.sync_api import sync_playwright

    shots = ROOT / "slides" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    base = f"http://127.0.0.1:{port}"
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        # a throw-away settings directory: no news prompt, and the user's own settings are left alone
        settings = Path(tmp) / "user-settings"
        (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
        (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        cmd = [str(VENV_BIN / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebook.parent}",
               f"--LabApp.workspaces_dir={tmp}", f"--LabApp.user_settings_dir={settings}", "--LabApp.news_url=None"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": tmp}
        log = open(Path(tmp) / "lab.log", "w")
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for_server(f"{base}/api/status?token={token}")
            # the RISE extension: its settings schema is served only when it is installed
            try:
                with urllib.request.urlopen(f"{base}/lab/api/settings/jupyterlab-rise:plugin?token={token}") as r:
                    rise = json.load(r).get("id") == "jupyterlab-rise:plugin"
            except OSError:
                rise = False
            if not rise:
                problems.append("jupyterlab-rise is not installed (make install: it is in pyproject.toml)")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.on("pageerror", lambda e: problems.append(f"JavaScript error: {e}"))

                def local_only(route):  # nothing outside this machine
                    if route.request.url.startswith(base):
                        route.continue_()
                    else:
                        route.abort()

                page.route("**/*", local_only)
                page.goto(f"{base}/lab/tree/{notebook.name}?token={token}")
                page.wait_for_selector(".jp-NotebookPanel .jp-OutputArea-output", timeout=120_000)
                page.wait_for_selector(".jp-NotebookPanel .jp-RenderedMarkdown h1", timeout=60_000)
                # JupyterLab renders only the cells near the viewport: walk down (command mode, "j") until the
                # first figure is rendered, so that the screenshot shows one
                page.click(".jp-NotebookPanel .jp-Cell .jp-InputArea")
                page.keyboard.press("Escape")
                n_images = 0
                for _ in range(80):
                    n_images = page.evaluate("() => document.querySelectorAll('.jp-NotebookPanel .jp-RenderedImage img').length")
                    if n_images:
                        break
                    page.keyboard.press("j")
                    page.wait_for_timeout(150)
                if n_images:
                    page.query_selector(".jp-NotebookPanel .jp-RenderedImage img").scroll_into_view_if_needed()
                    page.wait_for_timeout(1500)
                else:
                    problems.append("no figure was rendered")
                n_outputs = page.evaluate("() => document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output').length")
                broken = page.evaluate("""() => [...document.querySelectorAll('.jp-NotebookPanel img')]
                    .filter(i => i.complete && i.naturalWidth === 0).length""")
                if broken:
                    problems.append(f"{broken} image(s) did not render")
                shot = shots / f"lab_{notebook.stem}.png"
                page.screenshot(path=str(shot))
                browser.close()
            print(f"{notebook.name}: {n_outputs} outputs rendered on screen, RISE {'installed' if rise else 'missing'}, "
                  f"screenshot {shot.relative_to(ROOT)}")
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server we started and its kernels
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()
    for p in problems:
        print(f"  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
