"""Tiny HF `transformers` models with random weights: the independent references of the tests."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from longvila_mcore.config import LLMConfig


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
