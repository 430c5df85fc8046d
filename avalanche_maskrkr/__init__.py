"""RKR, Piggyback and Mask-RKR: parameter-efficient continual learning for Avalanche."""
from . import models  # noqa: F401  (registers resnet18_cifar with timm)
from .accounting import find_k_plus, parameter_report
from .conversion import convert, find_classifier
from .network import TaskAwareNetwork
from .options import MaskRKROptions, PiggybackOptions, RKROptions, make_options
from .plugins import MaskRKRPlugin, PiggybackPlugin, RKRPlugin
from .strategies import RKR, MaskRKR, Piggyback

__all__ = ["RKR", "MaskRKR", "MaskRKROptions", "MaskRKRPlugin", "Piggyback",
           "PiggybackOptions", "PiggybackPlugin", "RKROptions", "RKRPlugin",
           "TaskAwareNetwork", "convert", "find_classifier", "find_k_plus", "make_options",
           "parameter_report"]
