"""The composed LongVILA model: frames -> SigLIP tower -> projector -> Qwen2 decoder.

Frame features are spliced into the token sequence at the media positions the data pipeline laid
out (`Batch.media_index`). The image-first sharder does the splicing for every layout: with one
sequence-parallel rank it encodes all frames and fills the whole sequence; with N ranks each rank
encodes its share of the frames and receives exactly the embeddings of its own token shard.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.enums import ModelType
from megatron.core.tensor_parallel import (
    copy_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)
from megatron.core.transformer.module import MegatronModule

from longvila_mcore.config import ModelConfig, ParallelConfig
from longvila_mcore.data.batch import IGNORE_INDEX, Batch
from longvila_mcore.models.projector import build_projector
from longvila_mcore.models.qwen2 import Qwen2Model, qwen2_transformer_config
from longvila_mcore.models.siglip import SiglipVisionTower, siglip_transformer_config
from longvila_mcore.parallel import init_sequence_parallel
from longvila_mcore.parallel.core_attention import PackedSamples
from longvila_mcore.parallel.sharder import ImageFirstSharder
from longvila_mcore.runtime import spec_backend


class LongVILAModel(MegatronModule):
    """Tower and projector (first pipeline stage), decoder, and the sharder that joins them."""

    model_type = ModelType.encoder_or_decoder  # what Megatron's schedules ask of a model

    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelConfig,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        pre_process: bool = True,
        post_process: bool = True,
        initialize: bool = True,
        recompute: str = "none",
        recompute_num_layers: int = 0,
    ):
        """`initialize=False` skips the random initialisation of the Megatron layers (their
        weights are left unset), for a model filled from a checkpoint right away: a 7B model
        would otherwise draw every weight in fp32 first. `recompute` and `recompute_num_layers`
        are `train.*`'s activation recomputation, for the decoder and the tower alike
        (models/recompute.py)."""
        parallel.check_model(cfg)
        recompute_args = (recompute, recompute_num_layers)
        llm_config = qwen2_transformer_config(
            cfg.llm,
            parallel.tp,
            parallel.pp,
            dtype,
            initialize,
            *recompute_args,
            sequence_parallel=parallel.tp_sequence_parallel,
        )
        super().__init__(config=llm_config)
        self.cfg = cfg
        backend = spec_backend(device)
        if pre_process:
            tower_config = siglip_transformer_config(
                cfg.vision, parallel.tp, dtype, initialize, *recompute_args
            )
            self.vision_tower = SiglipVisionTower(cfg.vision, tower_config, backend)
            self.mm_projector = build_projector(cfg, dtype)
        self.llm = Qwen2Model(cfg.llm, llm_config, backend, pre_process, post_process)
        self.pre_process, self.post_process = pre_process, post_process
        self.sp = init_sequence_parallel(parallel.ulysses, parallel.ring)
        self.sharder = ImageFirstSharder(self.sp)
        if not initialize:
            self._mark_tensor_parallel(cfg, parallel, device, dtype)

    def _mark_tensor_parallel(
        self, cfg: ModelConfig, parallel: ParallelConfig, device: torch.device, dtype: torch.dtype
    ) -> None:
        """Megatron marks how a weight is split over tensor-parallel ranks (`partition_dim`,
        `partition_stride`) only while it initialises it. An uninitialised model takes the marks
        from an initialised twin on the meta device, where initialising computes nothing."""
        with torch.device("meta"):
            twin = LongVILAModel(cfg, parallel, device, dtype, self.pre_process, self.post_process)
        for param, marked in zip(self.parameters(), twin.parameters(), strict=True):
            copy_tensor_model_parallel_attributes(param, marked)

    def set_input_tensor(self, input_tensor: list[torch.Tensor | None]) -> None:
        """The previous pipeline stage's output (Megatron's schedules call this every step)."""
        self.llm.set_input_tensor(input_tensor)

    # `finalize_model_grads` finds the model by its `pre_process` attribute, this one, and asks
    # it for the tied embedding whose gradient it sums over the first and last pipeline stages.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.llm.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.llm.shared_embedding_or_output_weight()

    def set_trainable(self, vision_tower: bool, mm_projector: bool, llm: bool) -> None:
        """Freeze or unfreeze each part (the tower's unused layers always stay frozen)."""
        if self.pre_process:
            self.vision_tower.set_trainable(vision_tower)
            self.mm_projector.requires_grad_(mm_projector)
        self.llm.requires_grad_(llm)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Projector tokens `[f, tokens_per_frame, hidden]` of frames `[f, 3, H, W]`."""
        return self.mm_projector(self.vision_tower(frames))

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed(ids[None]).squeeze(1)

    def embed(
        self, batch: Batch, encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """This rank's shard of the input embeddings `[s / N, 1, hidden]`, frames spliced in
        (None on later pipeline stages).

        `encode` replaces `encode_frames` on this rank's block of `batch.frames` (any per-frame
        tensor it understands, e.g. ids of frames whose tokens it has cached; the sharder pads a
        block with zeros): the needle evaluation encodes a haystack once for every depth."""
        if not self.pre_process:
            return None
        embeddings = self.sharder.embed(
            batch.input_ids,
            batch.media_index,
            batch.frames,
            encode or self.encode_frames,
            self._embed_tokens,
            self.cfg.tokens_per_frame,
            batch.cu_seqlens,
            batch.num_frames,
            batch.frame_offset,
        )
        if batch.num_frames == 0 and torch.is_grad_enabled() and self._encoder_trains():
            # Megatron's overlapped gradient reduction waits, from the second step on, for the
            # gradients of every parameter that had one on the first: a text-only micro-batch
            # gives the tower and projector theirs too (zeros, from one blank frame).
            size = self.cfg.vision.image_size
            blank = embeddings.new_zeros(1, 3, size, size)
            embeddings = embeddings + 0.0 * self.encode_frames(blank).sum()
        return embeddings.unsqueeze(1)

    def _encoder_trains(self) -> bool:
        encoder = (self.vision_tower, self.mm_projector)
        return any(p.requires_grad for module in encoder for p in module.parameters())

    def hidden_states(
        self, batch: Batch, encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """This rank's decoder output `[s / N, 1, hidden]` (after the final norm on the last
        pipeline stage); `encode` as in `embed`."""
        positions = self.sp.shard(batch.position_ids, cu_seqlens=batch.cu_seqlens).unsqueeze(0)
        packed = PackedSamples(boundaries=tuple(batch.cu_seqlens.tolist()))
        return self.llm.hidden_states(self.embed(batch, encode), positions, packed)

    def forward(self, batch: Batch) -> torch.Tensor:
        """This rank's logits `[s / N, 1, vocab / tp]` for its shard of the packed sequence
        (hidden states on pipeline stages before the last)."""
        hidden = self.hidden_states(batch)
        return self.llm.logits(hidden) if self.post_process else hidden

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of targets) over this rank's shard.

        Logits are computed at target positions only: in a video sample most tokens are frame
        tokens without a target, and the output layer is the largest matmul per token
        (vocabulary x hidden: 152k x 3584 for the 7B model), its logits the largest activation.
        The caller divides by the target count of the whole global batch, so the loss is the mean
        over every target token whatever the layout and accumulation (REFERENCE 5.4).
        """
        hidden = self.hidden_states(batch)
        labels = self.sp.shard(batch.labels, cu_seqlens=batch.cu_seqlens)
        is_target = labels != IGNORE_INDEX
        logits = self.llm.logits(hidden[is_target])
        losses = vocab_parallel_cross_entropy(logits.float(), labels[is_target].unsqueeze(1))
        return losses.sum(), is_target.sum()
