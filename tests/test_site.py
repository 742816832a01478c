"""The book's website: it builds with warnings as errors, it is self-contained, and in a real browser (headless
Chromium, offline) every figure is drawn, every equation typeset, every widget shown, with no JavaScript error.

The site is built once per session from a fresh Sphinx environment into a temporary folder
(``jupyter-book build . -W -n --keep-going --path-output <tmp>``), so an earlier incremental build can neither
hide a warning nor be overwritten. Screenshots (light and dark) of every page go to ``_build/screenshots/``.
The browser is Debian's ``chromium`` (``make browser``, or ``$CHROMIUM``) driven by Playwright
(``book/_tools/browser.py``); a chapter's plotly slider is dragged and its play button clicked with the mouse.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import plotly
import pytest
import yaml

from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "_build" / "screenshots"
PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


browser_tools = load_tool("dsv3_book_browser", "book/_tools/browser.py")
vendor_js = load_tool("dsv3_book_vendor_js", "book/_tools/vendor_js.py")
run_notebook = load_tool("dsv3_book_run_notebook", "book/_tools/run_notebook.py")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    walk(toc.get("chapters"))
    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    return files


TOC = toc_files()


def build(source: Path, out: Path) -> subprocess.CompletedProcess:
    """``jupyter-book build <source> -W -n --keep-going`` with a fresh environment, output under ``out``."""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
        "build",
        str(source),
        "-W",
        "-n",
        "--keep-going",
        "--all",
        "--path-output",
        str(out),
    ]
    return subprocess.run(cmd, cwd=source, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(ROOT, out)
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, "site build failed:\n" + "\n".join(warnings or log.splitlines()[-40:])
    return out / "_build" / "html"


@pytest.fixture(scope="session")
def chromium():
    try:
        executable = browser_tools.find_chromium()
    except FileNotFoundError as err:
        pytest.fail(f"{err} (the site test needs a browser; CI installs it)")
    with browser_tools.Browser(executable) as browser:
        yield browser


@pytest.fixture(scope="session")
def server(site):
    with browser_tools.SiteServer(site) as srv:
        yield srv


# --- the table of contents and the build ----------------------------------------------------------------------


def test_toc_lists_exactly_the_chapters_that_exist():
    chapters = sorted(f"book/{p.stem}" for p in (ROOT / "book").glob(run_notebook.CHAPTER_GLOB))
    listed = [name for name in TOC if (ROOT / f"{name}.ipynb").is_file()]
    assert sorted(listed) == chapters, "_toc.yml must list every book/NN_*.ipynb"
    assert listed == sorted(listed), "_toc.yml lists the chapters in their numbered order"
    pages = [name for name in TOC if name not in listed]
    missing = [name for name in pages if not (ROOT / f"{name}.md").is_file()]
    assert missing == [], f"_toc.yml lists pages that do not exist: {missing}"
    assert len(set(TOC)) == len(TOC)


def test_reference_pages_are_listed():
    for page in (
        "book/bibliography",
        "book/glossary",
        "book/notation",
        "book/prerequisites",
        "book/labs",
        "book/timings",
    ):
        assert page in TOC, f"{page} is missing from _toc.yml"


def test_vendored_javascript_is_pinned_and_unmodified():
    assert vendor_js.check() == []


@pytest.mark.slow
def test_every_toc_page_is_built(site):
    for name in TOC:
        assert (site / f"{name}.html").is_file(), f"{name}.html missing from the build"
    assert (site / "search.html").is_file() and (site / "searchindex.js").is_file()  # search works offline
    assert not (site / "book" / "CONTRIBUTING.html").exists() and not (site / "README.html").exists()


@pytest.mark.slow
def test_reference_pages_hold_what_they_promise(site):
    """Bibliography (every entry of references.bib), glossary, the generated notation and timing tables, the
    student zip behind the labs page's download link."""
    from dsv3.config import ModelConfig

    bib = (site / "book" / "bibliography.html").read_text()
    keys = re.findall(r"^@\w+\{(\w+),", (ROOT / "book" / "references.bib").read_text(), flags=re.M)
    assert len(keys) >= 15 and bib.count('role="doc-biblioentry"') == len(keys)
    assert "DeepSeek-V3 technical report" in bib and "Auxiliary-loss-free load balancing" in bib
    assert 'class="simple glossary"' in (site / "book" / "glossary.html").read_text()
    notation = (site / "book" / "notation.html").read_text()
    assert f"<p>{ModelConfig.deepseek_v3().kv_lora_rank}</p></td>" in notation  # computed when the page is built
    timings = (site / "book" / "timings.html").read_text()
    assert "01_overview" in timings and ("not measured yet" in timings or " s<" in timings)
    zips = list((site / "_downloads").glob("*/dsv3-book-student.zip"))
    assert len(zips) == 1 and 'dsv3-book-student.zip"' in (site / "book" / "labs.html").read_text()


