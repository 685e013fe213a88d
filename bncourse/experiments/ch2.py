"""Experiments of chapter 2, the BN transform: its gradient, its cost, and what it buys.

Each function computes and returns plain data (arrays, dataclasses); the notebook plots them.

* :func:`finite_difference_gradient` (from :mod:`bncourse.utils`): central differences of a
  scalar function of an array.
* :func:`whitening_estimation_error`: how well a mini-batch estimates BN's per-unit scales and
  a full whitening matrix, against batch size.
* :func:`whitening_flops`, :func:`time_whitening_and_batch_norm`: the cost of the two.
* :func:`ignored_normalization_demo`: the bias that grows without bound when the gradient step
  ignores that the mean depends on the parameters (Ioffe & Szegedy, 2015, section 2).
* :func:`scale_invariance`: BN(aWu) = BN(Wu) and the 1/a gradient, computed with autograd.
* :func:`learning_rate_sweep`, :func:`init_scale_sweep`: final test accuracy of a sigmoid MLP
  with and without BN.
* :func:`saturation_over_training`: the fraction of saturated sigmoid units as training goes on.
* :func:`batch_noise`: one example's normalised output across random mini-batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn

from bncourse import numpy_bn, training
from bncourse.data import Dataset, load_digits
from bncourse.models import make_mlp
from bncourse.training import train
from bncourse.utils import finite_difference_gradient

__all__ = [
    "finite_difference_gradient",
    "WhiteningError",
    "whitening_estimation_error",
    "whitening_flops",
    "time_whitening_and_batch_norm",
    "IgnoredNormalization",
    "ignored_normalization_demo",
    "ScaleInvariance",
    "scale_invariance",
    "Sweep",
    "learning_rate_sweep",
    "init_scale_sweep",
    "EffectiveLearningRate",
    "init_scale_effective_lr",
    "Saturation",
    "saturation_over_training",
    "BatchNoise",
    "batch_noise",
]


# ---------------------------------------------------------------------------------------------
# Why not full whitening
# ---------------------------------------------------------------------------------------------


def _inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric inverse square root of a symmetric positive definite matrix."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors / np.sqrt(values)) @ vectors.T


@dataclass
class WhiteningError:
    """Estimation errors of BN's scales and of a whitening matrix from mini-batches.

    Attributes
    ----------
    batch_sizes : np.ndarray, int, shape (B,)
    bn_error : np.ndarray, shape (B,)
        Mean over trials of the relative error (Euclidean norm) of the per-unit scales
        ``1 / sqrt(var_j + eps)`` estimated from a batch, against the true ones.
    whitening_error : np.ndarray, shape (B,)
        Mean over trials of the relative error (Frobenius norm) of the estimated whitening matrix
        ``(cov_B + eps I)^(-1/2)`` against ``(cov + eps I)^(-1/2)``.
    rank : np.ndarray, int, shape (B,)
        Rank of the mini-batch covariance (of the first trial): at most ``batch_size - 1``.
    condition : np.ndarray, shape (B,)
        Mean condition number of ``cov_B + eps I``.
    true_condition : float
        Condition number of the true ``cov + eps I``.
    dim : int
        Number of units.
    """

    batch_sizes: np.ndarray
    bn_error: np.ndarray
    whitening_error: np.ndarray
    rank: np.ndarray
    condition: np.ndarray
    true_condition: float
    dim: int


def whitening_estimation_error(
    dim: int = 64,
    batch_sizes: Sequence[int] = (16, 32, 64, 128, 256, 1024),
    trials: int = 20,
    eps: float = 1e-5,
    smallest_eigenvalue: float = 0.01,
    seed: int = 0,
) -> WhiteningError:
    """Estimate BN's per-unit scales and a full whitening matrix from Gaussian mini-batches.

    The units are Gaussian with a covariance whose eigenvalues are log-spaced from
    ``smallest_eigenvalue`` to 1 in random directions (correlated units, as in a hidden layer).

    Parameters
    ----------
    dim : int, default 64
        Number of units d.
    batch_sizes : sequence of int
        Mini-batch sizes m to try.
    trials : int, default 20
        Batches per size.
    eps : float, default 1e-5
        Added to the variances (BN) and to the covariance's diagonal (whitening).
    smallest_eigenvalue : float, default 0.01
        Smallest eigenvalue of the true covariance (the largest is 1).
    seed : int, default 0

    Returns
    -------
    WhiteningError
    """
    with threadpool_limits(limits=1):  # small matrices: one BLAS thread is faster, and exact
        return _whitening_estimation_error(dim, batch_sizes, trials, eps, smallest_eigenvalue, seed)


def _whitening_estimation_error(
    dim: int,
    batch_sizes: Sequence[int],
    trials: int,
    eps: float,
    smallest_eigenvalue: float,
    seed: int,
) -> WhiteningError:
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigenvalues = np.logspace(np.log10(smallest_eigenvalue), 0.0, dim)
    cov = (rotation * eigenvalues) @ rotation.T
    factor = rotation * np.sqrt(eigenvalues)
    true_scales = 1.0 / np.sqrt(np.diag(cov) + eps)
    true_whitening = _inverse_sqrt(cov + eps * np.eye(dim))
    true_condition = float((eigenvalues.max() + eps) / (eigenvalues.min() + eps))

    bn_error, whitening_error, rank, condition = [], [], [], []
    for m in batch_sizes:
        bn_e, wh_e, conds = [], [], []
        for trial in range(trials):
            x = rng.standard_normal((m, dim)) @ factor.T
            _, var = numpy_bn.batch_statistics(x)
            scales = 1.0 / np.sqrt(var + eps)
            bn_e.append(np.linalg.norm(scales - true_scales) / np.linalg.norm(true_scales))
            centred = x - x.mean(axis=0)
            values, vectors = np.linalg.eigh(centred.T @ centred / m)  # one decomposition
            values = np.clip(values, 0.0, None)
            if trial == 0:  # the rank as np.linalg.matrix_rank counts it
                tolerance = values.max() * dim * np.finfo(values.dtype).eps
                rank.append(int(np.sum(values > tolerance)))
            regularised = values + eps
            conds.append(regularised.max() / regularised.min())
            whitening = (vectors / np.sqrt(regularised)) @ vectors.T
            wh_e.append(np.linalg.norm(whitening - true_whitening) / np.linalg.norm(true_whitening))
        bn_error.append(np.mean(bn_e))
        whitening_error.append(np.mean(wh_e))
        condition.append(np.mean(conds))
    return WhiteningError(
        batch_sizes=np.asarray(batch_sizes),
        bn_error=np.asarray(bn_error),
        whitening_error=np.asarray(whitening_error),
        rank=np.asarray(rank),
        condition=np.asarray(condition),
        true_condition=true_condition,
        dim=dim,
    )


def whitening_flops(dim: int, batch_size: int) -> dict[str, float]:
    """Rough floating-point operation counts of one forward pass on a (m, d) mini-batch.

    BN: a mean, a variance and the normalisation, about ``5 m d``. Whitening: the covariance
    (``m d^2`` multiply-adds, 2 flops each), a symmetric eigendecomposition (about ``9 d^3``) and
    the product with the whitening matrix (``2 m d^2``).

    Returns
    -------
    dict with keys ``"bn"`` and ``"whitening"``
    """
    m, d = batch_size, dim
    return {"bn": 5.0 * m * d, "whitening": 2.0 * m * d**2 + 9.0 * d**3 + 2.0 * m * d**2}


def time_whitening_and_batch_norm(
    dim: int = 512, batch_size: int = 256, repeats: int = 5, seed: int = 0
) -> dict[str, float]:
    """Best-of-``repeats`` wall time (seconds) of a NumPy BN forward and a ZCA whitening forward.

    Both run with one BLAS thread.

    Parameters
    ----------
    dim : int, default 512
        Units d; the input is (batch_size, d).
    batch_size : int, default 256
    repeats : int, default 5
    seed : int, default 0

    Returns
    -------
    dict with keys ``"bn"`` and ``"whitening"``
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, dim))

    def whiten() -> np.ndarray:
        centred = x - x.mean(axis=0)
        cov = centred.T @ centred / batch_size + 1e-5 * np.eye(dim)
        return centred @ _inverse_sqrt(cov)

    def normalise() -> np.ndarray:
        return numpy_bn.batch_norm_forward(x, None, None)[0]

    times = {}
    with threadpool_limits(limits=1):  # both on one core, as the book's experiments run
        for name, fn in (("bn", normalise), ("whitening", whiten)):
            best = np.inf
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - start)
            times[name] = best
    return times


