"""Task-free inference: how a class-incremental network chooses the task of a test input.

On a class-incremental stream each training experience is a task of the network (its own
parameters and head over the global class ids it brought), but no task label comes with
a test input. A router chooses one task per input (SupSup: per batch); the input's
logits are then that task's, in its classes' global columns (every other column at the
dtype's lowest value). Routers (``task_inference``, :data:`~.options.TASK_INFERENCE`):

* ``"prototype"``: the nearest class mean (cosine) of the frozen base network's
  features, whose class names the task: one base pass, then the chosen tasks' passes.
* ``"ranpac"``: likewise, the class RanPAC's ridge classifier on the base features
  predicts (:class:`~.ridge.RandomFeatureRidge`).
* ``"entropy"`` / ``"energy"``: every task's pass, the task whose softmax entropy /
  energy ``-logsumexp(logits)`` is lowest. The T passes are one network call over a
  T-times larger batch (each task layer computes its chunk of the batch), split in
  halves where memory runs out, and one call per task where a module reads task
  weights itself (torchvision's attention).
* ``"supsup"``: SupSup's one-shot inference (Wortsman et al., NeurIPS 2020): every
  task's effective weights in superposition ``sum_t alpha_t W_t`` with ``alpha_t = 1/T``
  (for Piggyback, ``W * sum_t alpha_t M_t``: the masks in superposition; heads likewise,
  zero-padded to the largest), one forward and one backward of the batch's mean output
  entropy to ``alpha``, the task with the steepest decrease ``argmin dH/dalpha``, then
  that task's pass. One choice per batch, as the paper: it assumes the batch comes from
  one task (Avalanche evaluates one experience at a time).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import SeveralTasksUnsupported

DEFAULT_TASK_INFERENCE = "ranpac"
"""The router the runner gives the methods on a class-incremental run: the most accurate
of the five on frozen pretrained proxies, at the prototype router's cost (one base pass
more than the chosen task's; benchmarks/RESULTS.md, "Class-incremental: task-free
inference")."""


def unseen_masked(logits: Tensor, seen: Tensor) -> Tensor:
    """``logits`` (B, K) with the columns of classes not seen (``seen`` (K,) bool) at -inf."""
    return logits.masked_fill(~seen, float("-inf"))


class GrowingBuffers(nn.Module):
    """A module whose buffers grow as classes arrive: loading a state dict first resizes
    each buffer to the saved one's shape (then copies it), so a fresh module restores."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buffer in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buffer is not None and saved is not None and saved.shape != buffer.shape:
                self._buffers[name] = buffer.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ClassMeans(GrowingBuffers):
    """Class-mean feature vectors and cosine scores against them.

    Buffers: ``means`` (K, D), ``seen`` (K,) bool; ``K`` is the largest class id seen + 1.
    """

    def __init__(self, feature_dim: int):
        super().__init__()
        self.register_buffer("means", torch.zeros(0, feature_dim))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))

    @torch.no_grad()
    def learn(self, features: Tensor, labels: Tensor) -> None:
        """Set each class's mean to its mean feature; features (N, D), labels (N,)."""
        classes = labels.unique()
        size = max(len(self.seen), int(classes.max()) + 1)
        self.means = F.pad(self.means, (0, 0, 0, size - len(self.means)))
        self.seen = F.pad(self.seen, (0, size - len(self.seen)))
        for c in classes:
            self.means[c] = features[labels == c].mean(0)
            self.seen[c] = True

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) features -> (B, K) cosine similarities; classes not seen at -inf."""
        return unseen_masked(F.normalize(features, dim=1) @ F.normalize(self.means, dim=1).T,
                             self.seen)


def entropy(logits: Tensor) -> Tensor:
    """(..., C) logits -> (...) entropy of their softmax."""
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def energy(logits: Tensor) -> Tensor:
    """(..., C) logits -> (...) energy ``-logsumexp``: lower is more confident."""
    return -logits.logsumexp(-1)


def task_logits(network, x: Tensor, tasks: list[int]) -> list[Tensor]:
    """Each task's (B, C_t) logits of (B, ...) inputs, in as few network calls as memory
    and the backbone allow (see the module docstring)."""
    if len(tasks) == 1:
        return [network.forward_single_task(x, tasks[0])]
    try:
        return network.forward_tasks(x, tasks)
    except SeveralTasksUnsupported:
        return [network.forward_single_task(x, task) for task in tasks]
    except torch.OutOfMemoryError:
        half = len(tasks) // 2
        return task_logits(network, x, tasks[:half]) + task_logits(network, x, tasks[half:])


def choose_tasks(network, x: Tensor) -> Tensor:
    """(B, ...) inputs -> (B,) the task the network's router chooses for each."""
    kind, tasks = network.options.task_inference, network.routable_tasks()
    if len(tasks) == 1:
        return torch.full((len(x),), tasks[0], device=x.device)
    if kind in ("prototype", "ranpac"):
        nearest = network.base_classifier(network.base_features(x)).argmax(1)
        return network.class_task.to(x.device)[nearest]
    if kind in ("entropy", "energy"):
        score = entropy if kind == "entropy" else energy
        scores = torch.stack([score(logits) for logits in task_logits(network, x, tasks)])
        return torch.tensor(tasks, device=x.device)[scores.argmin(0)]
    if kind == "supsup":
        return torch.full((len(x),), supsup_choice(network, x, tasks), device=x.device)
    raise ValueError(f"task_inference={kind!r} has no router")


def supsup_choice(network, x: Tensor, tasks: list[int]) -> int:
    """SupSup's one-shot choice among ``tasks`` for a batch (see the module docstring)."""
    alphas = torch.full((len(tasks),), 1 / len(tasks), device=x.device, requires_grad=True)
    with torch.enable_grad():
        loss = entropy(network.forward_tasks(x, tasks, alphas)).mean()
        (gradient,) = torch.autograd.grad(loss, alphas)
    return tasks[int(gradient.argmin())]
