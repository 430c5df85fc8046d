"""Training in several processes, one per device, as torchrun launches them::

    torchrun --nproc_per_node 2 -m avalanche_maskrkr run --strategies mask-rkr ...

The runner joins the process group in :func:`process_group` and puts
:class:`DistributedPlugin` first in every strategy's plugins; a script of its own can do
the same. What happens, for any strategy:

* :func:`process_group` joins the group that torchrun's environment describes (gloo on
  CPU, nccl on CUDA, where each process takes the GPU of its local rank, see
  :func:`process_device`). Every process seeds its generators alike.
* Avalanche 0.6's data loaders then shard each training experience with a
  ``DistributedSampler``: every process takes ``train_mb_size`` samples per step, so the
  global batch is ``world_size * train_mb_size``. Avalanche builds that sampler anew (seed
  0, epoch 0) for every pass over the data; the plugin gives each pass its own order
  instead (from the run's seed and the training iterations so far, which a checkpoint
  keeps), as one process's shuffling does.
* Every process starts each training experience from rank 0's parameters and buffers
  (task parameters, created per experience by the network's adaptation, included), and
  after every backward pass the gradients of what the optimizer steps are averaged over
  the processes: the gradient of the mean loss over the global batch, so every process
  takes the same step. Frozen parameters are never communicated. This is what
  ``DistributedDataParallel`` does, done after the backward pass instead of inside it:
  regularisers such as EWC's and SI's penalties reach parameters that the forward pass
  does not use (earlier tasks' heads), which DDP's gradient hooks refuse.
* BatchNorm layers that train (``train_base_first``, the baselines) normalise over each
  process's own batch; after the experience every process keeps rank 0's statistics, as
  DDP's buffer broadcast does.
* Evaluation is not sharded: Avalanche's ``make_eval_dataloader`` applies a
  ``DistributedSampler`` too, so ``before_eval_exp`` (which runs right after it) rebuilds
  the loader over the whole experience with the same arguments. Every process evaluates
  every sample, and all hold the metrics of the full stream.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader, SingleDatasetDataLoader
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """Inside: a member of the process group that torchrun's environment describes, with
    gloo for a CPU ``device`` and nccl for CUDA. A no-op outside torchrun, or when the
    group is joined already (then whoever joined it leaves it)."""
    join = "LOCAL_RANK" in os.environ and not dist.is_initialized()
    if join:
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(_local_rank())
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        if join:
            dist.destroy_process_group()


def process_device(device: str) -> torch.device:
    """This process's ``device``: ``cuda`` is the GPU of the local rank in a process group."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None and dist.is_initialized():
        return torch.device("cuda", _local_rank())
    return resolved


class DistributedPlugin(SupervisedPlugin, supports_distributed=True):
    """Trains one model in every process: each starts an experience from rank 0's model,
    averages its gradients with the others' after every backward pass, and keeps rank 0's
    buffers after the experience; each epoch has a sample order of its own (from ``seed``
    and the training iterations so far). Every process evaluates the whole of each
    evaluation experience.

    Put it first in ``strategy.plugins`` (``strategy.plugins.insert(0, plugin)``), so
    that every other plugin sees averaged gradients and the same model in every process.
    A no-op when the process group is not initialised, so the same script runs on one
    process unchanged.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def before_training_exp(self, strategy, **kwargs):
        if DistributedHelper.is_distributed:
            _broadcast([*strategy.model.parameters(), *strategy.model.buffers()])

    def before_training_epoch(self, strategy, **kwargs):
        loader = strategy.dataloader
        if isinstance(loader, MultiDatasetDataLoader) and loader.distributed_sampling:
            _order_samplers(loader, self.seed, strategy.clock.train_iterations)

    def after_backward(self, strategy, **kwargs):
        if DistributedHelper.is_distributed:
            _average_gradients([p for group in strategy.optimizer.param_groups
                                for p in group["params"] if p.grad is not None])

    def after_training_exp(self, strategy, **kwargs):
        if DistributedHelper.is_distributed:  # statistics of each process's batches
            _broadcast(list(strategy.model.buffers()))

    def before_eval_exp(self, strategy, **kwargs):
        # make_eval_dataloader (run just before) shards the experience and ignores
        # any argument against it
        loader = strategy.dataloader
        if isinstance(loader, SingleDatasetDataLoader) and loader.distributed_sampling:
            strategy.dataloader = SingleDatasetDataLoader(
                strategy.adapted_dataset, batch_size=loader.batch_sizes[0],
                distributed_sampling=False, ffcv_args=loader.ffcv_args, **loader.loader_kwargs)


def _flat_groups(tensors: list[torch.Tensor]) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """``tensors`` by dtype, each group with one flat copy of its values: one collective
    per dtype instead of one per tensor."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        yield group, torch.cat([t.reshape(-1) for t in group])


def _unflatten(group: list[torch.Tensor], flat: torch.Tensor) -> None:
    for tensor, values in zip(group, flat.split([t.numel() for t in group])):
        tensor.copy_(values.view_as(tensor))


@torch.no_grad()
def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` in every process."""
    for group, flat in _flat_groups(tensors):
        dist.broadcast(flat, src=0)
        _unflatten(group, flat)


@torch.no_grad()
def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Every process's ``grad`` of ``params`` becomes the mean over the processes (the
    gradient of the mean loss over the global batch, when the processes' batches have
    the same size)."""
    for group, flat in _flat_groups([p.grad for p in params]):
        dist.all_reduce(flat)
        _unflatten(group, flat.div_(dist.get_world_size()))


def _order_samplers(loader: MultiDatasetDataLoader, seed: int, epoch: int) -> None:
    """Make the ``DistributedSampler`` that ``loader`` builds at its next pass draw the
    order of (``seed``, ``epoch``). Avalanche builds its samplers in the static
    ``_create_samplers`` at every pass; an attribute of the loader takes its place."""
    create = type(loader)._create_samplers

    def create_ordered(*args, **kwargs):
        samplers = create(*args, **kwargs)
        for batches in samplers:  # BatchSampler over a DistributedSampler
            batches.sampler.seed = seed
            batches.sampler.set_epoch(epoch)
        return samplers

    loader._create_samplers = create_ordered
