"""Activation recomputation (`train.recompute`, `train.recompute_num_layers`) as Megatron's
TransformerConfig fields, for the decoder and for the vision tower.

- `none`: every activation is kept for backward.
- `selective`: parts of each layer are recomputed in backward from their inputs.
  Decoder: the core attention and the MLP (`core_attn`, `mlp`). The MLP holds most of a Qwen2
  layer's activations (fc1's 2 x ffn outputs and the SwiGLU's ffn per token against about 8 x
  hidden for the rest), the attention kernel's saved q/k/v/out are the next largest.
  Tower: the core attention only. Megatron's `mlp` recomputation loops forever in backward when
  the linear layers have biases, as SigLIP's do, and its `layernorm` recomputation needs
  Transformer Engine (REFERENCE 6).
- `full`: each layer keeps only its input and is recomputed whole in backward (Megatron's
  `block` method: the first `recompute_num_layers` layers of the tower and of each pipeline
  stage's decoder layers, 0 meaning all of them).

Megatron saves and restores the RNG states around each recomputed piece, so recomputation is
exact with dropout too (on CPU through runtime/megatron_cpu.py's RNG redirections).
"""

from __future__ import annotations

from longvila_mcore.errors import ConfigError

RECOMPUTE_CHOICES = ("none", "selective", "full")
DECODER_SELECTIVE = ("core_attn", "mlp")
TOWER_SELECTIVE = ("core_attn",)


def check_recompute(recompute: str, num_layers: int) -> None:
    """Raise naming the option unless `recompute` / `num_layers` are valid."""
    if recompute not in RECOMPUTE_CHOICES:
        raise ConfigError(
            f"train.recompute={recompute!r} is not a recompute mode; use none, selective or full"
        )
    if num_layers < 0:
        raise ConfigError(f"train.recompute_num_layers={num_layers} must be >= 0 (0: every layer)")
    if num_layers and recompute != "full":
        raise ConfigError(
            f"train.recompute_num_layers={num_layers} applies to train.recompute=full only "
            f"(here {recompute}); set it to 0 or use full"
        )


def recompute_fields(
    recompute: str, num_layers: int, block_layers: int, selective: tuple[str, ...]
) -> dict:
    """TransformerConfig keyword arguments for a block of `block_layers` layers whose selective
    recomputation covers the modules `selective`."""
    check_recompute(recompute, num_layers)
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(selective)}
    return {
        "recompute_granularity": "full",
        "recompute_method": "block",
        "recompute_num_layers": min(num_layers, block_layers) if num_layers else block_layers,
    }
