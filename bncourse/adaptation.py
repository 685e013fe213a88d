"""Test-time adaptation of batch norm to shifted data: AdaBN and Tent.

A model trained on one distribution and tested on a shifted one (other lighting, contrast,
sensor noise) normalises the shifted activations with the *training* population statistics,
which no longer centre and scale them. Two cheap remedies use unlabelled test data:

* :func:`adapt_batch_norm` (AdaBN, Li et al. 2016): recompute every batch norm's population
  statistics on target-domain batches, with a cumulative average; nothing else changes. It is
  :func:`bncourse.inference.recompute_population_statistics` run on the target data.
* :func:`tent` (Wang et al. 2021): normalise with the statistics of each test batch and update
  only the batch norms' gamma and beta by gradient descent on the entropy of the model's own
  predictions; :func:`configure_tent` prepares such a model, :func:`entropy` is the loss.

Both need *batches* of test data drawn from the shifted distribution; a batch of one example,
or a batch of a single class, gives statistics that describe that batch and not the domain.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bncourse.inference import batch_norm_modules, recompute_population_statistics

__all__ = ["adapt_batch_norm", "entropy", "configure_tent", "tent", "TentResult"]


def adapt_batch_norm(model: nn.Module, batches: Iterable[Any], inplace: bool = True) -> nn.Module:
    """AdaBN: replace the population statistics of every batch norm by the target domain's.

    Runs :func:`bncourse.inference.recompute_population_statistics` on ``batches``: every
    batch norm's running statistics are reset and recomputed as the cumulative average of the
    batch means and unbiased batch variances over ``batches`` (only the batch norms in
    training mode, dropout off, no gradients); modes and momenta are restored afterwards and the
    parameters are unchanged.

    Parameters
    ----------
    model : nn.Module
        A trained model with ``torch.nn`` or :mod:`bncourse.torch_bn` batch norms.
    batches : iterable
        Unlabelled target-domain batches: tensors of shape (N, ...) or ``(x, ...)`` tuples.
        Use large, class-mixed batches (a batch of one class shifts the statistics).
    inplace : bool, default True
        Adapt ``model`` itself; if False, adapt and return a deep copy.

    Returns
    -------
    nn.Module
        The adapted model (``model`` itself when ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    recompute_population_statistics(model, batches)
    return model


def _batch_input(batch: Any) -> Tensor:
    """The input of a batch given as a tensor, an array or an ``(x, ...)`` tuple."""
    return torch.as_tensor(batch[0] if isinstance(batch, (tuple, list)) else batch)


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (in nats) of the softmax predictions, logits (N, K) -> scalar."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def configure_tent(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of ``model`` set up for Tent, and the parameters Tent updates.

    In the copy every module is in evaluation mode except the batch norms, which are in training
    mode with ``track_running_stats=False`` and no running buffers, so that they normalise with
    the statistics of each batch and change no buffer. Only the batch norms' ``weight`` and
    ``bias`` require gradients.

    Parameters
    ----------
    model : nn.Module
        With ``torch.nn`` or :mod:`bncourse.torch_bn` batch norms with affine parameters.

    Returns
    -------
    adapted : nn.Module
        The configured copy (``model`` is not modified).
    parameters : list of nn.Parameter
        gamma and beta of every batch norm, in order.
    """
    adapted = copy.deepcopy(model)
    adapted.eval()
    adapted.requires_grad_(False)
    parameters: list[nn.Parameter] = []
    layers = batch_norm_modules(adapted)
    if not layers:
        raise ValueError("configure_tent: the model has no batch-norm layer")
    for bn in layers:
        bn.train()
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
        for parameter in (bn.weight, bn.bias):
            if parameter is not None:
                parameter.requires_grad_(True)
                parameters.append(parameter)
    if not parameters:
        raise ValueError("configure_tent: the batch norms have no affine parameters to update")
    return adapted, parameters


@dataclass
class TentResult:
    """What :func:`tent` returns.

    Attributes
    ----------
    model : nn.Module
        The adapted copy (batch norms use batch statistics; see :func:`configure_tent`).
    logits : Tensor, shape (N_total, K)
        The predictions made on every test batch, in order, each *before* the update on that
        batch (Tent's online protocol: predict, then adapt).
    entropies : list of float
        The mean entropy of each batch's predictions, before its update(s).
    """

    model: nn.Module
    logits: Tensor
    entropies: list[float]


def tent(
    model: nn.Module,
    batches: Iterable[Any],
    lr: float = 1e-3,
    steps: int = 1,
    optimizer: str = "adam",
    momentum: float = 0.9,
) -> TentResult:
    """Tent: test-time entropy minimisation over the batch norms' affine parameters.

    For every batch in turn: predict with batch statistics, record the logits, then take
    ``steps`` gradient steps on the mean entropy of the predictions, updating only gamma and
    beta of the batch norms. The optimizer's state carries over from batch to batch, as in
    Wang et al. (2021). ``model`` is not modified.

    Parameters
    ----------
    model : nn.Module
        A trained classifier (logits of shape (N, K)) with batch norms.
    batches : iterable
        Unlabelled test batches: tensors of shape (N, ...) or ``(x, ...)`` tuples; each needs
        more than one example (batch statistics).
    lr : float, default 1e-3
        Learning rate.
    steps : int, default 1
        Updates per batch.
    optimizer : {"adam", "sgd"}, default "adam"
        Adam (with PyTorch's defaults) or SGD with ``momentum``.
    momentum : float, default 0.9
        SGD momentum.

    Returns
    -------
    TentResult
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    adapted, parameters = configure_tent(model)
    if optimizer == "adam":
        optim: torch.optim.Optimizer = torch.optim.Adam(parameters, lr=lr)
    elif optimizer == "sgd":
        optim = torch.optim.SGD(parameters, lr=lr, momentum=momentum)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    device = parameters[0].device
    all_logits: list[Tensor] = []
    entropies: list[float] = []
    for batch in batches:
        x = _batch_input(batch).to(device=device, dtype=parameters[0].dtype)
        for step in range(steps):
            logits = adapted(x)
            loss = entropy(logits)
            if step == 0:
                all_logits.append(logits.detach())
                entropies.append(float(loss.detach()))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    if not all_logits:
        raise ValueError("tent: batches is empty")
    return TentResult(model=adapted, logits=torch.cat(all_logits), entropies=entropies)
