"""The SigLIP vision tower as Megatron-Core modules.

Conv patch embedding (with bias) + learned position embedding, then a Megatron `TransformerBlock`
of pre-norm LayerNorm layers with GELU (tanh) MLPs and bidirectional attention (REFERENCE 1).
LongVILA feeds the projector with the output of layer `vision.num_used_layers` (HF
`hidden_states[select_layer]`), so the layers after it, the post-LayerNorm and the optional pooling
head never run: they are held, frozen, only so that an HF checkpoint loads and exports
bit-identically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from longvila_mcore.config import VisionConfig
from longvila_mcore.errors import ConfigError, DataError
from longvila_mcore.models.recompute import TOWER_SELECTIVE, recompute_fields
from longvila_mcore.models.specs import transformer_layer_spec


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """HF's `gelu_pytorch_tanh` (the same torch call): SigLIP was trained with this approximation."""
    return F.gelu(x, approximate="tanh")


def siglip_transformer_config(
    vision: VisionConfig,
    tp: int = 1,
    dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    recompute: str = "none",
    recompute_num_layers: int = 0,
) -> TransformerConfig:
    """`initialize=False` leaves the weights unset, for a tower that is loaded right after;
    `recompute` / `recompute_num_layers` as `train.*` (models/recompute.py)."""
    return TransformerConfig(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_attention_heads,
        num_query_groups=vision.num_attention_heads,  # plain multi-head attention
        ffn_hidden_size=vision.ffn_hidden_size,
        kv_channels=vision.hidden_size // vision.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vision.layer_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        bias_activation_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # As for the decoder: one full-size draw, then split, whatever the tensor-parallel size.
        use_cpu_initialization=True,
        perform_initialization=initialize,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # the default ("full") is deprecated and warns on every build
        **recompute_fields(
            recompute, recompute_num_layers, vision.num_used_layers, TOWER_SELECTIVE
        ),
    )


def _pooling_head(vision: VisionConfig, dtype: torch.dtype) -> nn.Module:
    """HF's own module, so its tensors keep their HF names and shapes."""
    config = SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_attention_heads=vision.num_attention_heads,
        layer_norm_eps=vision.layer_norm_eps,
        hidden_act="gelu_pytorch_tanh",
    )
    return SiglipMultiheadAttentionPoolingHead(config).to(dtype)


class TowerBlock(TransformerBlock):
    """All of the checkpoint's encoder layers and its post-LayerNorm, under the names HF's
    encoder gives them, of which `forward` runs the first `num_used` layers and not the norm.

    The recomputation is Megatron's own: selective inside each layer, full through the block's
    `_checkpointed_forward`, which walks `num_layers_per_pipeline_rank` layers (set here to the
    used ones) exactly as it does for the decoder.
    """

    def __init__(self, config: TransformerConfig, spec, num_used: int):
        super().__init__(config, spec=spec, post_layer_norm=True)
        self.num_used = num_used
        self.num_layers_per_pipeline_rank = num_used

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[s, b, h]` -> output of layer `num_used`; each of the b frames attends only to its own
        patches (our core attention treats the batch dimension as separate samples)."""
        if self.config.recompute_granularity == "full" and self.training:
            return self._checkpointed_forward(
                hidden_states=hidden_states,
                attention_mask=None,
                context=None,
                context_mask=None,
                rotary_pos_emb=None,
                attention_bias=None,
                packed_seq_params=None,
                use_inner_quantization_context=False,
            )
        for layer in self.layers[: self.num_used]:
            hidden_states, _ = layer(hidden_states=hidden_states, attention_mask=None)
        return hidden_states


class SiglipVisionTower(MegatronModule):
    """SigLIP features of video frames: `[f, 3, H, W]` pixels -> `[f, P, hidden]`, P = patches.

    The attention and MLP weights are split over tensor-parallel ranks; the patch and position
    embeddings (and the unused head) are small and replicated.
    """

    def __init__(self, vision: VisionConfig, config: TransformerConfig, backend):
        super().__init__(config=config)
        used = vision.num_used_layers
        if not 0 <= used <= vision.num_layers:
            raise ConfigError(
                f"vision.select_layer={vision.select_layer} selects no hidden state of a "
                f"{vision.num_layers}-layer tower; use a value in [-{vision.num_layers + 1}, -1] "
                "(LongVILA: -2)"
            )
        self.num_used_layers = used
        self.image_size = vision.image_size
        dtype = config.params_dtype
        self.patch_embedding = nn.Conv2d(
            3,
            vision.hidden_size,
            kernel_size=vision.patch_size,
            stride=vision.patch_size,
            dtype=dtype,
        )
        self.position_embedding = nn.Embedding(
            vision.num_patches_per_side**2, vision.hidden_size, dtype=dtype
        )
        self.encoder = TowerBlock(config, transformer_layer_spec(backend, causal=False), used)
        self.head = _pooling_head(vision, dtype) if vision.use_head else None
        self._freeze_unused()

    def set_trainable(self, trainable: bool) -> None:
        """Train or freeze the layers that run; the unused ones stay frozen either way."""
        self.requires_grad_(trainable)
        self._freeze_unused()

    def _freeze_unused(self) -> None:
        unused = self.encoder.layers[self.num_used_layers :]
        for module in (*unused, self.encoder.final_layernorm, self.head):
            if module is not None:
                module.requires_grad_(False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Output of layer `num_used_layers` (no post-LayerNorm) for normalised frames."""
        if frames.shape[-2:] != (self.image_size, self.image_size):
            raise DataError(
                f"frames of {tuple(frames.shape[-2:])} px do not match vision.image_size="
                f"{self.image_size}; resize them to the tower's size first"
            )
        patches = self.patch_embedding(frames.to(self.patch_embedding.weight.dtype))
        hidden = patches.flatten(2).transpose(1, 2) + self.position_embedding.weight
        # Megatron layers take [s, b, h], one frame per batch entry.
        hidden = self.encoder(hidden.transpose(0, 1).contiguous())
        return hidden.transpose(0, 1)
