"""Automatic checks for the book's coding exercises, one module per chapter.

A check takes the learner's function, runs it on test inputs and compares the result with the
package's reference implementation. It prints a short confirmation when every case passes, raises
:class:`ExerciseFailed` (an ``AssertionError``) that says what is wrong otherwise, and raises
:class:`NotImplementedYet` when the learner's function is still the stub.
"""

from bncourse.exercises._common import ExerciseFailed, NotImplementedYet, exercise_check

__all__ = ["ExerciseFailed", "NotImplementedYet", "exercise_check"]
