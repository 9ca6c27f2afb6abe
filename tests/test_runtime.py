"""The runtime's process-level settings."""

import os
import subprocess
import sys

import pytest
import torch

STEP_MIB = (1, 24, 4, 64, 8, 40, 2, 96)  # tensors a "training step" allocates, then frees

PAGE_FAULTS_OF_A_LATER_STEP = f"""
import resource, sys, torch
from longvila_mcore.runtime.device import retain_freed_host_memory
if sys.argv[1] == "retain":
    assert retain_freed_host_memory()

def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.ones(mib << 18) for mib in {STEP_MIB}]
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print([faults_of_a_step() for _ in range(8)][-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_host_memory_is_reused_without_page_faults():
    def faults(mode: str) -> int:
        run = [sys.executable, "-c", PAGE_FAULTS_OF_A_LATER_STEP, mode]
        return int(subprocess.run(run, capture_output=True, text=True, check=True).stdout)

    pages = sum(STEP_MIB) * 256
    assert faults("default") > pages // 2  # glibc unmapped the blocks and maps them afresh
    assert faults("retain") < pages // 20  # the freed blocks are handed out again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads counted in /proc")
def test_a_new_layout_destroys_the_groups_of_the_last(single_rank):
    """Megatron's reset drops its references only; ours destroys the groups, so trying layouts
    one after another (tests, the planner) neither leaks threads nor slows collectives."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longvila_mcore.config import ParallelConfig
    from longvila_mcore.runtime import init_model_parallel

    def threads() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))

    counts, old = [], parallel_state.get_data_parallel_group()
    for _ in range(4):
        init_model_parallel(ParallelConfig())
        counts.append(threads())
    # Steady from the second layout on (the first may start a group's threads lazily).
    assert counts[1] == counts[2] == counts[3], counts
    live = dist.distributed_c10d._world.pg_map
    assert old not in live and parallel_state.get_data_parallel_group() in live
    total = torch.ones(2)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())  # the new ones work
    assert total.tolist() == [1.0, 1.0]