@dataclass
class IgnoredNormalization:
    """Gradient descent on a bias followed by mean subtraction, with and without the mean's path.

    Attributes
    ----------
    steps : np.ndarray, int, shape (T,)
    bias_ignored, bias_through : np.ndarray, shape (T,)
        The bias b after each step when the gradient ignores that the mean depends on b, and when
        it goes through the normalisation.
    loss_ignored, loss_through : np.ndarray, shape (T,)
        The loss at each step.
    """

    steps: np.ndarray
    bias_ignored: np.ndarray
    bias_through: np.ndarray
    loss_ignored: np.ndarray
    loss_through: np.ndarray


def ignored_normalization_demo(
    steps: int = 50, lr: float = 0.1, batch_size: int = 32, seed: int = 0
) -> IgnoredNormalization:
    """The example of Ioffe & Szegedy (2015), section 2, run with autograd.

    A layer adds a learned bias, ``x = u + b``, and is then centred, ``x_hat = x - mean(x)``; the
    loss is ``mean((x_hat - t)**2)`` for a target ``t`` whose mean is not zero. If the gradient
    treats ``mean(x)`` as a constant (``detach``), every step moves ``b`` but the centred output,
    hence the loss, never changes: ``b`` drifts without bound. Through the normalisation the
    gradient with respect to ``b`` is exactly zero.
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch_size, generator=generator, dtype=torch.float64)
    target = 1.0 + torch.randn(batch_size, generator=generator, dtype=torch.float64)
    results = {}
    for mode in ("ignored", "through"):
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        biases, losses = [], []
        for _ in range(steps):
            x = u + b
            mean = x.mean().detach() if mode == "ignored" else x.mean()
            loss = ((x - mean - target) ** 2).mean()
            loss.backward()
            with torch.no_grad():
                b -= lr * b.grad
            b.grad = None
            biases.append(float(b.detach()))
            losses.append(float(loss.detach()))
        results[mode] = (np.asarray(biases), np.asarray(losses))
    return IgnoredNormalization(
        steps=np.arange(1, steps + 1),
        bias_ignored=results["ignored"][0],
        bias_through=results["through"][0],
        loss_ignored=results["ignored"][1],
        loss_through=results["through"][1],
    )


# ---------------------------------------------------------------------------------------------
# Scale invariance
# ---------------------------------------------------------------------------------------------


@dataclass
class ScaleInvariance:
    """A linear layer followed by BN, evaluated at W and at a W.

    Attributes
    ----------
    scale : float
        The factor a.
    output, scaled_output : np.ndarray, shape (N, out_features)
        BN(W u) and BN(a W u).
    grad, scaled_grad : np.ndarray, shape (out_features, in_features)
        dL/dW at W and dL/d(aW) at a W, for the same loss.
    weight : np.ndarray, shape (out_features, in_features)
        W.
    input_grad, scaled_input_grad : np.ndarray, shape (N, in_features)
        dL/du at W and at a W: what the layer passes further down.
    """

    scale: float
    output: np.ndarray
    scaled_output: np.ndarray
    grad: np.ndarray
    scaled_grad: np.ndarray
    weight: np.ndarray
    input_grad: np.ndarray
    scaled_input_grad: np.ndarray


def scale_invariance(
    scale: float = 10.0,
    batch_size: int = 32,
    in_features: int = 20,
    out_features: int = 8,
    eps: float = 1e-5,
    seed: int = 0,
) -> ScaleInvariance:
    """Evaluate ``BN(W u)`` and its gradients at ``W`` and at ``scale * W`` (float64).

    The loss is a fixed random linear function of ``sigmoid(BN(W u))``, so it depends on W only
    through the normalised output.

    Parameters
    ----------
    scale : float, default 10.0
        The factor a in ``a * W``.
    batch_size, in_features, out_features : int
        ``u`` is (batch_size, in_features), ``W`` is (out_features, in_features).
    eps : float, default 1e-5
    seed : int, default 0

    Returns
    -------
    ScaleInvariance
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch_size, in_features, generator=generator, dtype=torch.float64)
    weight = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
    weight = weight / np.sqrt(in_features)
    readout = torch.randn(batch_size, out_features, generator=generator, dtype=torch.float64)
    outputs, grads, input_grads = [], [], []
    for factor in (1.0, scale):
        w = (factor * weight).requires_grad_(True)
        inputs = u.clone().requires_grad_(True)
        z = F.batch_norm(inputs @ w.T, None, None, training=True, eps=eps)
        loss = (torch.sigmoid(z) * readout).sum()
        loss.backward()
        outputs.append(z.detach().numpy())
        grads.append(w.grad.numpy())
        input_grads.append(inputs.grad.numpy())
    return ScaleInvariance(
        scale=float(scale),
        output=outputs[0],
        scaled_output=outputs[1],
        grad=grads[0],
        scaled_grad=grads[1],
        weight=weight.numpy(),
        input_grad=input_grads[0],
        scaled_input_grad=input_grads[1],
    )


