"""Sphinx extension of the book: serve plotly.js from the site itself and load the book's stylesheet.

* Copies ``plotly.min.js`` from the installed ``plotly`` package into ``_static/vendor/`` of the HTML output, so
  the figures are drawn by exactly the plotly.js version that serialised them, with no CDN (offline site).
* Adds it, synchronously and before any other script, to the pages that hold a figure drawn by
  ``dsv3.viz.show`` (their HTML carries ``class="dsv3-plotly"``); other pages do not pay 5 MB for it.
* Adds ``dsv3.css`` (figure spacing, dark-mode text for plotly figures) to every page.
* ``read_notebook`` (set as the ``.ipynb`` reader through ``nb_custom_formats``) drops the plotly mimetype from
  outputs that also carry ``text/html``: myst-nb renders every mimetype of an output before it picks one, and
  warns ``mystnb.unknown_mime_type`` for the plotly JSON even though the HTML is the one it shows. An output that
  has *only* the plotly mimetype keeps it, so the warning still fires (and fails the ``-W`` build) for a figure
  that would vanish from the site.
* ``read_notebook`` also folds the labs' ``solution`` cells (book/CONTRIBUTING.md): a code cell gets myst-nb's
  ``hide-cell`` tag (input and output behind a "Show" toggle), a markdown cell is wrapped in a ``Solution``
  dropdown admonition.
* Writes the student copies of the chapters (``book/_tools/student.py``: no solutions) and their zip to
  ``_build/student/`` when the build starts, so the labs page offers the zip with a ``{download}`` link.
* The ``generated-markdown`` directive inserts the MyST text that a function returns, for pages whose tables are
  computed: ```` ```{generated-markdown} dsv3.viz.notation:notation_markdown``` ```` (an importable module) or
  ``book/_tools/run_notebook.py:timing_markdown`` (a file of the repository); ``:depends:`` names files whose change
  must rebuild the page.
* Removes duplicated inline scripts from each page. Sphinx 7.4 registers an inline script added with
  ``app.add_js_file(None, body=...)`` once under the name ``None`` and again under ``""`` (in
  ``prepare_writing``), so sphinx-thebe's ``const THEBE_JS_URL = ...`` ran twice and threw
  "Identifier 'THEBE_JS_URL' has already been declared" on every page (sphinx-togglebutton's selector too).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import nbformat
from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

PLOTLY_JS = "vendor/plotly.min.js"  # relative to _static
FIGURE_MARKER = 'class="dsv3-plotly"'
PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"
STUDENT_TOOL = Path(__file__).resolve().parents[1] / "_tools" / "student.py"


def _fold_solution(cell) -> None:
    """Collapse a cell tagged ``solution`` on the site (the student copies drop it)."""
    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
    if "solution" not in tags:
        return
    if cell.cell_type == "code":
        if not {"hide-cell", "hide-input", "remove-cell", "remove-input"} & set(tags):
            tags.append("hide-cell")
    elif cell.cell_type == "markdown":
        longest = max((len(run) for run in re.findall("`+", cell.source)), default=0)
        fence = "`" * max(3, longest + 1)
        cell.source = f"{fence}{{admonition}} Solution\n:class: dropdown\n\n{cell.source}\n{fence}"


def read_notebook(text: str) -> nbformat.NotebookNode:
    """Read an .ipynb for the site: like myst-nb's reader, minus plotly JSON that has an HTML twin, with the
    ``solution`` cells folded."""
    nb = nbformat.reads(text, as_version=4)
    for cell in nb.cells:
        _fold_solution(cell)
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if PLOTLY_MIMETYPE in data and "text/html" in data:
                del data[PLOTLY_MIMETYPE]
    return nb


def plotly_js_source() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise ExtensionError(f"dsv3_site: plotly.min.js not found at {path}; reinstall the plotly package")
    return path


def add_plotly_js(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    if FIGURE_MARKER in context.get("body", ""):
        # priority < 500: before require.js, MathJax and the theme's scripts; no defer: the inline figure scripts
        # below it in the page run after it has loaded.
        app.add_js_file(PLOTLY_JS, priority=100)


def dedupe_inline_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        key = (
            getattr(js, "filename", js) or "",
            getattr(js, "priority", 500),
            tuple(sorted(getattr(js, "attributes", {}).items())),
        )
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def copy_plotly_js(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / PLOTLY_JS
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(plotly_js_source(), tmp)
    tmp.replace(target)


class GeneratedMarkdown(SphinxDirective):
    """The MyST markdown returned by ``module:function`` (dotted module, or a ``.py`` path from the source root)."""

    required_arguments = 1
    option_spec = {"depends": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        target, _, name = self.arguments[0].rpartition(":")
        if not target or not name:
            raise self.error(f"generated-markdown: expected module:function, got {self.arguments[0]!r}")
        if target.endswith(".py"):
            file = Path(self.env.srcdir) / target
            self.env.note_dependency(str(file))
            spec = importlib.util.spec_from_file_location(f"dsv3_site_generated_{file.stem}", file)
            if spec is None or not file.is_file():
                raise self.error(f"generated-markdown: no such file {file}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
            self.env.note_dependency(module.__file__)
        for dep in (self.options.get("depends") or "").split():
            self.env.note_dependency(str(Path(self.env.srcdir) / dep))
        try:
            text = getattr(module, name)()
        except Exception as err:  # the page must say which generator failed, not only that the build did
            raise self.error(f"generated-markdown: {self.arguments[0]} raised {type(err).__name__}: {err}") from err
        container = nodes.container(classes=["dsv3-generated"])
        self.state.nested_parse(StringList(text.splitlines(), source=self.arguments[0]), self.content_offset, container)
        return [container]


def write_student_copies(app: Sphinx) -> None:
    """``_build/student/``: the chapters of the book being built without solutions, and the zip the labs page
    links to. A book without the tool (a test's probe book) gets none; a labs page there would fail the build on
    its missing download."""
    if not STUDENT_TOOL.is_file():
        return
    spec = importlib.util.spec_from_file_location("dsv3_book_student", STUDENT_TOOL)
    student = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(student)
    chapters = sorted((Path(app.srcdir) / "book").glob(student.CHAPTER_GLOB))
    student.write(chapters, Path(app.srcdir) / "_build" / "student")


def setup(app: Sphinx) -> dict:
    plotly_js_source()  # fail early, with the path, if plotly is missing
    app.add_css_file("dsv3.css")
    app.add_directive("generated-markdown", GeneratedMarkdown)
    app.connect("builder-inited", write_student_copies)
    app.connect("html-page-context", add_plotly_js)
    app.connect("html-page-context", dedupe_inline_scripts, priority=900)  # after every script is added
    app.connect("build-finished", copy_plotly_js)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
