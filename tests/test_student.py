"""The labs: ``book/_tools/student.py`` (student copies without solutions, the grading run) and every chapter's lab.

A tiny lab notebook built here tests the tool itself; the chapters' labs are graded for real (slow: each runs a
whole chapter): every ``autograde`` cell must fail on the empty ``exercise`` stub and pass on the ``solution``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from helpers import load_tool

ROOT = Path(__file__).resolve().parents[1]


student = load_tool("dsv3_book_student", "book/_tools/student.py")
dsv3_site = load_tool("dsv3_site_for_labs", "book/_ext/dsv3_site.py")

WRITTEN_EXERCISE = """## Exercises

1. Why is the cache small?

```{admonition} Solution
:class: dropdown

Because only the latent is cached.
```

2. A question without a hidden answer."""


def lab_notebook(
    autograde: str = "assert double(3) == 6, f'double(3) should be 6, got {double(3)}'\nprint('passed')",
    solution_after_check: bool = False,
) -> nbformat.NotebookNode:
    """A chapter in miniature: setup, a lab (stub, solution, check), a written exercise with a hidden answer."""

    def code(source, tag=None, out=None):
        cell = new_code_cell(source, metadata={"tags": [tag]} if tag else {})
        if out is not None:
            cell.outputs = [new_output("stream", name="stdout", text=out)]
        return cell

    lab = [
        code("def double(x):\n    # your code here\n    return None", "exercise"),
        code("def double(x):\n    return 2 * x", "solution"),
        code(autograde, "autograde", "passed\n"),
    ]
    if solution_after_check:
        lab[1], lab[2] = lab[2], lab[1]
    cells = [
        new_markdown_cell("# A chapter"),
        code("import math\nbase = 2", out=""),
        *lab,
        code("print(double(21))", out="42\n"),
        new_markdown_cell(WRITTEN_EXERCISE),
    ]
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:03d}"
    return nb


# --- the student copy -------------------------------------------------------------------------------------------


def test_student_copy_has_no_solution_and_clears_the_lab_outputs():
    copy = student.student_copy(lab_notebook())
    assert not [c for c in copy.cells if "solution" in student.tags(c)]
    assert "return 2 * x" not in nbformat.writes(copy)
    check = next(c for c in copy.cells if "autograde" in student.tags(c))
    assert check.outputs == [] and check.execution_count is None
    other = next(c for c in copy.cells if c.source == "print(double(21))")
    assert other.outputs[0]["text"] == "42\n"  # the rest of the chapter keeps its outputs


def test_student_copy_drops_hidden_answers_of_written_exercises():
    text = student.student_copy(lab_notebook()).cells[-1].source
    assert "only the latent" not in text and "{admonition} Solution" not in text
    assert "1. Why is the cache small?" in text and "2. A question without a hidden answer." in text
    assert student.SOLUTION_NOTE in text


def test_solution_admonition_with_colon_fence_and_nested_code_is_removed():
    text = "Q\n\n:::{admonition} Solution\n:class: dropdown\n\n```python\nx = 1\n```\n:::\nafter"
    assert student.drop_solution_admonitions(text) == f"Q\n\n{student.SOLUTION_NOTE}\nafter"
    with pytest.raises(ValueError, match="unclosed solution admonition"):
        student.drop_solution_admonitions("```{admonition} Solution\nnever closed")


def test_lab_problems_names_what_is_missing():
    assert student.lab_problems(lab_notebook(), "lab") == []
    nb = lab_notebook()
    nb.cells = [c for c in nb.cells if "autograde" not in student.tags(c)]
    assert student.lab_problems(nb, "lab") == ["lab: no cell tagged 'autograde'"]
    nb = lab_notebook()
    nb.cells[3].cell_type = "markdown"
    assert any("tagged 'solution' but is markdown" in p for p in student.lab_problems(nb, "lab"))


def test_write_makes_the_copies_and_a_reproducible_zip(tmp_path):
    src = tmp_path / "01_lab.ipynb"
    nbformat.write(lab_notebook(), src)
    written = student.write([src], tmp_path / "student")
    assert written == [tmp_path / "student" / "01_lab.ipynb"]
    assert "return 2 * x" not in written[0].read_text()
    archive = tmp_path / "student" / student.ZIP_NAME
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == ["dsv3-book-student/01_lab.ipynb"]
    first = archive.read_bytes()
    student.write([src], tmp_path / "student")
    assert archive.read_bytes() == first


def test_grading_notebook_reruns_each_check_after_its_solution():
    for after in (False, True):
        nb, roles = student.grading_notebook(lab_notebook(solution_after_check=after))
        # graded in place: right after the lab's own check, before the chapter goes on (a later cell may remove
        # what the lab reads)
        i = roles.index("stub-check")
        assert roles.count("stub-check") == 1 and roles[i + 1 : i + 3] == ["solution", "solved-check"]
        assert nb.cells[i + 1].source == "def double(x):\n    return 2 * x"
        assert nb.cells[i + 3].source == "print(double(21))"
        assert len({c.id for c in nb.cells}) == len(nb.cells)


# --- grading: a fresh kernel ------------------------------------------------------------------------------------


def test_grade_accepts_a_check_that_fails_on_the_stub_and_passes_on_the_solution(tmp_path):
    path = tmp_path / "01_lab.ipynb"
    nbformat.write(lab_notebook(), path)
    assert student.grade(path, timeout=120) == []


def test_grade_rejects_a_check_that_passes_on_the_stub(tmp_path):
    path = tmp_path / "01_lab.ipynb"
    nbformat.write(lab_notebook(autograde="assert callable(double)"), path)
    problems = student.grade(path, timeout=120)
    assert len(problems) == 1 and "passes on the empty exercise stub" in problems[0]


def test_grade_rejects_a_check_that_fails_on_the_solution(tmp_path):
    path = tmp_path / "01_lab.ipynb"
    nbformat.write(lab_notebook(autograde="assert double(3) == 7, 'double(3) should be 7'"), path)
    problems = student.grade(path, timeout=120)
    assert len(problems) == 1 and "solved-check" in problems[0] and "should be 7" in problems[0]


# --- the site folds the solutions -------------------------------------------------------------------------------


def test_site_reader_folds_solution_cells():
    nb = lab_notebook()
    md = new_markdown_cell("The answer uses ````x````.", metadata={"tags": ["solution"]})
    nb.cells.append(md)
    read = dsv3_site.read_notebook(nbformat.writes(nb))
    code = next(c for c in read.cells if "solution" in c.metadata.get("tags", []) and c.cell_type == "code")
    assert "hide-cell" in code.metadata.tags
    folded = read.cells[-1].source
    assert folded.startswith("`````{admonition} Solution\n:class: dropdown\n") and folded.endswith("\n`````")
    others = [c for c in read.cells if "solution" not in c.metadata.get("tags", [])]
    assert not any("hide-cell" in c.metadata.get("tags", []) for c in others)


# --- the chapters' labs ------------------------------------------------------------------------------------------

LAB_CHAPTERS = [
    p
    for p in student.chapters()
    if any(set(student.LAB_TAGS) & student.tags(c) for c in nbformat.read(p, as_version=4).cells)
]


@pytest.mark.parametrize("path", LAB_CHAPTERS, ids=lambda p: p.stem)
def test_chapter_lab_is_complete(path):
    assert student.lab_problems(nbformat.read(path, as_version=4), path.name) == []


@pytest.mark.skipif(not LAB_CHAPTERS, reason="no chapter has a lab yet (cells tagged exercise/autograde/solution)")
def test_every_chapter_after_the_preface_has_a_lab():
    """Once labs exist, every chapter has one (issue 13: chapters 1-9)."""
    without = [p.name for p in student.chapters() if not p.name.startswith("00_") and p not in LAB_CHAPTERS]
    assert without == []


@pytest.mark.slow
@pytest.mark.parametrize("path", LAB_CHAPTERS, ids=lambda p: p.stem)
def test_chapter_autograde_fails_on_the_stub_and_passes_on_the_solution(path):
    assert student.grade(path) == []
