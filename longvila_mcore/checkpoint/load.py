"""Load a model for inference from either checkpoint format this project reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from longvila_mcore.checkpoint import dist as mcore_ckpt
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
    """`path` is a checkpoint of ours (any saved layout: it reshards to `parallel`) or a
    VILA-layout HF directory."""
    root = Path(path)
    if mcore_ckpt.is_checkpoint(root):
        model = LongVILAModel(
            mcore_ckpt.read_model_config(root), parallel, device, dtype, initialize=False
        )
        mcore_ckpt.load_checkpoint(root, model)
        tokenizer = AutoTokenizer.from_pretrained(mcore_ckpt.tokenizer_dir(root))
        meta = mcore_ckpt.read_meta(root)
        # The released top-level config when the checkpoint came from one, else the frames of
        # the stage that trained it.
        top = (meta.get("hf") or {}).get("config") or {
            "num_video_frames": meta.get("config", {}).get("stage", {}).get("num_frames")
        }
        return LoadedModel(model.to(device), tokenizer, _num_video_frames(top))
    if (root / "config.json").is_file() and (root / "llm").is_dir():
        model, tokenizer = load_vila(root, parallel, device, dtype)
        top = json.loads((root / "config.json").read_text())
        return LoadedModel(model.to(device), tokenizer, _num_video_frames(top))
    raise CheckpointError(
        f"{root} is neither a checkpoint of this project ({mcore_ckpt.FORMAT_FILE}) nor a "
        "VILA-layout HF checkpoint (config.json, llm/, vision_tower/, mm_projector/)"
    )


def _num_video_frames(top: dict[str, Any]) -> int:
    return int(top.get("num_video_frames") or DEFAULT_NUM_FRAMES)
