"""A prompt prefix (the media and the text around them) prefilled once, then answered about.

The prefix goes through the model's sequence-parallel forward, as in training: the image-first
sharder (each rank encodes only its block of frames), the 2D Ulysses x ring attention, and every
decoder layer keeps its shard of the keys and values (`parallel.kv_cache`). Each question then
extends the prefix with its text and decodes one token at a time against the sharded cache; the
cache is rewound to the prefix afterwards, so several questions about one video encode it once.
With one rank it is plain KV-cache generation (the same code, a group of one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from longvila_mcore.data.batch import IGNORE_INDEX, Batch
from longvila_mcore.errors import ConfigError
from longvila_mcore.inference.sampling import Sampler, TextStream
from longvila_mcore.models.longvila import LongVILAModel
from longvila_mcore.parallel.kv_cache import ShardedKVCache


def prompt_multiple(ulysses: int, ring: int) -> int:
    """What a prompt is padded to for the sequence-parallel forward: the pack a multiple of
    U x R, and with a ring its one sample a multiple of 2R."""
    return math.lcm(2 * ring, ulysses * ring) if ring > 1 else ulysses


class Session:
    """The KV cache of one prefilled prefix `input_ids` / `media_index` `[P]` reading `frames`
    (or, with `encode`, any per-frame tensor it understands, as `LongVILAModel.embed`): the
    global frames `frame_offset` .. of the prompt's `num_frames` (default: all of them), at
    least those this rank encodes (the Batch contract). Every rank of the model's groups builds
    it with the same prompt; use it as a context manager (the cache is detached from the model
    on exit)."""

    @torch.no_grad()
    def __init__(
        self,
        model: LongVILAModel,
        input_ids: torch.Tensor,
        media_index: torch.Tensor,
        frames: torch.Tensor,
        pad_id: int,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_frames: int | None = None,
        frame_offset: int = 0,
    ):
        if model.llm.config.sequence_parallel:
            raise ConfigError(
                "generation feeds one token at a time, which Megatron's sequence parallelism "
                "cannot split over the tensor-parallel ranks: build the model with "
                "ParallelConfig(sequence_parallel=False)"
            )
        model.eval()
        self.model, self.llm, self.sp = model, model.llm, model.sp
        self.device = next(model.parameters()).device
        layers = self.llm.decoder.layers
        self.cache = ShardedKVCache(len(layers), self.sp.groups.sp if self.sp.size > 1 else None)
        self.attentions = [layer.self_attention.core_attention for layer in layers]
        for i, attention in enumerate(self.attentions):
            attention.kv_cache = self.cache.layer(i)
        self.length = int(input_ids.shape[0])
        frames_of = {"num_frames": num_frames, "frame_offset": frame_offset}
        self.last_hidden = self._prefill(input_ids, media_index, frames, frames_of, pad_id, encode)
        self.prefix_sizes = list(self.cache.sizes)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        for attention in self.attentions:
            attention.kv_cache = None

    def _prefill(self, input_ids, media_index, frames, frames_of, pad_id, encode) -> torch.Tensor:
        """Cache the prefix's keys / values where they are computed; the last token's hidden
        state `[1, 1, h]` on every rank."""
        length = self.length
        padded = -(-length // prompt_multiple(self.sp.ulysses, self.sp.ring))
        padded *= prompt_multiple(self.sp.ulysses, self.sp.ring)
        pad = padded - length
        batch = Batch(
            input_ids=torch.cat([input_ids, input_ids.new_full((pad,), pad_id)]),
            media_index=torch.cat([media_index, media_index.new_full((pad,), -1)]),
            labels=torch.full((padded,), IGNORE_INDEX),
            position_ids=torch.arange(padded),
            cu_seqlens=torch.tensor([0, padded]),
            frames=frames,
            **frames_of,
        ).to(self.device)
        positions = self.sp.shard(batch.position_ids, cu_seqlens=batch.cu_seqlens)
        self.cache.prefill(positions, positions < length)
        hidden = self.model.hidden_states(batch, encode)
        last = hidden[positions == length - 1]  # [1, 1, h] on the rank holding it, else empty
        if self.sp.size == 1:
            return last
        if not len(last):
            last = hidden.new_zeros((1, *hidden.shape[1:]))
        dist.all_reduce(last, group=self.sp.groups.sp)
        return last

    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Feed new tokens at positions start, start + 1, ...; the last one's hidden state."""
        positions = torch.arange(start, start + len(ids), device=self.device)
        self.cache.extend(positions)
        embeddings = self.llm.embed(torch.tensor([ids], device=self.device))
        return self.llm.hidden_states(embeddings, positions[None])[-1:]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = gather_from_tensor_model_parallel_region(self.llm.logits(hidden))
        return logits[-1, 0, : self.llm.true_vocab_size]

    @torch.no_grad()
    def answer(
        self,
        question_ids: list[int],
        max_new_tokens: int,
        stop_id: int,
        sampler: Sampler | None = None,
        stream: TextStream | None = None,
    ) -> list[int]:
        """The tokens generated after the prefix and `question_ids` (text only), up to
        `max_new_tokens`, `stop_id` (included) or a stop string of `stream` (the token that
        completes it included); the cache is then rewound to the prefix."""
        sampler = sampler or Sampler()
        position = self.length
        try:
            hidden = self._forward(question_ids, position) if question_ids else self.last_hidden
            position += len(question_ids)
            tokens: list[int] = []
            for _ in range(max_new_tokens):
                tokens.append(sampler(self._logits(hidden)))
                if tokens[-1] == stop_id or (stream is not None and stream.push(tokens)):
                    break
                hidden = self._forward(tokens[-1:], position)
                position += 1
        finally:
            self.cache.truncate(self.prefix_sizes)
        return tokens
