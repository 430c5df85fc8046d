"""SimpleCIL, RanPAC and APER as Avalanche plugins, for ``Naive`` or any
``SupervisedTemplate``; their strategies are the template with the plugin
(:class:`FeatureStatisticsStrategy`).

Added to a strategy over an unconverted model, a plugin wraps the model in place (its
classifier removed) the first time the strategy trains or evaluates, and then, for each
training experience:
  * before it: an experience whose class ids came before with other task labels (a
    stream numbering classes from 0 in each task) is refused; APER's first experience
    trains the module and a temporary head for the strategy's ``train_epochs`` (its
    optimizer pointed at them, as the methods' plugins do); otherwise the epoch loop is
    skipped: no gradient step;
  * after it: APER's module is frozen after its first experience; then one pass over the
    experience's training data (eval transform) hands the backbone's features to the
    model's ``learn`` (class means; RanPAC's statistics and solve), counted as one
    training iteration (each evaluation after an experience has its own step in the
    metric history);
  * after every forward, training or evaluation: the logits are padded at -inf up to
    the minibatch's largest label, so the loss of a class not learned yet is inf (never
    predicted) instead of an index error.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from ..network import CLASS_STREAM_HINT, experience_tasks
from ..plugins import dataset_features


class FeatureStatisticsPlugin(SupervisedPlugin):
    """A model with a ``backbone`` and ``learn(features, labels)``, built from the user's
    model by ``wrap`` (an instance of ``model_class``), learning from one pass per
    experience (see the module docstring)."""

    def __init__(self, model_class: type[nn.Module], wrap: Callable[[nn.Module], nn.Module]):
        super().__init__()
        self.model_class, self.wrap = model_class, wrap
        self._epochs: int | None = None  # the strategy's, while skipped
        # class id -> the task labels it came with, to refuse per-task class ids (a
        # guard only: not in checkpoints, a resumed run starts it afresh)
        self._class_tasks: dict[int, frozenset[int]] = {}

    def refuse_task_class_ids(self, experience) -> None:
        """Raise ``ValueError`` if a class id of ``experience`` came before with other
        task labels: the stream numbers classes from 0 in each task, and one label space
        would merge different classes. A class may come again with the same labels."""
        tasks = frozenset(experience_tasks(experience))
        classes = sorted(experience.classes_in_this_experience)
        if clashes := [c for c in classes if self._class_tasks.get(c, tasks) != tasks]:
            raise ValueError(
                f"Classes {clashes} arrive with task label(s) {sorted(tasks)} but came "
                f"before with task label(s) {sorted(self._class_tasks[clashes[0]])}: this "
                "stream numbers classes from 0 in each task. SimpleCIL, RanPAC and APER "
                "keep one label space over every class seen and ignore task labels. "
                f"{CLASS_STREAM_HINT}")
        self._class_tasks.update(dict.fromkeys(classes, tasks))

    def _ensure_wrapped(self, strategy) -> None:
        if not isinstance(strategy.model, self.model_class):
            strategy.model = self.wrap(strategy.model).to(strategy.device)

    def before_training(self, strategy, **kwargs):
        self._ensure_wrapped(strategy)

    def before_eval(self, strategy, **kwargs):
        self._ensure_wrapped(strategy)

    def trains(self, strategy) -> bool:
        """Whether this experience takes gradient steps (APER's first)."""
        return False

    def before_training_exp(self, strategy, **kwargs):
        self.refuse_task_class_ids(strategy.experience)
        if not self.trains(strategy):
            self._epochs, strategy.train_epochs = strategy.train_epochs, 0

    def after_training_exp(self, strategy, **kwargs):
        if self._epochs is not None:
            strategy.train_epochs, self._epochs = self._epochs, None
        features, labels = dataset_features(strategy.model.backbone,
                                            strategy.experience.dataset.eval(),
                                            strategy.eval_mb_size, strategy.device)
        strategy.model.learn(features, labels)
        strategy.clock.train_iterations += 1

    def after_forward(self, strategy, **kwargs):
        strategy.mb_output = padded_to_labels(strategy.mb_output, strategy.mb_y)

    def after_eval_forward(self, strategy, **kwargs):
        strategy.mb_output = padded_to_labels(strategy.mb_output, strategy.mb_y)


def padded_to_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K) logits padded at -inf to (B, max(K, largest label + 1))."""
    missing = int(labels.max()) + 1 - logits.shape[1] if len(labels) else 0
    return F.pad(logits, (0, missing), value=float("-inf")) if missing > 0 else logits


class FeatureStatisticsStrategy(SupervisedTemplate):
    """A ``SupervisedTemplate`` with ``plugin`` (a :class:`FeatureStatisticsPlugin`),
    whose model is ``plugin.wrap(model)`` from the start. Keyword-only arguments as
    Avalanche's; without an ``optimizer`` (nothing trains) a placeholder is used;
    ``criterion`` defaults to cross-entropy."""

    def __init__(self, *, model: nn.Module, plugin: FeatureStatisticsPlugin,
                 optimizer: torch.optim.Optimizer | None = None, criterion=None,
                 train_mb_size: int = 32, train_epochs: int = 1, eval_mb_size: int = 32,
                 device="cpu", plugins=None, evaluator=None, eval_every: int = -1):
        if optimizer is None:
            optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        kwargs = {} if evaluator is None else {"evaluator": evaluator}
        super().__init__(model=plugin.wrap(model), optimizer=optimizer,
                         criterion=criterion or nn.CrossEntropyLoss(),
                         train_mb_size=train_mb_size, train_epochs=train_epochs,
                         eval_mb_size=eval_mb_size, device=device,
                         plugins=[plugin, *(plugins or [])], eval_every=eval_every, **kwargs)
