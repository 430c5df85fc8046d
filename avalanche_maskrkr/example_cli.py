"""The command line of the example scripts: the ``run`` options with the script's
defaults, plus ``--smoke`` (a check in seconds on miniature data)."""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .benchmarks import BENCHMARK_DEFAULTS
from .cli import add_run_arguments, config_from_args
from .config import RunConfig, Variant, resolve
from .runner import RunResult, build_benchmark, run

SMOKE = {"model": "test_resnet", "img_size": 32, "tasks": 2, "epochs": 1, "batch_size": 8,
         "pretrained": False, "weights": None, "lr_decay_epochs": None, "threads": 1}
"""``--smoke``: a tiny random model, one epoch, two tasks, one thread (as for digits)."""

VariantsFactory = Callable[[RunConfig, Any], list[Variant]]
"""``(resolved config, scenario) -> the summary's rows``."""


def strategy_variants(config: RunConfig, scenario) -> list[Variant]:
    """One variant per ``config.strategies`` entry."""
    return [Variant(s, s) for s in config.strategies]


def run_example(argv: Sequence[str] | None, doc: str, name: str, variants: VariantsFactory,
                smoke_data: Callable[[Path], Path] | None = None,
                smoke: Mapping[str, Any] | None = None, **defaults) -> RunResult:
    """An example script's run: the ``run`` options with ``defaults``, plus ``--smoke``.

    Results go to ``--out``/<model> (default root ``results/<name>-<benchmark>``), so
    runs of several backbones share a root. ``variants(config, scenario)`` gives the
    rows. ``--smoke`` applies :data:`SMOKE` then ``smoke``, with the data that
    ``smoke_data(folder)`` writes in a temporary folder (it returns the data root).
    """
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--smoke", action="store_true",
                        help="a check in seconds: tiny random model, 1 epoch, 2 tasks, "
                             "miniature data written to a temporary folder")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            data_root = str(smoke_data(Path(tmp))) if smoke_data else config.data_root
            config = dataclasses.replace(config, **{**SMOKE, **(smoke or {})},
                                         data_root=data_root)
        root = Path(config.out or Path("results") / f"{name}-{config.benchmark}")
        model = config.model or BENCHMARK_DEFAULTS[config.benchmark].model
        config = resolve(dataclasses.replace(config, model=model, out=str(root / model)))
        scenario = build_benchmark(config)
        return run(config, variants(config, scenario), scenario=scenario)
