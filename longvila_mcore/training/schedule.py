"""Learning rate as a pure function of the step: nothing to save, exact on resume."""

from __future__ import annotations

import math

from longvila_mcore.config import StageConfig


def warmup_steps(stage: StageConfig, max_steps: int) -> int:
    if stage.warmup_steps > 0:
        return stage.warmup_steps
    return math.ceil(stage.warmup_ratio * max_steps)


def learning_rate(stage: StageConfig, step: int, max_steps: int) -> float:
    """The rate of optimizer step `step` (0-based): linear warm-up to `stage.lr`, then constant
    or cosine decay to zero at `max_steps`."""
    warmup = warmup_steps(stage, max_steps)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    if stage.lr_schedule == "constant":
        return stage.lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    return stage.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
