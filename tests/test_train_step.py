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
@pytest.mark.parametrize("ulysses", [1, 2])
def test_distributed_optimizer_state_is_sharded_over_dp_and_sp(ulysses):
    """dp 2 (2 ranks) and dp 2 x ulysses 2 (4 ranks): each rank holds 1/(dp x sp) of the Adam
    state (up to Megatron's bucket padding), every element exactly once; without the
    distributed optimizer each rank holds all of it."""
    n = 2 * ulysses
    result = run_ranks(n, _optimizer_state_per_rank, ulysses)
    whole = result["whole"]
    assert result["dp"] == 2
    assert result["held"][False] == [whole] * n
    sharded = result["held"][True]
    assert sum(sharded) == whole  # each element's state is held by exactly one rank
    # Shards are equal slices of a buffer padded per parameter (to 64 elements) and per bucket.
    assert max(sharded) <= whole / n * 1.02, (sharded, whole)
    assert min(sharded) >= whole / n * 0.98, (sharded, whole)


# --- combined layouts: loss AND gradient norm of every step ---------------------------------

# 8 samples a step in micro-batches of 2: every rank accumulates over 2 or 4 micro-batches.
LAYOUT_STEPS = 4
COMBINED = {
    "dp2_u2_r2": dict(ulysses=2, ring=2),  # sequence x data parallel
    "dp2_tp2_r2": dict(tp=2, ring=2),  # tensor parallel x ring
    "tp2_u2_r2": dict(tp=2, ulysses=2, ring=2),  # 2 x 2 x 2, no data parallelism
}


