"""The exercises work with nbgrader as they are: nbgrader's own ``generate_assignment`` and
``autograde`` on a chapter, with the course configuration the instructors' page documents.

The released notebook holds no solution; the reference solutions score full marks; the untouched
release scores zero on every autograded cell, and the grader still finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The chapter whose exercises go through nbgrader (its checks come from bncourse.exercises).
NOTEBOOK = ROOT / "book" / "ch2_bn_transform.ipynb"
ASSIGNMENT = "ch2"
BIN = Path(sys.executable).parent

# The course configuration of the instructors' page (book/instructors.md), with an absolute root.
CONFIG = """\
from bncourse.student import nbgrader_preprocessors

c = get_config()
c.CourseDirectory.root = {root!r}
c.GenerateAssignment.preprocessors = nbgrader_preprocessors()
c.Execute.timeout = 300
"""


def _environment() -> dict[str, str]:
    # nbgrader runs `alembic` (installed next to it) from the PATH to manage its database.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "nbgrader"), *args, "--log-level=WARN"],
        cwd=course,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    # nbgrader logs an error in its configuration file and goes on: that counts as a failure here
    assert result.returncode == 0 and "ERROR" not in result.stderr, (
        f"nbgrader {' '.join(args)} failed:\n{result.stderr}"
    )
    return result


def _graded_cells(notebook: dict) -> dict[str, float]:
    return {
        cell["metadata"]["nbgrader"]["grade_id"]: cell["metadata"]["nbgrader"]["points"]
        for cell in notebook["cells"]
        if cell["cell_type"] == "code" and cell["metadata"].get("nbgrader", {}).get("grade")
    }


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """A course folder where the chapter was released, then submitted twice and autograded."""
    course = tmp_path_factory.mktemp("course")
    (course / "nbgrader_config.py").write_text(CONFIG.format(root=str(course)))
    source = course / "source" / ASSIGNMENT
    source.mkdir(parents=True)
    shutil.copy(NOTEBOOK, source)
    _nbgrader(course, "generate_assignment", ASSIGNMENT)

    released = course / "release" / ASSIGNMENT / NOTEBOOK.name
    for student, notebook in [("reference", NOTEBOOK), ("untouched", released)]:
        submitted = course / "submitted" / student / ASSIGNMENT
        submitted.mkdir(parents=True)
        shutil.copy(notebook, submitted)
    _nbgrader(course, "autograde", ASSIGNMENT)
    return course


def _scores(course: Path, student: str) -> tuple[dict[str, float], float, float]:
    os.environ["PATH"] = _environment()["PATH"]  # the Gradebook runs alembic too
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        submission = gradebook.find_submission_notebook(NOTEBOOK.stem, ASSIGNMENT, student)
        cells = {grade.name: grade.score for grade in submission.grades}
        return cells, submission.score, submission.max_score


def test_the_chapter_has_autograded_exercises():
    graded = _graded_cells(json.loads(NOTEBOOK.read_text()))
    assert len(graded) >= 2, f"{NOTEBOOK.name} has {len(graded)} autograded cells, expected 2+"


def test_release_contains_no_solution(course: Path, solution_lines):
    released = course / "release" / ASSIGNMENT / NOTEBOOK.name
    text = "\n".join("".join(cell["source"]) for cell in json.loads(released.read_text())["cells"])
    present = {line.strip() for line in text.splitlines()}
    lines = solution_lines(json.loads(NOTEBOOK.read_text()))
    assert lines, "found no solution in the chapter"
    leaked = [line for line in lines if line in present]
    assert not leaked, f"the released notebook still holds solution lines: {leaked}"
    assert "NotImplementedError" in text


def test_reference_solutions_score_full_marks(course: Path):
    cells, score, max_score = _scores(course, "reference")
    expected = _graded_cells(json.loads(NOTEBOOK.read_text()))
    assert max_score == sum(expected.values())
    assert cells == expected, f"reference solutions lost points: {cells}"
    assert score == max_score


def test_untouched_release_scores_zero(course: Path):
    cells, score, max_score = _scores(course, "untouched")
    assert max_score > 0
    assert score == 0 and not any(cells.values()), f"the empty release earned points: {cells}"
    # the autograded cells fail on the stub with the clean message, not on something else
    autograded = course / "autograded" / "untouched" / ASSIGNMENT / NOTEBOOK.name
    notebook = json.loads(autograded.read_text())
    graded = _graded_cells(notebook)
    for cell in notebook["cells"]:
        if cell["metadata"].get("nbgrader", {}).get("grade_id") in graded:
            errors = [out for out in cell["outputs"] if out["output_type"] == "error"]
            assert [e["ename"] for e in errors] == ["NotImplementedYet"], cell["source"]
