"""Activation recomputation (train.recompute): the composed model's loss and gradients with
`selective` and `full` equal those without, in one process and under Ulysses 2; with dropout
too (Megatron restores the RNG state before recomputing); and what each mode recomputes.

Equality is bitwise for most tensors; a reduction may add in another order when a recomputed
layer's gradient arrives in another memory layout, so gradients are compared to 1e-6 relative.
"""

import pytest
import torch
from omegaconf import OmegaConf

from longvila_mcore.config import ParallelConfig, TrainConfig
from longvila_mcore.models.recompute import recompute_fields
from tests.multiproc import run_ranks
from tests.test_sp_model import model_config, packed_batch

TOLERANCE = 1e-6
MODES = [("selective", 0), ("full", 0), ("full", 1)]


def _loss_and_grads(parallel, recompute, num_layers=0, dropout=0.0, counts=None):
    """(loss, {name: grad}) of one forward + backward of the tiny model on the packed batch;
    `counts` (a dict) receives how often each layer, core attention and MLP ran forward."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.parallel.core_attention import CoreAttention

    cfg = model_config()
    torch.manual_seed(0)
    model = LongVILAModel(
        cfg, parallel, torch.device("cpu"), recompute=recompute, recompute_num_layers=num_layers
    )
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, TransformerLayer):
            module.hidden_dropout = dropout
        if counts is not None and isinstance(module, (TransformerLayer, CoreAttention, MLP)):
            counts[name] = 0

            def count(module, args, output, name=name):
                counts[name] += 1

            module.register_forward_hook(count)
    batch = packed_batch(cfg.tokens_per_frame)
    torch.manual_seed(1)  # the dropout masks
    loss_sum, _ = model.loss(batch)
    loss = loss_sum / batch.num_targets
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worst_error(grads, ref) -> float:
    assert grads.keys() == ref.keys()
    assert any(n.startswith("vision_tower.encoder.layers.") for n in ref)
    return max(
        ((grads[n] - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for n, r in ref.items()
    )


def _grad_norm(grads) -> float:
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])).item()


def _compare_to_none(parallel, dropout=0.0) -> dict:
    ref_loss, ref_grads = _loss_and_grads(parallel, "none", dropout=dropout)
    errors = {}
    for mode, layers in MODES:
        loss, grads = _loss_and_grads(parallel, mode, layers, dropout)
        errors[f"{mode}{layers or ''}"] = {
            "loss": (abs(loss - ref_loss) / abs(ref_loss)).item(),
            "grad": _worst_error(grads, ref_grads),
            "grad_norm": abs(_grad_norm(grads) / _grad_norm(ref_grads) - 1),
        }
    return {"errors": errors, "ref_loss": ref_loss.item()}


def _assert_equal(errors: dict) -> None:
    for mode, e in errors.items():
        assert max(e.values()) <= TOLERANCE, (mode, e)


def test_recompute_matches_none(single_rank):
    result = _compare_to_none(ParallelConfig())
    _assert_equal(result["errors"])


def test_recompute_with_dropout_matches_none(single_rank):
    """Dropout after attention and MLP in every layer: full recomputation draws the same masks
    again only if the RNG state saved before each layer is restored (runtime/megatron_cpu.py)."""
    _, with_dropout = _loss_and_grads(ParallelConfig(), "none", dropout=0.2)
    _, without = _loss_and_grads(ParallelConfig(), "none")
    assert _worst_error(with_dropout, without) > 0.1  # the dropout is really on
    _assert_equal(_compare_to_none(ParallelConfig(), dropout=0.2)["errors"])


def test_what_each_mode_recomputes(single_rank):
    """Forward calls per module in one step: recomputed modules run twice. Full: every layer
    of the tower (its used layers) and of the decoder, or only the first with
    recompute_num_layers=1; selective: the decoder's core attention and MLP, the tower's core
    attention."""
    cfg = model_config()
    used = cfg.vision.num_used_layers

    def calls(mode, layers=0):
        counts = {}
        _loss_and_grads(ParallelConfig(), mode, layers, counts=counts)
        return counts

    none = calls("none")
    tower = [f"vision_tower.encoder.layers.{i}" for i in range(used)]
    decoder = [f"llm.decoder.layers.{i}" for i in range(cfg.llm.num_layers)]
    assert all(none[n] == 1 for n in tower + decoder)
    assert none[f"vision_tower.encoder.layers.{used}"] == 0  # unused layers never run

    full = calls("full")
    assert all(full[n] == 2 for n in tower + decoder), full
    first = calls("full", 1)
    assert [first[n] for n in (tower[0], tower[1], decoder[0], decoder[1])] == [2, 1, 2, 1]

    selective = calls("selective")
    for counts in (full, first, selective):
        assert counts[f"vision_tower.encoder.layers.{used}"] == 0
    for n in tower + decoder:
        assert selective[n] == 1 and selective[f"{n}.self_attention.core_attention"] == 2
    assert all(selective[f"{n}.mlp"] == 2 for n in decoder)
    assert all(selective[f"{n}.mlp"] == 1 for n in tower)


def test_recompute_options():
    fields = recompute_fields("full", 0, 28, ("core_attn",))
    assert fields == {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": 28,
    }
    assert recompute_fields("full", 40, 27, ())["recompute_num_layers"] == 27
    assert recompute_fields("none", 0, 28, ("mlp",)) == {}

    def error(**train):
        with pytest.raises(ValueError) as err:
            OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), train))
        return str(err.value)

    assert "train.recompute='some'" in error(recompute="some")
    assert "train.recompute_num_layers=-1" in error(recompute="full", recompute_num_layers=-1)
    assert "full only" in error(recompute="selective", recompute_num_layers=2)


def test_tower_selective_avoids_the_mlp_trap():
    """Megatron's `mlp` recomputation loops forever with linear biases (SigLIP's), its
    `layernorm` one needs Transformer Engine: the tower's selective set has neither."""
    from longvila_mcore.models.qwen2 import qwen2_transformer_config
    from longvila_mcore.models.siglip import siglip_transformer_config

    cfg = model_config()
    tower = siglip_transformer_config(cfg.vision, recompute="selective")
    assert tower.add_bias_linear and tower.recompute_modules == ["core_attn"]
    decoder = qwen2_transformer_config(cfg.llm, recompute="selective")
    assert not decoder.add_bias_linear and decoder.recompute_modules == ["core_attn", "mlp"]


def _compare_under_ulysses():
    from longvila_mcore.runtime import init_model_parallel

    parallel = ParallelConfig(ulysses=2)
    init_model_parallel(parallel)
    return _compare_to_none(parallel, dropout=0.2)["errors"]


@pytest.mark.slow
def test_recompute_matches_none_under_ulysses():
    """Ulysses 2: a recomputed layer repeats its all-to-alls in backward on both ranks."""
    _assert_equal(run_ranks(2, _compare_under_ulysses))
