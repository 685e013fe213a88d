"""Measurements behind chapter 6: what batch norm does to gradients, Jacobians and the loss.

Every function takes a model (or plain tensors) and returns numbers; none of them trains. They
are called from training callbacks by :mod:`bncourse.experiments.ch6` and by the notebook.

* :func:`internal_covariate_shift`: the change of a layer's gradient after the layers below take
  their step, as Santurkar et al. (2018) define internal covariate shift.
* :func:`gradient_probe`: the loss and the gradient along the gradient direction at several step
  sizes (loss range, gradient change, effective beta-smoothness).
* :func:`weight_norms`, :func:`effective_learning_rates`, :func:`angular_updates`: the norms of
  scale-invariant weights and the learning rate they imply.
* :func:`layer_gradient_norms`: the norm of each hidden layer's weight gradient.
* :func:`bn_jacobian`, :func:`autograd_bn_jacobian`: the Jacobian of the batch-norm transform of
  one channel over the batch, derived and by automatic differentiation.
* :func:`layer_jacobian_singular_values`: singular values of each hidden layer's Jacobian.
* :func:`batch_norm_eps_outside`: batch norm with ``eps`` added to the standard deviation instead
  of the variance (to show why it is not).
* :func:`output_spread`: how much one example's output moves with its batch-mates.

The models are :class:`bncourse.models.MLP` or any module with the same layout: ``model.hidden``
a sequence of blocks with a ``.linear`` layer, and ``model.output`` the final linear layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bncourse import torch_bn

__all__ = [
    "hidden_weights",
    "gradients",
    "ShiftMeasurement",
    "internal_covariate_shift",
    "GradientProbe",
    "gradient_probe",
    "weight_norms",
    "effective_learning_rates",
    "angular_updates",
    "layer_gradient_norms",
    "bn_jacobian",
    "autograd_bn_jacobian",
    "layer_jacobian_singular_values",
    "batch_norm_eps_outside",
    "output_spread",
]


def hidden_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weight of every hidden layer's linear map, first to last (``model.hidden[i].linear``)."""
    if not hasattr(model, "hidden"):
        raise TypeError(f"model must have .hidden blocks like bncourse.models.MLP, got {model!r}")
    return [block.linear.weight for block in model.hidden]


def _loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs), labels)


def gradients(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor]]:
    """Cross-entropy of one batch and its gradient for every trainable parameter, by name.

    The model's own ``.grad`` fields are not touched (the gradients come from
    :func:`torch.autograd.grad`); in training mode its batch-norm running statistics are updated
    by the forward pass, as in any training step.

    Returns
    -------
    loss : float
    grads : dict of str to torch.Tensor
        ``grads[name]`` has the shape of the parameter ``name`` (``model.named_parameters()``).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = _loss(model, inputs, labels)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    result = {
        name: torch.zeros_like(p) if g is None else g.detach()
        for (name, p), g in zip(named, grads, strict=True)
    }
    return float(loss.detach()), result


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@dataclass
class ShiftMeasurement:
    """Internal covariate shift of each layer at one step, in Santurkar et al.'s sense.

    Layer ``i`` is hidden layer ``i`` for ``i < depth`` and the output layer for ``i = depth``;
    layer 0 has no layer below it and is left out, so the arrays have ``depth`` entries, for
    layers 1 .. depth.

    Attributes
    ----------
    l2 : np.ndarray, shape (depth,)
        ``||G - G'||``: the change of the layer's weight gradient.
    relative : np.ndarray, shape (depth,)
        ``||G - G'|| / ||G||``.
    cosine : np.ndarray, shape (depth,)
        Cosine of the angle between ``G`` and ``G'`` (1: same direction).
    """

    l2: np.ndarray
    relative: np.ndarray
    cosine: np.ndarray


def _layer_names(model: nn.Module) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    weights = [*hidden_weights(model), model.output.weight]
    return [names[id(w)] for w in weights]


def internal_covariate_shift(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    *,
    after_update: Callable[[nn.Module], None] | None = None,
) -> ShiftMeasurement:
    """Change of each layer's gradient when the layers below take their SGD step.

    Santurkar et al. (2018, Definition 2.1): with ``G`` the gradient of layer ``i``'s weight at
    the current parameters and ``G'`` the same gradient, on the same batch, after every parameter
    of the layers *below* ``i`` has taken its step ``-lr * gradient``, the shift is ``||G - G'||``
    (and the angle between them). ``G'`` sees the distribution change of its input that the
    update below causes; the layer itself and the ones above are not moved.

    The model is not modified: every measurement runs on a copy.

    Parameters
    ----------
    model : nn.Module
        An :class:`~bncourse.models.MLP`-like model (``.hidden[i].linear``, ``.output``).
    inputs : torch.Tensor, shape (N, in_features)
    labels : torch.Tensor, int64, shape (N,)
    lr : float
        The step size of the update below.
    after_update : callable, optional
        Called on the copy after the update below and before ``G'`` is computed; for instance
        to redraw injected noise (the noise is part of what moves below the layer).

    Returns
    -------
    ShiftMeasurement
        For layers 1 .. depth (the output layer last).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    names = _layer_names(model)
    reference = copy.deepcopy(model)
    reference.train(model.training)
    _, grads = gradients(reference, inputs, labels)
    l2, relative, cosine = [], [], []
    for i in range(1, len(names)):
        below = tuple(f"hidden.{j}." for j in range(i))
        moved = copy.deepcopy(model)
        moved.train(model.training)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                if name.startswith(below) and name in grads:
                    p.sub_(lr * grads[name])
        if after_update is not None:
            after_update(moved)
        _, moved_grads = gradients(moved, inputs, labels)
        g, g_moved = grads[names[i]], moved_grads[names[i]]
        change = float(torch.linalg.vector_norm(g - g_moved))
        norm = float(torch.linalg.vector_norm(g))
        l2.append(change)
        relative.append(change / norm if norm > 0 else float("nan"))
        cosine.append(float(F.cosine_similarity(g.reshape(1, -1), g_moved.reshape(1, -1))[0]))
    return ShiftMeasurement(np.array(l2), np.array(relative), np.array(cosine))


