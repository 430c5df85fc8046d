"""Task-free inference on a frozen pretrained backbone: the routers against the oracle and
the class-incremental references.

Class-incremental split digits (5 experiences of 2 classes, global class ids in order,
resized to the backbone's side, normalised with its mean and std). RKR, Piggyback and
Mask-RKR train once each (default options, ``Adam(model.parameters(), lr=1e-3)``, batch
32, ``task_inference="prototype"`` so that the class means are learned; the ranpac
router's classifier learns from the same base features after each experience); after each
experience the test experiences seen so far are evaluated, one at a time in batches of
256 (as Avalanche does), under every router, and under the oracle that routes each input
to the task that learned its class. The references on the same stream and backbone:
Naive fine-tuning of one 10-class linear head on the frozen backbone, Naive fine-tuning
of the whole network (same optimizer, batch and epochs), SimpleCIL, RanPAC, and APER and
optionally RanPAC with first-session adaptation (their module trained on the first
experience under the same optimizer, batch and epochs).

Cost: milliseconds per test image of the evaluation forward after the last experience,
at batch 256 (one batch of inputs drawn from all test experiences) and at batch 1, each
configuration timed in turn within every repeat after a warm-up, median over repeats.
The oracle pass is ``forward_single_task`` with the true task: over the batch of 256, one
pass with the task of its first input (what a task-incremental evaluation costs); at
batch 1, one pass per input with its own task, the inputs arriving in mixed order as
for the routers. Prints the mean over seeds.

    python benchmarks/routers.py --proxy --model test_efficientnet --img-size 16 --epochs 5
    python benchmarks/routers.py --proxy --model test_efficientnet --img-size 16 --epochs 5 \
        --methods "" --ranpac-adapters rkr,piggyback   # the references alone
"""
from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from backbone_choice import add_backbone_arguments, backbone_factory, describe
from torch import Tensor, nn

from avalanche_maskrkr.benchmarks import split_digits
from avalanche_maskrkr.benchmarks.probe_check import METHODS, dataset_tensors
from avalanche_maskrkr.benchmarks.transforms import resolve_input_spec
from avalanche_maskrkr.cil import APER, RanPAC, SimpleCIL
from avalanche_maskrkr.cil.prototypes import FrozenBackbone
from avalanche_maskrkr.ridge import RandomFeatureRidge
from avalanche_maskrkr.results import (average_incremental_accuracy, format_table,
                                       last_accuracy)

ROUTERS = ("oracle", "prototype", "ranpac", "entropy", "energy", "supsup")
EXPERIENCES, CLASSES, EVAL_BATCH = 5, 10, 256


def evaluator() -> EvaluationPlugin:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


@contextmanager
def using_router(network, router: str):
    """``network`` routing with ``router`` inside the block (``"ranpac"``: with the
    classifier in ``network.ranpac_router``), its own router again after."""
    options, own = network.options, network.base_classifier
    network.options = dataclasses.replace(options, task_inference=router)
    if router == "ranpac":
        network.base_classifier = network.ranpac_router
    try:
        yield
    finally:
        network.options, network.base_classifier = options, own


@torch.no_grad()
def route(network, router: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted classes (B,) and chosen tasks (B,) of (B, ...) inputs with labels (B,)
    under ``router`` (``"oracle"``: each input's true task)."""
    if router == "oracle":
        tasks = network.class_task[y]
        return network.routed_logits(x, tasks).argmax(1), tasks
    with using_router(network, router):
        predicted = network(x, 0).argmax(1)
    return predicted, network.routed_tasks


def batches(x: Tensor, y: Tensor):
    return zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH))


def accuracy(predict: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> float:
    right = sum(int((predict(xb, yb) == yb).sum()) for xb, yb in batches(x, y))
    return right / len(y)


def median_ms_per_image(timed: dict[str, Callable[[], None]], images: int,
                        repeats: int) -> dict[str, float]:
    """Each callable's median time over ``repeats`` (all called in turn in each repeat,
    after one warm-up call each), in milliseconds per image of ``images``."""
    times = {name: [] for name in timed}
    for repeat in range(repeats + 1):
        for name, call in timed.items():
            start = time.perf_counter()
            call()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) / images for name, t in times.items()}


