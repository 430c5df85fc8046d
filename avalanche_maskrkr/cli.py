"""Command line: ``python -m avalanche_maskrkr {run,params} ...``.

* ``params``: the parameter report of SPEC section 4 for a backbone (CSV or table).
* ``run``: the experiment runner (see :mod:`avalanche_maskrkr.runner`); with no
  arguments, the offline default on scikit-learn's digits.
"""
from __future__ import annotations

import argparse
import sys

from .accounting import parameter_report

REPORT_CSV_COLUMNS = ["method", "rank", "total_params", "overhead_pct"]


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


def _add_run_parser(subparsers) -> None:
    from . import runner

    parser = subparsers.add_parser(
        "run", help="run strategies over a benchmark (default: offline digits job)",
        description=runner.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_arguments(parser)
    parser.set_defaults(handler=runner.main)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m avalanche_maskrkr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    _add_params_parser(subparsers)
    args = parser.parse_args(argv)
    args.handler(args)
