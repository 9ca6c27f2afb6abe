"""Train one LongVILA stage: `python -m longvila_mcore.train +stage=<name> [overrides]`.

Read top to bottom: validate the config, start the process groups, pick the model (resumed
checkpoint > checkpoint.load > model=), build model / optimizer / data, then the step loop.
One optimizer step = this rank's micro-batches of `train.global_batch_size` samples; the loss
is the mean over every target token of the global batch (REFERENCE 5.4), whatever the layout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from longvila_mcore.config import Config, ModelConfig
from longvila_mcore.errors import ConfigError, DataError, NonFiniteError, UserError
from longvila_mcore.runtime import default_device, default_dtype, init_distributed

log = logging.getLogger("longvila_mcore.train")

PREEMPTED = 75
"""Exit status of a run stopped by SIGTERM / SIGUSR1 once its checkpoint is saved (EX_TEMPFAIL:
run the same command again to continue); launch/slurm.sbatch requeues the job on it."""
EXIT_STATUS_FILE = "LONGVILA_EXIT_STATUS_FILE"
"""Environment variable naming a file the run writes its exit status to when preempted
(launch/torchrun.sh: torchrun itself exits 1 whatever its workers' status)."""

STAGES = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "stage").glob("*.yaml"))

ConfigStore.instance().store(name="base_config", node=Config)


def _resolve(cfg: DictConfig) -> Config:
    """The typed config, with the errors a user can cause turned into one clear message."""
    if OmegaConf.is_missing(cfg.stage, "name"):
        raise ConfigError(f"no stage selected: add +stage=<name>, one of {' '.join(STAGES)}")
    config: Config = OmegaConf.to_object(cfg)
    config.stage.check()
    if config.train.lr_scale <= 0:
        raise ConfigError(f"train.lr_scale={config.train.lr_scale} must be > 0 (1: the stage's lr)")
    return config


def _model_source(config: Config) -> tuple[Path | None, str | None]:
    """(checkpoint to resume, checkpoint to start from): resuming wins over checkpoint.load."""
    from longvila_mcore.checkpoint.resume import latest_checkpoint

    resume = latest_checkpoint(Path(config.run.output_dir))
    return resume, None if resume else config.checkpoint.load


def _explicit_token_order(config: Config, overrides: list[str]) -> str | None:
    """`model.token_order` when the command line sets it (it then wins over the order a
    starting checkpoint records), else None."""
    keys = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    return config.model.token_order if "model.token_order" in keys else None


def _starting_point(
    config: Config, source: Path | str | None, token_order: str | None = None
) -> tuple[ModelConfig, PreTrainedTokenizerBase, dict]:
    """(model dimensions, tokenizer, what to keep of the origin: the HF configs and the most
    frames of a sample trained on) of the run's start: the checkpoint it starts from (its token
    order unless `token_order` is given), else `model=` and the data's tokenizer."""
    from longvila_mcore.checkpoint.load import read_source
    from longvila_mcore.data.tokenizer import ensure_media_tokens

    if source is None:
        model, origin = config.model, {}
        path = config.data.tokenizer
        if path is None:
            from longvila_mcore.data.synthetic import synthetic_paths

            path = synthetic_paths(config.data.cache_dir).tokenizer_dir
        tokenizer = AutoTokenizer.from_pretrained(path)
        ensure_media_tokens(tokenizer)
    else:
        start = read_source(source, token_order)
        model, tokenizer = start.model, start.tokenizer
        origin = {"hf": start.hf, "trained_frames": start.trained_frames or 0}
    if config.stage.rope_theta is not None:
        model.llm.rope_theta = config.stage.rope_theta
    if len(tokenizer) > model.llm.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but model.llm.vocab_size="
            f"{model.llm.vocab_size}; raise model.llm.vocab_size"
        )
    return model, tokenizer, origin


class Preempted(Exception):
    """The run was asked to stop (a signal) and has saved its checkpoint."""


