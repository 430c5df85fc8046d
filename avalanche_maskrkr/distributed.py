"""Multi-process training of the method strategies with DistributedDataParallel.

Launch one process per device with torchrun, e.g. on two CPU processes::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m avalanche_maskrkr.distributed --method mask-rkr --experiences 2 --out exports/

In a script: call :func:`init_distributed` first in every process, and add
:class:`DistributedPlugin` to the strategy. What happens:

* :func:`init_distributed` starts the process group from torchrun's environment through
  Avalanche's ``DistributedHelper`` (gloo on CPU, nccl on CUDA) and seeds every process
  alike. Avalanche 0.6's data loaders then shard each experience with a
  ``DistributedSampler``: every process takes ``train_mb_size`` samples per step, so the
  global batch is ``world_size * train_mb_size``.
* Task parameters are created per experience (by the network's adaptation), so the plugin
  wraps the network in ``DistributedDataParallel`` anew before each training experience,
  once they exist. The wrap broadcasts rank 0's parameters and buffers (the new task's
  random initialisation included), and DDP then averages the gradients of the parameters
  that require one: exactly what the experience trains; frozen ones are never
  communicated. Unused trainable parameters are allowed (``find_unused_parameters``):
  heads that an evaluation created for tasks not trained yet require gradients.
* Only the forward pass goes through the wrapper: ``strategy.model`` is the DDP module
  from ``before_forward`` to ``after_forward``, where Avalanche's ``avalanche_forward``
  passes the task labels on to the wrapped ``MultiTaskModule``; every other hook sees the
  network itself. The gradient hooks DDP registers average the gradients during backward.
* Evaluation is not wrapped, and not sharded: Avalanche's ``make_eval_dataloader``
  applies a ``DistributedSampler`` too, so ``before_eval_exp`` (which runs right after
  it) rebuilds the loader over the whole experience with the same arguments. Every
  process evaluates every sample, and all report the metrics of the full stream.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from avalanche.benchmarks.utils.data_loader import SingleDatasetDataLoader
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch.nn.parallel import DistributedDataParallel

from .models import create_backbone
from .benchmarks import split_digits
from .export import export_task
from .strategies import RKR, MaskRKR, MethodStrategy, Piggyback

STRATEGIES = {"rkr": RKR, "piggyback": Piggyback, "mask-rkr": MaskRKR}


def init_distributed(seed: int = 0, backend: str | None = None) -> torch.device:
    """Join the process group that torchrun describes (a no-op without torchrun) and
    return this process's device (``cuda:<local rank>`` or ``cpu``)."""
    if not DistributedHelper.is_distributed and "LOCAL_RANK" in os.environ:
        DistributedHelper.init_distributed(seed, backend=backend,
                                           use_cuda=torch.cuda.is_available())
    else:
        DistributedHelper.set_random_seeds(seed)
    return DistributedHelper.make_device()


class DistributedPlugin(SupervisedPlugin, supports_distributed=True):
    """Averages the gradients of each training experience over the processes (DDP);
    every process evaluates the whole of each evaluation experience.

    A no-op when the process group is not initialised, so the same script runs on one
    process unchanged.
    """

    def __init__(self):
        super().__init__()
        self.ddp: DistributedDataParallel | None = None

    def before_training_exp(self, strategy, **kwargs):
        if not DistributedHelper.is_distributed:
            return
        devices = [strategy.device] if strategy.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(strategy.model, device_ids=devices,
                                           find_unused_parameters=True)

    def before_forward(self, strategy, **kwargs):
        if self.ddp is not None:
            strategy.model = self.ddp

    def after_forward(self, strategy, **kwargs):
        if self.ddp is not None:
            strategy.model = self.ddp.module

    def after_training_exp(self, strategy, **kwargs):
        self.ddp = None  # its gradient hooks go with it

    def before_eval_exp(self, strategy, **kwargs):
        # make_eval_dataloader (run just before) shards the experience and ignores
        # any argument against it
        loader = strategy.dataloader
        if isinstance(loader, SingleDatasetDataLoader) and loader.distributed_sampling:
            strategy.dataloader = SingleDatasetDataLoader(
                strategy.adapted_dataset, batch_size=loader.batch_sizes[0],
                distributed_sampling=False, ffcv_args=loader.ffcv_args, **loader.loader_kwargs)


