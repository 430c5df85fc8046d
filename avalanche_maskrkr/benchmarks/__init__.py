"""Avalanche streams; samples are ``(x, y, t)``. Task-incremental (``scenario="task"``,
the default): experience ``i`` has task label ``i`` and classes numbered ``0..C-1``.
Class-incremental (``scenario="class"``; not Visual Decathlon): task label 0 everywhere,
experience ``i`` has the global classes ``i*C..(i+1)*C-1``."""

from .catalog import BENCHMARK_DEFAULTS, DECATHLON_TEST_SPLITS, build_benchmark
from .cifar import split_cifar100
from .decathlon import decathlon_score, visual_decathlon
from .digits import split_digits
from .imagenet import split_imagenet
from .task_split import SCENARIOS
from .transforms import backbone_transforms

__all__ = [
    "BENCHMARK_DEFAULTS",
    "DECATHLON_TEST_SPLITS",
    "SCENARIOS",
    "build_benchmark",
    "backbone_transforms",
    "decathlon_score",
    "split_cifar100",
    "split_digits",
    "split_imagenet",
    "visual_decathlon",
]
