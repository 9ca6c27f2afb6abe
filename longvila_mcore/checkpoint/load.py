"""Start from either checkpoint format this project reads: ours or a VILA-layout HF directory.

Training (`checkpoint.load`, resuming) and inference (`generate --load`) both go through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from longvila_mcore.checkpoint import dist as mcore_ckpt
from longvila_mcore.checkpoint import hf
from longvila_mcore.checkpoint.tensors import CheckpointError
from longvila_mcore.config import ModelConfig, ParallelConfig, with_token_order
from longvila_mcore.models.longvila import LongVILAModel


@dataclass
class Source:
    """What a checkpoint says before any weight is read."""

    model: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    hf: dict[str, Any] | None
    """The configs and dtypes of the VILA-layout checkpoint it came from (None: trained here)."""
    stage: dict[str, Any] | None
    """The stage config that wrote it (None: converted, not trained)."""
    trained_frames: int | None
    """The most frames of one sample it was trained on, as training here records it (with the
    checkpoints it started from); a VILA-layout directory's `num_video_frames`; else None."""

    @property
    def num_video_frames(self) -> int:
        """Frames a video is sampled to when the caller does not say."""
        top = (self.hf or {}).get("config") or {}
        frames = top.get("num_video_frames") or (self.stage or {}).get("num_frames")
        return int(frames or hf.DEFAULT_NUM_FRAMES)


def read_source(path: str | Path, token_order: str | None = None) -> Source:
    """Model dimensions, tokenizer and origin of a checkpoint of ours or of a VILA-layout one.

    A VILA tokenizer without the media tokens gets them, and the vocabulary grows to match.
    `token_order` (a flag or override) replaces the token order the checkpoint records.
    """
    root = Path(path)
    if mcore_ckpt.is_checkpoint(root):
        meta = mcore_ckpt.read_meta(root)
        return Source(
            with_token_order(mcore_ckpt.model_config(meta, root), token_order, root),
            AutoTokenizer.from_pretrained(mcore_ckpt.tokenizer_dir(root)),
            meta.get("hf"),
            meta.get("config", {}).get("stage"),
            meta.get("trained_frames"),
        )
    if (root / "config.json").is_file() and (root / "llm").is_dir():
        cfg, tokenizer, _ = hf.read_config_and_tokenizer(root, token_order)
        origin = hf.hf_origin(root, hf.SafetensorsReader(root))
        frames = (origin.get("config") or {}).get("num_video_frames")
        return Source(cfg, tokenizer, origin, None, frames)
    raise CheckpointError(
        f"{root} is neither a checkpoint of this project ({mcore_ckpt.FORMAT_FILE}) nor a "
        "VILA-layout HF checkpoint (config.json, llm/, vision_tower/, mm_projector/)"
    )


def fill_weights(model: LongVILAModel, path: str | Path) -> None:
    """Load the weights at `path` into `model`, whatever layout either was built with."""
    if mcore_ckpt.is_checkpoint(path):
        mcore_ckpt.load_checkpoint(path, model)
    else:
        hf.fill_from_vila(model, path)


@dataclass
class LoadedModel:
    model: LongVILAModel
    tokenizer: PreTrainedTokenizerBase
    num_video_frames: int
    trained_frames: int | None
    """As `Source.trained_frames`."""


def load_for_inference(
    path: str | Path,
    parallel: ParallelConfig,
    device: torch.device,
    dtype: torch.dtype,
    token_order: str | None = None,
) -> LoadedModel:
    """The model at `path` built for `parallel` (it reshards), ready to generate; `token_order`
    None runs the projector in the order the checkpoint records."""
    source = read_source(path, token_order)
    model = LongVILAModel(source.model, parallel, device, dtype, initialize=False)
    fill_weights(model, path)
    return LoadedModel(
        model.to(device), source.tokenizer, source.num_video_frames, source.trained_frames
    )
