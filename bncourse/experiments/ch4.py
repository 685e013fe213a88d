"""Experiments of chapter 4: batch-norm statistics at inference.

Each function takes keyword arguments with small defaults and returns plain data (NumPy arrays
in dataclasses); the notebook plots and asserts. The models are the digits MLPs of
:func:`bncourse.models.make_mlp` with batch norm after every hidden linear layer.

* :func:`train_bn_mlp`: the chapter's trained model.
* :func:`batch_dependence`: one test example's prediction with different batch-mates, in
  training mode (batch statistics) and in evaluation mode (running statistics).
* :func:`variance_bias`: the bias of the batch variance at batch size ``m``, by simulation.
* :func:`statistics_over_training`: test accuracy during training with exponential moving
  averages of several momenta and with recomputed population statistics.
* :func:`forgotten_eval`: what evaluating in training mode does to accuracy and to the running
  statistics.
* :func:`small_batch_mismatch`: the train/eval gap of models trained with small batches, and the
  fix of fine-tuning with the batch norms frozen.
* :func:`folding_speedup`: outputs and timings of a model and its folded copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bncourse import get_device, utils
from bncourse.data import Dataset, load_digits
from bncourse.inference import (
    batch_norm_modules,
    fold_batch_norms,
    recompute_population_statistics,
    time_inference,
)
from bncourse.models import MLP, make_mlp
from bncourse.training import evaluate, train
from bncourse.utils import torch_threads

__all__ = [
    "train_bn_mlp",
    "BatchDependence",
    "batch_dependence",
    "VarianceBias",
    "variance_bias",
    "StatisticsOverTraining",
    "statistics_over_training",
    "ForgottenEval",
    "forgotten_eval",
    "SmallBatchMismatch",
    "small_batch_mismatch",
    "FoldingSpeedup",
    "folding_speedup",
]


def _relu_bn_mlp(data: Dataset, depth: int, width: int, bn_impl: str, seed: int) -> MLP:
    """The chapter's model for ``data``: ``depth`` hidden ``Linear -> BatchNorm1d -> ReLU``
    layers of ``width`` units, 10 outputs, from :func:`bncourse.models.make_mlp` seeded with
    ``seed`` (``bn_impl``: ``"bncourse"`` or ``"torch"`` batch-norm layers)."""
    return make_mlp(
        data.num_features,
        10,
        depth=depth,
        width=width,
        activation="relu",
        norm="bn",
        bn_impl=bn_impl,
        seed=seed,
    )


def train_bn_mlp(
    *,
    steps: int = 300,
    batch_size: int = 60,
    lr: float = 0.1,
    depth: int = 3,
    width: int = 100,
    bn_impl: str = "bncourse",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[MLP, Dataset]:
    """Train the chapter's model: a ReLU MLP with batch norm on the digits (split ``seed``).

    Parameters
    ----------
    steps, batch_size, lr : default 300, 60 and 0.1
        Plain SGD with :func:`bncourse.training.train`.
    depth, width : int, default 3 and 100
        Hidden layers (``Linear -> BatchNorm1d -> ReLU``) and units per layer.
    bn_impl : {"bncourse", "torch"}, default "bncourse"
    seed : int, default 0
        Seeds the split, the weights and the batch order.
    device : optional
        Default :func:`bncourse.get_device`.

    Returns
    -------
    model : MLP
        Trained, in training mode, on ``device``.
    data : Dataset
        The digits split the model was trained on.
    """
    data = load_digits(seed=seed)
    model = _relu_bn_mlp(data, depth, width, bn_impl, seed)
    train(
        model,
        data,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=0,
        device=get_device(device),
    )
    return model, data


# ---------------------------------------------------------------------------------------------
# An example's prediction depends on its batch-mates in training mode
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchDependence:
    """One test example processed with ``num_batches`` different sets of random batch-mates.

    Attributes
    ----------
    example_index : int
        Index of the example in the test split: the correctly classified example with the
        smallest evaluation-mode probability of its class (the most borderline one).
    label : int
        Its class.
    train_probability : np.ndarray, shape (num_batches,)
        Probability of the true class in training mode (batch statistics), one per batch.
    train_prediction : np.ndarray, int, shape (num_batches,)
        Predicted class in training mode.
    eval_probability : np.ndarray, shape (num_batches,)
        Probability of the true class in evaluation mode, with the same batches.
    eval_prediction : np.ndarray, int, shape (num_batches,)
        Predicted class in evaluation mode.
    """

    example_index: int
    label: int
    train_probability: np.ndarray
    train_prediction: np.ndarray
    eval_probability: np.ndarray
    eval_prediction: np.ndarray


@torch.no_grad()
def batch_dependence(
    model: nn.Module, data: Dataset, *, num_batches: int = 200, batch_size: int = 16, seed: int = 0
) -> BatchDependence:
    """Put one test example into ``num_batches`` random batches and record its predictions.

    The batch-mates are ``batch_size - 1`` test examples drawn at random (without the example
    itself). Training mode is run on a deep copy so that ``model``'s running statistics are not
    touched; ``model`` is left in the mode it was in.
    """
    device = next(model.parameters()).device
    _, _, x_test, y_test = data.tensors(device)
    probe = copy.deepcopy(model).eval()  # evaluation mode only
    train_probe = copy.deepcopy(model).train()  # training mode only: its running stats change
    probabilities = F.softmax(probe(x_test), dim=1)
    true_class = probabilities[torch.arange(len(y_test), device=device), y_test]
    correct = probabilities.argmax(dim=1) == y_test
    index = int(torch.where(correct, true_class, torch.full_like(true_class, 2.0)).argmin())
    label = int(y_test[index])

    rng = np.random.default_rng(seed)
    others = np.delete(np.arange(len(y_test)), index)
    results = {"train": ([], []), "eval": ([], [])}
    for _ in range(num_batches):
        mates = rng.choice(others, size=batch_size - 1, replace=False)
        batch = x_test[torch.from_numpy(np.concatenate([[index], mates])).to(device)]
        for mode, network in (("train", train_probe), ("eval", probe)):
            row = F.softmax(network(batch)[0], dim=0)
            results[mode][0].append(float(row[label]))
            results[mode][1].append(int(row.argmax()))
    return BatchDependence(
        example_index=index,
        label=label,
        train_probability=np.array(results["train"][0]),
        train_prediction=np.array(results["train"][1]),
        eval_probability=np.array(results["eval"][0]),
        eval_prediction=np.array(results["eval"][1]),
    )


# ---------------------------------------------------------------------------------------------
# The bias of the batch variance
# ---------------------------------------------------------------------------------------------


@dataclass
class VarianceBias:
    """Average batch variances relative to the population variance, per batch size.

    Attributes
    ----------
    batch_sizes : np.ndarray, int, shape (K,)
    biased : np.ndarray, shape (K,)
        Mean over trials of the biased batch variance (dividing by ``m``), divided by the
        population variance.
    unbiased : np.ndarray, shape (K,)
        Same with the unbiased variance (dividing by ``m - 1``).
    theory : np.ndarray, shape (K,)
        ``(m - 1) / m``, the expected value of ``biased``.
    trials : int
        Batches drawn per batch size.
    """

    batch_sizes: np.ndarray
    biased: np.ndarray
    unbiased: np.ndarray
    theory: np.ndarray
    trials: int


def variance_bias(
    *,
    batch_sizes: tuple[int, ...] = (2, 3, 4, 8, 16, 32, 64),
    trials: int = 50_000,
    population_std: float = 3.0,
    seed: int = 0,
) -> VarianceBias:
    """Average the variances of ``trials`` batches of each size, drawn from N(1, std**2).

    Parameters
    ----------
    batch_sizes : tuple of int
        The batch sizes m (each at least 2).
    trials : int, default 50_000
        Batches per size.
    population_std : float, default 3.0
    seed : int, default 0

    Returns
    -------
    VarianceBias
        Biased and unbiased averages relative to the population variance, shape (K,).
    """
    rng = np.random.default_rng(seed)
    sizes = np.asarray(batch_sizes, dtype=np.int64)
    biased, unbiased = [], []
    for m in sizes:
        batches = 1.0 + population_std * rng.standard_normal((trials, int(m)))
        biased.append(batches.var(axis=1, ddof=0).mean() / population_std**2)
        unbiased.append(batches.var(axis=1, ddof=1).mean() / population_std**2)
    return VarianceBias(sizes, np.array(biased), np.array(unbiased), (sizes - 1) / sizes, trials)


# ---------------------------------------------------------------------------------------------
# Moving averages against recomputed population statistics, during training
# ---------------------------------------------------------------------------------------------


class _ShadowAverages:
    """Exponential moving averages of every batch norm's input statistics, for several momenta.

    A forward pre-hook on each batch-norm layer sees the layer's training input, computes the
    batch mean and unbiased variance per channel, and updates one (mean, var) pair per momentum
    (PyTorch convention), starting from mean 0 and variance 1 like the layers themselves.
    """

    def __init__(self, model: nn.Module, momenta: tuple[float, ...]):
        self.layers = batch_norm_modules(model)
        self.momenta = momenta
        self.values = {
            m: [
                (torch.zeros_like(bn.running_mean), torch.ones_like(bn.running_var))
                for bn in self.layers
            ]
            for m in momenta
        }
        self.handles = [
            bn.register_forward_pre_hook(self._hook(i)) for i, bn in enumerate(self.layers)
        ]

    def _hook(self, layer_index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            # deep copies of the model carry the hook too: only the tracked layers count
            if not module.training or module is not self.layers[layer_index]:
                return
            with torch.no_grad():
                x = inputs[0].detach().transpose(0, 1).reshape(inputs[0].shape[1], -1)
                mean, var = x.mean(dim=1), x.var(dim=1, unbiased=True)
                for momentum in self.momenta:
                    running_mean, running_var = self.values[momentum][layer_index]
                    running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                    running_var.mul_(1 - momentum).add_(var, alpha=momentum)

        return hook

    def model_with(self, model: nn.Module, momentum: float) -> nn.Module:
        """A copy of ``model`` whose running statistics are this momentum's averages."""
        clone = copy.deepcopy(model)
        for bn, (mean, var) in zip(batch_norm_modules(clone), self.values[momentum], strict=True):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        return clone

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class StatisticsOverTraining:
    """Test accuracy over training with different inference statistics.

    Attributes
    ----------
    steps : np.ndarray, int, shape (E,)
        Training steps of the evaluations (0 = before training).
    accuracy : dict of str to np.ndarray, shape (E,)
        Test accuracy in evaluation mode with ``"moving average, momentum m"`` statistics (one
        entry per momentum) and with ``"recomputed"`` population statistics (one pass over the
        whole training split with the weights of that step).
    variance_error : dict of str to np.ndarray, shape (E,)
        For the same statistics, the mean over the first layer's channels of
        ``|log(running_var / population_var)|``: how far the inference variance is from the
        variance of the current network (0 for ``"recomputed"``).
    """

    steps: np.ndarray
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    variance_error: dict[str, np.ndarray] = field(default_factory=dict)


