"""pytest settings for the notebooks under book/ (``pytest --nbval`` collects them).

nbval starts each notebook's kernel while setting up its first cell, and the kernel inherits this process's
environment. Around that setup the environment is the fixed one of ``book/_tools/run_notebook.py`` (no GPU,
2 threads, ``PYTHONHASHSEED=0``, offline), so the committed outputs and the re-computed ones come from identical
conditions; the environment of the rest of the test session is left as it was.
"""

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("run_notebook", Path(__file__).parent / "_tools" / "run_notebook.py")
run_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebook)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    saved = dict(os.environ)
    run_notebook.apply_env()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