@dataclass
class GradientProbe:
    """The loss and its gradient along the negative gradient, at several step sizes.

    Attributes
    ----------
    step_sizes : np.ndarray, shape (K,)
    losses : np.ndarray, shape (K,)
        Loss at ``theta - step * g`` for each step size (``g`` the gradient at ``theta``).
    gradient_changes : np.ndarray, shape (K,)
        ``||grad L(theta - step * g) - g||``.
    loss : float
        Loss at ``theta``.
    gradient_norm : float
        ``||g||``.
    """

    step_sizes: np.ndarray
    losses: np.ndarray
    gradient_changes: np.ndarray
    loss: float
    gradient_norm: float

    @property
    def loss_range(self) -> float:
        """Largest minus smallest loss over the probed points, ``theta`` included."""
        values = np.append(self.losses, self.loss)
        return float(values.max() - values.min())

    @property
    def max_gradient_change(self) -> float:
        """Largest ``||grad L(theta') - grad L(theta)||`` over the probed points."""
        return float(self.gradient_changes.max())

    @property
    def beta_smoothness(self) -> float:
        """Effective beta-smoothness: max of gradient change / distance moved, ``step * ||g||``."""
        return float(np.max(self.gradient_changes / (self.step_sizes * self.gradient_norm)))


def gradient_probe(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    step_sizes: Sequence[float] = (0.05, 0.1, 0.2, 0.4),
) -> GradientProbe:
    """Step along the negative gradient and record the loss and the gradient there.

    This is Santurkar et al.'s (2018) probe of the loss landscape: at the current parameters
    ``theta`` with gradient ``g`` (all trainable parameters, one batch), evaluate the same batch's
    loss and gradient at ``theta - step * g`` for every step size. A smooth landscape has a small
    loss range and small gradient changes; the "effective beta-smoothness" is the largest ratio of
    the gradient change to the distance moved. The model is not modified (copies are probed).

    Parameters
    ----------
    model : nn.Module
    inputs : torch.Tensor, shape (N, ...)
    labels : torch.Tensor, int64, shape (N,)
    step_sizes : sequence of float
        Positive step sizes (learning rates) to probe.

    Returns
    -------
    GradientProbe
    """
    steps = np.asarray(step_sizes, dtype=np.float64)
    if steps.ndim != 1 or steps.size == 0 or np.any(steps <= 0):
        raise ValueError(f"step_sizes must be positive numbers, got {step_sizes!r}")
    base = copy.deepcopy(model)
    base.train(model.training)
    loss, grads = gradients(base, inputs, labels)
    g = _flat(list(grads.values()))
    losses, changes = [], []
    for step in steps:
        moved = copy.deepcopy(model)
        moved.train(model.training)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                if name in grads:
                    p.sub_(float(step) * grads[name])
        moved_loss, moved_grads = gradients(moved, inputs, labels)
        losses.append(moved_loss)
        changes.append(float(torch.linalg.vector_norm(_flat(list(moved_grads.values())) - g)))
    return GradientProbe(
        step_sizes=steps,
        losses=np.array(losses),
        gradient_changes=np.array(changes),
        loss=loss,
        gradient_norm=float(torch.linalg.vector_norm(g)),
    )


