"""Shared fixtures of the tests: one PyTorch thread, and the helpers of the tests of the course
tooling (student edition, nbgrader, website)."""

from __future__ import annotations

import re

import pytest

_FENCE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\{solution(-start)?\}")
_GATE_END = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\{solution-end\}")


def _solution_lines(notebook: dict) -> set[str]:
    """Every line of a notebook's reference solutions, stripped, that appears nowhere else in it.

    Solutions are the lines between ``BEGIN SOLUTION`` and ``END SOLUTION`` in any cell, the
    bodies of ``{solution}`` directives (after the ``:option:`` lines), and the markdown text of
    a gated solution (between the ``{solution-start}`` directive and ``{solution-end}``, across
    cells). A line that the notebook also holds outside its solutions (say ``return x``)
    reveals nothing and is left out.
    Written independently of ``bncourse.student`` on purpose.
    """
    inside, outside = set(), set()
    gated = False  # after a {solution-start}, before its {solution-end}
    for cell in notebook["cells"]:
        source = cell["source"]
        lines = ("".join(source) if isinstance(source, list) else source).splitlines()
        markdown = cell["cell_type"] == "markdown"
        region, fence, options, opens_gate = False, None, False, False
        for line in lines:
            text = line.strip()
            if "BEGIN SOLUTION" in line:
                region = True
            elif "END SOLUTION" in line:
                region = False
            elif fence is None and (match := _FENCE.match(line)):
                fence, options = match.group(1), True
                opens_gate = match.group(2) is not None
                outside.add(text)
            elif fence is None and _GATE_END.match(line):
                gated = False
                outside.add(text)
            elif fence is not None and set(text) == {fence[0]} and len(text) >= len(fence):
                fence = None
                gated = gated or opens_gate
                outside.add(text)
            elif fence is not None and options and (text.startswith(":") or not text):
                outside.add(text)
            else:
                options = False
                hidden = region or fence is not None or (gated and markdown)
                (inside if hidden else outside).add(text)
    return {line for line in inside - outside if line}


@pytest.fixture
def solution_lines():
    """The function that lists a notebook's reference-solution lines (see ``_solution_lines``)."""
    return _solution_lines


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test module with one PyTorch thread, restored afterwards.

    The tensors of those tests are small: one thread is as fast and steadier on a shared
    machine. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fast_kernels_on_small_inputs(monkeypatch):
    """Run the fast torch batch-norm kernels on small inputs too.

    The modules run the reference kernels below ``fast.SMALL_INPUT`` values; the inputs of the
    batch-norm test modules are small, so those modules ask for this fixture (``pytestmark``),
    and their parity tests test the fast path. Experiment and seed tests run what the chapters
    run. ``tests/test_fast_torch_bn_slabs.py`` tests the switch itself."""
    from bncourse.fast import torch_bn as fast

    monkeypatch.setattr(fast, "SMALL_INPUT", 0)


@pytest.fixture
def without_c_kernels():
    """Run a test with the fast kernels' PyTorch operations instead of the C kernels of
    ``bncourse.fast.native``, which take contiguous NCHW batch-norm input on a CPU (and the
    normalisation family's rows): the tests of the operations' routes ask for it."""
    from bncourse.fast import native

    with native.native_kernels(False):
        yield
