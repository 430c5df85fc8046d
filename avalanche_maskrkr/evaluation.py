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
* ``Time_Exp/train_phase/train_stream/Task{t}/Exp{i}``: seconds of each experience's
  training, epochs and what the strategy does after them (a method's BatchNorm
  statistics and class means; SimpleCIL's and RanPAC's pass, which has no epoch loop):
  see :class:`TrainingTime`.
* ``PeakMemory_MB/train_phase/train_stream/Task{t}/Exp{i}``: see
  :class:`PeakMemory` (CUDA only).
* ``TaskId_Acc_Exp/eval_phase/test_stream/Task{t}/Exp{j}``: see
  :class:`TaskIdentificationAccuracy` (class-incremental task-free inference).
* ``Params_Total/train_phase/train_stream/Task{t}/Exp{i}`` and
  ``Bytes_Per_Task/...``: see :class:`ParameterCost` (not among the defaults;
  pass it in ``extra_metrics``).

The ``Task{t}/`` part is left out when an experience holds several task labels.
Values are read back with ``evaluator.get_all_metrics()``, which maps each name
to ``(x_steps, values)``; ``x_steps`` is the strategy's training-iteration
counter when the value was logged.
"""

from __future__ import annotations

import re
import time
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

from .accounting import method_cost
from .baseline_accounting import baseline_cost
from .network import TaskAwareNetwork

if TYPE_CHECKING:
    from avalanche.training.templates import SupervisedTemplate

MetricHistory = Mapping[str, tuple[Sequence[int], Sequence[Any]]]
"""``EvaluationPlugin.get_all_metrics()``: name -> (x_steps, values)."""

_BYTES_PER_MB = 1024 * 1024
TRAINING_TIME = "Time_Exp"
TRAINING_TIME_PREFIX = f"{TRAINING_TIME}/train_phase/"
PEAK_MEMORY_PREFIX = "PeakMemory_MB/train_phase/"
PARAMS_TOTAL = "Params_Total"
BYTES_PER_TASK = "Bytes_Per_Task"
TASK_ID_ACCURACY = "TaskId_Acc_Exp"


class PeakMemory(PluginMetric[float]):
    """Peak CUDA memory in MiB of each training experience:
    ``torch.cuda.max_memory_allocated`` with the peak reset at the start of the
    experience. Logged after each training experience on a CUDA device as
    ``PeakMemory_MB/train_phase/train_stream/Task{t:03}/Exp{i:03}``.

    Nothing is logged on other devices: the process's peak resident set size
    covers its whole life, not the experience, and the heap peak of
    :class:`~avalanche_maskrkr.heap.HeapPeak`, sampled after every op, slows
    training about threefold and is hidden by the frees of objects collected
    during the experience. ``benchmarks/speed.py`` measures CPU memory.
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
        device = torch.device(strategy.device)
        if device.type != "cuda":
            return None
        self._peak_mb = torch.cuda.max_memory_allocated(device) / _BYTES_PER_MB
        name = get_metric_name(self, strategy, add_experience=True)
        return [
            MetricValue(self, name, self._peak_mb, strategy.clock.train_iterations)
        ]

    def __str__(self) -> str:
        return "PeakMemory_MB"


