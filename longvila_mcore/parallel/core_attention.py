"""The module in Megatron's `core_attention` slot, for the decoder and the vision tower.

Megatron calls it with q/k/v `[s, b, heads, head_dim]` (RoPE already applied) and expects
`[s, b, heads * head_dim]` back. Packed samples arrive as `PackedSamples` in `packed_seq_params`
and never attend to each other. During generation each decoder layer's module holds its view of
the sharded KV cache (`parallel.kv_cache`): it keeps the prompt's keys and values, then attends
new tokens to every rank's entries.

With `sequence_parallel=True` (the decoder) and a context-parallel group of N > 1 ranks, q/k/v
are this rank's shard (`SequenceParallel.shard` order) and attention is the 2D Ulysses x ring
attention over Megatron's hierarchical context-parallel groups; `boundaries` stay global.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from longvila_mcore.parallel.attention_2d import SequenceParallel, check_heads
from longvila_mcore.parallel.groups import megatron_groups
from longvila_mcore.parallel.kv_cache import LayerKV
from longvila_mcore.parallel.local_attention import local_attention
from longvila_mcore.parallel.ring import fold_batch


@dataclass
class PackedSamples(PackedSeqParams):
    """Boundaries of the samples packed into a sequence (global positions, n + 1 entries).

    Megatron's tensors stay in "sbhd" layout; only our core attention reads `boundaries`.
    """

    boundaries: tuple[int, ...] = ()

    def __post_init__(self):
        self.qkv_format = "sbhd"
        self.boundaries = tuple(int(b) for b in self.boundaries)


class CoreAttention(MegatronModule):
    """Attention over packed samples: causal for the decoder, bidirectional for the tower."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        sequence_parallel: bool = False,
    ):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout} is not supported (LongVILA trains without it); set 0"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"unsupported attention mask type {attn_mask_type}")
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale
        self.kv_cache: LayerKV | None = None
        self.sp = _sequence_parallel(config, pg_collection) if sequence_parallel else None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("CoreAttention takes sample boundaries (PackedSamples), not masks")
        sq, b, hq, d = query.shape
        if self.kv_cache is not None:
            if self.kv_cache.decoding:
                scale = d**-0.5 if self.softmax_scale is None else self.softmax_scale
                return self.kv_cache.attend(query, key, value, scale).reshape(sq, b, hq * d)
            self.kv_cache.store(key, value)
        packed = isinstance(packed_seq_params, PackedSamples) and packed_seq_params.boundaries
        if self.sp is not None:
            bounds = packed_seq_params.boundaries if packed else None
            out = self.sp.attention(query, key, value, bounds, self.softmax_scale)
            return out.reshape(sq, b, hq * d)
        bounds = list(packed_seq_params.boundaries) if packed else [0, sq]
        # Batch rows become further packed samples.
        cu = [r * sq + x for r in range(b) for x in bounds[:-1]] + [b * sq]
        out = local_attention(
            fold_batch(query),
            fold_batch(key),
            fold_batch(value),
            cu,
            cu,
            self.causal,
            self.softmax_scale,
        )
        if b == 1:
            return out.view(sq, 1, hq * d)
        return out.view(b, sq, hq * d).transpose(0, 1).contiguous()


def _sequence_parallel(config: TransformerConfig, pg_collection) -> SequenceParallel | None:
    """The 2D attention over Megatron's context-parallel groups, or None when there is one rank."""
    if pg_collection is None:
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups(
            required_pgs=["tp", "cp", "hcp"]
        )
    groups = megatron_groups(pg_collection.cp, getattr(pg_collection, "hcp", None))
    if groups.size == 1:
        return None
    check_heads(config.num_attention_heads // pg_collection.tp.size(), groups.ulysses.size())
    return SequenceParallel(groups)