def statistics_over_training(
    *,
    steps: int = 300,
    batch_size: int = 60,
    lr: float = 0.1,
    momenta: tuple[float, ...] = (0.1, 0.01),
    eval_every: int = 10,
    depth: int = 3,
    width: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
    cpu_threads: int | None = 1,
) -> StatisticsOverTraining:
    """Train a BN MLP and evaluate it every ``eval_every`` steps with several kinds of statistics.

    The training itself does not depend on the momentum (the running averages are only read in
    evaluation mode), so one training run serves every momentum: the averages are kept by forward
    hooks. Uses ``torch.nn.BatchNorm1d`` layers (faster for many small steps). Runs with
    ``cpu_threads`` CPU threads (None: the current setting), restored afterwards.
    """
    with torch_threads(cpu_threads):
        device = get_device(device)
        data = load_digits(seed=seed)
        x_train, y_train, x_test, y_test = data.tensors(device)
        model = _relu_bn_mlp(data, depth, width, "torch", seed).to(device)
        shadows = _ShadowAverages(model, momenta)
        names = [f"moving average, momentum {m:g}" for m in momenta]
        result = StatisticsOverTraining(
            steps=np.array([s for s in range(steps + 1) if s % eval_every == 0 or s == steps])
        )
        accuracy = {name: [] for name in names + ["recomputed"]}
        errors = {name: [] for name in names + ["recomputed"]}

        def evaluate_all(done: int, model: nn.Module, *_batch: torch.Tensor) -> None:
            """After ``done`` updates, at the evaluation steps: every kind of statistics."""
            if done not in result.steps:
                return
            population = copy.deepcopy(model)
            recompute_population_statistics(population, [x_train])
            true_var = batch_norm_modules(population)[0].running_var
            candidates = [shadows.model_with(model, m) for m in momenta] + [population]
            for name, candidate in zip(names + ["recomputed"], candidates, strict=True):
                accuracy[name].append(evaluate(candidate, x_test, y_test)[1])
                var = batch_norm_modules(candidate)[0].running_var
                errors[name].append(float(torch.log(var / true_var).abs().mean()))

        evaluate_all(0, model)
        train(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
            eval_every=0,
            cpu_threads=None,
            callback=evaluate_all,
        )
        shadows.remove()
        result.accuracy = {k: np.array(v) for k, v in accuracy.items()}
        result.variance_error = {k: np.array(v) for k, v in errors.items()}
        return result


