"""RKR, Piggyback and Mask-RKR: parameter-efficient continual learning for Avalanche;
SimpleCIL, RanPAC and APER for class-incremental learning on pretrained models."""
import warnings

# Avalanche imports qpsolvers (for GEM, which nothing here uses); without a QP solver
# installed it warns at import, before any command line or script of ours has started.
warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning,
                        module="qpsolvers")

from . import models  # noqa: F401  (registers resnet18_cifar with timm)
from .accounting import find_k_plus, parameter_report
from .cil import APER, APERPlugin, RanPAC, RanPACPlugin, SimpleCIL, SimpleCILPlugin
from .conversion import convert, find_classifier
from .network import TaskAwareNetwork
from .options import MaskRKROptions, PiggybackOptions, RKROptions, make_options
from .plugins import MaskRKRPlugin, PiggybackPlugin, RKRPlugin
from .strategies import RKR, MaskRKR, Piggyback

__all__ = ["APER", "APERPlugin", "RKR", "MaskRKR", "MaskRKROptions", "MaskRKRPlugin", "Piggyback",
           "PiggybackOptions", "PiggybackPlugin", "RKROptions", "RKRPlugin", "RanPAC",
           "RanPACPlugin", "SimpleCIL", "SimpleCILPlugin", "TaskAwareNetwork", "convert", "find_classifier", "find_k_plus", "make_options",
           "parameter_report"]
