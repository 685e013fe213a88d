"""The student edition (``python -m bncourse.student``): no solution survives, and each student
notebook runs top to bottom until the first unanswered exercise, which says so in one clean line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from bncourse.student import (
    WITHHELD,
    student_notebook,
    withhold_solution_directives,
)

ROOT = Path(__file__).resolve().parents[1]


def _has_exercises(path: Path) -> bool:
    return "{exercise}" in path.read_text(encoding="utf-8")


# Every chapter of the book that has exercises.
NOTEBOOKS = sorted(p for p in (ROOT / "book").glob("*.ipynb") if _has_exercises(p))


def _ids(path: Path) -> str:
    return path.stem


@pytest.fixture(scope="module")
def edition(tmp_path_factory) -> Path:
    """The student edition of NOTEBOOKS, made with the documented command."""
    output = tmp_path_factory.mktemp("student")
    result = subprocess.run(
        [sys.executable, "-m", "bncourse.student", *map(str, NOTEBOOKS), "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return output


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _all_text(notebook: dict) -> str:
    """Every cell's source and every output's text, one line per line."""
    parts = []
    for cell in notebook["cells"]:
        source = cell["source"]
        parts.append("".join(source) if isinstance(source, list) else source)
        parts.append(json.dumps(cell.get("outputs", [])))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_no_solution_line_survives(path: Path, edition: Path, solution_lines):
    lines = solution_lines(_load(path))
    assert lines, f"{path.name}: found no reference solution"
    student = _load(edition / path.name)
    nbformat.validate(nbformat.from_dict(student))
    present = {line.strip() for line in _all_text(student).splitlines()}
    leaked = sorted(line for line in lines if line in present)
    assert not leaked, f"{path.name}: the student edition still holds {leaked}"
    assert WITHHELD in _all_text(student)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_everything_else_is_kept(path: Path, edition: Path):
    source, student = _load(path), _load(edition / path.name)
    assert len(student["cells"]) == len(source["cells"])
    for before, after in zip(source["cells"], student["cells"], strict=True):
        assert after["cell_type"] == before["cell_type"]
        text = "".join(before["source"])
        markers = ("BEGIN SOLUTION", "{solution}", "{solution-start}")
        if not any(marker in text for marker in markers):
            assert "".join(after["source"]) == text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_runs_until_the_first_exercise_says_not_implemented(path: Path, edition: Path):
    notebook = nbformat.read(edition / path.name, as_version=4)
    graded = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("grade")
    ]
    assert graded, f"{path.name}: no autograded cell"
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(edition)}},
    )
    with pytest.raises(CellExecutionError):
        client.execute()
    failed = [
        index
        for index, cell in enumerate(notebook.cells)
        if any(out.output_type == "error" for out in cell.get("outputs", []))
    ]
    assert failed == [graded[0]], (
        f"{path.name}: the first error is in cell {failed[:1]}, expected the first exercise's "
        f"check (cell {graded[0]})"
    )
    (error,) = [out for out in notebook.cells[graded[0]].outputs if out.output_type == "error"]
    assert error.ename == "NotImplementedYet"
    # one clean line for the learner, no traceback through the package
    assert len(error.traceback) == 1 and "not implemented yet" in error.traceback[0]


def _cell(cell_type: str, source: str, **metadata) -> dict:
    cell = {"cell_type": cell_type, "metadata": metadata, "source": source}
    if cell_type == "code":
        cell.update(outputs=[], execution_count=None)
    return cell


def test_withholds_directives_of_every_fence_and_keeps_labels():
    text = (
        "Before.\n\n"
        "````{solution} ex-1-1\n:label: sol-1-1\n:class: dropdown\n\nUse\n```python\nx = 1\n```\n"
        "````\n\nBetween.\n\n"
        ":::{solution} ex-1-2\n---\nlabel: sol-1-2\n---\nsecret\n:::\n\nAfter."
    )
    result, count = withhold_solution_directives(text)
    assert count == 2
    assert "x = 1" not in result and "secret" not in result and "Use" not in result
    for kept in ["Before.", "Between.", "After.", ":label: sol-1-1", "label: sol-1-2", "````"]:
        assert kept in result
    assert result.count(WITHHELD) == 2


def test_withholds_gated_solutions_across_cells():
    cells = [
        _cell("markdown", "```{exercise} E\n:label: ex-1-1\n\nDo it.\n```"),
        _cell(
            "markdown",
            "````{solution-start} ex-1-1\n:label: sol-1-1\n:class: dropdown\n````\n\n"
            "The secret idea.",
        ),
        _cell(
            "code",
            "def f():\n    ### BEGIN SOLUTION\n    return 42\n    ### END SOLUTION",
            tags=["solution"],
            nbgrader={"grade_id": "ex-1-1-solution", "solution": True, "grade": False},
        ),
        _cell("markdown", "More secret words.\n\n```{solution-end}\n```\n\nPublic text."),
        _cell("markdown", "Also public."),
    ]
    result = student_notebook({"cells": cells})
    text = "\n".join(cell["source"] for cell in result["cells"])
    for secret in ("secret idea", "return 42", "More secret"):
        assert secret not in text
    for kept in ("Do it.", ":label: sol-1-1", "{solution-end}", "Public text.", "Also public."):
        assert kept in text
    assert text.count(WITHHELD) == 2
    demo = _cell("code", "print(42)")
    with pytest.raises(ValueError, match="must be a solution cell"):
        student_notebook({"cells": [*cells[:2], demo, *cells[3:]]})
    with pytest.raises(ValueError, match="never closed by"):
        student_notebook({"cells": cells[:3]})


def test_refuses_unclosed_solutions():
    with pytest.raises(ValueError, match="never closed"):
        withhold_solution_directives("```{solution} ex-1-1\ntext")
    unclosed = {"cells": [_cell("code", "def f():\n    ### BEGIN SOLUTION\n    return 1")]}
    with pytest.raises(ValueError, match="never closed"):
        student_notebook(unclosed)


def test_stubs_keep_indentation_and_strip_hidden_tests_and_outputs():
    solution = _cell(
        "code",
        "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
        tags=["solution", "hide-input"],
        nbgrader={"grade_id": "ex-3-1-solution", "solution": True, "grade": False},
    )
    solution["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "2 * x\n"}]
    whole = _cell("code", "answer = 42", nbgrader={"grade_id": "ex-3-2-solution", "solution": True})
    tests = _cell(
        "code",
        "check(f)\n### BEGIN HIDDEN TESTS\nassert f(3) == 6\n### END HIDDEN TESTS",
        nbgrader={"grade_id": "ex-3-1-test", "grade": True, "points": 1},
    )
    result = student_notebook({"cells": [solution, whole, tests]})
    first, second, third = (cell["source"] for cell in result["cells"])
    assert first == (
        "def f(x):\n    # YOUR CODE HERE\n"
        '    raise NotImplementedError("exercise ex-3-1: write your solution here")'
    )
    assert "ex-3-2" in second and "42" not in second
    assert third == "check(f)"
    assert result["cells"][0]["outputs"] == []
    assert result["cells"][0]["metadata"]["tags"] == ["solution"]
    assert solution["metadata"]["tags"] == ["solution", "hide-input"], "the input was modified"


def test_there_are_chapters_with_exercises():
    assert NOTEBOOKS, "no notebook under book/ has exercises"


def test_command_refuses_to_overwrite_its_source(tmp_path: Path):
    chapter = NOTEBOOKS[0]
    copy = tmp_path / chapter.name
    copy.write_text(chapter.read_text())
    result = subprocess.run(
        [sys.executable, "-m", "bncourse.student", str(copy), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "refusing to overwrite" in result.stderr
    assert copy.read_text() == chapter.read_text()
