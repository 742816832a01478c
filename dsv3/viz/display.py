"""How the book shows a plotly figure, and the first cell of every chapter.

``show(fig)`` emits one MIME bundle that works everywhere the book is read:

* ``application/vnd.plotly.v1+json``: JupyterLab, Notebook 7 and VS Code draw this with their plotly renderer, even
  in an untrusted notebook.
* ``text/html``: a ``<div>`` plus a ``<script>`` that draws with the page's global ``Plotly``. The static site
  (myst-nb renders ``text/html``, never the plotly mimetype) loads ``plotly.min.js`` from its own ``_static``, so
  the pages work offline. The div id is a hash of the figure, so the committed outputs are byte-stable and
  nbval compares them exactly.
* ``text/plain``: a one-line summary (title, traces, frames, sliders), the readable part of an nbval diff.

On Colab (``"google.colab" in sys.modules``) neither of the first two renders, so ``show`` hands the figure to
plotly's own ``colab`` renderer. ``DSV3_PLOTLY_RENDERER=<name>`` forces any plotly renderer (e.g. ``notebook``
for the legacy classic notebook).

``theme`` is the plotly template of every figure in the book: transparent background, neutral grid, a colorway
of mid-luminance colors, so figures read on a white page and on a dark one (``book/_static/dsv3.css`` recolors
the text in dark mode).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any, NamedTuple

import plotly.graph_objects as go
import plotly.io as pio

PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"

# Mid-luminance colors (Tailwind 500/600 shades): enough contrast on white and on the dark theme's #121212.
COLORS = {
    "blue": "#3b82f6",
    "orange": "#f59e0b",
    "green": "#10b981",
    "red": "#ef4444",
    "violet": "#8b5cf6",
    "cyan": "#06b6d4",
    "pink": "#ec4899",
    "lime": "#84cc16",
    "slate": "#64748b",
}
COLORWAY = list(COLORS.values())
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"
TEXT = "#4b5563"  # dark grey text for light pages; the site's CSS lightens it in dark mode
GRID = "rgba(128, 128, 128, 0.25)"  # neutral on white and on black
LINE = "rgba(128, 128, 128, 0.6)"

# Passed to Plotly.newPlot (and stored with the plotly mimetype for JupyterLab).
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def _axis() -> dict:
    return dict(
        gridcolor=GRID, zerolinecolor=LINE, linecolor=LINE, tickcolor=LINE, automargin=True, title=dict(standoff=8)
    )


def _make_theme() -> go.layout.Template:
    control = dict(bgcolor="rgba(128, 128, 128, 0.15)", bordercolor=LINE, font=dict(color=TEXT))
    return go.layout.Template(
        layout=dict(
            font=dict(family=FONT, size=13, color=TEXT),
            title=dict(x=0.0, xanchor="left", font=dict(size=15)),
            colorway=COLORWAY,
            paper_bgcolor="rgba(0, 0, 0, 0)",  # transparent: the page's own background shows through
            plot_bgcolor="rgba(0, 0, 0, 0)",
            xaxis=_axis(),
            yaxis=_axis(),
            legend=dict(bgcolor="rgba(0, 0, 0, 0)"),
            hoverlabel=dict(font=dict(family=FONT)),
            margin=dict(l=60, r=20, t=50, b=50),
            modebar=dict(bgcolor="rgba(0, 0, 0, 0)", color=LINE, activecolor=COLORS["blue"]),
            sliderdefaults=dict(
                **control,
                activebgcolor="rgba(128, 128, 128, 0.45)",
                tickcolor=LINE,
                currentvalue=dict(font=dict(color=TEXT)),
            ),
            updatemenudefaults=control,
            colorscale=dict(sequential="Viridis", diverging="RdBu"),
        )
    )


theme = _make_theme()
pio.templates["dsv3"] = theme
pio.templates.default = "dsv3"  # every go.Figure made after `import dsv3.viz` uses the book's theme


def significant(values, digits: int = 4) -> list[float]:
    """Round to `digits` significant digits: figure data stays small and insensitive to the last bits."""
    return [float(f"{v:.{digits}g}") for v in values]


def figure(**layout: Any) -> go.Figure:
    """An empty figure with the book's theme and the given layout (``figure(title="...", height=360)``)."""
    return go.Figure(layout=dict(template=theme, **layout))


