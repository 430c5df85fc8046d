"""RKR, Piggyback and Mask-RKR beside Avalanche's Naive, EWC, LwF, SI, Replay and PackNet.

One benchmark (digits by default), one model for all: ``simple_mlp`` (Avalanche's
SimpleMLP), since Avalanche's PackNet rejects normalisation layers. Naive, EWC, LwF, SI
and Replay train a shared network with one head per task; PackNet prunes and freezes
weights per task in a single network; the methods train the base on the first task and
freeze it. One summary (summary.csv, matrices, plots) in --out/<model>.

    python examples/compare_avalanche.py
    python examples/compare_avalanche.py --benchmark cifar100 --data-root ~/data \\
        --img-size 32 --epochs 10 --device cuda

Any option of ``python -m avalanche_maskrkr run`` applies (--strategies, --ewc-lambda,
--replay-mem-size, ...); a model with normalisation layers works for every strategy but
packnet. --smoke runs it in seconds on two tasks.
"""
from __future__ import annotations

import sys

from avalanche_maskrkr.example_cli import run_example, strategy_variants

STRATEGIES = "rkr,piggyback,mask-rkr,naive,ewc,lwf,si,replay,packnet"


def main(argv: list[str] | None = None) -> None:
    run_example(argv, __doc__, "compare", strategy_variants,
                smoke={"model": "simple_mlp", "img_size": 8, "epochs": 2},
                model="simple_mlp", strategies=STRATEGIES)


if __name__ == "__main__":
    main(sys.argv[1:])
