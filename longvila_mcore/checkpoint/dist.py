"""This project's checkpoint format: a Megatron distributed checkpoint plus what it needs to run.

```
<checkpoint>/
  metadata.json, common.pt, *.distcp    Megatron dist_checkpointing: "model" (+ training state)
  longvila.json                         format version, ModelConfig (token order included), step,
                                        parallel layout;
                                        "hf": the released configs it was converted from
                                        (checkpoint/convert.py), kept for the way back
  tokenizer/                            the tokenizer the model was trained with
```

Tensors are saved sharded and reshard on load, so weights written with one tensor-parallel /
sequence-parallel layout load under any other. A checkpoint is written to `<name>.incomplete`
and renamed when every rank has finished (with an asynchronous save: when every rank's
background writer has): a crash mid-save leaves the previous checkpoints intact and
`<name>.incomplete` is ignored (and removed by the next save of that name).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from transformers import PreTrainedTokenizerBase

from longvila_mcore.checkpoint.tensors import CheckpointError
from longvila_mcore.config import LLMConfig, ModelConfig, VisionConfig

log = logging.getLogger(__name__)

# Megatron-Core 0.16's checkpoint strategies call torch APIs that torch 2.13 has deprecated;
# the notices are for Megatron's maintainers and print on every load.
for _notice in (r"`load_state_dict` is deprecated", r"Please use DTensor instead"):
    warnings.filterwarnings("ignore", message=_notice, category=FutureWarning)

FORMAT_FILE = "longvila.json"
FORMAT_VERSION = 1
INCOMPLETE = ".incomplete"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's `longvila.json`; raises CheckpointError for anything else."""
    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint of this project (no {FORMAT_FILE})"
        )
    meta = json.loads((path / FORMAT_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    return meta


def model_config(meta: dict[str, Any], path: str | Path) -> ModelConfig:
    """The ModelConfig a checkpoint's `longvila.json` (`meta`, read from `path`) records.

    Checkpoints written before the token order was recorded have no `token_order`: one that
    training wrote (`stage` in meta) was trained with the only order the code had then, the
    legacy one; one that hf-to-mcore wrote holds the HF weights unchanged, whose order is the
    releases' raster one. Either way a log line says which was assumed and how to override it.
    """
    d = meta["model"]
    vision = dict(d["vision"])
    vision["image_mean"] = tuple(vision["image_mean"])
    vision["image_std"] = tuple(vision["image_std"])
    order = d.get("token_order")
    if order is None:
        trained = "stage" in meta
        order = "legacy" if trained else "raster"
        log.warning(
            "%s records no token order (written before it was recorded); assuming %s, the order "
            "%s. Pass --token-order / model.token_order if that is wrong.",
            path,
            order,
            "the code that trained it used"
            if trained
            else "of the Qwen2 LongVILA releases it was converted from",
        )
    return ModelConfig(
        name=d["name"],
        llm=LLMConfig(**d["llm"]),
        vision=VisionConfig(**vision),
        projector_type=d["projector_type"],
        token_order=order,
    )


def read_model_config(path: str | Path) -> ModelConfig:
    return model_config(read_meta(path), path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase | Sequence[Path], folder: Path) -> None:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer.save_pretrained(folder)
        return
    folder.mkdir()
    for file in tokenizer:
        shutil.copy2(file, folder / file.name)


def save_checkpoint(
    path: str | Path,
    model,
    tokenizer: PreTrainedTokenizerBase | Sequence[Path],
    extra: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    async_queue: AsyncCallsQueue | None = None,
    on_complete: Callable[[], None] | None = None,
) -> Path:
    """Write `model` (a LongVILAModel; `extra`: more sharded state, e.g. the optimizer)
    atomically to `path`. Every rank calls this; tensors are written by the ranks that hold them.

    `tokenizer` is saved with `save_pretrained`, or given as its files, which are copied as they
    are (conversion keeps the files of the released checkpoint).

    With `async_queue` the tensors are written in the background (Megatron's async save: a
    process forked from a snapshot of the state) and this returns at once; the checkpoint is
    completed (metadata, rename, then `on_complete` on rank 0) when the queue finalizes the
    save, i.e. once every rank's writer has finished.
    """
    final = Path(path)
    tmp = final.with_name(final.name + INCOMPLETE)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": model.sharded_state_dict(), **(extra or {})}
    info = {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.cfg),
        **(meta or {}),
    }

    def complete() -> None:
        _barrier()  # every rank's tensors are on disk
        if _rank() == 0:
            _save_tokenizer(tokenizer, tmp / "tokenizer")
            (tmp / FORMAT_FILE).write_text(json.dumps(info, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            if on_complete is not None:
                on_complete()
        _barrier()

    if async_queue is None:
        dist_checkpointing.save(state, str(tmp))
        complete()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
        request.add_finalize_fn(complete)
        async_queue.schedule_async_request(request)
    return final


def load_checkpoint(path: str | Path, model, extra: dict[str, Any] | None = None) -> dict:
    """Fill `model` from `path` (any saved layout); returns the loaded `extra` entries."""
    path = Path(path)
    read_meta(path)
    state = dist_checkpointing.load(
        {"model": model.sharded_state_dict(), **(extra or {})}, str(path)
    )
    model.load_state_dict(state.pop("model"))
    return state


def tokenizer_dir(path: str | Path) -> Path:
    return Path(path) / "tokenizer"