def _as_figure(fig: Any) -> go.Figure:
    if isinstance(fig, go.Figure):
        return fig
    if isinstance(fig, dict):
        return go.Figure(fig)
    raise TypeError(f"dsv3.viz.show expects a plotly go.Figure or a figure dict, got {type(fig).__name__}")


def summary(fig: go.Figure) -> str:
    """One line that names what a figure holds: ``<Figure 'title' | 3 traces: bar x2, scatter | 12 frames>``."""
    title = fig.layout.title.text
    kinds: dict[str, int] = {}
    for trace in fig.data:
        kinds[trace.type] = kinds.get(trace.type, 0) + 1
    traces = ", ".join(k if n == 1 else f"{k} x{n}" for k, n in kinds.items())
    parts = [
        f"Figure {title!r}" if title else "Figure",
        f"{len(fig.data)} trace{'s' if len(fig.data) != 1 else ''}" + (f": {traces}" if traces else ""),
    ]
    if fig.frames:
        parts.append(f"{len(fig.frames)} frames")
    for name, n in (("slider", len(fig.layout.sliders)), ("menu", len(fig.layout.updatemenus))):
        if n:
            parts.append(f"{n} {name}{'s' if n != 1 else ''}")
    return "<" + " | ".join(parts) + ">"


_ids_seen: dict[str, int] = {}


def _div_id(fig_json: str) -> str:
    """A deterministic DOM id: hash of the figure, suffixed if the same figure is shown twice in one kernel."""
    base = "dsv3-fig-" + hashlib.sha256(fig_json.encode()).hexdigest()[:12]
    n = _ids_seen.get(base, 0) + 1
    _ids_seen[base] = n
    return base if n == 1 else f"{base}-{n}"


_SCRIPT = """(function () {
  var id = "%(id)s";
  var fig = %(fig)s;
  function draw() {
    var gd = document.getElementById(id);
    if (!gd) return true;
    if (!window.Plotly) return false;
    if (!gd.hasAttribute("data-drawn")) {
      gd.setAttribute("data-drawn", "1");
      window.Plotly.newPlot(gd, fig);
    }
    return true;
  }
  if (!draw()) {
    window.addEventListener("load", function () {
      if (!draw()) {
        document.getElementById(id).textContent =
          "plotly.js is not loaded on this page: open the notebook in JupyterLab or Notebook 7, "
          + "or set DSV3_PLOTLY_RENDERER=notebook.";
      }
    });
  }
})();"""


def mimebundle(fig: Any) -> dict[str, Any]:
    """The MIME bundle ``show`` displays: plotly JSON, self-drawing HTML with a deterministic id, a summary line."""
    fig = _as_figure(fig)
    # engine="json": the stdlib encoder, so the text is the same with or without orjson installed.
    fig_json = pio.to_json(fig, validate=False, remove_uids=True, engine="json")
    fig_dict = json.loads(fig_json)
    fig_dict["config"] = dict(PLOTLY_CONFIG)
    div_id = _div_id(fig_json)
    # "</" would end the <script> element early; "<\/" is the same string to JavaScript.
    script = _SCRIPT % {"id": div_id, "fig": json.dumps(fig_dict, sort_keys=True).replace("</", "<\\/")}
    # A responsive plot takes its container's height: give the container the figure's, or a resize collapses it.
    height = fig_dict.get("layout", {}).get("height") or 450  # plotly's default height
    html = (
        f'<div class="dsv3-figure tex2jax_ignore mathjax_ignore">\n'
        f'<div id="{div_id}" class="dsv3-plotly" style="width: 100%; height: {height}px;"></div>\n'
        f'<script type="text/javascript">\n{script}\n</script>\n</div>'
    )
    return {PLOTLY_MIMETYPE: fig_dict, "text/html": html, "text/plain": summary(fig)}


