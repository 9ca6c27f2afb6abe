"""Image-first sharding of a multi-modal sequence over the sequence-parallel ranks (REFERENCE 4).

Stage 1: frames are split into N contiguous blocks of ceil(F / N); each rank runs the vision tower
and projector (`encode`) on its block only. The last blocks are padded with zero frames, never
truncated, so every rank encodes the same shape (padding outputs are discarded, so they get no
gradient). With F = 0 nothing is encoded.

Stage 2: each rank receives exactly the frame-token embeddings that fall in its own token shard
(`SequenceParallel.shard` order) through a variable-size all-to-all, autograd-aware, so gradients
return to the rank that encoded the frame; it embeds its own text tokens and assembles its
`[S/N, hidden]` shard. Only the integer layout (`media_index`, S entries) is global: no rank holds
more than S/N token embeddings plus its own ceil(F / N) frames' features.

Every rank of the group calls `embed` with the same integer layout and the frames it encodes, or
any range of frames around them (the Batch contract: `Batch.frames`, `num_frames`, `frame_offset`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from longvila_mcore.data.batch import frame_block
from longvila_mcore.parallel.attention_2d import CuSeqlens, SequenceParallel
from longvila_mcore.parallel.collectives import all_to_all_variable


class ImageFirstSharder:
    """Stage 1 (frames over ranks) and stage 2 (token shard assembly) for one `sp` group."""

    def __init__(self, sp: SequenceParallel):
        self.sp = sp

    def frames_per_rank(self, num_frames: int) -> int:
        return -(-num_frames // self.sp.size)

    def frame_slice(self, num_frames: int) -> slice:
        """The frames this rank encodes: a contiguous block of at most ceil(F / N)."""
        block = frame_block(num_frames, self.sp.rank, self.sp.size)
        return slice(block.start, block.stop)

    def embed(
        self,
        input_ids: torch.Tensor,
        media_index: torch.Tensor,
        frames: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor],
        embed_tokens: Callable[[torch.Tensor], torch.Tensor],
        tokens_per_frame: int,
        cu_seqlens: CuSeqlens = None,
        num_frames: int | None = None,
        frame_offset: int = 0,
    ) -> torch.Tensor:
        """This rank's `[S/N, hidden]` input embeddings, in `sp.shard(..., cu_seqlens)` order.

        `input_ids`, `media_index` `[S]` (global, Batch contract); `frames` `[f, 3, H, W]` the
        global frames `frame_offset` to `frame_offset + f` of the pack's `num_frames` (default:
        all of them), holding at least this rank's `frame_slice`; `encode(frames [f, ...]) ->
        [f, tokens_per_frame, hidden]`; `embed_tokens(ids [n]) -> [n, hidden]`; `cu_seqlens`
        the global sample boundaries (None: one sample).
        """
        sp, n = self.sp, self.sp.size
        total = input_ids.shape[0]
        if num_frames is None:
            num_frames = frames.shape[0]
        media_tokens = num_frames * tokens_per_frame
        if media_index.shape != input_ids.shape or int(media_index.max()) >= media_tokens:
            raise ValueError(
                f"media_index {tuple(media_index.shape)} must match input_ids "
                f"{tuple(input_ids.shape)} and index the {num_frames} frames x "
                f"{tokens_per_frame} tokens"
            )
        local = total // n
        order = sp.order(total, cu_seqlens).to(media_index.device)
        mine = order[sp.rank * local : (sp.rank + 1) * local]
        # Row j: the media indices of SP rank j's shard, in its order.
        media = media_index[order].view(n, local)
        is_media = media[sp.rank] >= 0
        text_pos = (~is_media).nonzero().squeeze(1)
        text = embed_tokens(input_ids[mine[text_pos]])
        if num_frames == 0:
            return text
        features = self._encode_block(frames, num_frames, frame_offset, encode, tokens_per_frame)
        rows_per_rank = features.shape[0]
        owner = torch.where(media >= 0, media // rows_per_rank, -1)
        # To each rank, in its shard order, the media tokens of the frames this rank encoded.
        to_send = owner == sp.rank
        send_rows = media[to_send] - sp.rank * rows_per_rank
        my_owners = owner[sp.rank][is_media]
        received = all_to_all_variable(
            features.index_select(0, send_rows),
            to_send.sum(1).tolist(),
            torch.bincount(my_owners, minlength=n).tolist(),
            sp.groups.sp,
        )
        # The rows received come grouped by source rank, each group in shard order.
        media_pos = is_media.nonzero().squeeze(1)[torch.sort(my_owners, stable=True).indices]
        placement = torch.cat([text_pos, media_pos])
        rows = torch.cat([text, received.to(text.dtype)])
        return rows.index_select(0, torch.argsort(placement))

    def _encode_block(
        self,
        frames: torch.Tensor,
        num_frames: int,
        frame_offset: int,
        encode: Callable[[torch.Tensor], torch.Tensor],
        tokens_per_frame: int,
    ) -> torch.Tensor:
        """This rank's frames, zero-padded to ceil(F / N), encoded: `[ceil(F/N) * tpf, hidden]`."""
        mine = self.frame_slice(num_frames)
        start, stop = mine.start - frame_offset, mine.stop - frame_offset
        if start < 0 or stop > frames.shape[0]:
            raise ValueError(
                f"sequence-parallel rank {self.sp.rank} encodes frames {mine.start}:{mine.stop} "
                f"of {num_frames}, but was given frames {frame_offset}:"
                f"{frame_offset + frames.shape[0]}; pass Batch.frames_of(rank, size)'s frames"
            )
        block = frames[start:stop]
        missing = self.frames_per_rank(num_frames) - block.shape[0]
        if missing:
            block = torch.cat([block, block.new_zeros((missing, *block.shape[1:]))])
        features = encode(block)
        if features.shape[:2] != (block.shape[0], tokens_per_frame):
            raise ValueError(
                f"encode returned {tuple(features.shape)} for {block.shape[0]} frames; expected "
                f"[{block.shape[0]}, tokens_per_frame={tokens_per_frame}, hidden]"
            )
        return features.flatten(0, 1)
