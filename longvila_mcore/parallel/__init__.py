"""Parallelism along the sequence: local kernels, collectives, ring and 2D attention, sharding."""

from longvila_mcore.parallel.attention_2d import SequenceParallel, init_sequence_parallel
from longvila_mcore.parallel.sharder import ImageFirstSharder

__all__ = ["ImageFirstSharder", "SequenceParallel", "init_sequence_parallel"]
