"""Load a model for inference from either checkpoint format this project reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from longvila_mcore.checkpoint.hf import CheckpointError, load_vila
from longvila_mcore.config import ParallelConfig
from longvila_mcore.models.longvila import LongVILAModel

DEFAULT_NUM_FRAMES = 8


@dataclass
class LoadedModel:
    model: LongVILAModel
    tokenizer: PreTrainedTokenizerBase
    num_video_frames: int
    """Frames a video is sampled to when the caller does not say (the checkpoint's default)."""


def load_for_inference(
    path: str | Path, parallel: ParallelConfig, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    root = Path(path)
    if (root / "config.json").is_file() and (root / "llm").is_dir():
        model, tokenizer = load_vila(root, parallel, device, dtype)
        top = json.loads((root / "config.json").read_text())
        frames = int(top.get("num_video_frames") or DEFAULT_NUM_FRAMES)
        return LoadedModel(model.to(device), tokenizer, frames)
    raise CheckpointError(
        f"{root} is not a VILA-layout HF checkpoint (config.json, llm/, vision_tower/, "
        "mm_projector/)"
    )
