"""Figures and widgets of the book: the display plumbing (``display.py``) and one module per chapter topic.

Chapters call ``show(fig)``; figure-building functions live in ``dsv3/viz/<topic>.py`` and return a plotly
``go.Figure`` made with ``figure(...)`` (the book's ``theme``), so the data behind every figure is package code.
"""

try:
    import plotly  # noqa: F401  (the one dependency of dsv3.viz that the model package does not install)
except ImportError as err:
    raise ImportError(
        "dsv3.viz draws the book's figures with plotly, which `import dsv3` does not need: "
        "pip install 'dsv3[viz]' (or -r requirements.txt in a checkout)"
    ) from err

from .display import COLORS, COLORWAY, NotebookSetup, figure, in_colab, mimebundle, setup_notebook, show, summary, theme

__all__ = [
    "COLORS",
    "COLORWAY",
    "NotebookSetup",
    "figure",
    "in_colab",
    "mimebundle",
    "setup_notebook",
    "show",
    "summary",
    "theme",
]
