"""The process groups of sequence parallelism: N = ulysses x ring ranks per sequence.

Inside one sequence-parallel group of N ranks (SP rank i = 0..N-1), Ulysses groups are U
contiguous ranks (one node: fast all-to-all) and ring groups are R ranks strided by U (across
nodes: point-to-point), REFERENCE 4. SP rank i is Ulysses rank i % U of ring rank i // U.

Under Megatron the sequence-parallel group is the context-parallel group and its two hierarchical
levels (built by `runtime.init_model_parallel`) are the Ulysses and ring groups. Without Megatron's
state, `new_groups` splits the whole world into contiguous sequence-parallel groups of N ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

from longvila_mcore.errors import ConfigError


def check_layout(ulysses: int, ring: int, world_size: int) -> None:
    """Raise unless `ulysses x ring` sequence-parallel ranks tile a world of `world_size`."""
    if ulysses < 1 or ring < 1:
        raise ConfigError(f"ulysses={ulysses} and ring={ring} must both be >= 1")
    if world_size % (ulysses * ring):
        raise ConfigError(
            f"sequence parallel size ulysses x ring = {ulysses} x {ring} = {ulysses * ring} does "
            f"not divide the world size {world_size}; change parallel.ulysses / parallel.ring or "
            "the number of ranks"
        )


@dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's sequence-parallel group and its Ulysses and ring sub-groups."""

    sp: ProcessGroup
    ulysses: ProcessGroup
    ring: ProcessGroup

    def __post_init__(self):
        expected = self.ring.rank() * self.ulysses.size() + self.ulysses.rank()
        if self.sp.size() != self.ulysses.size() * self.ring.size() or self.sp.rank() != expected:
            raise ValueError(
                f"SP rank {self.sp.rank()} of {self.sp.size()} is not Ulysses rank "
                f"{self.ulysses.rank()} of {self.ulysses.size()} in ring rank {self.ring.rank()} "
                f"of {self.ring.size()}: Ulysses groups must be contiguous, ring groups strided"
            )

    @property
    def size(self) -> int:
        return self.sp.size()

    @property
    def rank(self) -> int:
        return self.sp.rank()


def new_groups(ulysses: int, ring: int) -> SequenceParallelGroups:
    """Split the whole world into sequence-parallel groups (collective: every rank calls it)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(ulysses, ring, world)
    n = ulysses * ring
    mine = {}
    # new_group is collective over the world: every rank creates every group in the same order.
    for first in range(0, world, n):
        ranks = list(range(first, first + n))
        candidates = {
            "sp": [ranks],
            "ulysses": [ranks[i : i + ulysses] for i in range(0, n, ulysses)],
            "ring": [ranks[u::ulysses] for u in range(ulysses)],
        }
        for kind, groups in candidates.items():
            for group_ranks in groups:
                group = dist.new_group(group_ranks)
                if rank in group_ranks:
                    mine[kind] = group
    return SequenceParallelGroups(**mine)


def megatron_groups(cp: ProcessGroup, hcp: list[ProcessGroup] | None) -> SequenceParallelGroups:
    """The groups from Megatron's context-parallel group and its hierarchical levels."""
    if cp.size() == 1:
        return SequenceParallelGroups(sp=cp, ulysses=cp, ring=cp)
    if not hcp or len(hcp) != 2:
        raise ValueError(
            f"context parallel size {cp.size()} needs the two hierarchical context-parallel groups "
            "[ulysses, ring]; create the groups with runtime.init_model_parallel"
        )
    return SequenceParallelGroups(sp=cp, ulysses=hcp[0], ring=hcp[1])


def sequence_parallel_groups(ulysses: int, ring: int) -> SequenceParallelGroups:
    """Megatron's groups when its parallel state exists (checked against the sizes), else new ones."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return new_groups(ulysses, ring)
    groups = megatron_groups(
        parallel_state.get_context_parallel_group(),
        parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False),
    )
    if (groups.ulysses.size(), groups.ring.size()) != (ulysses, ring):
        raise ValueError(
            f"ulysses={ulysses}, ring={ring} do not match Megatron's context-parallel layout "
            f"(ulysses={groups.ulysses.size()}, ring={groups.ring.size()}) from "
            "init_model_parallel; pass the same sizes"
        )
    return groups
