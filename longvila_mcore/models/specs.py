"""Layer specs of the tower and the decoder: which module fills each slot of a TransformerLayer.

`backend` (from `runtime.spec_backend`) supplies the linear and norm modules: Megatron's local ones
on CPU, Transformer Engine's on GPU. Norms stay separate modules (no fused norm+linear) so both
backends share one checkpoint layout. The core attention is always ours: causal attention over
packed samples for the decoder, bidirectional for the tower, sequence parallel when asked.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from longvila_mcore.parallel.core_attention import CoreAttention


def transformer_layer_spec(
    backend, causal: bool, sequence_parallel: bool = False, mlp_activation: type | None = None
) -> ModuleSpec:
    """A pre-norm layer: norm -> self-attention -> residual, norm -> MLP -> residual.

    The norm type (RMSNorm for Qwen2, LayerNorm for SigLIP), biases and activation come from the
    TransformerConfig; `causal` chooses the decoder's or the tower's attention mask.
    `sequence_parallel` makes the attention 2D (Ulysses x ring) over the context-parallel group
    when it has more than one rank: the decoder's tokens are sharded, the tower's frames are not.
    `mlp_activation` is a module for the MLP's activation slot (used when the config sets
    `use_te_activation_func`); without it the MLP applies `config.activation_func`.
    """
    # Both backends then return a norm that follows `config.normalization` (WrappedTorchNorm /
    # TENorm); rms_norm=False would pick apex's FusedLayerNorm when apex is present, which has no
    # RMSNorm.
    norm = backend.layer_norm(rms_norm=True, for_qk=False)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=ModuleSpec(
                        module=CoreAttention, params={"sequence_parallel": sequence_parallel}
                    ),
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=backend.column_parallel_linear(),
                    activation_func=mlp_activation,
                    linear_fc2=backend.row_parallel_linear(),
                ),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
