"""Run a test function on several gloo ranks (CPU processes on loopback).

Each process start costs seconds (torch + Megatron imports), so tests put many cases into one
spawned function. The function must be importable (module-level). Whatever rank 0 returns comes
back to the test; an exception on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import queue as queue_lib
import socket
import time
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(*args)
        dist.barrier()
        queue.put((rank, "ok", result if rank == 0 else None))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        from longvila_mcore.runtime import destroy_model_parallel

        if torch.distributed.is_initialized():
            destroy_model_parallel()
            torch.distributed.destroy_process_group()


def run_ranks(world_size: int, fn, *args, timeout: float = 600):
    """Call `fn(*args)` on `world_size` gloo ranks; return rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, status, payload = queue.get(timeout=1.0)
        except queue_lib.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                errors.append(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout}s")
            continue
        if status == "error":
            errors.append(f"rank {rank}:\n{payload}")
        else:
            results[rank] = payload
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results[0]