def step_metrics(
    layouts: dict[str, dict], clip_grad: float
) -> dict[str, list[tuple[float, float]]]:
    """(mean loss over the global batch's targets, gradient norm) of each of LAYOUT_STEPS steps
    from the same initial weights and data, for each parallel layout in `layouts`."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from longvila_mcore.config import Config, ParallelConfig, TrainConfig
    from longvila_mcore.data.pipeline import build_pipeline
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_model_parallel
    from longvila_mcore.train import _starting_point
    from longvila_mcore.training.step import build_optimizer, train_step, wrap_model

    config = Config()
    config.stage.name = "test"
    config.stage.lr_schedule = "constant"
    config.stage.lr = 1e-3  # steps that move the loss
    model_cfg, tokenizer, _ = _starting_point(config, None)
    train = TrainConfig(global_batch_size=8, micro_batch_size=2, clip_grad=clip_grad)
    results = {}
    for name, layout in layouts.items():
        parallel = ParallelConfig(**layout)
        dp = init_model_parallel(parallel)
        pipeline = build_pipeline(
            config.data,
            "conversation",
            tokenizer,
            model_cfg,
            num_frames=4,
            fps=None,
            max_length=4096,
            global_batch_size=train.global_batch_size,
            micro_batch_size=train.micro_batch_size,
            pad_multiple=2 * parallel.sp,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=dp,
            seed=1,
        )
        torch.manual_seed(0)
        model = LongVILAModel(model_cfg, parallel, torch.device("cpu"))
        model.set_trainable(True, True, True)
        ddp = wrap_model(model, train)
        optimizer, scheduler = build_optimizer(ddp, config.stage, train, torch.float32)
        steps = []
        for _ in range(LAYOUT_STEPS):
            batches = next(pipeline)
            targets = torch.tensor([float(sum(b.num_targets for b in batches))])
            dist.all_reduce(targets, group=parallel_state.get_data_parallel_group())
            result = train_step(ddp, optimizer, scheduler, batches)
            steps.append((result.loss_sum / targets.item(), result.grad_norm))
        pipeline.close()
        results[name] = steps
    return results


# Gradient norms of the first 3 steps are about 4.2, 4.1 and 3.5: clipping at 3.8 is active on
# the first two and inactive on the third, where a gradient of the wrong scale changes the
# update (and step 4's loss).
CLIP = 3.8


def _combined_layouts() -> dict:
    return step_metrics(COMBINED, CLIP)


@pytest.mark.slow
def test_combined_layouts_match_one_process_loss_and_grad_norm(single_rank):
    """sp x dp, tp x ring and tp 2 x ulysses 2 x ring 2 on 8 ranks, each accumulating over
    micro-batches: every step's loss and gradient norm within 1e-5 of one process's."""
    ref = step_metrics({"one": {}}, CLIP)["one"]
    norms = [norm for _, norm in ref]
    assert max(norms) > CLIP > min(norms), norms  # steps with clipping active and inactive
    ours = run_ranks(8, _combined_layouts)
    wrong = {
        (name, step, what): (got, want)
        for name, steps in ours.items()
        for step, (metrics, ref_metrics) in enumerate(zip(steps, ref), 1)
        for what, got, want in zip(("loss", "grad_norm"), metrics, ref_metrics)
        if abs(got - want) > 1e-5 * abs(want)
    }
    assert not wrong, "\n".join(
        f"{key}: got {got}, want {want}" for key, (got, want) in wrong.items()
    )


# --- non-finite steps -------------------------------------------------------------------------


def _fresh_run(config, model_cfg, overlap: bool = True):
    """Model, DDP, optimizer and scheduler from seed 0 (the same weights every call)."""
    from longvila_mcore.config import ParallelConfig, TrainConfig
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.training.step import build_optimizer, wrap_model

    torch.manual_seed(0)
    model = LongVILAModel(model_cfg, ParallelConfig(), torch.device("cpu"))
    model.set_trainable(True, True, True)
    train = TrainConfig(global_batch_size=4, micro_batch_size=2, clip_grad=1.0)
    train.overlap_communication = overlap
    ddp = wrap_model(model, train)
    optimizer, scheduler = build_optimizer(ddp, config.stage, train, torch.float32)
    return ddp, optimizer, scheduler


def _one_rank_steps(config, tokenizer, model_cfg, kind: str, count: int, global_batch_size: int):
    """The first `count` steps of a one-rank pipeline of `kind` samples (2 per micro-batch)."""
    from longvila_mcore.data.pipeline import build_pipeline

    pipeline = build_pipeline(
        config.data,
        kind,
        tokenizer,
        model_cfg,
        num_frames=4,
        fps=None,
        max_length=4096,
        global_batch_size=global_batch_size,
        micro_batch_size=2,
        pad_multiple=2,
        dp_rank=0,
        dp_size=1,
        seed=1,
    )
    steps = [next(pipeline) for _ in range(count)]
    pipeline.close()
    return steps


def _snapshot(ddp, optimizer) -> list[torch.Tensor]:
    """Every parameter and every Adam moment, copied."""
    tensors = [p.detach().clone() for p in ddp.parameters()]
    for inner in optimizer.chained_optimizers:
        for state in inner.optimizer.state.values():
            tensors += [state[k].clone() for k in ("exp_avg", "exp_avg_sq")]
    return tensors


def test_a_non_finite_step_updates_nothing_and_the_run_continues_as_without_it(single_rank):
    """Steps 1, 2, 3 with step 2's loss made NaN: step 2 is skipped (weights and Adam state
    bitwise unchanged), and step 3's loss, gradient norm and resulting weights equal those of a
    run that never saw step 2's batch (its learning-rate slot passed all the same)."""

    from longvila_mcore.config import Config
    from longvila_mcore.train import _starting_point
    from longvila_mcore.training.step import train_step

    config = Config()
    config.stage.name = "test"
    config.stage.lr = 1e-3
    config.stage.warmup_steps = 2  # the rate of step 3 differs from step 2's
    model_cfg, tokenizer, _ = _starting_point(config, None)
    steps = _one_rank_steps(config, tokenizer, model_cfg, "conversation", 3, 4)

    ddp, optimizer, scheduler = _fresh_run(config, model_cfg)
    first = train_step(ddp, optimizer, scheduler, steps[0])
    before = _snapshot(ddp, optimizer)
    loss = ddp.module.loss
    ddp.module.loss = lambda batch: (loss(batch)[0] * float("nan"), loss(batch)[1])
    bad = train_step(ddp, optimizer, scheduler, steps[1])
    del ddp.module.loss
    assert bad.skipped and not first.skipped and first.grad_norm > 0
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(ddp, optimizer)))
    third = train_step(ddp, optimizer, scheduler, steps[2])

    ddp2, optimizer2, scheduler2 = _fresh_run(config, model_cfg)
    train_step(ddp2, optimizer2, scheduler2, steps[0])
    scheduler2.step(increment=1)  # step 2's slot of the schedule
    expected = train_step(ddp2, optimizer2, scheduler2, steps[2])
    assert not third.skipped
    assert (third.loss_sum, third.grad_norm, third.lr) == (
        expected.loss_sum,
        expected.grad_norm,
        expected.lr,
    )
    assert all(torch.equal(a, b) for a, b in zip(ddp.parameters(), ddp2.parameters()))


