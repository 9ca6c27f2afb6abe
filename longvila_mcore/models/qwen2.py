"""The Qwen2 decoder as a Megatron-Core GPTModel.

Qwen2 = GQA with q/k/v bias, no other linear bias, RMSNorm, SwiGLU MLP, RoPE (REFERENCE 1). The
only departure from `GPTModel.forward` is RoPE: Megatron derives positions from the sequence index,
while LongVILA needs each token's true position (packed samples restart at 0, and a
sequence-parallel shard holds two non-adjacent chunks), so `forward` takes `position_ids`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank

from longvila_mcore.config import LLMConfig
from longvila_mcore.models.recompute import DECODER_SELECTIVE, recompute_fields
from longvila_mcore.models.specs import transformer_layer_spec
from longvila_mcore.models.swiglu import SwiGLU
from longvila_mcore.parallel.core_attention import PackedSamples


def qwen2_transformer_config(
    llm: LLMConfig,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    recompute: str = "none",
    recompute_num_layers: int = 0,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """`initialize=False` leaves the weights unset, for a model that is loaded right after;
    `recompute` / `recompute_num_layers` as `train.*` (models/recompute.py);
    `sequence_parallel` is Megatron's, over the tensor-parallel ranks (tp > 1)."""
    return TransformerConfig(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_key_value_heads,
        ffn_hidden_size=llm.ffn_hidden_size,
        kv_channels=llm.hidden_size // llm.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=llm.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        # The MLP applies the module in its `activation_func` spec slot, our SwiGLU, to the whole
        # fc1 output (the flag is named for Transformer Engine's modules, the slot takes any).
        use_te_activation_func=True,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,  # of the activations sent between pipeline stages
        bf16=dtype == torch.bfloat16,
        # Weights are created on the CPU from one full-size draw and then split, so a model
        # initialises identically whatever its tensor-parallel size.
        use_cpu_initialization=True,
        perform_initialization=initialize,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # the default ("full") is deprecated and warns on every build
        **recompute_fields(
            recompute, recompute_num_layers, llm.num_layers // pp, DECODER_SELECTIVE
        ),
    )


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Embedding rows rounded up so tensor-parallel ranks hold equal slices."""
    return -(-vocab_size // tp) * tp


class SeededTransformerLayer(TransformerLayer):
    """A decoder layer whose random initial weights depend only on `init_seed` and its global
    layer number: a pipeline stage builds only its own layers, and every pipeline layout still
    starts from the same model. The default generator is left seeded for the layer, so what is
    drawn after the last layer (an untied output layer, on the last stage) is the same on every
    layout too."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1, **kwargs):
        init_seed = kwargs.pop("init_seed")
        if config.perform_initialization:
            pp_rank = get_pg_rank(kwargs["pg_collection"].pp)
            offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
            torch.manual_seed((init_seed * 1_000_003 + layer_number + offset) % 2**63)
        super().__init__(config, submodules, layer_number, **kwargs)


class Qwen2Model(GPTModel):
    """Qwen2 decoder. `forward` maps embeddings `[s, b, h]` and true positions to logits."""

    def __init__(
        self,
        llm: LLMConfig,
        config: TransformerConfig,
        backend,
        pre_process: bool = True,
        post_process: bool = True,
    ):
        layer_spec = transformer_layer_spec(
            backend, causal=True, sequence_parallel=True, mlp_activation=SwiGLU
        )
        layer_spec.module = SeededTransformerLayer
        layer_spec.params = {**layer_spec.params, "init_seed": torch.initial_seed()}
        super().__init__(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=padded_vocab_size(llm.vocab_size, config.tensor_model_parallel_size),
            max_sequence_length=llm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=llm.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=llm.rope_theta,
            seq_len_interpolation_factor=llm.rope_scaling_factor,
            # The embeddings are scattered over tensor-parallel ranks after the frames are
            # spliced in (`hidden_states`), not by the embedding layer.
            scatter_embedding_sequence_parallel=False,
        )
        if post_process:
            # `logits` runs on the gathered hidden states at target positions only, which a
            # sequence-parallel output layer (it all-gathers its input itself) cannot take.
            self.output_layer.sequence_parallel = False
        self.true_vocab_size = llm.vocab_size

    def setup_embeddings_and_output_layer(self) -> None:
        """Megatron's set-up of the embedding and output layer, run at the end of `__init__`:
        with tied embeddings and pp > 1 it copies the first stage's embedding to the last stage
        by an all-reduce. A model on the meta device (an uninitialised model's twin that only
        lends its tensor-parallel marks, longvila.py) has no values to copy and skips it, on
        every stage alike."""
        if not any(p.is_meta for p in self.parameters()):
            super().setup_embeddings_and_output_layer()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[s, b, h]` of `input_ids` `[b, s]`."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def rotary_freqs(self, position_ids: torch.Tensor) -> torch.Tensor:
        """RoPE angles `[s, b, 1, head_dim]` for each token's position (`[b, s]`)."""
        rope = self.rotary_pos_emb
        positions = position_ids.t().to(torch.float32)
        if rope.seq_len_interpolation_factor is not None:
            positions = positions / rope.seq_len_interpolation_factor
        freqs = positions[..., None] * rope.inv_freq.to(positions.device)
        return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]

    def hidden_states(
        self,
        decoder_input: torch.Tensor | None,
        position_ids: torch.Tensor,
        packed: PackedSamples | None = None,
    ) -> torch.Tensor:
        """Decoder layers (and the final norm on the last pipeline stage) over `[s, b, h]`.

        `decoder_input` is None on later pipeline stages, which read their input from the
        previous stage (`set_input_tensor`). With Megatron's sequence parallelism the layers
        run on this tensor-parallel rank's 1/tp of the tokens: the input is split here and the
        last stage's output gathered, so the result is `[s, b, h]` on the last stage (and the
        `[s / tp, b, h]` sent on to the next stage on the others).
        """
        sequence_parallel = self.config.sequence_parallel
        if decoder_input is not None and sequence_parallel:
            decoder_input = scatter_to_sequence_parallel_region(decoder_input)
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=None,
            rotary_pos_emb=self.rotary_freqs(position_ids),
            packed_seq_params=packed,
        )
        if self.post_process and sequence_parallel:
            # Backward: each rank keeps its slice of the gradient, which the output layer
            # already summed over the vocabulary slices of the tensor-parallel ranks.
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the logits `[s, b, V / tp]`; padding columns beyond
        the true vocabulary are -inf."""
        tied = self.share_embeddings_and_output_weights
        weight = self.shared_embedding_or_output_weight() if tied else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return self._mask_vocab_padding(logits)

    def forward(
        self,
        decoder_input: torch.Tensor | None,
        position_ids: torch.Tensor,
        packed: PackedSamples | None = None,
    ) -> torch.Tensor:
        """Logits on the last pipeline stage, hidden states on the others."""
        hidden = self.hidden_states(decoder_input, position_ids, packed)
        return self.logits(hidden) if self.post_process else hidden

    def _mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        per_rank = logits.shape[-1]
        first = self.pg_collection.tp.rank() * per_rank
        valid = self.true_vocab_size - first
        if valid >= per_rank:
            return logits
        padding = torch.arange(max(valid, 0), per_rank, device=logits.device)
        return logits.index_fill(-1, padding, float("-inf"))
