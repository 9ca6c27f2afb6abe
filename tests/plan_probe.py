"""Peak memory of real CPU training steps, per rank, for checking the planner's memory model.

Method: in a fresh gloo process per rank (`tests.multiproc.run_ranks`), after torch, Megatron
and the process groups are up, glibc is told to serve every block of 64 KiB or more with its own
mapping and to return it when freed (`mallopt`: a fixed mmap threshold, which also stops glibc
from raising it, and a low trim threshold), so the resident size follows the live tensors as a
GPU's allocated bytes do, without the heap fragmentation of a CPU process. The resident size is
the baseline and the kernel's high-water mark is reset (`/proc/self/clear_refs`, 5). Then the components `train.py` builds (LongVILAModel,
Megatron's DDP with fp32 gradient buffers, the AdamW optimizer) run `steps` optimizer steps of one
packed sample; the peak is the high-water mark (VmHWM) minus the baseline, the largest over ranks.
Adam's moments exist from the first step on, so the second step's backward is the peak.
"""

from __future__ import annotations

import ctypes
import gc

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def video_batch(tokens: int, frames: int, targets: int, tokens_per_frame: int, image_size: int):
    """One sample of `tokens` positions: two text tokens, each frame's tokens and a newline, text
    up to the end; the last `targets` positions are targets."""
    from longvila_mcore.data.batch import IGNORE_INDEX, Batch

    g = torch.Generator().manual_seed(0)
    media = torch.full((tokens,), -1)
    pos = 2
    for f in range(frames):
        media[pos : pos + tokens_per_frame] = torch.arange(tokens_per_frame) + f * tokens_per_frame
        pos += tokens_per_frame + 1
    if frames and pos > tokens - targets:
        raise ValueError(f"{frames} frames do not fit {tokens} tokens with {targets} targets")
    ids = torch.randint(0, 200, (tokens,), generator=g)
    labels = torch.full((tokens,), IGNORE_INDEX)
    labels[tokens - targets :] = torch.randint(0, 200, (targets,), generator=g)
    return Batch(
        input_ids=ids,
        media_index=media,
        labels=labels,
        position_ids=torch.arange(tokens),
        cu_seqlens=torch.tensor([0, tokens]),
        frames=torch.randn(frames, 3, image_size, image_size, generator=g),
    )


def measure_peak(model_cfg, parallel, work, steps: int = 2) -> float:
    """Bytes: the largest over ranks of (peak resident size during `steps` steps - baseline)."""
    import torch.distributed as dist

    from longvila_mcore.config import StageConfig, TrainConfig
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_model_parallel
    from longvila_mcore.training.step import build_optimizer, train_step, wrap_model

    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, 1 << 16) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 16)):
        raise RuntimeError("glibc refused the mmap / trim thresholds")
    init_model_parallel(parallel)
    batch = video_batch(
        work.tokens,
        work.frames,
        work.targets,
        model_cfg.tokens_per_frame,
        model_cfg.vision.image_size,
    )
    gc.collect()
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size

    torch.manual_seed(0)
    model = LongVILAModel(model_cfg, parallel, torch.device("cpu"))
    parts = set(work.trainable)
    model.set_trainable("vision_tower" in parts, "mm_projector" in parts, "llm" in parts)
    # Megatron's non-distributed optimizer, which the planner models (clipping scales the
    # gradients in place).
    train = TrainConfig(max_steps=steps, distributed_optimizer=False, overlap_communication=False)
    ddp = wrap_model(model, train)
    optimizer, scheduler = build_optimizer(ddp, StageConfig(lr=1e-4), train, torch.float32)
    model.train()
    for _ in range(steps):
        train_step(ddp, optimizer, scheduler, [batch])
    peak = torch.tensor(float(_status_kib("VmHWM") - baseline) * 1024)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.item()