# ---------------------------------------------------------------------------------------------
# Forgetting eval()
# ---------------------------------------------------------------------------------------------


@dataclass
class ForgottenEval:
    """Test accuracy of a trained model evaluated the wrong way and the right way.

    Attributes
    ----------
    accuracy : dict of str to float
        ``"eval mode"`` (the fix), ``"train mode, shuffled batches"`` and
        ``"train mode, batches sorted by class"``, all with batches of ``batch_size``.
    running_mean_change : float
        Largest change of any running mean caused by the training-mode evaluations: they
        silently overwrite the statistics learned in training with the test set's.
    eval_repeat_difference : float
        Largest difference between two evaluation-mode passes with different batch orders
        (zero: in evaluation mode predictions do not depend on the batch).
    """

    accuracy: dict[str, float]
    running_mean_change: float
    eval_repeat_difference: float


def _batched_logits(model: nn.Module, x: torch.Tensor, order: torch.Tensor, batch_size: int):
    logits = torch.empty(len(x), 10, device=x.device)
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        if len(index) > 1 or not model.training:
            logits[index] = model(x[index])
        else:  # a batch of one cannot be normalised with its own statistics: join the last batch
            index = order[start - batch_size : start + 1]
            logits[index] = model(x[index])
    return logits


@torch.no_grad()
def forgotten_eval(
    model: nn.Module, data: Dataset, *, batch_size: int = 32, seed: int = 0
) -> ForgottenEval:
    """Evaluate a copy of ``model`` on the test split in training mode and in evaluation mode.

    Parameters
    ----------
    model : nn.Module
        A trained classifier with batch norm; it is not modified (copies are evaluated).
    data : Dataset
        Its test split (N_test examples) is cut into batches of ``batch_size``.
    batch_size : int, default 32
    seed : int, default 0
        Seeds the shuffled order.

    Returns
    -------
    ForgottenEval
        Accuracies in training mode (shuffled batches, batches sorted by class) and in
        evaluation mode, how far training mode moved the running means, and how much the
        evaluation-mode logits depend on the batch order (0 up to rounding).
    """
    device = next(model.parameters()).device
    _, _, x_test, y_test = data.tensors(device)
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(len(y_test), generator=generator).to(device)
    by_class = torch.argsort(y_test, stable=True)
    buggy = copy.deepcopy(model).train()
    before = [bn.running_mean.clone() for bn in batch_norm_modules(buggy)]
    accuracy = {}
    for name, order in (
        ("train mode, shuffled batches", shuffled),
        ("train mode, batches sorted by class", by_class),
    ):
        logits = _batched_logits(buggy, x_test, order, batch_size)
        accuracy[name] = utils.accuracy(logits, y_test)
    change = max(
        float((bn.running_mean - old).abs().max())
        for bn, old in zip(batch_norm_modules(buggy), before, strict=True)
    )
    fixed = copy.deepcopy(model).eval()
    first = _batched_logits(fixed, x_test, shuffled, batch_size)
    second = _batched_logits(fixed, x_test, by_class, batch_size)
    accuracy = {"eval mode": utils.accuracy(first, y_test), **accuracy}
    return ForgottenEval(accuracy, change, float((first - second).abs().max()))