@pytest.mark.slow
def test_site_serves_the_installed_plotly_js(site):
    served = site / "_static" / "vendor" / "plotly.min.js"
    installed = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert served.read_bytes() == installed.read_bytes()


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.urls.append(a["src"])
        if tag == "link" and "stylesheet" in (a.get("rel") or "") and a.get("href"):
            self.urls.append(a["href"])
        if tag == "link" and a.get("rel") == "preload" and a.get("href"):
            self.urls.append(a["href"])


@pytest.mark.slow
def test_pages_load_scripts_and_styles_only_from_the_site(site):
    pages = [p for p in sorted(site.rglob("*.html")) if p.relative_to(site).parts[0] not in ("_static", "_sources")]
    assert len(pages) >= len(TOC)
    for page in pages:
        parser = _Assets()
        parser.feed(page.read_text(encoding="utf-8"))
        for url in parser.urls:
            parts = urlsplit(url)
            assert not parts.scheme and not parts.netloc, f"{page.relative_to(site)} loads {url} from outside"
            target = (page.parent / parts.path).resolve()
            assert target.is_file(), f"{page.relative_to(site)} loads {url}, which is not in the site"


@pytest.mark.slow
def test_plotly_only_output_fails_the_build(tmp_path):
    """A figure that the site cannot draw (plotly mimetype, no HTML) must fail the -W build, not vanish."""
    book = _probe_book(
        tmp_path,
        [
            nbformat.v4.new_code_cell(
                "fig",
                execution_count=1,
                outputs=[
                    nbformat.v4.new_output(
                        "display_data", data={PLOTLY_MIMETYPE: {"data": [], "layout": {}}, "text/plain": "Figure()"}
                    )
                ],
            )
        ],
    )
    result = build(book, tmp_path / "out")
    assert result.returncode != 0
    assert "unknown output mime type: application/vnd.plotly.v1+json" in result.stdout + result.stderr


# --- in the browser -------------------------------------------------------------------------------------------


