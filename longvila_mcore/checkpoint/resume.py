"""Training checkpoints: the whole train state in one distributed checkpoint, and resuming it.

`<output_dir>/checkpoints/step_<N>/` holds the model, Megatron's optimizer state (sharded like
the parameters, whether the optimizer is distributed or not), the step, every rank's RNG state and every data-parallel rank's data position.
A run started again with the same output_dir continues from the latest complete one.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.optimizer import MegatronOptimizer

from longvila_mcore.checkpoint.dist import (
    INCOMPLETE,
    is_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from longvila_mcore.checkpoint.tensors import CheckpointError
from longvila_mcore.data.pipeline import Pipeline
from longvila_mcore.runtime.megatron_cpu import gather_optimizer_state_with_gloo

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
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
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


def _every_data_position(saved_dp: int, data_state: dict) -> dict:
    """The data positions of all `saved_dp` data-parallel ranks of a checkpoint, each read by
    every rank (a few numbers each), to reshard them to this run's data-parallel size."""
    rank = dist.get_rank()  # rank 0 holds the main replica of each, as the loader checks
    return {
        str(r): ShardedObject("data_state", data_state, (saved_dp,), (r,), replica_id=rank)
        for r in range(saved_dp)
    }


def _per_layer(sharded):
    """A layer's own ShardedTensor instead of its slot in the stack of all layers.

    Megatron saves the same tensor of every layer as one stacked tensor (a prepended layer
    axis). When only some layers learn (the tower's unused layers stay frozen), the optimizer
    holds state for part of the stack, which is not a valid sharding; per-layer keys are.
    """
    if not isinstance(sharded, ShardedTensor) or sharded.prepend_axis_num == 0:
        return sharded
    n = sharded.prepend_axis_num
    layer = ".".join(str(i) for i in sharded.global_offset[:n])
    return dataclasses.replace(
        sharded,
        key=f"{sharded.key}.layer{layer}",
        global_shape=sharded.global_shape[n:],
        global_offset=sharded.global_offset[n:],
        axis_fragmentations=sharded.axis_fragmentations[n:],
        prepend_axis_num=0,
    )


