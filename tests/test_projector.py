"""The mlp_downsample projector against statements of REFERENCE 1 independent of its code."""

import pytest
import torch
import torch.nn.functional as F

from longvila_mcore.config import LLMConfig, ModelConfig, VisionConfig
from longvila_mcore.models.projector import DownSample2x2, build_projector
from tests.hf_reference import reference_downsample

ORDERS = ("raster", "legacy")


def model_config(side: int, channels: int = 8, llm_hidden: int = 16, **overrides) -> ModelConfig:
    """A model whose tower yields `side` x `side` patches of `channels` features."""
    vision = VisionConfig(image_size=2 * side, patch_size=2, hidden_size=channels)
    return ModelConfig(llm=LLMConfig(hidden_size=llm_hidden), vision=vision, **overrides)


def reference_projector(x: torch.Tensor, projector: torch.nn.Module, order: str) -> torch.Tensor:
    norm, fc1, fc2 = projector.layers[1], projector.layers[2], projector.layers[4]
    y = reference_downsample(x, order)
    y = F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, eps=1e-5)
    y = F.gelu(y @ fc1.weight.T + fc1.bias)  # exact (erf) GELU
    return y @ fc2.weight.T + fc2.bias


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("side", [4, 3, 5, 27])
def test_projector_matches_reference(side, order):
    model = model_config(side, token_order=order)
    torch.manual_seed(side)
    projector = build_projector(model)
    with torch.no_grad():  # a non-trivial LayerNorm, so a swapped weight cannot hide
        projector.layers[1].weight.copy_(torch.randn(4 * 8) * 0.1 + 1.0)
        projector.layers[1].bias.copy_(torch.randn(4 * 8) * 0.1)
    features = torch.randn(2, side * side, 8)
    with torch.no_grad():
        ours = projector(features)
        ref = reference_projector(features, projector, order)
    assert ours.shape == (2, model.tokens_per_frame, 16)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def vila_flat_square(x: torch.Tensor, last_permute: bool) -> torch.Tensor:
    """REFERENCE 1's wording of VILA's code: grid, zero-pad odd axes, view, permute, view,
    (the NVILA-era code only:) permute, flatten."""
    n, p, c = x.shape
    a = b = round(p**0.5)
    x = x.reshape(n, a, b, c)
    if a % 2:
        x = torch.cat([x, x.new_zeros(n, 1, b, c)], dim=1)
        a += 1
    if b % 2:
        x = torch.cat([x, x.new_zeros(n, a, 1, c)], dim=2)
        b += 1
    x = x.contiguous().view(n, a, b // 2, 2 * c).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, b // 2, a // 2, 4 * c)
    if last_permute:
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, a * b // 4, 4 * c)


@pytest.mark.parametrize("side", [3, 4, 5, 6])
def test_reference_statements_agree(side):
    """The cell-by-cell statement of both orders (tests/hf_reference.py) is REFERENCE 1's
    view/permute sequence with (raster) and without (legacy) the last permute."""
    x = torch.randn(2, side * side, 3)
    assert torch.equal(reference_downsample(x, "raster"), vila_flat_square(x, last_permute=True))
    assert torch.equal(reference_downsample(x, "legacy"), vila_flat_square(x, last_permute=False))
    if side > 2:
        assert not torch.equal(reference_downsample(x, "raster"), reference_downsample(x, "legacy"))


def _patch_coordinates(side: int) -> torch.Tensor:
    """`[1, side * side, 2]`: patch (r, c) of the row-major raster holds (r + 1, c + 1)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([rows + 1, cols + 1], dim=-1).reshape(1, side * side, 2).float()


def test_token_orders_on_a_grid_of_coordinates():
    raster = DownSample2x2("raster")(_patch_coordinates(4))[0].tolist()
    assert raster[0] == [1, 1, 1, 2, 2, 1, 2, 2]  # the top-left 2x2 block, row by row
    assert raster[1] == [1, 3, 1, 4, 2, 3, 2, 4]  # the block to its right
    assert raster[2] == [3, 1, 3, 2, 4, 1, 4, 2]  # then the next row pair, from the left
    legacy = DownSample2x2("legacy")(_patch_coordinates(4))[0].tolist()
    assert legacy[0] == raster[0]
    assert legacy[1] == raster[2] and legacy[2] == raster[1]  # the block below comes first
    # An odd grid: zeros (padding) below the last row and right of the last column.
    raster = DownSample2x2("raster")(_patch_coordinates(3))[0].tolist()
    assert len(raster) == 4
    assert raster[1] == [1, 3, 0, 0, 2, 3, 0, 0]
    assert raster[2] == [3, 1, 3, 2, 0, 0, 0, 0]
    assert raster[3] == [3, 3, 0, 0, 0, 0, 0, 0]
    legacy = DownSample2x2("legacy")(_patch_coordinates(3))[0].tolist()
    assert legacy == [raster[0], raster[2], raster[1], raster[3]]


def test_unknown_token_order_is_refused():
    with pytest.raises(ValueError, match="model.token_order='diagonal'.*raster.*legacy"):
        model_config(3, token_order="diagonal")
    with pytest.raises(ValueError, match="'column'"):
        DownSample2x2("column")


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
