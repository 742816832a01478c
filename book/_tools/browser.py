"""Look at built pages of the book in headless Chromium: figures drawn, math typeset, no errors, screenshots.

    python book/_tools/browser.py _build/html                 # every chapter page, screenshots in _build/screenshots
    python book/_tools/browser.py _build/html book/02_mla.html

Playwright for Python drives Debian's ``chromium`` (``executable_path``; ``playwright install`` is never run, so
nothing is downloaded). Every request that does not go to the local server is recorded as a problem and aborted, so
a page that needs a CDN fails loudly instead of working only when online. ``tests/test_site.py`` uses this module.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--no-default-browser-check",
]
CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
IGNORED_URLS = ("/favicon.ico",)  # browsers ask for it on their own; the book has none
LOCAL = ("http://127.0.0.1:", "data:", "blob:", "about:")


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), *CANDIDATES):
        if name and shutil.which(name):
            return shutil.which(name)
    raise FileNotFoundError(
        "no Chromium found (looked for $CHROMIUM, "
        + ", ".join(CANDIDATES)
        + "); on Debian/Ubuntu: apt-get install -y chromium (or `make browser`)"
    )


class Browser:
    """Headless Debian Chromium under Playwright (a context manager); ``open`` gives one ``Page`` per URL."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        self.timeout = timeout
        self._playwright = sync_playwright().start()
        try:
            self._browser = self._playwright.chromium.launch(
                executable_path=executable or find_chromium(), args=FLAGS, headless=True, timeout=timeout * 1000
            )
        except BaseException:
            self._playwright.stop()
            raise

    def open(self, url: str, width: int = 1280, height: int = 900) -> Page:
        context = self._browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        context.set_default_timeout(self.timeout * 1000)
        page = Page(context, url)
        page.pw.goto(url, wait_until="load")
        return page

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._playwright.stop()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    """A Playwright page (``.pw``) in its own browser context, with everything that went wrong on it recorded."""

    def __init__(self, context, url: str):
        self.context, self.url = context, url
        self._problems: list[str] = []
        context.route(lambda u: not u.startswith(LOCAL), self._block)
        self.pw = context.new_page()
        self.pw.on("pageerror", lambda err: self._problems.append(f"JS exception: {err}"))
        self.pw.on("console", self._console)
        self.pw.on("requestfailed", self._failed)
        self.pw.on("response", self._response)

    def _block(self, route) -> None:
        self._problems.append(f"request leaves the site: {route.request.url}")
        route.abort("blockedbyclient")

    def _console(self, msg) -> None:
        url = (msg.location or {}).get("url", "")
        if msg.type in ("error", "assert") and not url.endswith(IGNORED_URLS):
            self._problems.append(f"console.{msg.type}: {msg.text} {url}".rstrip())

    def _failed(self, request) -> None:
        error = request.failure or ""
        if not request.url.endswith(IGNORED_URLS) and "ERR_ABORTED" not in error and "BLOCKED_BY_CLIENT" not in error:
            self._problems.append(f"request failed: {request.url} ({error})")

    def _response(self, response) -> None:
        if response.status >= 400 and not response.url.endswith(IGNORED_URLS):
            self._problems.append(f"HTTP {response.status}: {response.url}")

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        """The value of a JavaScript expression (a promise is awaited), or of a function applied to ``arg``."""
        return self.pw.evaluate(expression, arg)

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        try:
            return self.pw.wait_for_function(expression, timeout=timeout * 1000).json_value()
        except PlaywrightError as err:
            raise TimeoutError(f"{self.url}: timed out waiting for {what or expression}") from err

    def problems(self) -> list[str]:
        """JavaScript errors, console errors, failed, refused or non-local requests seen by this page so far."""
        return list(self._problems)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the page (``full_page``: all of it, cut at 12000 px). Chromium lays the page out again for a
        full-page shot, so responsive figures see a resize: drive plotly's controls before, not after."""
        path.parent.mkdir(parents=True, exist_ok=True)
        clip = None
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            clip = {"x": 0, "y": 0, "width": size[0], "height": min(size[1], 12000)}
        self.pw.screenshot(path=str(path), full_page=full_page, clip=clip, timeout=60_000)
        return path

    def close(self) -> None:
        self.context.close()


# The figure text whose colour comes from the book's theme (axes, titles, legends, sliders, menus, annotations);
# the same selector as book/_static/dsv3.css. Data labels (bars, scatter text, heatmap cells, slices, tables) are
# coloured by plotly for contrast with their marker and are left out.
FIGURE_TEXT = (
    ".dsv3-figure .main-svg text:not(.bartext, .textpoint text, .hm text, .slicetext, .cell-text, "
    ".contourlabels text, .hoverlayer text)"
)

