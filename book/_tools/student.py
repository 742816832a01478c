"""Write the student copies of the book's chapters: every chapter without its solutions, ready to be assigned.

    python book/_tools/student.py                    # every book/NN_*.ipynb -> _build/student/ (+ a zip of them)
    python book/_tools/student.py --out DIR a.ipynb  # chosen notebooks, another folder
    python book/_tools/student.py --check            # exit 1 unless every chapter 1-N has a complete lab
    python book/_tools/student.py --grade book/03_moe.ipynb   # autograde fails on the stubs, passes on the solutions

A chapter's lab is three kinds of cells, marked by cell tags (book/CONTRIBUTING.md):

* ``exercise``: the stub the student fills (a function that raises ``NotImplementedError`` or returns nothing);
* ``solution``: the instructor's version, collapsed on the site and absent from the student copy;
* ``autograde``: the check that grades the student's function against ``dsv3`` with a clear message.

In a student copy the ``solution`` cells are gone, and so are the ``{admonition} Solution`` dropdowns of markdown
cells (the hidden answers of the written exercises); the ``exercise`` and ``autograde`` cells lose their outputs
(the student runs them). Every other cell keeps its committed output, so the copy reads like the site.
``grade`` (``--grade``, run by ``tests/test_student.py`` for every chapter with a lab) executes the student copy
in the book's notebook environment and requires every ``autograde`` cell to fail on the empty stub, then runs each
lab's solution cells followed by its ``autograde`` cells again and requires them to pass. A lab is the run of cells
from one ``exercise`` cell to the next, so the solution may come before or after its check in the chapter.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import sys
import zipfile
from pathlib import Path

import nbformat

BOOK = Path(__file__).resolve().parents[1]
ROOT = BOOK.parent
OUT = ROOT / "_build" / "student"
ZIP_NAME = "dsv3-book-student.zip"
CHAPTER_GLOB = "[0-9][0-9]_*.ipynb"
LAB_TAGS = ("exercise", "autograde", "solution")
SOLUTION_NOTE = "*(The solution is in the instructor's copy: the book's website.)*"

# An opening fence of a MyST admonition titled "Solution": ```{admonition} Solution or :::{admonition} Solution
_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|:{3,})\{admonition\}[ \t]+Solution\b.*$")


def tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def chapters() -> list[Path]:
    return sorted(BOOK.glob(CHAPTER_GLOB))


def drop_solution_admonitions(markdown: str) -> str:
    """``markdown`` without its ``{admonition} Solution`` blocks (each replaced by a one-line note)."""
    lines, out, i = markdown.split("\n"), [], 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        fence = match["fence"]
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        end = next((j for j in range(i + 1, len(lines)) if close.match(lines[j])), None)
        if end is None:
            raise ValueError(f"unclosed solution admonition (opened by {lines[i]!r})")
        out.append(match["indent"] + SOLUTION_NOTE)
        i = end + 1
    return "\n".join(out)


def student_copy(nb):
    """A copy of notebook ``nb`` for students: no ``solution`` cell, no solution dropdown, lab cells without outputs."""
    nb = copy.deepcopy(nb)
    cells = []
    for cell in nb.cells:
        cell_tags = tags(cell)
        if "solution" in cell_tags:
            continue
        if cell.cell_type == "markdown":
            cell.source = drop_solution_admonitions(cell.source)
        elif cell.cell_type == "code" and cell_tags & {"exercise", "autograde"}:
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    nb.cells = cells
    return nb


def lab_problems(nb, name: str) -> list[str]:
    """Why ``nb`` does not hold a complete lab: each of the three tags on a code cell, an ``autograde`` cell after
    an ``exercise`` and a ``solution`` cell (empty list when it does)."""
    found = []
    where = {tag: [i for i, c in enumerate(nb.cells) if tag in tags(c)] for tag in LAB_TAGS}
    for tag, cells in where.items():
        if not cells:
            found.append(f"{name}: no cell tagged {tag!r}")
        for i in cells:
            if nb.cells[i].cell_type != "code":
                found.append(f"{name}: cell {i} is tagged {tag!r} but is {nb.cells[i].cell_type}, not code")
    if all(where.values()) and not any(i > min(where["exercise"]) for i in where["autograde"]):
        found.append(f"{name}: no 'autograde' cell after the first 'exercise' cell")
    return found


def grading_notebook(nb):
    """The student copy of ``nb`` followed, lab by lab, by the lab's solution cells and its autograde cells again.

    Returns ``(notebook, roles)``: ``roles[i]`` is ``"exercise"``, ``"stub-check"`` (an autograde cell that must
    fail), ``"solution"``, ``"solved-check"`` (one that must pass) or ``None`` for the chapter's other cells."""
    labs, current = [], None
    for cell in nb.cells:
        cell_tags = tags(cell)
        if "exercise" in cell_tags:
            current = {"solution": [], "autograde": []}
            labs.append(current)
        for kind in ("solution", "autograde"):
            if kind in cell_tags and cell.cell_type == "code":
                if current is None:  # a solution or check before any exercise: it belongs to the first lab
                    current = {"solution": [], "autograde": []}
                    labs.append(current)
                current[kind].append(cell)
    student = student_copy(nb)
    role_of = lambda c: (  # noqa: E731
        ("stub-check" if "autograde" in tags(c) else "exercise" if "exercise" in tags(c) else None)
        if c.cell_type == "code"
        else None
    )
    # each lab is graded again right after its own check cell, in the chapter's state at that point (a later cell
    # may remove what the lab reads, as chapter 8's last cell removes its checkpoints)
    after = {lab["autograde"][-1]["id"]: lab for lab in labs if lab["autograde"] and lab["autograde"][-1].get("id")}
    if len(after) != len([lab for lab in labs if lab["autograde"]]):
        raise ValueError("every autograde cell needs a cell id (nbformat 4.5) to be graded in place")
    cells, roles = [], []
    for c in student.cells:
        cells.append(c)
        roles.append(role_of(c))
        lab = after.get(c.get("id"))
        if lab is None:
            continue
        for kind, role in (("solution", "solution"), ("autograde", "solved-check")):
            for cell in lab[kind]:
                again = copy.deepcopy(cell)
                again.outputs, again.execution_count = [], None
                again.id = f"grade-{len(cells):04d}"
                cells.append(again)
                roles.append(role)
    student.cells = cells
    return student, roles


