"""The package's declared dependencies: the model imports without the book's and the tests' packages, and
requirements.txt (what `make install` and CI install) agrees with pyproject.toml's groups."""

import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

import dsv3

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_model_package_imports_without_optional_dependencies():
    """Every module outside dsv3.viz (and the Triton kernel files) imports with plotly, ipywidgets, transformers,
    triton and the notebook stack missing; dsv3.viz then fails with one error that names the extra to install."""
    code = (
        "import sys, pkgutil, importlib\n"
        "for m in ('plotly', 'ipywidgets', 'IPython', 'transformers', 'triton', 'yaml', 'nbformat', 'jupyter_book'):\n"
        "    sys.modules[m] = None\n"
        "import dsv3\n"
        "names = [m.name for m in pkgutil.walk_packages(dsv3.__path__, 'dsv3.')\n"
        "         if not m.name.startswith('dsv3.viz') and not m.name.endswith('_triton')]  # kernels: triton's own\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "try:\n"
        "    import dsv3.viz\n"
        "except ImportError as e:\n"
        "    print(len(names), e)\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    count, message = out.stdout.strip().split(" ", 1)
    assert int(count) >= 10  # config, layers, model, kernels, checkpoint, train, generate, data, ...
    assert "pip install 'dsv3[viz]'" in message


def _requirements() -> dict[str, Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {r.name.lower(): r for r in reqs}


def _declared() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    reqs = [Requirement(s) for group in groups for s in group]
    return {r.name.lower(): r for r in reqs if r.name != project["name"]}  # dsv3[viz] names a group, not a package


def test_requirements_txt_matches_pyproject():
    installed, declared = _requirements(), _declared()
    assert sorted(installed) == sorted(declared), "requirements.txt and pyproject.toml name different packages"
    for name, req in installed.items():
        spec = declared[name].specifier
        pins = [s.version for s in req.specifier if s.operator == "=="]
        if pins:  # a pin in requirements.txt must be a version pyproject allows
            assert spec.contains(pins[0], prereleases=True), f"{name}: requirements.txt pins {pins[0]}, not {spec}"
        else:
            assert req.specifier == spec, f"{name}: requirements.txt says {req.specifier}, pyproject {spec}"


def test_model_package_does_not_pull_plotly():
    assert "plotly" not in {Requirement(s).name for s in PYPROJECT["project"]["dependencies"]}
    assert "ruff" in {Requirement(s).name for s in PYPROJECT["project"]["optional-dependencies"]["test"]}


def test_version_has_one_source():
    """pyproject reads the version from dsv3/__init__.py (statically, without importing torch)."""
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dsv3.__version__"}
    literal = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "dsv3" / "__init__.py").read_text(), re.M)
    assert literal and literal.group(1) == dsv3.__version__
