"""Execute book chapters in place, the way the committed outputs must be made, then strip volatile metadata.

    python book/_tools/run_notebook.py book/02_mla.ipynb          # execute (CPU, fixed env), strip, save
    python book/_tools/run_notebook.py --all                      # every book/NN_*.ipynb, with a time table
    python book/_tools/run_notebook.py --strip-only book/02_mla.ipynb
    python book/_tools/run_notebook.py --check --all              # exit 1 unless committed notebooks are clean
    python book/_tools/run_notebook.py --device cuda --all        # on a GPU: executed copies in _build/cuda/

Execution: a fresh kernel of *this* Python (like ``pytest --nbval --nbval-current-env``), working directory
``book/``, environment ``NOTEBOOK_ENV`` (no GPU, 2 threads, AVX2 code paths, ``PYTHONHASHSEED=0``, offline), widget
state stored in the notebook metadata so the site can draw the widgets. The committed outputs are the nbval oracle,
so they must come from exactly this setup; ``book/conftest.py`` gives nbval's kernel the same environment.

Stripping keeps every output and removes what changes from run to run or machine to machine: execution
timestamps, the Python patch version, editor state (``collapsed``, ``scrolled``, Colab ids); random ipywidgets
model ids are renumbered deterministically, so re-running an unchanged chapter leaves ``git diff`` empty.

Budget (STYLE.md): under 2 minutes per chapter on 2 CPU cores, under 12 for the whole book. Every execution
records the chapter's wall time in ``book/_data/timings.json`` (per device, with the machine that measured it);
the site's "Time to run" page renders it with ``timing_markdown()``.

``--device cuda`` runs a chapter on the GPU (the Colab path): the GPU stays visible, ``DSV3_DEVICE=cuda`` makes
``setup_notebook()`` choose it (or fail clearly without one), Triton compiles for the GPU instead of
interpreting. The committed outputs are CPU outputs, so these runs write executed copies to ``_build/cuda/``
and never touch the chapters.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import sys
import time
import uuid
from pathlib import Path

import nbformat

BOOK = Path(__file__).resolve().parents[1]
CHAPTER_GLOB = "[0-9][0-9]_*.ipynb"
BUDGET_S = 120.0  # per chapter, 2 CPU cores
BOOK_BUDGET_S = 720.0
TIMINGS = BOOK / "_data" / "timings.json"  # {"cpu" | "cuda": {chapter stem: {"seconds": s, "machine": ...}}}
DEVICES = ("cpu", "cuda")
CUDA_OUT = BOOK.parent / "_build" / "cuda"

NOTEBOOK_ENV = {
    "PYTHONHASHSEED": "0",
    "CUDA_VISIBLE_DEVICES": "",  # the committed outputs are CPU outputs, also on a GPU machine
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "OPENBLAS_NUM_THREADS": "2",
    # The same floating-point code paths on every x86-64 machine with AVX2: the CPU kernels ATen picks and MKL's
    # conditional numerical reproducibility branch (which also fixes its cache-size-dependent blocking). Without
    # these, two CPUs of different models round a few matmuls differently, and the training chapters' chaotic
    # balancing trajectories (sign-based bias updates) diverge from the committed outputs.
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "TOKENIZERS_PARALLELISM": "false",
    "TRITON_INTERPRET": "1",  # as in tests/conftest.py: a chapter that forces the Triton backend runs it on the CPU
    "HF_HUB_OFFLINE": "1",  # no network in the book's outputs
    "TRANSFORMERS_OFFLINE": "1",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # keeps ipykernel's debugger warning out of stderr
    "MPLBACKEND": "Agg",
}
UNSET_ENV = ("DSV3_PLOTLY_RENDERER", "DSV3_KERNEL_BACKEND")

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {
    "codemirror_mode": {"name": "ipython", "version": 3},
    "file_extension": ".py",
    "mimetype": "text/x-python",
    "name": "python",
    "nbconvert_exporter": "python",
    "pygments_lexer": "ipython3",
}
KEEP_NB_METADATA = ("kernelspec", "language_info", "widgets", "mystnb", "myst")
KEEP_CELL_METADATA = ("tags", "mystnb")
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_CELL_ID = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")


def apply_env(environ: dict | None = None, device: str = "cpu") -> dict:
    """Put NOTEBOOK_ENV into ``environ`` (default ``os.environ``, so kernels started afterwards inherit it).

    ``device="cuda"``: the same, except that the GPU stays visible, ``DSV3_DEVICE=cuda`` forces chapters onto it
    and Triton compiles instead of interpreting."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {DEVICES}")
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    environ.update(NOTEBOOK_ENV)
    for key in UNSET_ENV:
        environ.pop(key, None)
    environ["DSV3_DEVICE"] = device
    if device == "cuda":
        environ.pop("TRITON_INTERPRET", None)
        if visible is None:
            environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            environ["CUDA_VISIBLE_DEVICES"] = visible  # the GPUs the caller chose
    return environ


