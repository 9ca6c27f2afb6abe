"""The runtime's process-level settings."""

import subprocess
import sys

import pytest

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