# ---------------------------------------------------------------------------------------------
# Train/eval mismatch with small batches
# ---------------------------------------------------------------------------------------------


@dataclass
class SmallBatchMismatch:
    """Accuracy on the training split of models trained with different batch sizes.

    Attributes
    ----------
    batch_sizes : np.ndarray, int, shape (K,)
    train_mode : np.ndarray, shape (K,)
        Accuracy in training mode, the training split cut into shuffled batches of the training
        batch size: the function the network was trained as.
    eval_mode : np.ndarray, shape (K,)
        Accuracy in evaluation mode with the moving averages: the function it is deployed as.
    disagreement : np.ndarray, shape (K,)
        Fraction of training examples whose training-mode prediction differs from their
        evaluation-mode prediction: how different the two functions are.
    recomputed : np.ndarray, shape (K,)
        Evaluation mode after recomputing the population statistics.
    finetuned : np.ndarray, shape (K,)
        Evaluation mode after ``finetune_steps`` more steps with every batch norm in evaluation
        mode (frozen, recomputed statistics), so that the later layers adapt to the inference
        normalisation.
    test_eval_mode, test_finetuned : np.ndarray, shape (K,)
        The same two evaluation-mode accuracies on the test split.
    """

    batch_sizes: np.ndarray
    train_mode: np.ndarray
    eval_mode: np.ndarray
    disagreement: np.ndarray
    recomputed: np.ndarray
    finetuned: np.ndarray
    test_eval_mode: np.ndarray
    test_finetuned: np.ndarray


