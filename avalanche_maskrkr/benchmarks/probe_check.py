"""The methods against a linear probe on a frozen pretrained backbone, as a user runs them.

Each method is a plain Avalanche strategy with its default options and the usual
``Adam(model.parameters(), lr=1e-3)``; the reference is the linear probe (one head per
task on the frozen base, :class:`~avalanche_maskrkr.baselines.MultiHeadNetwork`) under
the same optimizer, schedule and seed. Used by ``tests/test_pretrained.py`` and
``benchmarks/pretrained.py``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pandas as pd
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from ..baselines import MultiHeadNetwork
from ..strategies import RKR, MaskRKR, Piggyback

METHODS = {"rkr": RKR, "piggyback": Piggyback, "mask-rkr": MaskRKR}


class ForgettingError(AssertionError):
    """A method's outputs for a finished task changed."""


def dataset_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of a whole Avalanche dataset, in order."""
    x, y, *_ = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    return x, y


def _strategy(method: str, model: nn.Module, epochs: int, batch_size: int, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = EvaluationPlugin(loggers=[])
    template = dict(train_mb_size=batch_size, train_epochs=epochs, eval_mb_size=512,
                    evaluator=evaluator)
    if method == "probe":
        model = MultiHeadNetwork(model, freeze_after=0)
        params = list(model.parameters()) or [nn.Parameter(torch.empty(0))]
        return Naive(model=model, optimizer=torch.optim.Adam(params, lr=1e-3), **template)
    return METHODS[method](model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                           **template, **options)


def task_accuracies(method: str, model: nn.Module, stream, epochs: int, tasks: int,
                    batch_size: int = 32, **options) -> list[float]:
    """Train ``method`` (``"probe"`` or a key of :data:`METHODS`) on the first ``tasks``
    experiences of ``stream``; each task's test accuracy at the end.

    Raises:
        ForgettingError: a method's outputs for a task at the end differ (bit for bit)
            from those right after the task trained.
    """
    strategy = _strategy(method, model, epochs, batch_size, **options)
    tests = [dataset_tensors(exp.dataset) for exp in stream.test_stream[:tasks]]
    after_task = []
    for task, exp in enumerate(stream.train_stream[:tasks]):
        strategy.train(exp)
        strategy.model.eval()
        with torch.no_grad():
            after_task.append(strategy.model(tests[task][0], task))
    with torch.no_grad():
        final = [strategy.model(x, task) for task, (x, _) in enumerate(tests)]
    if method != "probe" and not all(map(torch.equal, after_task, final)):
        raise ForgettingError(f"{method} changed the outputs of a finished task")
    return [(out.argmax(1) == y).float().mean().item() for out, (_, y) in zip(final, tests)]


def compare_with_probe(make_model: Callable[[], nn.Module], make_stream: Callable[[int], object],
                       epochs: int, seeds: Sequence[int], tasks: int,
                       methods: Sequence[str] = tuple(METHODS), **options) -> pd.DataFrame:
    """Per-task accuracy, averaged over ``seeds``, of the probe and each method: one row
    per method (``probe`` first), columns ``task 1..T`` and ``mean``.

    ``make_model()`` returns a fresh pretrained backbone; ``make_stream(seed)`` the
    task-labelled stream of that seed. ``options`` go to every method.
    """
    rows = {}
    for method in ("probe", *methods):
        runs = []
        for seed in seeds:
            torch.manual_seed(seed)
            runs.append(task_accuracies(method, make_model(), make_stream(seed), epochs, tasks,
                                        **({} if method == "probe" else options)))
        rows[method] = [sum(column) / len(seeds) for column in zip(*runs)]
    frame = pd.DataFrame.from_dict(rows, orient="index",
                                   columns=[f"task {t + 1}" for t in range(tasks)])
    frame["mean"] = frame.mean(axis=1)
    return frame
