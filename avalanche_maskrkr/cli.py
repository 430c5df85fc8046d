"""Command line: ``python -m avalanche_maskrkr {run,params} ...``.

* ``params``: the parameter report of SPEC section 4 for a backbone (CSV or table).
* ``run``: the experiment runner (see :mod:`avalanche_maskrkr.runner`); with no
  arguments, the offline default on scikit-learn's digits.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from . import runner
from .acceleration import PRECISIONS
from .accounting import parameter_report
from .baselines import BaselineOptions
from .benchmarks import BENCHMARK_DEFAULTS, DECATHLON_TEST_SPLITS, SCENARIOS
from .checkpoint import CheckpointError, WeightsError
from .config import (DEFAULT_CLASS_STRATEGIES, DEFAULT_STRATEGIES, OPTIMIZERS, ConfigError,
                     RunConfig)
from .layers import PLACEMENTS
from .options import BN_POLICIES, METHODS, TASK_INFERENCE
from .routing import DEFAULT_TASK_INFERENCE
from .registry import APER_ADAPTERS, PretrainedModelOptions, option_users, strategies_for

REPORT_CSV_COLUMNS = ["method", "rank", "total_params", "overhead_pct"]
CHOICES = {"bn_policy": BN_POLICIES, "mask_placement": PLACEMENTS,
           "task_inference": TASK_INFERENCE, "adapter": APER_ADAPTERS,
           "ranpac_adapter": APER_ADAPTERS}


def _add_params_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "params", help="parameter totals per method (paper conventions)",
        description="Total parameters for T tasks of each method, counted on the layers "
                    "that conversion creates (random weights, nothing downloaded).")
    parser.add_argument("--model", default="vit_base_patch16_224",
                        help="any timm model name, or resnet18_cifar")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--classes-per-task", type=int, default=10)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--format", choices=("csv", "table"), default="table",
                        help="csv: method,rank,total_params,overhead_pct; table: with "
                             "the bytes per task on disk")
    parser.set_defaults(handler=_params)


def _params(args: argparse.Namespace) -> None:
    from .results import format_table

    report = parameter_report(args.model, img_size=args.img_size, tasks=args.tasks,
                              classes_per_task=args.classes_per_task, rank=args.rank)
    if args.format == "csv":
        sys.stdout.write(report[REPORT_CSV_COLUMNS].to_csv(index=False))
        return
    print(f"{args.model} at {args.img_size}px, {args.tasks} tasks x "
          f"{args.classes_per_task} classes (masks count 1/32 of a parameter)\n")
    report["rank"] = report["rank"].astype(object).where(report["rank"].notna(), "")
    print(format_table(report))


def _add_option_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "method and baseline options", "Default: each method's or baseline's own (shown); "
        "see avalanche_maskrkr.options and avalanche_maskrkr.baselines.BaselineOptions.")
    defaults = {f.name: f.default for cls in (*METHODS.values(), BaselineOptions,
                                              PretrainedModelOptions)
                for f in dataclasses.fields(cls)}
    for name, default in defaults.items():
        shown = {"train_base_first": "off; on without pretrained weights",
                 "task_inference": f"oracle; --scenario class: {DEFAULT_TASK_INFERENCE}",
                 "ranpac_dim": f"{default}; digits "
                               f"{BENCHMARK_DEFAULTS['digits'].ranpac_dim}",
                 "ranpac_adapter": "none: the pretrained features; else the module "
                                   "trained on the first experience, as --adapter's",
                 }.get(name, default)
        kwargs: dict[str, Any] = {"default": None, "dest": f"option_{name}",
                                  "help": f"{', '.join(option_users(name))} (default: {shown})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        else:
            kwargs["type"] = type(default) if default is not None else str
            kwargs["metavar"] = name.split("_")[-1].upper()
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` command's options (one per :class:`~avalanche_maskrkr.config.RunConfig`
    field)."""
    d = RunConfig()
    data = parser.add_argument_group("data and model")
    data.add_argument("--benchmark", choices=sorted(BENCHMARK_DEFAULTS), default=d.benchmark)
    data.add_argument("--scenario", choices=SCENARIOS, default=d.scenario,
                      help="task-incremental (task label at test time, classes from 0 in each "
                           "task) or class-incremental (no task label, one label space; the "
                           "published class order on cifar100 and imagenet; not decathlon)")
    data.add_argument("--data-root", metavar="DIR",
                      help="dataset folder (cifar100: holds cifar-100-python; imagenet: "
                           "train/ and val/; decathlon: the decathlon-1.0 folder)")
    data.add_argument("--decathlon-test-split", choices=DECATHLON_TEST_SPLITS,
                      default=d.decathlon_test_split,
                      help="what decathlon evaluates on: annotations/<domain>_val.json, or "
                           "the labelled <domain>_test.json (released with the residual "
                           "adapters code; the devkit's *_test_stripped.json has no labels)")
    data.add_argument("--tasks", type=int, metavar="T",
                      help="number of tasks (default: digits 5, cifar100 and imagenet 10; "
                           "decathlon: its 5 domains)")
    data.add_argument("--model", help="any timm model name, resnet18_cifar or simple_mlp "
                      "(default: " + ", ".join(f"{b} {d.model}" for b, d in
                                               BENCHMARK_DEFAULTS.items()) + ")")
    data.add_argument("--img-size", type=int, metavar="S",
                      help="input side (default: " + ", ".join(
                          f"{b} {d.img_size}" for b, d in BENCHMARK_DEFAULTS.items()) + ")")
    weights = data.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="timm's pretrained weights (downloads)")
    weights.add_argument("--weights", metavar="FILE", help="local .safetensors, .pth or "
                         ".npz (timm's original ViT) weights; the classifier is skipped")
    train = parser.add_argument_group("training")
    train.add_argument("--strategies", help="comma-separated (default: "
                       + ",".join(DEFAULT_STRATEGIES) + "; with --scenario class: "
                       + ",".join(DEFAULT_CLASS_STRATEGIES) + "), from: "
                       + ", ".join(strategies_for("task")) + "; with --scenario class: "
                       + ", ".join(strategies_for("class")))
    train.add_argument("--epochs", type=int, default=d.epochs, help="per experience")
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    train.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=d.optimizer)
    train.add_argument("--lr", type=float, help="one learning rate for every strategy "
                       "(default: each strategy's, see avalanche_maskrkr.config.DEFAULT_LR)")
    train.add_argument("--momentum", type=float, default=d.momentum, help="sgd only")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--lr-decay-epochs", type=int, metavar="N",
                       help="multiply the learning rate by 0.1 every N epochs")
    train.add_argument("--workers", type=int, default=d.workers,
                       help="data loader workers (default: half the CPU cores, at most 8, "
                            "on CUDA, with pinned memory; 0 on CPU)")
    train.add_argument("--threads", type=int, help="CPU threads of torch (default: digits 1, "
                       "others torch's default)")
    train.add_argument("--precision", choices=list(PRECISIONS), default=d.precision,
                       help="autocast of forward and loss (AccelerationPlugin); other than "
                            "fp32, a run checkpoints only at each strategy's end")
    train.add_argument("--channels-last", action="store_true",
                       help="channels-last layout of 4-d parameters and inputs (CNNs on GPU)")
    train.add_argument("--device", help="default: cuda when available, else cpu")
    train.add_argument("--seed", type=int, default=d.seed)
    _add_option_arguments(parser)
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="default: results/<benchmark>-<model>")
    output.add_argument("--restart", action="store_true",
                        help="ignore and replace existing checkpoints")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`~avalanche_maskrkr.config.RunConfig` of parsed
    :func:`add_run_arguments` options."""
    values = vars(args)
    options = {k.removeprefix("option_"): v for k, v in values.items()
               if k.startswith("option_") and v is not None}
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"options", "strategies"}
    strategies = tuple(s.strip() for s in (args.strategies or "").split(",") if s.strip())
    return RunConfig(**{k: values[k] for k in names if k in values}, strategies=strategies or None,
                     options=options)


def _run(args: argparse.Namespace) -> None:
    """:func:`~avalanche_maskrkr.runner.run` of the parsed options; settings, checkpoints,
    weights files and data folders that do not work end it with a message, no traceback."""
    try:
        runner.run(config_from_args(args))
    except (ConfigError, CheckpointError, WeightsError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from err


def _add_run_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="run strategies over a benchmark (default: offline digits job)",
        description=runner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.set_defaults(handler=_run)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avalanche_maskrkr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    _add_params_parser(subparsers)
    args = parser.parse_args(argv)
    args.handler(args)