def chapters() -> list[Path]:
    return sorted(BOOK.glob(CHAPTER_GLOB))


def _references(obj, state: dict):
    """Model ids that ``obj`` refers to ("IPY_MODEL_<id>" or a bare id), in an order fixed by the content."""
    if isinstance(obj, dict):
        for key in sorted(obj):
            yield from _references(obj[key], state)
    elif isinstance(obj, list):
        for item in obj:
            yield from _references(item, state)
    elif isinstance(obj, str):
        ref = obj.removeprefix("IPY_MODEL_")
        if ref in state:
            yield ref


def _widget_order(nb, state: dict) -> list[str]:
    """Model ids in an order that does not depend on the ids: the views in the cells' outputs first, then what
    they refer to (depth first), then unreferenced models sorted by content. Re-stripping finds the same order."""
    order: list[str] = []

    def visit(model_id: str) -> None:
        if model_id in state and model_id not in order:
            order.append(model_id)
            for ref in _references(state[model_id].get("state", {}), state):
                visit(ref)

    for cell in nb.cells:
        for ref in _references(cell.get("outputs", []), state):
            visit(ref)
    blank = re.compile("|".join(map(re.escape, state)))
    rest = sorted(
        (m for m in state if m not in order), key=lambda m: blank.sub("", json.dumps(state[m], sort_keys=True))
    )
    for model_id in rest:
        visit(model_id)
    return order


def renumber_widgets(nb, name: str):
    """Replace ipywidgets' random model ids by ids derived from the notebook name and the widgets' structure."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    if not state:
        return nb
    new = {
        old: uuid.uuid5(uuid.NAMESPACE_URL, f"dsv3-book/{name}/widget/{i}").hex
        for i, old in enumerate(_widget_order(nb, state))
    }
    pattern = re.compile("|".join(map(re.escape, sorted(new, key=len, reverse=True))))
    text = pattern.sub(lambda m: new[m.group(0)], json.dumps(nb))  # one pass: a new id is never replaced again
    return nbformat.from_dict(json.loads(text))


def strip(nb, name: str):
    """A copy of ``nb`` without volatile metadata; outputs and execution counts kept."""
    nb = copy.deepcopy(nb)
    nb.nbformat, nb.nbformat_minor = 4, 5
    meta = {k: v for k, v in nb.metadata.items() if k in KEEP_NB_METADATA}
    meta["kernelspec"] = dict(KERNELSPEC)
    meta["language_info"] = dict(LANGUAGE_INFO)
    widgets = meta.get("widgets", {}).get(WIDGET_STATE, {})
    if "widgets" in meta and not widgets.get("state"):
        del meta["widgets"]
    nb.metadata = nbformat.from_dict(meta)
    seen = set()
    for i, cell in enumerate(nb.cells):
        cell.metadata = nbformat.from_dict({k: v for k, v in cell.metadata.items() if k in KEEP_CELL_METADATA})
        cid = cell.get("id")
        if not cid or not _CELL_ID.match(cid) or cid in seen:
            cell.id = f"cell-{i:03d}"
        seen.add(cell.id)
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
    return renumber_widgets(nb, name)


def _dumps(nb) -> str:
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def write_atomic(nb, path: Path) -> None:
    nbformat.validate(nb)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(_dumps(nb), encoding="utf-8")
    tmp.replace(path)


def _kernel_manager():
    """A kernel manager for a python3 kernel of this interpreter (whatever kernelspecs are installed)."""
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    class ThisPython(KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            return self.kernel_spec_class(
                resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict()
            )

    return KernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())


def execute(path: Path, timeout: int = 600, device: str = "cpu", out: Path | None = None) -> float:
    """Execute ``path`` (fixed env, widget state stored), strip it and save it to ``out`` (default: in place);
    return the wall time, also recorded in ``TIMINGS`` when ``path`` is a chapter of the book."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        km=_kernel_manager(),
        timeout=timeout,
        allow_errors=False,
        store_widget_state=True,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute(env=apply_env(dict(os.environ), device))  # the kernel's environment; ours is left alone
    seconds = time.perf_counter() - start
    write_atomic(strip(nb, path.stem), out or path)
    if path.resolve().parent == BOOK:  # a chapter of the book (not a test's notebook)
        record_timing(path.stem, seconds, device, machine(nb, device))
    return seconds


def machine(nb, device: str) -> str:
    """What ran ``nb``: the device line its setup cell printed ("cuda (NVIDIA H100 ...)", "cpu (2 threads)"),
    with the CPU model for CPU runs."""
    text = "".join(o.get("text", "") for c in nb.cells[:3] if c.cell_type == "code" for o in c.get("outputs", []))
    found = re.search(r"device (\w+ \([^)]*\))", text)
    where = found.group(1) if found else device
    if device == "cpu":
        model = platform.processor()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        except OSError:
            pass
        where = f"{model}, {where}" if model else where
    return where


