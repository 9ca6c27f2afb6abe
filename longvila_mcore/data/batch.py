"""The micro-batch the data pipeline hands to the model: packed samples on one row."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100
"""Label of positions that are not targets (prompt, media, padding, last token of a sample)."""


@dataclass
class Batch:
    """Samples packed back to back into one sequence of S positions.

    Every rank of a sequence-parallel group holds the same full `Batch`; the model takes its
    shard. Each sample's length is a multiple of 2 x ulysses x ring (padding at its end), and
    `cu_seqlens` marks where samples begin and end.
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
    """`[F, 3, H, W]` float32 frames (video frames and images) normalised for the tower."""

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def most_frames(self) -> int:
        """The most frames any one packed sample holds (0 without media): a video sample's
        length, the number of pictures of an interleaved one."""
        is_media = self.media_index >= 0
        if not is_media.any():
            return 0
        tokens_per_frame = int(is_media.sum()) // self.frames.shape[0]
        sample = torch.bucketize(torch.nonzero(is_media).squeeze(1), self.cu_seqlens, right=True)
        return int(torch.bincount(sample).max()) // tokens_per_frame

    def to(self, device: torch.device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})
