"""Samples to micro-batches: greedy packing in order, each sample padded at its end.

Every sample is padded to a multiple of `pad_multiple` (2 x ulysses x ring, so each zigzag shard
of every sample is whole): pad tokens take the tokenizer's pad id, label IGNORE_INDEX, media
index -1, and positions that continue the sample's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longvila_mcore.data.batch import IGNORE_INDEX, Batch
from longvila_mcore.data.samples import Sample


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def plan_micro_batches(
    lengths: Sequence[int], micro_batch_size: int, max_length: int
) -> list[list[int]]:
    """Group consecutive samples (by index) into micro-batches of at most `micro_batch_size`
    samples and `max_length` positions, greedily in order; `lengths` are padded lengths."""
    groups: list[list[int]] = []
    used = 0
    for i, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(
                f"sample {i} has {length} positions, more than max_length={max_length}; "
                "drop it or raise max_length"
            )
        if not groups or len(groups[-1]) == micro_batch_size or used + length > max_length:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += length
    return groups


def pack(samples: Sequence[Sample], pad_id: int, pad_multiple: int) -> Batch:
    """One micro-batch: `samples` back to back, each padded, frames concatenated in order."""
    ids, media, labels, positions, bounds, frames = [], [], [], [], [0], []
    media_before = 0
    for sample in samples:
        pad = padded_length(len(sample), pad_multiple) - len(sample)
        ids.append(torch.nn.functional.pad(sample.input_ids, (0, pad), value=pad_id))
        # Media indices continue after the earlier samples' frames: every frame has exactly
        # tokens_per_frame media positions, so the offset is the count of those positions.
        is_media = sample.media_index >= 0
        shifted = torch.where(is_media, sample.media_index + media_before, -1)
        media_before += int(is_media.sum())
        media.append(torch.nn.functional.pad(shifted, (0, pad), value=-1))
        labels.append(torch.nn.functional.pad(sample.labels, (0, pad), value=IGNORE_INDEX))
        positions.append(torch.arange(len(sample) + pad))
        bounds.append(bounds[-1] + len(sample) + pad)
        frames.append(sample.frames)
    return Batch(
        input_ids=torch.cat(ids),
        media_index=torch.cat(media),
        labels=torch.cat(labels),
        position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int64),
        frames=torch.cat(frames),
    )


def collate(
    samples: Sequence[Sample],
    *,
    micro_batch_size: int,
    max_length: int,
    pad_id: int,
    pad_multiple: int,
) -> list[Batch]:
    """Pack `samples`, in order, into as few micro-batches as greedy packing gives."""
    lengths = [padded_length(len(s), pad_multiple) for s in samples]
    groups = plan_micro_batches(lengths, micro_batch_size, max_length)
    return [pack([samples[i] for i in group], pad_id, pad_multiple) for group in groups]
