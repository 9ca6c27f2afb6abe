"""Tiny HF `transformers` models with random weights: the independent references of the tests."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from longvila_mcore.config import LLMConfig, VisionConfig


def tiny_llm_config(**overrides) -> LLMConfig:
    base = dict(
        vocab_size=96,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        ffn_hidden_size=96,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    base.update(overrides)
    return LLMConfig(**base)


def hf_qwen2(llm: LLMConfig, seed: int = 0) -> Qwen2ForCausalLM:
    rope = {"rope_type": "default", "rope_theta": llm.rope_theta}
    if llm.rope_scaling_factor:
        rope = {
            "rope_type": "linear",
            "factor": llm.rope_scaling_factor,
            "rope_theta": llm.rope_theta,
        }
    config = Qwen2Config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        intermediate_size=llm.ffn_hidden_size,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=llm.tie_word_embeddings,
        max_position_embeddings=llm.max_position_embeddings,
        rope_parameters=rope,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def tiny_vision_config(**overrides) -> VisionConfig:
    """4 x 4 patches of 4 px; 3 layers of which the first 2 are used (select_layer -2)."""
    base = dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_layers=3,
        num_attention_heads=4,
        ffn_hidden_size=48,
    )
    base.update(overrides)
    return VisionConfig(**base)


def hf_siglip(vision: VisionConfig, seed: int = 0) -> SiglipVisionModel:
    config = SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=vision.layer_norm_eps,
        vision_use_head=vision.use_head,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases (HF zeroes the attention biases)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def released_siglip_tensors(model: SiglipVisionModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of the released checkpoints.

    Those were written by transformers 4.x with a `vision_model.` prefix, which transformers 5
    drops when saving (and strips when loading).
    """
    return {f"vision_model.{name}": t for name, t in model.state_dict().items()}
