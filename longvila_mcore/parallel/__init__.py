"""Parallelism along the sequence: local kernels, collectives, ring and 2D attention, sharding."""