def _allocate_optimizer_state(optimizer: MegatronOptimizer) -> None:
    """Give torch's AdamW its state before a checkpoint is loaded into it.

    AdamW creates its state on the first step, and without apex / Transformer Engine Megatron's
    sharded state dict reads the step count from that state. One step with zero gradients at
    zero learning rate and weight decay creates it and leaves every weight bitwise unchanged.
    """
    for inner in optimizer.chained_optimizers:
        adam = inner.optimizer
        if adam is None or adam.state:
            continue
        settings = [(group["lr"], group["weight_decay"]) for group in adam.param_groups]
        for group in adam.param_groups:
            group["lr"] = group["weight_decay"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        adam.step()
        for group, (lr, weight_decay) in zip(adam.param_groups, settings, strict=True):
            group["lr"], group["weight_decay"] = lr, weight_decay
            for param in group["params"]:
                param.grad = None


def _load_optimizer(optimizer: MegatronOptimizer, loaded: dict) -> None:
    """`optimizer.load_state_dict(loaded)`, with the distributed optimizer's parameter state
    loaded in a second call once AdamW's per-parameter step counts are out of the way.

    Without apex / Transformer Engine, Megatron's distributed optimizer puts a step count in
    every parameter's state, then loads the `fully_reshardable` parameter state by copying
    each of the state's tensors from the checkpoint, which has no step (fused Adam keeps none
    per parameter): a KeyError. `_restore_step_counts` puts the counts back.
    """
    inners = optimizer.chained_optimizers
    states = [loaded] if len(inners) == 1 else [loaded[k] for k in sorted(loaded)]
    with torch.no_grad():  # fp32 master weights are views of the parameters themselves
        for inner, state in zip(inners, states, strict=True):
            param_state = state.pop("param_state", None)
            inner.load_state_dict(state)
            if param_state is None:
                continue
            for per_param in inner.optimizer.state.values():
                per_param.pop("step", None)
            inner.load_parameter_state_from_fully_reshardable(param_state)


def _restore_step_counts(optimizer: MegatronOptimizer, loaded: dict) -> None:
    """AdamW's step count (bias correction) as saved, one tensor per parameter.

    Without apex / Transformer Engine, Megatron's distributed optimizer saves the count in its
    parameter groups only (see `_load_optimizer`), and restores counts as one tensor shared by
    every parameter, which AdamW would advance once per parameter and step.
    """
    groups = loaded.get("optimizer", {}).get("param_groups", [])
    saved = {float(g["step"]) for g in groups if g.get("step") is not None}
    if len(saved) > 1:
        raise CheckpointError(f"the optimizer state holds several step counts {sorted(saved)}")
    for inner in optimizer.chained_optimizers:
        for state in inner.optimizer.state.values() if inner.optimizer else ():
            if saved:
                state["step"] = torch.tensor(next(iter(saved)))
            elif torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(float(state["step"]))
            else:
                raise CheckpointError("the optimizer state holds no step count")


def _optimizer_state(optimizer: MegatronOptimizer, model, is_loading: bool) -> dict:
    """Megatron's sharded optimizer state, keyed by the (per-layer) parameters it belongs to,
    so it reshards over tp / pp / dp like the weights.

    The distributed optimizer's state is saved `fully_reshardable`: its flat shards are
    gathered over the data-parallel ranks into whole per-parameter tensors (Megatron 0.16
    writes no flat slices of a parameter: `fully_sharded_model_space` fails its own check), and
    each rank of the loading run reads the tensors of its parameters and keeps its shard. On
    GPU the gather is an NCCL all-gather; on CPU, the gloo gather onto data-parallel rank 0
    (`runtime.megatron_cpu.gather_optimizer_state_with_gloo`).
    """
    if is_loading:
        _allocate_optimizer_state(optimizer)
    metadata = {
        "distrib_optim_sharding_type": "fully_reshardable",
        **gather_optimizer_state_with_gloo(optimizer),
    }
    per_layer = dict_list_map_outplace(_per_layer, model.sharded_state_dict())
    return optimizer.sharded_state_dict(per_layer, is_loading=is_loading, metadata=metadata)


def save_train_checkpoint(
    output_dir: Path,
    step: int,
    model,
    optimizer,
    tokenizer,
    data_state: dict,
    meta: dict,
    keep_last: int,
    async_queue: AsyncCallsQueue | None = None,
) -> Path:
    """Save everything needed to continue after `step` optimizer steps; prune old ones once it
    is complete (with `async_queue`: when the queue finalizes it, see `save_checkpoint`)."""
    path = checkpoint_path(output_dir, step)
    extra = {
        "optimizer": _optimizer_state(optimizer, model, is_loading=False),
        "train_state": {"step": step},
        **_per_rank_objects(data_state, _rng_state()),
    }

    def prune() -> None:
        for old in complete_checkpoints(output_dir)[: -max(1, keep_last)]:
            shutil.rmtree(old)
        for stale in path.parent.glob(f"*{INCOMPLETE}"):
            shutil.rmtree(stale, ignore_errors=True)
        log.info("saved checkpoint %s", path)

    meta = {**meta, "step": step, **_layout()}
    save_checkpoint(path, model, tokenizer, extra, meta, async_queue, on_complete=prune)
    return path


def resume_train_checkpoint(path: Path, model, optimizer, pipeline: Pipeline) -> tuple[int, dict]:
    """Load the train state saved at `path` under any tp / pp / dp layout; returns (step, this
    rank's data state for `pipeline`). The RNG states are restored when the layout is the
    same. Under another data-parallel size the ranks continue the global sample stream where
    the saved ranks left it (`Pipeline.resharded_state`)."""
    meta = read_meta(path)
    layout = _layout()
    objects = _per_rank_objects(pipeline.state_dict(), _rng_state())
    saved_dp = meta.get("dp", layout["dp"])
    if saved_dp != layout["dp"]:
        objects["data"] = _every_data_position(saved_dp, pipeline.state_dict())
        log.info("data-parallel size %d -> %d: the data positions reshard", saved_dp, layout["dp"])
    if any(meta.get(k, 1) != layout[k] for k in ("world_size", "dp", "tp", "pp")):
        objects.pop("rng")
        log.info("layout changed since %s: RNG states are not restored", path)
    extra = {
        "optimizer": _optimizer_state(optimizer, model, is_loading=True),
        "train_state": {"step": 0},
        **objects,
    }
    state = load_checkpoint(path, model, extra)
    _load_optimizer(optimizer, state["optimizer"])
    _restore_step_counts(optimizer, state["optimizer"])
    if "rng" in state:
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    data = state["data"]
    if saved_dp != layout["dp"]:
        data = pipeline.resharded_state([data[str(r)] for r in range(saved_dp)])
    return int(state["train_state"]["step"]), data
