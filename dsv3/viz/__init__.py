"""Figures and widgets of the book: the display plumbing (``display.py``) and one module per chapter topic.

Chapters call ``show(fig)``; figure-building functions live in ``dsv3/viz/<topic>.py`` and return a plotly
``go.Figure`` made with ``figure(...)`` (the book's ``theme``), so the data behind every figure is package code.
"""

from .display import (COLORS, COLORWAY, NotebookSetup, figure, in_colab, mimebundle, setup_notebook, show,
                      summary, theme)

__all__ = ["COLORS", "COLORWAY", "NotebookSetup", "figure", "in_colab", "mimebundle", "setup_notebook", "show",
           "summary", "theme"]
