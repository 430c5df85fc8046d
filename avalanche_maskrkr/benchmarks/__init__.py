"""Task-labelled Avalanche streams: experience ``i`` has task label ``i`` and
classes numbered ``0..C-1``; samples are ``(x, y, t)``."""

from .catalog import BENCHMARK_DEFAULTS, DECATHLON_TEST_SPLITS, build_benchmark
from .cifar import split_cifar100
from .decathlon import decathlon_score, visual_decathlon
from .digits import split_digits
from .imagenet import split_imagenet
from .transforms import backbone_transforms

__all__ = [
    "BENCHMARK_DEFAULTS",
    "DECATHLON_TEST_SPLITS",
    "build_benchmark",
    "backbone_transforms",
    "decathlon_score",
    "split_cifar100",
    "split_digits",
    "split_imagenet",
    "visual_decathlon",
]
