"""LongVILA's needle scoring: the answer is teacher-forced after the question, and a needle counts
as found when every answer token is the argmax of the logits before it.

It is one prefill, no decoding, so it runs through the model's sequence-parallel forward (the
image-first sharder and the 2D attention) as training does: each rank holds its shard of the
sequence and encodes only its block of frames. The haystack's frames are encoded once per
haystack and reused for every depth and needle (`FrameCache`, the model's `encode` hook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import PreTrainedTokenizerBase

from longvila_mcore.data.batch import IGNORE_INDEX, Batch
from longvila_mcore.data.chat import render_prompt
from longvila_mcore.data.layout import MediaLayout, shift_labels
from longvila_mcore.data.packing import pack
from longvila_mcore.data.samples import Sample
from longvila_mcore.models.longvila import LongVILAModel


class FrameCache:
    """Projector tokens of a haystack's frames and of the needles, each encoded at most once.

    Frames are named by id: haystack frame i is i, needle k is `len(haystack) + k`. `encode`
    takes a block of ids (the model's `encode` hook: the sharder hands each rank its block) and
    encodes only the ids it has not seen, so a rank encodes about its own share of the haystack.
    """

    def __init__(self, model: LongVILAModel, haystack: torch.Tensor, needles: torch.Tensor):
        self.model = model
        self.pixels = torch.cat([haystack, needles])
        self.num_haystack = haystack.shape[0]
        self.tokens: dict[int, torch.Tensor] = {}
        self.encoded = 0
        """Frames encoded so far (each id once)."""

    def frame_ids(self, depth: float, needle: int) -> torch.Tensor:
        """Ids of the haystack with needle `needle` inserted at `depth` (0: before the first
        frame, 1: after the last) - LongVILA's insertion at `round(depth x frames)`."""
        at = round(depth * self.num_haystack)
        ids = torch.arange(self.num_haystack)
        return torch.cat([ids[:at], torch.tensor([self.num_haystack + needle]), ids[at:]])

    @torch.no_grad()
    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        missing = sorted({int(i) for i in ids} - self.tokens.keys())
        if missing:
            device = next(self.model.parameters()).device
            new = self.model.encode_frames(self.pixels[missing].to(device))
            self.tokens.update(zip(missing, new, strict=True))
            self.encoded += len(missing)
        return torch.stack([self.tokens[int(i)] for i in ids])


def teacher_forced_batch(
    tokenizer: PreTrainedTokenizerBase,
    layout: MediaLayout,
    question: str,
    answer_ids: list[int],
    frames: torch.Tensor,
    pad_multiple: int,
) -> Batch:
    """The question about a video of `frames` (`[F, ...]`: pixels, or ids for a FrameCache)
    followed by the answer's tokens (`encode_text(tokenizer, answer)`), the only labels; padded
    to `pad_multiple`."""
    prompt = render_prompt(tokenizer, question, ("video",))
    targets = [False] * len(prompt) + [True] * len(answer_ids)
    expanded = layout.expand(prompt + answer_ids, [frames.shape[0]], targets)
    sample = Sample(
        "needle",
        expanded.input_ids,
        expanded.media_index,
        shift_labels(expanded.input_ids, expanded.is_target),
        frames,
    )
    return pack([sample], tokenizer.pad_token_id, pad_multiple)


class Score(NamedTuple):
    found: bool
    """Every answer token is the argmax of the logits before it (LongVILA's criterion)."""
    logprob: float
    """The answer's log-likelihood: the sum of its tokens' log-probabilities (a margin to read
    beside `found`, and a number the sequence-parallel run must reproduce)."""


@torch.no_grad()
def score_answer(
    model: LongVILAModel,
    batch: Batch,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Score:
    """Score the labels of `batch` (`teacher_forced_batch`) over the whole sequence: every rank
    of the sequence-parallel group calls it with the same batch and gets the same score."""
    model.eval()
    hidden = model.hidden_states(batch, encode)
    labels = model.sp.shard(batch.labels, cu_seqlens=batch.cu_seqlens).to(hidden.device)
    is_target = labels != IGNORE_INDEX
    logits = gather_from_tensor_model_parallel_region(model.llm.logits(hidden[is_target]))
    logits = logits[:, 0, : model.llm.true_vocab_size].double()
    answer = labels[is_target]
    wrong = (logits.argmax(-1) != answer).sum().double()
    logprob = logits.log_softmax(-1).gather(1, answer[:, None]).sum()
    totals = torch.stack([wrong, logprob])
    if model.sp.size > 1:
        dist.all_reduce(totals, group=model.sp.groups.sp)
    return Score(found=int(totals[0]) == 0, logprob=float(totals[1]))
