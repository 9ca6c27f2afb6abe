"""Training checkpoints: the whole train state in one distributed checkpoint, and resuming it.

`<output_dir>/checkpoints/step_<N>/` holds the model, the optimizer (sharded like the
parameters), the step, every rank's RNG state and every data-parallel rank's data position.
A run started again with the same output_dir continues from the latest complete one.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedObject

from longvila_mcore.checkpoint.dist import (
    INCOMPLETE,
    is_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from longvila_mcore.checkpoint.tensors import CheckpointError

log = logging.getLogger(__name__)

_STEP = re.compile(r"step_(\d+)")


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a save cut short is never listed)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(_STEP.fullmatch(p.name)[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def _layout() -> dict[str, int]:
    return {
        "world_size": dist.get_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _per_rank_objects(data_state: dict, rng: dict) -> dict:
    """Sharded objects: one RNG state per rank, one data position per data-parallel rank
    (written once per data-parallel rank: the ranks sharing it are its replicas)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp = parallel_state.get_data_parallel_world_size()
    replica = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_context_parallel_rank(),
    )
    return {
        "rng": ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0),
        "data": ShardedObject("data_state", data_state, (dp,), (dp_rank,), replica_id=replica),
    }


def save_train_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer,
    tokenizer,
    data_state: dict,
    meta: dict,
    keep_last: int,
) -> Path:
    """Save everything needed to continue after `step` optimizer steps; prune old ones."""
    path = checkpoint_path(output_dir, step)
    extra = {
        "optimizer": optimizer.sharded_state_dict(model.sharded_state_dict()),
        "train_state": {"step": step},
        **_per_rank_objects(data_state, _rng_state()),
    }
    save_checkpoint(path, model, tokenizer, extra, {**meta, "step": step, **_layout()})
    if dist.get_rank() == 0:
        for old in complete_checkpoints(output_dir)[: -max(1, keep_last)]:
            shutil.rmtree(old)
        for stale in path.parent.glob(f"*{INCOMPLETE}"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    log.info("saved checkpoint %s", path)
    return path


def resume_train_checkpoint(path: Path, model, optimizer, data_state: dict) -> tuple[int, dict]:
    """Load the train state saved at `path`; returns (step, data state). The data position
    needs the same data-parallel size; the RNG states are restored when the world size is the
    same (the model and optimizer load under any layout)."""
    meta = read_meta(path)
    layout = _layout()
    if meta.get("dp") != layout["dp"]:
        raise CheckpointError(
            f"{path} was written with {meta.get('dp')} data-parallel ranks, this run has "
            f"{layout['dp']}: resume with the same layout, or start a new run.output_dir with "
            f"checkpoint.load={path}"
        )
    objects = _per_rank_objects(data_state, _rng_state())
    if meta.get("world_size") != layout["world_size"]:
        objects.pop("rng")
        log.info("world size changed since %s: RNG states are not restored", path)
    extra = {
        "optimizer": optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True),
        "train_state": {"step": 0},
        **objects,
    }
    state = load_checkpoint(path, model, extra)
    optimizer.load_state_dict(state["optimizer"])
    if "rng" in state:
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    return int(state["train_state"]["step"]), state["data"]
