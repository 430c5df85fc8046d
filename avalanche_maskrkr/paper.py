"""The paper's protocol for the reproduction examples: its rows (RKR, Piggyback,
Mask-RKR at K=2 and K+, Single, Multi-Head), Piggyback's training recipe, and our
results in the layout of its tables, beside its numbers."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .accounting import find_k_plus
from .config import RunConfig, Variant
from .example_cli import VariantsFactory, run_example
from .options import MethodOptions, option_names
from .registry import trains_masks
from .results import format_table
from .runner import RunResult

PIGGYBACK_RECIPE = {"optimizer": "adam", "lr": 1e-4, "epochs": 30, "batch_size": 32,
                    "lr_decay_epochs": 15}
"""Piggyback's official recipe (SPEC section 3), used for every method by the examples."""

PAPER_BACKBONES = {"resnet": "ResNet-18", "vit": "ViT", "swin": "Swin"}
"""Substring of a model name -> the paper's column (ResNet-18 / ViT / Swin)."""

PaperNumbers = Mapping[str, Sequence[float | None]]
"""Strategy label -> the paper's (ResNet-18, ViT, Swin) values (None: not reported)."""


def paper_variants(config: RunConfig, scenario) -> list[Variant]:
    """The paper's rows: RKR (K=2), Piggyback, Mask-RKR (K=2), Mask-RKR (K+, matching
    RKR's total, :func:`~avalanche_maskrkr.accounting.find_k_plus`), Single, Multi-Head."""
    shared = option_names(MethodOptions)  # options of both RKR and Mask-RKR
    k_plus = find_k_plus(config.model, len(scenario.train_stream), rank=2,
                         classes_per_task=len(scenario.train_stream[0].classes_in_this_experience),
                         img_size=config.img_size,
                         **{k: v for k, v in config.options.items() if k in shared})
    return [Variant("rkr", "rkr", {"rank": 2}), Variant("piggyback", "piggyback"),
            Variant("mask-rkr", "mask-rkr", {"rank": 2}),
            Variant("mask-rkr-k+", "mask-rkr", {"rank": k_plus}),
            Variant("single", "single"), Variant("multi-head", "multi-head")]


def reproduce_paper(argv: Sequence[str] | None, doc: str, title: str, paper: PaperNumbers,
                    smoke_data: Callable[[Path], Path], variants: VariantsFactory | None = None,
                    name: str = "paper", **defaults) -> RunResult:
    """An example reproducing one of the paper's tables:
    :func:`~avalanche_maskrkr.example_cli.run_example` of ``variants`` (default
    :func:`paper_variants`) with Piggyback's recipe (mask scores at the run's rate too),
    then :func:`compare_with_paper`."""
    result = run_example(argv, doc, name, _masks_at_the_run_rate(variants or paper_variants),
                         smoke_data, **{**PIGGYBACK_RECIPE, **defaults})
    compare_with_paper(result, paper, title)
    return result


def _masks_at_the_run_rate(variants: VariantsFactory) -> VariantsFactory:
    """``variants`` with every mask method's scores at the run's rate (``mask_lr``), as
    the recipe trains masks and heads (``lr_mask = lr_classifier``), unless set."""
    def with_mask_rate(config: RunConfig, scenario) -> list[Variant]:
        return [Variant(v.label, v.strategy, {"mask_lr": config.lr, **v.options})
                if trains_masks(v.strategy) and config.lr is not None
                else v for v in variants(config, scenario)]
    return with_mask_rate


def paper_family(model: str) -> str:
    """The paper's column of ``model`` (e.g. ``vit_base_patch16_224`` -> ``ViT``)."""
    return next((family for key, family in PAPER_BACKBONES.items() if key in model), model)


def compare_with_paper(result: RunResult, paper: PaperNumbers, title: str,
                       column: str = "avg_accuracy") -> pd.DataFrame:
    """The paper's layout: one row per strategy, per backbone our value and the paper's.

    Ours are read from every ``<root>/<model>/summary.csv`` beside ``result`` (one
    folder per backbone run), so the table fills up as backbones are run. Printed, and
    written to ``<root>/paper_table.md``.
    """
    root = Path(result.config.out).parent
    ours = {paper_family(path.parent.name): pd.read_csv(path).set_index("strategy")[column]
            for path in sorted(root.glob("*/summary.csv"))}
    rows = list(dict.fromkeys([*result.summary["strategy"], *paper]))
    table = pd.DataFrame({"strategy": rows})
    for i, family in enumerate(PAPER_BACKBONES.values()):
        values = ours.get(family, pd.Series(dtype=float))
        table[family] = [values.get(row, np.nan) for row in rows]
        table[f"{family} (paper)"] = [
            np.nan if paper.get(row) is None or paper[row][i] is None else paper[row][i]
            for row in rows]
    tasks = len(next(iter(result.matrices.values())))
    text = (f"{title}, {tasks} tasks: {column}, ours beside the paper's\n\n"
            f"{format_table(table)}\n")
    (root / "paper_table.md").write_text(text)
    print(text)
    return table
