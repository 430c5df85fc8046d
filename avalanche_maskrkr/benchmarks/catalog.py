"""The benchmarks by name, as the runner offers them: what each runs on unless told
otherwise, and :func:`build_benchmark`, which builds one from plain settings."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .cifar import split_cifar100
from .decathlon import visual_decathlon
from .digits import split_digits
from .imagenet import split_imagenet
from .transforms import Backbone, resolve_input_spec


class BenchmarkDefaults(NamedTuple):
    """What a benchmark runs on unless told otherwise."""

    model: str
    img_size: int
    threads: int | None  # CPU threads; None: torch's default


BENCHMARK_DEFAULTS: dict[str, BenchmarkDefaults] = {
    # 8x8 digits: a second thread only adds synchronisation (and stalls badly when
    # other processes share the cores).
    "digits": BenchmarkDefaults("test_resnet", 8, 1),
    "cifar100": BenchmarkDefaults("resnet18_cifar", 32, None),
    "imagenet": BenchmarkDefaults("resnet18", 224, None),
    "decathlon": BenchmarkDefaults("resnet18", 64, None),
}

DECATHLON_TEST_SPLITS = ("val", "test")
"""What Visual Decathlon evaluates on: ``<d>_val.json`` or the labelled ``<d>_test.json``."""

def build_benchmark(name: str, img_size: int, seed: int = 0, tasks: int | None = None,
                    data_root: str | Path | None = None, backbone: Backbone | None = None,
                    decathlon_test_split: str = "val"):
    """The task-labelled scenario of benchmark ``name`` (a key of
    :data:`BENCHMARK_DEFAULTS`) with ``img_size``-pixel inputs.

    ``tasks``: the number of tasks (default: digits 5, cifar100 and imagenet 10; decathlon
    has one per domain and refuses it). ``data_root``: the dataset folder (digits needs
    none; cifar100 downloads through torchvision without one). ``backbone``: a timm name
    whose pretrained normalisation the images get (digits too). ``decathlon_test_split``: one of
    :data:`DECATHLON_TEST_SPLITS`.

    Raises:
        ValueError: an unknown name, or ``tasks`` for decathlon.
        FileNotFoundError: imagenet or decathlon without ``data_root``.
    """
    if name not in BENCHMARK_DEFAULTS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARK_DEFAULTS)}")
    if name == "digits":
        mean_std = None if backbone is None else resolve_input_spec(backbone).mean_std
        return split_digits(n_experiences=tasks or 5, channels=3, seed=seed,
                            image_size=None if img_size == 8 else img_size, mean_std=mean_std)
    if name != "cifar100" and data_root is None:
        raise FileNotFoundError(f"--benchmark {name} needs --data-root")
    if name == "decathlon":
        if tasks is not None:
            raise ValueError("decathlon has one task per domain: --tasks does not apply")
        return visual_decathlon(data_root, test_split=decathlon_test_split,
                                image_size=img_size, backbone=backbone)
    build = {"cifar100": split_cifar100, "imagenet": split_imagenet}[name]
    return build(root=data_root, n_experiences=tasks or 10, image_size=img_size, seed=seed,
                 backbone=backbone)