class ParameterCost(PluginMetric[dict]):
    """Parameters and storage per task of ``strategy.model`` after each training
    experience, with the paper's conventions (SPEC section 4).

    A :class:`~avalanche_maskrkr.network.TaskAwareNetwork` is measured by
    :func:`avalanche_maskrkr.accounting.method_cost`: base + heads + task
    parameters, a binary mask entry counting 1/32 of a parameter; bytes per
    task are the mean over its tasks of head and task parameters, masks
    bit-packed. Any other model (a baseline) is measured by
    :func:`avalanche_maskrkr.baseline_accounting.baseline_cost`: all its
    parameters plus what its plugins store between tasks (EWC's and SI's
    importances and reference weights, LwF's previous model, Replay's buffer,
    PackNet's owner of each weight), its bytes per task the whole divided by
    the number of tasks it has trained. Logged as
    ``Params_Total/train_phase/train_stream/Task{t:03}/Exp{i:03}`` and
    ``Bytes_Per_Task/...`` (read back with :func:`parameter_cost`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._cost = {"total_params": 0.0, "bytes_per_task": 0.0}

    def result(self) -> dict:
        return dict(self._cost)

    def after_training_exp(self, strategy: SupervisedTemplate) -> MetricResult:
        model = strategy.model
        if isinstance(model, TaskAwareNetwork):
            self._cost = method_cost(model)
        else:
            self._cost = baseline_cost(model, [*strategy.plugins, strategy])
        step = strategy.clock.train_iterations
        return [
            MetricValue(self, get_metric_name(name, strategy, add_experience=True), value, step)
            for name, value in ((PARAMS_TOTAL, self._cost["total_params"]),
                                (BYTES_PER_TASK, self._cost["bytes_per_task"]))
        ]

    def __str__(self) -> str:
        return PARAMS_TOTAL


class TrainingTime(PluginMetric[float]):
    """Wall-clock seconds of each training experience, from before its first epoch to
    after the strategy's own work at its end (plugins' ``after_training_exp`` run
    before this metric's, the evaluator being the last plugin), logged as
    ``Time_Exp/train_phase/train_stream/Task{t:03}/Exp{i:03}``. On CUDA the device is
    synchronised first, so queued kernels are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._start, self._seconds = 0.0, 0.0

    def result(self) -> float:
        return self._seconds

    def before_training_exp(self, strategy: SupervisedTemplate) -> None:
        _synchronize(strategy.device)
        self._start = time.perf_counter()

    def after_training_exp(self, strategy: SupervisedTemplate) -> MetricResult:
        _synchronize(strategy.device)
        self._seconds = time.perf_counter() - self._start
        name = get_metric_name(TRAINING_TIME, strategy, add_experience=True)
        return [MetricValue(self, name, self._seconds, strategy.clock.train_iterations)]

    def __str__(self) -> str:
        return TRAINING_TIME