def _sgd_steps(model, data, batch_size, steps, lr, seed, freeze_batch_norm=False):
    """Plain SGD with :func:`bncourse.training.train`; the model is left in training mode."""
    device = next(model.parameters()).device
    train(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
          eval_every=0, cpu_threads=None, freeze_batch_norm=freeze_batch_norm)  # fmt: skip
    model.train()


def small_batch_mismatch(
    *,
    batch_sizes: tuple[int, ...] = (2, 4, 32),
    examples: int = 4000,
    lr_per_example: float = 0.004,
    finetune_steps: int = 300,
    finetune_batch_size: int = 32,
    finetune_lr: float = 0.02,
    seed: int = 0,
    device: torch.device | str | None = None,
    cpu_threads: int | None = 1,
) -> SmallBatchMismatch:
    """Train one BN MLP per batch size on ``examples`` examples, then measure the train/eval gap.

    Every model sees the same number of examples, with the learning rate proportional to the
    batch size (``lr = lr_per_example * batch_size``). Uses ``torch.nn.BatchNorm1d`` layers.
    Runs with ``cpu_threads`` CPU threads (None: the current setting), restored afterwards.
    """
    with torch_threads(cpu_threads):
        device = get_device(device)
        data = load_digits(seed=seed)
        x_train, y_train, x_test, y_test = data.tensors(device)
        rows = []
        for batch_size in batch_sizes:
            model = _relu_bn_mlp(data, 3, 100, "torch", seed).to(device)
            _sgd_steps(
                model,
                data,
                batch_size,
                examples // batch_size,
                lr_per_example * batch_size,
                seed,
            )
            with torch.no_grad():
                order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed))
                probe = copy.deepcopy(model).train()
                logits = _batched_logits(probe, x_train, order.to(device), batch_size)
                train_mode = utils.accuracy(logits, y_train)
                eval_logits = copy.deepcopy(model).eval()(x_train)
                disagreement = float((logits.argmax(1) != eval_logits.argmax(1)).float().mean())
            eval_mode = evaluate(model, x_train, y_train)[1]
            test_eval_mode = evaluate(model, x_test, y_test)[1]
            recompute_population_statistics(model, [x_train])
            recomputed = evaluate(model, x_train, y_train)[1]
            _sgd_steps(
                model,
                data,
                finetune_batch_size,
                finetune_steps,
                finetune_lr,
                seed + 1,
                freeze_batch_norm=True,
            )
            finetuned = evaluate(model, x_train, y_train)[1]
            rows.append(
                (
                    train_mode,
                    eval_mode,
                    disagreement,
                    recomputed,
                    finetuned,
                    test_eval_mode,
                    evaluate(model, x_test, y_test)[1],
                )
            )
        columns = np.array(rows).T
        return SmallBatchMismatch(np.asarray(batch_sizes), *columns)