def load_timings(path: Path = TIMINGS) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def record_timing(name: str, seconds: float, device: str, machine: str, path: Path = TIMINGS) -> None:
    """Store one chapter's wall time under ``device`` in the timing file (other entries kept)."""
    data = load_timings(path)
    data.setdefault(device, {})[name] = {"seconds": round(seconds, 1), "machine": machine}
    data = {dev: dict(sorted(data[dev].items())) for dev in sorted(data)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _duration(entry: dict | None) -> str:
    if not entry:
        return "not measured yet"
    seconds = entry["seconds"]
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def timing_markdown(path: Path = TIMINGS) -> str:
    """The chapters' time to run, CPU and GPU, as a MyST table (the site's timings page), from the timing file."""
    data = load_timings(path)
    rows = ["| Chapter | CPU | GPU |", "|:--|--:|--:|"]
    for chapter in chapters():
        rows.append(
            f"| [{chapter.stem}]({chapter.name}) | {_duration(data.get('cpu', {}).get(chapter.stem))} | "
            f"{_duration(data.get('cuda', {}).get(chapter.stem))} |"
        )
    totals = []
    for device in DEVICES:
        measured = [data.get(device, {}).get(c.stem) for c in chapters()]
        totals.append(
            _duration({"seconds": sum(e["seconds"] for e in measured)}) if all(measured) else "not measured yet"
        )
    rows.append(f"| **the whole book** | {totals[0]} | {totals[1]} |")
    machines = []
    for device, label in (("cpu", "CPU"), ("cuda", "GPU")):
        seen = sorted({e["machine"] for e in data.get(device, {}).values()})
        if seen:
            machines.append(f"{label}: measured on {'; '.join(seen)}.")
    return "\n".join(rows) + ("\n\n" + " ".join(machines) if machines else "")


def problems(path: Path) -> list[str]:
    """Why the committed ``path`` is not a clean, fully executed chapter (empty list when it is)."""
    nb = nbformat.read(path, as_version=4)
    found = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as err:
        found.append(f"{path}: invalid notebook: {err.message}")
    if _dumps(strip(nb, path.stem)) != path.read_text(encoding="utf-8"):
        found.append(f"{path}: volatile metadata not stripped; run python book/_tools/run_notebook.py {path}")
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    if counts != list(range(1, len(code) + 1)):
        found.append(
            f"{path}: execution counts {counts} are not 1..{len(code)}: "
            "the outputs must come from one fresh top-to-bottom run (run_notebook.py)"
        )
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"{path}: cell {i} has an error output ({out.get('ename')})")
    if code and "NBVAL_IGNORE_OUTPUT" not in code[0].source:
        found.append(f"{path}: the first code cell (setup) must carry # NBVAL_IGNORE_OUTPUT (it prints versions)")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--all", action="store_true", help=f"every book/{CHAPTER_GLOB}")
    parser.add_argument("--strip-only", action="store_true", help="strip metadata, do not execute")
    parser.add_argument("--check", action="store_true", help="exit 1 unless the notebooks are executed and stripped")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a chapter is over its time budget")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help=f"cpu (default: the committed outputs) or cuda (executed copies in {CUDA_OUT})",
    )
    args = parser.parse_args(argv)
    paths = chapters() if args.all else args.notebooks
    if not paths:
        parser.error("name notebooks or pass --all")
    for path in paths:
        if not path.is_file():
            parser.error(f"no such notebook: {path}")

    if args.check:
        found = [p for path in paths for p in problems(path)]
        print("\n".join(found) or f"{len(paths)} notebook(s) clean")
        return 1 if found else 0
    if args.strip_only:
        for path in paths:
            write_atomic(strip(nbformat.read(path, as_version=4), path.stem), path)
            print(f"stripped {path}")
        return 0

    over = False
    total = 0.0
    for path in paths:
        out = None
        if args.device == "cuda":
            CUDA_OUT.mkdir(parents=True, exist_ok=True)
            out = CUDA_OUT / path.name
        seconds = execute(path, timeout=args.timeout, device=args.device, out=out)
        total += seconds
        flag = "" if seconds < BUDGET_S else f"  OVER BUDGET ({BUDGET_S:.0f} s)"
        over |= bool(flag)
        print(f"{seconds:8.1f} s  {path}{flag}", flush=True)
    if len(paths) > 1:
        flag = "" if total < BOOK_BUDGET_S else f"  OVER BUDGET ({BOOK_BUDGET_S:.0f} s)"
        over |= bool(flag)
        print(f"{total:8.1f} s  total{flag}")
    return 1 if (over and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