# What a book page must look like once its scripts have run. Returned as one JSON-able dict.
INSPECT_JS = r"""
(() => {
  const figures = [...document.querySelectorAll('.dsv3-plotly, .plotly-graph-div')];
  const drawn = figures.filter(d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg'));
  const math = [...document.querySelectorAll('.math')];
  const typeset = math.filter(m => m.querySelector('mjx-container'));
  const mathErrors = document.querySelectorAll('mjx-merror, [data-mjx-error]').length;
  const widgetViews = document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]').length;
  const widgets = document.querySelectorAll('.widget-subarea > .jupyter-widgets').length;  // drawn views
  const dropdowns = [...document.querySelectorAll('.admonition.dropdown, .toggle')];
  const hiddenSolutions = dropdowns.filter(d => {
    const body = [...d.children].filter(c => !c.matches('.admonition-title, button, summary, .toggle-button'));
    return body.length > 0 && body.every(c => !c.checkVisibility({visibilityProperty: true, opacityProperty: true})
                                              || c.getBoundingClientRect().height === 0);
  }).length;
  const luminance = (el) => {
    const m = getComputedStyle(el).fill.match(/[\d.]+/g);
    if (!m) return null;
    const [r, g, b] = m.slice(0, 3).map(Number);
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
  };
  const texts = [...document.querySelectorAll('FIGURE_TEXT')].filter(t => t.textContent.trim());
  const lum = texts.map(luminance).filter(v => v !== null);
  return {
    title: document.title,
    figures: figures.length, drawn: drawn.length,
    math: math.length, typeset: typeset.length, mathErrors,
    widgetViews, widgets,
    dropdowns: dropdowns.length, hiddenSolutions,
    figureTextLuminance: lum.length ? [Math.min(...lum), Math.max(...lum)] : null,
    theme: document.documentElement.dataset.theme || null,
  };
})()
""".replace("FIGURE_TEXT", FIGURE_TEXT)

MATHJAX_READY_JS = (
    "(window.MathJax && MathJax.startup && MathJax.startup.promise) ? MathJax.startup.promise.then(() => true) : true"
)
FINISHED_JS = (
    f"(() => {{ const r = {INSPECT_JS.strip()};"
    " return r.drawn === r.figures && r.typeset === r.math && r.widgets >= r.widgetViews; })()"
)


def settle(page: Page, timeout: float = 30.0) -> dict:
    """Wait until MathJax, plotly and the widget manager have finished; return ``INSPECT_JS``'s report."""
    page.evaluate(MATHJAX_READY_JS)
    try:
        page.pw.wait_for_function(FINISHED_JS, timeout=timeout * 1000, polling=100)
    except PlaywrightError as err:
        raise TimeoutError(
            f"{page.url}: not finished after {timeout:.0f} s: {page.evaluate(INSPECT_JS)}; {page.problems()}"
        ) from err
    time.sleep(0.3)  # let late console errors and requests arrive
    return page.evaluate(INSPECT_JS)


def set_theme(page: Page, mode: str) -> dict:
    """Switch the page between the theme's light and dark mode (what its toggle button does)."""
    page.evaluate(
        f"document.documentElement.dataset.theme = '{mode}';document.documentElement.dataset.mode = '{mode}';"
    )
    time.sleep(0.2)
    return page.evaluate(INSPECT_JS)


# --- plotly's own controls, driven the way a reader drives them ------------------------------------------------

# The figure's state that its controls change: the active step of each slider, and whether every trace that a
# frame names holds that frame's data (``shows``: frame name -> bool, for every frame of the figure).
FIGURE_STATE_JS = """(i) => {
  const gd = document.querySelectorAll('.dsv3-plotly')[i];
  const same = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
  const frames = (gd._transitionData && gd._transitionData._frames) || [];
  const shows = Object.fromEntries(frames.map(f => [f.name, f.data.every((t, k) => {
    const d = gd.data[f.traces ? f.traces[k] : k];
    return d && ['x', 'y', 'z'].every(a => !(a in t) || same([...d[a]], [...t[a]]));
  })]));
  return {active: (gd.layout.sliders || []).map(s => s.active || 0), shows,
          data: JSON.stringify(gd.data.map(t => [t.x, t.y, t.z, t.visible]))};
}"""


