"""The layout of a sample: media placeholders expanded into frame tokens, labels shifted once.

Each media placeholder becomes, for every frame of its media (an image is one frame),
`tokens_per_frame` media positions followed by one "\\n" text token (REFERENCE 1: 197 tokens a
frame at 384 px). Media positions keep the placeholder id and carry `media_index = frame *
tokens_per_frame + token`; text positions carry -1. Labels are shifted here, on the whole sample,
before any sharding (REFERENCE 5.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from longvila_mcore.data.batch import IGNORE_INDEX
from longvila_mcore.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, newline_token_id, token_id


class Expanded(NamedTuple):
    """A sample after media expansion, all `[L]` tensors."""

    input_ids: torch.Tensor
    """int64 token ids; the placeholder id at media positions."""
    media_index: torch.Tensor
    """int64: -1 for text, else frame * tokens_per_frame + token (frames counted from 0)."""
    is_target: torch.Tensor
    """bool: the token is a target (never at media positions or the newline after a frame)."""


@dataclass(frozen=True)
class MediaLayout:
    """How media placeholders expand for one tokenizer and one vision tower + projector."""

    image_id: int
    video_id: int
    newline_id: int
    tokens_per_frame: int

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, tokens_per_frame: int
    ) -> MediaLayout:
        """The layout for `tokenizer` (which must hold the media tokens) and
        `ModelConfig.tokens_per_frame`."""
        return cls(
            image_id=token_id(tokenizer, IMAGE_TOKEN),
            video_id=token_id(tokenizer, VIDEO_TOKEN),
            newline_id=newline_token_id(tokenizer),
            tokens_per_frame=tokens_per_frame,
        )

    def expand(
        self,
        input_ids: Sequence[int],
        frames_per_media: Sequence[int],
        is_target: Sequence[bool] | None = None,
    ) -> Expanded:
        """Expand the i-th media placeholder of `input_ids` into `frames_per_media[i]` frames.

        Frames are numbered in order of appearance, so `media_index` indexes the concatenation
        of the media's frames. `is_target` (default: none) marks targets among `input_ids`.
        """
        ids = np.asarray(input_ids, dtype=np.int64)
        targets = np.zeros(len(ids), bool) if is_target is None else np.asarray(is_target, bool)
        is_media = (ids == self.image_id) | (ids == self.video_id)
        frames = np.asarray(frames_per_media, dtype=np.int64)
        if int(is_media.sum()) != len(frames):
            raise ValueError(
                f"{int(is_media.sum())} media placeholders in the tokens but frame counts for "
                f"{len(frames)} media were given; pass one frame count per placeholder"
            )
        if (frames < 1).any():
            raise ValueError(f"frames_per_media={frames.tolist()} must all be >= 1")
        per_frame = self.tokens_per_frame + 1
        lengths = np.ones(len(ids), np.int64)
        lengths[is_media] = frames * per_frame
        source = np.repeat(np.arange(len(ids)), lengths)
        offset = np.arange(len(source)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        # Frames of earlier media come first: the first global frame of each placeholder.
        first_frame = np.zeros(len(ids), np.int64)
        first_frame[is_media] = np.cumsum(frames) - frames
        at_media = is_media[source]
        frame = first_frame[source] + offset // per_frame
        token = offset % per_frame
        is_newline = at_media & (token == self.tokens_per_frame)
        is_frame_token = at_media & ~is_newline
        out_ids = np.where(is_newline, self.newline_id, ids[source])
        media_index = np.where(is_frame_token, frame * self.tokens_per_frame + token, -1)
        return Expanded(
            torch.from_numpy(out_ids),
            torch.from_numpy(media_index),
            torch.from_numpy(targets[source] & ~at_media),
        )


def shift_labels(input_ids: torch.Tensor, is_target: torch.Tensor) -> torch.Tensor:
    """Labels of one whole sample: at i the token at i + 1 if it is a target, else IGNORE_INDEX.

    The last position has no next token and is always IGNORE_INDEX.
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:-1] = torch.where(is_target[1:], input_ids[1:], IGNORE_INDEX)
    return labels
