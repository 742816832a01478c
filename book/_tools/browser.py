"""Look at built pages of the book in headless Chromium: figures drawn, math typeset, no errors, screenshots.

    python book/_tools/browser.py _build/html                 # every chapter page, screenshots in _build/screenshots
    python book/_tools/browser.py _build/html book/02_mla.html

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: NUL-separated JSON on
file descriptors 3 and 4), so nothing but the Python standard library and Debian's ``chromium`` is needed, and no
port is opened. Host names other than 127.0.0.1 do not resolve inside the browser, so a page that tries to reach
a CDN fails loudly instead of working only when online. ``tests/test_site.py`` uses this module.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
         "--no-default-browser-check", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
IGNORED_URLS = ("/favicon.ico",)  # browsers ask for it on their own; the book has none


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM"), *CANDIDATES):
        if name and shutil.which(name):
            return shutil.which(name)
    raise FileNotFoundError("no Chromium found (looked for $CHROMIUM, " + ", ".join(CANDIDATES)
                            + "); on Debian/Ubuntu: apt-get install -y chromium")


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium speaking the DevTools protocol over a pipe."""

    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="dsv3-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # High descriptor numbers, so that dup2 onto 3 and 4 in the child cannot overwrite one of them.
        hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 100)
        hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 100)
        os.close(to_child_r), os.close(from_child_w)

        def child_fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [executable or find_chromium(), *FLAGS, f"--user-data-dir={self._profile.name}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, pass_fds=(3, 4),
            preexec_fn=child_fds)
        os.close(hi_r), os.close(hi_w)
        self._next_id = 0
        self._lock = threading.Condition()
        self._results: dict[int, dict] = {}
        self.events: list[dict] = []
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send("Browser.getVersion")

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._lock:
                    self._closed = True
                    self._lock.notify_all()
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._lock:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._results[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._lock.notify_all()

    def _wait(self, ready: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = ready()
                if value:
                    return value
                if self._closed:
                    raise CDPError(f"Chromium exited while waiting for {what}: {self.log()[-2000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
                self._lock.wait(left)

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        with self._lock:
            self._next_id += 1
            msg_id = self._next_id
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        reply = self._wait(lambda: self._results.pop(msg_id, None), timeout or self.timeout, method)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str | None, timeout: float | None = None) -> dict:
        def found():
            return next((e for e in self.events if e["method"] == method and e.get("sessionId") == session), None)
        return self._wait(found, timeout or self.timeout, method)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def open(self, url: str, width: int = 1280, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        page = Page(self, target, session, url)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_event("Page.loadEventFired", session)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close", timeout=5)
            except (CDPError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self._to_child)
        self._reader.join(5)
        os.close(self._from_child)
        self._log.close()
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, target: str, session: str, url: str):
        self.browser, self.target, self.session, self.url = browser, target, session, url
        self.origin = url.split("/", 3)[:3]

    def evaluate(self, expression: str, await_promise: bool = False, timeout: float | None = None) -> Any:
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": await_promise}, self.session, timeout)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}: timed out waiting for {what or expression}")
            time.sleep(0.1)

    def events(self, method: str) -> list[dict]:
        with self.browser._lock:
            return [e["params"] for e in self.browser.events
                    if e["method"] == method and e.get("sessionId") == self.session]

    def problems(self) -> list[str]:
        """JavaScript errors, console errors, failed or non-local requests seen by this page so far."""
        local = "/".join(self.origin) + "/"
        found = []
        for p in self.events("Runtime.exceptionThrown"):
            d = p["exceptionDetails"]
            found.append(f"JS exception: {d.get('exception', {}).get('description') or d.get('text')}")
        for p in self.events("Runtime.consoleAPICalled"):
            if p["type"] in ("error", "assert"):
                found.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                          for a in p["args"]))
        for p in self.events("Log.entryAdded"):
            e = p["entry"]
            if e["level"] == "error" and not e.get("url", "").endswith(IGNORED_URLS):
                found.append(f"browser log error: {e['text']} {e.get('url', '')}")
        for p in self.events("Network.requestWillBeSent"):
            url = p["request"]["url"]
            if not url.startswith((local, "data:", "blob:", "about:")):
                found.append(f"request leaves the site: {url}")
        urls = {p["requestId"]: p["request"]["url"] for p in self.events("Network.requestWillBeSent")}
        for p in self.events("Network.loadingFailed"):
            url = urls.get(p["requestId"], "?")
            if not url.endswith(IGNORED_URLS) and not p.get("canceled"):
                found.append(f"request failed: {url} ({p.get('errorText')})")
        for p in self.events("Network.responseReceived"):
            r = p["response"]
            if r["status"] >= 400 and not r["url"].endswith(IGNORED_URLS):
                found.append(f"HTTP {r['status']}: {r['url']}")
        return found

    def screenshot(self, path: Path, full_page: bool = True, width: int = 1280, height: int = 900) -> Path:
        """A PNG of the page; ``full_page`` makes the viewport as tall as the page (at most 12000 px) first."""
        if full_page:
            tall = self.evaluate("document.documentElement.scrollHeight")
            self.browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": min(int(tall), 12000),
                                                                     "deviceScaleFactor": 1, "mobile": False},
                              self.session)
            time.sleep(0.3)  # responsive plotly figures redraw on resize
        data = self.browser.send("Page.captureScreenshot", {"format": "png"}, self.session, timeout=60)["data"]
        if full_page:
            self.browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                     "deviceScaleFactor": 1, "mobile": False},
                              self.session)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        self.browser.send("Target.closeTarget", {"targetId": self.target})


# The figure text whose colour comes from the book's theme (axes, titles, legends, sliders, menus, annotations);
# the same selector as book/_static/dsv3.css. Data labels (bars, scatter text, heatmap cells, slices, tables) are
# coloured by plotly for contrast with their marker and are left out.
FIGURE_TEXT = (".dsv3-figure .main-svg text:not(.bartext, .textpoint text, .hm text, .slicetext, .cell-text, "
               ".contourlabels text, .hoverlayer text)")

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

MATHJAX_READY_JS = ("(window.MathJax && MathJax.startup && MathJax.startup.promise)"
                    " ? MathJax.startup.promise.then(() => true) : true")


def settle(page: Page, timeout: float = 30.0) -> dict:
    """Wait until MathJax, plotly and the widget manager have finished; return ``INSPECT_JS``'s report."""
    page.evaluate(MATHJAX_READY_JS, await_promise=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        report = page.evaluate(INSPECT_JS)
        if (report["drawn"] == report["figures"] and report["typeset"] == report["math"]
                and report["widgets"] >= report["widgetViews"]):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{page.url}: not finished after {timeout:.0f} s: {report}; {page.problems()}")
        time.sleep(0.1)
    time.sleep(0.3)  # let late console errors and requests arrive
    return page.evaluate(INSPECT_JS)


def set_theme(page: Page, mode: str) -> dict:
    """Switch the page between the theme's light and dark mode (what its toggle button does)."""
    page.evaluate(f"document.documentElement.dataset.theme = '{mode}';"
                  f"document.documentElement.dataset.mode = '{mode}';")
    time.sleep(0.2)
    return page.evaluate(INSPECT_JS)


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
