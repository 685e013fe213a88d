"""The book's notebooks are committed clean and every one is in the table of contents."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "book").rglob("*.ipynb") if "_build" not in p.parts)


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under book/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path: Path):
    notebook = json.loads(path.read_text())
    dirty = [
        index
        for index, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; strip them with "
        "`.venv/bin/jupyter nbconvert --clear-output --inplace book/*.ipynb`"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_nbformat(path: Path):
    """Valid against its own nbformat version's schema (nbgrader refuses invalid notebooks,
    e.g. cell ids in a 4.4 notebook)."""
    nbformat.validate(nbformat.read(path, as_version=nbformat.NO_CONVERT))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_listed_in_toc(path: Path):
    toc = (ROOT / "_toc.yml").read_text()
    entry = path.relative_to(ROOT).with_suffix("").as_posix()
    assert f"file: {entry}" in toc, f"{entry} is missing from _toc.yml"


# --- the reading experience, in the sources (CONTRIBUTING.md; the browser test in
# tests/test_site.py measures the built pages) ---------------------------------------------------

MAX_CODE_LINE = 75  # characters; the code box shows about 77 at 1280 px
_FENCE_OPEN = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\{solution-start\}")


def _solution_start_has_body(markdown: str) -> bool:
    """Whether a {solution-start} fence holds anything but its options (the site drops it)."""
    lines = markdown.splitlines()
    for index, line in enumerate(lines):
        match = _FENCE_OPEN.match(line)
        if not match:
            continue
        for following in lines[index + 1 :]:
            text = following.strip()
            if text.startswith(":") or not text:
                continue
            if set(text) == {match.group(1)[0]} and len(text) >= len(match.group(1)):
                break
            return True
    return False


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _text(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _shown_code(path: Path) -> list[tuple[int, dict]]:
    return [
        (index, cell)
        for index, cell in enumerate(_cells(path))
        if cell["cell_type"] == "code" and "remove-cell" not in _tags(cell)
    ]


def _is_check_cell(cell: dict) -> bool:
    prompt = cell.get("metadata", {}).get("mystnb", {}).get("code_prompt_show", "")
    return "hide-cell" in _tags(cell) and prompt.startswith("Checks: ")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_the_code_box(path: Path):
    long = [
        f"cell {index}: {len(line)} chars: {line.strip()[:60]}"
        for index, cell in _shown_code(path)
        for line in _text(cell).splitlines()
        if len(line) > MAX_CODE_LINE
    ]
    assert not long, f"{path.name}: lines over {MAX_CODE_LINE} characters:\n" + "\n".join(long)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_asserts_live_in_check_cells(path: Path):
    """Every assert is in a check cell (tag hide-cell, prompt "Checks: ..."), except in the
    nbgrader cells of exercises; a check cell holds checks, not figures or tables."""
    problems = []
    for index, cell in _shown_code(path):
        text = _text(cell)
        grading = cell.get("metadata", {}).get("nbgrader", {})
        has_assert = any(line.lstrip().startswith("assert") for line in text.splitlines())
        if _is_check_cell(cell):
            if "figure" in cell["metadata"].get("mystnb", {}) or "show_table(" in text:
                problems.append(f"cell {index}: a check cell draws a figure or a table")
        elif "hide-cell" in _tags(cell) and has_assert:
            problems.append(f"cell {index}: tagged hide-cell without a 'Checks: ...' prompt")
        elif has_assert and not grading:
            first = next(line for line in text.splitlines() if line.lstrip().startswith("assert"))
            problems.append(f"cell {index}: assert in a reading cell: {first.strip()[:60]}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_figure_cells_have_name_caption_and_alt_text(path: Path):
    problems = []
    for index, cell in _shown_code(path):
        mystnb = cell.get("metadata", {}).get("mystnb", {})
        draws = re.search(r"\b(subplots|plt\.figure|plot_curves|plot_histograms)\(", _text(cell))
        if not draws and "figure" not in mystnb:
            continue
        figure, alt = mystnb.get("figure", {}), mystnb.get("image", {}).get("alt", "")
        if not re.fullmatch(r"fig-[\w-]+", figure.get("name", "")):
            problems.append(f"cell {index}: no figure name fig-<chapter>-<short>")
        if len(figure.get("caption", "")) < 20:
            problems.append(f"cell {index}: no caption that says what to see")
        if len(alt) < 20:
            problems.append(f"cell {index}: no alt text")
        if "tight_layout" in _text(cell):
            problems.append(f"cell {index}: tight_layout (the style uses constrained layout)")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_has_key_takeaways(path: Path):
    assert any("{admonition} Key takeaways" in _text(cell) for cell in _cells(path)), (
        f"{path.name}: no key-takeaways box (CONTRIBUTING.md)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_coding_solutions_are_inside_their_dropdown(path: Path):
    """Each solution code cell sits between a {solution-start} and a {solution-end}."""
    problems, inside = [], False
    for index, cell in enumerate(_cells(path)):
        text = _text(cell)
        if cell["cell_type"] == "markdown":
            if "{solution-start}" in text:
                inside = True
                if _solution_start_has_body(text):
                    problems.append(
                        f"cell {index}: text inside the {{solution-start}} fence (it is "
                        "dropped from the site): put it after the closing fence"
                    )
            if "{solution-end}" in text:
                inside = False
        elif cell.get("metadata", {}).get("nbgrader", {}).get("solution") and not inside:
            problems.append(f"cell {index}: a solution cell outside a gated solution")
        elif inside and "hide-input" in _tags(cell):
            problems.append(f"cell {index}: hide-input inside the dropdown (not needed)")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
