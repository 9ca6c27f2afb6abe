"""Model FLOPs of a training step, for the MFU in the metrics (docs/benchmarks.md#training-metrics).

Counted are the matrix multiplications of the model as written (2 FLOPs per multiply-add):
the tower's patch embedding, attention projections, MLPs and attention over each frame's patches;
the projector's two linear layers per frame token; the decoder's attention projections, SwiGLU
MLP per token, its output layer per target token (logits are computed only there) and its
causal attention within each packed sample. Norms,
activations, RoPE and the loss are left out (a few percent at most). Recomputation is not
counted: this is model FLOPs, not hardware FLOPs.

A part's backward costs twice its forward when it learns (gradients of its activations and of
its weights), once its forward when only something before it learns (activations only), and
nothing when nothing before it learns (a frozen tower feeding a frozen projector).
"""

from __future__ import annotations

from collections.abc import Sequence

from longvila_mcore.config import ModelConfig
from longvila_mcore.data.batch import Batch

PARTS = ("vision_tower", "mm_projector", "llm")


def forward_flops(
    model: ModelConfig, frames: int, sample_lengths: Sequence[int], targets: int
) -> dict:
    """{part: (forward FLOPs of its weight matmuls, forward FLOPs of its attention)} for
    `frames` frames and packed samples of `sample_lengths` tokens with `targets` targets."""
    v, llm = model.vision, model.llm
    patches = v.num_patches_per_side**2
    tokens = sum(sample_lengths)
    tower_linear = (
        frames
        * patches
        * 2
        * (
            3 * v.patch_size**2 * v.hidden_size  # patch embedding (once)
            + v.num_used_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.ffn_hidden_size)
        )
    )
    # QK^T and AV over all patches of a frame: 2 x 2 x patches^2 x hidden per layer
    tower_attention = frames * v.num_used_layers * 4 * patches**2 * v.hidden_size
    projector = (
        frames
        * model.tokens_per_frame
        * 2
        * (4 * v.hidden_size * llm.hidden_size + llm.hidden_size**2)
    )
    d = llm.hidden_size
    kv = d // llm.num_attention_heads * llm.num_key_value_heads
    per_token_layer = 2 * d * d + 2 * d * kv + 3 * d * llm.ffn_hidden_size
    decoder_linear = 2 * (tokens * llm.num_layers * per_token_layer + targets * d * llm.vocab_size)
    # causal: half of QK^T and AV over each sample, 2 x 2 x n^2 / 2 x hidden per layer
    decoder_attention = llm.num_layers * 2 * sum(n * n for n in sample_lengths) * d
    return {
        "vision_tower": (tower_linear, tower_attention),
        "mm_projector": (projector, 0),
        "llm": (decoder_linear, decoder_attention),
    }


def training_flops(
    model: ModelConfig,
    frames: int,
    sample_lengths: Sequence[int],
    targets: int,
    trainable: set[str],
) -> float:
    """Forward plus backward model FLOPs (see the module docstring for the backward rule)."""
    total, learning_before = 0.0, False
    for part, (linear, attention) in forward_flops(model, frames, sample_lengths, targets).items():
        learns = part in trainable
        learning_before |= learns
        backward_linear = 2 if learns else 1 if learning_before else 0
        backward_attention = 2 if learning_before else 0
        total += linear * (1 + backward_linear) + attention * (1 + backward_attention)
    return total


def batches_flops(model: ModelConfig, batches: Sequence[Batch], trainable: set[str]) -> float:
    """Training FLOPs of a rank's micro-batches (each a pack of samples and their frames)."""
    total = 0.0
    for batch in batches:
        bounds = batch.cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        total += training_flops(model, batch.frames.shape[0], lengths, batch.num_targets, trainable)
    return total