class SaveTriggers:
    """When to save after a step: every `checkpoint.save_interval` steps, every
    `checkpoint.save_interval_minutes` (rank 0's clock), at the end, and when SIGTERM or SIGUSR1
    arrived on any rank (the handler only sets a flag: the step in progress finishes, then the
    run saves and stops). The ranks agree through one small all-reduce per step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, config: Config, device: torch.device):
        self.interval = config.checkpoint.save_interval
        self.seconds = config.checkpoint.save_interval_minutes * 60
        self.max_steps = config.train.max_steps
        self.device = device
        self.signal: str | None = None
        self.last_save = time.monotonic()
        self._previous = {sig: signal.signal(sig, self._received) for sig in self.SIGNALS}

    def restore(self) -> None:
        """The signal handlers from before (the loop is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _received(self, signum: int, frame) -> None:
        self.signal = signal.Signals(signum).name

    def after(self, step: int) -> tuple[bool, bool]:
        """(save, then stop) after `step`."""
        timed = self.seconds > 0 and time.monotonic() - self.last_save >= self.seconds
        flags = torch.tensor(
            [float(self.signal is not None), float(timed and dist.get_rank() == 0)],
            device=self.device,
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop = bool(flags[0])
        periodic = self.interval > 0 and step % self.interval == 0
        return stop or bool(flags[1]) or periodic or step == self.max_steps, stop

    def saved(self) -> None:
        self.last_save = time.monotonic()


def train(config: Config, token_order: str | None = None) -> None:
    """One stage; `token_order` is an explicit `model.token_order` (see _explicit_token_order)."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from longvila_mcore.checkpoint.dist import read_meta
    from longvila_mcore.checkpoint.load import fill_weights
    from longvila_mcore.checkpoint.resume import resume_train_checkpoint, save_train_checkpoint
    from longvila_mcore.data.packing import padding_multiples
    from longvila_mcore.data.pipeline import build_pipeline
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_model_parallel
    from longvila_mcore.training.flops import batches_flops
    from longvila_mcore.training.metrics import MetricsWriter, peak_memory_gib
    from longvila_mcore.training.step import (
        build_optimizer,
        gather_parameters,
        train_step,
        wrap_model,
    )

    stage, parallel, train_cfg = config.stage, config.parallel, config.train
    device = default_device()
    dtype = default_dtype(device)
    output_dir = Path(config.run.output_dir)

    triggers = SaveTriggers(config, device)  # a signal from here on: save after the next step
    # --- model choice, checked before any tensor exists
    resume, load = _model_source(config)
    if config.data.name == "synthetic" and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        from longvila_mcore.data.synthetic import synthetic_paths

        synthetic_paths(config.data.cache_dir)  # generated once per node, before the others read
    dist.barrier()
    model_cfg, tokenizer, origin = _starting_point(config, resume or load, token_order)
    log.info("projector token order: %s", model_cfg.token_order)
    parallel.check_model(model_cfg)
    dp = init_model_parallel(parallel, train_cfg.seed)
    rank0 = dist.get_rank() == 0
    if rank0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))

    # --- model, optimizer, data
    torch.manual_seed(train_cfg.seed)
    # Weights a checkpoint fills are not drawn at random first.
    fresh = resume is None and load is None
    model = LongVILAModel(
        model_cfg,
        parallel,
        device,
        dtype,
        # The tower, projector and sharder on the first pipeline stage, the loss on the last.
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        initialize=fresh,
        recompute=train_cfg.recompute,
        recompute_num_layers=train_cfg.recompute_num_layers,
    ).to(device)
    if load is not None:
        fill_weights(model, load)
        log.info("loaded weights from %s", load)
    parts = set(stage.trainable)
    model.set_trainable("vision_tower" in parts, "mm_projector" in parts, "llm" in parts)
    ddp = wrap_model(model, train_cfg)
    optimizer, scheduler = build_optimizer(ddp, stage, train_cfg, dtype)
    # 2R per sample, N (x tp with sequence parallelism) per pack: what the 2D attention and
    # Megatron's split need, not 2N per sample.
    pad_multiple, pack_multiple = padding_multiples(
        parallel.ulysses, parallel.ring, parallel.tp_split
    )
    pipeline = build_pipeline(
        config.data,
        stage.data_kind,
        tokenizer,
        model_cfg,
        num_frames=max(1, stage.num_frames),
        fps=stage.fps,
        max_length=stage.max_length,
        global_batch_size=train_cfg.global_batch_size,
        micro_batch_size=train_cfg.micro_batch_size,
        pad_multiple=pad_multiple,
        pack_multiple=pack_multiple,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        seed=train_cfg.seed,
        sp_rank=model.sp.rank,  # the rank decodes only the frames it encodes
        sp_size=model.sp.size,
    )
    step, skipped_steps, skipped_in_a_row = 0, 0, 0
    if resume is not None:
        skipped_steps = read_meta(resume).get("skipped_steps", 0)
        step, data_state = resume_train_checkpoint(resume, model, optimizer, pipeline)
        pipeline.load_state_dict(data_state)
        scheduler.step(increment=step)  # the schedule is a function of the step
        log.info("resumed from %s after step %d", resume, step)
        if step >= train_cfg.max_steps:
            log.info("already at train.max_steps=%d: nothing to do", train_cfg.max_steps)
    meta = {"stage": stage.name, "config": dataclasses.asdict(config), **origin}
    # The needle evaluation reports accuracy within the longest video the model has seen.
    trained_frames = torch.tensor([meta.get("trained_frames", 0)], device=device)

    # --- the loop
    dp_group = parallel_state.get_data_parallel_group()
    metrics = MetricsWriter(
        output_dir, step, train_cfg.max_steps, train_cfg.log_interval, config.run.tensorboard, rank0
    )
    model.train()
    saves = AsyncCallsQueue()
    while step < train_cfg.max_steps:
        start = time.perf_counter()
        micro_batches = [b.to(device) for b in next(pipeline)]
        data_wait = time.perf_counter() - start
        counts = torch.tensor(
            [
                sum(b.num_targets for b in micro_batches),
                sum(b.input_ids.numel() for b in micro_batches),
                sum(pipeline.skipped.values()),
                batches_flops(model_cfg, micro_batches, parts),
            ],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(counts, group=dp_group)
        num_targets, tokens, skipped, flops = (int(c) for c in counts.tolist())
        longest = max(b.most_frames() for b in micro_batches)
        trained_frames = torch.clamp(trained_frames, min=longest)
        dist.all_reduce(trained_frames, op=dist.ReduceOp.MAX, group=dp_group)
        if num_targets == 0:
            raise DataError(
                f"step {step + 1} has no target tokens: check the data and stage.data_kind"
            )
        result = train_step(ddp, optimizer, scheduler, micro_batches)
        compute = time.perf_counter() - start - data_wait
        wall = data_wait + compute
        step += 1
        skipped_in_a_row = skipped_in_a_row + 1 if result.skipped else 0
        skipped_steps += result.skipped
        if result.skipped:
            log.warning(
                "step %d: loss %s, gradient norm %s: update skipped",
                step,
                result.loss_sum / num_targets,
                result.grad_norm,
            )
        metrics.write(
            {
                "step": step,
                "loss": result.loss_sum / num_targets,
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                "tokens": tokens,
                "step_time_s": compute,
                "data_wait_s": data_wait,
                "tokens_per_s": tokens / wall,
                "samples_per_s": train_cfg.global_batch_size / wall,
                "mfu": flops / (wall * dist.get_world_size() * config.run.peak_tflops * 1e12),
                **peak_memory_gib(device),
                "skipped_samples": skipped,
                "skipped_steps": skipped_steps,
            }
        )
        limit = train_cfg.max_consecutive_skipped_steps
        if limit and skipped_in_a_row >= limit:
            raise NonFiniteError(
                f"step {step}: {skipped_in_a_row} steps in a row had a non-finite loss or "
                f"gradient norm (train.max_consecutive_skipped_steps={limit}); the run diverged: "
                f"resume from the last checkpoint with a lower learning rate (train.lr_scale) "
                "or check the data of these steps"
            )
        save, stop = triggers.after(step)
        if save:
            saves.maybe_finalize_async_calls(blocking=True)  # one save in flight at a time
            gather_parameters(ddp)
            save_train_checkpoint(
                output_dir,
                step,
                model,
                optimizer,
                tokenizer,
                pipeline.state_dict(),
                {**meta, "trained_frames": int(trained_frames), "skipped_steps": skipped_steps},
                config.checkpoint.keep_last,
                saves if config.checkpoint.async_save else None,
            )
            triggers.saved()
        saves.maybe_finalize_async_calls(blocking=stop)  # completes a save whose writes are done
        if stop and step < train_cfg.max_steps:
            raise Preempted(f"step {step}: stopped by {triggers.signal or 'a signal'}, saved")
    saves.maybe_finalize_async_calls(blocking=True)
    triggers.restore()
    metrics.close()
    pipeline.close()


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # per-parameter bucket listings
    try:
        config = _resolve(cfg)
        token_order = _explicit_token_order(config, HydraConfig.get().overrides.task)
        config.parallel.data_parallel_size(int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError as err:  # reading the configuration: every error here is the user's
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    device = default_device()
    init_distributed(device)
    try:
        status = exit_status(lambda: train(config, token_order))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(status)


def exit_status(run: Callable[[], None]) -> int:
    """Run `run` (the training) and return the process's exit status: 0; PREEMPTED once a
    signalled run has saved (also written to $LONGVILA_EXIT_STATUS_FILE for launch/torchrun.sh);
    2 after an error the user caused (config, data, checkpoint, divergence: one line on stderr).
    Any other exception is a bug and propagates with its traceback."""
    try:
        run()
    except Preempted as stop:
        log.warning("%s: exiting with status %d to be run again", stop, PREEMPTED)
        if os.environ.get(EXIT_STATUS_FILE):
            Path(os.environ[EXIT_STATUS_FILE]).write_text(f"{PREEMPTED}\n")
        return PREEMPTED
    except UserError as err:
        rank = dist.get_rank() if dist.is_initialized() else 0
        print(f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    main()
