"""Machinery shared by the exercise checks of every chapter."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import numpy as np


class _CleanMessage(Exception):
    """An exception that Jupyter shows as one line, without a traceback through the package."""

    def _render_traceback_(self) -> list[str]:  # read by IPython in place of a traceback
        return [f"{type(self).__name__}: {self}"]


class NotImplementedYet(_CleanMessage):
    """The learner's function still raises ``NotImplementedError`` (the exercise's stub)."""


class ExerciseFailed(_CleanMessage, AssertionError):
    """The learner's function runs but gives a wrong answer; the message says where."""


def exercise_title(label: str) -> str:
    """How the book names exercise ``label``: ``"ex-2-1"`` is "Exercise 2.1"."""
    match = re.fullmatch(r"ex-(\d+)-(\d+)", label)
    return f"Exercise {match[1]}.{match[2]}" if match else f"Exercise {label}"


def exercise_check(label: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn a plain checking function into an exercise check for exercise ``label``.

    The decorated function receives the learner's function first and uses ``assert_close`` or
    plain ``assert`` to compare it with the reference. The wrapper turns the stub's
    ``NotImplementedError`` into :class:`NotImplementedYet` and an ``AssertionError`` into
    :class:`ExerciseFailed`, both with a one-line message, and prints a confirmation on success.
    """

    def decorate(check: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(check)
        def run_check(solution: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
            title = f"{exercise_title(label)} ({label})"
            if not callable(solution):
                raise TypeError(f"{title}: expected your function, got {solution!r}")
            name = getattr(solution, "__name__", "your function")
            try:
                check(solution, *args, **kwargs)
            except NotImplementedError:
                raise NotImplementedYet(
                    f"{title} is not implemented yet: replace the "
                    f"`raise NotImplementedError` in `{name}` with your solution, then rerun."
                ) from None
            except ExerciseFailed:
                raise
            except AssertionError as err:
                raise ExerciseFailed(f"{title}: {err}") from None
            print(f"{exercise_title(label)}: all checks passed.")
            return True

        return run_check

    return decorate


def assert_close(actual: Any, expected: Any, what: str, rtol: float = 1e-6, atol: float = 1e-8):
    """Assert that ``actual`` matches ``expected`` in shape and value, naming ``what`` if not."""
    actual = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual)
    expected = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what} has shape {actual.shape}, expected {expected.shape}")
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        worst = np.max(np.abs(actual.astype(float) - expected.astype(float)))
        raise AssertionError(f"{what} differs from the reference (largest difference {worst:.3g})")
