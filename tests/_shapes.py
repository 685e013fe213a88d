"""Input shapes shared by the parity tests of the batch-norm kernels (NumPy and PyTorch).

Every shape is (N, C, *spatial).
"""

import math

from hypothesis import strategies as st

SHAPES = [
    (8, 3),
    (6, 1),
    (4, 3, 7),
    (1, 3, 5),
    (3, 2, 1),
    (2, 3, 4, 5),
    (1, 2, 3, 3),
    (5, 1, 2, 2),
    (3, 4, 1, 1),
    (2, 3, 2, 3, 4),
    (1, 2, 2, 2, 2),
]
"""2-D to 5-D; C = 1; spatial size 1; N = 1 with spatial size > 1."""


def random_shapes() -> st.SearchStrategy[tuple[int, ...]]:
    """Hypothesis strategy: 2-D to 5-D shapes of sizes 1 to 4 with more than one value per
    channel (so that the batch variance is defined)."""
    return (
        st.lists(st.integers(1, 4), min_size=2, max_size=5)
        .map(tuple)
        .filter(lambda s: math.prod(s) // s[1] > 1)
    )
