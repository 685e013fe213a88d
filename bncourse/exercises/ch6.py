"""Checks for the coding exercises of chapter 6 (why does batch norm work?).

* :func:`check_bn_jacobian` (ex-6-2): the Jacobian of one channel's training-mode batch norm.
* :func:`check_effective_learning_rate` (ex-6-4): effective learning rates and angular updates
  from a trajectory of scale-invariant weights.
"""

from __future__ import annotations

import numpy as np

from bncourse.analysis import angular_updates, autograd_bn_jacobian, effective_learning_rates
from bncourse.exercises._common import assert_close, exercise_check

__all__ = ["check_bn_jacobian", "check_effective_learning_rate"]


@exercise_check("ex-6-2")
def check_bn_jacobian(bn_jacobian):
    """``bn_jacobian(x, gamma, eps)`` equals autograd's Jacobian of our batch norm."""
    rng = np.random.default_rng(6)
    for m, gamma, eps in [(4, 1.0, 1e-5), (7, 2.5, 1e-3), (16, 0.5, 0.1), (2, 1.0, 1e-5)]:
        x = rng.normal(1.0, 3.0, m)
        actual = bn_jacobian(x.copy(), gamma, eps)
        assert actual is not None, "bn_jacobian returned None; return the (m, m) matrix"
        expected = autograd_bn_jacobian(x, gamma, eps)
        assert_close(
            actual,
            expected,
            f"the Jacobian for m={m}, gamma={gamma}, eps={eps}",
            rtol=1e-6,
            atol=1e-9,
        )
    # a constant channel: only the centring term survives, scaled by gamma / sqrt(eps)
    actual = bn_jacobian(np.full(5, 3.0), 2.0, 1e-4)
    assert_close(actual, 200.0 * (np.eye(5) - 0.2), "the Jacobian of a constant channel")


@exercise_check("ex-6-4")
def check_effective_learning_rate(effective_lr_and_angles):
    """``effective_lr_and_angles(trajectory, lr)`` returns ``lr / ||w_t||**2`` and the angles."""
    rng = np.random.default_rng(60)
    for shape, lr in [((6, 3, 4), 0.1), ((3, 10), 0.5), ((2, 2, 2, 2), 1.0)]:
        trajectory = rng.normal(size=shape) * rng.uniform(
            0.5, 3.0, (shape[0],) + (1,) * (len(shape) - 1)
        )
        result = effective_lr_and_angles(trajectory.copy(), lr)
        assert isinstance(result, tuple) and len(result) == 2, (
            "return a tuple (effective_lrs, angles)"
        )
        rates, angles = result
        norms = np.linalg.norm(trajectory.reshape(shape[0], -1), axis=1)
        assert_close(rates, effective_learning_rates(lr, norms), "the effective learning rates")
        assert_close(angles, angular_updates(trajectory), "the angular updates", atol=1e-7)
    # scaling the whole trajectory changes the rates by 1 / c**2 and not the angles
    trajectory = rng.normal(size=(5, 8))
    rates, angles = effective_lr_and_angles(3.0 * trajectory, 0.2)
    assert_close(
        angles, angular_updates(trajectory), "the angles of a scaled trajectory", atol=1e-7
    )
