"""Exercise checks of chapter 5, batch norm in convolutional networks.

* :func:`check_channel_statistics` (ex-5-2): per-channel mean and biased variance of an image
  batch, in the NCHW and the NHWC (channels-last) layout.
* :func:`check_spatial_backward` (ex-5-3): the backward pass of spatial batch norm, by reshaping
  onto the 1-D backward.
* :func:`check_fold_conv_bn` (ex-5-4): fold an evaluation-mode batch norm into the convolution
  before it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bncourse import numpy_bn
from bncourse.exercises._common import assert_close, exercise_check

__all__ = ["check_channel_statistics", "check_spatial_backward", "check_fold_conv_bn"]


def _image_batches() -> list[np.ndarray]:
    """Image batches (N, C, H, W) of varied shapes, offsets and spreads per channel."""
    rng = np.random.default_rng(5)
    batches = []
    for shape in [(8, 3, 5, 5), (2, 4, 3, 7), (16, 2, 1, 1), (1, 3, 4, 4), (5, 1, 6, 2)]:
        offsets = rng.normal(0.0, 10.0, size=(1, shape[1], 1, 1))
        spreads = rng.uniform(0.01, 5.0, size=(1, shape[1], 1, 1))
        batches.append(offsets + spreads * rng.standard_normal(shape))
    return batches


@exercise_check("ex-5-2")
def check_channel_statistics(channel_statistics) -> None:
    """``channel_statistics(x, channels_last)`` returns the per-channel ``(mean, var)``.

    ``x`` has shape (N, C, H, W) when ``channels_last`` is False and (N, H, W, C) when it is
    True; ``var`` is the biased variance (dividing by N * H * W).
    """
    for x in _image_batches():
        mean, var = numpy_bn.batch_statistics(x)
        n, c, h, w = x.shape
        got = channel_statistics(x, channels_last=False)
        assert isinstance(got, tuple) and len(got) == 2, (
            "channel_statistics must return a tuple (mean, var)"
        )
        assert_close(got[0], mean, f"the mean of an NCHW batch of shape {x.shape}")
        assert_close(
            got[1],
            var,
            f"the variance of an NCHW batch of shape {x.shape} (biased: divide by N*H*W = "
            f"{n * h * w}, not N*H*W - 1)",
        )
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        got = channel_statistics(x_nhwc, channels_last=True)
        assert_close(
            got[0], mean, f"the mean of an NHWC (channels-last) batch of shape {x_nhwc.shape}"
        )
        assert_close(
            got[1], var, f"the variance of an NHWC (channels-last) batch of shape {x_nhwc.shape}"
        )


def _reference_spatial_backward(dy, x, gamma, eps):
    _, cache = numpy_bn.batch_norm_forward(x, gamma, np.zeros_like(gamma), eps)
    return numpy_bn.batch_norm_backward(dy, cache)


@exercise_check("ex-5-3")
def check_spatial_backward(spatial_backward) -> None:
    """``spatial_backward(dy, x, gamma, eps)`` returns ``(dx, dgamma, dbeta)`` of spatial BN."""
    rng = np.random.default_rng(6)
    for x in _image_batches():
        if x.shape[0] * x.shape[2] * x.shape[3] < 2:
            continue
        gamma = rng.uniform(0.5, 2.0, size=x.shape[1])
        dy = rng.standard_normal(x.shape)
        for eps in (1e-5, 0.5):
            expected = _reference_spatial_backward(dy, x, gamma, eps)
            got = spatial_backward(dy, x, gamma, eps)
            assert isinstance(got, tuple) and len(got) == 3, (
                "spatial_backward must return a tuple (dx, dgamma, dbeta)"
            )
            where = f"for x of shape {x.shape}, eps={eps}"
            assert_close(got[2], expected[2], f"dbeta {where} (sum dy over batch and positions)")
            assert_close(got[1], expected[1], f"dgamma {where} (sum dy * x_hat per channel)")
            assert_close(
                got[0],
                expected[0],
                f"dx {where}; check that the statistics are per channel over N*H*W values and "
                "that the rows go back to (N, C, H, W) in the right order",
                rtol=1e-5,
                atol=1e-7,
            )


@exercise_check("ex-5-4")
def check_fold_conv_bn(fold_conv_bn) -> None:
    """``fold_conv_bn(weight, bias, gamma, beta, running_mean, running_var, eps)`` returns the
    folded ``(weight, bias)`` of the convolution, NumPy arrays of shapes (C_out, ...) and (C_out,).
    """
    rng = np.random.default_rng(7)
    cases = [
        ((4, 3, 3, 3), True),
        ((6, 2, 1, 1), False),
        ((2, 5, 3, 2), True),
        ((1, 1, 5, 5), False),
    ]
    for weight_shape, has_bias in cases:
        c_out = weight_shape[0]
        weight = rng.standard_normal(weight_shape)
        bias = rng.standard_normal(c_out) if has_bias else None
        gamma = rng.uniform(-2.0, 2.0, size=c_out)
        beta = rng.standard_normal(c_out)
        running_mean = rng.normal(0.0, 3.0, size=c_out)
        running_var = rng.uniform(0.01, 4.0, size=c_out)
        eps = 1e-3
        scale = gamma / np.sqrt(running_var + eps)
        expected_weight = weight * scale.reshape(-1, 1, 1, 1)
        expected_bias = ((bias if has_bias else 0.0) - running_mean) * scale + beta
        got = fold_conv_bn(weight, bias, gamma, beta, running_mean, running_var, eps)
        assert isinstance(got, tuple) and len(got) == 2, (
            "fold_conv_bn must return a tuple (weight, bias)"
        )
        where = f"for a weight of shape {weight_shape}, bias {'given' if has_bias else 'None'}"
        assert_close(
            got[0],
            expected_weight,
            f"the folded weight {where} (scale each output channel c by "
            "gamma[c] / sqrt(running_var[c] + eps))",
        )
        assert_close(
            got[1],
            expected_bias,
            f"the folded bias {where} (a missing bias counts as 0)",
        )
        # and the folded convolution computes BN(conv(x)) in evaluation mode
        conv = nn.Conv2d(weight_shape[1], c_out, weight_shape[2:], padding=1, dtype=torch.float64)
        x = torch.from_numpy(rng.standard_normal((2, weight_shape[1], 6, 6)))
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.asarray(got[0], dtype=np.float64)))
            conv.bias.copy_(torch.from_numpy(np.asarray(got[1], dtype=np.float64)))
            folded = conv(x).numpy()
            conv.weight.copy_(torch.from_numpy(weight))
            conv.bias.copy_(torch.from_numpy(bias if has_bias else np.zeros(c_out)))
            z = conv(x).numpy()
        reference = numpy_bn.batch_norm_inference(z, running_mean, running_var, gamma, beta, eps)
        assert_close(folded, reference, f"the folded convolution's output {where}", rtol=1e-6)
