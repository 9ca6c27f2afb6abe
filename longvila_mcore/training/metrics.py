"""Where each optimizer step is reported: metrics.jsonl, a progress bar or log line, TensorBoard.

Only rank 0 writes. A resumed run appends to the same metrics.jsonl, so the file holds every
step ever executed in this output directory.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("longvila_mcore.train")


class MetricsWriter:
    def __init__(
        self,
        output_dir: Path,
        first_step: int,
        max_steps: int,
        log_interval: int,
        tensorboard: bool,
        enabled: bool,
    ):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        if not enabled:
            return
        self.file = open(output_dir / "metrics.jsonl", "a")  # noqa: SIM115  (closed in close())
        self.bar = (
            tqdm(total=max_steps, initial=first_step, unit="step", dynamic_ncols=True)
            if sys.stderr.isatty()
            else None
        )
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        elif step % self.log_interval == 0:
            log.info(
                "step %d  loss %.4f  lr %.3e  grad_norm %.3f  tokens %d  %.2fs",
                step,
                record["loss"],
                record["lr"],
                record["grad_norm"],
                record["tokens"],
                record["step_time_s"],
            )
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
