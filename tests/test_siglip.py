"""SigLIP vision tower (Megatron TransformerBlock) against HF transformers' SiglipVisionModel."""

import pytest
import torch

from tests.hf_reference import hf_siglip, released_siglip_tensors, tiny_vision_config
from tests.multiproc import run_ranks

CASES = {
    "4x4_patches": dict(),
    "3x3_patches": dict(image_size=12),
    "with_head": dict(use_head=True),
    "all_layers_used": dict(select_layer=-1),
}


def build_tower(vision, hf=None):
    """Our tower for this rank's tensor-parallel group, loaded from `hf` when given."""
    from megatron.core import parallel_state

    from longvila_mcore.checkpoint.mapping import siglip_rules
    from longvila_mcore.checkpoint.tensors import load_full_tensors
    from longvila_mcore.config import ModelConfig
    from longvila_mcore.models.siglip import SiglipVisionTower, siglip_transformer_config
    from longvila_mcore.runtime import spec_backend

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tower = SiglipVisionTower(
        vision, siglip_transformer_config(vision, tp=tp), spec_backend(torch.device("cpu"))
    )
    if hf is not None:
        tensors = released_siglip_tensors(hf)
        load_full_tensors(
            tower,
            siglip_rules(ModelConfig(vision=vision)),
            lambda _, name: tensors[name],
            parallel_state.get_tensor_model_parallel_rank(),
            tp,
            prefix="vision_tower.",
        )
    return tower


def build_and_compare(overrides: dict, seed: int = 0) -> float:
    """Max |ours - HF| / max |HF| of the selected hidden state, on this rank's process group."""
    vision = tiny_vision_config(**overrides)
    hf = hf_siglip(vision, seed)
    tower = build_tower(vision, hf)
    torch.manual_seed(seed + 1)
    # Three frames in one call: each must be encoded on its own, as HF does.
    frames = torch.rand(3, 3, vision.image_size, vision.image_size) * 2 - 1
    with torch.no_grad():
        hidden_states = hf(pixel_values=frames, output_hidden_states=True).hidden_states
        ours = tower(frames)
    assert len(hidden_states) == vision.num_layers + 1  # embeddings, then each layer
    ref = hidden_states[vision.select_layer]
    assert ours.shape == ref.shape == (3, vision.num_patches_per_side**2, vision.hidden_size)
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_features_match_hf(single_rank, case):
    assert build_and_compare(CASES[case]) <= 1e-5


@pytest.mark.parametrize("use_head", [False, True])
def test_checkpoint_round_trips_bit_identically(single_rank, use_head):
    from longvila_mcore.checkpoint.mapping import siglip_rules
    from longvila_mcore.config import ModelConfig

    vision = tiny_vision_config(use_head=use_head)
    hf = hf_siglip(vision)
    tensors = released_siglip_tensors(hf)
    params = dict(build_tower(vision, hf).named_parameters())
    rules = siglip_rules(ModelConfig(vision=vision))
    assert sorted(h for r in rules for h in r.hf) == sorted(tensors)
    for rule in rules:
        exported = rule.split(params[rule.mcore.removeprefix("vision_tower.")])
        for name, t in zip(rule.hf, exported, strict=True):
            assert torch.equal(t, tensors[name]), name


def test_gradients_reach_only_the_used_layers(single_rank):
    vision = tiny_vision_config(use_head=True)
    tower = build_tower(vision, hf_siglip(vision))
    tower.set_trainable(False)
    assert not any(p.requires_grad for p in tower.parameters())
    tower.set_trainable(True)  # must not thaw the unused layers
    frames = torch.rand(2, 3, vision.image_size, vision.image_size)
    tower(frames).square().sum().backward()
    unused_layers = tuple(
        f"encoder.layers.{i}." for i in range(vision.num_used_layers, vision.num_layers)
    )
    assert unused_layers  # the case must hold a frozen layer
    for name, p in tower.named_parameters():
        frozen = name.startswith(("head.", "encoder.final_layernorm.", *unused_layers))
        assert p.requires_grad != frozen, name
        if frozen:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_configuration_is_refused(single_rank):
    with pytest.raises(ValueError, match="select_layer=-5"):
        build_tower(tiny_vision_config(select_layer=-5))
    vision = tiny_vision_config()
    with pytest.raises(ValueError, match="image_size=16"):
        build_tower(vision)(torch.zeros(1, 3, 12, 12))


def _tp2_cases():
    from longvila_mcore.config import ParallelConfig
    from longvila_mcore.runtime import init_model_parallel

    init_model_parallel(ParallelConfig(tp=2))
    return {case: build_and_compare(overrides) for case, overrides in CASES.items()}


@pytest.mark.slow
def test_features_match_hf_tensor_parallel_2():
    errors = run_ranks(2, _tp2_cases)
    assert all(e <= 1e-5 for e in errors.values()), errors