# ---------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------


@dataclass
class FoldingSpeedup:
    """A model against its folded copy: outputs and inference times.

    Attributes
    ----------
    max_difference : float
        Largest absolute difference between the logits of the two on the test split.
    same_predictions : float
        Fraction of test examples with the same predicted class.
    batch_sizes : np.ndarray, int, shape (B,)
    times : dict of str to np.ndarray, shape (B, repeats)
        Seconds per forward pass, ``"with BN"`` and ``"folded"``, per batch size and repeat.
    """

    max_difference: float
    same_predictions: float
    batch_sizes: np.ndarray
    times: dict[str, np.ndarray]

    def speedup(self) -> np.ndarray:
        """Median time with BN divided by median time folded, per batch size, shape (B,)."""
        return np.median(self.times["with BN"], axis=1) / np.median(self.times["folded"], axis=1)


@torch.no_grad()
def folding_speedup(
    model: nn.Module,
    data: Dataset,
    *,
    batch_sizes: tuple[int, ...] = (1, 1000),
    repeats: int = 201,
    number: int = 1,
) -> FoldingSpeedup:
    """Fold every batch norm of ``model``, compare outputs and time both (one CPU thread).

    Many short repeats (``number`` passes each) alternate between the two models. On a shared
    machine with more busy processes than cores, a repeat that gets preempted takes several
    milliseconds longer; with short repeats fewer than half of them are hit, so the median
    ignores them, whereas long repeats would almost all contain some preemption.
    """
    device = next(model.parameters()).device
    reference = copy.deepcopy(model).eval()
    folded = fold_batch_norms(reference)
    _, _, x_test, _ = data.tensors(device)
    logits, folded_logits = reference(x_test), folded(x_test)
    difference = float((logits - folded_logits).abs().max())
    same = float((logits.argmax(1) == folded_logits.argmax(1)).float().mean())
    generator = torch.Generator().manual_seed(0)
    times = {"with BN": [], "folded": []}
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, data.num_features, generator=generator).to(device)
        measured = time_inference(
            {"with BN": reference, "folded": folded}, x, repeats=repeats, number=number
        )
        for name in times:
            times[name].append(measured[name])
    return FoldingSpeedup(
        difference, same, np.asarray(batch_sizes), {k: np.array(v) for k, v in times.items()}
    )
