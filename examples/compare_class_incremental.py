"""Class-incremental comparison: SimpleCIL, RanPAC, APER, RKR, Piggyback and Mask-RKR
(task-free inference, the ranpac router by default) beside Avalanche's naive
fine-tuning, LwF, Replay, DER and iCaRL, with one classifier over all classes and no task
label at test time (``--scenario class``; on CIFAR-100 the published class order, seed
1993). One summary (summary.csv with avg_incremental_accuracy, last_accuracy,
forgetting, task_id_accuracy, costs) in --out/<model>; then, when the benchmark and task
count match a published protocol, our numbers beside the published ones with their
sources (printed and written to --out/published_table.md).

The published protocol, CIFAR-100 B0-Inc5 (20 tasks of 5 classes) with ViT-B/16
pretrained on ImageNet-21k from a local weights file, at 224x224:

    python examples/compare_class_incremental.py --benchmark cifar100 --tasks 20 \\
        --model vit_base_patch16_224.augreg_in21k --weights ~/weights/vit_b16_in21k.npz \\
        --img-size 224 --adapter bottleneck --data-root ~/data --device cuda

--data-root holds cifar-100-python/; nothing is downloaded. Any option of ``python -m
avalanche_maskrkr run`` applies (--strategies, --adapter, --ranpac-dim,
--task-inference, --replay-mem-size, ...); ``--adapter bottleneck`` is the published
APER's adapter (the default, rkr, converts any backbone). On CPU without data, --smoke
runs every strategy on digits (2 tasks, a tiny random model, RanPAC with 256 random
features unless --ranpac-dim is given) in seconds:

    python examples/compare_class_incremental.py --smoke
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from avalanche_maskrkr.example_cli import run_example, strategy_variants
from avalanche_maskrkr.results import format_table

STRATEGIES = "simplecil,ranpac,aper,rkr,piggyback,mask-rkr,naive,lwf,replay,der,icarl"

EASE_TABLE_1 = "Zhou et al., CVPR 2024 (EASE), Table 1"
PUBLISHED = {
    ("cifar100", 20): [
        # (method as published, our strategy or None, avg incremental, last accuracy)
        ("Finetune", "naive", 0.3890, 0.2017),
        ("LwF", "lwf", 0.4629, 0.4107),
        ("SimpleCIL", "simplecil", 0.8757, 0.8126),
        ("APER (ADAM) + Adapter", "aper", 0.9065, 0.8515),
        ("EASE", None, 0.9151, 0.8580),
    ],
}
"""(benchmark, tasks) -> published rows, CIFAR-100 B0-Inc5 with ViT-B/16-IN21K, all from
:data:`EASE_TABLE_1` (SimpleCIL and APER as reported there for Zhou et al., IJCV 2024).
Our ``aper`` has the published adapter with ``--adapter bottleneck``."""


def published_table(summary: pd.DataFrame, benchmark: str, tasks: int) -> pd.DataFrame | None:
    """The published rows of ``(benchmark, tasks)`` with our summary's values beside
    them (empty where a strategy did not run); None when nothing was published."""
    rows = PUBLISHED.get((benchmark, tasks))
    if rows is None:
        return None
    ours = summary.set_index("strategy")
    table = pd.DataFrame(rows, columns=["method", "strategy", "avg_incremental (paper)",
                                        "last (paper)"])
    for column, name in (("avg_incremental_accuracy", "avg_incremental"),
                         ("last_accuracy", "last")):
        table.insert(table.columns.get_loc(f"{name} (paper)"), name,
                     [ours[column].get(s, float("nan")) for s in table["strategy"]])
    table["strategy"] = table["strategy"].fillna("")
    table["source"] = EASE_TABLE_1
    return table


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--smoke" in argv and "--ranpac-dim" not in argv:
        argv += ["--ranpac-dim", "256"]  # the published 10000 takes minutes on a CPU
    result = run_example(argv, __doc__, "compare-class", strategy_variants,
                         smoke={"model": "simple_mlp", "img_size": 8},
                         scenario="class", strategies=STRATEGIES)
    config = result.config
    tasks = len(next(iter(result.matrices.values())))
    table = published_table(result.summary, config.benchmark, tasks)
    if table is None:
        known = ", ".join(f"{b} with {t} tasks" for b, t in PUBLISHED)
        print(f"No published numbers for {config.benchmark} with {tasks} tasks "
              f"(published: {known}).")
        return
    text = (f"{config.benchmark}, {tasks} tasks, {config.model}: ours beside the "
            f"published numbers\n\n{format_table(table)}\n")
    (Path(config.out).parent / "published_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
