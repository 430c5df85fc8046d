"""Per-task layers: the three methods as parametrizations of a frozen layer."""
from .base import SeveralTasksUnsupported, TaskAdaptedLayer, TaskContext, TaskCost, TaskModule
from .batchnorm import TaskBatchNorm, TaskBatchStats
from .masks import BinaryMask, pack_bits, unpack_bits
from .piggyback import PiggybackLayer
from .rkr import PLACEMENTS, RKRLayer, zero_scales_found

__all__ = ["BinaryMask", "PLACEMENTS", "PiggybackLayer", "RKRLayer", "SeveralTasksUnsupported", "TaskAdaptedLayer",
           "TaskBatchNorm", "TaskBatchStats", "TaskContext", "TaskCost", "TaskModule", "pack_bits", "unpack_bits",
           "zero_scales_found"]