def expected_outputs(notebook: Path) -> dict:
    """What the page of ``notebook`` must show: its figures and widget views (none on a markdown page)."""
    if not notebook.is_file():
        return {"figures": 0, "widgets": 0}
    nb = nbformat.read(notebook, as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    return {
        "figures": sum(PLOTLY_MIMETYPE in o.get("data", {}) for o in outputs),
        "widgets": sum(WIDGET_VIEW in o.get("data", {}) for o in outputs),
    }


def look_at(chromium, url: str, shot_name: str, then=None) -> tuple[dict, dict, list[str]]:
    """Report of the page in light and dark mode, its problems, screenshots; ``then(page)`` runs once the page has
    settled, before the first screenshot (a full-page shot resizes the page, see ``browser.Page.screenshot``)."""
    page = chromium.open(url)
    try:
        light = browser_tools.settle(page)
        if then is not None:
            then(page)
        page.screenshot(SCREENSHOTS / f"{shot_name}-light.png")
        dark = browser_tools.set_theme(page, "dark")
        page.screenshot(SCREENSHOTS / f"{shot_name}-dark.png")
        return light, dark, page.problems()
    finally:
        page.close()


def check_report(light: dict, dark: dict, problems: list[str], expected: dict) -> None:
    assert problems == []
    assert light["figures"] == expected["figures"], "a figure of the notebook is missing from the page"
    assert light["drawn"] == light["figures"], "plotly did not draw every figure"
    assert light["typeset"] == light["math"] and light["mathErrors"] == 0, "MathJax did not typeset every equation"
    assert light["widgetViews"] == expected["widgets"] and light["widgets"] >= light["widgetViews"]
    assert light["hiddenSolutions"] == light["dropdowns"], "a solution is visible before it is asked for"
    if light["figures"]:
        low, high = light["figureTextLuminance"]
        assert high < 0.5, "figure text must be dark on the light page"
        low, high = dark["figureTextLuminance"]
        assert low > 0.6, "figure text must be light on the dark page"


@pytest.mark.slow
@pytest.mark.parametrize("name", TOC)
def test_page_renders_in_chromium(site, server, chromium, name):
    light, dark, problems = look_at(chromium, server.url + f"{name}.html", name.replace("/", "_"))
    check_report(light, dark, problems, expected_outputs(ROOT / f"{name}.ipynb"))


@pytest.mark.slow
def test_preface_exercises_the_whole_plumbing(site, server, chromium):
    """The preface has at least one figure, one equation and one hidden solution, and the solution opens."""
    page = chromium.open(server.url + "book/00_preface.html")
    try:
        report = browser_tools.settle(page)
        assert report["figures"] >= 1 and report["math"] >= 1 and report["dropdowns"] >= 1
        page.evaluate("document.querySelector('.admonition.dropdown .toggle-button').click()")
        opened = page.wait_for(
            "(() => { const d = document.querySelector('.admonition.dropdown');"
            " return [...d.children].slice(1).every(c => c.getBoundingClientRect().height > 0)"
            " })()",
            what="the solution to open",
        )
        assert opened and page.problems() == []
    finally:
        page.close()


@pytest.mark.slow
def test_browser_reports_every_kind_of_problem(tmp_path, chromium):
    """The checks above can fail: a request to another host (refused, never sent), a JavaScript exception, a
    console error and a missing local file each show up in ``problems()``."""
    (tmp_path / "index.html").write_text(
        "<html><body><p>probe</p>"
        '<script src="https://cdn.example.com/lib.js"></script>'
        '<img src="missing.png">'
        "<script>console.error('logged on purpose'); null.boom;</script></body></html>"
    )
    with browser_tools.SiteServer(tmp_path) as srv:
        page = chromium.open(srv.url + "index.html")
        try:
            page.wait_for("document.readyState === 'complete'")
            time.sleep(0.5)
            problems = "\n".join(page.problems())
        finally:
            page.close()
    assert "request leaves the site: https://cdn.example.com/lib.js" in problems
    assert "JS exception:" in problems and "null" in problems
    assert "console.error: logged on purpose" in problems
    assert "HTTP 404:" in problems and "missing.png" in problems


# --- plotly's controls on the chapters, driven with the mouse --------------------------------------------------


def open_chapter_with(site: Path, server, chromium, wanted):
    """The first chapter page (toc order) with a figure whose controls ``wanted(controls)`` accepts:
    ``(name, page, controls)``; the caller closes the page."""
    for name in TOC:
        html = (site / f"{name}.html").read_text(encoding="utf-8")
        if "sliders" not in html and "updatemenus" not in html:
            continue
        page = chromium.open(server.url + f"{name}.html")
        browser_tools.settle(page)
        for controls in browser_tools.figure_controls(page):
            if wanted(controls):
                return name, page, controls
        page.close()
    pytest.fail("no chapter has a figure with the control this test drives")


def _animating_slider(c: dict) -> bool:
    return bool(c["sliders"]) and len(c["sliders"][0]) > 1 and None not in c["sliders"][0]


@pytest.mark.slow
def test_dragging_a_chapter_slider_shows_its_frames(site, server, chromium):
    """Drag the grip of a chapter's plotly slider to the start of its rail, then to the end: the figure shows the
    first step's frame, then the last one's (the static page animates between stored frames)."""
    name, page, controls = open_chapter_with(site, server, chromium, _animating_slider)
    try:
        steps, figure = controls["sliders"][0], controls["index"]
        first = browser_tools.drag_slider(page, figure, 0.0)
        assert first["active"][0] == 0 and first["shows"][steps[0]], f"{name}: the slider did not go to its start"
        last = browser_tools.drag_slider(page, figure, 1.0)
        assert last["active"][0] == len(steps) - 1 and last["shows"][steps[-1]], f"{name}: not at the last step"
        assert last["data"] != first["data"], f"{name}: dragging the slider changed nothing on the figure"
        page.screenshot(SCREENSHOTS / f"{name.replace('/', '_')}-slider.png", full_page=False)
        assert page.problems() == []
    finally:
        page.close()


@pytest.mark.slow
def test_play_button_of_a_chapter_plays_every_frame(site, server, chromium):
    """Click a chapter's plotly play button: every frame is shown in order, and the figure stops on the last."""
    name, page, controls = open_chapter_with(site, server, chromium, lambda c: bool(c["play"]))
    try:
        figure, frames = controls["index"], controls["frames"]
        if _animating_slider(controls):  # start from the first frame, so that the end state is a change
            browser_tools.drag_slider(page, figure, 0.0)
        state = browser_tools.click_button(page, figure, controls["play"][0])
        assert state["played"] == frames, f"{name}: the play button did not show every frame in order"
        assert state["shows"][frames[-1]], f"{name}: the figure did not stop on the last frame"
        if _animating_slider(controls):
            assert state["active"][0] == len(controls["sliders"][0]) - 1, f"{name}: the slider did not follow"
        page.screenshot(SCREENSHOTS / f"{name.replace('/', '_')}-played.png", full_page=False)
        assert page.problems() == []
    finally:
        page.close()


# --- a probe book: widgets, sliders and animation frames through the same configuration -------------------------


def _probe_book(tmp_path: Path, cells: list) -> Path:
    """A one-page book under ``tmp_path/book_src`` with this repository's configuration and extension."""
    src = tmp_path / "book_src"
    (src / "book").mkdir(parents=True)
    shutil.copy(ROOT / "_config.yml", src / "_config.yml")
    shutil.copy(ROOT / "book" / "references.bib", src / "book" / "references.bib")  # named by _config.yml
    shutil.copytree(ROOT / "book" / "_ext", src / "book" / "_ext")
    shutil.copytree(ROOT / "book" / "_static", src / "book" / "_static")
    (src / "_toc.yml").write_text("format: jb-book\nroot: book/probe\n")
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# Probe\n\nInline $x^2$ and\n\n$$\\sum_{i=1}^n i = \\frac{n(n+1)}{2}$$"),
            *cells,
        ]
    )
    nbformat.write(nb, src / "book" / "probe.ipynb")
    return src