def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class TaskIdentificationAccuracy(PluginMetric[float]):
    """Task-free inference: the share of an evaluated experience's inputs whose task the
    class-incremental network chose right (the task that learned its class), logged as
    ``TaskId_Acc_Exp/eval_phase/test_stream/Task{t:03}/Exp{j:03}``. Nothing is logged for
    a model that chooses no task (``routed_tasks`` absent or None)."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._right, self._seen = 0, 0

    def result(self) -> float:
        return self._right / self._seen if self._seen else float("nan")

    def before_eval_exp(self, strategy: SupervisedTemplate) -> None:
        self.reset()

    def after_eval_iteration(self, strategy: SupervisedTemplate) -> None:
        routed = getattr(strategy.model, "routed_tasks", None)
        if routed is not None:
            true = strategy.model.class_task.to(routed.device)[strategy.mb_y]
            self._right += int((routed == true).sum())
            self._seen += len(routed)

    def after_eval_exp(self, strategy: SupervisedTemplate) -> MetricResult:
        if not self._seen:
            return None
        name = get_metric_name(TASK_ID_ACCURACY, strategy, add_experience=True)
        return [MetricValue(self, name, self.result(), strategy.clock.train_iterations)]

    def __str__(self) -> str:
        return TASK_ID_ACCURACY


def make_evaluator(
    loggers: Iterable[BaseLogger] | None = None,
    extra_metrics: Iterable[PluginMetric] = (),
    verbose: bool = False,
    resumable: bool = False,
) -> EvaluationPlugin:
    """Evaluation plugin logging the metrics listed in the module docstring.

    :param loggers: Avalanche loggers; none by default. The plugin keeps the
        whole history either way (``get_all_metrics()``).
    :param extra_metrics: further plugin metrics appended to the default ones.
    :param verbose: add an ``InteractiveLogger`` (progress and values on
        stdout) unless one is already among ``loggers``.
    :param resumable: only the metrics that keep no state from one experience
        to the next (accuracy per experience, epoch times, peak memory), so
        that the logged history is all a run resumed from a checkpoint needs;
        stream accuracy, forgetting, BWT and the accuracy matrix are left out
        (compute them from the accuracy matrix, see :mod:`.results`).
    """
    logger_list = list(loggers) if loggers is not None else []
    if verbose and not any(isinstance(lg, InteractiveLogger) for lg in logger_list):
        logger_list.append(InteractiveLogger())
    metrics = [
        *accuracy_metrics(experience=True, stream=not resumable),
        *timing_metrics(epoch=True),
        PeakMemory(),
        TrainingTime(),
        TaskIdentificationAccuracy(),
    ]
    if not resumable:
        metrics += [
            *forgetting_metrics(experience=True, stream=True),
            *bwt_metrics(experience=True, stream=True),
            *accuracy_matrix_metrics(),
        ]
    with warnings.catch_warnings():
        # Avalanche warns when no logger is given, although it still collects
        # every value because collect_all is on.
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(*metrics, *extra_metrics, loggers=logger_list, collect_all=True)


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
    """Seconds spent training: the sum of all :class:`TrainingTime` values."""
    return sum(_values_with_prefix(_history(evaluator_or_metrics), TRAINING_TIME_PREFIX))


def peak_memory_mb(evaluator_or_metrics: EvaluationPlugin | MetricHistory) -> float:
    """Largest ``PeakMemory_MB`` value logged (MiB); 0.0 if none was logged (on CPU)."""
    values = _values_with_prefix(_history(evaluator_or_metrics), PEAK_MEMORY_PREFIX)
    return max(values, default=0.0)


def parameter_cost(evaluator_or_metrics: EvaluationPlugin | MetricHistory) -> dict[str, float]:
    """``{"total_params", "bytes_per_task"}`` last logged by :class:`ParameterCost`.

    :raises ValueError: if :class:`ParameterCost` logged nothing.
    """
    history = _history(evaluator_or_metrics)
    cost = {}
    for key, name in (("total_params", PARAMS_TOTAL), ("bytes_per_task", BYTES_PER_TASK)):
        logged = [(steps[-1], values[-1]) for metric, (steps, values) in history.items()
                  if metric.startswith(f"{name}/train_phase/") and steps]
        if not logged:
            raise ValueError(f"no {name} value logged: add ParameterCost() to the evaluator")
        cost[key] = float(max(logged, key=lambda pair: pair[0])[1])
    return cost


def _experience_metric(metric: str, stream: str) -> re.Pattern:
    """The names ``metric`` takes per evaluated experience of ``stream`` (its id: group 1)."""
    return re.compile(rf"^{metric}/eval_phase/{re.escape(stream)}_stream/(?:Task\d+/)?Exp(\d+)$")


def final_task_id_accuracy(evaluator_or_metrics: EvaluationPlugin | MetricHistory,
                           sizes: Sequence[int]) -> float | None:
    """Task-identification accuracy over the whole test stream at the last evaluation:
    each experience's last logged :class:`TaskIdentificationAccuracy`, weighted by its
    test-set size (``sizes``); None if none was logged (a model that infers no task)."""
    pattern = _experience_metric(TASK_ID_ACCURACY, "test")
    last = {int(match.group(1)): values[-1]
            for name, (_, values) in _history(evaluator_or_metrics).items()
            if (match := pattern.match(name))}
    if not last:
        return None
    return float(sum(last[j] * sizes[j] for j in last) / sum(sizes[j] for j in last))


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
    pattern = _experience_metric("Top1_Acc_Exp", stream)
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
