"""Qwen2 decoder (Megatron GPTModel) against HF transformers' Qwen2ForCausalLM, same weights."""

import pytest
import torch

from tests.hf_reference import hf_qwen2, tiny_llm_config
from tests.multiproc import run_ranks

CASES = {
    "gqa_untied": dict(),
    "gqa_tied": dict(tie_word_embeddings=True),
    "linear_rope_scaling": dict(rope_scaling_factor=4.0, rope_theta=1_000_000.0),
    "mha_odd_vocab": dict(num_key_value_heads=4, vocab_size=97),
}


def build_and_compare(overrides: dict, seed: int = 0) -> float:
    """Max |ours - HF| / max |HF| of the logits, on this rank's process group."""
    from megatron.core import parallel_state, tensor_parallel

    from longvila_mcore.checkpoint.mapping import qwen2_rules
    from longvila_mcore.checkpoint.tensors import load_full_tensors
    from longvila_mcore.config import ModelConfig
    from longvila_mcore.models.qwen2 import Qwen2Model, padded_vocab_size, qwen2_transformer_config
    from longvila_mcore.runtime import spec_backend

    llm = tiny_llm_config(**overrides)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    hf = hf_qwen2(llm, seed)
    ours = Qwen2Model(llm, qwen2_transformer_config(llm, tp=tp), spec_backend(torch.device("cpu")))
    hf_tensors = hf.state_dict()
    rules = qwen2_rules(ModelConfig(llm=llm), padded_vocab_size(llm.vocab_size, tp))
    load_full_tensors(
        ours,
        rules,
        lambda _, name: hf_tensors[name],
        parallel_state.get_tensor_model_parallel_rank(),
        tp,
        prefix="llm.",
    )
    torch.manual_seed(seed + 1)
    ids = torch.randint(0, llm.vocab_size, (2, 40))
    positions = torch.arange(ids.shape[1]).expand_as(ids) + 1000  # far positions exercise RoPE
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=positions).logits
        logits = ours(ours.embed(ids), positions)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    logits = logits.transpose(0, 1)[..., : llm.vocab_size]
    return ((logits - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(single_rank, case):
    assert build_and_compare(CASES[case]) <= 1e-5


def _tp2_cases():
    from longvila_mcore.config import ParallelConfig
    from longvila_mcore.runtime import init_model_parallel

    init_model_parallel(ParallelConfig(tp=2))
    return {case: build_and_compare(overrides) for case, overrides in CASES.items()}


@pytest.mark.slow
def test_logits_match_hf_tensor_parallel_2():
    errors = run_ranks(2, _tp2_cases)
    assert all(e <= 1e-5 for e in errors.values()), errors
