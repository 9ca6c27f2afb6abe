"""Where each optimizer step is reported: metrics.jsonl, a progress bar or log line, TensorBoard.

Only rank 0 writes. A resumed run appends to the same metrics.jsonl, so the file holds every
step ever executed in this output directory.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

log = logging.getLogger("longvila_mcore.train")


def peak_memory_gib(device: torch.device) -> dict:
    """{"peak_memory_gib": the largest over ranks, "peak_memory_gib_per_rank": [...]}: the peak
    of memory torch allocated on the GPU, or of the process's resident memory on a CPU run.
    Every rank calls this (one all-gather)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    mine = torch.tensor([peak / 2**30], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    per_rank = [round(float(t), 3) for t in every]
    return {"peak_memory_gib": max(per_rank), "peak_memory_gib_per_rank": per_rank}


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
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mfu=f"{record['mfu']:.1%}",
                mem=f"{record['peak_memory_gib']:.1f}G",
            )
        elif step % self.log_interval == 0:
            log.info(
                "step %d  loss %.4f  lr %.3e  grad_norm %.3f  tokens %d  %.2fs + data %.2fs  "
                "%.0f tokens/s  mfu %.2f%%  peak %.2f GiB",
                step,
                record["loss"],
                record["lr"],
                record["grad_norm"],
                record["tokens"],
                record["step_time_s"],
                record["data_wait_s"],
                record["tokens_per_s"],
                100 * record["mfu"],
                record["peak_memory_gib"],
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
