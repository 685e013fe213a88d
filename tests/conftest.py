"""Shared helpers of the tests of the course tooling (student edition, nbgrader, website)."""

from __future__ import annotations

import re

import pytest

_FENCE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\{solution(-start)?\}")


def _solution_lines(notebook: dict) -> set[str]:
    """Every line of a notebook's reference solutions, stripped, that appears nowhere else in it.

    Solutions are the lines between ``BEGIN SOLUTION`` and ``END SOLUTION`` in any cell and the
    bodies of ``{solution}`` and ``{solution-start}`` directives (after the ``:option:`` lines).
    A line that the notebook also holds outside its solutions (say ``return x``) reveals nothing
    and is left out.
    Written independently of ``bncourse.student`` on purpose.
    """
    inside, outside = set(), set()
    for cell in notebook["cells"]:
        source = cell["source"]
        lines = ("".join(source) if isinstance(source, list) else source).splitlines()
        region, fence, options = False, None, False
        for line in lines:
            text = line.strip()
            if "BEGIN SOLUTION" in line:
                region = True
            elif "END SOLUTION" in line:
                region = False
            elif fence is None and (match := _FENCE.match(line)):
                fence, options = match.group(1), True
                outside.add(text)
            elif fence is not None and set(text) == {fence[0]} and len(text) >= len(fence):
                fence = None
                outside.add(text)
            elif fence is not None and options and (text.startswith(":") or not text):
                outside.add(text)
            else:
                options = False
                (inside if region or fence is not None else outside).add(text)
    return {line for line in inside - outside if line}


@pytest.fixture
def solution_lines():
    """The function that lists a notebook's reference-solution lines (see ``_solution_lines``)."""
    return _solution_lines
