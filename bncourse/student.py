"""The student edition of the book's chapters: every notebook with its solutions taken out.

For instructors who do not use nbgrader. From the repository's root::

    .venv/bin/python -m bncourse.student book/ch2.ipynb book/ch3.ipynb --output student

writes ``student/ch2.ipynb`` and ``student/ch3.ipynb`` (with no notebook named, every notebook
under ``book/``). In each notebook:

* every solution region of a code cell (the lines from ``### BEGIN SOLUTION`` to
  ``### END SOLUTION``, the nbgrader convention of CONTRIBUTING.md) becomes a stub that raises
  ``NotImplementedError``, so the exercise's check answers "not implemented yet" until the learner
  writes the code; a solution cell without markers becomes the stub as a whole;
* hidden tests (``### BEGIN HIDDEN TESTS`` to ``### END HIDDEN TESTS``) are removed;
* the body of every ``{solution}`` and ``{solution-start}`` directive is replaced by "The
  solution is withheld in the student edition." (its label stays, so cross-references still
  resolve); so is any markdown text between a ``{solution-start}`` and its ``{solution-end}``
  (the gated solution of a coding exercise, CONTRIBUTING.md, holds the solution's code cell;
  every code cell there must be a solution cell);
* outputs and execution counts are cleared, and the ``hide-input`` tag of solution cells is
  dropped so that the learner sees the cell to fill in.

Everything else (text, set-up cells, checks) is kept as it is.

nbgrader users get the same treatment of the ``{solution}`` directives in nbgrader's released
notebooks with :func:`nbgrader_preprocessors` (see the instructors' page of the book).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

WITHHELD = "The solution is withheld in the student edition."
STUB_COMMENT = "# YOUR CODE HERE"

BEGIN_SOLUTION, END_SOLUTION = "BEGIN SOLUTION", "END SOLUTION"
BEGIN_HIDDEN_TESTS, END_HIDDEN_TESTS = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"

# The opening fence of a MyST directive: ```{name} args, ~~~{name} args or :::{name} args.
_DIRECTIVE_OPEN = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,}|:{3,})\{(?P<name>[\w:-]+)\}"
)
# A directive option line (":label: sol-2-1") or the YAML block form of the options.
_OPTION_LINE = re.compile(r"^[ \t]*:[\w-]+:")


def stub(label: str | None) -> str:
    """The two lines that replace a solution region (before indentation)."""
    what = f"exercise {label}" if label else "this exercise"
    return f'{STUB_COMMENT}\nraise NotImplementedError("{what}: write your solution here")'


def _replace_regions(
    source: str, begin: str, end: str, replacement: str | None, where: str
) -> tuple[str, int]:
    """Replace each region from a line containing ``begin`` to one containing ``end``.

    The replacement (or nothing, when it is ``None``) takes the indentation of the ``begin`` line.
    Returns the new source and the number of regions replaced.
    """
    kept: list[str] = []
    inside = False
    count = 0
    for line in source.split("\n"):
        if begin in line:
            if inside:
                raise ValueError(f"{where}: nested '{begin}' in\n{source}")
            inside = True
            count += 1
            if replacement is not None:
                indent = re.match(r"[ \t]*", line).group(0)
                kept.extend(indent + part for part in replacement.split("\n"))
        elif end in line:
            if not inside:
                raise ValueError(f"{where}: '{end}' without '{begin}' in\n{source}")
            inside = False
        elif not inside:
            kept.append(line)
    if inside:
        raise ValueError(f"{where}: '{begin}' is never closed by '{end}' in\n{source}")
    return "\n".join(kept), count


def withhold_solution_directives(markdown: str, where: str = "markdown") -> tuple[str, int]:
    """Replace the body of every ``{solution}`` directive in ``markdown`` by :data:`WITHHELD`.

    The opening fence, the directive's options (its label, its class) and the closing fence are
    kept. Returns the new text and the number of directives withheld. A gated solution's
    ``{solution-start}`` is withheld the same way; its ``{solution-end}`` (no body) is kept, and
    the text between them, which may span cells, is :func:`withhold_between_gates`'s job.
    """
    lines = markdown.split("\n")
    out: list[str] = []
    count = 0
    i = 0
    while i < len(lines):
        match = _DIRECTIVE_OPEN.match(lines[i])
        if not match or match["name"] not in ("solution", "solution-start", "solution-end"):
            out.append(lines[i])
            i += 1
            continue
        if match["name"] == "solution-end":
            out.append(lines[i])
            i += 1
            continue
        fence = match["fence"]
        closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        out.append(lines[i])
        i += 1
        # options: ":key: value" lines, or a YAML block between two "---" lines
        if i < len(lines) and lines[i].strip() == "---":
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "---"), None)
            if end is None:
                raise ValueError(f"{where}: unterminated option block in\n{markdown}")
            out.extend(lines[i : end + 1])
            i = end + 1
        while i < len(lines) and _OPTION_LINE.match(lines[i]):
            out.append(lines[i])
            i += 1
        body_end = next((j for j in range(i, len(lines)) if closing.match(lines[j])), None)
        if body_end is None:
            raise ValueError(f"{where}: the {{solution}} directive is never closed in\n{markdown}")
        if match["name"] == "solution-start" and not "".join(lines[i:body_end]).strip():
            out.extend(lines[i : body_end + 1])  # no body: the text follows the directive
            count += 1
            i = body_end + 1
            continue
        out.extend(["", match["indent"] + WITHHELD, lines[body_end]])
        count += 1
        i = body_end + 1
    return "\n".join(out), count


def withhold_between_gates(
    markdown: str, inside: bool, where: str = "markdown"
) -> tuple[str, bool]:
    """Withhold the text of ``markdown`` that lies inside a gated solution.

    ``inside`` says whether the text starts inside one (a ``{solution-start}`` in an earlier
    cell, not closed yet). Directives are kept whole (a ``{solution-start}``'s own body is
    :func:`withhold_solution_directives`'s job); each run of other lines inside the gates becomes
    one :data:`WITHHELD` line. Returns the new text and whether it ends inside a gated solution.
    """
    lines = markdown.split("\n")
    out: list[str] = []
    i, withheld = 0, False
    while i < len(lines):
        match = _DIRECTIVE_OPEN.match(lines[i])
        if match:
            fence = match["fence"]
            closing = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
            end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
            if end is None:
                raise ValueError(f"{where}: the {{{match['name']}}} directive is never closed")
            out.extend(lines[i : end + 1])
            if match["name"] == "solution-start":
                inside = True
            elif match["name"] == "solution-end":
                inside = False
            i, withheld = end + 1, False
            continue
        if inside and lines[i].strip():
            if not withheld:
                out.append(WITHHELD)
                withheld = True
        else:
            out.append(lines[i])
        i += 1
    return "\n".join(out), inside


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _exercise_label(cell: dict[str, Any], previous: str | None) -> str | None:
    grade_id = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id", "")
    if grade_id:
        return re.sub(r"-(solution|test)$", "", grade_id)
    return previous


def is_solution_cell(cell: dict[str, Any]) -> bool:
    """Whether a cell is a solution cell: nbgrader's ``solution`` flag or the ``solution`` tag."""
    metadata = cell.get("metadata", {})
    return bool(metadata.get("nbgrader", {}).get("solution")) or "solution" in metadata.get(
        "tags", []
    )


def student_notebook(notebook: dict[str, Any], name: str = "notebook") -> dict[str, Any]:
    """Return the student edition of a notebook (as parsed JSON); the input is left unchanged."""
    notebook = copy.deepcopy(notebook)
    label: str | None = None
    gated = False  # inside a gated solution ({solution-start} ... {solution-end})
    for index, cell in enumerate(notebook["cells"]):
        where = f"{name}, cell {index}"
        source = _source(cell)
        for found in re.finditer(r":label:\s*(ex-[\w-]+)", source):
            label = found.group(1)
        if cell["cell_type"] == "markdown":
            source, gated = withhold_between_gates(source, gated, where)
            source, _ = withhold_solution_directives(source, where)
            source, _ = _replace_regions(source, BEGIN_SOLUTION, END_SOLUTION, WITHHELD, where)
        elif cell["cell_type"] == "code":
            if gated and not is_solution_cell(cell):
                raise ValueError(
                    f"{where}: a code cell inside a gated solution must be a solution cell "
                    "(tag `solution`, nbgrader solution: true), or it shows the answer"
                )
            label = _exercise_label(cell, label)
            source, _ = _replace_regions(source, BEGIN_HIDDEN_TESTS, END_HIDDEN_TESTS, None, where)
            source, replaced = _replace_regions(
                source, BEGIN_SOLUTION, END_SOLUTION, stub(label), where
            )
            if is_solution_cell(cell) and not replaced:
                source = stub(label)
            if is_solution_cell(cell):
                tags = cell.get("metadata", {}).get("tags", [])
                if "hide-input" in tags:
                    tags.remove("hide-input")
            cell["outputs"] = []
            cell["execution_count"] = None
        cell["source"] = source
    if gated:
        raise ValueError(f"{name}: a {{solution-start}} is never closed by {{solution-end}}")
    return notebook


class WithholdSolutionText(Preprocessor):
    """An nbconvert preprocessor that withholds the body of every ``{solution}`` directive.

    nbgrader's own preprocessors stub the code solutions but leave markdown alone; add this one
    to ``GenerateAssignment.preprocessors`` (see :func:`nbgrader_preprocessors`) so that the
    worked answers of the conceptual exercises stay out of the released notebooks.
    """

    enabled = Bool(True, help="Whether to withhold the solutions (nbconvert's switch).").tag(
        config=True
    )

    def preprocess(self, nb, resources):
        self._gated = False
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "markdown":
            where = f"cell {index}"
            cell.source, self._gated = withhold_between_gates(cell.source, self._gated, where)
            cell.source, _ = withhold_solution_directives(cell.source, where)
        return cell, resources


def nbgrader_preprocessors() -> list[type]:
    """nbgrader's ``GenerateAssignment`` preprocessors with :class:`WithholdSolutionText` first.

    Use it in the course's ``nbgrader_config.py``::

        from bncourse.student import nbgrader_preprocessors
        c = get_config()
        c.GenerateAssignment.preprocessors = nbgrader_preprocessors()
    """
    from nbgrader.converters import GenerateAssignment

    defaults = GenerateAssignment.class_traits()["preprocessors"].default()
    return [WithholdSolutionText, *defaults]


def _notebooks(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(p for p in path.glob("*.ipynb") if not p.name.startswith((".", "_")))
            )
        elif path.suffix == ".ipynb" and path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a notebook nor a folder of notebooks")
    return found


def write_student_edition(paths: Sequence[Path], output: Path) -> list[Path]:
    """Write the student edition of the notebooks ``paths`` (files or folders) into ``output``.

    Returns the paths written. Refuses to write over a source notebook.
    """
    written: list[Path] = []
    output.mkdir(parents=True, exist_ok=True)
    for path in _notebooks(paths):
        target = output / path.name
        if target.resolve() == path.resolve():
            raise ValueError(f"refusing to overwrite the source notebook {path}")
        notebook = json.loads(path.read_text(encoding="utf-8"))
        student = student_notebook(notebook, name=str(path))
        target.write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n", "utf-8")
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bncourse.student",
        description="Write the student edition of chapters: notebooks with every solution "
        "replaced by a stub and every worked answer withheld.",
    )
    parser.add_argument(
        "notebooks",
        nargs="*",
        type=Path,
        help="chapter notebooks or folders of notebooks (default: book/)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("student"),
        help="output folder (default: student/)",
    )
    args = parser.parse_args(argv)
    try:
        written = write_student_edition(args.notebooks or [Path("book")], args.output)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("error: no notebooks found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
