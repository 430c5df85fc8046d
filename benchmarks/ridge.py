"""RanPAC's solve per experience on the CPU or GPU: the time of
:meth:`~avalanche_maskrkr.ridge.RandomFeatureRidge.learn` for one experience, and of
its two linear-algebra steps at each projection size M: the eigendecomposition that
scores the ridge grid, and the final solve for the chosen ridge, by LU (what ``learn``
does) against an eigendecomposition (what it did before). Random features: the times
depend on the shapes only.

    python benchmarks/ridge.py --dims 2000,4000,10000
"""
from __future__ import annotations

import argparse
import datetime
import time

import pandas as pd
import torch

from avalanche_maskrkr.results import format_table
from avalanche_maskrkr.ridge import RandomFeatureRidge, ridge_solution, ridge_solutions


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(M: int, samples: int, feature_dim: int, classes: int, device: str) -> dict:
    features = torch.randn(samples, feature_dim, device=device)
    labels = torch.arange(samples, device=device) % classes
    classifier = RandomFeatureRidge(feature_dim, M).to(device)
    learn = seconds(lambda: classifier.learn(features, labels))
    gram, targets, ridge = classifier.gram, classifier.targets, classifier.ridge
    by_eigh = seconds(lambda: ridge_solutions(gram, targets, [ridge]))
    by_lu = seconds(lambda: ridge_solution(gram, targets, ridge))
    return {"M": M, "learn_s": round(learn, 3), "eigh_s": round(by_eigh, 3),
            "lu_s": round(by_lu, 3), "eigh_over_lu": round(by_eigh / by_lu, 1),
            "learn_before_over_now": round((learn + by_eigh - by_lu) / learn, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="2000,4000", help="values of M, comma-separated")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--feature-dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = [measure(int(m), args.samples, args.feature_dim, args.classes, args.device)
            for m in args.dims.split(",")]
    print(f"{datetime.date.today()}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.samples} samples of {args.feature_dim} features, {args.classes} classes, "
          "float64 statistics\n")
    print(format_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
