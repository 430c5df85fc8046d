"""Evaluation plugin factory and readers for its metric history.

``make_evaluator`` builds an Avalanche ``EvaluationPlugin`` from Avalanche's own
metrics plus :class:`PeakMemory`. With the test stream evaluated after each
training experience, the plugin logs (``t``: task label, ``j``: evaluated
experience, ``i``: training experience, all zero-padded to three digits):

* ``Top1_Acc_Exp/eval_phase/test_stream/Task{t}/Exp{j}``: accuracy on
  experience ``j``, once per ``eval`` call.
* ``Top1_Acc_Stream/eval_phase/test_stream/Task{t}``: accuracy pooled over all
  samples of the evaluated stream; ``t`` is the task label of the *last*
  evaluated experience (Avalanche names it after the current experience).
* ``ExperienceForgetting/eval_phase/test_stream/Task{t}/Exp{j}`` and
  ``ExperienceBWT/...``: ``A[j, j] - A[now, j]`` and its negation, only for
  experiences trained before the latest training experience.
* ``StreamForgetting/eval_phase/test_stream`` and
  ``StreamBWT/eval_phase/test_stream``: the mean of the per-experience values
  above (0 until a second experience is trained).
* ``EvalStream/Acc_Matrix``: a ``torch.Tensor`` accuracy matrix whose row is
  the number of ``strategy.train`` calls so far minus one. Avalanche's metric
  raises ``TypeError`` if ``eval`` is called before the first ``train``.
* ``Time_Epoch/train_phase/train_stream/Task{t}``: seconds per training epoch.
* ``PeakMemory_MB/train_phase/train_stream/Task{t}/Exp{i}``: see
  :class:`PeakMemory`.

The ``Task{t}/`` part is left out when an experience holds several task labels.
Values are read back with ``evaluator.get_all_metrics()``, which maps each name
to ``(x_steps, values)``; ``x_steps`` is the strategy's training-iteration
counter when the value was logged.
"""

from __future__ import annotations

import re
import resource
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricResult, MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.evaluation.metrics import (
    accuracy_matrix_metrics,
    accuracy_metrics,
    bwt_metrics,
    forgetting_metrics,
    timing_metrics,
)
from avalanche.logging import BaseLogger, InteractiveLogger
from avalanche.training.plugins import EvaluationPlugin

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

MetricHistory = Mapping[str, tuple[Sequence[int], Sequence[Any]]]
"""``EvaluationPlugin.get_all_metrics()``: name -> (x_steps, values)."""

_BYTES_PER_MB = 1024 * 1024
EPOCH_TIME_PREFIX = "Time_Epoch/train_phase/"
PEAK_MEMORY_PREFIX = "PeakMemory_MB/train_phase/"


