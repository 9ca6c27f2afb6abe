"""Process start-up: torch.distributed from torchrun's environment, then Megatron's groups."""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from longvila_mcore.config import ParallelConfig
from longvila_mcore.runtime.device import check_flash_attn, retain_freed_host_memory
from longvila_mcore.runtime.megatron_cpu import (
    allow_sequence_parallel_torch_norm,
    enable_cpu_training_support,
    redirect_cuda_rng_to_cpu,
)

log = logging.getLogger(__name__)

# The process groups the last `init_model_parallel` created (Megatron's tp, pp, cp, dp, ... groups).
_megatron_groups: list[dist.ProcessGroup] = []


def _process_groups() -> list[dist.ProcessGroup]:
    # torch keeps every group it made in this map until `destroy_process_group`; there is no
    # public listing.
    return list(dist.distributed_c10d._world.pg_map)


def destroy_model_parallel() -> None:
    """Forget Megatron's layout and destroy the groups it created (a local call; every rank makes
    it before the collective creation of the next layout's groups).

    Megatron's `destroy_model_parallel` only drops its references: torch keeps every group, and
    on gloo each one keeps two threads per rank alive (57 threads per layout at tp 2 x ulysses 2
    of 4 ranks), so a process that tries several layouts (tests, the planner's memory probes)
    would accumulate hundreds of threads and slow every later collective.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    for group in _megatron_groups:
        dist.destroy_process_group(group)
    _megatron_groups.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, timeout_minutes: int = 30) -> None:
    """Join the process group torchrun describes, or form a group of one.

    NCCL on GPU, gloo on CPU (where freed tensor memory is then kept for reuse, see
    `retain_freed_host_memory`). Without torchrun's variables this is a single process on a free
    loopback port, so every entry point runs the same code with or without a launcher.
    """
    if dist.is_initialized():
        return
    # Without torchrun: a group of one on a free loopback port, passed explicitly rather than
    # through os.environ, so subprocesses this process starts do not inherit a taken port.
    alone = (
        {}
        if "RANK" in os.environ
        else {
            "init_method": f"tcp://127.0.0.1:{_free_port()}",
            "rank": 0,
            "world_size": 1,
        }
    )
    if device.type == "cuda":
        check_flash_attn()  # before any process group or model: one clear error
        torch.cuda.set_device(device)
    else:
        retain_freed_host_memory()
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if device.type == "cuda" else None,
        **alone,
    )


def init_model_parallel(parallel: ParallelConfig, seed: int = 0) -> int:
    """Create Megatron's tp / pp / cp / dp groups for this layout; returns the data-parallel size.

    The sequence-parallel group (ulysses x ring) is Megatron's context-parallel group. Its
    hierarchical sub-groups are the Ulysses groups (contiguous ranks, level 0) and the ring groups
    (strided by ulysses, level 1), which `parallel.groups` picks up. `seed` seeds Megatron's
    tensor-parallel RNG streams, which its sequence-parallel regions enter (`fork`) whatever the
    dropout.
    """
    # Imported here so `import longvila_mcore` (tools, data workers) does not load Megatron.
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    redirect_cuda_rng_to_cpu()
    allow_sequence_parallel_torch_norm()
    enable_cpu_training_support()  # every Megatron user starts here
    world = dist.get_world_size()
    dp = parallel.data_parallel_size(world)
    destroy_model_parallel()
    before = set(_process_groups())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.sp,
        hierarchical_context_parallel_sizes=[parallel.ulysses, parallel.ring],
        # On gloo the "gloo copies" of each group would be duplicates of the groups themselves.
        create_gloo_process_groups=dist.get_backend() != "gloo",
    )
    _megatron_groups[:] = [g for g in _process_groups() if g not in before]
    model_parallel_cuda_manual_seed(seed)
    if dist.get_rank() == 0:
        log.info(
            "parallel layout: world %d = tp %d x pp %d x ulysses %d x ring %d x dp %d",
            world,
            parallel.tp,
            parallel.pp,
            parallel.ulysses,
            parallel.ring,
            dp,
        )
    return dp