def figure_controls(page: Page) -> list[dict]:
    """For every figure of the page: its sliders (their steps' frame names, for animating steps), its frames and
    its updatemenu buttons (``play``: the labels of those that animate through several frames)."""
    return page.evaluate("""() => [...document.querySelectorAll('.dsv3-plotly')].map((gd, i) => {
      const buttons = (gd.layout.updatemenus || []).flatMap(m => m.buttons || []);
      const many = b => b.method === 'animate' && (b.args[0] === null || (Array.isArray(b.args[0])
                                                                          && b.args[0].length > 1));
      return {index: i,
              sliders: (gd.layout.sliders || []).map(s => s.steps.map(st => st.method === 'animate'
                                                                              ? String(st.args[0][0]) : null)),
              frames: ((gd._transitionData && gd._transitionData._frames) || []).map(f => f.name),
              buttons: buttons.map(b => b.label), play: buttons.filter(many).map(b => b.label)};
    })""")


def drag_slider(page: Page, figure: int, to: float = 1.0) -> dict:
    """Drag the first slider of figure ``figure`` with the mouse from its grip to the fraction ``to`` of its rail;
    returns the figure's state (``FIGURE_STATE_JS``) once plotly has applied the step."""
    gd = page.pw.locator(".dsv3-plotly").nth(figure)
    gd.scroll_into_view_if_needed()
    grip = gd.locator(".slider-grip-rect").first.bounding_box()
    rail = gd.locator(".slider-rail-rect").first.bounding_box()
    y = grip["y"] + grip["height"] / 2
    page.pw.mouse.move(grip["x"] + grip["width"] / 2, y)
    page.pw.mouse.down()
    page.pw.mouse.move(rail["x"] + to * rail["width"], y, steps=8)
    page.pw.mouse.up()
    time.sleep(0.5)  # the step's transition, if any
    return page.evaluate(FIGURE_STATE_JS, figure)


def click_button(page: Page, figure: int, label: str, timeout: float = 60.0) -> dict:
    """Click the updatemenu button ``label`` of figure ``figure`` (e.g. Play) and wait for the animation it starts to
    end; returns the figure's state (``FIGURE_STATE_JS``) with ``played``, the names of the frames it showed."""
    gd = page.pw.locator(".dsv3-plotly").nth(figure)
    gd.scroll_into_view_if_needed()
    page.evaluate(
        """(i) => { const gd = document.querySelectorAll('.dsv3-plotly')[i];
      window.__dsv3_played = []; window.__dsv3_animated = false;
      gd.on('plotly_animatingframe', e => window.__dsv3_played.push(e.name));
      gd.on('plotly_animated', () => { window.__dsv3_animated = true; }); }""",
        figure,
    )
    gd.locator(".updatemenu-button").filter(has_text=label).first.click()
    page.wait_for("window.__dsv3_animated === true", timeout=timeout, what=f"the {label!r} animation to end")
    time.sleep(0.5)  # the slider's grip follows the last frame with a transition of its own
    return {**page.evaluate(FIGURE_STATE_JS, figure), "played": page.evaluate("window.__dsv3_played")}


# --- the site -------------------------------------------------------------------------------------------------


class SiteServer:
    """``http://127.0.0.1:<port>/`` serving a built site from a thread (a context manager)."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> SiteServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def chapter_pages(html: Path) -> list[str]:
    return sorted(p.relative_to(html).as_posix() for p in (html / "book").glob("*.html"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the built site, e.g. _build/html")
    parser.add_argument("pages", nargs="*", help="pages relative to the site root (default: book/*.html)")
    parser.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    args = parser.parse_args(argv)
    failed = False
    with SiteServer(args.html) as server, Browser() as browser:
        for rel in args.pages or chapter_pages(args.html):
            page = browser.open(server.url + rel)
            report = settle(page)
            name = rel.replace("/", "_").removesuffix(".html")
            page.screenshot(args.screenshots / f"{name}-light.png")
            report["dark"] = set_theme(page, "dark")["figureTextLuminance"]
            page.screenshot(args.screenshots / f"{name}-dark.png")
            report["controls"] = [
                {
                    "figure": c["index"],
                    "slider steps": [len(s) for s in c["sliders"]],
                    "frames": len(c["frames"]),
                    "buttons": c["buttons"],
                }
                for c in figure_controls(page)
                if c["sliders"] or c["buttons"]
            ]
            problems = page.problems()
            failed |= bool(problems)
            print(rel, json.dumps(report))
            for p in problems:
                print("   ", p)
            page.close()
    print(f"screenshots in {args.screenshots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