def _peak_memory_mb(device: torch.device | str) -> float:
    """Peak CUDA allocation on ``device`` if it is a CUDA device, else peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _BYTES_PER_MB
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS and in KiB on Linux.
    rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    return rss_bytes / _BYTES_PER_MB


class PeakMemory(PluginMetric[float]):
    """Peak memory in MiB of each training experience.

    On a CUDA device this is ``torch.cuda.max_memory_allocated`` with the peak
    reset at the start of the experience. On CPU it is the process's peak
    resident set size (``resource.getrusage``), which cannot be reset, so it is
    the peak since the process started and never decreases.
    Logged after each training experience as
    ``PeakMemory_MB/train_phase/train_stream/Task{t:03}/Exp{i:03}``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._peak_mb = 0.0

    def reset(self) -> None:
        self._peak_mb = 0.0

    def result(self) -> float:
        return self._peak_mb

    def before_training_exp(self, strategy: SupervisedTemplate) -> None:
        self.reset()
        device = torch.device(strategy.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def after_training_exp(self, strategy: SupervisedTemplate) -> MetricResult:
        self._peak_mb = _peak_memory_mb(strategy.device)
        name = get_metric_name(self, strategy, add_experience=True)
        return [
            MetricValue(self, name, self._peak_mb, strategy.clock.train_iterations)
        ]

    def __str__(self) -> str:
        return "PeakMemory_MB"


def make_evaluator(
    loggers: Iterable[BaseLogger] | None = None,
    extra_metrics: Iterable[PluginMetric] = (),
    verbose: bool = False,
) -> EvaluationPlugin:
    """Evaluation plugin logging the metrics listed in the module docstring.

    :param loggers: Avalanche loggers; none by default. The plugin keeps the
        whole history either way (``get_all_metrics()``).
    :param extra_metrics: further plugin metrics appended to the default ones.
    :param verbose: add an ``InteractiveLogger`` (progress and values on
        stdout) unless one is already among ``loggers``.
    """
    logger_list = list(loggers) if loggers is not None else []
    if verbose and not any(isinstance(lg, InteractiveLogger) for lg in logger_list):
        logger_list.append(InteractiveLogger())
    metrics = [
        *accuracy_metrics(experience=True, stream=True),
        *forgetting_metrics(experience=True, stream=True),
        *bwt_metrics(experience=True, stream=True),
        *accuracy_matrix_metrics(),
        *timing_metrics(epoch=True),
        PeakMemory(),
        *extra_metrics,
    ]
    with warnings.catch_warnings():
        # Avalanche warns when no logger is given, although it still collects
        # every value because collect_all is on.
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(*metrics, loggers=logger_list, collect_all=True)


def _history(evaluator_or_metrics: EvaluationPlugin | MetricHistory) -> MetricHistory:
    if isinstance(evaluator_or_metrics, EvaluationPlugin):
        if not evaluator_or_metrics.collect_all:
            raise ValueError("the evaluator was built with collect_all=False")
        return evaluator_or_metrics.get_all_metrics()
    if isinstance(evaluator_or_metrics, Mapping):
        return evaluator_or_metrics
    raise TypeError(
        "expected an EvaluationPlugin or the mapping returned by its "
        f"get_all_metrics(), got {type(evaluator_or_metrics).__name__}"
    )


def _values_with_prefix(history: MetricHistory, prefix: str) -> list[float]:
    return [
        float(v)
        for name, (_, values) in history.items()
        if name.startswith(prefix)
        for v in values
    ]


def total_train_time(evaluator_or_metrics: EvaluationPlugin | MetricHistory) -> float:
    """Seconds spent in training epochs: the sum of all ``Time_Epoch`` values."""
    return sum(_values_with_prefix(_history(evaluator_or_metrics), EPOCH_TIME_PREFIX))


def peak_memory_mb(evaluator_or_metrics: EvaluationPlugin | MetricHistory) -> float:
    """Largest ``PeakMemory_MB`` value logged (MiB); 0.0 if none was logged."""
    values = _values_with_prefix(_history(evaluator_or_metrics), PEAK_MEMORY_PREFIX)
    return max(values, default=0.0)


def collect_accuracy_matrix(
    evaluator_or_metrics: EvaluationPlugin | MetricHistory,
    n_experiences: int,
    stream: str = "test",
) -> np.ndarray:
    """Accuracy matrix ``A`` of shape ``(n_experiences, n_experiences)``.

    ``A[i, j]`` is the accuracy on experience ``j`` of ``stream`` after training
    experience ``i``, read from the ``Top1_Acc_Exp/eval_phase/<stream>_stream/...``
    histories. Values logged at the same x step (training-iteration counter)
    come from the same model state, so each distinct x step is one row, in
    increasing order; if an experience is logged twice at one step, the later
    value is kept. Experiences left out of an ``eval`` call are ``NaN``.

    :raises ValueError: if no accuracy of ``stream`` was logged, or the number
        of evaluation points is not ``n_experiences`` (evaluate the stream
        once after each training experience, and not before training), or an
        experience id is ``>= n_experiences``.
    """
    if n_experiences < 1:
        raise ValueError(f"n_experiences must be positive, got {n_experiences}")
    pattern = re.compile(
        rf"^Top1_Acc_Exp/eval_phase/{re.escape(stream)}_stream/(?:Task\d+/)?Exp(\d+)$"
    )
    by_step: dict[int, dict[int, float]] = {}
    for name, (steps, values) in _history(evaluator_or_metrics).items():
        match = pattern.match(name)
        if match is None:
            continue
        exp_id = int(match.group(1))
        if exp_id >= n_experiences:
            raise ValueError(
                f"{name} refers to experience {exp_id}, but n_experiences is "
                f"{n_experiences}"
            )
        for step, value in zip(steps, values):
            by_step.setdefault(int(step), {})[exp_id] = float(value)
    if not by_step:
        raise ValueError(f"no Top1_Acc_Exp values logged for the {stream} stream")
    if len(by_step) != n_experiences:
        raise ValueError(
            f"found {len(by_step)} evaluation points of the {stream} stream for "
            f"{n_experiences} experiences; evaluate it once after each training "
            "experience"
        )
    matrix = np.full((n_experiences, n_experiences), np.nan)
    for row, step in enumerate(sorted(by_step)):
        for exp_id, value in by_step[step].items():
            matrix[row, exp_id] = value
    return matrix
