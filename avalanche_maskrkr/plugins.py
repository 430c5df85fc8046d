"""The training logic of each method as an Avalanche plugin, usable on any strategy.

Added to ``Naive`` (or any ``SupervisedTemplate``) over an unconverted model, a plugin
converts the model the first time the strategy trains or evaluates, and then, for each
experience:
  * before training: points the strategy's optimizer at exactly the parameters the
    experience's task trains, in one group per role (its head, its real-valued factors,
    its mask scores; the base under ``train_base_first``) with the role's learning rate
    (``head_lr``, ``factor_lr``, ``mask_lr``), keeping the optimizer's class and its
    other hyperparameters, with fresh state. Frozen parameters are never in it.
  * after training: re-estimates the task's own BatchNorm statistics for its adapted
    network (``bn_policy="task_stats"``) from the experience's training inputs, learns
    its classes for the router that classifies base features (``task_inference``
    ``"prototype"``: class means; ``"ranpac"``: RanPAC's statistics), then freezes the
    task for good (masks packed to 1 bit per entry).
Task parameters and heads are created by the network's Avalanche ``adaptation``.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import torch
from avalanche.core import SupervisedPlugin

from .conversion import convert
from .network import TaskAwareNetwork
from .options import MaskRKROptions, MethodOptions, PiggybackOptions, RKROptions, make_options


def user_settings(optimizer: torch.optim.Optimizer) -> dict:
    """The hyperparameters a user gave ``optimizer`` (``lr`` included), shared by its
    parameter groups.

    Raises:
        ValueError: its groups differ in a hyperparameter: the methods group each task's
            parameters by role themselves, and groups over the original model's
            parameters do not map onto a task's new parameters.
    """
    own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if any(settings != own[0] for settings in own[1:]):
        raise ValueError(
            "the optimizer has parameter groups with different settings; RKR, Piggyback "
            "and Mask-RKR put each task's parameters in groups by role themselves (head, "
            "factors, mask scores). Pass one group, e.g. "
            "torch.optim.Adam(model.parameters(), lr=1e-3), and set the roles' rates with "
            "head_lr, factor_lr and mask_lr.")
    return own[0]


def clear_state(optimizer: torch.optim.Optimizer) -> None:
    """Forget ``optimizer``'s state (momenta, step counts), so that the next experience's
    training depends only on the model it starts from."""
    optimizer.state = defaultdict(dict)


def point_optimizer(optimizer: torch.optim.Optimizer,
                    groups: Mapping[str, list[torch.nn.Parameter]],
                    settings: Mapping, rates: Mapping[str, float]) -> None:
    """Make ``groups`` (role -> parameters; empty ones left out) the optimizer's
    parameter groups, with fresh state, the hyperparameters ``settings`` and each role's
    rate from ``rates``. A group records its role (``"role"``) and its rate before any
    schedule (``"initial_lr"``, which schedules scale)."""
    optimizer.param_groups.clear()
    clear_state(optimizer)
    for role, params in groups.items():
        if params:
            optimizer.add_param_group({**settings, "params": params, "role": role,
                                       "lr": rates[role], "initial_lr": rates[role]})


class MethodPlugin(SupervisedPlugin):
    """Shared plugin of the three methods; ``options`` are the method's options."""

    options_class: ClassVar[type[MethodOptions]]

    def __init__(self, **options):
        super().__init__()
        self.options = make_options(self.options_class.name, **options)
        self._settings: dict | None = None  # the user optimizer's hyperparameters

    def convert(self, model: torch.nn.Module) -> TaskAwareNetwork:
        """Convert ``model`` for this method (a converted one must have these options)."""
        if isinstance(model, TaskAwareNetwork):
            if model.options != self.options:
                raise ValueError(f"the model was converted with {model.options}, "
                                 f"not {self.options}")
            return model
        return convert(model, self.options)

    def _ensure_converted(self, strategy) -> None:
        if not isinstance(strategy.model, TaskAwareNetwork):
            strategy.model = self.convert(strategy.model).to(strategy.device)

    def before_training(self, strategy, **kwargs):
        self._ensure_converted(strategy)

    def before_eval(self, strategy, **kwargs):
        self._ensure_converted(strategy)

    def before_training_exp(self, strategy, **kwargs):
        if self._settings is None:  # the user's optimizer, as given
            self._settings = user_settings(strategy.optimizer)
        rates = self.options.learning_rates(self._settings["lr"])
        roles = strategy.model.parameter_roles(strategy.model.training_tasks(strategy.experience))
        point_optimizer(strategy.optimizer, roles, self._settings, rates)

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        tasks = model.training_tasks(strategy.experience)
        if self.options.bn_policy == "task_stats":
            for task in tasks:
                model.estimate_statistics(task, task_inputs(strategy, task))
        if model.base_classifier is not None:  # the prototype or ranpac router
            model.base_classifier.learn(*dataset_features(
                model.base_features, strategy.experience.dataset.eval(),
                strategy.eval_mb_size, strategy.device))
        for task in tasks:
            model.finish_task(task)


def dataset_batches(dataset, batch_size: int, device: torch.device
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Inputs (B, ...), labels (B,) and task labels (B,) of an Avalanche dataset on
    ``device``, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         collate_fn=getattr(dataset, "collate_fn", None))
    for x, y, t, *_ in loader:
        yield x.to(device), y.to(device), t.to(device)


@torch.no_grad()
def dataset_features(extract: Callable[[torch.Tensor], torch.Tensor], dataset,
                     batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``extract``'s features (N, D) of an Avalanche dataset's inputs and its labels (N,),
    in order."""
    features, labels = [], []
    for x, y, _ in dataset_batches(dataset, batch_size, device):
        features.append(extract(x))
        labels.append(y)
    return torch.cat(features), torch.cat(labels)


def task_inputs(strategy, task: int) -> Iterator[torch.Tensor]:
    """The current experience's training inputs of stream task label ``task`` (all of
    them for a class-incremental network: the experience is the task it became), eval
    transforms, in batches of ``strategy.eval_mb_size`` on the strategy's device."""
    for x, _, t in dataset_batches(strategy.experience.dataset.eval(), strategy.eval_mb_size,
                                   strategy.device):
        if not strategy.model.class_incremental:
            x = x[t == task]
        if len(x):
            yield x


class RKRPlugin(MethodPlugin):
    """RKR (Singh et al. 2021). Options: see :class:`~avalanche_maskrkr.options.RKROptions`."""

    options_class = RKROptions


class PiggybackPlugin(MethodPlugin):
    """Piggyback (Mallya et al. 2018). Options: see
    :class:`~avalanche_maskrkr.options.PiggybackOptions`."""

    options_class = PiggybackOptions


class MaskRKRPlugin(MethodPlugin):
    """Mask-RKR (Takeda & Yanai 2022). Options: see
    :class:`~avalanche_maskrkr.options.MaskRKROptions`."""

    options_class = MaskRKROptions
