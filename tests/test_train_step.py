"""The training step on Megatron's machinery (training/step.py), measured on gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests.multiproc import run_ranks


def _adam_state_numel(optimizer) -> int:
    """Elements of Adam moments this rank holds (fp32 master weights of fp32 parameters are
    views of the parameters themselves, so they hold nothing extra)."""
    return sum(
        t.numel()
        for inner in optimizer.chained_optimizers
        for state in inner.optimizer.state.values()
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )


def _optimizer_state_per_rank(ulysses: int) -> dict:
    """One step with and without the distributed optimizer; this rank's Adam state and the
    model's trainable elements, gathered from every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longvila_mcore.config import Config, ParallelConfig, TrainConfig
    from longvila_mcore.data.pipeline import build_pipeline
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_model_parallel
    from longvila_mcore.train import _starting_point
    from longvila_mcore.training.step import build_optimizer, train_step, wrap_model

    config = Config()
    config.parallel = ParallelConfig(ulysses=ulysses)
    config.stage.name = "test"
    model_cfg, tokenizer, _ = _starting_point(config, None)
    dp = init_model_parallel(config.parallel)
    pipeline = build_pipeline(
        config.data,
        "conversation",
        tokenizer,
        model_cfg,
        num_frames=4,
        fps=None,
        max_length=4096,
        global_batch_size=2 * dp,
        micro_batch_size=1,
        pad_multiple=2 * config.parallel.sp,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        seed=1,
    )
    batches = next(pipeline)
    pipeline.close()
    held = {}
    for distributed in (False, True):
        torch.manual_seed(0)
        model = LongVILAModel(model_cfg, config.parallel, torch.device("cpu"))
        model.set_trainable(True, True, True)
        train = TrainConfig(distributed_optimizer=distributed)
        ddp = wrap_model(model, train)
        optimizer, scheduler = build_optimizer(ddp, config.stage, train, torch.float32)
        train_step(ddp, optimizer, scheduler, batches)
        mine = torch.tensor([_adam_state_numel(optimizer)])
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        held[distributed] = [int(t) for t in every]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"held": held, "whole": 2 * trainable, "dp": dp}


@pytest.mark.slow
def test_distributed_optimizer_state_is_sharded_over_dp_and_sp():
    """4 ranks = dp 2 x ulysses 2: each rank holds 1/4 of the Adam state (up to Megatron's
    bucket padding), every element exactly once; without the distributed optimizer each rank
    holds all of it."""
    result = run_ranks(4, _optimizer_state_per_rank, 2)
    whole, n = result["whole"], 4
    assert result["dp"] == 2
    assert result["held"][False] == [whole] * n
    sharded = result["held"][True]
    assert sum(sharded) == whole  # each element's state is held by exactly one rank
    # Shards are equal slices of a buffer padded per parameter (to 64 elements) and per bucket.
    assert max(sharded) <= whole / n * 1.02, (sharded, whole)
    assert min(sharded) >= whole / n * 0.98, (sharded, whole)