# --- model FLOPs for the MFU ------------------------------------------------------------------


def test_model_flops_match_torch_flop_counter(single_rank):
    """The weight matmuls of training/flops.py against torch's FLOP counter on the real model
    (tower with patch embedding, projector, decoder, output layer at target positions): the
    forward exactly; forward plus backward within 1% (the counter's backward skips the patch
    embedding's gradient towards the pixels). The counter does not see this project's attention
    kernels, whose causal count is the formula's own."""
    from torch.utils.flop_counter import FlopCounterMode

    from longvila_mcore.config import ParallelConfig
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.training.flops import PARTS, forward_flops, training_flops
    from tests.test_sp_model import model_config, packed_batch

    cfg = model_config()
    torch.manual_seed(0)
    model = LongVILAModel(cfg, ParallelConfig(), torch.device("cpu"))
    model.set_trainable(True, True, True)
    batch = packed_batch(cfg.tokens_per_frame)
    with FlopCounterMode(display=False) as forward:
        loss_sum, _ = model.loss(batch)
    with FlopCounterMode(display=False) as backward:
        loss_sum.backward()
    bounds = batch.cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    frames, targets = batch.frames.shape[0], batch.num_targets
    ours = forward_flops(cfg, frames, lengths, targets)
    assert sum(linear for linear, _ in ours.values()) == forward.get_total_flops()
    attention = sum(a for _, a in ours.values())
    total = training_flops(cfg, frames, lengths, targets, set(PARTS)) - 3 * attention
    counted = forward.get_total_flops() + backward.get_total_flops()
    assert abs(total - counted) <= 0.01 * counted, (total, counted)
    # Only the projector learns: the decoder's backward computes activation gradients only,
    # the frozen tower before the projector none.
    linear = {part: flops for part, (flops, _) in ours.items()}
    projector_only = training_flops(cfg, frames, lengths, targets, {"mm_projector"})
    assert projector_only == (
        linear["vision_tower"]
        + ours["vision_tower"][1]
        + 3 * linear["mm_projector"]
        + 2 * linear["llm"]
        + 3 * ours["llm"][1]
    )


# --- steps with and without media -------------------------------------------------------------


def test_text_only_step_after_a_media_step_with_overlapped_grad_reduce(single_rank):
    """Megatron's overlapped gradient reduction learns on the first step which parameters get a
    gradient and waits for exactly those afterwards: a text-only step (SFT data mixes them in)
    must still give the tower and projector their (zero) gradients. Steps 1 (video) and 2 (text)
    equal the run without overlap: loss, gradient norm and weights."""

    from longvila_mcore.config import Config
    from longvila_mcore.train import _starting_point
    from longvila_mcore.training.step import train_step

    config = Config()
    config.stage.name = "test"
    config.stage.lr = 1e-3
    model_cfg, tokenizer, _ = _starting_point(config, None)
    steps = [
        *_one_rank_steps(config, tokenizer, model_cfg, "conversation", 1, 2),
        *_one_rank_steps(config, tokenizer, model_cfg, "text", 1, 2),
    ]
    assert steps[0][0].num_frames > 0 and steps[1][0].num_frames == 0

    runs = []
    for overlap in (True, False):
        ddp, optimizer, scheduler = _fresh_run(config, model_cfg, overlap)
        results = [train_step(ddp, optimizer, scheduler, batches) for batches in steps]
        runs.append((results, [p.detach().clone() for p in ddp.parameters()]))
    (overlapped, weights), (plain, expected) = runs
    for got, want in zip(overlapped, plain):
        assert not got.skipped
        assert (got.loss_sum, got.grad_norm) == pytest.approx(
            (want.loss_sum, want.grad_norm), rel=1e-6
        )
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(weights, expected))
