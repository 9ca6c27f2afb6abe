"""One optimizer step on Megatron-Core's own machinery.

Megatron's DDP holds the gradients in contiguous buffers; its schedule
(`get_forward_backward_func`) runs forward and backward over the step's micro-batches;
`finalize_model_grads` reduces the gradients over data- and sequence-parallel ranks and divides
them by the global number of target tokens; its optimizer (distributed or not) clips and steps;
`OptimizerParamScheduler` sets the learning rate and weight decay (none on biases and norms).
A step whose loss or gradient norm is not finite updates nothing, on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from longvila_mcore.config import StageConfig, TrainConfig
from longvila_mcore.data.batch import Batch
from longvila_mcore.errors import ConfigError
from longvila_mcore.models.longvila import LongVILAModel


def wrap_model(model: LongVILAModel, train: TrainConfig) -> DistributedDataParallel:
    """Megatron's DDP around `model`, and the hooks its schedule calls on the model's config.

    Gradients are summed (not averaged) over data- and sequence-parallel ranks and divided once
    by the global target count in `finalize_model_grads` (`calculate_per_token_loss`), so the
    loss is the mean over every target token of the global batch (REFERENCE 5.4).
    """
    config = model.config
    config.calculate_per_token_loss = True
    # Packed micro-batches differ in length: pipeline stages send each activation's shape
    # first. (Set here, not in the TransformerConfig, whose check refuses it for the default
    # MoE token dispatcher, unused.)
    config.variable_seq_lengths = True
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=train.overlap_communication,
            overlap_param_gather=train.overlap_communication and train.distributed_optimizer,
            use_distributed_optimizer=train.distributed_optimizer,
        ),
        model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync  # accumulate over micro-batches, reduce after the last
    return ddp


def gather_parameters(ddp: DistributedDataParallel) -> None:
    """Bring every rank's parameters up to date now (before a checkpoint): with the
    distributed optimizer and overlapping, each rank updates only its shard and the all-gather
    of the others runs during the next forward."""
    if ddp.ddp_config.overlap_param_gather:
        ddp.start_param_sync(force_sync=True)


def warmup_steps(stage: StageConfig, max_steps: int) -> int:
    if stage.warmup_steps > 0:
        return stage.warmup_steps
    return math.ceil(stage.warmup_ratio * max_steps)


def build_optimizer(
    ddp: DistributedDataParallel, stage: StageConfig, train: TrainConfig, dtype: torch.dtype
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """AdamW (sharded over data x sequence-parallel ranks with `train.distributed_optimizer`)
    and its learning-rate / weight-decay schedule.

    Step n (1-based) runs at the schedule's value for n: a linear warm-up whose first step
    already learns (lr / warmup), then constant, or cosine to `stage.min_lr` at
    `train.max_steps`, both rates times `train.lr_scale`. Biases and 1-D parameters (norms) get no weight decay (Megatron's
    default parameter groups).
    """
    if not any(p.requires_grad for p in ddp.parameters()):
        raise ConfigError("no trainable parameters: check stage.trainable")
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=stage.lr * train.lr_scale,
            min_lr=stage.min_lr * train.lr_scale,
            weight_decay=stage.weight_decay,
            adam_beta1=train.adam_beta1,
            adam_beta2=train.adam_beta2,
            adam_eps=train.adam_eps,
            clip_grad=train.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=train.distributed_optimizer,
            overlap_param_gather=ddp.ddp_config.overlap_param_gather,
        ),
        [ddp],
        use_gloo_process_groups=False,  # the groups themselves are gloo on CPU, NCCL on GPU
    )
    warmup = warmup_steps(stage, train.max_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=stage.lr * train.lr_scale,
        min_lr=stage.min_lr * train.lr_scale,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(train.max_steps, warmup + 1),  # Megatron wants decay after warm-up
        lr_decay_style=stage.lr_schedule,
        start_wd=stage.weight_decay,
        end_wd=stage.weight_decay,
        wd_incr_steps=train.max_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _loss_func(
    num_targets: torch.Tensor, loss_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron's per-token loss contract: (sum of this shard's token losses, its target
    count, what to report); the schedule backpropagates the sum."""
    return loss_sum, num_targets.int(), {"loss_sum": loss_sum.detach()}


def forward_step(batches: Iterator[Batch], model: DistributedDataParallel):
    """Megatron's forward-step contract: this rank's output and the function that turns it
    into a loss. Every pipeline stage reads the same micro-batch (positions and sample
    boundaries); a stage before the last outputs its hidden states, which the schedule sends
    on (and never asks a loss of)."""
    module, batch = model.module, next(batches)
    if not module.post_process:
        return module.hidden_states(batch), None
    loss_sum, num_targets = module.loss(batch)
    return loss_sum, partial(_loss_func, num_targets)


@dataclass
class StepResult:
    loss_sum: float
    """Sum of the token losses of the global batch (divide by its target count)."""
    grad_norm: float
    """Global gradient norm before clipping (every parameter counted once)."""
    lr: float
    skipped: bool
    """The update was skipped: the loss or the gradient norm is not finite on some rank."""


def train_step(
    ddp: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    micro_batches: list[Batch],
) -> StepResult:
    """Forward and backward over this rank's micro-batches, gradient reduction, one update."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    scheduler.step(increment=1)  # the rate of this step (see build_optimizer)
    reported = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[ddp],
        num_microbatches=len(micro_batches),
        # Unused by the pipelined schedule under `variable_seq_lengths` (wrap_model).
        seq_length=max(b.input_ids.numel() for b in micro_batches),
        micro_batch_size=1,
        forward_only=False,
    )
    # Only the last pipeline stage computes losses; the other stages contribute zeros.
    loss_sum = torch.zeros((), dtype=torch.float64, device=micro_batches[0].input_ids.device)
    for r in reported:
        loss_sum += r["loss_sum"]
    dist.all_reduce(
        loss_sum, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    dist.all_reduce(loss_sum, group=parallel_state.get_pipeline_model_parallel_group())
    grad_norm, updated = _step(optimizer, loss_sum)
    return StepResult(
        loss_sum=loss_sum.item(),
        grad_norm=grad_norm,
        lr=optimizer.param_groups[0]["lr"],
        skipped=not updated,
    )


def _step(optimizer: MegatronOptimizer, loss_sum: torch.Tensor) -> tuple[float, bool]:
    """(gradient norm, updated): Megatron's `ChainedOptimizer.step` with one more check. Only
    its fp16 loss scaler looks for non-finite gradients; in bf16 and fp32 a NaN norm makes the
    clipping coefficient NaN, which clips nothing, and the NaN update would go ahead. Here the
    update happens only when the loss and the norm are finite on every rank."""
    found_inf = optimizer.prepare_grads()  # the main gradients, ready to clip and apply
    grad_norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
    finite = torch.tensor(
        [float(math.isfinite(loss_sum.item()) and math.isfinite(grad_norm))],
        device=loss_sum.device,
    )
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        return grad_norm, False
    for inner in optimizer.chained_optimizers:
        params = inner.get_parameters()
        if inner.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, inner.config.clip_grad, grad_norm)
    return grad_norm, optimizer.step_with_ready_grads()