def _error(cell) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue', '')}".strip()
    return None


def grade(path: Path, timeout: int = 600) -> list[str]:
    """Run the grading notebook of ``path`` (book environment, fresh kernel, working directory its folder).

    Returns the problems: an autograde cell that passes on the stub, an exercise cell that raises, a solution or
    a re-run autograde cell that raises (with its error), or a chapter without an autograde cell."""
    from nbclient import NotebookClient

    spec = importlib.util.spec_from_file_location("dsv3_book_run_notebook", BOOK / "_tools" / "run_notebook.py")
    run_notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebook)

    nb, roles = grading_notebook(nbformat.read(path, as_version=4))
    if "stub-check" not in roles:
        return [f"{path.name}: no autograde cell to grade"]
    client = NotebookClient(
        nb,
        km=run_notebook._kernel_manager(),
        timeout=timeout,
        allow_errors=True,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=run_notebook.apply_env(dict(os.environ)))
    found = []
    for i, (cell, role) in enumerate(zip(nb.cells, roles)):
        error = _error(cell)
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        if role == "stub-check" and error is None:
            found.append(f"{path.name}: autograde cell {i} ({first!r}) passes on the empty exercise stub")
        elif role in ("exercise", "solution", "solved-check") and error is not None:
            found.append(f"{path.name}: {role} cell {i} ({first!r}) raises {error}")
    return found


def write(paths: list[Path], out: Path = OUT) -> list[Path]:
    """Write the student copy of each notebook into ``out``, plus ``out/ZIP_NAME`` holding all of them."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        target = out / path.name
        text = nbformat.writes(student_copy(nbformat.read(path, as_version=4)))
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        tmp.replace(target)
        written.append(target)
    archive, tmp = out / ZIP_NAME, out / f".{ZIP_NAME}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for target in written:
            info = zipfile.ZipInfo(f"dsv3-book-student/{target.name}", date_time=(2025, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, target.read_bytes())  # fixed timestamps: the same chapters give the same zip
    tmp.replace(archive)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help=f"default: every book/{CHAPTER_GLOB}")
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder (default {OUT.relative_to(ROOT)})")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every chapter after the preface has an exercise, autograde and solution",
    )
    parser.add_argument(
        "--grade",
        action="store_true",
        help="run each student copy: autograde must fail on the stubs and pass on the solutions",
    )
    args = parser.parse_args(argv)
    paths = args.notebooks or chapters()
    for path in paths:
        if not path.is_file():
            parser.error(f"no such notebook: {path}")
    if args.check:
        found = [
            p
            for path in paths
            if not path.name.startswith("00_")
            for p in lab_problems(nbformat.read(path, as_version=4), path.name)
        ]
        print("\n".join(found) or f"{len(paths)} notebook(s): every chapter has a lab")
        return 1 if found else 0
    if args.grade:
        found = [p for path in paths for p in grade(path)]
        print(
            "\n".join(found)
            or f"{len(paths)} notebook(s): every autograde cell fails on its stub and passes on its solution"
        )
        return 1 if found else 0
    written = write(paths, args.out)
    removed = sum(sum("solution" in tags(c) for c in nbformat.read(p, as_version=4).cells) for p in paths)
    print(f"{len(written)} student notebook(s) and {ZIP_NAME} in {args.out} ({removed} solution cell(s) removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