# ---------------------------------------------------------------------------------------------
# Learning-rate and init-scale sweeps
# ---------------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """Final test accuracy of a sigmoid MLP over a range of one hyperparameter.

    Attributes
    ----------
    name : str
        ``"lr"`` or ``"init_scale"``.
    values : np.ndarray, shape (V,)
        The values tried.
    accuracy : dict of str to np.ndarray, shape (V,)
        Final test accuracy per label (``"no BN"``, ``"BN"``).
    config : dict
        The fixed arguments.
    """

    name: str
    values: np.ndarray
    accuracy: dict[str, np.ndarray]
    config: dict

    def trains(self, label: str, threshold: float) -> np.ndarray:
        """Boolean mask of the values where ``label`` reached ``threshold`` test accuracy."""
        return self.accuracy[label] >= threshold


_NORMS = {"no BN": None, "BN": "bn"}


def _sigmoid_mlp(
    data: Dataset, norm: str | None, depth: int, width: int, init_scale: float, seed: int
) -> nn.Module:
    """The chapter's sigmoid MLP for ``data``, with ``torch.nn`` BN layers when ``norm="bn"``.

    Built by :func:`bncourse.models.make_mlp` (seeded with ``seed``, the hidden layers' initial
    weights times ``init_scale``); the sweeps and the saturation run all train this network.
    """
    return make_mlp(
        data.num_features,
        data.num_classes,
        depth=depth,
        width=width,
        activation="sigmoid",
        norm=norm,
        bn_impl="torch",
        init_scale=init_scale,
        seed=seed,
    )


def _sweep(
    name: str,
    values: Sequence[float],
    data: Dataset | None,
    lr: float,
    init_scale: float,
    depth: int,
    width: int,
    steps: int,
    batch_size: int,
    seed: int,
    device: torch.device | str | None,
) -> Sweep:
    data = load_digits() if data is None else data
    accuracy = {label: [] for label in _NORMS}
    for value in values:
        scale = value if name == "init_scale" else init_scale

        def make_model(norm: str | None, seed: int, scale: float = scale) -> nn.Module:
            return _sigmoid_mlp(data, norm, depth, width, scale, seed)

        histories = training.learning_rate_sweep(
            make_model,
            data,
            lrs=[value if name == "lr" else lr],
            norms=list(_NORMS.values()),
            seeds=[seed],
            steps=steps,
            batch_size=batch_size,
            device=device,
            eval_every=0,
        )
        for label, norm in _NORMS.items():
            history = next(h for (n, _, _), h in histories.items() if n == norm)
            finite = np.isfinite(history.final_test_loss)
            accuracy[label].append(history.final_test_accuracy if finite else 0.0)
    accuracy = {label: np.asarray(values_) for label, values_ in accuracy.items()}
    config = dict(
        lr=lr,
        init_scale=init_scale,
        depth=depth,
        width=width,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
    )
    config.pop(name)
    return Sweep(
        name=name, values=np.asarray(values, dtype=float), accuracy=accuracy, config=config
    )


def learning_rate_sweep(
    lrs: Sequence[float] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
    data: Dataset | None = None,
    init_scale: float = 4.0,
    depth: int = 3,
    width: int = 64,
    steps: int = 150,
    batch_size: int = 60,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Sweep:
    """Final test accuracy of a sigmoid MLP on digits, with and without BN, for each SGD lr.

    ``init_scale=4`` multiplies PyTorch's default initial weights by 4, a good start for a
    sigmoid network *without* BN (sigmoid's slope at 0 is 1/4), so the comparison is fair to it.
    Built on :func:`bncourse.training.learning_rate_sweep`; a diverged run counts as accuracy 0.

    Parameters
    ----------
    lrs : sequence of float
        The learning rates.
    data : Dataset, optional
        Default ``load_digits()``.
    init_scale : float, default 4.0
    depth, width : int, default 3 and 64
        Hidden layers and units per layer.
    steps, batch_size, seed : int
        Passed to :func:`bncourse.training.train`; ``seed`` also seeds the initial weights.
    device : optional
        Default :func:`bncourse.get_device`.

    Returns
    -------
    Sweep
        ``accuracy["no BN"]`` and ``accuracy["BN"]``, shape (len(lrs),).
    """
    return _sweep("lr", lrs, data, 1.0, init_scale, depth, width, steps, batch_size, seed, device)


def init_scale_sweep(
    init_scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
    data: Dataset | None = None,
    lr: float = 1.0,
    depth: int = 3,
    width: int = 64,
    steps: int = 150,
    batch_size: int = 60,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Sweep:
    """Final test accuracy of a sigmoid MLP on digits, with and without BN, for each init scale.

    The hidden layers' initial weights are PyTorch's default times the scale (see
    :func:`bncourse.models.make_mlp`). Arguments as :func:`learning_rate_sweep`, with one
    learning rate ``lr`` and the scales ``init_scales``.

    Returns
    -------
    Sweep
        ``accuracy["no BN"]`` and ``accuracy["BN"]``, shape (len(init_scales),).
    """
    return _sweep(
        "init_scale", init_scales, data, lr, 1.0, depth, width, steps, batch_size, seed, device
    )


@dataclass
class EffectiveLearningRate:
    """The effective learning rate of the BN network's hidden layers in the init-scale sweep.

    For a linear layer followed by BN, the function does not depend on the scale of the weight
    rows, and an SGD step of learning rate ``lr`` moves a row ``W_k`` by an angle that scales like
    ``lr / |W_k|^2`` (chapter 2, "Scale invariance"). This measures that quantity.

    Attributes
    ----------
    init_scales : np.ndarray, shape (V,)
        The initial weight scales tried.
    start, end : np.ndarray, shape (V,)
        ``lr / |W_k|^2`` averaged over the rows ``k`` of all hidden layers, at initialisation and
        after training.
    accuracy : np.ndarray, shape (V,)
        Final test accuracy of the BN network.
    """

    init_scales: np.ndarray
    start: np.ndarray
    end: np.ndarray
    accuracy: np.ndarray


def _hidden_effective_lr(model: torch.nn.Module, lr: float) -> float:
    """``lr / |W_k|^2`` averaged over the rows of every hidden ``Linear`` layer of ``model``."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][:-1]  # not the output
    squared = torch.cat([m.weight.detach().pow(2).sum(dim=1).cpu() for m in linears])
    return float((lr / squared).mean())


def init_scale_effective_lr(
    init_scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
    data: Dataset | None = None,
    lr: float = 1.0,
    depth: int = 3,
    width: int = 64,
    steps: int = 150,
    batch_size: int = 60,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> EffectiveLearningRate:
    """Train the BN network of :func:`init_scale_sweep` at each initial scale and measure the
    effective learning rate ``lr / |W_k|^2`` of its hidden layers before and after training.

    Same network, data, seed and arguments as :func:`init_scale_sweep` (its ``"BN"`` curve).
    """
    data = load_digits() if data is None else data
    start, end, accuracy = [], [], []
    for scale in init_scales:
        model = _sigmoid_mlp(data, "bn", depth, width, scale, seed)
        start.append(_hidden_effective_lr(model, lr))
        history = train(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            eval_every=0,
        )
        end.append(_hidden_effective_lr(model, lr))
        accuracy.append(history.final_test_accuracy)
    return EffectiveLearningRate(
        init_scales=np.asarray(init_scales, dtype=float),
        start=np.asarray(start),
        end=np.asarray(end),
        accuracy=np.asarray(accuracy),
    )


# ---------------------------------------------------------------------------------------------
# Saturation
# ---------------------------------------------------------------------------------------------


@dataclass
class Saturation:
    """Fraction of saturated sigmoid units over training.

    Attributes
    ----------
    steps : np.ndarray, int, shape (T,)
        Recorded steps.
    fraction : dict of str to np.ndarray, shape (T, depth)
        Per label, the fraction of (example, unit) pairs of each hidden layer whose sigmoid input
        has ``|z| > threshold``, over the training mini-batch of the step.
    final_accuracy : dict of str to float
        Test accuracy at the end.
    threshold : float
        ``|z|`` above which a unit counts as saturated.
    final_preactivations : dict of str to np.ndarray, shape (N, width)
        Inputs of the last hidden layer's sigmoid on the final recorded batch.
    """

    steps: np.ndarray
    fraction: dict[str, np.ndarray]
    final_accuracy: dict[str, float]
    threshold: float
    final_preactivations: dict[str, np.ndarray]


def _saturation_run(
    model: nn.Module, data: Dataset, threshold: float, **train_kwargs
) -> tuple[np.ndarray, float, np.ndarray]:
    """Train ``model``; per recorded step, the saturated fraction of each hidden layer, then
    the final test accuracy and the last recorded pre-activations of the last hidden layer."""
    rows, last = [], []

    @torch.no_grad()
    def count_saturated(step: int, pre: list[torch.Tensor]) -> None:
        rows.append(torch.stack([(z.abs() > threshold).float().mean() for z in pre]))
        last[:] = [pre[-1].detach()]

    history = train(model, data, preactivation_callback=count_saturated, **train_kwargs)
    return torch.stack(rows).cpu().numpy(), history.final_test_accuracy, last[0].cpu().numpy()


def saturation_over_training(
    data: Dataset | None = None,
    depth: int = 4,
    width: int = 64,
    lr: float = 3.0,
    init_scale: float = 4.0,
    steps: int = 300,
    batch_size: int = 60,
    record_every: int = 10,
    threshold: float = float(np.log(19.0)),
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Saturation:
    """Train sigmoid MLPs with and without BN and record how many of their units saturate.

    A sigmoid unit is saturated when ``|z| > threshold``; the default ``log(19)`` means an output
    below 0.05 or above 0.95, where the slope ``sigmoid'(z)`` is below 0.0475, less than a fifth
    of its value 0.25 at z = 0.
    Plain SGD; one thread on the CPU; same ``seed``, same result.
    """
    data = load_digits() if data is None else data
    fraction, final_accuracy, final_pre = {}, {}, {}
    recorded_steps = np.arange(0, steps, record_every)
    for label, norm in _NORMS.items():
        model = _sigmoid_mlp(data, norm, depth, width, init_scale, seed)
        fraction[label], final_accuracy[label], final_pre[label] = _saturation_run(
            model,
            data,
            threshold,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            eval_every=0,
            record_every=record_every,
        )
    return Saturation(
        steps=recorded_steps,
        fraction=fraction,
        final_accuracy=final_accuracy,
        threshold=float(threshold),
        final_preactivations=final_pre,
    )


# ---------------------------------------------------------------------------------------------
# The noise of mini-batch statistics
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchNoise:
    """One example's BN output across random mini-batches that contain it.

    Attributes
    ----------
    batch_sizes : np.ndarray, int, shape (B,)
    outputs : dict of int to np.ndarray, shape (trials, units)
        Per batch size, the example's normalised output in each trial batch.
    spread : np.ndarray, shape (B,)
        Standard deviation over trials, averaged over units.
    predicted_spread : np.ndarray, shape (B,)
        The large-batch prediction ``sqrt((1 + x_hat**2 / 2) / m)`` averaged over units, where
        ``x_hat`` is the example's value normalised with population statistics.
    population_output : np.ndarray, shape (units,)
        The example normalised with the statistics of the whole training set (what evaluation
        mode uses once the running averages have converged).
    """

    batch_sizes: np.ndarray
    outputs: dict[int, np.ndarray]
    spread: np.ndarray
    predicted_spread: np.ndarray
    population_output: np.ndarray


def batch_noise(
    data: Dataset | None = None,
    batch_sizes: Sequence[int] = (4, 8, 16, 32, 64, 128, 256),
    trials: int = 200,
    units: int = 16,
    example: int = 0,
    seed: int = 0,
) -> BatchNoise:
    """Normalise one training example inside many random mini-batches of each size.

    A random linear layer (``units`` outputs, weights N(0, 1/64)) maps the digits (pixel values
    in [0, 1], not standardised, unless ``data`` is given) to pre-activations. Each trial draws
    ``m - 1`` other training examples, puts ``example`` with them, and records the example's row
    of ``batch_norm_forward`` (no gamma, beta).

    (Standardised digits are avoided by default: rare pixels become huge values after
    standardisation and make some examples extreme outliers, far from the large-batch regime.)
    """
    data = load_digits(standardize=False) if data is None else data
    rng = np.random.default_rng(seed)
    x = data.x_train.astype(np.float64)
    weight = rng.standard_normal((x.shape[1], units)) / np.sqrt(x.shape[1])
    pre = x @ weight
    others = np.delete(np.arange(len(pre)), example)
    mean, var = numpy_bn.batch_statistics(pre)
    population = (pre[example] - mean) / np.sqrt(var + 1e-5)
    outputs, spread, predicted = {}, [], []
    for m in batch_sizes:
        rows = []
        for _ in range(trials):
            index = np.concatenate([[example], rng.choice(others, size=m - 1, replace=False)])
            y, _ = numpy_bn.batch_norm_forward(pre[index], None, None)
            rows.append(y[0])
        outputs[int(m)] = np.asarray(rows)
        spread.append(outputs[int(m)].std(axis=0).mean())
        predicted.append(np.sqrt((1.0 + population**2 / 2.0) / m).mean())
    return BatchNoise(
        batch_sizes=np.asarray(batch_sizes),
        outputs=outputs,
        spread=np.asarray(spread),
        predicted_spread=np.asarray(predicted),
        population_output=population,
    )


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

_GRAPH_NODES = {
    "x": (0.0, 0.0, "$x_i$"),
    "mu": (1.2, 1.0, r"$\mu_B$"),
    "xc": (2.4, 0.0, r"$x_i - \mu_B$"),
    "var": (3.6, 1.0, r"$\sigma_B^2$"),
    "inv": (4.8, 1.0, r"$\frac{1}{\sqrt{\sigma_B^2+\epsilon}}$"),
    "xhat": (6.0, 0.0, r"$\hat x_i$"),
    "params": (6.0, 1.0, r"$\gamma,\ \beta$"),
    "y": (7.2, 0.0, "$y_i$"),
}
_GRAPH_HALF_WIDTH = {"xc": 36, "inv": 30, "params": 28}  # points from a node's centre to its edge
_GRAPH_EDGES = [
    ("x", "mu"),
    ("x", "xc"),
    ("mu", "xc"),
    ("xc", "var"),
    ("var", "inv"),
    ("inv", "xhat"),
    ("xc", "xhat"),
    ("xhat", "y"),
    ("params", "y"),
]


def draw_computational_graph(ax) -> None:
    """Draw the forward computational graph of batch norm for one unit on ``ax``.

    Nodes are the intermediate values of :func:`bncourse.numpy_bn.batch_norm_backward_graph`;
    the two nodes with two children (``x_i`` and ``x_i - mu_B``) are outlined in vermilion,
    because the backward pass sums the gradients arriving along their two out-going edges.
    """
    from bncourse import plotting

    plotting.use_book_style()
    twice_used = {"x", "xc"}
    for start, end in _GRAPH_EDGES:
        (x0, y0, _), (x1, y1, _) = _GRAPH_NODES[start], _GRAPH_NODES[end]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(
                arrowstyle="-|>",
                color="#555555",
                lw=1.4,
                shrinkA=_GRAPH_HALF_WIDTH.get(start, 20),
                shrinkB=_GRAPH_HALF_WIDTH.get(end, 20),
            ),
        )
    for name, (x, y, text) in _GRAPH_NODES.items():
        edge = plotting.COLORS["no BN"] if name in twice_used else "#333333"
        ax.text(
            x,
            y,
            text,
            ha="center",
            va="center",
            fontsize=13,
            bbox=dict(boxstyle="round,pad=0.45", facecolor="#eef4fa", edgecolor=edge, lw=1.5),
        )
    ax.set_xlim(-0.6, 7.8)
    ax.set_ylim(-0.5, 1.5)
    ax.axis("off")