def weight_norms(model: nn.Module) -> np.ndarray:
    """Frobenius norm of each hidden layer's weight, shape (depth,)."""
    return np.array([float(torch.linalg.vector_norm(w.detach())) for w in hidden_weights(model)])


def effective_learning_rates(lr: float | np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Effective learning rate ``lr / ||w||**2`` of scale-invariant weights of norm ``norms``.

    For a weight ``w`` followed by batch norm, the loss does not change when ``w`` is scaled,
    so the gradient is orthogonal to ``w`` and shrinks as ``1 / ||w||``: an SGD step changes the
    *direction* of ``w`` by ``lr * ||grad at unit norm|| / ||w||**2``. Shapes broadcast.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if np.any(norms <= 0):
        raise ValueError("norms must be positive")
    return np.asarray(lr, dtype=np.float64) / norms**2


def angular_updates(trajectory: np.ndarray) -> np.ndarray:
    """Angle (radians) between consecutive weights of a trajectory.

    Parameters
    ----------
    trajectory : np.ndarray, shape (T, ...)
        The weight at T successive steps.

    Returns
    -------
    np.ndarray, shape (T - 1,)
        ``angle(w_t, w_{t+1})``.
    """
    w = np.asarray(trajectory, dtype=np.float64).reshape(len(trajectory), -1)
    cos = np.sum(w[:-1] * w[1:], axis=1) / (
        np.linalg.norm(w[:-1], axis=1) * np.linalg.norm(w[1:], axis=1)
    )
    return np.arccos(np.clip(cos, -1.0, 1.0))


def layer_gradient_norms(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> np.ndarray:
    """Norm of the loss gradient of each hidden layer's weight, shape (depth,), first layer first.

    The model's ``.grad`` fields are left alone; in training mode its running statistics move.
    """
    weights = hidden_weights(model)
    loss = _loss(model, inputs, labels)
    grads = torch.autograd.grad(loss, weights)
    return np.array([float(torch.linalg.vector_norm(g)) for g in grads])


def bn_jacobian(x: np.ndarray, gamma: float = 1.0, eps: float = 1e-5) -> np.ndarray:
    """Jacobian of one channel's training-mode batch norm with respect to its batch of inputs.

    With ``m`` values ``x``, ``sigma = sqrt(var(x) + eps)`` (biased variance) and
    ``x_hat = (x - mean(x)) / sigma``, the output ``y = gamma * x_hat + beta`` has

        dy_i / dx_j = gamma / sigma * (delta_ij - 1 / m - x_hat_i * x_hat_j / m),

    a scaled projection: it removes the mean (the ``1 / m`` term) and the component along
    ``x_hat`` (for ``eps = 0``, ``x_hat / sqrt(m)`` is a unit vector).

    Parameters
    ----------
    x : np.ndarray, shape (m,)
    gamma : float
    eps : float

    Returns
    -------
    np.ndarray, shape (m, m)
        Entry ``[i, j]`` is ``dy_i / dx_j``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"x must be one channel's batch, shape (m,) with m >= 2; got {x.shape}")
    m = x.size
    sigma = np.sqrt(x.var() + eps)
    x_hat = (x - x.mean()) / sigma
    return gamma / sigma * (np.eye(m) - 1.0 / m - np.outer(x_hat, x_hat) / m)


def autograd_bn_jacobian(x: np.ndarray, gamma: float = 1.0, eps: float = 1e-5) -> np.ndarray:
    """The same Jacobian as :func:`bn_jacobian`, by ``torch.autograd.functional.jacobian``.

    Differentiates :func:`bncourse.torch_bn.batch_norm` (training mode, its hand-written
    backward) in float64 on the input ``x`` of shape (m,) seen as (m, 1): m examples, one channel.
    """
    x_t = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(-1, 1)
    weight = torch.full((1,), float(gamma), dtype=torch.float64)
    bias = torch.zeros(1, dtype=torch.float64)

    def transform(values: torch.Tensor) -> torch.Tensor:
        return torch_bn.batch_norm(values, None, None, weight, bias, training=True, eps=eps)

    jacobian = torch.autograd.functional.jacobian(transform, x_t)
    m = x_t.shape[0]
    return jacobian.reshape(m, m).numpy()


@torch.no_grad()
def _block_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    inputs, h = [], x.flatten(1)
    for block in model.hidden:
        inputs.append(h)
        h = block(h)
    return inputs


def layer_jacobian_singular_values(
    model: nn.Module, x: torch.Tensor, *, include_activation: bool = False
) -> list[np.ndarray]:
    """Singular values of each hidden layer's Jacobian, per example.

    The model is put in evaluation mode (batch norm uses its running statistics, so each
    example's output depends on that example alone) and restored afterwards. Layer ``i`` is the
    map ``h_{i-1} -> z_i = norm(linear(h_{i-1}))`` (the transformation that Ioffe & Szegedy's
    argument about Jacobians is about), or with ``include_activation`` the whole block
    ``h_{i-1} -> activation(z_i)``, at the points ``h_{i-1}`` that the examples ``x`` reach.

    Parameters
    ----------
    model : nn.Module
        :class:`~bncourse.models.MLP`-like.
    x : torch.Tensor, shape (N, in_features)
    include_activation : bool, default False
        Differentiate the whole block rather than its pre-activation map.

    Returns
    -------
    list of np.ndarray
        One array per hidden layer, shape (N, min(fan_in, width)): the singular values of each
        example's Jacobian, largest first.
    """
    was_training = model.training
    model.eval()
    try:
        result = []
        for block, h in zip(model.hidden, _block_inputs(model, x), strict=True):
            # the outputs of different examples do not interact in evaluation mode, so the
            # Jacobian of the batch sum holds every example's Jacobian: J[:, n, :]
            layer = block if include_activation else block.preactivation
            jac = torch.autograd.functional.jacobian(lambda v, f=layer: f(v).sum(0), h)
            per_example = jac.permute(1, 0, 2)
            result.append(torch.linalg.svdvals(per_example).cpu().numpy())
    finally:
        model.train(was_training)
    return result


def batch_norm_eps_outside(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` per channel over the batch: eps outside the square root.

    Not how batch norm is defined; it exists to show what goes wrong. On a constant channel the
    square root is differentiated at 0, where its derivative is infinite, and the backward gives
    NaN.

    Parameters
    ----------
    x : torch.Tensor, shape (N, C)

    Returns
    -------
    torch.Tensor, shape (N, C)
    """
    mean = x.mean(dim=0)
    var = (x - mean).square().mean(dim=0)
    return (x - mean) / (var.sqrt() + eps)


@torch.no_grad()
def output_spread(
    model: nn.Module,
    example: torch.Tensor,
    pool: torch.Tensor,
    batch_size: int,
    *,
    num_batches: int = 50,
    seed: int = 0,
) -> float:
    """How much one example's logits move with its batch-mates, in training mode.

    The example is put into ``num_batches`` batches of ``batch_size`` with ``batch_size - 1``
    batch-mates drawn at random (without replacement within a batch) from ``pool``; the model runs
    in training mode, so batch norm uses each batch's statistics. A copy of the model runs, so the
    running statistics of ``model`` do not move.

    Parameters
    ----------
    model : nn.Module
    example : torch.Tensor, shape (in_features,) or (1, in_features)
    pool : torch.Tensor, shape (P, in_features)
        Candidate batch-mates, P >= batch_size - 1.
    batch_size : int
        At least 2.
    num_batches : int, default 50
    seed : int, default 0

    Returns
    -------
    float
        The standard deviation over batches of each logit, averaged over the logits.
    """
    if batch_size < 2 or batch_size - 1 > len(pool):
        raise ValueError(f"batch_size must be in 2 .. {len(pool) + 1}, got {batch_size}")
    work = copy.deepcopy(model).train()
    example = example.reshape(1, -1)
    rng = np.random.default_rng(seed)
    outputs = []
    for _ in range(num_batches):
        mates = torch.as_tensor(rng.choice(len(pool), batch_size - 1, replace=False))
        batch = torch.cat([example, pool[mates.to(pool.device)]])
        outputs.append(work(batch)[0])
    return float(torch.stack(outputs).std(dim=0).mean())
