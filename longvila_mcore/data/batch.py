"""The micro-batch the data pipeline hands to the model: packed samples on one row."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

IGNORE_INDEX = -100
"""Label of positions that are not targets (prompt, media, padding, last token of a sample)."""


@dataclass
class Batch:
    """Samples packed back to back into one sequence of S positions.

    The contract between the data pipeline and the model: every rank of a sequence-parallel
    group holds the same integer layout (`input_ids`, `media_index`, `labels`, `position_ids`,
    `cu_seqlens`, all S long, and the pack's frame count `num_frames`) and only the frames it
    encodes, `frames` = global frames `frame_offset` .. `frame_offset + len(frames)` (the block
    `frame_block` gives the rank); the model takes its token shard. A batch holding all its
    frames (`frame_offset` 0, `num_frames` left out) serves any rank. Each sample's length is a
    multiple of 2 x ulysses x ring (padding at its end), and `cu_seqlens` marks where samples
    begin and end.
    """

    input_ids: torch.Tensor
    """`[S]` int64 token ids; at media positions the media placeholder id (its embedding is
    replaced by the frame token's features)."""
    media_index: torch.Tensor
    """`[S]` int64: -1 for text, else `frame * tokens_per_frame + token`, an index into the
    projector output of `frames` flattened to `[F * tokens_per_frame, hidden]`."""
    labels: torch.Tensor
    """`[S]` int64 targets, already shifted: the label at i is the token at i + 1 of the same
    sample when that token is a target (assistant reply), else IGNORE_INDEX."""
    position_ids: torch.Tensor
    """`[S]` int64 RoPE position of each token within its sample (restarts at 0)."""
    cu_seqlens: torch.Tensor
    """`[n + 1]` int64 sample boundaries: 0, end of sample 0, ..., S."""
    frames: torch.Tensor
    """`[f, 3, H, W]` float32 frames (video frames and images) normalised for the tower: global
    frames `frame_offset` to `frame_offset + f` of the pack's `num_frames`."""
    num_frames: int | None = None
    """F, the frames of the whole pack (`media_index` indexes F x tokens_per_frame tokens);
    None: `frames` holds them all."""
    frame_offset: int = 0
    """The global index of `frames[0]`."""

    def __post_init__(self) -> None:
        if self.num_frames is None:
            self.num_frames = self.frames.shape[0]
        if not 0 <= self.frame_offset <= self.frame_offset + len(self.frames) <= self.num_frames:
            raise ValueError(
                f"frames {self.frame_offset} to {self.frame_offset + len(self.frames)} are not "
                f"among the pack's num_frames={self.num_frames}"
            )

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def frames_of(self, rank: int, size: int) -> Batch:
        """This batch holding only the frames sequence-parallel rank `rank` of `size` encodes
        (from a batch holding at least those)."""
        block = frame_block(self.num_frames, rank, size)
        start, stop = block.start - self.frame_offset, block.stop - self.frame_offset
        if start < 0 or stop > len(self.frames):
            raise ValueError(
                f"rank {rank} of {size} encodes frames {block.start}:{block.stop}, but this "
                f"batch holds {self.frame_offset}:{self.frame_offset + len(self.frames)}"
            )
        return replace(self, frames=self.frames[start:stop], frame_offset=block.start)

    def most_frames(self) -> int:
        """The most frames any one packed sample holds (0 without media): a video sample's
        length, the number of pictures of an interleaved one."""
        is_media = self.media_index >= 0
        if not is_media.any():
            return 0
        tokens_per_frame = int(is_media.sum()) // self.num_frames
        sample = torch.bucketize(torch.nonzero(is_media).squeeze(1), self.cu_seqlens, right=True)
        return int(torch.bincount(sample).max()) // tokens_per_frame

    def to(self, device: torch.device) -> Batch:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )


def frame_block(num_frames: int, rank: int, size: int) -> range:
    """The frames sequence-parallel rank `rank` of `size` encodes: the contiguous block `rank`
    of ceil(F / N) frames (shorter or empty at the end when N does not divide F)."""
    per = -(-num_frames // size)
    start = min(rank * per, num_frames)
    return range(start, min(start + per, num_frames))
