"""The benchmarks by name, as the runner offers them: what each runs on unless told
otherwise, and :func:`build_benchmark`, which builds one from plain settings."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .cifar import split_cifar100
from .decathlon import visual_decathlon
from .digits import split_digits
from .imagenet import split_imagenet
from .task_split import check_scenario
from .transforms import Backbone, resolve_input_spec


class BenchmarkDefaults(NamedTuple):
    """What a benchmark runs on unless told otherwise."""

    model: str
    img_size: int
    threads: int | None  # CPU threads; None: torch's default
    ranpac_dim: int = 10000  # RanPAC's random features (and the ranpac router's)


BENCHMARK_DEFAULTS: dict[str, BenchmarkDefaults] = {
    # 8x8 digits: a second thread only adds synchronisation (and stalls badly when
    # other processes share the cores).
    # RanPAC's 10000 random features cost minutes of CPU per experience (an eigh of a
    # 10000 x 10000 float64 matrix); 2000 suffice for test_resnet's features of digits.
    "digits": BenchmarkDefaults("test_resnet", 8, 1, ranpac_dim=2000),
    "cifar100": BenchmarkDefaults("resnet18_cifar", 32, None),
    "imagenet": BenchmarkDefaults("resnet18", 224, None),
    "decathlon": BenchmarkDefaults("resnet18", 64, None),
}

DECATHLON_TEST_SPLITS = ("val", "test")
"""What Visual Decathlon evaluates on: ``<d>_val.json`` or the labelled ``<d>_test.json``."""

def build_benchmark(name: str, img_size: int, seed: int | None = None,
                    tasks: int | None = None, data_root: str | Path | None = None,
                    backbone: Backbone | None = None, decathlon_test_split: str = "val",
                    scenario: str = "task"):
    """The task- or class-incremental scenario (``scenario``, one of
    :data:`~.task_split.SCENARIOS`) of benchmark ``name`` (a key of
    :data:`BENCHMARK_DEFAULTS`) with ``img_size``-pixel inputs.

    ``seed``: digits' train/test split (default 0); the class order of cifar100 and
    imagenet (default 0 for "task", 1993 for "class": the published protocols' order,
    see :func:`~.task_split.class_order`).

    ``tasks``: the number of experiences (default: digits 5, cifar100 and imagenet 10, so
    cifar100 "class" is B0-Inc10 and ``tasks=20`` B0-Inc5; decathlon has one per domain
    and refuses it). ``data_root``: the dataset folder (digits needs
    none; cifar100 defaults to Avalanche's data folder and never downloads).
    ``backbone``: a timm name whose pretrained normalisation the images get (digits too).
    ``decathlon_test_split``: one of :data:`DECATHLON_TEST_SPLITS`.

    Visual Decathlon stays task-incremental: its domains have separate label spaces.

    Raises:
        ValueError: an unknown name or scenario, ``tasks`` for decathlon, or decathlon
            with ``scenario="class"``.
        FileNotFoundError: imagenet or decathlon without ``data_root``.
    """
    if name not in BENCHMARK_DEFAULTS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARK_DEFAULTS)}")
    check_scenario(scenario)
    if name == "decathlon" and scenario != "task":
        raise ValueError("decathlon stays task-incremental (one task per domain, each with "
                         "its own label space): scenario 'class' does not apply")
    if name == "digits":
        mean_std = None if backbone is None else resolve_input_spec(backbone).mean_std
        return split_digits(n_experiences=tasks or 5, channels=3, seed=seed or 0,
                            image_size=None if img_size == 8 else img_size, mean_std=mean_std,
                            scenario=scenario)
    if name != "cifar100" and data_root is None:
        raise FileNotFoundError(f"--benchmark {name} needs --data-root")
    if name == "decathlon":
        if tasks is not None:
            raise ValueError("decathlon has one task per domain: --tasks does not apply")
        return visual_decathlon(data_root, test_split=decathlon_test_split,
                                image_size=img_size, backbone=backbone)
    build = {"cifar100": split_cifar100, "imagenet": split_imagenet}[name]
    return build(root=data_root, n_experiences=tasks or 10, image_size=img_size, seed=seed,
                 backbone=backbone, scenario=scenario)
