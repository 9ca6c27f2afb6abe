"""Samples to micro-batches: greedy packing in order, each sample padded at its end.

Every sample is padded to a multiple of `pad_multiple` (2 x ring with more than one ring rank,
so each zigzag chunk of every sample is whole) and the last one further, so that the pack is a
multiple of `pack_multiple` (ulysses x ring equal shards; `padding_multiples`): pad tokens take the
tokenizer's pad id, label IGNORE_INDEX, media index -1, and positions that continue the sample's.

A pack is laid out whole on every rank, but a sequence-parallel rank prepares (decodes, resizes,
normalises) only the frames it encodes (`pack(..., sp_rank, sp_size)`, `Batch.frame_offset`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from longvila_mcore.data.batch import IGNORE_INDEX, Batch, frame_block
from longvila_mcore.data.media import FrameSource
from longvila_mcore.data.samples import Sample


def padded_length(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def padding_multiples(ulysses: int, ring: int, tp_split: int = 1) -> tuple[int, int]:
    """(`pad_multiple`, `pack_multiple`) of a `ulysses x ring` layout: a sample is a multiple of
    2R (1 without a ring), the pack of N = U x R and of the samples' multiple. `tp_split`:
    Megatron's sequence parallelism splits each of the N shards over that many tensor-parallel
    ranks (`ParallelConfig.tp_split`), so the pack is a multiple of N x tp_split."""
    sample = 2 * ring if ring > 1 else 1
    return sample, math.lcm(sample, ulysses * ring * tp_split)


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


def load_frames(media: Sequence[FrameSource], start: int, stop: int) -> torch.Tensor:
    """Frames `start` to `stop` of `media`'s frames in order, `[stop - start, ...]`: only
    those are prepared."""
    parts, first = [], 0
    for medium in media:
        lo, hi = max(start - first, 0), min(stop - first, len(medium))
        if lo < hi:
            parts.append(medium.load(lo, hi))
        first += len(medium)
    if not parts:
        return torch.empty(0, *(media[0].frame_shape if media else ()))
    return torch.cat(parts)


def pack(
    samples: Sequence[Sample],
    pad_id: int,
    pad_multiple: int,
    *,
    pack_multiple: int | None = None,
    sp_rank: int = 0,
    sp_size: int = 1,
) -> Batch:
    """One micro-batch: `samples` back to back, each padded to `pad_multiple` and the last
    further to make the pack a multiple of `pack_multiple` (a multiple of `pad_multiple`, by
    default it); frames in order, holding only those sequence-parallel rank `sp_rank` of
    `sp_size` encodes (all of them by default)."""
    pack_multiple = pack_multiple or pad_multiple
    if pack_multiple % pad_multiple:
        raise ValueError(
            f"pack_multiple={pack_multiple} must be a multiple of pad_multiple={pad_multiple}"
        )
    pads = [padded_length(len(s), pad_multiple) - len(s) for s in samples]
    total = sum(len(s) for s in samples) + sum(pads)
    pads[-1] += padded_length(total, pack_multiple) - total
    ids, media, labels, positions, bounds, sources = [], [], [], [], [0], []
    media_before = 0
    for sample, pad in zip(samples, pads, strict=True):
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
        sources += sample.frames
    num_frames = sum(len(source) for source in sources)
    mine = frame_block(num_frames, sp_rank, sp_size)
    return Batch(
        input_ids=torch.cat(ids),
        media_index=torch.cat(media),
        labels=torch.cat(labels),
        position_ids=torch.cat(positions),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int64),
        frames=load_frames(sources, mine.start, mine.stop),
        num_frames=num_frames,
        frame_offset=mine.start,
    )


def collate(
    samples: Sequence[Sample],
    *,
    micro_batch_size: int,
    max_length: int,
    pad_id: int,
    pad_multiple: int,
    pack_multiple: int | None = None,
    sp_rank: int = 0,
    sp_size: int = 1,
) -> list[Batch]:
    """Pack `samples`, in order, into as few micro-batches as greedy packing gives (padded and
    holding frames as `pack` says; `max_length` a multiple of `pack_multiple`)."""
    lengths = [padded_length(len(s), pad_multiple) for s in samples]
    groups = plan_micro_batches(lengths, micro_batch_size, max_length)
    return [
        pack(
            [samples[i] for i in group],
            pad_id,
            pad_multiple,
            pack_multiple=pack_multiple,
            sp_rank=sp_rank,
            sp_size=sp_size,
        )
        for group in groups
    ]
