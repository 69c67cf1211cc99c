"""onnxopt.passes: one module per pass family. The registry is this list; order does not matter
(passes declare what they run after)."""

from .cleanup import CleanupPass
from .fold import FoldPass
from .fuse import FusePass
from .partition import PartitionPass
from .prune import PrunePass
from .quant import QuantPass

PASSES = [FoldPass, CleanupPass, FusePass, PrunePass, QuantPass, PartitionPass]
