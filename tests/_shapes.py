"""Input shapes shared by the parity tests of the batch-norm kernels (NumPy and PyTorch).

2-D to 5-D; C = 1; spatial size 1; N = 1 with spatial size > 1. Each shape is (N, C, *spatial).
"""

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