@torch.no_grad()
def router_costs(network, x: Tensor, y: Tensor, seed: int, singles: int = 16,
                 repeats: int = 5) -> dict[str, dict[str, float]]:
    """Milliseconds per image of each router's evaluation forward and of the oracle pass,
    at batch 256 (inputs drawn from all of ``x``) and at batch 1 (``singles`` inputs)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    costs = {}
    for size, picks in ((EVAL_BATCH, [order[:EVAL_BATCH]]),
                        (1, order[:singles].split(1))):
        def forward(router):
            def call():
                for pick in picks:
                    if router == "oracle":
                        network.forward_single_task(x[pick], int(network.class_task[y[pick[0]]]))
                    else:
                        route(network, router, x[pick], y[pick])
            return call
        costs[size] = median_ms_per_image({r: forward(r) for r in ROUTERS},
                                          sum(map(len, picks)), repeats)
    return costs


def run_method(method: str, model: nn.Module, stream, tests, epochs: int,
               ranpac_m: int) -> dict[str, dict]:
    """Train ``method`` once; per router its accuracy matrix, final task-identification
    accuracy and costs. The network learns the prototype router's class means; the
    ranpac router's classifier (M = ``ranpac_m``) learns from the same base features."""
    strategy = METHODS[method](model=model, optimizer=torch.optim.Adam(model.parameters(),
                                                                        lr=1e-3),
                               train_mb_size=32, train_epochs=epochs, eval_mb_size=EVAL_BATCH,
                               evaluator=evaluator(), task_inference="prototype")
    network = strategy.model
    network.ranpac_router = RandomFeatureRidge(network.feature_dim, ranpac_m)
    matrices = {r: np.full((EXPERIENCES, EXPERIENCES), np.nan) for r in ROUTERS}
    for i, experience in enumerate(stream.train_stream):
        strategy.train(experience)
        network.eval()
        x, y = dataset_tensors(experience.dataset.eval())
        with torch.no_grad():
            network.ranpac_router.learn(network.base_features(x), y)
        for router in ROUTERS:
            for j, (x, y) in enumerate(tests[:i + 1]):
                matrices[router][i, j] = accuracy(
                    lambda xb, yb: route(network, router, xb, yb)[0], x, y)
    task_right = {r: sum(int((route(network, r, xb, yb)[1] == network.class_task[yb]).sum())
                         for x, y in tests for xb, yb in batches(x, y)) for r in ROUTERS}
    x, y = (torch.cat(t) for t in zip(*tests))
    costs = router_costs(network, x, y, seed=0)
    return {r: {"matrix": matrices[r], "task_id": task_right[r] / len(y),
                "ms_256": costs[EVAL_BATCH][r], "ms_1": costs[1][r]} for r in ROUTERS}


def naive_model(model: nn.Module, frozen: bool) -> nn.Module:
    """``model`` with a fresh 10-class head; ``frozen``: only the head trains (the
    backbone frozen, in eval mode)."""
    if frozen:
        backbone = FrozenBackbone(model)
        return nn.Sequential(backbone, nn.Linear(backbone.feature_dim, CLASSES))
    model.reset_classifier(CLASSES)
    return model


def reference_strategy(name: str, model: nn.Module, epochs: int, seed: int, ranpac_m: int):
    """The strategy of reference ``name``: "naive frozen", "naive full", "simplecil",
    "ranpac", "ranpac <adapter>" (first-session adaptation) or "aper <adapter>"."""
    template = dict(eval_mb_size=EVAL_BATCH, evaluator=evaluator())
    if name.startswith("naive"):
        model = naive_model(model, frozen=name == "naive frozen")
        return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                     train_mb_size=32, train_epochs=epochs, **template)
    if name == "simplecil":
        return SimpleCIL(model=model, **template)
    kind, *adapter = name.split()
    if adapter:
        template.update(optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                        adapter=adapter[0], train_mb_size=32, train_epochs=epochs)
    if kind == "aper":
        return APER(model=model, **template)
    return RanPAC(model=model, M=ranpac_m, seed=seed, **template)