class _SampleCount(SupervisedPlugin, supports_distributed=True):
    """Counts the samples that evaluation runs through the model."""

    def __init__(self):
        super().__init__()
        self.samples = 0

    def after_eval_iteration(self, strategy, **kwargs):
        self.samples += len(strategy.mb_y)


def _digits(img_size: int):
    return split_digits(n_experiences=5, image_size=img_size, channels=3)


def train_digits(method: str, experiences: int = 2, model: str = "test_resnet",
                 img_size: int = 16, batch: int = 16, epochs: int = 1, lr: float = 0.05,
                 shuffle: bool = True, seed: int = 0,
                 device: torch.device | None = None) -> MethodStrategy:
    """Train ``method`` over the first ``experiences`` tasks of split digits (offline),
    ``batch`` samples per process and step (and per evaluation step), with SGD; returns
    the strategy, whose ``model`` is the network."""
    device = device or init_distributed(seed)
    torch.manual_seed(seed)
    backbone = create_backbone(model, 2, img_size=img_size)
    strategy = STRATEGIES[method](
        model=backbone, optimizer=torch.optim.SGD(backbone.parameters(), lr=lr),
        train_mb_size=batch, train_epochs=epochs, eval_mb_size=batch, device=device,
        plugins=[DistributedPlugin()],
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]))
    for exp in _digits(img_size).train_stream[:experiences]:
        # drop_last: every process takes equally many full batches
        strategy.train(exp, eval_streams=[], shuffle=shuffle, drop_last=True)
    return strategy


def evaluate_digits(strategy: MethodStrategy, experiences: int = 2,
                    img_size: int = 16) -> dict:
    """Evaluate a :func:`train_digits` strategy on the first ``experiences`` tasks of the
    split digits test stream: Avalanche's accuracy of each (by metric name) and the
    number of samples evaluated."""
    count = _SampleCount()
    strategy.plugins.append(count)
    accuracy = strategy.eval(_digits(img_size).test_stream[:experiences])
    strategy.plugins.remove(count)
    return {"accuracy": accuracy, "samples": count.samples}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(STRATEGIES), default="rkr")
    parser.add_argument("--model", default="test_resnet", help="a timm model name")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--experiences", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="samples per process and step")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="default: nccl on CUDA, else gloo")
    parser.add_argument("--out", type=Path, help="export every task to OUT/rank<r>/")
    parser.add_argument("--eval", action="store_true",
                        help="then evaluate the trained tasks on the test stream (with "
                             "--out: to OUT/rank<r>/eval.json)")
    args = parser.parse_args(argv)
    device = init_distributed(args.seed, args.backend)
    strategy = train_digits(args.method, args.experiences, args.model, args.img_size,
                            args.batch, args.epochs, args.lr, args.shuffle, args.seed, device)
    net, rank = strategy.model, DistributedHelper.rank
    folder = None if args.out is None else args.out / f"rank{rank}"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for task in net.trained_tasks:
            export_task(net, task, folder / f"task{task}.safetensors")
    print(f"rank {rank}/{DistributedHelper.world_size}: trained tasks {net.trained_tasks}")
    if args.eval:
        result = evaluate_digits(strategy, args.experiences, args.img_size)
        print(f"rank {rank}: {result['samples']} test samples, accuracy {result['accuracy']}")
        if folder is not None:
            (folder / "eval.json").write_text(json.dumps(result, indent=1))
    if DistributedHelper.is_distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
