"""Run a test function on several gloo ranks (CPU processes on loopback).

Each process start costs seconds of CPU (torch + Megatron imports, gloo rendezvous), more than
most multi-rank tests compute. So the ranks of a world size are started once and kept for the
session: each call sends its function to the same warm processes, which run it in the same
default gloo group. Between calls each rank drops Megatron's model-parallel state; a failing
call kills its world (the other ranks may wait in a collective), the next call starts a new one.
Tests whose measurement needs a process of its own (resident memory) pass `fresh=True`.

The function must be importable (module-level). Whatever rank 0 returns comes back to the test;
an exception on any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import atexit
import os
import queue as queue_lib
import socket
import time
import traceback
from collections import OrderedDict

import torch.multiprocessing as mp

# Idle warm ranks kept at most (each holds a few hundred MB); the least recently used world
# goes first.
MAX_IDLE_RANKS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def _entry(rank, world_size, port, tasks, results):
    """One rank: join the gloo group, then run the functions `tasks` brings until it brings None."""
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
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        while (task := tasks.get()) is not None:
            fn, args = task
            try:
                result = fn(*args)
                dist.barrier()
            except BaseException:
                results.put((rank, "error", traceback.format_exc()))
                raise
            finally:
                _reset_model_parallel()
            results.put((rank, "ok", result if rank == 0 else None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _World:
    """`size` warm ranks in one gloo group."""

    def __init__(self, size: int):
        ctx = mp.get_context("spawn")
        self.size = size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_entry, args=(r, size, port, self.tasks[r], self.results), daemon=True
            )
            for r in range(size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float):
        for tasks in self.tasks:
            tasks.put((fn, args))
        results, errors = {}, []
        deadline = time.monotonic() + timeout
        while len(results) < self.size and not errors:
            try:
                rank, status, payload = self.results.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                if dead:
                    codes = [self.procs[r].exitcode for r in dead]
                    errors.append(f"ranks {dead} died (exit codes {codes})")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s")
                continue
            if status == "error":
                errors.append(f"rank {rank}:\n{payload}")
            else:
                results[rank] = payload
        return results, errors

    def close(self, kill: bool = False) -> None:
        if not kill:
            for tasks in self.tasks:
                tasks.put(None)
        for p in self.procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
                p.join()


_worlds: OrderedDict[int, _World] = OrderedDict()


@atexit.register
def _close_worlds() -> None:
    while _worlds:
        _worlds.popitem()[1].close()


def _world(size: int) -> _World:
    if size in _worlds:
        _worlds.move_to_end(size)
        return _worlds[size]
    while _worlds and sum(_worlds) + size > MAX_IDLE_RANKS:
        _worlds.popitem(last=False)[1].close()
    _worlds[size] = world = _World(size)
    return world


def run_ranks(world_size: int, fn, *args, timeout: float = 600, fresh: bool = False):
    """Call `fn(*args)` on `world_size` gloo ranks; return rank 0's result. With `fresh`, on
    processes started for this call alone."""
    world = _World(world_size) if fresh else _world(world_size)
    results, errors = world.run(fn, args, timeout)
    if errors or fresh:
        world.close(kill=bool(errors))
        if not fresh:
            del _worlds[world_size]
    if errors:
        raise AssertionError("\n".join(errors))
    return results[0]