def run_reference(strategy, stream, tests) -> np.ndarray:
    """Train ``strategy`` on the stream; its accuracy matrix."""
    matrix = np.full((EXPERIENCES, EXPERIENCES), np.nan)
    for i, experience in enumerate(stream.train_stream):
        strategy.train(experience)
        strategy.model.eval()
        with torch.no_grad():
            for j, (x, y) in enumerate(tests[:i + 1]):
                matrix[i, j] = accuracy(lambda xb, _: strategy.model(xb).argmax(1), x, y)
    return matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backbone_arguments(parser)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ranpac-m", type=int, default=2000,
                        help="RanPAC's projection size (10000 in the paper)")
    parser.add_argument("--aper-adapters", default="rkr",
                        help="APER's modules, comma-separated (bottleneck: transformers only)")
    parser.add_argument("--ranpac-adapters", default="",
                        help="RanPAC with first-session adaptation, by module, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="the methods routed, comma-separated (empty: references only)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with backbone_factory(args) as make_model:
        mean_std = resolve_input_spec(make_model()).mean_std
        print(f"{describe(args)}, class-incremental digits {EXPERIENCES} x 2 classes, "
              f"seeds {args.seeds}, {args.epochs} epochs, Adam lr 1e-3, batch 32, "
              f"RanPAC M={args.ranpac_m}")
        routed, references = [], []
        for seed in seeds:
            stream = split_digits(EXPERIENCES, image_size=args.img_size, channels=3,
                                  seed=seed, mean_std=mean_std, scenario="class")
            tests = [dataset_tensors(e.dataset) for e in stream.test_stream]
            sizes = [len(y) for _, y in tests]
            for method in filter(None, args.methods.split(",")):
                start = time.perf_counter()
                torch.manual_seed(seed)
                results = run_method(method, make_model(), stream, tests, args.epochs,
                                     args.ranpac_m)
                oracle = results["oracle"]
                for router, r in results.items():
                    routed.append({
                        "method": method, "router": router,
                        "avg_incremental": average_incremental_accuracy(r["matrix"], sizes),
                        "last": last_accuracy(r["matrix"], sizes), "task_id": r["task_id"],
                        "ms_256": r["ms_256"], "ms_1": r["ms_1"],
                        "x_oracle_256": r["ms_256"] / oracle["ms_256"],
                        "x_oracle_1": r["ms_1"] / oracle["ms_1"]})
                print(f"seed {seed} {method}: {time.perf_counter() - start:.0f} s", flush=True)
            for name in ("naive frozen", "naive full", "simplecil", "ranpac",
                         *(f"ranpac {a}" for a in filter(None, args.ranpac_adapters.split(","))),
                         *(f"aper {a}" for a in filter(None, args.aper_adapters.split(",")))):
                torch.manual_seed(seed)
                strategy = reference_strategy(name, make_model(), args.epochs, seed,
                                              args.ranpac_m)
                matrix = run_reference(strategy, stream, tests)
                references.append({"method": name,
                                   "avg_incremental": average_incremental_accuracy(matrix,
                                                                                   sizes),
                                   "last": last_accuracy(matrix, sizes)})
    if routed:
        by_router = pd.DataFrame(routed).groupby(["method", "router"], sort=False).mean()
        print("\nrouters (mean over seeds; ms per image, x_oracle: ratio to the oracle pass):")
        print(format_table(by_router.round(4).reset_index()))
    print("\nreferences (mean over seeds):")
    print(format_table(pd.DataFrame(references).groupby("method", sort=False).mean()
                       .round(4).reset_index()))


if __name__ == "__main__":
    main()
