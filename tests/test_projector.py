"""The mlp_downsample projector against a direct statement of REFERENCE 1, same weights."""

import pytest
import torch
import torch.nn.functional as F

from longvila_mcore.config import LLMConfig, ModelConfig, VisionConfig
from longvila_mcore.models.projector import DownSample2x2, build_projector
from tests.hf_reference import reference_downsample


def model_config(side: int, channels: int = 8, llm_hidden: int = 16, **overrides) -> ModelConfig:
    """A model whose tower yields `side` x `side` patches of `channels` features."""
    vision = VisionConfig(image_size=2 * side, patch_size=2, hidden_size=channels)
    return ModelConfig(llm=LLMConfig(hidden_size=llm_hidden), vision=vision, **overrides)


def reference_projector(x: torch.Tensor, projector: torch.nn.Module) -> torch.Tensor:
    norm, fc1, fc2 = projector.layers[1], projector.layers[2], projector.layers[4]
    y = reference_downsample(x)
    y = F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, eps=1e-5)
    y = F.gelu(y @ fc1.weight.T + fc1.bias)  # exact (erf) GELU
    return y @ fc2.weight.T + fc2.bias


@pytest.mark.parametrize("side", [4, 3, 27])
def test_projector_matches_reference(side):
    model = model_config(side)
    torch.manual_seed(side)
    projector = build_projector(model)
    with torch.no_grad():  # a non-trivial LayerNorm, so a swapped weight cannot hide
        projector.layers[1].weight.copy_(torch.randn(4 * 8) * 0.1 + 1.0)
        projector.layers[1].bias.copy_(torch.randn(4 * 8) * 0.1)
    features = torch.randn(2, side * side, 8)
    with torch.no_grad():
        ours = projector(features)
        ref = reference_projector(features, projector)
    assert ours.shape == (2, model.tokens_per_frame, 16)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def _patch_coordinates(side: int) -> torch.Tensor:
    """`[1, side * side, 2]`: patch (r, c) of the row-major raster holds (r + 1, c + 1)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows + 1, cols + 1], dim=-1).reshape(1, side * side, 2).float()


def test_token_order_is_column_pair_major():
    tokens = DownSample2x2()(_patch_coordinates(4))[0].tolist()
    assert tokens[0] == [1, 1, 1, 2, 2, 1, 2, 2]  # the top-left 2x2 block, row by row
    assert tokens[1] == [3, 1, 3, 2, 4, 1, 4, 2]  # the block below it, not the one to its right
    assert tokens[2] == [1, 3, 1, 4, 2, 3, 2, 4]  # then the next column pair, from the top
    # An odd grid: zeros (padding) below the last row and right of the last column.
    tokens = DownSample2x2()(_patch_coordinates(3))[0].tolist()
    assert len(tokens) == 4
    assert tokens[1] == [3, 1, 3, 2, 0, 0, 0, 0]
    assert tokens[2] == [1, 3, 0, 0, 2, 3, 0, 0]
    assert tokens[3] == [3, 3, 0, 0, 0, 0, 0, 0]


def test_checkpoint_names():
    from longvila_mcore.checkpoint.mapping import projector_rules
    from longvila_mcore.checkpoint.tensors import load_full_tensors

    model = model_config(3)
    source, target = build_projector(model), build_projector(model)
    tensors = source.state_dict()
    rules = projector_rules(model)
    assert sorted(h for r in rules for h in r.hf) == sorted(tensors)
    load_full_tensors(target, rules, lambda _, name: tensors[name], prefix="mm_projector.")
    assert all(torch.equal(t, target.state_dict()[n]) for n, t in tensors.items())


def test_unknown_projector_type_is_refused():
    from longvila_mcore.checkpoint.mapping import projector_rules

    model = model_config(3, projector_type="mlp2x_gelu")
    with pytest.raises(ValueError, match="'mlp2x_gelu'.*'mlp_downsample'"):
        build_projector(model)
    with pytest.raises(ValueError, match="'mlp2x_gelu'"):
        projector_rules(model)


def test_non_square_patch_grid_is_refused():
    with pytest.raises(ValueError, match="10 patches"):
        DownSample2x2()(torch.zeros(1, 10, 8))