PROBE_CELLS = [
    "# NBVAL_IGNORE_OUTPUT\nimport sys\nfrom dsv3.viz import setup_notebook, show\ndevice, BIG = setup_notebook()",
    """import plotly.graph_objects as go
from dsv3.viz import figure
xs = [i / 10 for i in range(11)]
fig = figure(title="y = x^k", height=360)
fig.add_scatter(x=xs, y=xs, name="k=1")
fig.frames = [go.Frame(data=[go.Scatter(x=xs, y=[x ** k for x in xs])], name=str(k)) for k in range(1, 4)]
fig.update_layout(
    sliders=[dict(steps=[dict(label=str(k), method="animate", args=[[str(k)], dict(mode="immediate")])
                         for k in range(1, 4)])],
    updatemenus=[dict(type="buttons", buttons=[dict(label="Play", method="animate", args=[None])])])
show(fig)""",
    """import ipywidgets as w
slider = w.IntSlider(value=3, min=1, max=5, description="k")
out = w.Output()
with out:
    print("k =", slider.value)
w.VBox([slider, out])""",
]


@pytest.mark.slow
def test_probe_page_draws_widgets_sliders_and_frames(tmp_path, chromium):
    book = _probe_book(tmp_path, [nbformat.v4.new_code_cell(src) for src in PROBE_CELLS])
    notebook = book / "book" / "probe.ipynb"
    run_notebook.execute(notebook, timeout=300)
    assert run_notebook.problems(notebook) == []
    result = build(book, tmp_path / "out")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    html = tmp_path / "out" / "_build" / "html"

    def sliders_frames_and_widgets(page):
        counts = page.evaluate(
            "({sliders: document.querySelectorAll('.dsv3-plotly .slider-container').length,"
            " menus: document.querySelectorAll('.dsv3-plotly .updatemenu-container').length,"
            " frames: document.querySelector('.dsv3-plotly')._transitionData._frames.length,"
            " slider: document.querySelector('.widget-subarea .widget-slider') !== null,"
            " text: document.querySelector('.widget-subarea .widget-output')"
            "?.textContent.trim()})"
        )
        assert counts == {"sliders": 1, "menus": 1, "frames": 3, "slider": True, "text": "k = 3"}
        # Go to the last frame, as the slider does: the static page recomputes nothing, it animates.
        played = browser_tools.click_button(page, 0, "Play")  # the play button shows every frame, in order
        assert played["played"] == ["1", "2", "3"] and played["shows"]["3"]
        first = browser_tools.drag_slider(page, 0, 0.0)  # drag the slider back to k = 1
        assert first["active"] == [0] and first["shows"]["1"] and not first["shows"]["3"]
        assert page.evaluate("document.querySelector('.dsv3-plotly').data[0].y[5]") == pytest.approx(0.5)
        last = browser_tools.drag_slider(page, 0, 1.0)  # and on to k = 3: y = x^3
        assert last["active"] == [2] and last["shows"]["3"]
        assert page.evaluate("document.querySelector('.dsv3-plotly').data[0].y[5]") == pytest.approx(0.125)

    with browser_tools.SiteServer(html) as srv:
        light, dark, problems = look_at(chromium, srv.url + "book/probe.html", "probe", then=sliders_frames_and_widgets)
    check_report(light, dark, problems, {"figures": 1, "widgets": 1})
    assert light["math"] == 2
