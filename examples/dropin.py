"""RKR as a drop-in Avalanche strategy: a plain Avalanche script where only the strategy
line changes (the Naive line is beside it, commented out).

Split digits: 5 tasks of 2 classes with task labels, on timm's tiny ``test_resnet`` from
random weights, so RKR trains the base on the first task and freezes it
(``train_base_first=True``); with a pretrained backbone, leave that out.

    python examples/dropin.py
    python examples/dropin.py --epochs 10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from avalanche.training import Naive  # noqa: F401  (the commented-out line below)

import avalanche_maskrkr as amr
from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.evaluation import collect_accuracy_matrix, make_evaluator
from avalanche_maskrkr.results import accuracy_matrix_frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", help="folder to write the accuracy matrix to (CSV)")
    parser.add_argument("--smoke", action="store_true", help="one epoch on two tasks")
    args = parser.parse_args(argv)

    benchmark = split_digits(n_experiences=2 if args.smoke else 5, channels=3)
    model = timm.create_model("test_resnet", num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    evaluator = make_evaluator(verbose=not args.smoke)
    common = dict(optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                  train_mb_size=32, train_epochs=1 if args.smoke else args.epochs,
                  eval_mb_size=256, evaluator=evaluator)

    strategy = amr.RKR(model=model, train_base_first=True, **common)
    # strategy = Naive(model=model, **common)

    for experience in benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)

    matrix = collect_accuracy_matrix(evaluator, len(benchmark.train_stream))
    print("accuracy on each task after the last one:", matrix[-1].round(3))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        accuracy_matrix_frame(matrix).to_csv(Path(args.out) / "accuracy_matrix_rkr.csv")


if __name__ == "__main__":
    main(sys.argv[1:])