def in_colab() -> bool:
    return "google.colab" in sys.modules


def show(fig: Any) -> None:
    """Display a plotly figure so that it renders on the static site, in JupyterLab/Notebook 7 and on Colab."""
    from IPython.display import display

    renderer = os.environ.get("DSV3_PLOTLY_RENDERER") or ("colab" if in_colab() else None)
    if renderer:
        pio.show(_as_figure(fig), renderer=renderer)
        return
    display(mimebundle(fig), raw=True)


class _BookRenderer(pio.base_renderers.MimetypeRenderer):
    """Lets ``fig.show()`` and a bare ``fig`` at the end of a cell go through ``mimebundle`` too."""

    def to_mimebundle(self, fig_dict: dict) -> dict:
        return mimebundle(go.Figure(fig_dict))


pio.renderers["dsv3"] = _BookRenderer()


# ---------------------------------------------------------------------------------------------------------------
# The first cell of every chapter
# ---------------------------------------------------------------------------------------------------------------


class NotebookSetup(NamedTuple):
    device: str  # "cuda" when a GPU is visible, else "cpu"
    big: bool  # True on a GPU: chapters scale their sizes up


def _missing(requirements: Sequence[str]) -> list[str]:
    """The requirements (``"name>=1.2"``) that the running interpreter does not satisfy."""
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        req = Requirement(text)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def _colab_setup(extras: Sequence[str]) -> None:
    """Colab only: install what the chapter needs beyond Colab's image, and turn on the ipywidgets 8 manager."""
    missing = _missing(extras)
    if missing:
        print("installing on Colab:", " ".join(missing))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    try:
        from google.colab import output  # type: ignore[import-not-found]
    except ImportError:  # a Colab-like kernel without the output module: nothing to enable
        return
    output.enable_custom_widget_manager()  # Colab's built-in manager speaks ipywidgets 7 only


def _device(torch) -> str:
    """``DSV3_DEVICE`` ("cpu" or "cuda", set by ``book/_tools/run_notebook.py --device``) when set, else cuda when
    a GPU is visible, else cpu."""
    forced = os.environ.get("DSV3_DEVICE", "").strip().lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"DSV3_DEVICE={forced!r}: expected 'cpu' or 'cuda'")
    if forced == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "DSV3_DEVICE=cuda but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
        )
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_notebook(seed: int = 0, extras: Sequence[str] = ()) -> NotebookSetup:
    """First cell of a chapter: seeds, device, versions; on Colab also installs ``extras`` and widget support.

    Returns ``(device, big)``: ``device`` is ``"cuda"`` when a GPU is visible, otherwise ``"cpu"`` (never fails on
    a CPU); the environment variable ``DSV3_DEVICE`` (``cpu``/``cuda``) forces the choice; ``big`` is
    ``device == "cuda"``, the switch chapters use to scale their sizes up on a GPU.
    ``extras`` are pip requirements (``"transformers>=4.46"``) a chapter needs; off Colab a missing one is an
    error naming the pip command, since the book never installs into your own environment.
    """
    import numpy as np
    import torch

    if in_colab():
        _colab_setup(extras)
    else:
        missing = _missing(extras)
        if missing:
            raise ModuleNotFoundError(
                "this chapter needs "
                + ", ".join(missing)
                + f"; install with: pip install {' '.join(repr(m) for m in missing)}"
            )
    pio.renderers.default = "colab" if in_colab() else "dsv3"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = _device(torch)
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{torch.get_num_threads()} threads"
    import dsv3

    print(
        f"python {platform.python_version()} | torch {torch.__version__} | dsv3 {dsv3.__version__} | "
        f"plotly {metadata.version('plotly')} | device {device} ({where})" + (" | Colab" if in_colab() else "")
    )
    return NotebookSetup(device=device, big=device == "cuda")
